"""The main job (``make demo``): train the quickstart recipe, test it, deploy, export, benchmark, summarize.

    python -m zoo.demo [--full-size]

Everything lands in this run's own folder, runs/quickstart/version_N/ (the recipe's default_root_dir, one
version per run): earlier runs are kept, never overwritten.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def _log_dir(cli) -> Path:
    return Path(cli.trainer.log_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--full-size", action="store_true", help="also bench the published nextvit_small at 224 (slow)")
    args = ap.parse_args(argv)

    from zoo.bench import format_table, measure, plot_pareto, write_csv
    from zoo.training import DeployExport, run_lightning_cli

    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:5.0f} s]"  # noqa: E731
    print("== 1/4 training recipes/quickstart.yaml (Next-ViT sized for a CPU, digits 32x32)")
    cli = run_lightning_cli(["fit", "-c", "quickstart"])
    t_train = time.perf_counter() - t0
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    out = _log_dir(cli)  # runs/quickstart/version_N

    print(stamp(), "== 2/4 testing the best checkpoint")
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")[0]
    acc = results["test/acc"]

    deploy_cb = next(c for c in cli.trainer.callbacks if isinstance(c, DeployExport))
    print(stamp(), "== 3/4 deploy weights and ONNX (parity-checked against eager):", deploy_cb.paths)

    print(stamp(), "== 4/4 latency: the trained model, eager vs deploy vs onnxruntime (batch 1, 32x32)")
    net = cli.model.model.cpu().eval()
    x = torch.randn(1, 3, 32, 32)
    rows = []
    for rt in ("eager", "deploy", "onnxruntime"):
        r = measure(net, x, rt, warmup=10, iters=50, threads=2)
        rows.append({"model": "quickstart (nextvit, digits)", "runtime": rt, "batch_size": 1, "input_size": "3x32x32",
                     "threads": r["threads"],
                     "params_m": round(r["params"] / 1e6, 3), "top1": round(100 * acc, 2),
                     **{k: round(r[k], 3) for k in ("median_ms", "p90_ms", "throughput")}})
    if args.full_size:
        from zoo.bench import bench_models

        full = bench_models(["nextvit_small"], runtimes=("eager", "deploy", "onnxruntime"), threads=2, warmup=3,
                            iters=10, progress=False)
        rows += full
    print(format_table(rows))
    csv_path = write_csv(rows, out / "bench.csv")
    plot_path = plot_pareto([r for r in rows if r.get("top1") is not None], out / "pareto.png",
                            title="quickstart: test accuracy vs CPU latency")
    total = time.perf_counter() - t0
    print()
    print(f"test accuracy (digits, {len(cli.datamodule._splits['test'])} images): {100 * acc:.2f}%")
    print(f"training time: {t_train:.0f} s; whole demo: {total:.0f} s")
    print(f"checkpoint:    {ckpt}")
    print(f"deploy:        {deploy_cb.paths.get('deploy')}")
    print(f"onnx:          {deploy_cb.paths.get('onnx')}")
    print(f"metrics:       {_log_dir(cli) / 'metrics.csv'}")
    print(f"bench:         {csv_path}")
    print(f"plot:          {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
