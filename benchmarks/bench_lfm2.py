"""LFM2 on CPU against the machine's limits: decode vs the memory-bandwidth bound, prefill vs the peak GEMM rate,
batched decode, the zoo's fast path vs its eager reference vs transformers' Lfm2ForCausalLM (same random weights,
one process, interleaved runs), for fp32, bf16 and int8 weight-only; writes benchmarks/results/lfm2_speed.json,
from which MODEL_CARD.md's LFM2 speed tables are generated (`make model-card`).

    python benchmarks/bench_lfm2.py                                 # LFM2-350M, 1 and 2 threads, contexts 64 / 2048
    python benchmarks/bench_lfm2.py --tiny --json /tmp/x.json       # smoke run on a tiny config
    python benchmarks/bench_lfm2.py --rss                           # also the peak RSS of load + generate

Definitions
- decode tok/s (batch 1): median time of single-token steps (forward + the greedy pick of each side's ``generate``:
  transformers casts the logits to fp32 and calls ``argmax``; the zoo's ``generate`` takes the same index in one
  compiled pass over the logits, ``zoo.layers.gemv.argmax``) after a cache holding ``context`` tokens, each round
  starting from a copy of the same prefilled cache.
- bandwidth bound: bytes read per decoded token -- every weight once (the tied embedding in full, as the head; int8:
  int8 weights + scales) plus the KV cache at that context in the activation dtype -- divided by the read bandwidth,
  measured by 3 streaming sums over a buffer of exactly those bytes (at least 64 MiB; same threads) in every round
  between the paths; the percentages use the median of these single runs, like the step times (a best-of-n bound
  against median steps would favour the bound on a time-sliced machine).
- prefill tok/s: a ``--prefill-len`` prompt at batch 1 with a fresh cache, next-token logits only; its bound is the
  prompt's FLOPs (2 x non-embedding linear weights per token + causal attention + one head row) at the GEMM rate of
  [prefill-len x hidden] @ [hidden x ffn] products in that dtype (3 in every round; median, like the prefills).
- batched decode: ``--batch-sizes`` rows of left-padded prompts of mixed lengths (half to all of the shortest
  context), decode tokens/s = rows / step time.
- threads: the first ``--threads`` value runs every path (fast, eager, transformers, prefill, batches); further
  values run the fast decode path again in the same rounds, each against a bandwidth bound measured with that many
  threads; their "vs eager" / "vs transformers" ratios compare with the first value's runs.
- eager = ``model.set_decode_path("eager")`` (every token through ``forward``); step = ``set_decode_path("step")``
  (operators' ``step``, packed projections, one Python call per op); fast = the default (at batch 1 the whole layer
  stack as one recorded program, ``zoo.layers.gemv.StepProgram``; batches take the step path). All compute the same
  tokens (tests/language/test_lm_speed.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# as `zoo generate` does (zoo/cli.py): PyTorch's OpenMP workers must not spin on the cores the decode pool uses
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "lfm2_speed.json"

from zoo.layers.gemv import argmax  # noqa: E402
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
            layer_types=["conv", "full_attention", "conv", "full_attention"], max_position_embeddings=4096)


def _times(fn, n: int = 3) -> list[float]:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


class Limits:
    """Read bandwidth and peak GEMM rate, sampled between the measured paths (the load moves both).

    The bandwidth is measured by streaming (summing) a buffer of exactly the bytes one decoded token reads, so the
    bound takes as long as an ideal decode step and meets the same time slicing on a shared machine (a short probe
    would be preempted less often than a long step and overstate the bound)."""

    def __init__(self, max_bytes: int, hidden: int, ffn: int, m: int):
        self.buf = torch.ones(max_bytes // 4 + 1)
        from zoo.layers.gemv import use_hugepages

        use_hugepages(self.buf)  # 2 MiB pages like the weights the kernels read (zoo.layers.gemv): a fair bound
        self.mats = {dt: (torch.randn(m, hidden).to(dt), torch.randn(hidden, ffn).to(dt))
                     for dt in (torch.float32, torch.bfloat16)}
        self.bw: list[float] = []  # every sample, in order
        self.bw_by_threads: dict[int, list[float]] = {}
        self.gemm: dict[torch.dtype, list[float]] = {dt: [] for dt in self.mats}
        self.nbytes = max_bytes

    def sample_bw(self) -> None:
        part = self.buf[: self.nbytes // 4]
        got = [part.numel() * 4 / t for t in _times(part.sum)]
        self.bw += got
        self.bw_by_threads.setdefault(torch.get_num_threads(), []).extend(got)

    def sample_gemm(self, dt: torch.dtype) -> None:
        a, b = self.mats[dt]
        a @ b
        self.gemm[dt] += [2 * a.shape[0] * a.shape[1] * b.shape[1] / t for t in _times(lambda: a @ b)]


def weight_bytes(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


def kv_bytes(cfg, tokens: int, elsize: int) -> int:
    attn = sum(t == "full_attention" for t in cfg.layer_types)
    return attn * 2 * cfg.num_key_value_heads * cfg.attn_head_dim * tokens * elsize


def prefill_flops(cfg, tokens: int) -> float:
    d, f = cfg.hidden_size, cfg.intermediate_size
    n_conv = sum(t == "conv" for t in cfg.layer_types)
    n_attn = sum(t == "full_attention" for t in cfg.layer_types)
    hd, h, kv = cfg.attn_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    lin = n_conv * 4 * d * d + n_attn * d * hd * (2 * h + 2 * kv) + len(cfg.layer_types) * 3 * d * f
    attn = n_attn * 2 * h * hd * tokens * tokens  # q@k and p@v over the causal half
    return 2 * lin * tokens + attn + 2 * cfg.vocab_size * d


# ---------------------------------------------------------------------------------------------- runners


class Ours:
    def __init__(self, model, path: str):
        self.m, self.path = model, path

    @torch.inference_mode()
    def prefill(self, ids, mask=None, room: int = 64):
        self.m.set_decode_path(self.path)
        cache = self.m.new_cache(ids.shape[1] + room)
        tok = argmax(self.m(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1])
        return tok, cache

    @torch.inference_mode()
    def step(self, tok, cache):
        self.m.set_decode_path(self.path)
        return argmax(self.m(tok[:, None], cache=cache)[:, -1])  # (what HybridLM.generate picks with)


class HF:
    def __init__(self, model):
        self.m = model

    @torch.inference_mode()
    def prefill(self, ids, mask=None, room: int = 64):
        out = self.m(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits[:, -1].float().argmax(-1), cache

    @torch.inference_mode()
    def step(self, tok, cache):
        return self.m(tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1].float().argmax(-1)


def decode_rounds(runners: dict, ids, steps: int, repeats: int, limits: Limits, mask=None,
                  threads: dict[str, int] | None = None) -> dict[str, float]:
    """Median single-token step time of every runner (one prefill each, then rounds from copies of its cache;
    a bandwidth sample before every round, at every thread count in ``threads``: runner name -> threads, default
    the current count)."""
    main_threads = torch.get_num_threads()
    threads = {k: (threads or {}).get(k, main_threads) for k in runners}
    start, by_model = {}, {}
    for name, r in runners.items():  # fast and eager share one model: one prefill (the same numbers either way)
        if id(r.m) not in by_model:
            by_model[id(r.m)] = r.prefill(ids, mask, room=steps + 8)
        start[name] = by_model[id(r.m)]
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rnd in range(repeats + 1):  # round 0 warms up
        for th in sorted(set(threads.values()), key=lambda t: t != main_threads):
            torch.set_num_threads(th)
            limits.sample_bw()
            for name, r in runners.items():
                if threads[name] != th:
                    continue
                tok, cache = start[name][0], copy.deepcopy(start[name][1])
                for _ in range(steps):
                    t = time.perf_counter()
                    tok = r.step(tok, cache)
                    if rnd:
                        times[name].append(time.perf_counter() - t)
    torch.set_num_threads(main_threads)
    return {k: statistics.median(v) for k, v in times.items()}


def prefill_rounds(runners: dict, ids, repeats: int, limits: Limits, dtype) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rnd in range(repeats + 1):
        limits.sample_gemm(dtype)
        for name, r in runners.items():
            t = time.perf_counter()
            r.prefill(ids)
            if rnd:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build_pair(tiny: bool, hf: bool, seed: int = 0):
    import zoo

    torch.manual_seed(seed)
    ours = zoo.create_model("lfm2_350m", **(TINY if tiny else {})).eval()
    if not hf:
        return ours, None
    from transformers import Lfm2Config, Lfm2ForCausalLM

    c = ours.config
    cfg = Lfm2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                     num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                     intermediate_size=c.intermediate_size, block_auto_adjust_ff_dim=False,
                     layer_types=list(c.layer_types), max_position_embeddings=c.max_position_embeddings,
                     eos_token_id=7)
    with torch.device("meta"):
        ref = Lfm2ForCausalLM(cfg)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}  # own copies: packing ours must not touch them
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = ref.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    ref.model.rotary_emb = type(ref.model.rotary_emb)(cfg)  # rebuild RoPE buffers off the meta device
    ref.tie_weights()
    return ours, ref.eval()


# ---------------------------------------------------------------------------------------------- memory child


def _proc_status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (VmHWM is reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_rss(folder: str, mode: str, prompt_len: int, new_tokens: int, threads: int) -> None:
    torch.set_num_threads(threads)
    import zoo
    import zoo.models  # noqa: F401  (every family: the baseline both loading paths share)
    from zoo.language.lfm2 import load_pretrained

    base = _proc_status("VmHWM")
    if mode == "load_pretrained":
        m = load_pretrained(folder)
    else:
        m = zoo.create_model("lfm2_350m", checkpoint_path=folder).eval()
    loaded = _proc_status("VmHWM")
    ids = torch.randint(10, 60000, (1, prompt_len))
    m.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    peak = _proc_status("VmHWM")
    print(json.dumps({"mode": mode, "rss_after_imports": base, "peak_after_load": loaded, "peak": peak,
                      "weight_bytes": weight_bytes(m)}))


def _rss(args, res: dict) -> None:
    """Peak RSS of loading a saved fp32 folder and generating, in fresh processes (both loading paths)."""
    import zoo
    import zoo.language.lfm2 as lf

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        zoo.create_model("lfm2_350m").save_pretrained(d)
        cfg = lf.hybrid_config_from_lfm2(json.loads((Path(d) / "config.json").read_text()))
        for mode in ("load_pretrained", "create_model"):
            out = subprocess.run([sys.executable, __file__, "--_child", d, mode, "--threads", str(args.threads[0]),
                                  "--prefill-len", str(args.prefill_len), "--decode-steps", str(args.decode_steps)],
                                 capture_output=True, text=True, check=True)
            rss = json.loads(out.stdout.strip().splitlines()[-1])
            cb = kv_bytes(cfg, args.prefill_len + args.decode_steps, 4)
            rss["cache_bytes"] = cb
            rss["peak_over_weights_plus_cache"] = rss["peak"] / (rss["weight_bytes"] + cb)
            res[f"rss_{mode}"] = rss


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts: the first runs every path, the others the fast decode path (see above)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test of the script)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 2048], help="cache lengths for batch-1 decode")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=8, help="timed steps per path per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (after one warm-up round)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' Lfm2ForCausalLM")
    ap.add_argument("--rss", action="store_true", help="also the peak-memory child processes (fp32 350M)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child_rss(args._child[0], args._child[1], args.prefill_len, args.decode_steps, args.threads[0])
        return 0
    torch.set_num_threads(args.threads[0])
    load_start = os.getloadavg()
    hf_version = None
    if not args.no_hf:
        import transformers

        hf_version = transformers.__version__
    ours, ref = build_pair(args.tiny, not args.no_hf)
    cfg = ours.config
    most = weight_bytes(ours) + kv_bytes(cfg, max(args.contexts) + args.decode_steps, 4)
    limits = Limits(max(most, 64 << 20), cfg.hidden_size, cfg.intermediate_size, args.prefill_len)
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    with torch.inference_mode():  # same weights, same numbers
        probe = torch.randint(10, vocab, (1, 32), generator=gen)
        max_diff = (ours(probe) - ref(probe).logits).abs().max().item() if ref is not None else None
    decode_rows, prefill_rows, batch_rows = [], [], []
    res: dict = {"params": sum(p.numel() for p in ours.parameters())}
    t_start = time.time()
    from zoo.bench import LoadSampler

    sampler = LoadSampler().__enter__()  # the load during the measurements goes into the results file
    for dt_name in args.dtypes:
        if dt_name == "bf16":
            ours.to(torch.bfloat16)
        elif dt_name == "int8":
            from zoo.language.hybrid import quantize_int8_

            quantize_int8_(ours)  # bf16 activations
        act = torch.float32 if dt_name == "fp32" else torch.bfloat16
        runners = {"fast": Ours(ours, "fast"), "step": Ours(ours, "step"), "eager": Ours(ours, "eager")}
        if ref is not None and dt_name == "fp32":
            runners["transformers"] = HF(ref)
        extra = {f"fast@{t}": t for t in args.threads[1:]}  # the fast path again at more threads
        wb = weight_bytes(ours)
        res[f"{dt_name}_weight_bytes"] = wb
        for ctx in args.contexts:
            ids = torch.randint(10, vocab, (1, ctx), generator=gen)
            limits.nbytes = max(wb + kv_bytes(cfg, ctx + args.decode_steps // 2, act.itemsize), 64 << 20)
            bw0 = {t: len(limits.bw_by_threads.get(t, [])) for t in args.threads}
            med = decode_rounds({**runners, **{k: runners["fast"] for k in extra}}, ids, args.decode_steps,
                                args.repeats, limits, threads=extra)
            bytes_tok = wb + kv_bytes(cfg, ctx + args.decode_steps // 2, act.itemsize)
            bws = {t: statistics.median(limits.bw_by_threads[t][bw0[t]:]) for t in args.threads}
            for name, s in med.items():
                th = extra.get(name, args.threads[0])
                bound = bws[th] / bytes_tok
                path = name.split("@")[0]
                decode_rows.append([f"{'zoo ' + path if path != 'transformers' else 'transformers'}", dt_name, th, ctx,
                                    round(1 / s, 2), round(bound, 2), f"{100 / s / bound:.0f}%",
                                    f"x{med['eager'] / s:.2f}",
                                    f"x{med['transformers'] / s:.2f}" if "transformers" in med else "-"])
                res[f"decode_{dt_name}_{ctx}_{path}_{th}t"] = {"tok_s": 1 / s, "bound_tok_s": bound,
                                                               "bw_GBs": bws[th] / 1e9, "bytes_per_token": bytes_tok,
                                                               "load_average": round(os.getloadavg()[0], 2)}
            print(f"decode {dt_name} ctx {ctx}: " + ", ".join(
                f"{k} {1 / v:.2f} tok/s ({100 / v / (bws[extra.get(k, args.threads[0])] / bytes_tok):.0f}%)"
                for k, v in med.items()) + " | bound " + ", ".join(
                f"{bws[t] / bytes_tok:.2f} tok/s at {bws[t] / 1e9:.1f} GB/s ({t} thr)" for t in args.threads),
                flush=True)
        if dt_name in ("fp32", "bf16"):
            ids = torch.randint(10, vocab, (1, args.prefill_len), generator=gen)
            pre = {"fast": runners["fast"]}
            if "transformers" in runners:
                pre["transformers"] = runners["transformers"]
            g0 = len(limits.gemm[act])
            med = prefill_rounds(pre, ids, args.repeats, limits, act)
            peak = statistics.median(limits.gemm[act][g0:])
            bound = peak / (prefill_flops(cfg, args.prefill_len) / args.prefill_len)
            for name, s in med.items():
                tps = args.prefill_len / s
                prefill_rows.append([f"{'zoo' if name == 'fast' else name}", dt_name, args.prefill_len, round(tps, 1),
                                     round(peak / 1e9, 1), f"{100 * tps / bound:.0f}%",
                                     f"x{med['transformers'] / s:.2f}" if "transformers" in med else "-"])
                res[f"prefill_{dt_name}_{name}"] = {"tok_s": tps, "gemm_peak_GFLOPs": peak / 1e9,
                                                    "bound_tok_s": bound}
            print(f"prefill {dt_name} {args.prefill_len}: " + ", ".join(
                f"{k} {args.prefill_len / v:.1f} tok/s ({100 * args.prefill_len / v / bound:.0f}%)"
                for k, v in med.items()) + f" | GEMM peak {peak / 1e9:.1f} GFLOP/s", flush=True)
        if dt_name == "fp32" or len(args.dtypes) == 1:
            short = min(args.contexts)
            base = None
            for b in args.batch_sizes:
                lens = torch.randint(max(1, short // 2), short + 1, (b,), generator=gen)
                lens[0] = short
                ids = torch.randint(10, vocab, (b, short), generator=gen)
                mask = (torch.arange(short)[None] >= (short - lens)[:, None]).long()
                med = decode_rounds({"fast": runners["fast"], "eager": runners["eager"]}, ids, args.decode_steps,
                                    args.repeats, limits, mask=mask)
                tps = b / med["fast"]
                base = base or tps
                batch_rows.append([dt_name, b, f"{int(lens.min())}-{int(lens.max())}", round(tps, 2),
                                   round(b / med["eager"], 2), f"x{tps / base:.2f}"])
                print(f"batch {b} ({dt_name}, left-padded prompts of {int(lens.min())}-{int(lens.max())} tokens): "
                      f"fast {tps:.2f} tok/s, eager {b / med['eager']:.2f} tok/s", flush=True)
        if dt_name == "fp32" and ref is not None:
            del runners["transformers"]
            ref = None  # free transformers' copy before the low-precision runs
    res["seconds"] = round(time.time() - t_start)
    sampler.__exit__(None, None, None)
    if args.rss:
        _rss(args, res)
    load_end = os.getloadavg()
    fast = {(r[1], r[3], r[2]): r for r in decode_rows if r[0] == "zoo fast"}
    summary = "; ".join(f"{dt} ctx {c} {t}t: {r[6]} of bound ({r[7]} vs eager"
                        + (f", {r[8]} vs transformers" if r[8] != "-" else "") + ")" for (dt, c, t), r in fast.items())
    summary += "; prefill " + ", ".join(f"{r[0]} {r[1]} {r[5]} of GEMM peak" for r in prefill_rows)
    print(f"LFM2{'-tiny' if args.tiny else '-350M'} {res['params']:,} params, {args.threads} threads, load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}, max |dlogit| ours vs transformers {max_diff}")
    print("SUMMARY: " + summary)
    from zoo.bench import write_results

    notes = (f"{'tiny config' if args.tiny else 'LFM2-350M'} random weights, {args.threads} threads, load average "
             f"{load_start[0]:.1f} at the start and {load_end[0]:.1f} at the end; bounds measured in the same process "
             "between the paths (read bandwidth median " + ", ".join(
                 f"{statistics.median(v) / 1e9:.1f} GB/s at {t} thread{'s' * (t > 1)}"
                 for t, v in limits.bw_by_threads.items()) + ")")
    path = write_results(args.json, {
        "decode": {"columns": ["path", "weights", "threads", "context", "decode tok/s", "bandwidth bound tok/s",
                               "of bound", "vs eager", "vs transformers"], "rows": decode_rows},
        "prefill": {"columns": ["path", "weights", "prompt", "prefill tok/s", "GEMM peak GFLOP/s", "of peak",
                                "vs transformers"], "rows": prefill_rows},
        "batch": {"columns": ["weights", "batch", "prompt lengths", "fast decode tok/s", "eager decode tok/s",
                              "vs batch 1"], "rows": batch_rows},
    }, settings={"threads": args.threads, "tiny": args.tiny, "contexts": args.contexts,
                 "prefill_len": args.prefill_len, "decode_steps": args.decode_steps, "repeats": args.repeats,
                 "batch_sizes": args.batch_sizes, "dtypes": args.dtypes, "transformers": hf_version,
                 "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                 "load_average_start": [round(x, 2) for x in load_start], "max_abs_logit_diff_vs_transformers": max_diff,
                 "read_bandwidth_GBs": {str(t): [round(b / 1e9, 2) for b in v]
                                        for t, v in limits.bw_by_threads.items()},
                 "gemm_peak_GFLOPs": {str(k): [round(g / 1e9, 1) for g in v] for k, v in limits.gemm.items()},
                 "summary": summary, "figures": res}, notes=notes, load=sampler.summary())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
