"""int8 post-training quantization (zoo.deploy.quantize, zoo export --int8) on tiny models and the embedded digits."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from zoo.deploy import QuantizationError, quantize
from zoo.deploy.quantize import FAMILY_RULES, calibration_batches, ort_session


class TinyNet(nn.Module):
    """conv-BN-ReLU x2, pool, linear; ``attn`` adds a softmax mixing of the pooled tokens (a softmax to keep fp32)."""

    def __init__(self, in_chans=1, attn=False):
        super().__init__()
        self.attn = attn
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.qk = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.body(x)
        if self.attn:
            t = x.flatten(2).transpose(1, 2)  # (B, N, C)
            a = torch.softmax(self.qk(t) @ t.transpose(1, 2) / 32**0.5, -1)
            x = (a @ t).mean(1)
        else:
            x = x.mean((2, 3))
        return self.head(x)


class TinyDetector(nn.Module):
    """A conv 'head' followed by a decoding tail (exp, scaling, top-k) that must stay fp32."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.cls(torch.relu(self.conv(x))).flatten(1)
        return torch.topk(s.sigmoid() * 2.0 + 1.0, 5, dim=1).values


class NoWeights(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x).mean((2, 3))


@pytest.fixture(scope="module")
def digits():
    from zoo.data import DigitsDataModule

    dm = DigitsDataModule(image_size=8, in_chans=1, batch_size=32)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def trained(digits):
    """TinyNet trained for a few hundred steps on 8x8 digits (~1 s): clear margins, so agreement is meaningful."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = digits._splits["train"].tensors
    for step in range(150):
        i = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def quantized(trained, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    res = quantize(trained, digits, out / "tiny.int8.onnx", num_batches=4, input_size=(1, 8, 8),
                   fp32_path=out / "tiny.fp32.onnx")
    return res


def test_int8_agrees_with_fp32_on_the_test_split(quantized):
    rep = quantized.report
    assert rep["images"] == 359  # the digits test split, not the calibration batches
    assert rep["calibration_images"] == 128 and rep["calibration_batches"] == 4
    assert rep["top1_agreement"] >= 0.97
    assert rep["fp32_top1"] > 0.8
    assert abs(rep["fp32_top1"] - rep["int8_top1"]) <= 0.02
    assert 0 < rep["max_logit_err"] < 0.1 * rep["outputs"][0]["fp32_scale"]


def test_int8_file_is_qdq_per_channel_and_runs_at_any_batch(quantized):
    graph = onnx.load(str(quantized.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: t for t in graph.initializer}
    # per-channel weights: a Conv's weight DequantizeLinear carries one scale per output channel
    conv_w = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert conv_w and all(list(inits[n.input[1]].dims) == [inits[n.input[0]].dims[0]] for n in conv_w)
    assert quantized.path.stat().st_size < quantized.fp32_path.stat().st_size
    sess = ort_session(quantized.path)
    for b in (1, 3):
        (out,) = sess.run(None, {sess.get_inputs()[0].name: np.random.rand(b, 1, 8, 8).astype(np.float32)})
        assert out.shape == (b, 10)
    assert not list(quantized.path.parent.glob(".*"))  # no temporary files left


def test_calibration_is_deterministic_and_fixed_size(digits):
    a = calibration_batches(digits, 3)
    b = calibration_batches(digits, 3)
    assert len(a) == 3 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(set(torch.cat([x for x in a]).sum((1, 2, 3)).tolist())) > 50  # shuffled, not one class


def test_entropy_method_and_tail_and_softmax_kept_fp32(digits, tmp_path):
    """A family rule keeps the attention softmax fp32; the tail after the last weighted layer stays fp32."""
    torch.manual_seed(0)
    res = quantize(TinyNet(attn=True).eval(), digits, tmp_path / "a.onnx", method="entropy", num_batches=2,
                   input_size=(1, 8, 8), family="nextvit")
    graph = onnx.load(str(res.path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    (sm,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert producer[sm.input[0]] != "DequantizeLinear" and res.report["family"] == "nextvit"
    assert "Softmax" in res.report["fp32_op_types"]

    det = quantize(TinyDetector().eval(), torch.randn(32, 1, 8, 8), tmp_path / "d.onnx", num_batches=4,
                   min_samples=16, test_data=torch.randn(8, 1, 8, 8))
    g = onnx.load(str(det.path)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    tail = [n for n in g.node if n.op_type in ("TopK", "Sigmoid")]
    assert tail and all(producer.get(n.input[0]) != "DequantizeLinear" for n in tail)
    assert det.report["fp32_tail_nodes"] >= 3 and det.report["max_logit_err"] < 0.05


def test_moving_average_calibration_takes_the_mean_of_the_batch_ranges(trained, tmp_path):
    """method="moving_average" (the deploy calibration of a QAT model): each range is the mean over the calibration
    batches of the batch's min / max (what the QAT observers converge to); "minmax" takes the extremes."""
    from onnx import numpy_helper

    torch.manual_seed(0)
    calib = torch.cat([torch.randn(8, 1, 8, 8), 3 * torch.randn(8, 1, 8, 8)])  # two batches of 8, ranges apart
    lo, hi = calib.view(2, -1).min(1).values, calib.view(2, -1).max(1).values
    for method, (rmin, rmax) in (("moving_average", (lo.mean(), hi.mean())), ("minmax", (lo.min(), hi.max()))):
        res = quantize(trained, calib, tmp_path / f"{method}.onnx", method=method, num_batches=2,
                       input_size=(1, 8, 8), test_data=None)
        graph = onnx.load(str(res.path)).graph
        init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        (q,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == graph.input[0].name]
        assert float(init[q.input[1]]) == pytest.approx(float(rmax - rmin) / 255, rel=1e-5), method


def test_family_rules_are_declared_once():
    import zoo.vision.nextvit as nv

    assert FAMILY_RULES["nextvit"].fp32_op_types == ("Softmax",)
    from zoo.deploy.quantize import rule_for

    assert rule_for(nv.NextViT.__new__(nv.NextViT))[0] == "nextvit"
    assert rule_for(TinyNet())[0] == "default"  # a family without an entry gets the default rule


def test_bad_input_gives_clear_errors_and_no_file(trained, digits, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(QuantizationError, match=r"calibration batch 0 has shape \(32, 1, 8, 8\).*\(N, 3, 32, 32\)"):
        quantize(trained, digits, out, num_batches=2, input_size=(3, 32, 32))
    with pytest.raises(QuantizationError, match="too few calibration samples.*1 batch"):
        quantize(trained, torch.randn(5, 1, 8, 8), out, num_batches=2, input_size=(1, 8, 8))
    with pytest.raises(QuantizationError, match="no op the int8 quantizer handles"):
        quantize(NoWeights(), torch.randn(32, 1, 8, 8), out, num_batches=2, test_data=None)
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize(trained, digits, out, method="kl")
    with pytest.raises(ValueError, match="unknown quant_format 'qint'"):
        quantize(trained, digits, out, quant_format="qint")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary folder left


def test_cli_export_int8(tmp_path, capsys):
    from zoo.cli import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((16, 1, 16, 16)).astype(np.float32))
    np.save(tmp_path / "wrong.npy", rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    args = ["export", "snn_vgg16", "--override", "cfg=(8, 'A', 16, 'A')", "--override", "fc_dims=(32,)",
            "--override", "img_size=16", "--override", "timesteps=1", "--in-chans", "1", "--num-classes", "10",
            "--input-size", "1", "16", "16"]
    out = tmp_path / "snn.int8.onnx"
    assert main([*args, "-o", str(out), "--int8", "--calibrate", str(tmp_path / "wrong.npy"), "--calib-batches", "2"]) == 1
    assert "calibration batch 0 has shape (8, 3, 16, 16)" in capsys.readouterr().err and not out.exists()
    assert main([*args, "-o", str(out), "--int8"]) == 2
    assert "--int8 needs calibration data" in capsys.readouterr().err
    rc = main([*args, "-o", str(out), "--int8", "--calibrate", str(tmp_path / "calib.npy"), "--calib-batches", "2",
               "--calib-method", "percentile", "--report", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    msg = capsys.readouterr().out
    assert "int8 ONNX" in msg and "top-1 agreement" in msg and out.exists()
    assert '"method": "percentile"' in (tmp_path / "r.json").read_text()
    from zoo.deploy.quantize import METHODS

    out.unlink()  # every method of zoo.deploy.quantize is offered by the CLI (moving_average: QAT's ranges)
    rc = main([*args, "-o", str(out), "--int8", "--calibrate", str(tmp_path / "calib.npy"), "--calib-batches", "2",
               "--calib-method", METHODS[-1], "--report", str(tmp_path / "r.json")])
    assert rc == 0 and out.exists() and f'"method": "{METHODS[-1]}"' in (tmp_path / "r.json").read_text()


def test_bench_int8_runtime(trained):
    from zoo.bench import RUNTIMES, measure

    assert "onnxruntime-int8" in RUNTIMES
    r = measure(trained, torch.randn(2, 1, 8, 8), "onnxruntime-int8", warmup=1, iters=3, threads=1)
    assert r["iters"] == 3 and r["median_ms"] > 0


def test_qat_fake_quant_round_trip(trained):
    """prepare_qat puts the deploy scheme's fake quantizers in (int8 grid per output channel), checkpoints keep plain
    keys, remove_qat leaves the float weights of a plain model."""
    import copy

    from zoo.deploy.quantize import plain_state_dict_keys, prepare_qat, remove_qat

    model = copy.deepcopy(trained).train()
    w = model.body[0].weight.detach().clone()
    handles = prepare_qat(model)
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()  # straight-through gradients reach the latent weights
    assert model.body[0].parametrizations.weight.original.grad is not None
    wq = model.body[0].weight.detach()  # fake-quantized: at most 255 levels per output channel
    assert all(len(torch.unique(wq[c])) <= 255 for c in range(wq.shape[0])) and not torch.equal(wq, w)
    assert (wq - w).abs().max() <= w.abs().amax((1, 2, 3)).max() / 127
    state = plain_state_dict_keys(model.state_dict())
    assert set(state) == set(trained.state_dict())
    remove_qat(model, handles)
    assert torch.equal(model.body[0].weight, w) and set(model.state_dict()) == set(trained.state_dict())
    clean = copy.deepcopy(trained)
    clean.load_state_dict(model.state_dict())  # the BatchNorm statistics of the training step
    with torch.no_grad():
        assert torch.equal(model.eval()(x), clean(x))  # no hook left


def test_qat_callback_freezes_batchnorm_and_can_run_without_fake_quant(trained):
    """freeze_bn keeps BatchNorm on its running statistics whenever Lightning switches the model to train mode;
    weights=False, activations=False leaves the fp32 model untouched (a control run)."""
    import copy
    import types

    from zoo.deploy.qat import QuantizationAwareTraining

    for kw, quantized in (({}, True), ({"weights": False, "activations": False}, False)):
        module = types.SimpleNamespace(model=copy.deepcopy(trained))
        cb = QuantizationAwareTraining(**kw)
        cb.on_fit_start(None, module)
        module.model.train()
        cb.on_train_batch_start(None, module, None, 0)
        bns = [m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and not any(bn.training for bn in bns) and module.model.body[0].training
        stats = bns[0].running_mean.clone()
        with torch.no_grad():
            module.model(torch.randn(4, 1, 8, 8) * 5)  # a training-mode forward on other statistics
        assert torch.equal(bns[0].running_mean, stats)  # not updated
        assert hasattr(module.model.body[0], "parametrizations") == quantized
        cb.on_train_end(None, module)
        assert not hasattr(module.model.body[0], "parametrizations")


class MobileBlock(nn.Module):
    """Inverted bottleneck as in MobileDet-CPU: 1x1 conv-BN-hard-swish, depthwise conv-BN-ReLU6, SE (hard-swish,
    sigmoid gate), 1x1 conv-BN, residual add."""

    def __init__(self, c):
        super().__init__()
        from timm.layers.squeeze_excite import SEModule

        self.pw = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False),
                                nn.BatchNorm2d(2 * c), nn.ReLU6(inplace=True))
        self.se = SEModule(2 * c, rd_channels=8, act_layer=nn.Hardswish)
        self.pwl = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.pwl(self.se(self.dw(self.pw(x))))


def test_qat_fake_quantizes_the_tensors_onnxruntime_quantizes(tmp_path):
    """The QAT fake quantizers sit on exactly the tensors the deployed QDQ graph quantizes (input, conv outputs before
    hard-swish, its gate and product, SE pooling / gate / product, residual add, ReLU6 merged into its conv), one
    for one in execution order: with ranges observed on the calibration batch, each has onnxruntime's range (within
    what quantizing the upstream tensors changes)."""
    import copy

    from onnx import numpy_helper

    from zoo.deploy.quantize import prepare_qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(), MobileBlock(8),
                          MobileBlock(8), nn.Conv2d(8, 6, 1)).eval()
    for m in model.modules():  # BatchNorm statistics as after training, so the fold is not an identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    calib = torch.randn(8, 3, 16, 16)
    res = quantize(model, calib, tmp_path / "m.onnx", num_batches=1, min_samples=8, input_size=(3, 16, 16),
                   test_data=None)
    graph = onnx.load(str(res.path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    ort = [(float(init[n.input[1]]), int(init[n.input[2]])) for n in graph.node if n.op_type == "QuantizeLinear"]
    qat = copy.deepcopy(model)
    handles = prepare_qat(qat)
    called = []
    for fq in handles.fake_quants:
        fq.register_forward_hook(lambda mod, args, out: called.append(mod))
    with torch.no_grad():
        qat(calib)  # the first observation sets each range to the batch's min / max, as onnxruntime's MinMax
    called = list(dict.fromkeys(called))
    assert len(called) == len(ort) == 31
    for (scale, zero_point), fq in zip(ort, called):
        assert float(fq.scale) == pytest.approx(scale, rel=0.03) and abs(int(fq.zero_point) - zero_point) <= 2


@pytest.fixture(scope="module")
def text_quantized(tmp_path_factory):
    """A tiny MobileCLIP-S0 text tower (MCt: RepMixer + transformer, the full CLIP vocabulary) quantized on the
    tokenized captions of the embedded digits caption DataModule (2 batches)."""
    from zoo.data.clip_data import DigitsCLIPDataModule
    from zoo.vision.mobileclip import TextTransformer

    torch.manual_seed(0)
    text = TextTransformer(embed_dim=32, width=64, heads=2, layers=1, variant="mct", context_length=16).eval()
    dm = DigitsCLIPDataModule(model_name="mobileclip_s0", batch_size=16, context_length=16)
    out = tmp_path_factory.mktemp("text")
    return text, dm, quantize(text, dm, out / "text.int8.onnx", num_batches=2, fp32_path=out / "text.fp32.onnx")


def test_text_encoder_int8_from_tokenized_captions(text_quantized):
    text, dm, res = text_quantized
    rep = res.report
    assert rep["inputs"] == "token ids" and rep["family"] == "mobileclip" and rep["calibration_images"] == 32
    assert rep["images"] == len(dm.splits["test"][1])  # the caption pairs of the test split
    # embeddings: cosine similarity of int8 vs fp32 per caption, and the max error against the embedding scale
    assert rep["cosine_min"] > 0.99 and rep["cosine_mean"] > 0.995
    assert rep["max_logit_err"] < 0.1 * rep["outputs"][0]["fp32_scale"]
    graph = onnx.load(str(res.path)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64  # token ids stay integers
    # the embedding table (vocab x width) is stored 8-bit and dequantized in front of the lookup (Gather)
    (emb,) = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == graph.input[0].name]
    dq = producer[emb.input[0]]
    table = inits[dq.input[0]]
    assert dq.op_type == "DequantizeLinear" and list(table.dims) == [text.vocab_size, 64]
    assert table.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    # the family rule: softmax and LayerNorm run as fp32 ops (the quantizer gives them no int8 form)
    assert {"Softmax", "LayerNormalization"} <= set(rep["fp32_op_types"])
    assert {"Softmax", "LayerNormalization"} <= {n.op_type for n in graph.node}
    assert res.path.stat().st_size < 0.4 * res.fp32_path.stat().st_size
    tok = dm.tokenizer(["a photo of the number three", "seven"])
    sess = ort_session(res.path)
    (emb8,) = sess.run(None, {sess.get_inputs()[0].name: tok.numpy()})
    with torch.no_grad():
        ref = text(tok)
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(emb8), ref).min() > 0.99


def test_text_encoder_bad_calibration_data(text_quantized, tmp_path):
    import functools

    import zoo

    text = text_quantized[0]
    out = tmp_path / "t.onnx"
    tok = functools.partial(zoo.get_tokenizer("mobileclip_s0"), context_length=16)
    with pytest.raises(QuantizationError, match="takes token ids, an integer"):
        quantize(text, torch.randn(16, 3, 8, 8).reshape(16, -1), out, num_batches=2)
    with pytest.raises(QuantizationError, match="need a tokenizer"):
        quantize(text, ["one", "two"] * 8, out, num_batches=2)
    with pytest.raises(QuantizationError, match="17 tokens per row.*context length 16"):
        quantize(text, torch.randint(0, 100, (16, 17)), out, num_batches=2)
    with pytest.raises(QuantizationError, match=r"outside \[0, 49408\)"):
        quantize(text, torch.full((16, 16), 49408), out, num_batches=2)
    with pytest.raises(QuantizationError, match="too few calibration samples.*token sequence"):
        quantize(text, ["one", "two"], out, num_batches=2, tokenizer=tok)
    assert not list(tmp_path.iterdir())


def test_bench_int8_runtime_times_a_text_tower(text_quantized):
    """zoo bench's onnxruntime-int8 runtime calibrates a token-id model on random token ids (it used to refuse it)."""
    from zoo.bench import measure, text_tokens

    text = text_quantized[0]
    x = text_tokens(text, 2)
    r = measure(text, x, "onnxruntime-int8", warmup=1, iters=3, threads=1)
    assert r["iters"] == 3 and r["median_ms"] > 0
    with pytest.raises(ValueError, match="not a token-id model"):
        measure(TinyNet(), torch.zeros(2, 1, 8, 8, dtype=torch.long), "onnxruntime-int8", warmup=1, iters=1)


def test_qoperator_format_writes_int8_nodes(trained, digits, tmp_path):
    """quant_format="qoperator": the int8 ops are in the file (QLinearConv ...), not Q/DQ pairs fused at load."""
    res = quantize(trained, digits, tmp_path / "q.onnx", num_batches=2, input_size=(1, 8, 8), quant_format="qoperator",
                   test_data=calibration_batches(digits, 2, "test"))
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops and res.report["format"] == "qoperator"
    assert res.report["top1_agreement"] >= 0.95
