"""MobileCLIP / MobileCLIP2: counts vs the reference, open_clip parity on the same weights, MCt vs Apple's equations,
checkpoint layouts, deploy folding, ONNX export and input errors."""
from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.conftest import randomize_batchnorms
from tests.vision.test_fastvit import _to_official
from zoo.checkpoints import save_file
from zoo.deploy import count_foldable_batchnorms, reparameterize
from zoo.vision import mobileclip as mc

open_clip = pytest.importorskip("open_clip")  # dev extra

# (image params, text params), counted from the reference code (shared/reference/mobileclip.md, fastvit note):
# train form; the S0 deploy form is 11.357M + 42.435M (Apple's bias-free CLIP projection).
REFERENCE_COUNTS = {
    "mobileclip_s0": (11_406_464, 42_441_216),
    "mobileclip_s1": (21_541_120, 63_428_096),
    "mobileclip_s2": (35_814_720, 63_428_096),
    "mobileclip_b": (86_349_056, 63_428_096),
    "mobileclip2_s0": (11_406_976, 63_428_096),
    "mobileclip2_s2": (35_815_232, 63_428_096),
    "mobileclip2_b": (86_349_056, 63_428_096),
    "mobileclip2_s3": (125_235_648, 123_650_304),
    "mobileclip2_s4": (321_784_832, 123_650_304),
    "mobileclip2_l14": (303_966_976, 123_650_304),
}
# rounded figures of the reference table / timm counts (M): image train, image deploy, text
REFERENCE_M = {
    "mobileclip_s0": (11.407, 11.357, 42.441), "mobileclip_s1": (21.541, 21.460, 63.428),
    "mobileclip_s2": (35.815, 35.702, 63.428), "mobileclip2_s0": (11.407, 11.358, 63.428),
    "mobileclip2_s2": (35.815, 35.703, 63.428), "mobileclip2_s3": (125.236, 125.074, 123.650),
    "mobileclip2_s4": (321.785, 321.570, 123.650),
}


def _n(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(REFERENCE_COUNTS))
def test_counts_equal_reference_and_open_clip_layout(name):
    with torch.device("meta"):
        m = zoo.create_model(name)
        assert (_n(m.visual), _n(m.text)) == REFERENCE_COUNTS[name]
        if name in REFERENCE_M:
            img, img_deploy, txt = REFERENCE_M[name]
            d = zoo.create_model(name, deploy=True)
            assert round(_n(d.visual) / 1e6, 3) == pytest.approx(img_deploy, abs=1e-3)
            assert round(_n(m.visual) / 1e6, 3) == pytest.approx(img, abs=1.5e-3)
            assert round(_n(d.text) / 1e6, 3) == pytest.approx(txt - (0.006 if name == "mobileclip_s0" else 0), abs=1e-3)
        oc_name = mc.OPEN_CLIP_NAMES.get(name)
        if oc_name is None:
            return
        ref = open_clip.create_model(oc_name, device="meta")
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if name in ("mobileclip_s1", "mobileclip_s2"):  # Apple's v1 projection has no bias; timm's copy holds zeros
        theirs.pop("visual.trunk.head.fc.bias")
    assert ours == theirs


# ----------------------------------------------------------------------------------------- open_clip parity

_SMALL_TEXT = dict(layers=1, vocab_size=1000)  # real widths and heads, one layer, a small vocabulary


def _small_image_args(name):
    tower = mc._VARIANTS[name]["image"]
    if tower in ("fastvit_mci3", "fastvit_mci4"):  # same block types, narrower
        return dict(layers=(1,) * 5, embed_dims=(16, 32, 64, 128, 256))
    if tower.startswith("fastvit_mci"):
        return dict(layers=(1,) * 4)
    if tower == "vit_large_patch14_clip_224":
        return dict(depth=1, embed_dim=128, num_heads=2)
    return dict(depth=1)


def _small_open_clip(name, monkeypatch):
    """open_clip's model for ``name`` with the same reduced depths (its TimmModel forwards no depth argument, so the
    timm factory it calls gets them added)."""
    import open_clip.timm_model as otm

    create = otm.timm.create_model
    monkeypatch.setattr(otm.timm, "create_model", functools.partial(create, **_small_image_args(name)))
    cfg = open_clip.get_model_config(mc.OPEN_CLIP_NAMES[name])
    model = open_clip.create_model(mc.OPEN_CLIP_NAMES[name], text_cfg={**cfg["text_cfg"], **_SMALL_TEXT})
    monkeypatch.setattr(otm.timm, "create_model", create)
    return model


def _inputs(name, batch=2, vocab=None):
    """Images and token ids: real tokenizer output, or (small vocabulary) random ids ending in the largest id (EOT)."""
    size = 64 if mc._VARIANTS[name]["image"].startswith("fastvit") else mc._VARIANTS[name]["size"]
    g = torch.Generator().manual_seed(1)
    if vocab is None:
        tok = zoo.get_tokenizer(name)(["a photo of a cat", "a diagram of two dogs playing in the snow"][:batch])
    else:
        tok = torch.zeros(batch, 77, dtype=torch.long)
        for i, n in enumerate((9, 30, 5, 60)[:batch]):
            tok[i, :n] = torch.randint(1, vocab - 1, (n,), generator=g)
            tok[i, n] = vocab - 1
    return torch.rand(batch, 3, size, size, generator=g), tok


def _ours_kwargs(name):
    kw = dict(image_args=_small_image_args(name), text_args=_SMALL_TEXT)
    if mc._VARIANTS[name]["image"].startswith("fastvit"):
        kw["dynamic_img_size"] = True
    return kw


@pytest.mark.parametrize("name", list(mc.OPEN_CLIP_NAMES))
def test_open_clip_parity_same_weights(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = randomize_batchnorms(_small_open_clip(name, monkeypatch)).eval()
    if name in ("mobileclip_s1", "mobileclip_s2"):
        torch.nn.init.zeros_(ref.visual.trunk.head.fc.bias)  # released v1 weights: Apple's bias-free projection
    path = tmp_path / "open_clip.safetensors"
    save_file(ref.state_dict(), path)  # the file open_clip's model gives
    image, text = _inputs(name, vocab=_SMALL_TEXT["vocab_size"])
    with torch.no_grad():
        want_i, want_t = ref.encode_image(image), ref.encode_text(text)
        want = ref(image, text)
        forms = [False, True] if mc._VARIANTS[name]["image"].startswith("fastvit") else [False]
        for deploy in forms:
            ours = zoo.create_model(name, checkpoint_path=path, deploy=deploy, **_ours_kwargs(name)).eval()
            got_i, got_t = ours.encode_image(image), ours.encode_text(text)
            tol = 1e-4 * max(1.0, want_i.abs().max().item())
            assert (got_i - want_i).abs().max() < tol, (deploy, (got_i - want_i).abs().max())
            assert (got_t - want_t).abs().max() < 1e-4 * max(1.0, want_t.abs().max().item())
            img, txt, scale = ours(image, text)
            assert torch.allclose(img, want[0], atol=1e-5) and torch.allclose(txt, want[1], atol=1e-5)
            assert scale.item() == pytest.approx(want[2].item())  # exp(log(1/0.07)) < 100: the clamp is inactive
            if deploy:
                assert count_foldable_batchnorms(ours.visual.trunk.stem) == 0


# -------------------------------------------------------------------------------------------------- MCt (S0)


def _apple_mct_block(block: mc.TextRepMixerBlock, x: torch.Tensor) -> torch.Tensor:
    """Apple's text RepMixerBlock equations on a (B, L, D) input, with 2-D (1, k) convs over (B, D, 1, L):
    t = x + ls1 * (BN_m(dwconv(x)) + BN_skip(x) - BN_n(x));  out = t + ls2 * fc2(GELU(fc1(BN(dwconv_ffn(t)))))."""
    tm, ffn = block.token_mixer, block.mlp

    def bn(b, y):
        return F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    def dw(conv, y):
        k = conv.weight.shape[-1]
        return F.conv2d(y, conv.weight.unsqueeze(2), None, padding=(0, k // 2), groups=y.shape[1])

    y = x.permute(0, 2, 1).unsqueeze(2)
    ls1 = tm.gamma.reshape(-1, 1, 1)
    y = y + ls1 * (bn(tm.mixer_conv.bn, dw(tm.mixer_conv.conv, y)) + bn(tm.mixer_identity, y) - bn(tm.norm_identity, y))
    h = bn(ffn.conv.bn, dw(ffn.conv.conv, y))
    h = F.conv2d(F.gelu(F.conv2d(h, ffn.fc1.weight.unsqueeze(2), ffn.fc1.bias)), ffn.fc2.weight.unsqueeze(2), ffn.fc2.bias)
    y = y + block.gamma.reshape(-1, 1, 1) * h
    return y.squeeze(2).permute(0, 2, 1)


def test_mct_block_matches_apple_equations_and_folds_exactly():
    torch.manual_seed(0)
    blk = randomize_batchnorms(mc.TextRepMixerBlock(32, kernel_size=11)).eval()
    with torch.no_grad():
        blk.token_mixer.gamma.normal_()
        blk.gamma.normal_()
        x = torch.randn(3, 77, 32)
        want = _apple_mct_block(blk, x)
        assert torch.allclose(blk(x), want, atol=1e-5)
        blk.token_mixer.reparameterize()
        blk.token_mixer.reparameterize()  # idempotent
        assert torch.allclose(blk(x), want, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in blk.token_mixer.modules())


def _apple_text_keys(sd: dict) -> dict:
    """Our text keys -> ml-mobileclip ``text_encoder.*`` (written from its module tree)."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("token_embedding.", "embedding_layer.").replace("ln_final.", "final_layer_norm.")
        if k == "positional_embedding":
            k2, v = "positional_embedding.pos_embed.pos_embed", v.reshape(1, 1, *v.shape)
        if k == "text_projection":
            k2 = "projection_layer"
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            for a, b in (("ln_1.", "pre_norm_mha.0."), ("attn.in_proj_weight", "pre_norm_mha.1.qkv_proj.weight"),
                         ("attn.in_proj_bias", "pre_norm_mha.1.qkv_proj.bias"), ("attn.out_proj.", "pre_norm_mha.1.out_proj."),
                         ("ln_2.", "pre_norm_ffn.0."), ("mlp.c_fc.", "pre_norm_ffn.1."), ("mlp.c_proj.", "pre_norm_ffn.4."),
                         ("token_mixer.norm_identity.", "token_mixer.norm.rbr_skip."),
                         ("token_mixer.mixer_conv.", "token_mixer.mixer.rbr_conv.0."),
                         ("token_mixer.mixer_identity.", "token_mixer.mixer.rbr_skip."),
                         ("token_mixer.gamma", "token_mixer.layer_scale"), ("mlp.", "convffn."), ("gamma", "layer_scale")):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            k2 = f"transformer.{i}.{rest}"
            if v.ndim == 3:  # Conv1d -> Apple's Conv2d over (B, C, 1, L)
                v = v.unsqueeze(2)
            elif rest.endswith("layer_scale"):
                v = v.reshape(-1, 1, 1)
        out[f"text_encoder.{k2}"] = v
    return out


def test_apple_s0_checkpoint_loads_in_both_forms(tmp_path):
    """A synthetic ml-mobileclip ``mobileclip_s0.pt`` (image_encoder.model.* with head.proj, text_encoder.*)."""
    torch.manual_seed(0)
    kw = dict(image_args=dict(layers=(1, 1, 1, 1)), text_args=dict(layers=1), dynamic_img_size=True)
    src = randomize_batchnorms(zoo.create_model("mobileclip_s0", **kw)).eval()
    with torch.no_grad():
        for n, p in src.text.named_parameters():
            if n.endswith("gamma"):
                p.normal_()
    vis = {k[len("visual.trunk."):]: v for k, v in src.state_dict().items() if k.startswith("visual.trunk.")}
    apple = {f"image_encoder.model.{k}": v for k, v in _to_official(vis, src.visual.trunk).items()}
    apple["image_encoder.model.head.proj"] = apple.pop("image_encoder.model.head.weight").t().contiguous()
    apple.update(_apple_text_keys(src.text.state_dict()))
    apple["logit_scale"] = src.logit_scale.detach().clone()
    path = tmp_path / "mobileclip_s0.pt"
    torch.save(apple, path)
    image, text = _inputs("mobileclip_s0")
    with torch.no_grad():
        want = src(image, text)
        for deploy in (False, True):
            m = zoo.create_model("mobileclip_s0", checkpoint_path=path, deploy=deploy, **kw).eval()
            got = m(image, text)
            for a, b in zip(got, want):
                assert torch.allclose(a, b, atol=2e-5)
        assert _n(m.text) < _n(src.text)  # folded MCt
    with pytest.raises(ValueError, match="mobileclip_s0"):
        zoo.create_model("mobileclip2_s0", checkpoint_path=path, **{**kw, "text_args": dict(layers=1)})


def test_reparameterize_folds_both_towers_and_export_each_encoder(tmp_path):
    torch.manual_seed(0)
    m = randomize_batchnorms(zoo.create_model("mobileclip_s0", image_args=dict(layers=(1, 1, 1, 1)),
                                              text_args=_SMALL_TEXT, dynamic_img_size=True)).eval()
    image, text = _inputs("mobileclip_s0", vocab=_SMALL_TEXT["vocab_size"])
    d = reparameterize(m)
    with torch.no_grad():
        for a, b in zip(m(image, text), d(image, text)):
            assert torch.allclose(a, b, atol=1e-5)
    assert count_foldable_batchnorms(d.visual.trunk.stem) == 0
    assert not any(isinstance(x, mc.TextRepMixer) and not x.deployed for x in d.modules())
    # image and text encoders exported separately (traced at batch 2), checked by onnxruntime at batch 3
    paths = mc.export_onnx(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.onnx", "text.onnx"] and set(paths) == {"image", "text"}


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_open_clip():
    ours, ref = zoo.get_tokenizer("mobileclip2_s2"), open_clip.get_tokenizer("MobileCLIP2-S2")
    texts = ["a photo of a cat.", "It's  &amp; CAFÉ naïve 123, don't!", "word " * 90, "", "日本語 🙂 emoji"]
    assert torch.equal(ours(texts), ref(texts))
    assert ours.vocab_size == 49408 and ours("x").shape == (1, 77)
    assert ours(texts, context_length=16)[2, -1].item() == ours.eot_token_id  # truncation keeps an end token
    with pytest.raises(ValueError, match="mobileclip_s0"):
        zoo.get_tokenizer("fastvit_mci0")


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_expected_value_and_logit_scale_clamp():
    m = zoo.create_model("mobileclip_s0", image_args=dict(layers=(1, 1, 1, 1)), text_args=_SMALL_TEXT).eval()
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.get_logit_scale().item() == 100.0  # exp(10) clamped like Apple's CLIP
    with pytest.raises(ValueError, match="256x256"):
        m.encode_image(torch.rand(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        m.encode_image(torch.rand(1, 1, 256, 256))
    with pytest.raises(ValueError, match="context length is 77"):
        m.encode_text(torch.ones(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.encode_text(torch.ones(1, 77))


def test_image_transform_and_zero_shot_classifier():
    from PIL import Image

    m = zoo.create_model("mobileclip2_s0", image_args=dict(layers=(1, 1, 1, 1)), text_args=dict(layers=1)).eval()
    tf = mc.image_transform(m)
    x = tf(Image.new("RGB", (320, 300), (255, 0, 0)))
    assert x.shape == (3, 256, 256) and x[0].min().item() == pytest.approx(1.0)  # mean 0 / std 1: raw [0, 1] pixels
    tok = zoo.get_tokenizer("mobileclip2_s0")
    w = mc.zero_shot_classifier(m, tok, ["cat", "dog", "car"], ["a photo of a {}.", lambda c: f"a {c}"])
    assert w.shape == (512, 3) and torch.allclose(w.norm(dim=0), torch.ones(3), atol=1e-5)


# ------------------------------------------------------------------------------------------------ zoo bench


def test_zoo_bench_times_image_and_text_encoders_apart():
    """`zoo bench` on a CLIP model: one row per encoder and runtime, each with its own tower's params and GMACs; the
    text encoder (token-id input) goes through onnxruntime too, and int8 (calibrated on random token ids)."""
    from zoo import bench

    ov = dict(embed_dim=32, dynamic_img_size=True, image_args=dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64)),
              text_args=dict(width=32, heads=2, layers=1, context_length=8, vocab_size=1000))
    rows = bench.bench_models(["mobileclip_s0"], runtimes=["eager", "deploy"], image_size=32, warmup=0, iters=1,
                              overrides=ov, progress=False, skip_errors=False)
    assert [(r["model"], r["runtime"], r["input_size"]) for r in rows] == [
        ("mobileclip_s0:image", "eager", "3x32x32"), ("mobileclip_s0:text", "eager", "8 tokens"),
        ("mobileclip_s0:image", "deploy", "3x32x32"), ("mobileclip_s0:text", "deploy", "8 tokens"),
    ]
    model = zoo.create_model("mobileclip_s0", **ov).eval()
    row = {(r["model"].split(":")[1], r["runtime"]): r for r in rows}
    assert row["image", "eager"]["params_m"] == round(_n(model.visual) / 1e6, 3)
    assert row["text", "eager"]["params_m"] == round(_n(model.text) / 1e6, 3)
    assert row["image", "deploy"]["params_m"] < row["image", "eager"]["params_m"]  # MobileOne / RepMixer folded
    assert row["text", "deploy"]["params_m"] < row["text", "eager"]["params_m"]  # MCt RepMixers folded
    tokens = bench.text_tokens(model, 2)
    assert tokens.shape == (2, 8) and (tokens.argmax(-1) == 7).all()  # EOT (largest id) last: pooled there
    gm = bench.count_gmacs(model.text, tokens[:1])
    assert gm > 0 and row["text", "eager"]["gmacs"] == round(gm, 4)  # meta count = count on real tensors
    r = bench.measure(model.text, tokens, "onnxruntime", warmup=0, iters=1)  # exported at batch 4, checked at 2
    assert r["iters"] == 1 and r["params"] == _n(reparameterize(model.text))
    r = bench.measure(model.text, tokens, "onnxruntime-int8", warmup=0, iters=1)
    assert r["iters"] == 1 and r["median_ms"] > 0
