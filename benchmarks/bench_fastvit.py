"""FastViT / MCi: training form vs our deploy form vs timm's reparameterized model vs onnxruntime, one process, CPU.

For each model, one set of random weights (randomized BatchNorm statistics and layer scales) is loaded into timm's
``fastvit_*`` and into ours; then these callables run on the same input:

    ours train         zoo.create_model(name), eval mode: the multi-branch training form
    ours deploy        zoo.deploy.reparameterize(ours): Apple's / timm's inference form (same keys and param count)
    ours deploy+folds  the same with extra_folds=True (ConvFFN BN, attention BN and layer scales folded too)
    ours onnxruntime   ours deploy exported to ONNX (dynamo exporter, parity-checked), onnxruntime CPU provider
    timm reparam       timm.utils.reparameterize_model(timm model)

Timings are interleaved (each round times every callable a few calls in turn), so load from other processes on a
shared machine hits all of them alike; median and p90 are over all timed calls. Ratios are against ``timm reparam``
(< 1: faster than timm's inference form). Target: ``ours deploy / timm reparam <= 1``.

    python benchmarks/bench_fastvit.py                     # fastvit_mci0 and fastvit_sa12, batch 1, 256 px, 1 thread
    python benchmarks/bench_fastvit.py --batch-sizes 1 8 --json artifacts/bench_fastvit.json --markdown
    nice python benchmarks/bench_fastvit.py --batch-sizes 1 8 --results benchmarks/results/fastvit_latency.json

``--results`` writes the MODEL_CARD tables (``median``: ms per callable, ``ratios``) through
``zoo.bench.write_results``, with the command, date, machine, versions and the load sampled during the timing.
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

RATIOS = (
    ("ours deploy", "timm reparam"),
    ("ours deploy+folds", "timm reparam"),
    ("ours onnxruntime", "timm reparam"),
    ("ours deploy", "ours train"),
)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and layer scales, so every fold is exercised (and checked below)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + torch.randn(n, generator=g) * 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)


def tiny_args(name: str) -> dict:
    """``--tiny``: one block per stage, narrow widths, every structural flag of the variant kept (a smoke run)."""
    n = 5 if name in ("fastvit_mci3", "fastvit_mci4") else 4
    return dict(layers=(1,) * n, embed_dims=(16, 32, 64, 128, 256)[:n])


def build_variants(name: str, x: torch.Tensor, workdir: Path, **kw) -> tuple[dict, dict]:
    """The callables, and each one's max |difference| from timm's reparameterized model on ``x``; ``kw``: the
    architecture overrides given to both implementations."""
    import onnxruntime as ort
    import timm
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    ours = zoo.create_model(name, **kw).eval()
    ref = timm.create_model(name, num_classes=ours.num_classes, **kw).eval()
    randomize(ref)
    load_weights(ours, ref.state_dict())  # timm's layout is ours
    folds = zoo.create_model(name, extra_folds=True, **kw).eval()
    load_weights(folds, ref.state_dict())
    ours_deploy = reparameterize(ours)
    folds_deploy = reparameterize(folds)
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
        "ours train": ours, "ours deploy": ours_deploy, "ours deploy+folds": folds_deploy,
        "ours onnxruntime": onnx_run, "timm reparam": ref_reparam,
    }
    with torch.inference_mode():
        expected = ref_reparam(x)
        diffs = {k: (fn(x) - expected).abs().max().item() for k, fn in variants.items()}
    return variants, diffs


def time_interleaved(variants: dict, x: torch.Tensor, warmup: int, rounds: int, per_round: int) -> dict:
    with torch.inference_mode():
        times = bench.time_interleaved({k: functools.partial(fn, x) for k, fn in variants.items()}, warmup, rounds,
                                       per_round)
    return {k: bench.summarize(v, x.shape[0]) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["fastvit_mci0", "fastvit_sa12"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1 by default: on a shared machine multi-thread eager timings measure OpenMP "
                        "barrier stalls more than compute)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (each times every variant)")
    p.add_argument("--per-round", type=int, default=5, help="timed calls per variant per round (batch 1)")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table (for MODEL_CARD.md)")
    p.add_argument("--results", default=None,
                   help="write the MODEL_CARD tables here (zoo.bench.write_results), e.g. "
                        "benchmarks/results/fastvit_latency.json")
    p.add_argument("--tiny", action="store_true", help="smoke run: 1 block per stage, narrow widths (figures meaningless)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    results, ratios = [], []
    with bench.LoadSampler() as load, tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for bs in args.batch_sizes:
                torch.manual_seed(1)
                x = torch.randn(bs, 3, args.image_size, args.image_size)
                print(f"[{name} batch {bs}] building, loading the same weights, exporting ONNX ...", file=sys.stderr,
                      flush=True)
                variants, diffs = build_variants(name, x, Path(tmp), **(tiny_args(name) if args.tiny else {}))
                per_round = max(1, args.per_round // bs)
                print(f"[{name} batch {bs}] timing {args.rounds} x {per_round} calls per variant ...", file=sys.stderr,
                      flush=True)
                stats = time_interleaved(variants, x, args.warmup, args.rounds, per_round)
                for k, s in stats.items():
                    results.append({"model": name, "variant": k, "batch_size": bs, "image_size": args.image_size,
                                    "threads": args.threads, "max_abs_diff_vs_timm_reparam": diffs[k], **s})
                for a, b in RATIOS:
                    ratios.append({"model": name, "batch_size": bs, "variant": a, "baseline": b,
                                   "ratio": stats[a]["median_ms"] / stats[b]["median_ms"]})
                del variants

    env = bench.environment()
    print(f"\n{args.image_size}x{args.image_size}, {args.threads} threads, torch {torch.__version__}, "
          f"CPU ({env['processor']}, {env['cpu_count']} cores)")
    print(f"{'model':<14} {'variant':<18} {'batch':>5} {'median ms':>10} {'p90 ms':>8} {'img/s':>8} {'max|d| vs timm':>15}")
    for r in results:
        print(f"{r['model']:<14} {r['variant']:<18} {r['batch_size']:>5} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
              f"{r['throughput']:>8.1f} {r['max_abs_diff_vs_timm_reparam']:>15.2e}")
    print("\nratios of median latency (< 1: the first is faster)")
    for r in ratios:
        print(f"  {r['model']:<14} batch {r['batch_size']}: {r['variant']:<17} / {r['baseline']:<12} = {r['ratio']:.3f}")
    if args.markdown:
        print("\n| model | batch | " + " | ".join(dict.fromkeys(r["variant"] for r in results)) + " |")
        print("|---|---|" + "---|" * len(dict.fromkeys(r["variant"] for r in results)))
        for name in args.models:
            for bs in args.batch_sizes:
                cells = [f"{r['median_ms']:.1f} ({r['p90_ms']:.1f})" for r in results
                         if r["model"] == name and r["batch_size"] == bs]
                print(f"| {name} | {bs} | " + " | ".join(cells) + " |")
        print("\n| model | batch | " + " | ".join(f"{a} / {b}" for a, b in RATIOS) + " |")
        print("|---|---|" + "---|" * len(RATIOS))
        for name in args.models:
            for bs in args.batch_sizes:
                cells = [f"{r['ratio']:.2f}" for r in ratios if r["model"] == name and r["batch_size"] == bs]
                print(f"| {name} | {bs} | " + " | ".join(cells) + " |")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, "settings": vars(args), "results": results, "ratios": ratios},
                                   indent=2))
        print(f"wrote {path}")
    if args.results:
        variants = list(dict.fromkeys(r["variant"] for r in results))
        median = {"columns": ["model", "batch", *variants], "rows": [
            [name, bs, *(f"{r['median_ms']:.1f} ({r['p90_ms']:.1f})" for r in results
                         if r["model"] == name and r["batch_size"] == bs)]
            for name in args.models for bs in args.batch_sizes]}
        ratio_table = {"columns": ["model", "batch", *(f"{a} / {b}" for a, b in RATIOS)], "rows": [
            [name, bs, *(f"{r['ratio']:.2f}" for r in ratios if r["model"] == name and r["batch_size"] == bs)]
            for name in args.models for bs in args.batch_sizes]}
        path = bench.write_results(
            args.results, {"median": median, "ratios": ratio_table},
            settings={k: v for k, v in vars(args).items() if k not in ("json", "results")}, load=load.summary(),
            data={"results": results, "ratios": ratios},
            notes=f"{args.image_size} px, {args.threads} thread(s), interleaved timing; cells: median ms (p90) over "
                  "all timed calls; ratios of medians (< 1: the first is faster)")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
