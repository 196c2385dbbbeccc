"""Run training recipes for real (``zoo fit`` then ``zoo test``) and record their figures as a results file.

One script for every CPU recipe whose outcome MODEL_CARD.md reports: each recipe runs through the same Lightning CLI
as ``zoo fit -c RECIPE`` (its log folder, checkpoints and exports are where ``zoo fit`` puts them), then the test split
is scored with the chosen checkpoint as ``zoo test -c RECIPE --ckpt_path last`` does. One row per recipe goes into a
table written by ``zoo.bench.write_results`` (command, date, machine, versions, the load sampled during the runs),
which ``scripts/make_model_card.py --results-only`` renders into the card.

Columns: Recipe, Model, Params (M), Updates, one per ``--metric``, Wall (min), CPU-min. A metric is
``LABEL=SOURCE`` where SOURCE is a logged metric (``val/acc``: its value at the end of fit; ``test/acc``: from the test
run), a DataModule attribute (``data.image_size``, ``data.unigram_bpb``), a Trainer attribute
(``trainer.current_epoch``), or ``A / B`` of two such sources (a ratio).

    OMP_NUM_THREADS=1 nice python benchmarks/recipe_results.py fastvit/digits fmvit/digits \\
        --results benchmarks/results/digits_recipes.json \\
        --metric "Input px=data.image_size" --metric "Epochs=trainer.current_epoch" \\
        --metric "val acc=val/acc" --metric "test acc=test/acc"
    OMP_NUM_THREADS=1 nice python benchmarks/recipe_results.py lfm2/stdlib_tiny --test-ckpt none \\
        --results benchmarks/results/lfm2_stdlib_tiny.json --metric "val bits/byte=val/bpb" \\
        --metric "unigram bits/byte=data.unigram_bpb" --metric "ratio=val/bpb / data.unigram_bpb"

Arguments after ``--`` go to every recipe's ``zoo fit`` (e.g. ``-- --trainer.max_epochs=1``).
"""
from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from zoo import bench  # noqa: E402


def _number(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 4) if isinstance(v, float) else v


def fit_and_test(recipe: str, overrides: list[str], test_ckpt: str = "last") -> dict[str, Any]:
    """``zoo fit -c RECIPE OVERRIDES`` and, unless ``test_ckpt`` is ``"none"``, the test split scored with that
    checkpoint (``last``, ``best`` or a path). Returns the run's figures and the live trainer / datamodule."""
    from zoo.training import run_lightning_cli

    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cli = run_lightning_cli(["fit", "-c", recipe, *overrides])
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    out = {
        "recipe": recipe, "model": module.hparams.get("model_name", type(module).__name__),
        "params": sum(p.numel() for p in module.parameters()), "updates": trainer.global_step,
        "epochs": trainer.current_epoch, "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1), "log_dir": trainer.log_dir,
        "metrics": {k: _number(v) for k, v in trainer.callback_metrics.items() if not k.startswith("train")},
        "test_ckpt": None,
    }
    if test_ckpt != "none":
        if test_ckpt in ("last", "best"):
            cb = trainer.checkpoint_callbacks
            path = next((c.last_model_path for c in cb if c.last_model_path), None) if test_ckpt == "last" else \
                next((c.best_model_path for c in cb if c.best_model_path), None)
            if not path:
                raise ValueError(f"{recipe}: the run saved no {test_ckpt} checkpoint to test (its ModelCheckpoint "
                                 f"callbacks: {[type(c).__name__ for c in cb]}); pass --test-ckpt none or a path")
        else:
            path = test_ckpt
        tested = trainer.test(module, datamodule=dm, ckpt_path=path, verbose=False)
        out["metrics"].update({k: _number(v) for d in tested for k, v in d.items()})
        out["test_ckpt"] = str(path)
    return {**out, "_trainer": trainer, "_data": dm}


def resolve(source: str, run: dict[str, Any]) -> Any:
    """The value of one ``--metric`` SOURCE for a finished run (see the module docstring)."""
    if " / " in source:
        a, b = (resolve(s.strip(), run) for s in source.split(" / ", 1))
        return round(a / b, 3) if b else None  # rendered "-"
    for prefix, obj in (("data.", run["_data"]), ("trainer.", run["_trainer"])):
        if source.startswith(prefix):
            value = getattr(obj, source[len(prefix):], None)
            if value is None:
                raise ValueError(f"{run['recipe']}: {type(obj).__name__} has no attribute {source[len(prefix):]!r}")
            run["metrics"][source] = _number(value)
            return _number(value)
    if source not in run["metrics"]:
        raise ValueError(f"{run['recipe']}: no metric {source!r} was logged (logged: {sorted(run['metrics'])})")
    return run["metrics"][source]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "benchmarks/recipe_results.py", *argv])
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("recipes", nargs="+", help="packaged recipe names or YAML files")
    p.add_argument("--results", required=True, help="results file to write (e.g. benchmarks/results/X.json)")
    p.add_argument("--table", default="results", help="table name in the results file (default %(default)s)")
    p.add_argument("--metric", action="append", default=[], metavar="LABEL=SOURCE", help="a column (repeatable)")
    p.add_argument("--test-ckpt", default="last", help="last | best | none | a .ckpt path (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--notes", default="", help="a sentence kept in the results file")
    args = p.parse_args(argv)
    metrics = []
    for m in args.metric:
        label, sep, source = m.partition("=")
        if not sep or not label.strip() or not source.strip():
            p.error(f"--metric {m!r}: expected LABEL=SOURCE, e.g. 'test acc=test/acc'")
        metrics.append((label.strip(), source.strip()))

    import torch

    torch.set_num_threads(args.threads)
    runs, rows = [], []
    with bench.LoadSampler() as load:
        for recipe in args.recipes:
            print(f"[recipe_results] zoo fit -c {recipe} {' '.join(overrides)}", file=sys.stderr, flush=True)
            run = fit_and_test(recipe, overrides, args.test_ckpt)
            rows.append([recipe, run["model"], round(run["params"] / 1e6, 3), run["updates"],
                         *(resolve(src, run) for _, src in metrics), round(run["wall_s"] / 60, 1),
                         round(run["cpu_s"] / 60, 1)])
            runs.append({k: v for k, v in run.items() if not k.startswith("_")})
            print(f"[recipe_results] {recipe}: {dict(zip([lab for lab, _ in metrics], rows[-1][4:-2]))}",
                  file=sys.stderr, flush=True)
    table = {"columns": ["Recipe", "Model", "Params (M)", "Updates", *(lab for lab, _ in metrics), "Wall (min)",
                         "CPU-min"], "rows": rows}
    settings = {"threads": args.threads, "test_ckpt": args.test_ckpt, "overrides": overrides,
                "metrics": dict(metrics)}
    path = bench.write_results(args.results, {args.table: table}, command=command, settings=settings,
                               load=load.summary(), notes=args.notes, data={"runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
