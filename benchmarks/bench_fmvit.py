"""FMViT (reconstruction) against the abstract's baselines and against Next-ViT-S / FastViT, in one process on this CPU.

Every model runs as ONNX under onnxruntime (CPU provider), exported from its inference form: ours after
``zoo.deploy.reparameterize`` (no BatchNorm, no parallel branches), timm's MobileOne after
``timm.utils.reparameterize_model``, ResNet-101 / EfficientNet-B5 as they are. Each model is exported once with a
dynamic batch (``zoo.deploy.export``, parity-checked against eager) and timed at batch 1 and 8 at 224 px. Weights are
random (the ops and shapes, hence latency, do not depend on them).

Timings are interleaved (every round times each model for a few calls in turn) so load from other processes hits all
models alike; median and p90 are over all timed calls.

Pairs (the paper's framing; the paper measured TensorRT on a GPU and CoreML on an iPhone, we measure a CPU):
    fmvit_large / resnet101        abstract: "similar inference latency", 83.3 vs 80.8 % top-1
    fmvit_large / efficientnet_b5  abstract: "43% improvement in inference speed", comparable accuracy
    fmvit_small / mobileone_s1     abstract: "inference latency comparable to MobileOne", 78.5 vs 75.9 %
    every FMViT / nextvit_small, and the FastViT variant whose latency is closest (equal-latency accuracy)

    python benchmarks/bench_fmvit.py --json artifacts/bench_fmvit.json --plot artifacts/fmvit_pareto.png --markdown
"""
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
from zoo.deploy import export, reparameterize  # noqa: E402

FMVIT = ["fmvit_tiny", "fmvit_small", "fmvit_medium", "fmvit_base", "fmvit_large"]
ZOO_REFS = ["nextvit_small", "fastvit_t8", "fastvit_t12", "fastvit_sa12", "fastvit_sa24", "fastvit_sa36"]
# timm baselines named in the FMViT abstract, with the top-1 the abstract quotes for them (ResNet-101 80.8,
# MobileOne 75.9) or EfficientNet-B5's published 83.6 (at its native 456 px; the abstract gives no number).
TIMM_REFS = {"resnet101": 80.8, "efficientnet_b5": 83.6, "mobileone_s1": 75.9}
PAIRS = [("fmvit_large", "resnet101"), ("fmvit_large", "efficientnet_b5"), ("fmvit_small", "mobileone_s1")]


def build(name: str):
    """(inference-form model, top-1 or None, source of the top-1)."""
    if name in TIMM_REFS:
        import timm
        from timm.utils import reparameterize_model

        return reparameterize_model(timm.create_model(name).eval()), TIMM_REFS[name], "abstract/published"
    m = zoo.create_model(name).eval()
    top1 = bench.published_top1(name)
    return reparameterize(m), top1, ("reported (no weights)" if bench.reported_only(name) else "published")


def sessions(names, image_size: int, threads: int, workdir: Path) -> tuple[dict, dict]:
    import onnxruntime as ort

    runs, info = {}, {}
    for name in names:
        print(f"[{name}] building and exporting ONNX ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        model, top1, src = build(name)
        x = torch.randn(1, 3, image_size, image_size)
        path = export(model, workdir / f"{name}.onnx", "onnx", example_input=x, reparameterize=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        runs[name] = (sess, sess.get_inputs()[0].name)
        with torch.device("meta"):
            gmacs = bench.count_gmacs(model.to("meta"), torch.empty(1, 3, image_size, image_size))
        info[name] = dict(params_m=round(bench.count_params(model) / 1e6, 3), gmacs=round(gmacs, 3), top1=top1,
                          top1_source=src)
        del model
    return runs, info


def time_interleaved(runs: dict, x: torch.Tensor, warmup: int, rounds: int, per_round: int) -> dict:
    feed = x.numpy()
    times = bench.time_interleaved({k: functools.partial(sess.run, None, {inp: feed}) for k, (sess, inp) in runs.items()},
                                   warmup, rounds, per_round)
    return {k: bench.summarize(v, x.shape[0]) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=FMVIT + ZOO_REFS + list(TIMM_REFS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each times every model)")
    p.add_argument("--per-round", type=int, default=4, help="timed calls per model per round at batch 1")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--plot", default=None, help="Pareto plot (batch 1) of latency vs top-1; FMViT points hollow")
    p.add_argument("--markdown", action="store_true", help="also print markdown tables (for MODEL_CARD.md)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs, info = sessions(args.models, args.image_size, args.threads, Path(tmp))
        for bs in args.batch_sizes:
            torch.manual_seed(1)
            x = torch.randn(bs, 3, args.image_size, args.image_size)
            per_round = max(1, args.per_round // bs)
            print(f"[batch {bs}] timing {args.rounds} x {per_round} calls per model ...", file=sys.stderr, flush=True)
            for name, s in time_interleaved(runs, x, args.warmup, args.rounds, per_round).items():
                results.append({"model": name, "batch_size": bs, "image_size": args.image_size,
                                "threads": args.threads, **info[name], **s})

    env = bench.environment()
    print(f"\nonnxruntime CPU at {args.image_size}x{args.image_size}, {args.threads} threads, torch {torch.__version__}, "
          f"{env['processor']} ({env['cpu_count']} cores)")
    print(f"{'model':<16} {'batch':>5} {'params M':>9} {'GMACs':>7} {'median ms':>10} {'p90 ms':>8} {'img/s':>8}  top-1")
    for r in results:
        print(f"{r['model']:<16} {r['batch_size']:>5} {r['params_m']:>9.2f} {r['gmacs']:>7.2f} {r['median_ms']:>10.2f} "
              f"{r['p90_ms']:>8.2f} {r['throughput']:>8.1f}  {r['top1'] if r['top1'] is not None else '-'} "
              f"({r['top1_source']})")

    def med(name, bs):
        return next(r["median_ms"] for r in results if r["model"] == name and r["batch_size"] == bs)

    ratios = []
    print("\nlatency ratios (median; < 1 = the FMViT model is faster)")
    have = set(args.models)
    pairs = [pr for pr in PAIRS if set(pr) <= have]
    pairs += [(f, "nextvit_small") for f in FMVIT if {f, "nextvit_small"} <= have]
    for bs in args.batch_sizes:
        for a, b in pairs:
            ratios.append({"batch_size": bs, "fmvit": a, "reference": b, "ratio": med(a, bs) / med(b, bs)})
            print(f"  batch {bs}: {a:<13} / {b:<16} = {med(a, bs) / med(b, bs):.3f}")
    fastvits = [n for n in args.models if n.startswith("fastvit_")]
    equal = []
    if fastvits:
        print("\nequal latency: the FastViT variant with the closest median latency to each FMViT size")
        for bs in args.batch_sizes:
            for f in (n for n in FMVIT if n in have):
                near = min(fastvits, key=lambda n: abs(med(n, bs) / med(f, bs) - 1))
                row = {"batch_size": bs, "fmvit": f, "fastvit": near, "ratio": med(f, bs) / med(near, bs),
                       "fmvit_top1_reported": info[f]["top1"], "fastvit_top1_published": info[near]["top1"]}
                equal.append(row)
                print(f"  batch {bs}: {f:<13} vs {near:<13} latency ratio {row['ratio']:.2f}, top-1 "
                      f"{row['fmvit_top1_reported']} (reported) vs {row['fastvit_top1_published']} (published, 256 px)")
    if args.markdown:
        bss = args.batch_sizes
        print("\n| model | params (M) | GMACs | " + " | ".join(f"batch {b} median ms (p90)" for b in bss) + " | top-1 |")
        print("|---|---|---|" + "---|" * len(bss) + "---|")
        for name in args.models:
            rs = {r["batch_size"]: r for r in results if r["model"] == name}
            cells = [f"{rs[b]['median_ms']:.1f} ({rs[b]['p90_ms']:.1f})" for b in bss]
            r0 = rs[bss[0]]
            print(f"| {name} | {r0['params_m']:.2f} | {r0['gmacs']:.2f} | " + " | ".join(cells)
                  + f" | {r0['top1'] if r0['top1'] is not None else '-'} ({r0['top1_source']}) |")
        print("\n| ratio | " + " | ".join(f"batch {b}" for b in bss) + " |")
        print("|---|" + "---|" * len(bss))
        for a, b in pairs:
            cells = [f"{next(x['ratio'] for x in ratios if x['batch_size'] == bs and x['fmvit'] == a and x['reference'] == b):.2f}"
                     for bs in bss]
            print(f"| {a} / {b} | " + " | ".join(cells) + " |")
    if args.plot:
        rows = [{"model": r["model"], "runtime": "onnxruntime", "median_ms": r["median_ms"], "top1": r["top1"],
                 "batch_size": r["batch_size"], "threads": r["threads"]} for r in results
                if r["batch_size"] == args.batch_sizes[0]]
        print(f"wrote {bench.plot_pareto(rows, args.plot, title='FMViT (hollow: reported top-1, no weights) vs baselines')}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, "settings": vars(args), "results": results,
                                    "ratios": ratios, "equal_latency": equal}, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
