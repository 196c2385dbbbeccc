"""PP-MobileSeg: VIM vs full bilinear upsampling + argmax, eager and onnxruntime, 150 classes, 512x512, CPU.

The published latencies include the final argmax (PaddleSeg README), so the baseline is ``argmax(bilinear(logits))``
and VIM returns the same label map computed on the classes present. With random weights a model predicts an
arbitrary number of classes, so the classifier bias of 15 classes (10% of ADE20K's 150, the README's estimate of the
classes present per image) is raised: the label maps then hold about 15 classes, as on real images.

    bilinear+argmax   model(upsample="bilinear") then argmax over 150 upsampled channels
    vim               model(upsample="vim"): argmax at low resolution, upsample the K present channels only

Each is run eager (deploy form, BN folded) and through onnxruntime (dynamo ONNX export; zoo.deploy.export checks the
export against eager at another batch size: these are the full-size ONNX exports of both variants with and without
VIM). Timings are interleaved per round so load from other processes hits both alike; ratios are
``vim / bilinear+argmax`` (< 1: VIM faster). Also times the upsampling stage alone on 1/8 logits.

    python benchmarks/bench_pp_mobileseg.py --threads 1 --iters 10
    python benchmarks/bench_pp_mobileseg.py --tiny --models pp_mobileseg_tiny --size 64 --iters 1 --warmup 0  # smoke
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo.bench import time_interleaved  # noqa: E402
from zoo.contract import small_cfg  # noqa: E402
from zoo.deploy import export, reparameterize  # noqa: E402
from zoo.vision import pp_mobileseg  # noqa: E402
from zoo.vision.pp_mobileseg import vim_upsample  # noqa: E402


class ArgmaxOf(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).argmax(1).to(torch.int32)


def build(name: str, upsample: str, present: int, seed: int = 0, tiny: bool = False, calib_size: int = 256
          ) -> torch.nn.Module:
    torch.manual_seed(seed)
    # --tiny: the family's reduced test size (one block per stage, every block type kept): a smoke run
    overrides = small_cfg(name, pp_mobileseg).kwargs if tiny else {}
    model = zoo.create_model(name, upsample=upsample, **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        bias = model.decode_head.conv_seg.bias
        bias.zero_()
        # random weights give nearly constant features: center and scale the classifier on a calibration input so
        # logits vary by about 1 across pixels, then the present classes share the image
        f = model.forward_head(model.forward_features(torch.randn(1, 3, calib_size, calib_size, generator=g)),
                               pre_logits=True)
        mean, std = f.mean((0, 2, 3)), f.std((0, 2, 3)).clamp(min=1e-6)
        w = torch.randn(bias.numel(), mean.numel(), generator=g) / std / mean.numel() ** 0.5
        model.decode_head.conv_seg.weight.copy_(w[:, :, None, None])
        bias.copy_(-(w @ mean))
        bias[torch.randperm(bias.numel(), generator=g)[:present]] += 5.0
    model = reparameterize(model)
    return model if upsample == "vim" else ArgmaxOf(model)


def interleaved(fns: dict, warmup: int, iters: int) -> dict:
    return {k: statistics.median(v) for k, v in time_interleaved(fns, warmup, iters).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["pp_mobileseg_tiny", "pp_mobileseg_base"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--present", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--no-onnx", action="store_true", help="skip the two ONNX exports and onnxruntime (smoke runs)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: the family's reduced test depths, calibrated at --size (figures meaningless)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    for name in args.models:
        models = {k: build(name, up, args.present, tiny=args.tiny, calib_size=args.size if args.tiny else 256)
                  for k, up in (("bilinear+argmax", "bilinear"), ("vim", "vim"))}
        with torch.inference_mode():
            labels = {k: m(x) for k, m in models.items()}
        agree = float((labels["vim"] == labels["bilinear+argmax"]).float().mean())
        k_present = int(labels["vim"].unique().numel())
        fns, sessions, parity = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for k, m in (() if args.no_onnx else models.items()):
                t0 = time.perf_counter()
                # label maps: checked below as the fraction of identical labels at batch 2 (a float tie that
                # rounds the other way in onnxruntime flips a pixel, so exact equality is not required here)
                path = export(m, Path(tmp) / f"{k}.onnx", example_input=x, reparameterize=False, check=False)
                export_s = time.perf_counter() - t0
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                x2 = torch.randn(2, 3, args.size, args.size)
                with torch.inference_mode():
                    ref = m(x2)
                got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0])
                parity[k] = float((got == ref).float().mean())
                sessions[k] = (sess, export_s)
        feed = x.numpy()
        for k, m in models.items():
            fns[f"eager {k}"] = (lambda m=m: m(x))
            if k in sessions:
                sess = sessions[k][0]
                fns[f"onnxruntime {k}"] = (lambda s=sess: s.run(None, {s.get_inputs()[0].name: feed}))
        with torch.inference_mode():
            med = interleaved(fns, args.warmup, args.iters)
        # the upsampling stage alone, on 1/8 logits with the same class statistics
        low = torch.randn(1, 150, args.size // 8, args.size // 8)
        low[:, torch.randperm(150)[:args.present]] += 5.0
        stage = {"stage bilinear+argmax": lambda: F.interpolate(low, [args.size] * 2, mode="bilinear").argmax(1),
                 "stage vim": lambda: vim_upsample(low, [args.size] * 2)}
        with torch.inference_mode():
            med.update(interleaved(stage, args.warmup, args.iters))
        row = {"model": name, "size": args.size, "threads": args.threads, "classes_present": k_present,
               "label_agreement": agree, "onnx_vs_eager_batch2": parity, "export_s": {k: round(v[1], 1) for k, v in sessions.items()},
               **{f"{k} ms": round(v, 2) for k, v in med.items()}}
        for rt in ("eager", "stage") if args.no_onnx else ("eager", "onnxruntime", "stage"):
            row[f"{rt} vim/bilinear"] = round(med[f"{rt} vim"] / med[f"{rt} bilinear+argmax"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
