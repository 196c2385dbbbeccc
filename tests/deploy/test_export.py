"""Export to ONNX / TorchScript / torch.export with the parity check at a batch size other than the exported one."""
import onnx
import pytest
import torch
from torch import nn

import zoo
from zoo.deploy import ExportParityError, count_foldable_batchnorms, export, onnx_parity
from tests.conftest import randomize_batchnorms


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = dict(depths=(1, 1, 2, 1), ntb_period=2, stem_chs=(16, 16, 32), ncb_widths=(32, 64, 96, 128),
                ntb_widths=(None, 96, 128, 192), num_classes=10)
    return randomize_batchnorms(zoo.create_model("nextvit_small", **args)).eval()


def test_onnx_is_self_contained_reparameterized_and_dynamic(tiny, tmp_path):
    path = export(tiny, tmp_path / "m.onnx", input_size=(3, 64, 64))
    assert path.exists() and not list(tmp_path.glob("*.data"))  # one file under 2 GB
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) <= 1  # only the final norm is left
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    err = onnx_parity(path, tiny, torch.randn(5, 3, 64, 64))
    assert err < 1e-4


@pytest.mark.parametrize("fmt,suffix", [("torchscript", "pt"), ("torch_export", "pt2")])
def test_other_formats(tiny, tmp_path, fmt, suffix):
    path = export(tiny, tmp_path / f"m.{suffix}", fmt, input_size=(3, 64, 64))
    assert path.stat().st_size > 0


def test_export_does_not_modify_the_training_model(tiny, tmp_path):
    n = count_foldable_batchnorms(tiny)
    export(tiny, tmp_path / "m.onnx", input_size=(3, 64, 64), check=False)
    assert count_foldable_batchnorms(tiny) == n


class _Drifts(nn.Module):
    def forward(self, x):
        return x * 2


def test_parity_mismatch_is_an_error(tmp_path):
    path = export(_Drifts(), tmp_path / "d.onnx", example_input=torch.randn(2, 4), reparameterize=False)
    with pytest.raises(ExportParityError, match="differs from eager"):
        onnx_parity(path, nn.Identity(), torch.randn(3, 4))


def test_unknown_format(tiny, tmp_path):
    with pytest.raises(ValueError, match="onnx"):
        export(tiny, tmp_path / "m.x", "tflite", input_size=(3, 32, 32))


class _Noisy(nn.Module):
    """Exports fine, but the artifact can never match eager (fresh noise in every run)."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_failed_parity_check_leaves_no_file(tmp_path, fmt):
    path = tmp_path / f"noisy.{fmt}"
    with pytest.raises(ExportParityError):
        export(_Noisy(), path, fmt, example_input=torch.randn(2, 4), reparameterize=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_training_output_rebuilds_itself_from_its_metadata(tiny, tmp_path):
    """A deploy file as DeployExport writes it: architecture, head, data config and class names in the metadata."""
    import json

    from timm.data import resolve_data_config

    from zoo.checkpoints import save_file
    from zoo.deploy import load_trained_model, reparameterize
    from zoo.tools import export_main

    args = dict(depths=[1, 1, 2, 1], ntb_period=2, stem_chs=[16, 16, 32], ncb_widths=[32, 64, 96, 128],
                ntb_widths=[None, 96, 128, 192])
    deployed = reparameterize(tiny)
    data_cfg = {"input_size": [3, 64, 64], "mean": [0.3] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                "crop_pct": 1.0}
    meta = {"model_name": "nextvit_small", "model_args": json.dumps({**args, "in_chans": 3}), "num_classes": "10",
            "data_config": json.dumps(data_cfg), "input_size": "[3, 64, 64]",
            "class_names": json.dumps(list("abcdefghij")), "form": "deploy"}
    save_file(deployed.state_dict(), tmp_path / "deploy.safetensors", metadata=meta)
    m = load_trained_model(tmp_path / "deploy.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), deployed(x), atol=1e-5)
    assert m.class_names == list("abcdefghij")
    dc = resolve_data_config({}, model=m)
    assert dc["input_size"] == (3, 64, 64) and dc["interpolation"] == "bilinear" and tuple(dc["mean"]) == (0.3,) * 3
    # without zoo metadata the file needs --model, and says so
    save_file(deployed.state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="--model"):
        load_trained_model(tmp_path / "plain.safetensors")
    assert export_main([str(tmp_path / "plain.safetensors"), "-o", str(tmp_path / "p.onnx")]) == 2
    assert not (tmp_path / "p.onnx").exists()
