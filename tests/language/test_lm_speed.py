"""The fast inference path of the hybrid decoder (packed projections + operators' single-token ``step``) is exact:
greedy fp32 generations equal the eager reference path token for token over 64 tokens, alone and in a left-padded
mixed-length batch; bf16 / int8 logits stay within documented tolerances of their own eager path; packing costs no
memory and follows weight changes; a batch-1 step recorded as one program computes what the operators' steps do; a
new operator plugs in through ``step`` (or falls back to ``forward``).
Speed itself is measured in benchmarks/bench_lfm2.py, not here."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import zoo
from zoo.language.hybrid import HybridConfig, HybridLM, register_operator

TINY = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
            layer_types=["conv", "full_attention", "conv", "conv", "full_attention"], max_position_embeddings=160)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation per op (and stalls on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    fast = zoo.create_model("lfm2_350m", **TINY).eval()
    with torch.no_grad():  # non-trivial norms so a skipped norm in a step cannot hide
        for n, p in fast.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    eager = copy.deepcopy(fast).set_decode_path("eager")
    return fast, eager


def _step_logits(m, ids, mask=None, steps=12):
    """Logits of a prefill and `steps` greedy single-token steps (the decode loop of generate / the benchmark)."""
    cache = m.new_cache()
    with torch.inference_mode():
        lg = m(ids, attention_mask=mask, cache=cache)[:, -1]
        out = [lg]
        for _ in range(steps):
            lg = m(lg.argmax(-1)[:, None], cache=cache)[:, -1]
            out.append(lg)
    return torch.stack(out, 1).float()


@pytest.fixture
def counted(monkeypatch):
    """Counts of recorded-program runs and of attention ``step`` calls."""
    from zoo.language.hybrid import GQAttention
    from zoo.layers.gemv import StepProgram

    n = {"program": 0, "step": 0}
    run, step = StepProgram.run, GQAttention.step
    monkeypatch.setattr(StepProgram, "run", lambda self, *a: (n.__setitem__("program", n["program"] + 1),
                                                             run(self, *a))[1])
    monkeypatch.setattr(GQAttention, "step", lambda self, x, ctx: (n.__setitem__("step", n["step"] + 1),
                                                                   step(self, x, ctx))[1])
    return n


def test_fp32_greedy_equals_eager_over_64_tokens_alone_and_left_padded(pair, counted):
    fast, eager = pair
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    want = eager.generate(ids, max_new_tokens=64, eos_token_id=None)
    counted.update(program=0, step=0)
    assert torch.equal(fast.generate(ids, max_new_tokens=64, eos_token_id=None), want)
    assert counted == {"program": 63, "step": 0}  # batch 1: every token after the first is one recorded program
    assert torch.equal(fast.set_decode_path("step").generate(ids, max_new_tokens=64, eos_token_id=None), want)
    assert counted == {"program": 63, "step": 2 * 63}  # "step": both attention layers' step, never a program
    fast.set_decode_path("fast")
    # left-padded batch of mixed lengths (what batched serving does): the operators' steps
    ids = torch.randint(1, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :6], mask[1, :3] = 0, 0
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=None),
                       eager.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=None))
    assert counted["program"] == 63 and counted["step"] == 2 * 63 + 2 * 23
    torch.testing.assert_close(_step_logits(fast, ids, mask), _step_logits(eager, ids, mask), rtol=1e-5, atol=1e-5)


def test_recorded_program_equals_the_step_path_and_follows_weight_and_dtype_changes(pair, counted):
    """The program runs the step path's kernels at the same rounding points: bf16 / int8 logits are bitwise those of
    the step path, fp32 within float round-off (its SiLU uses another exp); replaced weights, a new dtype or int8
    weights make it record again; an operator without ``record_step`` keeps the step path."""
    from zoo.language.hybrid import quantize_int8_

    fast, _ = pair
    m = copy.deepcopy(fast)
    ids = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    for name in ("fp32", "bf16", "int8"):
        if name == "bf16":
            m.to(torch.bfloat16)
        elif name == "int8" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            old = weakref.ref(m.model.layers[0].feed_forward.w2)
            quantize_int8_(m)
            gc.collect()
            assert old() is None  # the recorded program does not keep replaced layers (or their weights) alive
        before = counted["program"]
        got = _step_logits(m.set_decode_path("fast"), ids, steps=70)  # the KV buffer grows (64 + 64) mid-run
        assert counted["program"] == before + 70, name
        want = _step_logits(m.set_decode_path("step"), ids, steps=70)
        if name == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want), name
    m = copy.deepcopy(fast).set_decode_path("fast")
    want = _step_logits(m, ids, steps=3)
    ffn = m.model.layers[2].feed_forward
    with torch.no_grad():
        ffn.w2.weight = torch.nn.Parameter(ffn.w2.weight * 2)  # a replaced weight: the program records again
    changed = _step_logits(m, ids, steps=3)
    torch.testing.assert_close(changed, _step_logits(m.set_decode_path("step"), ids, steps=3), rtol=1e-6,
                               atol=1e-6)
    assert not torch.allclose(changed, want)
    with torch.no_grad():
        m.model.layers[2].feed_forward.w2.weight.div_(2)  # in place: the program reads the new values
    torch.testing.assert_close(_step_logits(m.set_decode_path("fast"), ids, steps=3), want, rtol=1e-6, atol=1e-6)
    cache = m.new_cache(8, static=True)  # a full static cache: the same error as the step path's
    with torch.inference_mode(), pytest.raises(ValueError, match="static cache is full"):
        tok = m(ids, cache=cache)[:, -1:].argmax(-1)
        for _ in range(3):
            tok = m(tok, cache=cache)[:, -1:].argmax(-1)


def test_token_to_logits_program_matches_the_step_path_and_steps_aside(pair, counted):
    """A batch-1 step of the causal LM is one program from token id to logits (embedding row and head included):
    bitwise the step path's logits for bf16 and int8 (embedding lookup and tied head), float round-off for fp32,
    also with an untied head; a replaced embedding or head records again; forward hooks on the modules it skips,
    an out-of-range id or padding in the cache send the step through ``forward`` (same results, same errors)."""
    from zoo.language.hybrid import quantize_int8_

    fast, _ = pair
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(8))
    untied = HybridLM(HybridConfig(**{**TINY, "tie_word_embeddings": False})).eval()
    int8 = []
    for m in (copy.deepcopy(fast), untied):
        for dtype in ("fp32", "bf16", "int8"):
            if dtype == "bf16":
                m.to(torch.bfloat16)
            elif dtype == "int8":
                int8.append(quantize_int8_(m))
            before = counted["program"]
            got = _step_logits(m.set_decode_path("fast"), ids, steps=5)
            assert counted["program"] == before + 5 and m._zoo_program[1] is not None, dtype
            assert m is not untied or "_zoo_program" not in m.model.__dict__  # (not the decoder's own program)
            want = _step_logits(m.set_decode_path("step"), ids, steps=5)
            if dtype == "fp32":
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got, want), dtype
    from zoo.layers.gemv import _OPS

    prog = m._zoo_program[1]  # its last op brings back into the caches what valid() reads first next step
    lines = set(prog.warm_lines.tolist())
    assert prog.ops[-1][0] == _OPS["warm"] and prog.ops[-1][2] == len(lines)
    for t in (m.model.embed_tokens.weight, m.lm_head.qweight, m.model.layers[1].feed_forward.w2.qweight):
        assert id(t) & ~63 in lines and t._cdata & ~63 in lines
    for q in int8:  # scales (the program reads bf16 copies) edited in place: the tied embedding's (lookup and
        attn = q.model.layers[1].self_attn  # head) or the untied head's, a packed k and a lone projection's
        want, prog = _step_logits(q.set_decode_path("fast"), ids, steps=3), q._zoo_program[1]
        assert attn.k_proj.scale._base is attn.q_proj.scale._base is not None  # (views of the packed scales)
        with torch.no_grad():
            for t in (q.model.embed_tokens if q.lm_head is None else q.lm_head).scale, attn.k_proj.scale, \
                    attn.out_proj.scale:
                t.mul_(1.5)
        changed = _step_logits(q, ids, steps=3)
        assert not torch.allclose(changed, want) and q._zoo_program[1] is not prog  # recorded again
        assert torch.equal(changed, _step_logits(q.set_decode_path("step"), ids, steps=3))
    with torch.inference_mode():  # quantized under inference_mode (scales without a version counter): same path
        q = quantize_int8_(copy.deepcopy(fast))
    want = _step_logits(quantize_int8_(copy.deepcopy(fast)), ids, steps=3)
    assert torch.equal(_step_logits(q.set_decode_path("fast"), ids, steps=3), want) and q._zoo_program[1] is not None
    m = copy.deepcopy(fast).set_decode_path("fast")
    want = _step_logits(m, ids, steps=3)
    with torch.no_grad():  # the tied embedding replaced: both the lookup and the head follow
        m.model.embed_tokens.weight = torch.nn.Parameter(m.model.embed_tokens.weight.flip(1))
    changed = _step_logits(m, ids, steps=3)
    assert not torch.allclose(changed, want)
    torch.testing.assert_close(changed, _step_logits(m.set_decode_path("step"), ids, steps=3), rtol=1e-6, atol=1e-6)
    m.set_decode_path("fast")
    seen = []
    handle = m.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    counted.update(program=0)
    torch.testing.assert_close(_step_logits(m, ids, steps=3), changed, rtol=1e-6, atol=1e-6)
    assert len(seen) == 4 and counted["program"] == 3  # the hook ran every step; the decoder still ran its program
    handle.remove()
    cache = m.new_cache()
    with torch.inference_mode():
        m(ids, cache=cache)
        with pytest.raises(IndexError):
            m(torch.tensor([[TINY["vocab_size"]]]), cache=cache)  # nn.Embedding's error, as without the program
    assert cache.seen == ids.shape[1]


def test_packing_is_free_and_follows_weight_changes(pair):
    fast, _ = pair
    m = copy.deepcopy(fast)
    keys = list(m.state_dict())
    n_bytes = sum(p.numel() for p in m.parameters())
    ids = torch.randint(1, 96, (1, 6))
    want = _step_logits(m, ids, steps=3)
    ffn = m.model.layers[0].feed_forward
    w1, w3 = ffn.w1.weight, ffn.w3.weight
    assert "w13" in ffn._zoo_packed and w1.untyped_storage().data_ptr() == w3.untyped_storage().data_ptr()
    assert w3.data_ptr() == w1.data_ptr() + w1.numel() * w1.element_size()  # consecutive views: no second copy
    params = list(m.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    # packing, and the arena the recorded decode step lays the matrices out in, hold every weight once (the arena
    # starts at a 2 MiB boundary and aligns each storage to 64 bytes)
    assert sum(storages.values()) <= sum(p.numel() * p.element_size() for p in params) + (2 << 20) + 64 * len(params)
    assert w1.untyped_storage().data_ptr() == m.model.layers[1].self_attn.q_proj.weight.untyped_storage().data_ptr()
    assert list(m.state_dict()) == keys and sum(p.numel() for p in m.parameters()) == n_bytes
    with torch.no_grad():  # in-place updates reach the packed matrix (shared storage)
        ffn.w3.weight.mul_(2)
    changed = _step_logits(m, ids, steps=3)
    assert not torch.allclose(changed, want)
    with torch.no_grad():  # a replaced weight is noticed and repacked
        ffn.w3.weight = torch.nn.Parameter(ffn.w3.weight / 2)
    torch.testing.assert_close(_step_logits(m, ids, steps=3), want, rtol=1e-6, atol=1e-6)
    # training after inference: gradients reach every child weight
    m.train()
    m(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "feed_forward" in n or "self_attn" in n)
    # a saved / reloaded model keeps its numbers (shared storages are written as separate tensors)
    re = HybridLM(m.config).eval()
    re.load_state_dict(m.state_dict())
    torch.testing.assert_close(_step_logits(re, ids, steps=3), _step_logits(m.eval(), ids, steps=3))


def test_bf16_and_int8_fast_paths_stay_within_tolerance_of_their_eager_paths(pair):
    """Documented tolerances: bf16 fast vs bf16 eager max |dlogit| <= 2% of max |logit|; int8 (bf16 activations)
    fast vs int8 eager <= 2%; both are round-off of the same low-precision arithmetic in another order."""
    from zoo.language.hybrid import quantize_int8_

    fast, _ = pair
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    lowp = {"bf16": copy.deepcopy(fast).to(torch.bfloat16)}
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        lowp["int8"] = quantize_int8_(copy.deepcopy(fast))
    for name, m in lowp.items():
        got = _step_logits(m.set_decode_path("fast"), ids, mask, steps=6)
        want = _step_logits(m.set_decode_path("eager"), ids, mask, steps=6)
        rel = (got - want).abs().max().item() / want.abs().max().item()
        assert rel <= 0.02, (name, rel)
    if "int8" in lowp:
        m = lowp["int8"]
        assert "qkv" in m.model.layers[1].self_attn._zoo_packed  # int8 projections are packed too
        want = _step_logits(m.set_decode_path("step"), ids, mask, steps=3)
        for mod in m.modules():  # scales given storages of their own (what .to(dtype) does): noticed and repacked
            if type(mod).__name__ == "Int8Linear":
                mod.scale = mod.scale.clone()
        assert torch.equal(_step_logits(m, ids, mask, steps=3), want)


def test_operators_plug_into_the_fast_path_with_step_or_fall_back_to_forward():
    calls = {"step": 0, "forward": 0}

    @register_operator("test_scaled_mixer")
    class ScaledMixer(torch.nn.Module):
        module_name = "mixer"
        packed_projections = {"ab": ("a", "b")}

        def __init__(self, config, layer_idx):
            super().__init__()
            self.a = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)
            self.b = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, x, ctx):
            calls["forward"] += 1
            return self.a(x) * self.b(x)

        def step(self, x, ctx):
            calls["step"] += 1
            from zoo.language.hybrid import packed_linear

            a, b = packed_linear(self, "ab", x)
            return a * b

    @register_operator("test_plain_mixer")
    class PlainMixer(torch.nn.Module):
        module_name = "mixer"

        def __init__(self, config, layer_idx):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(config.hidden_size))

        def forward(self, x, ctx):
            return x * self.scale

    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, layer_types=("conv", "test_scaled_mixer", "test_plain_mixer",
                                                           "full_attention"))
    m = HybridLM(cfg).eval()
    ids = torch.randint(0, 32, (1, 4))
    got = m.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert calls == {"step": 5, "forward": 1}  # prefill runs forward, every later token the operator's step
    assert m._zoo_program[1] is None  # (ScaledMixer has no record_step: no program)
    assert "ab" in m.model.layers[1].mixer._zoo_packed
    assert torch.equal(got, copy.deepcopy(m).set_decode_path("eager").generate(ids, max_new_tokens=6,
                                                                               eos_token_id=None))
    with pytest.raises(ValueError, match="'fast', 'step' or 'eager'"):
        m.set_decode_path("compiled")


def test_zoo_generate_prints_llama_cpp_style_timings_and_eager_gives_the_same_text(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from zoo.cli import main
    from zoo.data.text import byte_tokenizer
    from zoo.language.lfm2 import Lfm2LM

    torch.manual_seed(0)
    m = Lfm2LM(**{**TINY, "vocab_size": 259, "eos_token_id": None}).eval()
    m.save_pretrained(tmp_path / "lm", tokenizer=byte_tokenizer())
    outs = []
    for extra in ([], ["--eager"]):
        assert main(["generate", str(tmp_path / "lm"), "--prompt", "def f(", "--max-new-tokens", "16", *extra]) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert "prefill: " in cap.err and "decode:  15 tokens" in cap.err and "tokens/s" in cap.err
        assert ("eager path" if extra else "fast path") in cap.err
    assert outs[0] == outs[1] and outs[0].startswith("def f(")


def test_nemotron_flash_style_operators_join_the_recorded_step():
    """Attention without q/k norms, FFN-only layers, DeltaNet and Mamba2 (grouped B / C) record their steps: the
    program's logits equal the step path's (bf16: bitwise; fp32: float round-off) and greedy tokens equal eager."""
    import zoo.language.nemotron_flash  # noqa: F401 - registers nf_attention
    import zoo.layers.recurrent_mixers  # noqa: F401 - registers ffn, deltanet, mamba2

    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    for types in (("nf_attention", "ffn", "conv", "ffn"), ("deltanet", "ffn", "mamba2", "nf_attention")):
        torch.manual_seed(0)
        cfg = HybridConfig(vocab_size=64, hidden_size=64, intermediate_size=0, num_attention_heads=4,
                           num_key_value_heads=2, layer_types=types,
                           extra={"ffn_size": 96, "mamba_d_state": 16, "mamba_headdim": 16, "mamba_ngroups": 2})
        m = HybridLM(cfg).eval()
        got = m.generate(ids, max_new_tokens=8, eos_token_id=None)
        assert m._zoo_program[1] is not None, types
        assert torch.equal(got, copy.deepcopy(m).set_decode_path("eager").generate(ids, max_new_tokens=8,
                                                                                   eos_token_id=None))
        for dtype in (torch.float32, torch.bfloat16):
            m.to(dtype)
            fast = _step_logits(m.set_decode_path("fast"), ids, steps=10)
            step = _step_logits(m.set_decode_path("step"), ids, steps=10)
            if dtype is torch.float32:
                torch.testing.assert_close(fast, step, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(fast, step), types


def test_bf16_prefill_on_amx_tiles_stays_within_tolerance_of_the_stock_products(pair, monkeypatch):
    """A bf16 prompt runs its products on AMX tiles (feed-forwards fused into one call, the conv in one kernel) where
    the CPU has them; the logits of the prefill and of 4 decode steps from its cache stay within the documented bf16
    tolerance (2% of max |logit|) of the stock products."""
    from zoo.layers import gemv

    if not gemv.kernels_available() or gemv._state.get("gemm") is None:
        pytest.skip("no AMX here: bf16 prefills run the stock products")
    m = copy.deepcopy(pair[0]).to(torch.bfloat16)
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    calls = {k: 0 for k in ("gemm", "ffn", "conv_prefill")}
    for k in calls:
        fn = gemv._state[k]
        monkeypatch.setitem(gemv._state, k, lambda *a, fn=fn, k=k: (calls.__setitem__(k, calls[k] + 1), fn(*a))[1])
    got = _step_logits(m, ids, steps=4)
    # q, k, v, o of 2 attention layers, in + out of 3 conv layers, the head; 5 fused FFNs; 3 convs
    assert calls == {"gemm": 2 * 4 + 3 * 2 + 1, "ffn": 5, "conv_prefill": 3}
    for k in calls:
        monkeypatch.setitem(gemv._state, k, None)
    want = _step_logits(m, ids, steps=4)
    rel = (got - want).abs().max().item() / want.abs().max().item()
    assert rel <= 0.02, rel
