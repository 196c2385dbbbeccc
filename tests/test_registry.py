"""The registry and create_model follow timm's contract."""
import logging

import pytest
import torch

import zoo
from zoo.registry import UnknownModelError, resolve_cfg


def test_list_models_and_filters():
    names = zoo.list_models()
    assert {"nextvit_small", "nextvit_base", "nextvit_large"} <= set(names)
    assert zoo.list_models("nextvit_*") == ["nextvit_base", "nextvit_large", "nextvit_small"]
    assert "nextvit_small" in zoo.list_models(task="image-classification")
    assert "nextvit_small" not in zoo.list_models(task="text-generation")
    tags = zoo.list_models("nextvit_small*", pretrained=True)
    assert "nextvit_small.bd_in1k" in tags and "nextvit_small.bd_ssld_6m_in1k_384" in tags


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownModelError) as e:
        zoo.create_model("nextvit_smal")
    assert "nextvit_small" in str(e.value)
    with pytest.raises(UnknownModelError, match="available tags"):
        zoo.create_model("nextvit_small.no_such_tag")


def test_model_info():
    info = zoo.model_info("nextvit_small")
    assert info["family"] == "nextvit" and info["task"] == "image-classification" and info["paper"] == "2207.05501"
    assert info["params"] == 31_763_368
    assert info["default_tag"] == "bd_in1k"
    assert info["default_cfg"]["crop_pct"] == 0.95 and info["default_cfg"]["first_conv"] == "stem.0.conv"
    assert info["tags"]["bd_in1k_384"]["input_size"] == (3, 384, 384)
    assert info["tags"]["bd_in1k"]["metrics"]["top1"] == 82.5


def test_tag_selects_config():
    _, tag, cfg = resolve_cfg("nextvit_base.bd_in1k_384")
    assert tag == "bd_in1k_384" and cfg.input_size == (3, 384, 384) and cfg.pool_size == (12, 12)
    m = zoo.create_model("nextvit_base.bd_in1k_384", depths=(1, 1, 5, 1))
    assert m.pretrained_cfg.input_size == (3, 384, 384) and m.model_name == "nextvit_base"


def test_none_kwargs_do_not_override(tiny_nextvit_args):
    m = zoo.create_model("nextvit_small", num_classes=None, in_chans=None, drop_path_rate=None, **tiny_nextvit_args)
    assert m.num_classes == 1000 and m.stem[0].conv.in_channels == 3


def test_overrides_make_small_variants(tiny_nextvit_args):
    m = zoo.create_model("nextvit_small", num_classes=3, in_chans=1, **tiny_nextvit_args)
    assert sum(p.numel() for p in m.parameters()) < 1_500_000
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="dephts"):
        zoo.create_model("nextvit_small", dephts=(1, 1, 1, 1))


def test_num_classes_change_reinitializes_head_and_logs(tmp_path, caplog, tiny_nextvit_args):
    src = zoo.create_model("nextvit_small", **tiny_nextvit_args)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.WARNING):
        m = zoo.create_model("nextvit_small", num_classes=5, checkpoint_path=tmp_path / "w.pth", **tiny_nextvit_args)
    assert m.get_classifier().out_features == 5
    assert "re-initialized" in caplog.text and "head.fc" in caplog.text
    assert torch.equal(m.stem[0].conv.weight, src.stem[0].conv.weight)


def test_in_chans_adapts_first_conv(tmp_path, tiny_nextvit_args):
    src = zoo.create_model("nextvit_small", **tiny_nextvit_args)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = zoo.create_model("nextvit_small", in_chans=1, checkpoint_path=tmp_path / "w.pth", **tiny_nextvit_args)
    w3 = src.stem[0].conv.weight
    assert torch.allclose(m.stem[0].conv.weight[:, 0], w3.sum(1), atol=1e-6)  # timm's adapt_input_conv rule


def test_model_index_in_sync():
    """zoo/model_index.json (what `zoo list` / `zoo info` read without importing model code) matches the families."""
    from zoo.registry import INDEX_PATH, _index, build_index

    _index.cache_clear()
    stored = _index()
    # parameters are counted for the first model of each family (counting all, even on meta, takes a minute);
    # every other field of every model is compared
    first = {}
    for n, rec in sorted(stored["models"].items()):
        first.setdefault(rec["module"], n)
    built = build_index(count_params=first.values())
    assert set(stored["modules"]) == set(built["modules"]), "run `python -m zoo.registry` to regenerate the index"
    for n, rec in built["models"].items():
        if rec["params"] == -1 and n in stored["models"]:
            rec["params"] = stored["models"][n]["params"]
    stale = sorted(n for n in set(built["models"]) | set(stored["models"])
                   if built["models"].get(n) != stored["models"].get(n))
    assert not stale, f"{INDEX_PATH.name} is stale for {stale[:8]}: run `python -m zoo.registry` to regenerate it"


def test_listing_imports_no_model_code():
    """`zoo list` / `zoo info` / `import zoo` stay light: no torch, timm, Lightning, wandb or transformers."""
    import subprocess
    import sys

    code = ("import sys, zoo, zoo.data; from zoo.tools import list_main, info_main; "
            "list_main(['nextvit_*']); info_main(['nextvit_small']); "
            "bad = [m for m in ('torch', 'timm', 'lightning', 'wandb', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "nextvit_small" in r.stdout
