"""LFM2-350M on CPU: prefill and decode speed of the zoo port vs transformers' Lfm2ForCausalLM (same random
weights, same process, interleaved runs), the memory-bandwidth bound of decoding, bf16 / int8 paths and the peak
resident memory of loading + generating.

    python benchmarks/bench_lfm2.py                       # threads = all cores, 512-token prompt, 32 decode steps
    python benchmarks/bench_lfm2.py --threads 2 --json out.json

Definitions
- prefill tok/s: a ``--prompt-len`` token prompt at batch 1 through the model with a fresh cache, next-token logits
  only (``logits_to_keep=1``; what ``generate`` does), divided into the prompt length. Median of ``--repeats``.
- decode tok/s: single-token steps with the cache after that prompt (model forward + argmax), median step time.
- bandwidth bound: bytes of weights read per decoded token (every weight once; the tied embedding is read in full
  as the output head) / the machine's measured read bandwidth (streaming sum over a 1 GiB buffer, same threads).
- peak RSS: a fresh child process loads a saved fp32 checkpoint folder and generates (``ru_maxrss``), compared to the
  weight bytes plus the decode cache bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    del x
    return (gib * (1 << 30)) / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


# ---------------------------------------------------------------------------------------------- runners


class Ours:
    def __init__(self, model):
        self.m = model

    @torch.inference_mode()
    def prefill(self, ids):
        self.cache = self.m.new_cache(ids.shape[1] + 256)
        return self.m(ids, cache=self.cache, logits_to_keep=1)[:, -1].argmax(-1)

    @torch.inference_mode()
    def step(self, tok):
        return self.m(tok[:, None], cache=self.cache)[:, -1].argmax(-1)


class HF:
    def __init__(self, model):
        self.m = model

    @torch.inference_mode()
    def prefill(self, ids):
        out = self.m(ids, use_cache=True, logits_to_keep=1)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits[:, -1].argmax(-1)

    @torch.inference_mode()
    def step(self, tok):
        out = self.m(tok[:, None], cache=self.cache, use_cache=True)
        return out.logits[:, -1].argmax(-1)


def measure(runners: dict, ids: torch.Tensor, decode_steps: int, repeats: int) -> dict:
    """Interleaved (A, B, A, B, ...) so machine load affects every runner alike; medians."""
    pre = {k: [] for k in runners}
    dec = {k: [] for k in runners}
    for r in range(repeats + 1):  # first round is warm-up
        for name, run in runners.items():
            t = time.perf_counter()
            tok = run.prefill(ids)
            tp = time.perf_counter() - t
            steps = []
            for _ in range(decode_steps):
                t = time.perf_counter()
                tok = run.step(tok)
                steps.append(time.perf_counter() - t)
            if r:
                pre[name].append(tp)
                dec[name] += steps
    n = ids.shape[1]
    return {k: {"prefill_tok_s": n / statistics.median(pre[k]), "decode_tok_s": 1 / statistics.median(dec[k]),
                "decode_ms": 1000 * statistics.median(dec[k])} for k in runners}


def build_pair(seed: int = 0):
    import zoo
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(seed)
    ours = zoo.create_model("lfm2_350m").eval()
    cfg = Lfm2Config(vocab_size=65536, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=8, intermediate_size=6656, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                     max_position_embeddings=128000, eos_token_id=7)
    with torch.device("meta"):
        ref = Lfm2ForCausalLM(cfg)
    sd = dict(ours.state_dict())
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


def cache_bytes(cfg, tokens: int, dtype_bytes: int = 4) -> int:
    conv = sum(t == "conv" for t in cfg.layer_types) * cfg.hidden_size * (cfg.conv_L_cache - 1)
    attn = sum(t == "full_attention" for t in cfg.layer_types) * 2 * cfg.num_key_value_heads * cfg.attn_head_dim * tokens
    return (conv + attn) * dtype_bytes


def _rss(args, res: dict) -> None:
    """Peak RSS of loading a saved fp32 folder and generating, in fresh processes (both loading paths)."""
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        import zoo

        zoo.create_model("lfm2_350m").save_pretrained(d)
        for mode in ("load_pretrained", "create_model"):
            out = subprocess.run([sys.executable, __file__, "--_child", d, mode, "--threads", str(args.threads),
                                  "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps)],
                                 capture_output=True, text=True, check=True)
            rss = json.loads(out.stdout.strip().splitlines()[-1])
            import zoo.language.lfm2 as lf

            cfg = lf.hybrid_config_from_lfm2(json.loads((Path(d) / "config.json").read_text()))
            cb = cache_bytes(cfg, args.prompt_len + args.decode_steps)
            rss["cache_bytes"] = cb
            rss["peak_over_weights_plus_cache"] = rss["peak"] / (rss["weight_bytes"] + cb)
            rss["peak_minus_imports_over_weights_plus_cache"] = (rss["peak"] - rss["rss_after_imports"]) / (
                rss["weight_bytes"] + cb)
            res[f"rss_{mode}"] = rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-lowp", action="store_true", help="skip the bf16 / int8 runs")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--only-rss", action="store_true", help="only the peak-memory child processes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child_rss(args._child[0], args._child[1], args.prompt_len, args.decode_steps, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "torch": torch.__version__, "prompt_len": args.prompt_len,
                 "load_avg_start": os.getloadavg()}
    import transformers

    res["transformers"] = transformers.__version__
    if args.only_rss:
        _rss(args, res)
        res["load_avg_end"] = os.getloadavg()
        print(json.dumps({k: v for k, v in res.items() if k.startswith("rss_")}, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    bw = read_bandwidth()
    res["read_bandwidth_GBs"] = bw / 1e9
    ours, ref = build_pair()
    wbytes = weight_bytes(ours)
    res["params"] = sum(p.numel() for p in ours.parameters())
    res["fp32_weight_bytes"] = wbytes
    res["fp32_bound_tok_s"] = bw / wbytes
    ids = torch.randint(10, 60000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # same weights, same numbers
        res["max_abs_logit_diff"] = (ours(ids[:, :64]) - ref(ids[:, :64]).logits).abs().max().item()
    r = measure({"ours_fp32": Ours(ours), "hf_fp32": HF(ref)}, ids, args.decode_steps, args.repeats)
    res.update(r)
    res["ratio_prefill"] = r["ours_fp32"]["prefill_tok_s"] / r["hf_fp32"]["prefill_tok_s"]
    res["ratio_decode"] = r["ours_fp32"]["decode_tok_s"] / r["hf_fp32"]["decode_tok_s"]
    res["decode_vs_bound"] = r["ours_fp32"]["decode_tok_s"] / res["fp32_bound_tok_s"]
    del ref
    if not args.no_lowp:
        from zoo.language.hybrid import quantize_int8_

        ours.to(torch.bfloat16)
        res["bf16_weight_bytes"] = weight_bytes(ours)
        res.update(measure({"ours_bf16": Ours(ours)}, ids, args.decode_steps, args.repeats))
        quantize_int8_(ours)
        res["int8_weight_bytes"] = weight_bytes(ours)
        res.update(measure({"ours_int8": Ours(ours)}, ids, args.decode_steps, args.repeats))
        for k in ("ours_bf16", "ours_int8"):
            res[k]["decode_vs_fp32_bound"] = res[k]["decode_tok_s"] / res["fp32_bound_tok_s"]
    del ours
    if not args.no_rss:
        _rss(args, res)
    res["load_avg_end"] = os.getloadavg()
    _print(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _print(res: dict) -> None:
    g = 1e9
    print(f"LFM2-350M random weights, {res['params']:,} params, torch {res['torch']}, transformers "
          f"{res['transformers']}, {res['threads']} threads, load avg {res['load_avg_start'][0]:.1f}->"
          f"{res['load_avg_end'][0]:.1f}")
    print(f"read bandwidth {res['read_bandwidth_GBs']:.1f} GB/s; fp32 weights {res['fp32_weight_bytes'] / g:.3f} GB "
          f"-> decode bound {res['fp32_bound_tok_s']:.2f} tok/s; max |dlogit| ours vs HF {res['max_abs_logit_diff']:.2e}")
    print(f"{'':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for k in ("ours_fp32", "hf_fp32", "ours_bf16", "ours_int8"):
        if k in res:
            print(f"{k:12s} {res[k]['prefill_tok_s']:14.1f} {res[k]['decode_tok_s']:13.2f}")
    print(f"ours/HF fp32: prefill x{res['ratio_prefill']:.2f}, decode x{res['ratio_decode']:.2f}; "
          f"fp32 decode = {100 * res['decode_vs_bound']:.0f}% of the bandwidth bound")
    for k in ("ours_bf16", "ours_int8"):
        if k in res:
            print(f"{k}: decode = {100 * res[k]['decode_vs_fp32_bound']:.0f}% of the fp32 bound")
    for mode in ("load_pretrained", "create_model"):
        r = res.get(f"rss_{mode}")
        if r:
            print(f"peak RSS ({mode} + generate): {r['peak'] / g:.2f} GB = {r['peak_over_weights_plus_cache']:.2f}x "
                  f"(weights {r['weight_bytes'] / g:.2f} GB + cache {r['cache_bytes'] / 1e6:.1f} MB); "
                  f"{r['peak_minus_imports_over_weights_plus_cache']:.2f}x without the {r['rss_after_imports'] / g:.2f}"
                  f" GB of imports")


if __name__ == "__main__":
    sys.exit(main())
