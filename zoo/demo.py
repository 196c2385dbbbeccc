"""The main job (``make demo``): train the quickstart recipe, test it, deploy, export, benchmark, summarize.

    python -m zoo.demo [--full-size] [--results FILE]

Everything lands in this run's own folder, runs/quickstart/version_N/ (the recipe's default_root_dir, one
version per run): earlier runs are kept, never overwritten. ``results.json`` there holds the accuracy, the latency
rows and where the time went (imports, first training step, training, end-of-fit export, test, bench), written by
``zoo.bench.write_results``; ``--results FILE`` writes the same file elsewhere too (the MODEL_CARD's demo table is
generated from benchmarks/results/quickstart_demo.json).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

try:  # a Lightning callback when Lightning is installed; `import zoo.demo` itself stays light
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover - the train extra is missing; main() reports it through run_lightning_cli
    _Callback = object


class StageTimer(_Callback):
    """Wall-clock marks of a fit: start, first optimizer step done, training done, fit done (after DeployExport)."""

    marks: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        StageTimer.marks = {"fit_start": time.perf_counter()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        StageTimer.marks.setdefault("first_step", time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        StageTimer.marks["train_end"] = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        StageTimer.marks["fit_end"] = time.perf_counter()


def _log_dir(cli) -> Path:
    return Path(cli.trainer.log_dir)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(prog="python -m zoo.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--full-size", action="store_true", help="also bench the published nextvit_small at 224 (slow)")
    ap.add_argument("--results", default=None, help="also write the run's results.json here")
    args = ap.parse_args(argv)

    import torch

    from zoo.bench import format_table, measure, plot_pareto, write_csv, write_results
    from zoo.training import DeployExport, run_lightning_cli

    stamp = lambda: f"[{time.perf_counter() - t0:5.0f} s]"  # noqa: E731
    times = {"imports_s": time.perf_counter() - t0}
    print(stamp(), "== 1/4 training recipes/quickstart.yaml (Next-ViT sized for a CPU, digits 32x32)")
    t = time.perf_counter()
    import zoo.demo as this  # under `python -m` this file is __main__; the callback is imported by its real name

    cli = run_lightning_cli(["fit", "-c", "quickstart", "--trainer.callbacks+=zoo.demo.StageTimer"])
    m = this.StageTimer.marks
    times.update({
        "setup_s": m["fit_start"] - t,  # parsing the recipe, building model, data and trainer
        "first_step_s": m.get("first_step", m["train_end"]) - m["fit_start"],  # incl. sanity validation
        "training_s": m["train_end"] - m["fit_start"],
        "deploy_export_s": m["fit_end"] - m["train_end"],  # deploy weights + parity-checked ONNX (DeployExport)
    })
    t_train = time.perf_counter() - t0
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    out = _log_dir(cli)  # runs/quickstart/version_N

    print(stamp(), "== 2/4 testing the best checkpoint")
    t = time.perf_counter()
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")[0]
    acc = results["test/acc"]
    times["test_s"] = time.perf_counter() - t

    deploy_cb = next(c for c in cli.trainer.callbacks if isinstance(c, DeployExport))
    print(stamp(), "== 3/4 deploy weights and ONNX (parity-checked against eager):", deploy_cb.paths)

    print(stamp(), "== 4/4 latency: the trained model, eager vs deploy vs onnxruntime (batch 1, 32x32)")
    t = time.perf_counter()
    net = cli.model.model.cpu().eval()
    x = torch.randn(1, 3, 32, 32)
    rows = []
    for rt in ("eager", "deploy", "onnxruntime"):
        # onnxruntime times the file DeployExport wrote and checked (no second export)
        r = measure(net, x, rt, warmup=10, iters=50, threads=2, onnx_path=deploy_cb.paths.get("onnx"))
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
    times["bench_s"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    times["total_s"] = total
    tables = {
        "accuracy": {"columns": ["Recipe", "Test images", "Test top-1 %", "Params (M)"],
                     "rows": [["quickstart", len(cli.datamodule._splits["test"]), round(100 * acc, 2),
                               rows[0]["params_m"]]]},
        "latency": {"columns": ["Runtime", "Median ms", "p90 ms", "Threads"],
                    "rows": [[r["runtime"], r["median_ms"], r["p90_ms"], r["threads"]] for r in rows]},
        "time": {"columns": ["Stage", "Wall s"], "rows": [[k[:-2], round(v, 1)] for k, v in times.items()]},
    }
    settings = {"recipe": "quickstart", "max_epochs": cli.trainer.max_epochs, "global_step": cli.trainer.global_step}
    res_path = write_results(out / "results.json", tables, command="python -m zoo.demo", settings=settings)
    if args.results:
        write_results(args.results, tables, command="python -m zoo.demo", settings=settings)
    print()
    print(f"test accuracy (digits, {len(cli.datamodule._splits['test'])} images): {100 * acc:.2f}%")
    print("time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items()))
    print(f"training time: {t_train:.0f} s; whole demo: {total:.0f} s")
    print(f"checkpoint:    {ckpt}")
    print(f"deploy:        {deploy_cb.paths.get('deploy')}")
    print(f"onnx:          {deploy_cb.paths.get('onnx')}")
    print(f"metrics:       {_log_dir(cli) / 'metrics.csv'}")
    print(f"bench:         {csv_path}")
    print(f"plot:          {plot_path}")
    print(f"results:       {res_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
