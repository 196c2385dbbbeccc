"""MobileCLIP: our encode_image / encode_text vs open_clip's on the same weights, one process, CPU.

For each model open_clip defines, open_clip's model is built with random weights (randomized BatchNorm statistics) and
its state dict is loaded into ours through our converter; then, per encoder, these callables run on the same input:

    open_clip          open_clip model.encode_image / encode_text (eval)
    open_clip reparam  timm.utils.reparameterize_model(open_clip model) (image encoder of the MCi variants)
    ours train         zoo.create_model(name, checkpoint_path=...).encode_*: the multi-branch training form
    ours deploy        zoo.deploy.reparameterize(ours)
    ours onnxruntime   the encoder exported alone to ONNX (zoo.vision.mobileclip.export_onnx, parity-checked)

Timings are interleaved (each round times every callable a few calls in turn) so load from other processes hits them
alike. Ratios < 1 mean ours is faster. Targets: ours train / open_clip <= 1 (no slower), ours deploy / open_clip < 1.

    python benchmarks/bench_mobileclip.py                                   # mobileclip2_s0, batch 1, 1 thread
    python benchmarks/bench_mobileclip.py --models mobileclip_s1 mobileclip2_s0 --batch-size 4 --json out.json
    python benchmarks/bench_mobileclip.py --tiny --rounds 1 --per-round 1 --warmup 0      # smoke run

``--tiny`` (smoke runs; figures meaningless): both models get one block per image stage (FastViT/MCi towers) and one
text layer with a 1000-token vocabulary, at the real widths and image size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo.bench import time_interleaved  # noqa: E402
from zoo.checkpoints import save_file  # noqa: E402
from zoo.deploy import reparameterize  # noqa: E402
from zoo.vision import mobileclip as mc  # noqa: E402


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)


def interleaved(fns: dict, rounds: int, per_round: int, warmup: int) -> dict[str, dict[str, float]]:
    with torch.inference_mode():
        times = time_interleaved(fns, warmup, rounds, per_round)
    return {k: {"median_ms": statistics.median(v), "p90_ms": sorted(v)[int(0.9 * (len(v) - 1))]} for k, v in times.items()}


TINY_TEXT = dict(layers=1, vocab_size=1000)


def tiny_image_args(name: str) -> dict:
    if not mc._VARIANTS[name]["image"].startswith("fastvit"):
        raise SystemExit(f"--tiny: {name} has a ViT image tower; --tiny covers the FastViT/MCi variants")
    return dict(layers=(1,) * (5 if mc._VARIANTS[name]["image"] in ("fastvit_mci3", "fastvit_mci4") else 4))


def open_clip_model(name: str, tiny: bool):
    """open_clip's model; ``tiny``: the reduced depths (its TimmModel passes no depth to timm, so the timm factory it
    calls gets them added while it builds) and the one-layer text tower."""
    import open_clip
    import open_clip.timm_model as otm

    if not tiny:
        return open_clip.create_model(mc.OPEN_CLIP_NAMES[name])
    cfg = open_clip.get_model_config(mc.OPEN_CLIP_NAMES[name])
    create = otm.timm.create_model
    otm.timm.create_model = lambda *a, **kw: create(*a, **{**kw, **tiny_image_args(name)})
    try:
        return open_clip.create_model(mc.OPEN_CLIP_NAMES[name], text_cfg={**cfg["text_cfg"], **TINY_TEXT})
    finally:
        otm.timm.create_model = create


def bench_model(name: str, batch: int, rounds: int, per_round: int, warmup: int, tiny: bool = False,
                no_onnx: bool = False) -> list[dict]:
    import onnxruntime as ort
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    ref = open_clip_model(name, tiny).eval()
    randomize_bn(ref)
    if name in ("mobileclip_s1", "mobileclip_s2"):
        torch.nn.init.zeros_(ref.visual.trunk.head.fc.bias)  # Apple's v1 projection is bias-free
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file(ref.state_dict(), path)
        kw = dict(image_args=tiny_image_args(name), text_args=TINY_TEXT) if tiny else {}
        ours = zoo.create_model(name, checkpoint_path=path, **kw).eval()
        deploy = reparameterize(ours)
        onnx = {} if no_onnx else mc.export_onnx(ours, tmp)
        sess = {k: ort.InferenceSession(v, providers=["CPUExecutionProvider"]) for k, v in onnx.items()}
    size = ours.visual.image_size  # the ONNX files are exported at it
    image = torch.rand(batch, 3, size, size)
    text = zoo.get_tokenizer(name)(["a photo of a cat on a sofa"] * batch)
    if tiny:  # ids of the small vocabulary, ending in its largest id (the end-of-text token)
        text = torch.where(text == text.max(), ours.vocab_size - 1, text % (ours.vocab_size - 1))
    ref_rep = reparameterize_model(ref) if mc._VARIANTS[name]["image"].startswith("fastvit") else None
    with torch.no_grad():  # same weights, same outputs
        err_i = (ours.encode_image(image) - ref.encode_image(image)).abs().max().item()
        err_t = (ours.encode_text(text) - ref.encode_text(text)).abs().max().item()
        err_d = (deploy.encode_image(image) - ref.encode_image(image)).abs().max().item()
    rows = []
    for enc, x in (("image", image), ("text", text)):
        fns = {"open_clip": (lambda: ref.encode_image(x)) if enc == "image" else (lambda: ref.encode_text(x))}
        if enc == "image" and ref_rep is not None:
            fns["open_clip reparam"] = lambda: ref_rep.encode_image(x)
        fns["ours train"] = (lambda: ours.encode_image(x)) if enc == "image" else (lambda: ours.encode_text(x))
        fns["ours deploy"] = (lambda: deploy.encode_image(x)) if enc == "image" else (lambda: deploy.encode_text(x))
        if enc in sess:
            s = sess[enc]
            feed = {s.get_inputs()[0].name: x.numpy()}
            fns["ours onnxruntime"] = lambda s=s, feed=feed: s.run(None, feed)
        res = interleaved(fns, rounds, per_round, warmup)
        base = res["open_clip"]["median_ms"]
        for k, v in res.items():
            rows.append({"model": name, "encoder": enc, "runtime": k, **v, "ratio_vs_open_clip": v["median_ms"] / base})
    print(f"{name}: max |ours - open_clip| image {err_i:.2e} (deploy {err_d:.2e}), text {err_t:.2e}")
    for r in rows:
        r.update(max_abs_diff_image=err_i, max_abs_diff_image_deploy=err_d, max_abs_diff_text=err_t)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobileclip2_s0"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="smoke run: one block per image stage, one text layer")
    p.add_argument("--no-onnx", action="store_true", help="skip the two ONNX exports and onnxruntime (smoke runs)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        if name not in mc.OPEN_CLIP_NAMES:
            raise SystemExit(f"{name}: open_clip does not define it; choose from {', '.join(mc.OPEN_CLIP_NAMES)}")
        rows += bench_model(name, a.batch_size, a.rounds, a.per_round, a.warmup, a.tiny, a.no_onnx)
    print(f"\nbatch {a.batch_size}, {a.threads} thread(s); median / p90 ms; ratio = median / open_clip median")
    print(f"{'model':<16} {'enc':<6} {'runtime':<18} {'median':>8} {'p90':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<16} {r['encoder']:<6} {r['runtime']:<18} {r['median_ms']:8.2f} {r['p90_ms']:8.2f} "
              f"{r['ratio_vs_open_clip']:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"batch_size": a.batch_size, "threads": a.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
