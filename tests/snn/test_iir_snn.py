"""IIR-SNN: neuron, surrogate gradient, networks, conversion, efficiency report, Dynamic Confidence, ONNX."""
import numpy as np
import pytest
import torch
from torch import nn

import zoo
from zoo.deploy import count_foldable_batchnorms, reparameterize
from zoo.snn.iir_snn import (
    LIFNeuron, SpikeFn, SpikingVGG, TimeSharedDropout, calibrate_thresholds, checkpoint_filter_fn, convert_to_snn,
    dynamic_confidence_eval, percentile, spike, spike_report,
)

TINY = dict(cfg=(8, "A", 16, 16, "A"), fc_dims=(32,), img_size=8, in_chans=1)


def _weights(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".threshold", ".leak")))


def _trained_ann(seed=0, **kw):
    """A tiny ANN with non-trivial BatchNorm statistics (a few train-mode forwards)."""
    torch.manual_seed(seed)
    ann = zoo.create_model("snn_vgg16", spiking=False, **{**TINY, **kw})
    ann.train()
    with torch.no_grad():
        for _ in range(3):
            ann(torch.randn(16, 1, 8, 8) * 2 + 0.5)
        for m in ann.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return ann.eval()


# ------------------------------------------------------------------------------------------- architecture


def _conv(cin, cout, k=3, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


# Counted by hand from the reference code (SayeedChowdhury/IIR-SNN @ 7e4cc00), not from our modules:
# vgg_spiking_bnfused_biasyes.py, cfg 'VGG11' = [64, A, 128, 256, A, 512, 512, A, 512, A, 512, 512]: biased 3x3
# convs, then bias-free Linear(512*2*2, 4096), Linear(4096, 4096), Linear(4096, 10) at 32x32.
REF_VGG11 = (sum(_conv(a, b) for a, b in [(3, 64), (64, 128), (128, 256), (256, 512)] + [(512, 512)] * 4)
             + 2048 * 4096 + 4096 * 4096 + 4096 * 10)
# resnet_spiking_bnfused_biasconv.py, 'resnet20' = [2, 2, 2, 2] BasicBlocks (every conv biased): pre_process
# 3 convs 3->64->64->64 + AvgPool(2); layer widths 64/128/256/512 (stride 1/2/2/2, 1x1 biased shortcut where the
# shape changes); bias-free Linear(512*2*2, 10).
REF_RESNET20 = (_conv(3, 64) + 2 * _conv(64, 64) + 4 * _conv(64, 64)
                + sum(_conv(a, b) + 3 * _conv(b, b) + _conv(a, b, k=1) for a, b in [(64, 128), (128, 256), (256, 512)])
                + 2048 * 10)


@pytest.mark.parametrize("name,kwargs,weights,spiking_layers", [
    ("snn_vgg16", {}, 39_921_472, 15),                     # reference code, CIFAR-10
    ("snn_vgg16", {"num_classes": 100}, 40_290_112, 15),   # CIFAR-100
    ("snn_vgg16_imagenet", {}, 138_348_352, 15),           # ImageNet shape (5 pools, 25088-wide FC)
    ("snn_vgg11", {}, REF_VGG11, 10),                      # 36,196,992
    ("snn_resnet20", {}, REF_RESNET20, 19),                # 11,258,368
])
def test_weight_counts_and_neuron_parameters(name, kwargs, weights, spiking_layers):
    assert (REF_VGG11, REF_RESNET20) == (36_196_992, 11_258_368)  # the MODEL_CARD figures
    with torch.device("meta"):
        m = zoo.create_model(name, **kwargs)
    assert _weights(m) == weights
    lifs = m.lif_layers()
    assert len(lifs) == spiking_layers
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.endswith(".threshold") for n in names) == sum(n.endswith(".leak") for n in names) == spiking_layers
    assert all(p.numel() == 1 for n, p in m.named_parameters() if n.endswith((".threshold", ".leak")))
    cfg = m.pretrained_cfg
    assert cfg.family == "iir_snn" and cfg.task == "image-classification" and cfg.paper == "2110.05929"
    # the ANN form has the same weights except conv biases (BatchNorm instead) and no neuron parameters
    with torch.device("meta"):
        ann = zoo.create_model(name, spiking=False, **kwargs)
    assert not any(n.endswith((".threshold", ".leak")) for n, _ in ann.named_parameters())


def test_registered():
    assert set(zoo.list_models("snn_*")) >= {"snn_vgg16", "snn_vgg16_imagenet", "snn_vgg11", "snn_resnet20"}


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="conv widths"):
        SpikingVGG(cfg=(8, "M"), img_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        SpikingVGG(cfg=(8, "A", 8, "A"), img_size=6)
    with pytest.raises(ValueError, match="timesteps"):
        SpikingVGG(**TINY, timesteps=0)
    ann = zoo.create_model("snn_vgg16", spiking=False, **TINY)
    with pytest.raises(ValueError, match="spiking=False"):
        ann(torch.randn(1, 1, 8, 8), timesteps=3)
    with pytest.raises(ValueError, match="spiking=False"):
        convert_to_snn(zoo.create_model("snn_vgg16", **TINY), torch.randn(2, 1, 8, 8))


# --------------------------------------------------------------------------------------- neuron and surrogate


def test_surrogate_gradient_values():
    z = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5], requires_grad=True)
    s = SpikeFn.apply(z, 0.3)
    assert s.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # Heaviside, 0 at z = 0 (strict comparison)
    s.backward(torch.ones_like(s))
    expected = [0.0, 0.0, 0.15, 0.3, 0.225, 0.15, 0.0, 0.0]  # 0.3 * max(0, 1 - |z|)
    assert torch.allclose(z.grad, torch.tensor(expected))
    # spike() uses the surrogate when autograd needs it and a plain comparison otherwise
    assert spike(z).grad_fn is not None
    with torch.no_grad():
        assert spike(z).grad_fn is None and spike(z).tolist() == s.tolist()


def test_lif_dynamics_hand_computed():
    lif = LIFNeuron(threshold=1.0, leak=0.5)
    currents = [0.6, 0.6, 1.5, 0.0, 2.5]
    # U = 0.5 * U + I; spike if U > 1; soft reset U -= 1
    exp_s = [0, 0, 1, 0, 1]
    exp_u = [0.6, 0.9, 0.95, 0.475, 1.7375]
    mem = None
    for i, c in enumerate(currents):
        s, mem = lif(torch.tensor([c]), mem)
        assert s.item() == exp_s[i]
        assert mem.item() == pytest.approx(exp_u[i], abs=1e-6)
    # leak above 1 acts as 1 (integrate-and-fire) but keeps its gradient at 1
    lif = LIFNeuron(threshold=10.0, leak=1.5)
    _, mem = lif(torch.tensor([1.0]))
    _, mem = lif(torch.tensor([1.0]), mem)
    assert mem.item() == pytest.approx(2.0)
    lif = LIFNeuron(threshold=10.0, leak=1.0)
    _, mem = lif(torch.tensor([1.0]))
    _, mem = lif(torch.tensor([1.0]), mem)
    mem.sum().backward()
    assert lif.leak.grad.item() == pytest.approx(1.0)


def _one_neuron_net(w=0.5, b=0.1, th=1.0, leak=0.9, head=2.0, timesteps=4):
    """One 3x3 conv on a 1x1 image (only the centre tap sees the pixel), one LIF, a 1->1 head."""
    net = SpikingVGG(cfg=(1,), fc_dims=(), img_size=1, in_chans=1, num_classes=1, timesteps=timesteps, drop_rate=0.0)
    with torch.no_grad():
        net.features[0].conv.weight.zero_()
        net.features[0].conv.weight[0, 0, 1, 1] = w
        net.features[0].conv.bias.fill_(b)
        net.features[0].lif.threshold.fill_(th)
        net.features[0].lif.leak.fill_(leak)
        net.head.weight.fill_(head)
    return net.eval()


def test_network_direct_encoding_and_accumulated_output():
    net = _one_neuron_net()
    x = torch.full((1, 1, 1, 1), 1.2)  # current 0.5 * 1.2 + 0.1 = 0.7 at every timestep
    u, spikes = 0.0, []
    for _ in range(4):
        u = 0.9 * u + 0.7
        spikes.append(float(u > 1.0))
        u -= spikes[-1]
    assert spikes == [0.0, 1.0, 0.0, 1.0]
    out = net(x)
    assert out.item() == pytest.approx(2.0 * sum(spikes))  # accumulated membrane of the head, not divided by T
    assert net(x, timesteps=2).item() == pytest.approx(2.0 * sum(spikes[:2]))  # T at call time
    net.set_timesteps(1)
    assert net(x).item() == 0.0


def test_state_is_reset_every_forward():
    net = convert_to_snn(_trained_ann(), torch.randn(32, 1, 8, 8), timesteps=3, sim_timesteps=5).eval()
    x = torch.randn(4, 1, 8, 8) * 3
    a, b = net(x), net(x)
    assert torch.equal(a, b) and a.abs().sum() > 0
    assert not any(isinstance(v, torch.Tensor) for m in net.modules() for v in vars(m).values()), "state leaked onto modules"
    # a different batch size in between does not disturb anything either
    net(torch.randn(7, 1, 8, 8))
    assert torch.equal(net(x), a)


def test_dropout_mask_shared_across_timesteps():
    drop = TimeSharedDropout(0.5).train()
    state = {}
    x = torch.ones(2, 64)
    first = drop(x, state)
    assert torch.equal(drop(x, state), first)  # same mask at the next timestep
    assert set(first.unique().tolist()) <= {0.0, 2.0} and (first == 0).any()
    assert not torch.equal(drop(x, {}), first)  # a new forward (new state) draws a new mask


def test_leak_clamp_and_backward_through_time():
    torch.manual_seed(0)
    net = zoo.create_model("snn_vgg16", **TINY, timesteps=3, threshold=0.3).train()
    net(torch.randn(4, 1, 8, 8) * 3).sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert any(grads[n].abs() > 0 for n in grads if n.endswith(".leak"))
    assert any(grads[n].abs() > 0 for n in grads if n.endswith(".threshold"))
    with torch.no_grad():
        for _, m in net.lif_layers():
            m.leak.fill_(1.3)
    net.clamp_leak_()
    assert all(v == 1.0 for v in net.leaks().values())


# ------------------------------------------------------------------------------------------------ conversion


def test_percentile_rule_matches_nearest_rank():
    t = torch.randn(1001) * 3
    for q in (50.0, 90.0, 99.9):
        assert percentile(t, q) == pytest.approx(float(np.percentile(t.numpy(), q, method="nearest")))
    with pytest.raises(ValueError, match="percentile"):
        percentile(t, 120)


def test_bn_fold_exact_and_conversion_thresholds():
    ann = _trained_ann()
    assert count_foldable_batchnorms(ann) == 3
    x = torch.randn(32, 1, 8, 8) * 2 + 0.5
    folded = reparameterize(ann)
    assert count_foldable_batchnorms(folded) == 0
    assert torch.allclose(folded(x), ann(x), atol=1e-5)

    snn = convert_to_snn(ann, x, timesteps=4, sim_timesteps=6)
    assert snn.spiking and snn.timesteps == 4 and count_foldable_batchnorms(snn) == 0
    assert count_foldable_batchnorms(ann) == 3, "the ANN must be left unchanged"
    for k, v in folded.state_dict().items():
        assert torch.equal(snn.state_dict()[k], v), k
    assert all(v == 1.0 for v in snn.leaks().values())

    # layer 1: input current = conv + BN of the ANN, the same at every timestep
    pre1 = ann.features[0].norm(ann.features[0].conv(x))
    th = snn.thresholds()
    assert th["features.0.lif"] == pytest.approx(percentile(pre1, 90))
    # layer 2 (after the pool): simulated with layer 1 spiking at its new threshold; max over time of the percentile
    u, best = torch.zeros_like(pre1), 0.0
    conv2 = snn.features[2].conv
    for _ in range(6):
        u = u + pre1
        s = (u > th["features.0.lif"]).float()
        u = u - th["features.0.lif"] * s
        best = max(best, percentile(conv2(nn.functional.avg_pool2d(s, 2)), 90))
    assert th["features.2.lif"] == pytest.approx(best, rel=1e-5)
    assert len(th) == 4 and all(v > 0 for v in th.values())

    # threshold_scale multiplies every threshold; calibration on the spiking form alone works too
    again = calibrate_thresholds(snn, x, sim_timesteps=6, threshold_scale=0.5)
    assert again["features.0.lif"] == pytest.approx(0.5 * th["features.0.lif"])


def test_resnet_conversion_folds_shortcut_and_runs():
    torch.manual_seed(0)
    ann = zoo.create_model("snn_resnet20", spiking=False, layers=(1, 1, 0, 0), widths=(8, 16, 16, 16),
                           stem_width=8, img_size=8, in_chans=1).eval()
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(reparameterize(ann)(x), ann(x), atol=1e-5)
    snn = convert_to_snn(ann, x, timesteps=2, sim_timesteps=3)
    assert len(snn.thresholds()) == 3 + 2 * 2
    assert snn(x).shape == (8, 10)


def test_official_vgg_layouts_load():
    """The reference code's key layouts: VGG_SNN_STDB (conv, relu, dropout|pool per conv; threshold.tN ParameterDict
    indexed by Sequential position) and the ANN VGG of vgg_bn.py (conv, bn, relu, dropout|pool)."""
    torch.manual_seed(0)
    ours = zoo.create_model("snn_vgg16", cfg=(8, "A", 16, 16, "A"), fc_dims=(32, 32), img_size=8, in_chans=1).eval()
    sd = ours.state_dict()
    ref_conv = {0: 0, 2: 3, 3: 6}  # our features index -> reference features index (hand-derived)
    official = {}
    for i, r in ref_conv.items():
        official[f"module.features.{r}.weight"] = sd[f"features.{i}.conv.weight"]
        official[f"module.features.{r}.bias"] = sd[f"features.{i}.conv.bias"]
        official[f"module.threshold.t{r}"] = sd[f"features.{i}.lif.threshold"]
        official[f"module.leak.l{r}"] = sd[f"features.{i}.lif.leak"]
    for i, r in enumerate((0, 3)):  # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        official[f"module.classifier.{r}.weight"] = sd[f"pre_logits.{i}.fc.weight"]
        official[f"module.threshold.t{9 + r}"] = sd[f"pre_logits.{i}.lif.threshold"]
        official[f"module.leak.l{9 + r}"] = sd[f"pre_logits.{i}.lif.leak"]
    official["module.classifier.6.weight"] = sd["head.weight"]
    from zoo.checkpoints import clean_state_dict

    mapped = checkpoint_filter_fn(clean_state_dict(official), ours)
    assert set(mapped) == set(sd) and all(torch.equal(mapped[k], sd[k]) for k in sd)

    ann = _trained_ann()
    asd = ann.state_dict()
    official_ann = {}
    for i, r in {0: 0, 2: 4, 3: 8}.items():  # conv at 4k, its BatchNorm at 4k + 1
        official_ann[f"features.{r}.weight"] = asd[f"features.{i}.conv.weight"]
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            official_ann[f"features.{r + 1}.{p}"] = asd[f"features.{i}.norm.{p}"]
    official_ann["classifier.0.weight"] = asd["pre_logits.0.fc.weight"]
    official_ann["classifier.3.weight"] = asd["head.weight"]
    mapped = checkpoint_filter_fn(official_ann, ann)
    assert set(mapped) == set(asd) and all(torch.equal(mapped[k], asd[k]) for k in asd)


def test_reference_vgg16_key_list_maps_onto_ours():
    """The reference SNN checkpoint layout for the full CIFAR VGG16, written out from the reference code
    (vgg_spiking_bnfused_biasyes.py ``_make_layers``: conv, ReLU, Dropout per conv, the Dropout before each 'A'
    replaced by the AvgPool -> conv indices 0, 3, ..., 36 in a 39-entry ``features``; ``classifier`` Linear at 0, 3,
    6; ``threshold.tN`` / ``leak.lN`` at each conv index and at 39 + 0, 39 + 3 for the hidden Linears; DataParallel
    ``module.`` prefix), not produced by inverting our converter.

    No independent program can produce this layout here: the reference repository is not packaged (no PyPI /
    conda release), its trained files are on Google Drive only, and its code may not be vendored into this
    repository; this literal list is the independent check."""
    convs = [(0, 3, 64), (3, 64, 64), (6, 64, 128), (9, 128, 128), (12, 128, 256), (15, 256, 256), (18, 256, 256),
             (21, 256, 512), (24, 512, 512), (27, 512, 512), (30, 512, 512), (33, 512, 512), (36, 512, 512)]
    ref = {}
    for i, cin, cout in convs:
        ref[f"module.features.{i}.weight"] = (cout, cin, 3, 3)
        ref[f"module.features.{i}.bias"] = (cout,)
        ref[f"module.threshold.t{i}"] = ()
        ref[f"module.leak.l{i}"] = ()
    for i, (cin, cout) in zip((0, 3, 6), ((2048, 4096), (4096, 4096), (4096, 10))):
        ref[f"module.classifier.{i}.weight"] = (cout, cin)
    for i in (39, 42):
        ref[f"module.threshold.t{i}"] = ()
        ref[f"module.leak.l{i}"] = ()
    with torch.device("meta"):
        ours = zoo.create_model("snn_vgg16")
        official = {k: torch.empty(shape) for k, shape in ref.items()}
    from zoo.checkpoints import clean_state_dict

    mapped = checkpoint_filter_fn(clean_state_dict(official), ours)
    own = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in own.items()}
    # every reference tensor is used once, in the reference order (same-shape 512 convs cannot be swapped)
    assert len(mapped) == len(ref)
    ours_convs = [k for k in own if k.endswith(".conv.weight")]
    assert all(mapped[k] is official[f"module.features.{i}.weight"] for k, (i, _, _) in zip(ours_convs, convs))
    fcs = [k for k in own if k.endswith(".fc.weight")] + ["head.weight"]
    assert all(mapped[k] is official[f"module.classifier.{i}.weight"] for k, i in zip(fcs, (0, 3, 6)))
    assert mapped["features.0.conv.weight"].shape == (64, 3, 3, 3) and mapped["head.weight"].shape == (10, 4096)


# ------------------------------------------------------------------------------------- report, confidence, ONNX


def test_spike_report_hand_computed():
    net = _one_neuron_net()
    x = torch.full((3, 1, 1, 1), 1.2)  # spikes [0, 1, 0, 1] per image over T=4
    r = spike_report(net, x)
    (layer,) = r["layers"]
    assert layer["spike_rate"] == pytest.approx(0.5) and layer["spikes_per_neuron"] == pytest.approx(2.0)
    ops = {o["name"]: o for o in r["ops"]}
    assert ops["features.0.conv"]["input"] == "analog" and ops["features.0.conv"]["macs"] == 9
    assert ops["features.0.conv"]["snn_macs"] == 9  # the image current is computed once per inference
    assert ops["head"]["snn_acs"] == pytest.approx(2.0)  # 2 input spikes x 1 synapse
    assert r["ann_macs"] == 10
    assert r["energy_ratio"] == pytest.approx(10 * 4.6 / (9 * 4.6 + 2 * 0.9))
    # fewer timesteps -> fewer accumulates
    assert spike_report(net, x, timesteps=2)["snn_acs"] == pytest.approx(1.0)


def test_spike_report_on_a_converted_network():
    snn = convert_to_snn(_trained_ann(), torch.randn(32, 1, 8, 8), timesteps=3, sim_timesteps=5)
    x = torch.randn(16, 1, 8, 8)
    r = spike_report(snn, [(x[:8], None), (x[8:], None)])
    assert r["images"] == 16 and len(r["layers"]) == 4
    assert all(0.0 <= layer["spike_rate"] <= 1.0 for layer in r["layers"])
    assert 0 < r["mean_spike_rate"] < 1
    acs = sum(o["snn_acs"] for o in r["ops"])
    assert r["snn_acs"] == pytest.approx(acs) and r["snn_macs"] < r["ann_macs"]


def test_dynamic_confidence():
    torch.manual_seed(0)
    snn = convert_to_snn(_trained_ann(), torch.randn(32, 1, 8, 8), timesteps=4, sim_timesteps=5)
    x, y = torch.randn(24, 1, 8, 8) * 2, torch.randint(0, 10, (24,))
    full = snn(x)
    out, used = snn.forward_dynamic(x, threshold=1.01)  # never confident enough: the fixed-T result
    assert torch.allclose(out, full, atol=1e-5) and (used == 4).all()
    out, used = snn.forward_dynamic(x, threshold=0.0)  # always confident: one timestep
    assert torch.allclose(out, snn(x, timesteps=1), atol=1e-5) and (used == 1).all()

    sizes = []
    with snn.monitor(lambda n, c, s: sizes.append(c.shape[0]), [snn.lif_layers()[-1][1]]):
        out, used = snn.forward_dynamic(x, threshold=0.3)
    assert sizes == [int((used >= t).sum()) for t in range(1, int(used.max()) + 1)], "exited samples left the batch"
    for i in range(0, x.shape[0], 4):  # each sample's output is its own T=used[i] output
        assert torch.allclose(out[i], snn(x[i:i + 1], timesteps=int(used[i]))[0], atol=1e-5)

    res = dynamic_confidence_eval(snn, [(x[:10], y[:10]), (x[10:], y[10:])], thresholds=[0.3, 1.01])
    assert res["fixed"]["accuracy"] == pytest.approx((full.argmax(-1) == y).float().mean().item())
    dyn = {r["threshold"]: r for r in res["dynamic"]}
    assert dyn[0.3]["mean_timesteps"] == pytest.approx(used.float().mean().item())
    assert dyn[0.3]["accuracy"] == pytest.approx((out.argmax(-1) == y).float().mean().item())
    assert dyn[1.01]["mean_timesteps"] == 4 and dyn[1.01]["accuracy"] == res["fixed"]["accuracy"]


def test_t1_network_exports_to_onnx_with_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from zoo.deploy import export

    snn = convert_to_snn(_trained_ann(), torch.randn(32, 1, 8, 8), timesteps=1, sim_timesteps=5)
    x = torch.randn(2, 1, 8, 8)
    path = export(snn, tmp_path / "snn_t1.onnx", example_input=x, check=True)  # raises on a parity failure
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Greater" in ops and "Conv" in ops
    assert not any(o.startswith("Spike") or o == "PythonOp" for o in ops)
