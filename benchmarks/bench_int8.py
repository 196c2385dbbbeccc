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

# name -> (recipe, training output relative to --runs (glob, newest wins), metric[, quantize() options replacing
# --method / --calib-batches for that row])
MOBILEDET = "mobiledet_shapes/version_*/checkpoints/last.ckpt"
MOBILEDET_QAT = "mobiledet_shapes_qat/version_*/checkpoints/last.ckpt"
MAVG = {"method": "moving_average"}  # mean of the per-batch min / max: the QAT fake quantizers' ranges
RECIPES = {
    "quickstart (Next-ViT)": ("quickstart", "quickstart/version_*/checkpoints/deploy.safetensors", "top1"),
    "fastvit/digits": ("fastvit/digits", "fastvit_digits/version_*/checkpoints/deploy.safetensors", "top1"),
    "mobiledet/shapes_cpu": ("mobiledet/shapes_cpu", MOBILEDET, "map_50"),
    "snn/digits T=1": ("snn/digits_vgg_snn", "iir_snn_digits/snn_t1/model.safetensors", "top1"),
    # MobileDets calibrated without the outliers' pull on the ranges (see --study)
    "mobiledet/shapes_cpu (moving-average calibration)": ("mobiledet/shapes_cpu", MOBILEDET, "map_50", MAVG),
    "snn/digits T=1 (moving-average calibration)": (
        "snn/digits_vgg_snn", "iir_snn_digits/snn_t1/model.safetensors", "top1", MAVG),
    # quantization-aware fine-tuning (recipes/mobiledet/shapes_cpu_qat.yaml) of a mobiledet/shapes_cpu checkpoint,
    # deployed with the ranges it trained with (moving average) and, for comparison, with min / max
    "mobiledet/shapes_cpu + QAT": ("mobiledet/shapes_cpu", MOBILEDET_QAT, "map_50", MAVG),
    "mobiledet/shapes_cpu + QAT (min/max calibration)": ("mobiledet/shapes_cpu", MOBILEDET_QAT, "map_50"),
    # controls, the same 300 updates from the same checkpoint: QAT with BatchNorm on batch statistics
    # (freeze_bn: false), and fp32 fine-tuning (weights: false, activations: false) with BatchNorm frozen / not
    "mobiledet/shapes_cpu + QAT, BN batch statistics": (
        "mobiledet/shapes_cpu", "mobiledet_shapes_qat_bntrain/version_*/checkpoints/last.ckpt", "map_50", MAVG),
    "mobiledet/shapes_cpu + fp32 fine-tune (control)": (
        "mobiledet/shapes_cpu", "mobiledet_shapes_ft/version_*/checkpoints/last.ckpt", "map_50", MAVG),
    "mobiledet/shapes_cpu + fp32 fine-tune, BN batch statistics (control)": (
        "mobiledet/shapes_cpu", "mobiledet_shapes_ft_bntrain/version_*/checkpoints/last.ckpt", "map_50", MAVG),
}
# --study: calibration variants (method, batches, percentile) of one recipe's post-training int8
STUDY = [("minmax", 8, None), ("minmax", 32, None), ("entropy", 8, None), ("percentile", 8, 99.999),
         ("percentile", 8, 99.99), ("percentile", 8, 99.9), ("moving_average", 8, None), ("moving_average", 32, None)]


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


def run_one(name, recipe, model, metric, out_dir: Path, args, options: dict | None = None) -> dict:
    from zoo.deploy import quantize
    from zoo.deploy.quantize import _images, _loader, ort_session

    options = {"method": args.method, "num_batches": args.calib_batches, **(options or {})}
    t0 = time.perf_counter()
    res = quantize(model, recipe, out_dir / "int8.onnx", fp32_path=out_dir / "fp32.onnx", threads=args.threads,
                   input_size=(1, 16, 16) if args.tiny else input_size(recipe, model), **options)
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
        "calibration": calibration_label(options),
    }


def calibration_label(options: dict) -> str:
    m = options.get("method", "minmax")
    pct = f" {options.get('percentile', 99.999):g}" if m == "percentile" else ""
    return f"{m.replace('_', ' ')}{pct}, {options.get('num_batches', 8)} batches"


def output_sqnr(s32, s8, x: np.ndarray) -> list[float]:
    """Signal-to-quantization-noise ratio (dB) of each int8 output against fp32 on ``x``."""
    o32, o8 = (s.run(None, {s.get_inputs()[0].name: x}) for s in (s32, s8))
    return [float(10 * np.log10((a.astype(np.float64) ** 2).sum() / max(((a.astype(np.float64) - b) ** 2).sum(),
                                                                        1e-30))) for a, b in zip(o32, o8)]


def tensor_sqnr(fp32_path: Path, int8_path: Path, x: np.ndarray) -> list[tuple[str, str, float]]:
    """(op type, tensor, SQNR dB) of every tensor the int8 model quantizes, in graph order: the int8 model's
    dequantized value against the fp32 model's value of the same tensor (both run by onnxruntime without graph
    optimizations; the fp32 graph is onnxruntime's ``quant_pre_process`` output, whose tensor names the int8 model
    keeps). Where the error starts and how it grows through the network."""
    import contextlib

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre_path = Path(tmp) / "pre.onnx"
        with contextlib.chdir(tmp):
            quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=False)
        pre, q = onnx.load(str(pre_path)), onnx.load(str(int8_path))
    consumers: dict[str, list] = {}
    for n in q.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    producer = {o: (i, n.op_type) for i, n in enumerate(pre.graph.node) for o in n.output}
    pairs = {}  # fp32 tensor -> the int8 model's dequantized copy of it
    for n in q.graph.node:
        dq = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        if n.op_type == "QuantizeLinear" and dq and n.input[0] in producer:
            pairs[n.input[0]] = dq[0].output[0]
    names = sorted(pairs, key=lambda t: producer[t][0])
    for graph, outs in ((pre.graph, names), (q.graph, [pairs[t] for t in names])):
        graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outs)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    got = []
    for graph, outs in ((pre, names), (q, [pairs[t] for t in names])):
        sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got.append(sess.run(outs, {sess.get_inputs()[0].name: x}))
    rows = []
    for t, a, b in zip(names, *got):
        a, b = a.astype(np.float64), b.astype(np.float64)
        rows.append((producer[t][1], t, float(10 * np.log10((a ** 2).sum() / max(((a - b) ** 2).sum(), 1e-30)))))
    return rows


def study(name, recipe, model, metric, out_dir: Path, args) -> tuple[dict, list]:
    """Post-training int8 of one recipe under each calibration variant of ``STUDY``: the test metric, the SQNR of
    the outputs and of every quantized tensor (on the first test batch)."""
    from zoo.deploy import quantize
    from zoo.deploy.quantize import _images, _loader, ort_session

    x = np.ascontiguousarray(_images(next(iter(_loader(recipe, "test")))).float().numpy()[:16])
    table = {"columns": ["calibration", "batches", "fp32", "int8", "loss (points)", "output SQNR dB",
                         "median tensor SQNR dB", "lowest tensor SQNR dB"], "rows": []}
    details = []
    for method, batches, pct in STUDY:
        opts = {"method": method, "num_batches": batches, **({"percentile": pct} if pct else {})}
        t0 = time.perf_counter()
        res = quantize(model, recipe, out_dir / "int8.onnx", fp32_path=out_dir / "fp32.onnx", threads=args.threads,
                       input_size=input_size(recipe, model), test_data=None if metric == "map_50" else "auto",
                       **opts)
        s32, s8 = ort_session(res.fp32_path, args.threads), ort_session(res.path, args.threads)
        if metric == "map_50":
            acc32, acc8 = detection_map(model, s32, s8, _loader(recipe, "test"))
        else:
            acc32, acc8 = res.report.get("fp32_top1"), res.report.get("int8_top1")
        out_db = output_sqnr(s32, s8, x)
        tensors = tensor_sqnr(res.fp32_path, res.path, x)
        dbs = sorted(db for *_, db in tensors)
        worst = min(tensors, key=lambda r: r[2])
        label = method.replace("_", " ") + (f" {pct:g}" if pct else "")
        table["rows"].append([label, batches, round(100 * acc32, 1), round(100 * acc8, 1),
                              round(100 * (acc32 - acc8), 1), " / ".join(f"{d:.1f}" for d in out_db),
                              round(statistics.median(dbs), 1), f"{worst[2]:.1f} ({worst[0]})"])
        details.append({"calibration": label, "batches": batches, "fp32": acc32, "int8": acc8,
                        "output_sqnr_db": out_db, "tensor_sqnr_db": tensors, "scales": activation_scales(res.path),
                        "seconds": time.perf_counter() - t0})
        print(" | ".join(map(str, table["rows"][-1])), file=sys.stderr, flush=True)
    # how much wider min / max makes the ranges than the moving average (same 8 batches), over the tensors
    by = {(d["calibration"], d["batches"]): d["scales"] for d in details}
    a, b = by.get(("minmax", 8)), by.get(("moving average", 8))
    if a and b:
        r = np.array([a[t] / b[t] for t in a if t in b and b[t] > 0])
        details.append({"range_ratio_minmax_to_moving_average": {
            "tensors": len(r), "median": float(np.median(r)), "p90": float(np.percentile(r, 90)), "max": float(r.max())}})
        print("min/max range / moving-average range:", details[-1], file=sys.stderr)
    return table, details


def activation_scales(path: Path) -> dict[str, float]:
    """Scale of every activation QuantizeLinear of an int8 QDQ model, by tensor name (range = 255 x scale)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: t for t in graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(init[n.input[1]])) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in init}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/int8_eval", help="root of the recipes' training outputs")
    p.add_argument("--only", default=None, help="recipe names (RECIPES) separated by ';' (default: the first four)")
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy", "moving_average"))
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=30, help="call pairs per round")
    p.add_argument("--json", default=None, help="write the results file (zoo.bench.write_results)")
    p.add_argument("--tiny", action="store_true", help="smoke run on a random tiny model")
    p.add_argument("--merge", action="store_true", help="keep the other recipes' rows already in --json (one "
                   "recipe per process: torch.export of a Next-ViT failed after an SNN export in the same process)")
    p.add_argument("--study", action="store_true", help="calibration study of one recipe (--only, default "
                   "mobiledet/shapes_cpu): int8 accuracy and per-tensor SQNR for each variant of STUDY; --json gets "
                   "table 'calibration'")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import onnx
    import onnxruntime

    from zoo.bench import LoadSampler, write_results

    if args.study:
        name = args.only or "mobiledet/shapes_cpu"
        recipe, pattern, metric = RECIPES[name][:3]
        path = newest(pattern, Path(args.runs))
        if path is None:
            print(f"{name}: no training output {args.runs}/{pattern}; run the recipe first", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load_sampler:
            table, details = study(name, recipe, load(path), metric, Path(tmp), args)
        if args.json:
            out = write_results(args.json, {"calibration": table}, load=load_sampler.summary(), settings={
                "recipe": recipe, "checkpoint": str(path), "metric": metric, "threads": args.threads, **cpu_info(),
                "onnxruntime": onnxruntime.__version__, "details": details}, notes=(
                "post-training int8 (zoo.deploy.quantize, QDQ, per-channel int8 weights, uint8 activations) of one "
                "checkpoint under each calibration variant; test split; SQNR = 10 log10(|fp32|^2 / |int8 - fp32|^2) "
                "on the first 16 test images (outputs: class logits / box deltas; tensors: every quantized tensor)"))
            print(f"wrote {out}")
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load_sampler:
        if args.tiny:
            import zoo

            model = zoo.create_model("snn_vgg16", cfg=(8, "A", 16, "A"), fc_dims=(32,), img_size=16, timesteps=1,
                                     in_chans=1, num_classes=10).eval()
            rows.append(run_one("tiny snn", torch.randn(64, 1, 16, 16), model, "top1", Path(tmp), args))
        else:
            wanted = [n.strip() for n in args.only.split(";")] if args.only else list(RECIPES)[:4]
            for name in wanted:
                recipe, pattern, metric, *options = RECIPES[name]
                path = newest(pattern, Path(args.runs))
                if path is None:
                    print(f"{name}: no training output {args.runs}/{pattern}; run the recipe first", file=sys.stderr)
                    continue
                out = Path(tmp) / name.replace("/", "_").replace(" ", "_")
                print(f"{name}: {path}", file=sys.stderr, flush=True)
                r = run_one(name, recipe, load(path), metric, out, args, *options)
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

    table = {"columns": ["recipe", "metric", "calibration", "fp32", "int8", "loss (points)", "top-1 agreement %",
                         "b1 fp32 ms", "b1 int8 ms", "b1 speed-up", "b8 fp32 ms", "b8 int8 ms", "b8 speed-up",
                         "int8 time in fp32 ops (top)"],
             "rows": []}
    for r in rows:
        # int8 kernels (QLinearConv, QGemm, QLinearAdd, ...) and the Q/DQ at the int8 region's borders
        fp32_share = [(op, s) for op, s in r["profile"] if not (op.startswith("Q") or op.endswith("Integer")
                                                                 or op == "DequantizeLinear")]
        table["rows"].append([
            r["name"], "mAP@0.5" if r["metric"] == "map_50" else "top-1",
            r.get("calibration", calibration_label({"method": r.get("method", "minmax")})), pct(r["fp32"]),
            pct(r["int8"]),
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
        path = write_results(args.json, {"int8": table}, settings=settings, load=load_sampler.summary(), notes=(
            "fp32 and int8 onnxruntime sessions interleaved in one process, 1 intra-op thread; the shared machine "
            "was loaded by other jobs, so read the speed-up ratios, not the absolute times"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
