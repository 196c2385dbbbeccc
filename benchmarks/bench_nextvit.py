"""Next-ViT: our implementation against timm's ``nextvit_*``, same process, same weights, CPU.

Variants (one set of random weights with randomized BatchNorm statistics, loaded into both implementations):
    ours eager        zoo.create_model(name)                      training form, eval mode
    ours deploy       zoo.deploy.reparameterize(ours)             BatchNorms folded
    ours onnxruntime  ours deploy exported to ONNX (dynamo), onnxruntime CPU provider
    timm eager        timm.create_model(name)
    timm reparam      timm.utils.reparameterize_model(timm model)

Timings are interleaved: every round times each variant for a few calls in turn, so load from other processes on a
shared machine hits all variants alike; the median and p90 are over all timed calls. Ratios are ours / timm
(< 1 means ours is faster).

    python benchmarks/bench_nextvit.py                       # nextvit_small, batch 1 and 8 at 224, 2 threads
    python benchmarks/bench_nextvit.py --json artifacts/bench_nextvit.json --markdown
    nice python benchmarks/bench_nextvit.py --threads 1 2 --results benchmarks/results/nextvit_latency.json

``--results`` writes the MODEL_CARD tables (one per thread count, ``threadsN``) through ``zoo.bench.write_results``,
with the command, date, machine, versions and the load average sampled during the timing.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo import bench  # noqa: E402
from zoo.checkpoints import load_weights  # noqa: E402
from zoo.deploy import export, reparameterize  # noqa: E402


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + torch.randn(n, generator=g) * 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


TINY = dict(depths=(1, 1, 5, 1))  # --tiny: the shallowest depths timm's Next-ViT builds (stage 3 in blocks of 5)


def build_variants(name: str, x: torch.Tensor, workdir: Path, **kw) -> tuple[dict, dict]:
    """The five callables, and the max |difference| of each against timm eager on ``x``; ``kw``: architecture
    overrides given to both implementations."""
    import onnxruntime as ort
    import timm
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    ref = timm.create_model(name, **kw).eval()
    randomize_batchnorms(ref)
    ours = zoo.create_model(name, **kw).eval()
    load_weights(ours, ref.state_dict())  # timm's layout is ours: a strict load, no conversion
    ours_deploy = reparameterize(ours)
    ref_reparam = reparameterize_model(ref)
    onnx_path = export(ours_deploy, workdir / f"{name}.onnx", "onnx", example_input=x, reparameterize=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name

    def onnx_run(t):
        return torch.from_numpy(sess.run(None, {in_name: t.numpy()})[0])

    variants = {
        "ours eager": ours, "ours deploy": ours_deploy, "ours onnxruntime": onnx_run,
        "timm eager": ref, "timm reparam": ref_reparam,
    }
    with torch.inference_mode():
        expected = ref(x)
        diffs = {k: (fn(x) - expected).abs().max().item() for k, fn in variants.items()}
    return variants, diffs


def time_interleaved(variants: dict, x: torch.Tensor, warmup: int, rounds: int, per_round: int) -> dict:
    with torch.inference_mode():
        times = bench.time_interleaved({k: functools.partial(fn, x) for k, fn in variants.items()}, warmup, rounds,
                                       per_round)
    return {k: bench.summarize(v, x.shape[0]) for k, v in times.items()}


RATIOS = (("ours eager", "timm eager"), ("ours deploy", "timm reparam"), ("ours onnxruntime", "timm reparam"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="nextvit_small")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="intra-op thread counts, timed one after the other")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (each times every variant)")
    p.add_argument("--per-round", type=int, default=5, help="timed calls per variant per round (batch 1)")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table (for MODEL_CARD.md)")
    p.add_argument("--results", default=None,
                   help="write the MODEL_CARD tables here (zoo.bench.write_results), e.g. "
                        "benchmarks/results/nextvit_latency.json")
    p.add_argument("--tiny", action="store_true", help="smoke run: depths (1, 1, 5, 1) (figures meaningless)")
    args = p.parse_args(argv)

    prev_threads = torch.get_num_threads()
    results = []
    with bench.LoadSampler() as load, tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bs in args.batch_sizes:
                torch.manual_seed(1)
                x = torch.randn(bs, 3, args.image_size, args.image_size)
                print(f"[{args.model} batch {bs}, {threads} threads] building, loading the same weights into both, "
                      "exporting ONNX ...", file=sys.stderr, flush=True)
                variants, diffs = build_variants(args.model, x, Path(tmp), **(TINY if args.tiny else {}))
                per_round = max(1, args.per_round // bs) if bs > 1 else args.per_round
                print(f"[{args.model} batch {bs}, {threads} threads] timing {args.rounds} x {per_round} calls per "
                      "variant ...", file=sys.stderr, flush=True)
                stats = time_interleaved(variants, x, args.warmup, args.rounds, per_round)
                for k, s in stats.items():
                    results.append({"model": args.model, "variant": k, "batch_size": bs, "image_size": args.image_size,
                                    "threads": threads, "max_abs_diff_vs_timm": diffs[k], **s})
                del variants
    torch.set_num_threads(prev_threads)

    print(f"\n{args.model} at {args.image_size}x{args.image_size}, torch {torch.__version__}, "
          f"CPU ({bench.environment()['processor']}, {bench.environment()['cpu_count']} cores)")
    print(f"{'variant':<18} {'threads':>7} {'batch':>5} {'median ms':>10} {'p90 ms':>8} {'img/s':>8} "
          f"{'max|d| vs timm':>15}")
    for r in results:
        print(f"{r['variant']:<18} {r['threads']:>7} {r['batch_size']:>5} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
              f"{r['throughput']:>8.1f} {r['max_abs_diff_vs_timm']:>15.2e}")
    print("\nratios ours / timm (median latency; < 1 = ours faster)")
    ratios = []
    for threads in args.threads:
        for bs in args.batch_sizes:
            row = {r["variant"]: r["median_ms"] for r in results if r["batch_size"] == bs and r["threads"] == threads}
            for a, b in RATIOS:
                ratios.append({"threads": threads, "batch_size": bs, "ours": a, "timm": b, "ratio": row[a] / row[b]})
                print(f"  {threads} threads, batch {bs}: {a:<17} / {b:<13} = {row[a] / row[b]:.3f}")
    tables = {f"threads{t}": card_table(results, ratios, t, args.batch_sizes) for t in args.threads}
    if args.markdown:
        for name, t in tables.items():
            print(f"\n{name}\n| " + " | ".join(t["columns"]) + " |\n|" + "---|" * len(t["columns"]))
            for row in t["rows"]:
                print("| " + " | ".join(str(c) for c in row) + " |")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": bench.environment(), "settings": vars(args), "results": results,
                                    "ratios": ratios}, indent=2))
        print(f"wrote {path}")
    if args.results:
        path = bench.write_results(
            args.results, tables, settings={k: v for k, v in vars(args).items() if k not in ("json", "results")},
            load=load.summary(), data={"results": results, "ratios": ratios},
            notes=f"{args.model} at {args.image_size}, interleaved timing; cells: median ms (p90) over all timed "
                  "calls; ratio rows: ours / timm median (< 1: ours faster)")
        print(f"wrote {path}")
    return 0


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def card_table(results: list[dict], ratios: list[dict], threads: int, batch_sizes: list[int]) -> dict:
    """One MODEL_CARD table: a row per variant (cells 'median (p90)' ms per batch size), then the ratio rows."""
    rows = []
    for v in dict.fromkeys(r["variant"] for r in results):
        rows.append([v, *(next(f"{_ms(r['median_ms'])} ({_ms(r['p90_ms'])})" for r in results
                               if r["variant"] == v and r["batch_size"] == bs and r["threads"] == threads)
                          for bs in batch_sizes)])
    for a, b in RATIOS:
        rows.append([f"ratio {a} / {b}", *(next(f"{x['ratio']:.2f}" for x in ratios if x["threads"] == threads
                                                and x["batch_size"] == bs and x["ours"] == a) for bs in batch_sizes)])
    return {"columns": ["variant", *(f"batch {bs}" for bs in batch_sizes)], "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
