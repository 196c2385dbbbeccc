"""PP-MobileSeg: parameter counts, shapes, the Paddle SE gate, VIM (agreement, export), converters, ONNX."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.conftest import randomize_batchnorms
from zoo.checkpoints import UnsafeCheckpointError, load_file
from zoo.vision.pp_mobileseg import (PaddleHardSigmoid, paddle_linear_to_torch, pp_mobileseg_base, pp_mobileseg_tiny,
                                     vim_upsample)

SMALL = dict(depths=[1, 1])  # one SEA block per stage: every block type, a third of the nodes


def _count(fn, **kw):
    with torch.device("meta"):
        m = fn(**kw)
    return sum(p.numel() for p in m.parameters()), m


def test_parameter_counts_match_the_reference_code():
    # counted from PaddleSeg release/2.8 strideformer.py + pp_mobileseg.py (the README's 5.62M / 1.61M differ:
    # MODEL_CARD.md explains why)
    n, m = _count(pp_mobileseg_base)
    assert n == 5_943_878
    assert sum(p.numel() for k, p in m.named_parameters() if ".smb" in k) == 1_625_136
    assert sum(b.numel() for k, b in m.named_buffers() if "num_batches" not in k) + n == 5_996_422
    n, m = _count(pp_mobileseg_tiny)
    assert n == 1_492_298
    assert sum(p.numel() for k, p in m.named_parameters() if k.startswith("backbone.")) == 1_452_980
    assert zoo.create_model("pp_mobileseg_base.cityscapes", pretrained=False).num_classes == 19
    assert zoo.model_info("pp_mobileseg_tiny")["task"] == "semantic-segmentation"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_batchnorms(pp_mobileseg_tiny(**SMALL)).eval()


def test_shapes_resolution_and_upsample_modes(tiny):
    torch.manual_seed(0)
    base = randomize_batchnorms(pp_mobileseg_base(**SMALL)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert base.forward_features(x).shape == (2, 256, 8, 12)  # AAMSx8: 1/8
        assert tiny.forward_features(x).shape == (2, 256, 4, 6)  # AAM: 1/16
        assert tiny(x).shape == (2, 150, 64, 96) and tiny(x).dtype == torch.float32  # default: bilinear logits
        feats, inter = tiny.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [24, 32, 64, 128] and [t.shape[-1] for t in inter] == [24, 12, 6, 3]
    vim = pp_mobileseg_tiny(**SMALL, upsample="vim")
    vim.load_state_dict(tiny.state_dict())
    vim.eval()
    with torch.no_grad():
        labels = vim(x)
        assert labels.shape == (2, 64, 96) and labels.dtype == torch.int32
        assert torch.equal(labels, vim_upsample(vim.forward_head(vim.forward_features(x)), [64, 96]))
    assert vim.train()(x).shape == (2, 150, 64, 96)  # training: logits, as the reference
    few = pp_mobileseg_tiny(**SMALL, upsample="vim", num_classes=19).eval()  # < 30 classes: the reference interpolates
    assert few(x).shape == (2, 19, 64, 96)
    with pytest.raises(ValueError, match="upsample"):
        pp_mobileseg_tiny(upsample="nearest")


def test_se_gate_is_paddles_hardsigmoid(tiny):
    gate = PaddleHardSigmoid()
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5, 3.0])
    assert torch.allclose(gate(x), torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0, 1.0]))
    assert not torch.allclose(gate(x), F.hardsigmoid(x))  # torch's slope is 1/6
    se = [m for m in tiny.modules() if type(m).__name__ == "SqueezeExcite"]
    assert len(se) == 7 and all(isinstance(m.gate, PaddleHardSigmoid) for m in se)


def _reference_vim(logits, size):
    """The reference algorithm literally: unique labels, gather, interpolate, argmax, map back in a loop."""
    labelset = torch.unique(torch.argmax(logits, 1))
    x = F.interpolate(logits.index_select(1, labelset), size, mode="bilinear", align_corners=False)
    pred = torch.argmax(x, 1)
    out = torch.zeros(pred.shape, dtype=torch.int32)
    for i in range(len(labelset)):
        out[pred == i] = labelset[i].to(torch.int32)
    return out


def test_vim_equals_reference_and_full_upsampling_where_guaranteed():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # any logits: identical to the reference's VIM
        logits = torch.randn(2, 150, 8, 8, generator=g) * 3
        assert torch.equal(vim_upsample(logits, [64, 64]), _reference_vim(logits, [64, 64]))
    # Guarantee: every class absent from the low-res argmax is below one present class at every low-res pixel, so
    # after bilinear interpolation (a convex combination) it cannot win: VIM == argmax over all upsampled logits.
    present = torch.tensor([3, 17, 42, 99, 140])
    low = torch.randn(2, len(present), 16, 16, generator=g) * 4
    logits = low[:, :1].repeat(1, 150, 1, 1) - 1.0 - torch.rand(2, 150, 16, 16, generator=g)
    logits[:, present] = low
    full = F.interpolate(logits, [128, 128], mode="bilinear", align_corners=False).argmax(1).to(torch.int32)
    assert torch.equal(vim_upsample(logits, [128, 128]), full)
    # random smooth logits without the guarantee still agree on almost every pixel
    logits = F.interpolate(torch.randn(1, 150, 4, 4, generator=g), [16, 16], mode="bilinear") * 5
    full = F.interpolate(logits, [128, 128], mode="bilinear", align_corners=False).argmax(1).to(torch.int32)
    assert (vim_upsample(logits, [128, 128]) == full).float().mean() > 0.95


# ------------------------------------------------------------------------------------------- converters


def _to_paddle_key(k: str) -> str:
    """Our key -> PaddleSeg's, from the reference module structure: Conv2DBN / ConvBNLayer name their conv ``c``
    (ConvBNAct in AAM and the head: ``conv``), BN ``bn`` with ``_mean`` / ``_variance``, SE ``conv1`` / ``conv2``,
    the stride conv is ``Sequential(conv, BN)``, the projections ``Sequential(act, Conv2DBN)``."""
    p = k.split(".")
    out = []
    for i, s in enumerate(p):
        if s == "norm":
            s = "bn"
        elif s == "running_mean":
            s = "_mean"
        elif s == "running_var":
            s = "_variance"
        elif s in ("conv_reduce", "conv_expand"):
            s = "conv1" if s == "conv_reduce" else "conv2"
        elif s == "conv" and i > 0 and p[i - 1] == "stride_conv":
            s = "0"
        elif s == "bn" and i > 0 and p[i - 1] == "stride_conv":
            s = "1"
        elif s == "conv" and not (k.startswith("backbone.inj_module") or k.startswith("decode_head")) \
                and i + 1 < len(p) and p[i + 1] in ("weight", "bias") and p[i - 1] != "mlp":
            s = "c"
        out.append(s)
        if s in ("proj", "proj_encode_row", "proj_encode_column"):
            out.append("1")
    key = ".".join(out)
    return key.replace("stride_conv.bn.", "stride_conv.1.")


def _to_mmseg_key(k: str) -> str:
    k = k.replace(".norm.", ".bn.").replace("mid_se.conv_reduce.", "mid_se.conv_act1.conv.")
    k = k.replace("mid_se.conv_expand.", "mid_se.conv_act2.conv.")
    return k.replace("mlp.dwconv.", "mlp.dwconv.conv.")


def test_paddle_pdparams_and_mmseg_pth_load(tmp_path, tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tiny(x)
    sd = tiny.state_dict()
    paddle = {_to_paddle_key(k): v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert "backbone.smb2.blocks.0.mid_se.conv1.weight" in paddle and "backbone.smb1.conv.c.weight" in paddle
    assert "backbone.trans1.transformer_blocks.0.attn.proj.1.c.weight" in paddle
    assert "backbone.trans1.transformer_blocks.0.attn.stride_conv.1._variance" in paddle
    paddle["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(paddle)}
    pd_file = tmp_path / "model.pdparams"
    with open(pd_file, "wb") as f:
        pickle.dump(paddle, f, protocol=4)
    mm = {"meta": {"CLASSES": ["a"]}, "state_dict": {_to_mmseg_key(k): v.clone() for k, v in sd.items()}}
    assert "backbone.smb2.blocks.0.mid_se.conv_act1.conv.weight" in mm["state_dict"]
    mm_file = tmp_path / "mmseg.pth"
    torch.save(mm, mm_file)
    for path in (pd_file, mm_file):
        m = zoo.create_model("pp_mobileseg_tiny", checkpoint_path=path, **SMALL).eval()
        with torch.no_grad():
            assert torch.equal(m(x), ref), path
    # a backbone-only file (PaddleSeg's pretrain releases): backbone loaded, head keeps its initialization
    bb = {k[len("backbone."):]: v for k, v in paddle.items() if k.startswith("backbone.")}
    with open(tmp_path / "pretrain.pdparams", "wb") as f:
        pickle.dump(bb, f, protocol=2)
    m = zoo.create_model("pp_mobileseg_tiny", checkpoint_path=tmp_path / "pretrain.pdparams", **SMALL).eval()
    assert torch.equal(m.backbone.smb3.blocks[0].expand_conv.conv.weight, tiny.backbone.smb3.blocks[0].expand_conv.conv.weight)
    assert not torch.equal(m.decode_head.conv_seg.weight, tiny.decode_head.conv_seg.weight)


def test_paddle_files_execute_nothing_and_linear_weights_are_transposed(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pdparams"
    with open(bad, "wb") as f:
        pickle.dump({"w": np.zeros(2, np.float32), "x": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_file(bad)
    assert not marker.exists()
    # Paddle's Linear stores (in, out); the converter transposes weights of the model's nn.Linear layers only
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Conv2d(5, 5, 1))
    w = np.arange(15, dtype=np.float32).reshape(3, 5)
    with open(tmp_path / "lin.pdparams", "wb") as f:
        pickle.dump({"0.weight": w, "0.bias": np.zeros(5, np.float32),
                     "1.weight": np.ones((5, 5, 1, 1), np.float32), "1.bias": np.zeros(5, np.float32)}, f, protocol=4)
    sd = paddle_linear_to_torch(load_file(tmp_path / "lin.pdparams"), model)
    model.load_state_dict(sd)
    assert torch.equal(model[0].weight, torch.from_numpy(w.T))


# ------------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("name,upsample", [("pp_mobileseg_base", "vim"), ("pp_mobileseg_tiny", "bilinear")])
def test_onnx_export_parity_at_another_batch_size(tmp_path, name, upsample):
    """Exported at batch 2 by zoo.deploy.export, which checks onnxruntime against eager at batch 3 (label maps
    exactly for VIM, logits for bilinear). MODEL_CARD.md records the full-size exports of all four combinations."""
    from zoo.deploy import export

    torch.manual_seed(0)
    model = randomize_batchnorms(zoo.create_model(name, upsample=upsample, **SMALL)).eval()
    path = export(model, tmp_path / "m.onnx", example_input=torch.randn(2, 3, 64, 64), rtol=1e-3, atol=1e-4)
    assert path.is_file() and not list(tmp_path.glob(".*part"))


class _Vim(torch.nn.Module):
    def forward(self, logits):
        return vim_upsample(logits, [32, 48])


def test_vim_onnx_graph_has_a_dynamic_class_set(tmp_path):
    """One exported VIM graph gives eager's labels for logits whose predicted class sets differ in size (1 to 40
    classes of 150): the class count is a runtime value, not frozen at export."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, 150, 8, 12, generator=g)
    torch.onnx.export(_Vim(), (example,), str(tmp_path / "vim.onnx"), dynamo=True, input_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
    sess = ort.InferenceSession(str(tmp_path / "vim.onnx"), providers=["CPUExecutionProvider"])
    seen = set()
    for k, batch in ((1, 1), (5, 3), (40, 2)):
        logits = torch.randn(batch, 150, 8, 12, generator=g)
        classes = torch.randperm(150, generator=g)[:k]
        logits[:, classes] += 30 + 20 * torch.rand(batch, k, 8, 12, generator=g)
        got = sess.run(None, {"logits": logits.numpy()})[0]
        ref = _Vim()(logits)
        assert got.dtype == np.int32 and np.array_equal(got, ref.numpy())
        seen.add(len(np.unique(got)))
    assert len(seen) == 3


def test_zoo_bench_covers_segmentation_models():
    """`zoo bench` defaults to the config's 512x512 for these models; here a small override keeps it cheap."""
    from zoo import bench

    assert bench.default_input_size("pp_mobileseg_base") == (3, 512, 512)
    rows = bench.bench_models(["pp_mobileseg_tiny"], runtimes=("eager", "deploy"), image_size=64, iters=1, warmup=0,
                              overrides={"depths": [1, 1]}, progress=False, skip_errors=False)
    assert [r["runtime"] for r in rows] == ["eager", "deploy"] and all(r["median_ms"] > 0 for r in rows)
    assert rows[1]["params_m"] < rows[0]["params_m"]  # BN folded in the deploy form


def test_timm_contract_torchscript_fx_features(tiny):
    """What the shared contract asks of a backbone, for this segmentation family (tests/test_contract.py runs
    classification / feature-extraction tasks only): TorchScript, FX, features_only, reset_classifier, data config."""
    import timm.data

    x = torch.randn(2, 3, 64, 64)
    vim = zoo.create_model("pp_mobileseg_tiny", upsample="vim", **SMALL)
    vim.load_state_dict(tiny.state_dict())
    vim.eval()
    with torch.no_grad():
        assert torch.equal(torch.jit.script(vim)(x), vim(x))
        assert torch.allclose(torch.fx.symbolic_trace(tiny)(x), tiny(x), atol=1e-6)
    feats = zoo.create_model("pp_mobileseg_base", features_only=True, out_indices=(1, 3), **SMALL).eval()
    assert feats.feature_info.channels() == [64, 192] and feats.feature_info.reduction() == [8, 32]
    assert [t.shape[1] for t in feats(x)] == [64, 192]
    m = zoo.create_model("pp_mobileseg_tiny", **SMALL).eval()
    m.reset_classifier(0, "")
    assert m(x).shape == (2, 256, 64, 64)  # pre-logits map, upsampled like the logits
    assert timm.data.resolve_model_data_config(m)["input_size"] == (3, 512, 512)
