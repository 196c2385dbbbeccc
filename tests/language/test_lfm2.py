"""LFM2 / hybrid decoder: published sizes, parity with transformers' Lfm2ForCausalLM, cached decoding, padding,
context errors, the transformers integration (Auto classes, generate, save/load) and checkpoint conversion."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo.language.hybrid import ContextLengthError, HybridConfig, HybridLM, register_operator
from zoo.language.lfm2 import (
    Lfm2LM, checkpoint_filter_fn, hybrid_config_from_lfm2, lfm2_ffn_width, lfm2_layer_types, load_pretrained,
)

TINY = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
            layer_types=["conv", "full_attention", "conv", "conv", "full_attention"], max_position_embeddings=48)


def close(a, b, tol=1e-5):
    """Logits agree to float32 round-off (absolute or relative to their size)."""
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def tiny(seed=0, **kw) -> Lfm2LM:
    torch.manual_seed(seed)
    m = zoo.create_model("lfm2_350m", **{**TINY, **kw}).eval()
    with torch.no_grad():  # give norms and the pad row non-trivial values so masking bugs cannot hide
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
        m.model.embed_tokens.weight[0].normal_(0, 3.0)
    return m


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """transformers' own LFM2 with random weights, saved in the HF layout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.Lfm2Config(
        vocab_size=96, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=192, layer_types=TINY["layer_types"], max_position_embeddings=48, eos_token_id=None,
    )
    ref = transformers.Lfm2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_lfm2")
    ref.save_pretrained(path)
    return ref, path


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name,params,ffn", [
    ("lfm2_350m", 354_483_968, 4608), ("lfm2_700m", 742_489_344, 6912),
    ("lfm2_1_2b", 1_170_340_608, 8192), ("lfm2_2_6b", 2_569_272_320, 10752),
])
def test_published_parameter_counts(name, params, ffn):
    with torch.device("meta"):
        m = zoo.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == params
    assert m.config.intermediate_size == ffn
    assert m.model.layers[0].feed_forward.w1.out_features == ffn
    assert m.pretrained_cfg.task == "text-generation" and m.pretrained_cfg.family == "lfm2"


def test_lfm2_config_rules():
    assert lfm2_ffn_width(6656) == 4608 and lfm2_ffn_width(12288) == 8192
    assert lfm2_ffn_width(10752, block_auto_adjust_ff_dim=False) == 10752
    assert lfm2_ffn_width(192) == 256  # tiny configs are rounded up to block_multiple_of
    assert lfm2_layer_types(4, [1, 3]) == ("conv", "full_attention", "conv", "full_attention")
    assert lfm2_layer_types(3) == ("full_attention",) * 3  # like HF: neither given -> all attention
    with pytest.raises(ValueError, match="num_hidden_layers=3 but layer_types lists 2"):
        lfm2_layer_types(3, layer_types=["conv", "conv"])
    # first-generation HF config keys
    cfg = hybrid_config_from_lfm2({"block_dim": 128, "block_ff_dim": 384, "num_heads": 4, "num_key_value_heads": 2,
                                   "num_hidden_layers": 3, "full_attn_idxs": [2], "tie_embedding": True,
                                   "rope_theta": 1000.0})
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.rope_theta) == (128, 256, 4, 1000.0)
    assert cfg.layer_types == ("conv", "conv", "full_attention")
    with pytest.raises(ValueError, match="unknown layer type"):
        HybridConfig(layer_types=("conv", "mamba9"))
    with pytest.raises(TypeError, match="does not apply to a language model"):
        zoo.create_model("lfm2_350m", num_classes=10)


def test_new_operator_plugs_in_with_one_module_and_one_config_value():
    @register_operator("test_identity_mixer")
    class IdentityMixer(torch.nn.Module):
        module_name = "mixer"

        def __init__(self, config, layer_idx):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(config.hidden_size))

        def forward(self, x, ctx):
            return x * self.scale

    m = HybridLM(HybridConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                              num_key_value_heads=1, layer_types=("conv", "test_identity_mixer", "full_attention")))
    assert "model.layers.1.mixer.scale" in m.state_dict()
    assert m(torch.randint(0, 32, (2, 5))).shape == (2, 5, 32)


# ---------------------------------------------------------------------------------------------- parity


def test_parity_with_transformers_full_forward_and_decode(hf_reference):
    ref, path = hf_reference
    ours = zoo.create_model("lfm2_350m", checkpoint_path=path, **TINY).eval()
    assert all(p.device.type == "cpu" for p in ours.parameters())  # built on meta, checkpoint tensors assigned
    ids = torch.randint(1, 96, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        assert (got - want).abs().max().item() < 1e-5
        # step-by-step decode: transformers with its own cache vs ours with the hybrid cache
        out = ref(ids[:, :6], use_cache=True)
        cache_ref = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        ref_steps, our_steps = [out.logits], []
        cache = ours.new_cache()
        our_steps.append(ours(ids[:, :6], cache=cache))
        for t in range(6, 14):
            o = ref(ids[:, t:t + 1], cache=cache_ref, use_cache=True)
            ref_steps.append(o.logits)
            our_steps.append(ours(ids[:, t:t + 1], cache=cache))
        ref_dec, our_dec = torch.cat(ref_steps, 1), torch.cat(our_steps, 1)
    assert (our_dec - ref_dec).abs().max().item() < 1e-5
    assert (our_dec - want).abs().max().item() < 1e-5
    # the folder loader builds on meta and assigns: same numbers, no parameter left on meta
    m2 = load_pretrained(path)
    assert all(p.device.type == "cpu" for p in m2.parameters())
    with torch.no_grad():
        assert (m2(ids) - want).abs().max().item() < 1e-5


def test_our_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = tiny()
    m.save_pretrained(tmp_path)
    ref = transformers.Lfm2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 96, (1, 10))
    with torch.no_grad():
        assert (ref(ids).logits - m(ids)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- caching


def test_full_logits_equal_prefill_plus_cached_decode():
    m = tiny()
    ids = torch.randint(1, 96, (3, 20))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache()
        steps = [m(ids[:, :7], cache=cache), m(ids[:, 7:11], cache=cache)]  # prefill in two chunks
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(11, 20)]
    assert cache.seen == 20 and cache.layers[0].shape == (3, 2, 64)  # conv window: L-1 = 2 columns
    assert cache.layers[1].length == 20  # KV grows with the sequence
    close(torch.cat(steps, 1), full)


def _left_pad(prompts, pad_id=0):
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p)
        mask[i, n - len(p):] = 1
    return ids, mask


PROMPTS = [[5, 17, 33], [40, 2, 9, 71, 11, 60, 8], [3, 88, 14, 25, 50]]


def test_left_padded_batch_generates_like_each_prompt_alone():
    m = tiny(initializer_range=0.2)
    ids, mask = _left_pad(PROMPTS)
    batched = m.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    with torch.no_grad():
        padded_logits = m(ids, mask)
    for i, p in enumerate(PROMPTS):
        alone = m.generate(torch.tensor([p]), max_new_tokens=10, eos_token_id=None)
        assert batched[i, -10:].tolist() == alone[0, -10:].tolist()
        with torch.no_grad():  # real positions see exactly what they see alone: no pad leaks into conv/attention
            close(padded_logits[i, -len(p):], m(torch.tensor([p]))[0], tol=1e-4)
    assert len(set(batched[:, -10:].flatten().tolist())) > 3  # a non-degenerate continuation


def test_padding_errors_and_context_limit():
    m = tiny()
    ids, mask = _left_pad(PROMPTS)
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):  # only decoding with a cache needs left padding
        m(ids, mask.flip(1), cache=m.new_cache())
    with pytest.raises(ContextLengthError, match="max_position_embeddings=48"):
        m(torch.randint(1, 96, (1, 49)))
    with pytest.raises(ContextLengthError, match="longer than the model's context"):
        m.generate(torch.randint(1, 96, (1, 60)), max_new_tokens=1)
    with pytest.raises(ContextLengthError, match="lower max_new_tokens to at most 8"):
        m.generate(torch.randint(1, 96, (1, 40)), max_new_tokens=20)
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.randint(1, 96, (1, 40)), cache=cache)
        with pytest.raises(ContextLengthError, match="40 cached"):
            m(torch.randint(1, 96, (1, 9)), cache=cache)


def test_sampling_options_and_streaming():
    m = tiny(initializer_range=0.2)
    ids = torch.tensor([PROMPTS[1]])
    greedy = m.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=None), greedy)
    a = m.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.3,
                   generator=torch.Generator().manual_seed(3), eos_token_id=None)
    b = m.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.3,
                   generator=torch.Generator().manual_seed(3), eos_token_id=None)
    assert torch.equal(a, b) and a.shape == (1, 13)

    class Rec:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, t):
            self.chunks.append(t.tolist())

        def end(self):
            self.ended = True

    rec = Rec()
    out = m.generate(ids, max_new_tokens=4, streamer=rec, eos_token_id=None)
    assert rec.chunks[0] == [PROMPTS[1]] and [c[0] for c in rec.chunks[1:]] == out[0, -4:].tolist() and rec.ended
    # eos stops a row; later positions are padded
    first = greedy[0, 7].item()
    stopped = m.generate(ids, max_new_tokens=6, eos_token_id=first)
    assert stopped.shape[1] == 8


def test_bf16_runs_close_to_fp32():
    m = tiny()
    ids = torch.randint(1, 96, (2, 12))
    with torch.no_grad():
        ref = m(ids)
        low = m.to(torch.bfloat16)(ids).float()
    assert low.dtype == torch.float32 and (low - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------- transformers


def test_transformers_integration_roundtrip_and_generate(hf_reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    from zoo.language.lfm2 import ZooLfm2Config, ZooLfm2ForCausalLM, to_transformers

    ref, path = hf_reference
    hf = ZooLfm2ForCausalLM.from_pretrained(path).eval()  # an HF LFM2 folder
    ids = torch.randint(1, 96, (1, 6))
    with torch.no_grad():
        assert (hf(ids).logits - ref(ids).logits).abs().max().item() < 1e-5
        want = ref.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(hf.generate(ids, max_new_tokens=8, do_sample=False), want)
        torch.manual_seed(0)
        s = hf.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.8, temperature=0.7)
        assert s.shape == (1, 14) and int(s.max()) < 96
        assert hf.generate(ids, max_new_tokens=4, num_beams=2).shape == (1, 10)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "zoo_lfm2" and (tmp_path / "model.safetensors").exists()
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), ZooLfm2Config)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is ZooLfm2ForCausalLM
    for (k, a), (k2, b) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # left-padded batched generate through transformers' GenerationMixin == each alone
    m = tiny(initializer_range=0.2)
    wrapped = to_transformers(m)
    pids, pmask = _left_pad(PROMPTS)
    batched = wrapped.generate(pids, attention_mask=pmask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, p in enumerate(PROMPTS):
        assert batched[i, -6:].tolist() == m.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=None)[0, -6:].tolist()


# ---------------------------------------------------------------------------------------------- conversion


def test_checkpoint_filter_handles_layouts():
    m = tiny()
    sd = m.state_dict()
    bare = {k[len("model."):]: v for k, v in sd.items()}  # e.g. after clean_state_dict stripped "model."
    bare["conv_unused.rotary_emb.inv_freq"] = torch.ones(4)
    bare["layers.0.conv.conv.weight"] = sd["model.layers.0.conv.conv.weight"][:, 0, :]  # llama.cpp-style squeeze
    bare["lm_head.weight"] = sd["model.embed_tokens.weight"]  # a tied head stored twice
    out = checkpoint_filter_fn(bare, m)
    assert set(out) == set(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    half = checkpoint_filter_fn({k: v.bfloat16() for k, v in sd.items()}, m)
    assert all(v.dtype == torch.float32 for v in half.values())


def test_lfm2_training_step_decreases_loss():
    m = tiny().train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(1, 96, (4, 32))
    losses = []
    for _ in range(8):
        logits = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_bf16_decode_kernel_matches_stock_kernel(monkeypatch):
    from zoo.layers import gemv

    if not gemv.kernels_available():
        pytest.skip("this CPU has no AVX512 (or no C compiler): the stock bf16 kernel is used, tested above")
    m = tiny().to(torch.bfloat16).set_decode_path("step")  # products one call each (a recorded program makes one)
    calls = []
    fast = gemv._state["fn"]
    monkeypatch.setitem(gemv._state, "fn", lambda *a: (calls.append(a[8]) if a[0] == 1 else None, fast(*a))[1])

    def decode():
        cache = m.new_cache()
        with torch.no_grad():
            out = [m(ids[:, :5], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
        return torch.cat(out, 1).float()

    ids = torch.randint(1, 96, (1, 9))
    got = decode()
    # every product of the 4 decode steps (packed projections): conv 4 (in, out, w1|w3, w2), attention 4 (q|k|v, out,
    # w1|w3, w2), head
    assert len(calls) == 4 * (3 * 4 + 2 * 4 + 1)
    monkeypatch.setitem(gemv._state, "fn", None)
    want = decode()
    assert (got - want).abs().max().item() < 0.03 * want.abs().max().item()


def test_int8_weight_only_path_stays_close_to_fp32():
    """MODEL_CARD's int8 serving path (quantize_int8_: Int8Linear, Int8Embedding as tied head, bf16 activations).
    Documented tolerance: max |dlogit| <= 3% of max |logit| (measured 0.8-1.7% over 4 seeds) and the same greedy
    tokens as fp32 over 8 steps."""
    import copy

    from zoo.language.hybrid import Int8Embedding, Int8Linear, quantize_int8_

    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        pytest.skip("this PyTorch build has no _weight_int8pack_mm kernel (quantize_int8_ raises a clear error)")
    m = tiny(seed=1)
    q = quantize_int8_(copy.deepcopy(m))
    linears = [x for x in q.modules() if isinstance(x, Int8Linear)]
    assert len(linears) == 29 and all(x.qweight.dtype == torch.int8 for x in linears)  # 3 conv x 2 + 2 attn x 4 + 5 x 3
    assert isinstance(q.model.embed_tokens, Int8Embedding) and not any(isinstance(x, torch.nn.Linear) for x in q.modules())
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = m(ids), q(ids)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).abs().max().item() / want.abs().max().item()
    assert rel <= 0.03, rel
    prompt = ids[:1, :6]
    assert torch.equal(q.generate(prompt, max_new_tokens=8, eos_token_id=None),
                       m.generate(prompt, max_new_tokens=8, eos_token_id=None))
