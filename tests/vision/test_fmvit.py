"""FMViT reconstruction: sizes against the reported targets, exact deploy fold, ONNX parity, timm API, bad configs."""
import pytest
import torch

import zoo
import zoo.registry
from tests.conftest import randomize_batchnorms
from zoo.bench import count_gmacs, count_params
from zoo.deploy import count_foldable_batchnorms, export, onnx_parity, reparameterize
from zoo.vision.fmvit import TARGETS, FMViTConfig, KVReduce, RepMultiGroupConv1x1
from zoo.vision.fastvit import MobileOneBlock

NAMES = sorted(TARGETS)
# Reduced depth with every block kind: MobileOne stem, CFB (stride 2 and channel-change), FMB (stride 2 with K/V
# reduction sr 4 / 2, stride 1 with a channel change, sr 1 without reduction), gMLP, head.
SMALL = dict(layouts=("C", "F", "CFC", "F"))


@pytest.mark.parametrize("name", NAMES)
def test_params_and_gmacs_within_5pct_of_reported(name):
    """Deploy form (what the paper's params / FLOPs describe for a reparameterized model), 224 px, on meta."""
    params_m, gflops, _ = TARGETS[name]
    with torch.device("meta"):
        d = zoo.create_model(name, deploy=True)
        t = zoo.create_model(name)
        folded = reparameterize(t, inplace=True)
    x = torch.empty(1, 3, 224, 224, device="meta")
    p, g = count_params(d) / 1e6, count_gmacs(d, x)
    assert abs(p / params_m - 1) <= 0.05, f"{name}: {p:.3f} M params vs reported {params_m} M"
    assert abs(g / gflops - 1) <= 0.05, f"{name}: {g:.3f} GMACs vs reported {gflops} G"
    # the figures `zoo info` prints (the config notes) are these measurements
    from zoo.vision.fmvit import MEASURED

    assert MEASURED[name] == (round(p, 2), round(g, 2))
    assert f"{p:.2f} M params, {g:.2f} GMACs measured" in zoo.registry.resolve_cfg(name)[2].notes
    # building the deploy form directly and folding the training form give the same tensors
    assert {k: v.shape for k, v in d.state_dict().items()} == {k: v.shape for k, v in folded.state_dict().items()}


def _assert_plain_deploy_graph(d: torch.nn.Module) -> None:
    assert count_foldable_batchnorms(d) == 0
    for m in d.modules():
        if isinstance(m, MobileOneBlock):
            assert m.deployed and all(getattr(m, b, None) is None for b in ("conv_kxk", "conv_scale", "identity"))
        if isinstance(m, RepMultiGroupConv1x1):
            assert m.deployed and len(m.branches) == 0 and m.conv.groups == 1
        if isinstance(m, KVReduce):
            assert m.deployed and isinstance(m.pool, torch.nn.Identity) and m.conv.groups == m.dim


def _folded(name):
    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model(name, num_classes=10, **SMALL), seed=NAMES.index(name)).eval()
    assert count_foldable_batchnorms(m) > 20
    return m, reparameterize(m)


@pytest.mark.parametrize("name", NAMES)
def test_deploy_fold_is_exact(name):
    m, d = _folded(name)
    _assert_plain_deploy_graph(d)
    x = torch.randn(2, 3, 64, 48)  # batch > 1, non-square; every stage's K/V reduction sees >= 1 token
    with torch.no_grad():
        for fn in (lambda n, t: n(t), lambda n, t: n.forward_head(n.forward_features(t), pre_logits=True)):
            a, b = fn(m, x), fn(d, x)
            assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    assert count_foldable_batchnorms(m) > 20  # the training form is untouched


# The deploy forms of all sizes export the same ops (plain convs, K/V reduction, attention, gMLP, head); they differ
# in widths and in the stem (two convs: tiny / small; four: medium / base / large). One size per stem kind is
# exported (an ONNX export with its parity runs takes seconds).
@pytest.mark.parametrize("name", ["fmvit_tiny", "fmvit_medium"])
def test_deploy_form_onnx_matches(name, tmp_path):
    _, d = _folded(name)
    x = torch.randn(2, 3, 64, 48)
    # parity at another batch size is checked inside export; re-checked here explicitly
    path = export(d, tmp_path / f"{name}.onnx", example_input=x[:1], reparameterize=False)
    assert onnx_parity(path, d, x) < 1e-4


def test_deploy_form_builds_directly_and_loads_both_checkpoint_forms(tmp_path):
    from zoo.checkpoints import save_file

    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model("fmvit_tiny", num_classes=10, **SMALL)).eval()
    d = reparameterize(m)
    save_file(d.state_dict(), tmp_path / "deploy.safetensors")
    save_file(m.state_dict(), tmp_path / "train.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        for f in ("deploy.safetensors", "train.safetensors"):
            dm = zoo.create_model("fmvit_tiny", deploy=True, checkpoint_path=tmp_path / f, **SMALL).eval()
            assert count_foldable_batchnorms(dm) == 0
            assert torch.allclose(dm(x), ref, atol=1e-5), f
        auto = zoo.create_model("fmvit_tiny", checkpoint_path=tmp_path / "deploy.safetensors", **SMALL).eval()
        assert auto.deploy and torch.allclose(auto(x), ref, atol=1e-5)


def test_head_stays_exact_in_deploy_form_after_reset_and_pool_change():
    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model("fmvit_tiny", num_classes=10, **SMALL)).eval()
    d = reparameterize(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for model in (m, d):
            model.reset_classifier(0)
        assert torch.allclose(m(x), d(x), atol=1e-5)  # normalized pooled features, no BN in d
        for model in (m, d):
            model.reset_classifier(0, "max")  # max pooling does not commute with a negative BN scale
        assert torch.allclose(m(x), d(x), atol=1e-5)
        torch.manual_seed(1)
        m.reset_classifier(5, "avg")
        torch.manual_seed(1)
        d.reset_classifier(5, "avg")  # the same fresh classifier on the same normalized features
        assert torch.allclose(m(x), d(x), atol=1e-5)
    assert count_foldable_batchnorms(d) == 0


def test_timm_model_api_and_features():
    m = zoo.create_model("fmvit_tiny", num_classes=7, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, m.num_features, 2, 2) and m.num_features == 352
        assert m.forward_head(feats, pre_logits=True).shape == (2, m.head_hidden_size)
        assert m.get_classifier().out_features == 7
        final, inter = m.forward_intermediates(x)
        assert torch.allclose(final, feats) and [t.shape[1] for t in inter] == [32, 96, 128, 352]
        m.set_grad_checkpointing(True)
        ref = m(x)
    assert ref.shape == (2, 7)
    f = zoo.create_model("fmvit_small", features_only=True).eval()
    assert f.feature_info.channels() == [32, 128, 256, 512] and f.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = f(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_backward_reaches_every_parameter():
    m = zoo.create_model("fmvit_medium", num_classes=3, **SMALL).train()
    m(torch.randn(2, 3, 64, 64)).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("override, stage, value", [
    (dict(cfb_widths=(32, 64, 100, 256)), 2, "CFB width = 100"),
    (dict(fmb_widths=(None, 96, 160, 360)), 3, "FMB conv width"),  # 360 -> attention 256 + conv 104
    (dict(cfb_mlp_ratio=2.1), 0, "CFB gMLP hidden width = 67"),
    (dict(mlp_groups=(1, 2, 3)), 0, "CFB width = 32 is not a positive multiple of 3"),
    (dict(layouts=("F", "F", "F", "F")), 0, "fmb_widths[0] is None"),
])
def test_widths_not_dividing_into_heads_or_groups_name_stage_and_value(override, stage, value):
    with pytest.raises(ValueError) as e:
        zoo.create_model("fmvit_tiny", **override)
    assert f"stage {stage}" in str(e.value) and value in str(e.value), str(e.value)


def test_config_records_every_choice():
    m = zoo.create_model("fmvit_large", layouts=["C", "F", "CF", "F"])  # lists from YAML become tuples
    assert isinstance(m.arch, FMViTConfig) and m.arch.layouts == ("C", "F", "CF", "F")
    assert m.arch.stem_strides == (2, 1, 1, 2) and m.arch.attn_width(3) == 768
    with pytest.raises(TypeError, match="no_such_choice"):
        zoo.create_model("fmvit_tiny", no_such_choice=1)


def test_pareto_plot_marks_reported_accuracy(tmp_path):
    from zoo import bench

    assert bench.reported_only("fmvit_large") and not bench.reported_only("nextvit_small")
    assert not bench.reported_only("not_a_registered_model")
    rows = [dict(model=m, runtime="onnxruntime", median_ms=ms, top1=bench.published_top1(m), batch_size=1, threads=2)
            for m, ms in (("fmvit_large", 60.0), ("fmvit_tiny", 5.0), ("nextvit_small", 70.0))]
    assert [r["top1"] for r in rows] == [83.3, 72.9, 82.5]
    assert bench.plot_pareto(rows, tmp_path / "p.png").stat().st_size > 0
