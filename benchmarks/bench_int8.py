"""int8 vs fp32 with onnxruntime on the CPU for the embedded recipes: test-split accuracy (mAP) and latency.

For each recipe's training output (under ``--runs``): ``zoo.deploy.quantize`` (calibration on the recipe's
DataModule, train split, fixed batches), then on the test split fp32 vs int8 top-1 (or COCO mAP@0.5 for MobileDets,
post-processing in PyTorch on the onnxruntime outputs), then latency at batch 1 and 8 with the fp32 and int8
sessions interleaved in one process (rounds alternate, so load from other processes hits both alike; the ratio is
the figure to read). An onnxruntime profile of the int8 model says where the int8 time goes (the ops left in fp32).

    nice python benchmarks/bench_int8.py --runs runs/int8_eval --json benchmarks/results/int8.json
    python benchmarks/bench_int8.py --tiny     # smoke run: a random tiny model, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (recipe, training output relative to --runs (glob, newest wins), metric)
RECIPES = {
    "quickstart (Next-ViT)": ("quickstart", "quickstart/version_*/checkpoints/deploy.safetensors", "top1"),
    "fastvit/digits": ("fastvit/digits", "fastvit_digits/version_*/checkpoints/deploy.safetensors", "top1"),
    "mobiledet/shapes_cpu": ("mobiledet/shapes_cpu", "mobiledet_shapes/version_*/checkpoints/last.ckpt", "map_50"),
    "snn/digits T=1": ("snn/digits_vgg_snn", "iir_snn_digits/snn_t1/model.safetensors", "top1"),
    # quantization-aware fine-tuning (recipes/mobiledet/shapes_cpu_qat.yaml) of a mobiledet/shapes_cpu checkpoint
    "mobiledet/shapes_cpu + QAT": ("mobiledet/shapes_cpu", "mobiledet_shapes_qat/version_*/checkpoints/last.ckpt",
                                   "map_50"),
}


def cpu_info() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "avx512_vnni": False, "avx_vnni": False}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["avx512_vnni"], info["avx_vnni"] = "avx512_vnni" in flags, "avx_vnni" in flags
                break
    except OSError:
        pass
    return info


def newest(pattern: str, root: Path) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load(path: Path):
    from zoo.deploy import load_trained_model

    model = load_trained_model(path)
    if getattr(model, "spiking", False):
        model.set_timesteps(1)
    return model


def interleaved_latency(s32, s8, x: np.ndarray, rounds: int, calls: int) -> dict:
    """Median ms per call of each session, the two alternating call by call (``rounds * calls`` pairs, the order
    flipped every round), and ``speedup``: the median over pairs of fp32 time / int8 time, so a burst of load from
    other processes hits both sides of a pair alike. ``speedup_min``: ratio of the fastest calls."""
    feed32, feed8 = {s32.get_inputs()[0].name: x}, {s8.get_inputs()[0].name: x}
    for _ in range(3):
        s32.run(None, feed32), s8.run(None, feed8)
    t32, t8 = [], []

    def once(sess, feed, out):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out.append((time.perf_counter() - t0) * 1e3)

    for r in range(rounds):
        for _ in range(calls):
            if r % 2 == 0:
                once(s32, feed32, t32), once(s8, feed8, t8)
            else:
                once(s8, feed8, t8), once(s32, feed32, t32)
    m32, m8 = statistics.median(t32), statistics.median(t8)
    return {"fp32_ms": m32, "int8_ms": m8, "speedup": statistics.median(a / b for a, b in zip(t32, t8)),
            "speedup_min": min(t32) / min(t8), "pairs": len(t32)}


def op_profile(path: Path, x: np.ndarray, threads: int, runs: int = 20) -> list[tuple[str, float]]:
    """Share of the int8 model's node time per op type (onnxruntime profiler), largest first."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per[op] = per.get(op, 0.0) + e.get("dur", 0)
    total = sum(per.values()) or 1.0
    return sorted(((k, v / total) for k, v in per.items()), key=lambda kv: -kv[1])


def detection_map(model, s32, s8, loader) -> tuple[float, float]:
    """COCO mAP@0.5 of fp32 and int8 onnxruntime outputs, decoded by the model's own post-processing."""
    from zoo.tasks.detection import mean_average_precision, metric_targets, scale_boxes

    maps = []
    metrics = [mean_average_precision(), mean_average_precision()]
    for images, targets in loader:
        size = tuple(images.shape[-2:])
        x = images.float().numpy()
        for sess, metric in zip((s32, s8), metrics):
            outs = [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x})]
            dets = model.postprocess(tuple(outs), size)
            preds = [dict(boxes=scale_boxes(d["boxes"].float(), size, t["orig_size"].tolist()),
                          scores=d["scores"].float(), labels=d["labels"].long()) for d, t in zip(dets, targets)]
            metric.update(preds, metric_targets(targets))
    for metric in metrics:
        maps.append(float(metric.compute()["map_50"]))
    return maps[0], maps[1]


def input_size(recipe: str, model) -> tuple:
    """(C, H, W) the recipe trains at (its DataModule's data config), else the model config's."""
    from zoo.deploy.quantize import datamodule_from_recipe

    dm = datamodule_from_recipe(recipe)
    cfg = getattr(dm, "data_config", None)
    if cfg:
        return tuple(cfg["input_size"])
    if isinstance(getattr(dm, "image_size", None), int):  # COCODetection: square images of image_size
        return (3, dm.image_size, dm.image_size)
    return tuple(model.pretrained_cfg.input_size)


def run_one(name, recipe, model, metric, out_dir: Path, args) -> dict:
    from zoo.deploy import quantize
    from zoo.deploy.quantize import _images, _loader, ort_session

    t0 = time.perf_counter()
    res = quantize(model, recipe, out_dir / "int8.onnx", method=args.method, num_batches=args.calib_batches,
                   fp32_path=out_dir / "fp32.onnx", threads=args.threads,
                   input_size=(1, 16, 16) if args.tiny else input_size(recipe, model))
    quant_s = time.perf_counter() - t0
    rep = res.report
    s32, s8 = ort_session(res.fp32_path, args.threads), ort_session(res.path, args.threads)
    if metric == "map_50":
        acc32, acc8 = detection_map(model, s32, s8, _loader(recipe, "test"))
    else:
        acc32, acc8 = rep.get("fp32_top1"), rep.get("int8_top1")
    test_x = torch.cat([_images(b) for _, b in zip(range(2), _loader(recipe, "test"))]).float().numpy()
    lat = {}
    for b in (1, 8):
        x = np.ascontiguousarray(test_x[:b])
        lat[b] = interleaved_latency(s32, s8, x, args.rounds, args.calls)
    prof = op_profile(res.path, np.ascontiguousarray(test_x[:8]), args.threads)
    return {
        "name": name, "recipe": recipe, "metric": metric, "fp32": acc32, "int8": acc8,
        "loss_points": None if acc32 is None else 100 * (acc32 - acc8),
        "top1_agreement": rep.get("top1_agreement"), "max_logit_err": rep.get("max_logit_err"),
        "latency": lat, "fp32_op_types": rep["fp32_op_types"], "profile": prof[:8], "quantize_s": quant_s,
        "calibration_images": rep["calibration_images"], "test_images": rep.get("images"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/int8_eval", help="root of the recipes' training outputs")
    p.add_argument("--only", default=None, help="comma-separated recipe names (default: all four)")
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=30, help="call pairs per round")
    p.add_argument("--json", default=None, help="write the results file (zoo.bench.write_results)")
    p.add_argument("--tiny", action="store_true", help="smoke run on a random tiny model")
    p.add_argument("--merge", action="store_true", help="keep the other recipes' rows already in --json (one "
                   "recipe per process: torch.export of a Next-ViT failed after an SNN export in the same process)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import onnx
    import onnxruntime

    from zoo.bench import write_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            import zoo

            model = zoo.create_model("snn_vgg16", cfg=(8, "A", 16, "A"), fc_dims=(32,), img_size=16, timesteps=1,
                                     in_chans=1, num_classes=10).eval()
            rows.append(run_one("tiny snn", torch.randn(64, 1, 16, 16), model, "top1", Path(tmp), args))
        else:
            wanted = [n.strip() for n in args.only.split(",")] if args.only else list(RECIPES)[:4]
            for name in wanted:
                recipe, pattern, metric = RECIPES[name]
                path = newest(pattern, Path(args.runs))
                if path is None:
                    print(f"{name}: no training output {args.runs}/{pattern}; run the recipe first", file=sys.stderr)
                    continue
                out = Path(tmp) / name.replace("/", "_").replace(" ", "_")
                print(f"{name}: {path}", file=sys.stderr, flush=True)
                r = run_one(name, recipe, load(path), metric, out, args)
                r["checkpoint"] = str(path)
                rows.append(r)
                print(json.dumps(r, default=str), file=sys.stderr, flush=True)

    if args.merge and args.json and Path(args.json).is_file():
        done = {r["name"] for r in rows}
        earlier = json.loads(Path(args.json).read_text()).get("settings", {}).get("details", [])
        rows = [r for r in earlier if r["name"] not in done] + rows
        for r in rows:
            r["latency"] = {int(k): v for k, v in r["latency"].items()}
        rows.sort(key=lambda r: list(RECIPES).index(r["name"]) if r["name"] in RECIPES else 99)

    def pct(v):
        return None if v is None else round(100 * v, 1)

    table = {"columns": ["recipe", "metric", "fp32", "int8", "loss (points)", "top-1 agreement %",
                         "b1 fp32 ms", "b1 int8 ms", "b1 speed-up", "b8 fp32 ms", "b8 int8 ms", "b8 speed-up",
                         "int8 time in fp32 ops (top)"],
             "rows": []}
    for r in rows:
        # int8 kernels (QLinearConv, QGemm, QLinearAdd, ...) and the Q/DQ at the int8 region's borders
        fp32_share = [(op, s) for op, s in r["profile"] if not (op.startswith("Q") or op.endswith("Integer")
                                                                 or op == "DequantizeLinear")]
        table["rows"].append([
            r["name"], "mAP@0.5" if r["metric"] == "map_50" else "top-1", pct(r["fp32"]), pct(r["int8"]),
            None if r["loss_points"] is None else round(r["loss_points"], 1), pct(r["top1_agreement"]),
            round(r["latency"][1]["fp32_ms"], 3), round(r["latency"][1]["int8_ms"], 3),
            round(r["latency"][1]["speedup"], 2), round(r["latency"][8]["fp32_ms"], 3),
            round(r["latency"][8]["int8_ms"], 3), round(r["latency"][8]["speedup"], 2),
            ", ".join(f"{op} {100 * s:.0f}%" for op, s in fp32_share[:3]) or "-",
        ])
    cols = table["columns"]
    print(" | ".join(cols))
    for row in table["rows"]:
        print(" | ".join("-" if c is None else str(c) for c in row))
    if args.json:
        settings = {**{k: v for k, v in vars(args).items() if k != "json"}, **cpu_info(),
                    "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                    "details": rows}
        path = write_results(args.json, {"int8": table}, settings=settings, notes=(
            "fp32 and int8 onnxruntime sessions interleaved in one process, 1 intra-op thread; the shared machine "
            "was loaded by other jobs, so read the speed-up ratios, not the absolute times"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
