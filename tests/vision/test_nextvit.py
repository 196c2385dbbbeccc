"""Next-ViT: exact parameter counts, parity with timm, official-layout conversion, deploy form, features."""
import pytest
import timm
import torch

import zoo
from zoo.checkpoints import KeyMismatchError
from zoo.deploy import count_foldable_batchnorms, reparameterize
from tests.conftest import randomize_batchnorms

# Counted from the official code and timm (shared/reference/nextvit.md).
OFFICIAL_PARAMS = {"nextvit_small": 31_763_368, "nextvit_base": 44_818_856, "nextvit_large": 57_874_344}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_counts_equal_official(name):
    with torch.device("meta"):
        m = zoo.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == OFFICIAL_PARAMS[name]


def test_state_dict_has_official_key_count():
    with torch.device("meta"):
        assert len(zoo.create_model("nextvit_small").state_dict()) == 472


def _timm_pair(name="nextvit_small"):
    torch.manual_seed(0)
    ref = randomize_batchnorms(timm.create_model(name)).eval()
    ours = zoo.create_model(name).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_matches_timm_with_same_weights():
    ref, ours = _timm_pair()
    x = torch.randn(2, 3, 160, 128)  # batch > 1, non-square
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def _official_layout(sd: dict, depths=(3, 4, 10, 3)) -> dict:
    """Rename timm/ours keys to the official repo's layout (features.k flat list, mlp.conv1/2, proj_head.0)."""
    starts = [sum(depths[:i]) for i in range(len(depths))]
    out = {}
    for k, v in sd.items():
        if k.startswith("stages."):
            _, i, _, j, rest = k.split(".", 4)
            k = f"features.{starts[int(i)] + int(j)}.{rest}"
        k = k.replace("mlp.fc1.", "mlp.conv1.").replace("mlp.fc2.", "mlp.conv2.").replace("head.fc.", "proj_head.0.")
        out[k] = v
    return out


def test_official_and_timm_layouts_load_through_checkpoint_path(tmp_path):
    ref, _ = _timm_pair()
    torch.save({"model": _official_layout(ref.state_dict())}, tmp_path / "official.pth")
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = ref(x)
        for f in ("official.pth", "timm.pth"):
            m = zoo.create_model("nextvit_small", checkpoint_path=tmp_path / f).eval()
            assert torch.allclose(m(x), expected, atol=1e-5), f


def test_official_layout_converts_like_timms_own_converter():
    """timm.models.nextvit.checkpoint_filter_fn maps an official checkpoint to timm's keys by position (the official
    file's key order = the model's); ours maps by name. Both must give the same tensors under the same keys."""
    ref, ours = _timm_pair()
    official = _official_layout(ref.state_dict())
    assert "features.0.mlp.conv1.weight" in official and "proj_head.0.weight" in official
    from zoo.vision.nextvit import checkpoint_filter_fn

    converted = checkpoint_filter_fn(official, ours)
    timm_converted = timm.models.nextvit.checkpoint_filter_fn(official, ref)
    assert list(timm_converted) == list(ref.state_dict())
    assert set(converted) == set(timm_converted)
    assert all(converted[k] is timm_converted[k] for k in converted)


def test_wrong_checkpoint_reports_keys(tmp_path):
    ref, _ = _timm_pair()
    sd = ref.state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["head.fc.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(KeyMismatchError) as e:
        zoo.create_model("nextvit_small", checkpoint_path=tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing (1): norm.weight" in msg and "unexpected (1): extra.weight" in msg and "head.fc.bias" in msg


def test_reparameterize_is_exact_and_removes_foldable_bn(tiny_nextvit_args):
    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model("nextvit_small", **tiny_nextvit_args)).eval()
    x = torch.randn(3, 3, 64, 48)
    d = reparameterize(m)
    with torch.no_grad():
        a, b = m(x), d(x)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    # Only the final norm (after a residual sum) is left; every pre-norm and conv+BN pair is folded.
    assert count_foldable_batchnorms(m) > 20 and count_foldable_batchnorms(d) == 1
    assert isinstance(d.norm, torch.nn.BatchNorm2d)
    # Training form untouched (inplace=False)
    assert count_foldable_batchnorms(m) > 20


def test_deploy_form_builds_directly_and_loads_deploy_checkpoints(tmp_path, tiny_nextvit_args):
    from zoo.checkpoints import save_file

    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model("nextvit_small", **tiny_nextvit_args)).eval()
    x = torch.randn(2, 3, 64, 64)
    d = reparameterize(m)
    save_file(d.state_dict(), tmp_path / "deploy.safetensors")
    save_file(m.state_dict(), tmp_path / "train.safetensors")
    with torch.no_grad():
        ref = m(x)
        for f in ("deploy.safetensors", "train.safetensors"):
            dm = zoo.create_model("nextvit_small", deploy=True, checkpoint_path=tmp_path / f, **tiny_nextvit_args)
            assert count_foldable_batchnorms(dm) == 1
            assert torch.allclose(dm.eval()(x), ref, atol=1e-5), f
        # a deploy-form file cannot be unfolded: it builds the deploy form even without deploy=True
        auto = zoo.create_model("nextvit_small", checkpoint_path=tmp_path / "deploy.safetensors", **tiny_nextvit_args)
        assert auto.deploy and torch.allclose(auto.eval()(x), ref, atol=1e-5)


def test_features_only_channels_and_strides():
    m = zoo.create_model("nextvit_small", features_only=True).eval()
    assert m.feature_info.channels() == [96, 256, 512, 1024]
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(96, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)]
    m2 = zoo.create_model("nextvit_small", features_only=True, out_indices=(2, 3))
    assert m2.feature_info.channels() == [512, 1024]


def test_timm_model_api(tiny_nextvit_args):
    m = zoo.create_model("nextvit_small", num_classes=7, **tiny_nextvit_args).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_features, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.head_hidden_size)
    assert m.get_classifier().out_features == 7
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    m.reset_classifier(0, "")
    assert m(x).shape == (2, m.num_features, 2, 2)
    m.reset_classifier(5, "avg")
    assert m(x).shape == (2, 5)


def _loss_and_grads(m, x):
    torch.manual_seed(1)  # the same drop-path masks in both runs (checkpointing must replay them in the recompute)
    m.zero_grad()
    loss = m(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients(tiny_nextvit_args):
    """Checkpointing changes nothing in the forward; what it must keep is the backward: same gradients, with the
    blocks really recomputed (each checkpointed block runs twice per forward + backward)."""
    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model("nextvit_small", num_classes=5, **tiny_nextvit_args)).train()
    x = torch.randn(2, 3, 64, 64)
    calls, blk = [], m.stages[2].blocks[1]  # an NTB (attention) block
    plain_forward = blk.forward
    blk.forward = lambda *a: calls.append(1) or plain_forward(*a)  # counts recomputation too (hooks do not fire there)
    loss, ref = _loss_and_grads(m, x)
    assert len(calls) == 1
    m.set_grad_checkpointing(True)
    calls.clear()
    loss_ckpt, got = _loss_and_grads(m, x)
    assert len(calls) == 2, "set_grad_checkpointing(True) did not checkpoint the blocks"
    assert torch.equal(loss, loss_ckpt)
    assert got.keys() == ref.keys() and sum(bool(g.abs().sum() > 0) for g in ref.values()) > 0.9 * len(ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-7), n


def test_backward_reaches_every_parameter(tiny_nextvit_args):
    m = zoo.create_model("nextvit_small", num_classes=42, **tiny_nextvit_args).train()
    m(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in m.parameters())
