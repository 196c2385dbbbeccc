"""DocLayout-YOLO latency on CPU: our deploy form vs the ``doclayout-yolo`` package's model on the same weights vs
onnxruntime, in one process, interleaved (batch 1 and 4, 1024 px, top-k post-processing included everywhere).

    ours deploy         zoo deploy form (one-to-one head only, every Conv+BN folded, RepVGGDW merged) + top-k
    ours onnxruntime    the same graph exported with zoo.deploy.export (parity-checked at another batch size)
    ref predict         the package's model as its predictor runs it: unfused (``fuse()`` fails on GL-CRM: it deletes
                        the BatchNorm the shared dilated conv reads), both head branches, then ``v10postprocess``
    ref export-mode     the package's head in export mode (one-to-one branch + ``v10postprocess`` inside), unfused

The reference is built from the package's ``yolov10m-doclayout.yaml`` with the GitHub head (reg_max 16, as the
parameter counts of the released models), random weights and non-trivial BatchNorm statistics; ours loads the same
weights through the converter's key map. Ratios are ``ours / reference`` (< 1: ours faster).

    python benchmarks/bench_doclayout_yolo.py --threads 1 --iters 5 --json benchmarks/results/doclayout_yolo_latency.json
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo.bench import time_interleaved, write_results  # noqa: E402
from zoo.checkpoints import clean_state_dict  # noqa: E402
from zoo.deploy import export, reparameterize  # noqa: E402
from zoo.vision.yolov10 import YOLOv10Postprocess, checkpoint_filter_fn  # noqa: E402


@contextlib.contextmanager
def reg_max_16():
    """The 0.0.4 wheel's Detect sets ``reg_max = 1``; the GitHub code (and the released models) use 16."""
    from doclayout_yolo.nn.modules.head import Detect

    Detect.reg_max = property(lambda self: 16, lambda self, v: None)
    try:
        yield
    finally:
        del Detect.reg_max


def build_reference(nc: int, scale=None, seed: int = 0):
    import doclayout_yolo
    from doclayout_yolo.nn.modules.head import Detect
    from doclayout_yolo.nn.tasks import YOLOv10DetectionModel, yaml_model_load

    cfg = yaml_model_load(os.path.join(os.path.dirname(doclayout_yolo.__file__), "cfg/models/v10/yolov10m-doclayout.yaml"))
    if scale:
        cfg["scales"] = {"m": list(scale)}
    torch.manual_seed(seed)
    with reg_max_16():
        ref = YOLOv10DetectionModel(cfg, nc=nc, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, Detect):
                m.__dict__["reg_max"] = 16
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    ref.eval()
    # random weights give nearly constant features, hence near-tied scores that top-k orders arbitrarily: scale each
    # class conv on a calibration page so logits vary by about 1 across positions (as trained models' do)
    det = ref.model[-1]
    finals = [tower[-1] for tower in list(det.cv3) + list(det.one2one_cv3)]
    feats = {}
    hooks = [c.register_forward_hook(lambda m, i, o: feats.__setitem__(m, i[0])) for c in finals]
    with torch.no_grad():
        ref(pages(1, 256, seed + 1))
        for h in hooks:
            h.remove()
        for c in finals:
            f = feats[c]
            mean, std = f.mean((0, 2, 3)), f.std((0, 2, 3)).clamp(min=1e-6)
            w = torch.randn(c.out_channels, mean.numel(), generator=g) / std / mean.numel() ** 0.5
            c.weight.copy_(w[:, :, None, None])
            c.bias.copy_(-(w @ mean) - 3.0)
    return ref


class RefPredict(torch.nn.Module):
    """The package's eval forward (both branches, decoded) + ``v10postprocess`` + xywh -> xyxy, as its predictor."""

    def __init__(self, ref, max_det: int):
        super().__init__()
        self.ref, self.max_det = ref, max_det

    def forward(self, x):
        from doclayout_yolo.utils import ops

        det = self.ref.model[-1]
        preds = self.ref(x)["one2one"][0].transpose(-1, -2)
        boxes, scores, labels = ops.v10postprocess(preds, self.max_det, det.nc)
        return ops.xywh2xyxy(boxes), scores, labels


class RefExport(torch.nn.Module):
    """The package's export-mode head: one-to-one branch only, ``v10postprocess`` inside the model."""

    def __init__(self, ref, max_det: int):
        super().__init__()
        self.ref = ref
        det = ref.model[-1]
        det.export, det.format, det.max_det = True, "onnx", max_det

    def forward(self, x):
        out = self.ref(x)
        return out[..., :4], out[..., 4], out[..., 5].long()


def pages(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Page-like inputs: white background with dark text-like blocks and gray figures (noise inputs give nearly the
    same features at every position, hence tied scores that top-k orders arbitrarily)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 3, size, size)
    for i in range(n):
        for _ in range(24):
            w, h = (torch.randint(size // 16, size // 2, (2,), generator=g)).tolist()
            x0, y0 = torch.randint(0, size - w, (1,), generator=g).item(), torch.randint(0, size - h, (1,), generator=g).item()
            x[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g) * 0.8
            x[i, :, y0:y0 + h:max(2, h // 12), x0:x0 + w] = 0.05  # text lines
    return x


def topk_diff(a, b, tol: float = 1e-4) -> dict:
    """Largest differences between two top-k outputs ``(boxes, scores, labels)``, tie-aware: anchors of a uniform
    page region have equal scores and any order among them is valid, so each detection of ``a`` is matched to the
    closest detection of ``b`` with the same label and a score within ``tol``."""
    ba, sa, la = (torch.as_tensor(t) for t in a)
    bb, sb, lb = (torch.as_tensor(t) for t in b)
    score = float((sa - sb).abs().max())
    same = ((sa[:, :, None] - sb[:, None, :]).abs() <= tol) & (la[:, :, None].long() == lb[:, None, :].long())
    dist = (ba[:, :, None, :] - bb[:, None, :, :]).abs().amax(-1).masked_fill(~same, float("inf")).amin(-1)
    inside = sa > sa[:, -1:] + tol  # the group tied with the k-th score may be cut differently: not compared
    return {"scores": score, "boxes": float(dist[inside].max()) if inside.any() else 0.0}


def interleaved(fns: dict, warmup: int, iters: int) -> dict:
    return {k: statistics.median(v) for k, v in time_interleaved(fns, warmup, iters).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="1/8 width (smoke runs)")
    p.add_argument("--json", default=None)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and onnxruntime (smoke runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    scale = (0.33, 0.125, 1024) if args.tiny else None
    ref = build_reference(args.num_classes, scale)
    ours = zoo.create_model("doclayout_yolo_m", num_classes=args.num_classes, **({"scale": scale} if scale else {}))
    ours.load_state_dict(checkpoint_filter_fn(clean_state_dict(ref.state_dict())))
    ours = YOLOv10Postprocess(reparameterize(ours), max_det=args.max_det).eval()
    variants = {"ours deploy": ours, "ref predict": RefPredict(ref, args.max_det),
                "ref export-mode": RefExport(copy.deepcopy(ref), args.max_det)}

    x1 = pages(1, args.size, 7)
    with torch.inference_mode():  # same weights, same detections (scores and boxes of the top max_det)
        outs = {k: m(x1) for k, m in variants.items()}
    diffs = {k: topk_diff(outs["ours deploy"], outs[k]) for k in variants if k != "ours deploy"}
    print(json.dumps({"max_abs_diff_vs_ours": diffs}), flush=True)

    sess, export_s = None, None
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            # exported at batch 2, checked below at batch 3 (tie-aware: zoo.deploy.export's own check compares
            # positions)
            path = export(ours, Path(tmp) / "doclayout.onnx", example_input=pages(2, args.size, 3),
                          reparameterize=False, check=False)
            export_s = time.perf_counter() - t0
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x3 = pages(3, args.size, 5)
        with torch.inference_mode():
            diffs["ours onnxruntime (batch 3)"] = topk_diff(ours(x3),
                                                            sess.run(None, {sess.get_inputs()[0].name: x3.numpy()}))
        print(json.dumps({"max_abs_diff_vs_ours": diffs}), flush=True)

    tables = {}
    rows = []
    for bs in args.batch_sizes:
        x = pages(bs, args.size, 11)
        fns = {k: (lambda m=m: m(x)) for k, m in variants.items()}
        if sess is not None:
            feed = {sess.get_inputs()[0].name: x.numpy()}
            fns["ours onnxruntime"] = lambda: sess.run(None, feed)
        with torch.inference_mode():
            med = interleaved(fns, args.warmup, args.iters)
        row = {"batch": bs, **{f"{k} ms": round(v, 1) for k, v in med.items()},
               "ours deploy / ref predict": round(med["ours deploy"] / med["ref predict"], 3),
               "ours deploy / ref export-mode": round(med["ours deploy"] / med["ref export-mode"], 3)}
        if sess is not None:
            row["ours onnxruntime / ref predict"] = round(med["ours onnxruntime"] / med["ref predict"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        cols = ["variant"] + [f"batch {r['batch']} (ms)" for r in rows]
        names = [n for n in ("ours deploy", "ours onnxruntime", "ref predict", "ref export-mode") if n in fns]
        body = [[n] + [r[f"{n} ms"] for r in rows] for n in names]
        body += [[f"**{k}**"] + [f"**{r[k]}**" for r in rows] for k in
                 ("ours deploy / ref predict", "ours deploy / ref export-mode", "ours onnxruntime / ref predict")
                 if k in row]
        tables["latency"] = {"columns": cols, "rows": body}
        settings = {"size": args.size, "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
                    "num_classes": args.num_classes, "max_det": args.max_det, "tiny": args.tiny,
                    "export_s": None if export_s is None else round(export_s, 1), "max_abs_diff_vs_ours": diffs,
                    "batch_sizes_done": [r["batch"] for r in rows]}
        if args.json:  # after every batch size, so an interrupted run keeps what it measured
            write_results(args.json, tables, settings=settings,
                          notes="median ms per call, interleaved rounds in one process; the machine was shared (see "
                                "load_average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
