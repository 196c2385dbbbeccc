"""MobileCLIP's reinforced-training ablation on the embedded digits, end to end, with the three digits recipes:

1. the teacher (``recipes/mobileclip/digits_teacher.yaml``, a larger zoo CLIP, plain CLIP loss), then its zero-shot
   test accuracy;
2. the reinforce step (``python -m zoo.data.clip_data``: stored crops, synthetic captions, teacher embeddings);
3. per seed, the same student with λ = 1 (``digits_student_reinforced.yaml``) and λ = 0 (``digits_student_plain.yaml``)
   at equal steps, trained side by side, then zero-shot test top-1 / top-5 and retrieval R@1 of each.

Writes ``benchmarks/results/mobileclip_ablation.json`` (``zoo.bench.write_results``), from which MODEL_CARD.md's table
is generated (``python scripts/make_model_card.py --results-only``). Minutes per run on a quiet 2-core machine; every
run's outputs stay under ``--workdir``.

    python benchmarks/mobileclip_ablation.py --workdir /tmp/mobileclip_ablation --seeds 0 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "mobileclip"
ZOO = [sys.executable, "-m", "zoo.cli"]


def _model_args(recipe: Path) -> dict:
    import yaml

    return yaml.safe_load(recipe.read_text())["model"]["init_args"]["model_args"]


def _last_ckpt(run: Path) -> Path:
    found = sorted(run.rglob("last.ckpt"), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no last.ckpt under {run}: the fit did not finish")
    return found[-1]


def _test_metrics(run: Path) -> dict[str, float]:
    """The test metrics `zoo test` logged (CSVLogger) under ``run``."""
    out: dict[str, float] = {}
    for f in sorted(run.rglob("metrics.csv"), key=os.path.getmtime):
        for row in csv.DictReader(f.open()):
            out.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v})
    if "test/acc" not in out:
        raise RuntimeError(f"no test/acc logged under {run}")
    return out


def _steps(run: Path) -> int:
    import torch

    return int(torch.load(_last_ckpt(run), map_location="cpu", weights_only=False)["global_step"])


def _train_metric(run: Path, key: str) -> float | None:
    val = None
    for f in run.rglob("metrics.csv"):
        for row in csv.DictReader(f.open()):
            if row.get(key):
                val = float(row[key])
    return val


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["nice", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def _wait(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    for p, log in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{' '.join(map(str, p.args))} failed; see {log}")


def _fit(recipe: Path, run: Path, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    run.mkdir(parents=True, exist_ok=True)
    return _start([*ZOO, "fit", "-c", str(recipe), f"--trainer.default_root_dir={run}", *extra], run / "fit.log"), \
        run / "fit.log"


def _test(recipe: Path, run: Path, extra: list[str], out: Path | None = None) -> tuple[subprocess.Popen, Path]:
    out = out or run / "test"
    out.mkdir(parents=True, exist_ok=True)
    args = [*ZOO, "test", "-c", str(recipe), f"--ckpt_path={_last_ckpt(run)}", f"--trainer.default_root_dir={out}",
            "--trainer.callbacks=[]", *extra]
    return _start(args, out / "test.log"), out / "test.log"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, type=Path, help="a new folder for every run's outputs")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="students' seed_everything (init, sampling)")
    p.add_argument("--num-augs", type=int, default=4)
    p.add_argument("--fraction", type=float, default=1.0,
                   help="the students' data: this share of each digit's train images (the teacher always trains on "
                        "all of them, as the paper's teachers saw far more data than its students)")
    p.add_argument("--distill-scale", default=None,
                   help="the teacher's logit scale for the distillation targets: a number, or 'teacher' (its own "
                        "learned scale, as the paper's 100 is its CLIP teachers' own); default: the recipe's 100")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.0], choices=[1.0, 0.0],
                   help="which students to train (e.g. only 1 when 0 is unaffected by a distillation setting)")
    p.add_argument("--student-steps", type=int, default=None,
                   help="train the students this many steps (instead of --student-epochs; for small --fraction)")
    p.add_argument("--teacher-run", type=Path, default=None,
                   help="reuse a finished teacher run (zoo fit -c mobileclip/digits_teacher --trainer.max_epochs "
                        "TEACHER_EPOCHS --trainer.default_root_dir DIR) instead of training one")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "mobileclip_ablation.json")
    a = p.parse_args(argv)
    if a.workdir.exists() and any(a.workdir.iterdir()):
        raise FileExistsError(f"{a.workdir} is not empty: runs are never overwritten, pick a new --workdir")
    t0 = time.time()
    load = [os.getloadavg()[0]]
    teacher_recipe = RECIPES / "digits_teacher.yaml"
    teacher = a.teacher_run or a.workdir / "teacher"
    if a.teacher_run is None:
        _wait([_fit(teacher_recipe, teacher, [f"--trainer.max_epochs={a.teacher_epochs}"])])
    _wait([_test(teacher_recipe, teacher, [], a.workdir / "teacher_test")])
    t_metrics = _test_metrics(a.workdir / "teacher_test")
    load.append(os.getloadavg()[0])

    shards = a.workdir / "dr"
    model_args = json.dumps(_model_args(teacher_recipe))
    _wait([(_start([sys.executable, "-m", "zoo.data.clip_data", "--teacher", str(_last_ckpt(teacher)), "--model-name",
                    "mobileclip2_s0", "--model-args", model_args, "--out", str(shards), "--num-augs",
                    str(a.num_augs), "--fraction", str(a.fraction)], a.workdir / "reinforce.log"),
            a.workdir / "reinforce.log")])

    students = {1.0: RECIPES / "digits_student_reinforced.yaml", 0.0: RECIPES / "digits_student_plain.yaml"}
    students = {lam: students[lam] for lam in a.lambdas}
    tau = None
    if a.distill_scale is not None:
        tau = _train_metric(teacher, "train/logit_scale") if a.distill_scale == "teacher" else float(a.distill_scale)
    rows = [["teacher (mobileclip2_s0 layout, plain CLIP)", "-", "-", teacher_recipe.stem,
             _steps(teacher), round(100 * t_metrics["test/acc"], 1), round(100 * t_metrics["test/acc_top5"], 1),
             round(100 * t_metrics.get("test/i2t_r1", float("nan")), 1),
             round(_train_metric(teacher, "train/logit_scale") or float("nan"), 2)]]
    for seed in a.seeds:
        runs = {lam: a.workdir / f"student_l{int(lam)}_s{seed}" for lam in students}
        common = [f"--data.init_args.shards={shards}", f"--seed_everything={seed}"]
        if tau is not None:
            common += [f"--model.init_args.teacher_logit_scales=[{tau}]"]
        if a.student_steps:  # few images: an epoch is 1-2 steps, so count steps and validate less often
            common += [f"--trainer.max_steps={a.student_steps}", "--trainer.max_epochs=-1",
                       "--trainer.check_val_every_n_epoch=20"]
        else:
            common += [f"--trainer.max_epochs={a.student_epochs}"]
        _wait([_fit(students[lam], runs[lam], common) for lam in students])  # side by side
        _wait([_test(students[lam], runs[lam], [f"--data.init_args.shards={shards}"]) for lam in students])
        load.append(os.getloadavg()[0])
        for lam in students:
            m = _test_metrics(runs[lam] / "test")
            rows.append([f"student (mobileclip_s0 layout), {a.fraction:.0%} of the images", lam, seed, students[lam].stem,
                         _steps(runs[lam]), round(100 * m["test/acc"], 1), round(100 * m["test/acc_top5"], 1),
                         round(100 * m.get("test/i2t_r1", float("nan")), 1),
                         round(_train_metric(runs[lam], "train/logit_scale") or float("nan"), 2)])
    cols = ["model", "λ", "seed", "recipe", "steps", "test top-1 %", "test top-5 %", "i2t R@1 %", "final logit scale"]
    from zoo.bench import write_results

    write_results(a.results, {"ablation": {"columns": cols, "rows": rows}},
                  settings={"teacher_epochs": a.teacher_epochs, "teacher_run": str(teacher),
                            "student_epochs": a.student_epochs, "seeds": a.seeds,
                            "num_augs": a.num_augs, "fraction": a.fraction, "student_steps": a.student_steps,
                            "distill_logit_scale": tau if tau is not None else 100.0, "batch": 128, "image_size": 32, "threads": 1,
                            "wall_minutes": round((time.time() - t0) / 60, 1),
                            "load_average_1min_per_stage": [round(x, 1) for x in load]},
                  notes="Zero-shot test top-1 on the 355 held-out digits (prompts 'a photo of the digit {}.', "
                        "'a handwritten {}.'); the two students of a seed trained side by side on the same shards. "
                        "2-core machine shared with other jobs.")
    print(json.dumps(rows, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
