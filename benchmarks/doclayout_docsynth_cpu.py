"""The DocLayout-YOLO CPU recipe, measured: train ``doclayout_yolo/docsynth_cpu`` (or evaluate a checkpoint of it),
then score the held-out test pages with COCOeval (pycocotools, as the detection task logs it) and with the
ultralytics-style AP (:func:`zoo.tasks.detection.yolo_average_precision`) on the same detections, and write the
figures, the time and the machine load to a JSON file; ``--table`` prints the MODEL_CARD.md rows from that file.

    OMP_NUM_THREADS=1 nice python benchmarks/doclayout_docsynth_cpu.py              # train + evaluate (~15 min)
    python benchmarks/doclayout_docsynth_cpu.py --ckpt runs/doclayout_docsynth/version_0/checkpoints/last.ckpt
    python benchmarks/doclayout_docsynth_cpu.py --table                             # the card's rows
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "doclayout_docsynth_cpu.json"
RECIPE = "doclayout_yolo/docsynth_cpu"

from zoo.bench import LoadSampler  # noqa: E402 - after the checkout is on sys.path


def evaluate(model, dm, conf: float = 0.001) -> dict:
    """Test-split detections once; COCOeval (directly on the annotation json), torchmetrics (as the task logs it)
    and the ultralytics-style AP on them."""
    import torch

    from zoo.tasks.detection import coco_evaluate, mean_average_precision, metric_targets, yolo_average_precision

    model.eval()
    preds, gts, coco_dets = [], [], []
    to_cat = dm.label_to_category
    metric = mean_average_precision()
    with torch.no_grad():
        for images, targets in dm.test_dataloader():
            dets = model.predictions(images, targets)
            dets = [{k: v[d["scores"] >= conf] for k, v in d.items()} for d in dets]  # ultralytics' val conf
            gt = metric_targets(targets)
            metric.update(dets, gt)
            preds += dets
            gts += gt
            for d, t in zip(dets, targets):
                for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
                    coco_dets.append({"image_id": int(t["image_id"]), "category_id": to_cat[lab], "score": s,
                                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    tm = metric.compute()
    coco = coco_evaluate(dm.coco_ground_truth("test"), coco_dets)
    yolo = yolo_average_precision(preds, gts)
    return {
        "test_images": len(gts), "test_objects": int(sum(len(g["labels"]) for g in gts)), "detections": len(coco_dets),
        "coco": {k: round(coco[k], 4) for k in ("map", "map_50", "map_75", "mar_100")},
        "torchmetrics": {k: round(float(tm[k]), 4) for k in ("map", "map_50", "map_75")},
        "ultralytics_style": {"map": round(yolo["map"], 4), "map_50": round(yolo["map_50"], 4),
                              "map_75": round(yolo["map_75"], 4),
                              "per_class": {dm.class_names[c]: round(v, 4)
                                            for c, v in zip(yolo["classes"], yolo["map_per_class"])}},
        "conf_threshold": conf,
    }


def table(doc: dict) -> str:
    """MODEL_CARD.md rows from the results file."""
    e, f = doc["eval"], doc.get("fit") or {}
    rows = ["| metric (test pages) | COCOeval (pycocotools) | ultralytics-style (101-point interp.) |",
            "|---|---|---|",
            f"| mAP@0.5 | {e['coco']['map_50']:.3f} | {e['ultralytics_style']['map_50']:.3f} |",
            f"| mAP@0.5:0.95 | {e['coco']['map']:.3f} | {e['ultralytics_style']['map']:.3f} |",
            f"| mAP@0.75 | {e['coco']['map_75']:.3f} | {e['ultralytics_style']['map_75']:.3f} |"]
    if f:
        rows.append("")
        rows.append(f"Training: {f['updates']} updates of {f['batch_size']} pages at {f['image_size']} px, "
                    f"{f['wall_s'] / 60:.1f} min wall, {f['cpu_s'] / 60:.1f} CPU-min, {f['threads']} torch thread(s), "
                    f"load average {f['load']['mean']} (min {f['load']['min']}, max {f['load']['max']}) on "
                    f"{doc['machine']['cpu_count']} cores; test: {e['test_images']} pages, {e['test_objects']} objects.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="evaluate this checkpoint of the recipe instead of training")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--table", action="store_true", help="print the MODEL_CARD.md rows from --json and exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("overrides", nargs="*", help="extra `zoo fit` options, e.g. --trainer.max_steps=2")
    args = p.parse_args(argv)
    out = Path(args.json)
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from zoo.training import run_lightning_cli

    doc = {"command": " ".join(["python", "benchmarks/doclayout_docsynth_cpu.py", *(argv or sys.argv[1:])]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "recipe": RECIPE,
           "machine": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                       "threads": args.threads}}
    overrides = [o if o.startswith("--") else f"--{o}" for o in args.overrides]
    if args.ckpt:
        import importlib

        import yaml

        from zoo.recipes import resolve_recipe
        from zoo.tasks.detection import ObjectDetection

        model = ObjectDetection.load_from_checkpoint(args.ckpt, map_location="cpu")
        data = yaml.safe_load(resolve_recipe(RECIPE).read_text())["data"]
        module, name = data["class_path"].rsplit(".", 1)
        # the model's name gives the data its normalization, as `zoo fit` links it
        dm = getattr(importlib.import_module(module), name)(**{**data.get("init_args", {}),
                                                               "model_name": model.hparams.model_name})
        doc["checkpoint"] = str(args.ckpt)
    else:
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        with LoadSampler() as load:
            cli = run_lightning_cli(["fit", "-c", RECIPE, *overrides])
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        model, dm, trainer = cli.model, cli.datamodule, cli.trainer
        doc["fit"] = {"wall_s": round(time.perf_counter() - t0, 1),
                      "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
                      "threads": args.threads, "load": load.summary(), "updates": trainer.global_step,
                      "epochs": trainer.current_epoch, "batch_size": dm.batch_size, "image_size": dm.image_size,
                      "train_pages": len(dm._dataset("train")), "log_dir": trainer.log_dir,
                      "val_last": {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()
                                   if k.startswith("val/map")}}
        doc["checkpoint"] = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    t0 = time.perf_counter()
    doc["eval"] = evaluate(model, dm)
    doc["eval"]["wall_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps(doc["eval"], indent=1))
    if "fit" in doc:
        print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
