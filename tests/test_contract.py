"""timm's model contract on every registered backbone (zoo.contract), at the reduced sizes families declare.

The model list comes from the registry, so a new family is covered as soon as it registers. What is asserted follows
timm's tests/test_models.py (forward/backward, default cfgs, head reset, features, intermediates, TorchScript, FX);
items a family cannot meet are declared in ``zoo.contract.CONTRACT_EXCEPTIONS`` and checked to really fail (a
declared exception that passes is an error, so the table cannot go stale).

Cost: configuration checks run for every registered name; behavioural checks (forward/backward, heads,
intermediates, features, TorchScript, FX) run once per distinct code path (``_code_paths``: registered variants that
differ only in depth / width run the same code and collapse to one).
"""
import contextlib
import importlib
import math
from collections.abc import Mapping

import pytest
import torch
from torch import nn

import zoo
from zoo.contract import ZooModel, contract_exceptions, is_backbone_task, small_cfg
from zoo.registry import get_entry, list_models, model_info

BACKBONES = [n for n in list_models() if is_backbone_task(model_info(n)["task"])]


def _small(name):
    return small_cfg(name, importlib.import_module(get_entry(name).module))


def _create(name, **kw):
    torch.manual_seed(0)
    return zoo.create_model(name, **{**_small(name).kwargs, **kw})


def _input(model, name, batch=1, seed=1):
    c, h, w = model.pretrained_cfg["input_size"]
    side = _small(name).img_size or min(h, 64)
    return torch.randn(batch, c, side, side, generator=torch.Generator().manual_seed(seed))


def _code_paths(name):
    """What a small model exercises: every module type with the types of its children (None included: a branch
    absent in one variant), and the input size. Sizes do not enter, so registered variants that run the same code
    (e.g. fastvit_t8 / t12 / s12) share the behavioural checks; configs are still checked for every name."""
    with torch.device("meta"):
        m = zoo.create_model(name, **_small(name).kwargs)
    sig = {(type(mod).__qualname__, tuple(sorted((k, type(v).__name__) for k, v in mod._modules.items())))
           for mod in m.modules()}
    return frozenset(sig), _small(name).img_size


def _distinct(names):
    seen, out = set(), []
    for n in names:
        sig = _code_paths(n)
        if sig not in seen:
            seen.add(sig)
            out.append(n)
    return out


DISTINCT = _distinct(BACKBONES)


@contextlib.contextmanager
def contract_item(name, item):
    """Run a contract check; for a declared exception the check must fail (else the declaration is stale)."""
    reason = contract_exceptions(name).get(item)
    if reason is None:
        yield
        return
    try:
        yield
    except Exception:  # noqa: BLE001 - the declared gap is real
        return
    pytest.fail(f"{name}: '{item}' is declared unsupported ({reason}) but works: remove it from CONTRACT_EXCEPTIONS")


def test_registry_has_backbones_of_every_family():
    assert BACKBONES, "no registered backbone"
    families = {get_entry(n).module for n in BACKBONES}
    assert {"zoo.vision.nextvit", "zoo.vision.fastvit", "zoo.vision.mobiledets", "zoo.snn.iir_snn"} <= families
    for pattern in zoo.contract.CONTRACT_EXCEPTIONS:  # every declared exception names registered models
        assert any(__import__("fnmatch").fnmatch(n, pattern) for n in BACKBONES), pattern


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", BACKBONES)
def test_default_cfg_and_attributes(name):
    m = _create(name).eval()
    assert isinstance(m, ZooModel), f"{name}: backbones subclass zoo.contract.ZooModel"
    cfg = m.pretrained_cfg
    assert m.default_cfg is cfg and isinstance(cfg, Mapping)
    assert cfg["architecture"] == name and cfg.get("no_such_key", 7) == 7 and dict(cfg)["input_size"] == cfg.input_size
    # timm's data helpers read it (the preprocessing a user builds for their own images)
    from timm.data import resolve_data_config, resolve_model_data_config

    data = resolve_model_data_config(m)
    assert data["input_size"] == tuple(cfg["input_size"]) and data["mean"] == tuple(cfg["mean"])
    assert data["std"] == tuple(cfg["std"]) and data["crop_pct"] == cfg["crop_pct"]
    assert data["interpolation"] == cfg["interpolation"] and data["crop_mode"] == "center"
    assert resolve_data_config({}, model=m) == data
    # timm's attribute contract
    assert m.num_classes == cfg["num_classes"] >= 0 and m.num_features > 0 and m.head_hidden_size > 0
    assert m.in_chans == cfg["input_size"][0]
    sd = m.state_dict()
    assert cfg["first_conv"] + ".weight" in sd, f"first_conv {cfg['first_conv']} not in the model"
    if cfg["num_classes"]:
        assert cfg["classifier"] + ".weight" in sd, f"classifier {cfg['classifier']} not in the model"
        assert m.get_classifier() is m.get_submodule(cfg["classifier"])
    if m.feature_info:
        from timm.models import FeatureInfo

        FeatureInfo([dict(f) for f in m.feature_info], len(m.feature_info))  # non-decreasing reductions, names
        for f in m.feature_info:
            m.get_submodule(f["module"])
    with contract_item(name, "pool_size"):
        # forward_features is unpooled; at the config's input size its map is pool_size (timm checks <= 448 px)
        size = cfg["input_size"]
        red = m.feature_info[-1]["reduction"]
        assert tuple(cfg["pool_size"]) == tuple(math.ceil(s / red) for s in size[1:])
        if max(size) <= 448 and name in DISTINCT:  # the relation above covers the variants of the same code
            with torch.no_grad():
                assert m.forward_features(torch.randn(1, *size)).shape[-2:] == tuple(cfg["pool_size"])


def test_data_helpers_reexported():
    from PIL import Image

    m = _create("nextvit_small")
    cfg = zoo.data.resolve_model_data_config(m)
    t = zoo.data.create_transform(**cfg)
    x = t(Image.new("RGB", (300, 260), (120, 30, 200)))
    assert x.shape == cfg["input_size"] and zoo.data.resolve_data_config({}, model=m) == cfg


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", DISTINCT)
def test_forward_backward(name):
    m = _create(name, num_classes=7).train()
    x = _input(m, name, batch=2)
    y = m(x)
    y.mean().backward()
    assert y.shape == (2, 7) and not torch.isnan(y).any()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", DISTINCT)
def test_head_api(name):
    m = _create(name).eval()
    x = _input(m, name, batch=2)
    with torch.no_grad():
        feats = m.forward_features(x)
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, m.head_hidden_size)
        m.reset_classifier(0)
        assert m.num_classes == 0 and m(x).shape == pre.shape
        torch.testing.assert_close(m(x), pre)
        with contract_item(name, "pool_size"):
            assert feats.ndim == 4 and feats.shape[1] == m.num_features
        with contract_item(name, "global_pool"):
            m.reset_classifier(0, "")
            assert m(x).shape == feats.shape and feats.ndim == 4
        m.reset_classifier(5, "avg") if feats.ndim == 4 else m.reset_classifier(5)  # pooling back on
        assert m(x).shape == (2, 5) and m.num_classes == 5
        assert isinstance(m.get_classifier(), nn.Module)
        m0 = _create(name, num_classes=0).eval()
        assert m0(x).shape == (2, m0.head_hidden_size)
        with contract_item(name, "global_pool"):
            assert _create(name, num_classes=0, global_pool="").eval()(x).ndim == 4


@pytest.mark.parametrize("name", BACKBONES)
def test_device_dtype(name):
    """create_model(device=, dtype=) builds there; reset_classifier keeps device and dtype (meta: no memory)."""
    m = _create(name, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in m.parameters()} == {("meta", torch.bfloat16)}
    m.reset_classifier(0)
    m.reset_classifier(11)
    assert {(p.device.type, p.dtype) for p in m.parameters()} == {("meta", torch.bfloat16)}
    assert m.get_classifier().weight.shape[0] == 11
    d = _create(name).to(torch.float64)
    d.reset_classifier(3)
    assert {p.dtype for p in d.parameters()} == {torch.float64}


@pytest.mark.parametrize("name", DISTINCT)
def test_grad_checkpointing(name):
    m = _create(name).eval()
    x = _input(m, name)
    with torch.no_grad():
        ref = m(x)
    with contract_item(name, "grad_checkpointing"):
        m.set_grad_checkpointing(True)
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
        if m.feature_info:
            out, inter = m.forward_intermediates(x)
            torch.testing.assert_close(out, m.forward_features(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", DISTINCT)
def test_forward_intermediates(name):
    m = _create(name).eval()
    x = _input(m, name)
    with contract_item(name, "forward_intermediates"), torch.no_grad():
        n = len(m.feature_info)
        assert n >= 3
        out, inter = m.forward_intermediates(x)
        torch.testing.assert_close(out, m.forward_features(x))
        assert len(inter) == n
        for f, t in zip(m.feature_info, inter):
            assert t.shape[1] == f["num_chs"]
            assert all(t.shape[2 + k] <= math.ceil(x.shape[2 + k] / f["reduction"]) + 1 for k in range(2))
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in last2] == [t.shape for t in inter[-2:]]
        torch.testing.assert_close(last2[-1], inter[-1])
        first = m.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(first[0], inter[0])
        nhwc = m.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[-1].permute(0, 2, 3, 1))
        normed = m.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        assert normed[0].shape == inter[-1].shape
        with pytest.raises(ValueError, match="out of range"):
            m.forward_intermediates(x, indices=[n])
        # prune to level 1: same intermediates, less model
        pruned = _create(name).eval()
        take = pruned.prune_intermediate_layers([1])
        assert take == [1] and len(pruned.stage_modules()) == 2
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=[1], intermediates_only=True)[0], inter[1])
        assert pruned.forward_features(x).shape[1] == pruned.num_features


@pytest.mark.parametrize("feature_cls", ["list", "getter"])
@pytest.mark.parametrize("name", DISTINCT)
def test_features_only(name, feature_cls):
    ref = _create(name).eval()
    item = "forward_intermediates" if feature_cls == "getter" else "features_only"
    item = "features_only" if "features_only" in contract_exceptions(name) else item
    with contract_item(name, item), torch.no_grad():
        x = _input(ref, name)
        expected = ref.forward_intermediates(x, intermediates_only=True)
        m = _create(name, features_only=True, feature_cls=feature_cls).eval()
        assert m.feature_info.channels() == [f["num_chs"] for f in ref.feature_info]
        assert m.pretrained_cfg["classifier"] is None and m.default_cfg is m.pretrained_cfg
        outs = m(x)
        assert len(outs) == len(expected)
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a, b)
        sub = _create(name, features_only=True, feature_cls=feature_cls, out_indices=(1, 2)).eval()
        assert sub.feature_info.reduction() == [f["reduction"] for f in ref.feature_info[1:3]]
        assert [o.shape for o in sub(x)] == [o.shape for o in expected[1:3]]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", DISTINCT)
def test_features_only_other_wrappers(name):
    ref = _create(name).eval()
    with contract_item(name, "features_only"), torch.no_grad():
        x = _input(ref, name)
        expected = ref.forward_intermediates(x, intermediates_only=True)
        for feature_cls in ("dict", "hook", "fx"):
            m = _create(name, features_only=True, feature_cls=feature_cls).eval()
            outs = m(x)
            outs = list(outs.values()) if isinstance(outs, dict) else outs
            assert len(outs) == len(expected), feature_cls
            for a, b in zip(outs, expected):
                torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- TorchScript / FX


def _fx(model):
    """timm's tests/test_models.py ``_create_fx_model``: trace with timm's leaf modules, return the final node."""
    from timm.models import get_graph_node_names
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor

    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kw)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", DISTINCT)
def test_torchscript(name):
    m = _create(name, scriptable=True).eval()
    x = _input(m, name)
    with contract_item(name, "torchscript"), torch.no_grad():
        scripted = torch.jit.script(m)
        torch.testing.assert_close(scripted(x), m(x))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name", DISTINCT)
def test_fx_and_fx_torchscript(name):
    m = _create(name, num_classes=5).eval()
    x = _input(m, name)
    fx = None
    with torch.no_grad():
        ref = m(x)
        with contract_item(name, "fx"):
            fx = _fx(m)  # traces the eval and the training graph once (torchvision's DualGraphModule)
            assert torch.equal(list(fx(x).values())[0], ref)
            with contract_item(name, "fx_torchscript"):
                torch.testing.assert_close(list(torch.jit.script(fx)(x).values())[0], ref)
    # backward through the traced training graph: every parameter gets a gradient (timm's test_model_backward_fx)
    with contract_item(name, "fx"):
        fx = fx.train()  # switches to the graph traced in training mode (and the modules to training mode)
        y = list(fx(_input(m, name, batch=2)).values())[0]
        y.mean().backward()
        assert y.shape == (2, 5)
        assert all(p.grad is not None for p in fx.parameters())


def test_snn_fx_unrolls_the_timestep_attribute():
    """The traced SNN runs the model's own timestep count (constructor value / attribute), set before tracing."""
    m = _create("snn_vgg11", threshold=0.02).eval()  # a low threshold so that every timestep spikes
    x = _input(m, "snn_vgg11")
    with torch.no_grad():
        for t in (1, 3):
            m.set_timesteps(t)
            fx = _fx(m)
            torch.testing.assert_close(list(fx(x).values())[0], m(x))
            torch.testing.assert_close(list(fx(x).values())[0], m(x, timesteps=t))
        assert not torch.allclose(m(x, timesteps=1), m(x, timesteps=3))


# ---------------------------------------------------------------------------------------------- create_model


def test_create_model_timm_arguments(tmp_path):
    src = _create("nextvit_small")
    zoo.checkpoints.save_file(src.state_dict(), tmp_path / "w.safetensors")
    # pretrained_cfg_overlay=dict(file=...) loads "released" weights from a local file, adapting head and stem
    m = _create("nextvit_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")),
                num_classes=7, in_chans=1)
    assert m.num_classes == 7 and m.in_chans == 1 and m.pretrained_cfg["file"] == str(tmp_path / "w.safetensors")
    torch.testing.assert_close(m.stem[1].conv.weight, src.stem[1].conv.weight)
    m = _create("nextvit_small", pretrained_cfg_overlay=dict(mean=[0.5] * 3, crop_pct=1.0))
    assert m.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and m.pretrained_cfg.crop_pct == 1.0
    assert _create("nextvit_small", pretrained_cfg="bd_in1k_384").pretrained_cfg["input_size"] == (3, 384, 384)
    with pytest.raises(TypeError, match="unknown config keys"):
        _create("nextvit_small", pretrained_cfg_overlay=dict(no_such=1))
    with pytest.raises(ValueError, match="feature_cls"):
        _create("nextvit_small", features_only=True, feature_cls="nope")


def test_list_models_like_timm():
    assert zoo.list_models(["nextvit_s*", "fastvit_t8"]) == ["fastvit_t8", "nextvit_small"]
    assert zoo.list_models("nextvit_*", exclude_filters=["*_large", "*_base"]) == ["nextvit_small"]
    tagged = zoo.list_models("nextvit_small", pretrained=True)
    assert tagged and all(n.startswith("nextvit_small.") for n in tagged)
    assert zoo.list_models("nextvit_small.bd_in1k", include_tags=True) == ["nextvit_small.bd_in1k"]
    assert "mobiledet_cpu" not in zoo.list_models(pretrained=True)  # no released weights
    assert zoo.list_models(module="nextvit") == zoo.list_models("nextvit_*")
    assert zoo.list_models("fastvit_t*") == ["fastvit_t8", "fastvit_t12"]  # natural sort, as timm
