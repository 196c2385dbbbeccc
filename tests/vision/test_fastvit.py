"""FastViT / MCi0-4 / FastViTHD: exact parameter counts, parity with timm in training and deploy form, exact
reparameterization, converters for Apple's layouts, features_only, FastViTHD visual tokens, ONNX export."""
import functools
import re

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model as timm_reparameterize

import zoo
from tests.conftest import randomize_batchnorms
from zoo.deploy import count_foldable_batchnorms, export, reparameterize
from zoo.vision import fastvit as fv

# Counted from the official code / timm 1.0.31 (shared/reference/fastvit_mci_fastvithd.md): (train, deploy).
OFFICIAL_PARAMS = {
    "fastvit_t8": (4_026_232, 3_996_040),
    "fastvit_t12": (7_553_704, 7_508_840),
    "fastvit_s12": (9_473_576, 9_428_712),
    "fastvit_sa12": (11_580_968, 11_545_320),
    "fastvit_sa24": (21_554_216, 21_501_288),
    "fastvit_sa36": (31_527_464, 31_457_256),
    "fastvit_ma36": (44_068_004, 43_984_632),
}
# MCi with the CLIP head (timm layout: zero bias included), in millions, rounded as in the reference.
MCI_PARAMS_M = {
    "fastvit_mci0": (11.407, 11.358), "fastvit_mci1": (21.542, 21.461), "fastvit_mci2": (35.815, 35.703),
    "fastvit_mci3": (125.236, 125.074), "fastvit_mci4": (321.785, 321.570),
}
FASTVITHD_PARAMS = 125_073_504  # ml-fastvlm mci.py, deploy form, bias-free 3072->768 projection
TIMM_VARIANTS = sorted(OFFICIAL_PARAMS) + sorted(MCI_PARAMS_M)


def _count(m):
    return sum(p.numel() for p in m.parameters())


@functools.lru_cache(maxsize=None)
def _meta(name, **kw):
    """A full-size variant on the meta device, built once per module: the count, key and feature-info tests only
    read it (a meta build still runs every init on meta kernels: 0.3-0.7 s for the big variants)."""
    with torch.device("meta"):
        return fv.__dict__[name](**kw)


def _randomize(model, seed=0):
    """Random BN statistics, layer scales and LayerNorm affine: with the 1e-5 init the RepMixer fold is invisible."""
    randomize_batchnorms(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
        for m in model.modules():
            if isinstance(m, timm.layers.LayerNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def _small(name):
    """Depth 1 per stage and narrow widths; every structural flag of the variant (SE, act, norm, stages) is kept."""
    n = 5 if name in ("fastvit_mci3", "fastvit_mci4", "fastvithd") else 4
    return dict(layers=(1,) * n, embed_dims=(16, 32, 64, 128) if n == 4 else (16, 32, 64, 128, 256))


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


# ------------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_fastvit_param_counts_equal_official(name):
    with torch.device("meta"):
        train, deploy = zoo.create_model(name), fv.__dict__[name](deploy=True)
    assert (_count(train), _count(deploy)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MCI_PARAMS_M))
def test_mci_param_counts_and_keys_equal_timm(name):
    ours, ours_d = _meta(name), _meta(name, deploy=True)
    with torch.device("meta"):
        ref = timm.create_model(name, num_classes=ours.num_classes)
        ref_d = timm.create_model(name, num_classes=ours.num_classes, inference_mode=True)
    assert (_count(ours), _count(ours_d)) == (_count(ref), _count(ref_d))
    assert tuple(round(_count(m) / 1e6, 3) for m in (ours, ours_d)) == MCI_PARAMS_M[name]
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert list(ours_d.state_dict()) == list(ref_d.state_dict())


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_fastvit_keys_equal_timm_in_both_forms(name):
    ours, ours_d = _meta(name), _meta(name, inference_mode=True)  # Apple/timm spelling
    with torch.device("meta"):
        ref, ref_d = timm.create_model(name), timm.create_model(name, inference_mode=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours_d.state_dict().items()} == {k: v.shape for k, v in ref_d.state_dict().items()}


def test_fastvithd_matches_official_count_and_mci3_layout():
    hd, hd_train, mci3 = _meta("fastvithd"), _meta("fastvithd", deploy=False), _meta("fastvit_mci3")
    assert _count(hd) == FASTVITHD_PARAMS  # built in deploy form, as ml-fastvlm does
    assert _count(hd_train) == _count(mci3) - 768  # MCi3 + a bias-free projection
    assert [i["reduction"] for i in hd.feature_info] == [4, 8, 16, 32, 64]


# ------------------------------------------------------------------------------------------- timm parity


def _timm_pair(name, **kw):
    torch.manual_seed(0)
    ours = fv.__dict__[name](**kw)
    ref = _randomize(timm.create_model(name, num_classes=ours.num_classes, **kw)).eval()
    ours.load_state_dict(fv.checkpoint_filter_fn(ref.state_dict(), ours))  # timm's layout passes unchanged
    return ref, ours.eval()


@pytest.mark.parametrize("name", TIMM_VARIANTS)
def test_matches_timm_in_train_and_deploy_form(name):
    ref, ours = _timm_pair(name, **_small(name))
    five = len(_small(name)["layers"]) == 5
    x = torch.randn(2, 3, 128 if five else 64, 64 if five else 32)  # batch > 1, non-square, ends at 2 x 1
    with torch.no_grad():
        a, b = ref(x), ours(x)
        assert torch.equal(a, b), f"training form not bit-exact: max relative error {_rel(a, b):.1e}"  # MODEL_CARD: 0.0
        ref_d, ours_d = timm_reparameterize(ref), reparameterize(ours)
        c, d = ref_d(x), ours_d(x)
        assert _rel(c, d) < 1e-6, "deploy form vs timm's deploy form"
        assert _rel(b, d) < 1e-6, "reparameterization"
        # timm's deploy state dict loads straight into our deploy-form construction
        built = fv.__dict__[name](deploy=True, **_small(name)).eval()
        built.load_state_dict(ref_d.state_dict())
        assert _rel(c, built(x)) < 1e-6


def test_full_size_fastvit_t8_matches_timm():
    ref, ours = _timm_pair("fastvit_t8")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))  # MODEL_CARD: 0.0 (training form)
        assert _rel(timm_reparameterize(ref)(x), reparameterize(ours)(x)) < 1e-6


# ------------------------------------------------------------------------------------------ reparameterize


def test_reparameterize_is_exact_idempotent_and_not_inplace():
    torch.manual_seed(0)
    m = _randomize(zoo.create_model("fastvit_mci0", **_small("fastvit_mci0"))).eval()
    x = torch.randn(3, 3, 64, 64)
    d = reparameterize(m)
    with torch.no_grad():
        a, b = m(x), d(x)
        assert _rel(a, b) < 1e-6
        d.reparameterize()  # again: no-op
        assert torch.equal(d(x), b)
    left = [n for n, _ in d.named_modules() if re.search(r"(conv_kxk|conv_scale|identity|large_conv|small_conv|pos_enc|"
                                                         r"token_mixer\.mixer)$", n)]
    assert left == []
    # only the ConvFFN and attention-norm BatchNorms stay (as in Apple's and timm's deploy form)
    n_blocks = sum(len(s.blocks) for s in d.stages)
    n_attn = sum(isinstance(b, fv.AttentionBlock) for s in d.stages for b in s.blocks)
    assert n_attn == 1 and count_foldable_batchnorms(d) == n_blocks + n_attn
    assert any(".conv_kxk." in k for k in m.state_dict())
    assert set(d.state_dict()) == set(fv.fastvit_mci0(deploy=True, **_small("fastvit_mci0")).state_dict())


def test_extra_folds_remove_every_batchnorm_and_stay_exact():
    torch.manual_seed(0)
    kw = dict(_small("fastvit_sa12"), extra_folds=True)
    m = _randomize(zoo.create_model("fastvit_sa12", **kw)).eval()
    x = torch.randn(2, 3, 64, 64)
    d = reparameterize(m)
    with torch.no_grad():
        assert _rel(m(x), d(x)) < 1e-6
    assert count_foldable_batchnorms(d) == 0
    with torch.device("meta"):
        built = fv.fastvit_sa12(deploy=True, **kw)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in d.state_dict().items()}


# -------------------------------------------------------------------------------------------- converters


def _to_official(sd: dict, model: fv.FastVit) -> dict:
    """Our/timm keys -> ml-fastvit's (flat ``network`` list, ``rbr_*``, ``lkb_*``, ``convffn``, ``conv_exp``).

    Written from ml-fastvit's module list: per stage, [PatchEmbed into it], [RepCPE], blocks.
    """
    index, n = {}, 0
    for i, stage in enumerate(model.stages):
        for part in ("downsample", "pos_emb", "blocks"):
            if part == "blocks" or not isinstance(getattr(stage, part), torch.nn.Identity):
                index[(i, part)] = n
                n += 1
    out = {}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.(downsample|pos_emb|blocks)\.(.*)", k)
        if m:
            rest = m.group(3).replace("pos_enc.", "pe.") if m.group(2) == "pos_emb" else m.group(3)
            k = f"network.{index[(int(m.group(1)), m.group(2))]}.{rest}"
        k = k.replace("stem.", "patch_embed.").replace("final_conv.", "conv_exp.").replace("conv_kxk", "rbr_conv")
        k = k.replace("conv_scale", "rbr_scale").replace(".identity.", ".rbr_skip.").replace("large_conv", "lkb_origin")
        k = k.replace(".mlp.", ".convffn.").replace("se.fc1", "se.reduce").replace("se.fc2", "se.expand")
        k = k.replace("proj.0.reparam_conv", "proj.0.lkb_reparam").replace(".gamma", "")
        k = k.replace("head.fc.", "head.")
        out[k] = v
    return out


def test_official_layout_converts_like_timm_and_loads(tmp_path):
    ref, ours = _timm_pair("fastvit_sa12", **_small("fastvit_sa12"))
    official = _to_official(ref.state_dict(), ours)
    assert "network.6.pe.weight" in official and "network.1.proj.0.lkb_origin.conv.weight" in official
    converted = fv.checkpoint_filter_fn(official, ours)
    timm_converted = timm.models.fastvit.checkpoint_filter_fn(official, ref)
    assert set(converted) == set(timm_converted) == set(ref.state_dict())
    assert all(torch.equal(converted[k], timm_converted[k]) for k in converted)
    torch.save({"state_dict": official}, tmp_path / "fastvit_sa12.pth.tar")
    m = zoo.create_model("fastvit_sa12", checkpoint_path=tmp_path / "fastvit_sa12.pth.tar", **_small("fastvit_sa12"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(ref(x), m.eval()(x)) < 1e-6


def test_official_reparam_checkpoint_loads_into_both_forms(tmp_path, monkeypatch):
    """ml-fastvit's ``*_reparam.pth.tar`` (lkb_reparam, reparam_conv): timm cannot read it; we load it into the deploy
    form directly and into the training form exactly (all folded function in the k x k branch)."""
    ref, ours = _timm_pair("fastvit_sa12", **_small("fastvit_sa12"))
    ref_d = timm_reparameterize(ref)
    official = _to_official(ref_d.state_dict(), ours)
    assert any(k.endswith("lkb_reparam.weight") for k in official)
    torch.save({"state_dict": official}, tmp_path / "fastvit_sa12_reparam.pth.tar")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref_d(x)
        for deploy in (True, False):
            m = zoo.create_model("fastvit_sa12", checkpoint_path=tmp_path / "fastvit_sa12_reparam.pth.tar",
                                 deploy=deploy, **_small("fastvit_sa12")).eval()
            assert any(".conv_kxk." in k for k in m.state_dict()) is not deploy
            assert _rel(expected, m(x)) < 1e-6, f"deploy={deploy}"
        # the same file through the registry tag (pretrained=True), served from a file:// URL
        import dataclasses

        from zoo.registry import CheckpointSource, get_entry

        tags = dict(get_entry("fastvit_sa12").tags)
        url = (tmp_path / "fastvit_sa12_reparam.pth.tar").as_uri()
        tags["apple_in1k_reparam"] = dataclasses.replace(tags["apple_in1k_reparam"],
                                                         source=CheckpointSource(url=url, layout="official"))
        monkeypatch.setattr(get_entry("fastvit_sa12"), "tags", tags)
        m = zoo.create_model("fastvit_sa12.apple_in1k_reparam", pretrained=True, num_classes=ref.num_classes,
                             deploy=True, **_small("fastvit_sa12")).eval()
        assert _rel(expected, m(x)) < 1e-6


def test_expanded_deploy_checkpoint_trains():
    ref, ours = _timm_pair("fastvit_mci3", **_small("fastvit_mci3"))
    train = fv.fastvit_mci3(**_small("fastvit_mci3"))
    train.load_state_dict(fv.checkpoint_filter_fn(timm_reparameterize(ref).state_dict(), train))
    train.train()
    loss = train(torch.randn(2, 3, 64, 64)).square().mean()
    loss.backward()
    grads = [p.grad for n, p in train.named_parameters() if ".conv_kxk." in n or ".conv_scale." in n]
    assert grads and all(g is not None for g in grads)


def test_mobileclip_checkpoint_with_text_tower_and_clip_projection(tmp_path):
    """MobileCLIP ``.pt``: whole CLIP model, image tower under ``image_encoder.model.``, head ``proj`` (in, out)."""
    ref, ours = _timm_pair("fastvit_mci0", **_small("fastvit_mci0"))
    sd = _to_official(ref.state_dict(), ours)
    w = sd.pop("head.weight")
    assert torch.count_nonzero(sd.pop("head.bias")) == 0  # timm's CLIP head: zero bias
    clip = {f"image_encoder.model.{k}": v for k, v in sd.items()}
    clip["image_encoder.model.head.proj"] = w.t().contiguous()
    clip["text_encoder.embedding_layer.weight"] = torch.zeros(10, 4)
    clip["logit_scale"] = torch.tensor(4.6)
    torch.save(clip, tmp_path / "mobileclip_s0.pt")
    m = zoo.create_model("fastvit_mci0", checkpoint_path=tmp_path / "mobileclip_s0.pt", **_small("fastvit_mci0"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(ref(x), m.eval()(x)) < 1e-6


def test_fastvlm_llava_checkpoint_loads_tower_and_projector(tmp_path):
    """FastVLM: deploy-form tower under ``model.vision_tower.vision_tower.model.`` + LLaVA ``model.mm_projector``."""
    kw = dict(_small("fastvithd"), mm_projector_dim=24)
    src = _randomize(fv.fastvithd(deploy=False, **kw)).eval()
    src_d = reparameterize(src)
    sd = _to_official(src_d.state_dict(), src_d)
    sd["head.proj"] = sd.pop("head.weight").t().contiguous()
    ckpt = {f"model.vision_tower.vision_tower.model.{k}": v for k, v in sd.items() if not k.startswith("mm_projector")}
    ckpt.update({f"model.{k}": v for k, v in sd.items() if k.startswith("mm_projector")})
    ckpt["model.embed_tokens.weight"] = torch.zeros(5, 24)  # language model weights are ignored
    ckpt["lm_head.weight"] = torch.zeros(5, 24)
    torch.save(ckpt, tmp_path / "fastvlm.pth")
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = src_d.forward_visual_tokens(x, projection="llava")
        m = zoo.create_model("fastvithd", checkpoint_path=tmp_path / "fastvlm.pth", **kw).eval()
        assert _rel(expected, m.forward_visual_tokens(x, projection="llava")) < 1e-6
        # without mm_projector_dim the projector is dropped, the tower still loads
        plain = zoo.create_model("fastvithd", checkpoint_path=tmp_path / "fastvlm.pth", **_small("fastvithd")).eval()
        assert _rel(src_d(x), plain(x)) < 1e-6


def test_open_clip_checkpoint_written_by_open_clip(tmp_path, monkeypatch):
    """A MobileCLIP2-S0 model built by open_clip itself from its own config (the timm trunk it creates is narrowed and
    the text tower is tiny, to save time): the state dict open_clip writes (``visual.trunk.`` + text tower +
    ``logit_scale``) loads, and our tower's embedding equals ``encode_image``."""
    import functools

    import open_clip

    cfg = open_clip.get_model_config("MobileCLIP2-S0")
    assert cfg["vision_cfg"]["timm_model_name"] == "fastvit_mci0"
    monkeypatch.setattr(open_clip.timm_model.timm, "create_model",
                        functools.partial(timm.create_model, **_small("fastvit_mci0")))
    torch.manual_seed(0)
    clip = open_clip.CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    monkeypatch.undo()
    _randomize(clip.visual.trunk)
    clip.eval()
    sd = clip.state_dict()
    assert any(k.startswith("visual.trunk.stem.") for k in sd) and any(k.startswith("text.") for k in sd)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    m = zoo.create_model("fastvit_mci0", checkpoint_path=tmp_path / "open_clip_pytorch_model.bin",
                         **_small("fastvit_mci0")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), m(x))


def test_transformers_fastvlm_checkpoint_written_by_save_pretrained(tmp_path):
    """transformers' own FastVlmForConditionalGeneration (timm_wrapper ``fastvit_mci3`` in inference mode, as its
    default config; narrowed here) saved with ``save_pretrained``: the tower (``model.vision_tower.timm_model.``) and
    projector (``model.multi_modal_projector.linear_{1,2}``) load into ``fastvithd``, and our LLaVA tokens equal
    transformers' ``get_image_features``. transformers' tower has no CLIP head, so the model is built headless."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    small = _small("fastvithd")
    cfg = FastVlmConfig(
        vision_config=dict(model_type="timm_wrapper", architecture="fastvit_mci3", do_pooling=True, global_pool="avg",
                           hidden_size=2 * small["embed_dims"][-1], model_args=dict(inference_mode=True, **small)),
        text_config=dict(model_type="qwen2", hidden_size=24, vocab_size=64, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=1),
        image_token_index=63)
    torch.manual_seed(0)
    hf = FastVlmForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' init leaves the deep tower's output at ~1e-23: give it a real scale
        for name, p in hf.model.vision_tower.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 1.0)
            elif p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "fastvlm")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fastvlm" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.vision_tower.timm_model.") for k in keys)
    assert "model.multi_modal_projector.linear_1.weight" in keys and "lm_head.weight" in keys
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = hf.model.get_image_features(pixel_values=x).pooler_output
        m = zoo.create_model("fastvithd", checkpoint_path=tmp_path / "fastvlm", num_classes=0, mm_projector_dim=24,
                             **small).eval()
        got = m.forward_visual_tokens(x, projection="llava")
    assert expected.shape == got.shape == (2, 4, 24) and expected.abs().max() > 1e-3
    assert _rel(expected, got) < 1e-6


def test_timm_checkpoint_through_create_model_both_forms(tmp_path):
    ref, _ = _timm_pair("fastvit_t8", **_small("fastvit_t8"))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        for deploy in (False, True):
            m = zoo.create_model("fastvit_t8", checkpoint_path=tmp_path / "timm.pth", deploy=deploy,
                                 **_small("fastvit_t8")).eval()
            assert _rel(expected, m(x)) < 1e-6


def test_grey_input_adapts_both_stem_branches(tmp_path):
    ref, _ = _timm_pair("fastvit_t8", **_small("fastvit_t8"))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    grey = zoo.create_model("fastvit_t8", checkpoint_path=tmp_path / "timm.pth", in_chans=1, **_small("fastvit_t8"))
    g = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # timm's adapt_input_conv sums RGB weights: grey input == the image repeated 3 times
        assert _rel(ref(g.repeat(1, 3, 1, 1)), grey.eval()(g)) < 1e-5


def test_fastvithd_loads_timm_mci3_training_checkpoint(tmp_path):
    """timm/MobileCLIP2 ``fastvit_mci3`` (training form, zero head bias) -> FastViTHD (deploy form, no bias)."""
    ref, _ = _timm_pair("fastvit_mci3", **_small("fastvit_mci3"))
    torch.save(ref.state_dict(), tmp_path / "mci3.pth")
    hd = zoo.create_model("fastvithd", checkpoint_path=tmp_path / "mci3.pth", **_small("fastvithd")).eval()
    assert hd.head.fc.bias is None and any("reparam_conv" in k for k in hd.state_dict())
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert _rel(ref(x), hd(x)) < 1e-6


# ---------------------------------------------------------------------------------------- features / VLM


@pytest.mark.parametrize("name", TIMM_VARIANTS + ["fastvithd"])
def test_features_only_every_stage(name):
    with torch.device("meta"):
        full = zoo.create_model(name, features_only=True)
    n = 5 if name in ("fastvit_mci3", "fastvit_mci4", "fastvithd") else 4
    assert full.feature_info.reduction() == [4, 8, 16, 32, 64][:n]  # stride 64 included, as ml-fastvlm
    widths = _meta(name).feature_info
    assert full.feature_info.channels() == [i["num_chs"] for i in widths]


def test_features_only_shapes_and_tap_choice():
    m = zoo.create_model("fastvit_mci3", features_only=True, **_small("fastvit_mci3")).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        outs = m(x)
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    # out_indices picks levels; the last one is the stride-64 map
    m2 = zoo.create_model("fastvit_mci3", features_only=True, out_indices=(3, 4), **_small("fastvit_mci3"))
    assert m2.feature_info.channels() == [128, 256]
    # ml-fastvit's fork_feat taps a stage with RepCPE before its attention blocks: same shapes, other tensor
    torch.manual_seed(0)
    base = _randomize(fv.fastvit_sa12(**_small("fastvit_sa12"))).eval()
    official = fv.fastvit_sa12(feature_tap="ml_fastvit", **_small("fastvit_sa12")).eval()
    official.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = base.as_feature_extractor()(x), official.as_feature_extractor()(x)
        pre = base.stages[3].pos_emb(base.stages[3].downsample(a[2]))
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
    assert torch.equal(b[3], pre) and not torch.allclose(a[3], b[3])


def test_fastvithd_visual_tokens_at_1024():
    with torch.device("meta"):  # full size: shapes only (243 GMACs on CPU is a benchmark, not a test)
        hd = zoo.create_model("fastvithd", mm_projector_dim=896)
        x = torch.empty(1, 3, 1024, 1024)
        assert hd.forward_visual_tokens(x).shape == (1, 256, 3072)
        assert hd.forward_visual_tokens(x, projection="clip").shape == (1, 256, 768)
        assert hd.forward_visual_tokens(x, projection="llava").shape == (1, 256, 896)
    torch.manual_seed(0)
    small = _randomize(zoo.create_model("fastvithd", deploy=False, **_small("fastvithd"))).eval()
    x = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        tokens = small.forward_visual_tokens(x)
        projected = small.forward_visual_tokens(x, projection="clip")
        fmap = small.forward_features(x)
        pooled = small(x)
    assert tokens.shape == (1, 256, 512)
    assert torch.equal(tokens[:, 17], fmap[:, :, 1, 1])  # row-major: token 17 is (row 1, col 1) of 16 x 16
    # the bias-free CLIP projection is linear: the mean of projected tokens is the pooled embedding
    assert _rel(pooled, projected.mean(1)) < 1e-5
    with pytest.raises(ValueError, match="mm_projector_dim"):
        small.forward_visual_tokens(x[:1, :, :64, :64], projection="llava")


# ---------------------------------------------------------------------------------------- export / API


def test_onnx_export_of_deploy_form_passes_parity_at_other_batch(tmp_path):
    torch.manual_seed(0)
    m = _randomize(zoo.create_model("fastvit_sa12", num_classes=10, **_small("fastvit_sa12"))).eval()
    path = export(m, tmp_path / "fastvit_sa12.onnx", input_size=(3, 64, 64))  # reparameterizes, checks batch 3
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert _rel(ref, got) < 1e-4


def test_timm_model_api_and_backward():
    m = zoo.create_model("fastvit_sa12", num_classes=7, **_small("fastvit_sa12"))
    x = torch.randn(2, 3, 64, 64)
    m(x).mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_features, 2, 2) and m.num_features == 256
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.head_hidden_size)
    final, inter = m.forward_intermediates(x)
    assert len(inter) == 4 and torch.equal(final, feats)
    m.reset_classifier(0)
    assert m(x).shape == (2, 256)
    m.reset_classifier(5)
    assert m(x).shape == (2, 5)
    hd = fv.fastvithd(**_small("fastvithd"))
    hd.reset_classifier(3)
    assert hd.head.fc.bias is None  # the bias-free choice survives a head reset


def _loss_and_grads(m, x):
    torch.manual_seed(1)  # identical drop-path masks in both runs
    m.zero_grad()
    loss = m(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["fastvit_sa12", "fastvit_mci3"])  # BatchNorm + attention; LayerNorm, 5 stages
def test_grad_checkpointing_gives_the_same_gradients(name):
    """The backward, not the forward, is what checkpointing could break: same gradients, blocks really recomputed."""
    torch.manual_seed(0)
    m = _randomize(fv.__dict__[name](num_classes=5, drop_path_rate=0.1, **_small(name))).train()
    x = torch.randn(2, 3, 128, 64)
    calls, blk = [], m.stages[-1].blocks[0]  # an attention block
    plain_forward = blk.forward
    blk.forward = lambda *a: calls.append(1) or plain_forward(*a)  # counts the recompute too (hooks do not fire there)
    loss, ref = _loss_and_grads(m, x)
    assert len(calls) == 1
    m.set_grad_checkpointing(True)
    calls.clear()
    loss_ckpt, got = _loss_and_grads(m, x)
    assert len(calls) == 2, "set_grad_checkpointing(True) did not checkpoint the blocks"
    assert torch.equal(loss, loss_ckpt)
    assert got.keys() == ref.keys() and len(ref) == len(list(m.parameters()))
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-7), n


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="layernorm"):
        fv.fastvit_t8(norm_layer="groupnorm")
    with pytest.raises(ValueError, match="embed_dims has 3 entries"):
        fv.fastvit_t8(embed_dims=(8, 16, 32))
    with pytest.raises(ValueError, match="head_dim"):
        fv.fastvit_sa12(embed_dims=(10, 20, 40, 80), layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="out_indices"):
        zoo.create_model("fastvit_t8", features_only=True, out_indices=(4,), **_small("fastvit_t8"))
    with pytest.raises(ValueError, match="multiple of embed_dims"):
        fv.fastvit_t8(embed_dims=(16, 32, 64, 96))
    with pytest.raises(ValueError, match="feature_tap"):
        fv.fastvit_t8(feature_tap="fork")
