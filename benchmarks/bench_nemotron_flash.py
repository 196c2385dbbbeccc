"""Nemotron-Flash operators on CPU: (1) our Mamba2 mixer vs transformers' ``Mamba2Mixer`` torch path on the same
weights (prefill and single-token decode, one process, interleaved rounds), (2) decode cost per token of DeltaNet /
Mamba2 layers at short vs long context (it must not grow: the state has a fixed size), with an attention layer model
for contrast. Prints ratios; ``--json`` writes them.

    python benchmarks/bench_nemotron_flash.py --threads 1            # hidden 1024 mixers, contexts 128 and 2048
    python benchmarks/bench_nemotron_flash.py --tiny                 # smoke run

Definitions
- mixer prefill: one ``[1, prefill_len, hidden]`` forward, no cache (ours: chunked SSD, theirs: ``mamba2_chunk_scan``),
  both with chunk size 256 (the release's), fp32.
- mixer decode: one ``[batch, 1, hidden]`` step after a cached prefill (ours: ``Mamba2.step`` with the hybrid cache,
  theirs: ``Mamba2Mixer.forward`` with a ``DynamicCache``); the state is updated in place by both.
- decode tok/s at a context: a model prefilled to that many tokens, then single-token steps (forward + argmax) from
  a fresh copy of that cache each round; median over rounds. ``ratio`` = tok/s at the long context / at the short.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.bench import environment, summarize  # noqa: E402


def _timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def bench_mixer(hidden: int, d_state: int, prefill_len: int, rounds: int, iters: int, batch: int) -> dict:
    from transformers import Mamba2Config
    from transformers.cache_utils import DynamicCache
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from zoo.language.hybrid import HybridConfig, _cache_classes, build_context
    from zoo.layers.recurrent_mixers import Mamba2

    heads = 2 * hidden // 64
    cfg = Mamba2Config(hidden_size=hidden, num_heads=heads, head_dim=64, state_size=d_state, n_groups=1, expand=2,
                       conv_kernel=4, chunk_size=256, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                       num_hidden_layers=1)
    torch.manual_seed(0)
    ref = Mamba2Mixer(cfg, layer_idx=0).eval()
    hc = HybridConfig(vocab_size=8, hidden_size=hidden, layer_types=("mamba2",), intermediate_size=0,
                      max_position_embeddings=1 << 20,
                      extra=dict(mamba_d_state=d_state, mamba_headdim=64, mamba_expand=2, mamba_chunk_size=256))
    ours = Mamba2(hc, 0).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, prefill_len, hidden)
    xb = torch.randn(batch, prefill_len, hidden)
    step_x = torch.randn(batch, 1, hidden)
    cache_cls = _cache_classes(False)[0]

    def ours_prefill():
        return ours(x, build_context(1 << 20, x[..., 0].long(), None, None, None))

    with torch.inference_mode():
        err = (ours_prefill() - ref(x)).abs().max().item()
        our_cache = cache_cls(["mamba2"])
        ours(xb, build_context(1 << 20, xb[..., 0].long(), None, None, our_cache))
        ref_cache = DynamicCache(config=cfg)
        ref(xb, cache=ref_cache)

        def ours_step():
            ctx = build_context(1 << 20, step_x[..., 0].long(), None, None, our_cache)
            return ours.step(step_x, ctx)

        def ref_step():
            return ref(step_x, cache=ref_cache)

        step_err = (ours_step() - ref_step()).abs().max().item()
        res = {"prefill_ours": [], "prefill_ref": [], "decode_ours": [], "decode_ref": []}
        for _ in range(rounds):  # interleaved: a change of machine load hits both paths alike
            res["prefill_ours"] += _timed(ours_prefill, iters)
            res["prefill_ref"] += _timed(lambda: ref(x), iters)
            res["decode_ours"] += _timed(ours_step, iters * 5)
            res["decode_ref"] += _timed(ref_step, iters * 5)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "hidden": hidden, "d_state": d_state, "heads": heads, "prefill_len": prefill_len, "decode_batch": batch,
        "max_abs_diff_prefill": err, "max_abs_diff_decode_step": step_err,
        **{f"{k}_ms": v for k, v in med.items()},
        "prefill_speedup": med["prefill_ref"] / med["prefill_ours"],
        "decode_speedup": med["decode_ref"] / med["decode_ours"],
    }


def bench_context(pattern: str, hidden: int, contexts: list[int], rounds: int, steps: int) -> dict:
    from zoo.language.nemotron_flash import NemotronFlashLM

    torch.manual_seed(0)
    m = NemotronFlashLM(vocab_size=4096, hidden_size=hidden, layer_types=pattern, num_attention_heads=hidden // 64,
                        num_key_value_heads=max(1, hidden // 256), num_memory_tokens=0, mamba_d_state=64,
                        max_position_embeddings=max(contexts) + steps + 8).eval()
    out = {"pattern": pattern, "hidden": hidden, "params_m": sum(p.numel() for p in m.parameters()) / 1e6}
    with torch.inference_mode():
        caches = {}
        for c in contexts:
            cache = m.new_cache()
            m(torch.randint(1, 4096, (1, c)), cache=cache, logits_to_keep=1)
            caches[c] = cache
        tok = torch.ones(1, 1, dtype=torch.long)
        per = {c: [] for c in contexts}
        for _ in range(rounds):
            for c in contexts:
                cache = copy.deepcopy(caches[c])

                def one():
                    m(tok, cache=cache, logits_to_keep=1).argmax(-1)

                one()  # warm-up
                per[c] += _timed(one, steps)
    for c in contexts:
        out[f"decode_tok_s@{c}"] = summarize(per[c], 1)["throughput"]
    lo, hi = min(contexts), max(contexts)
    out["ratio_long_over_short"] = out[f"decode_tok_s@{hi}"] / out[f"decode_tok_s@{lo}"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--d-state", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.tiny:
        a.hidden, a.d_state, a.prefill_len, a.contexts, a.rounds, a.iters, a.steps = 128, 16, 32, "8,40", 1, 1, 2
    torch.set_num_threads(a.threads)
    contexts = [int(c) for c in a.contexts.split(",")]
    mixer = bench_mixer(a.hidden, a.d_state, a.prefill_len, a.rounds, a.iters, a.decode_batch)
    print(f"Mamba2 mixer (hidden {mixer['hidden']}, {mixer['heads']} heads x 64, state {mixer['d_state']}) vs "
          f"transformers Mamba2Mixer torch path, same weights (max |diff| prefill {mixer['max_abs_diff_prefill']:.1e}, "
          f"decode {mixer['max_abs_diff_decode_step']:.1e}):")
    print(f"  prefill {a.prefill_len} tokens: ours {mixer['prefill_ours_ms']:.2f} ms, transformers "
          f"{mixer['prefill_ref_ms']:.2f} ms -> ours {mixer['prefill_speedup']:.2f}x as fast")
    print(f"  decode step (batch {a.decode_batch}): ours {mixer['decode_ours_ms']:.3f} ms, transformers "
          f"{mixer['decode_ref_ms']:.3f} ms -> ours {mixer['decode_speedup']:.2f}x as fast")
    rows = []
    patterns = {"deltanet+mamba2+ffn": "deltanet f m2 f deltanet f m2 f",
                "attention+ffn (contrast)": "a f a f a f a f"}
    for name, pat in patterns.items():
        r = bench_context(pat, a.hidden // 2, contexts, a.rounds, a.steps)
        r["name"] = name
        rows.append(r)
        cells = ", ".join(f"{r[f'decode_tok_s@{c}']:.1f} tok/s @ {c}" for c in contexts)
        print(f"decode, {name} ({r['params_m']:.1f}M params): {cells} -> long/short {r['ratio_long_over_short']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": "python benchmarks/bench_nemotron_flash.py "
                                            + " ".join(argv if argv is not None else sys.argv[1:]),
                                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                            "machine": environment(), "mixer": mixer, "context": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
