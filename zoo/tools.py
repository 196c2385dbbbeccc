"""Small ``zoo`` subcommands: ``list``, ``info``, ``download`` and ``export``.

Each ``*_main(argv)`` parses its own arguments and returns a process exit code: 0 on success, 1 when the work
failed (a download, a parity check), 2 for bad input (an unknown model, a missing file). Errors are one readable
line on stderr, not a traceback.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["depths=(1,1,2,1)", "drop_path_rate=0"]`` -> ``{"depths": (1, 1, 2, 1), "drop_path_rate": 0}``.

    Values are Python literals when they parse as one (numbers, tuples, lists, None, True), strings otherwise.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--override expects KEY=VALUE with KEY a Python identifier, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _error(prog: str, message: str, code: int) -> int:
    print(f"zoo {prog}: error: {message}", file=sys.stderr)
    return code


def _run(prog: str, fn: Callable[[], int]) -> int:
    """Turn the errors a user can cause into one line on stderr and an exit code."""
    from zoo.registry import UnknownModelError

    try:
        return fn()
    except UnknownModelError as e:
        return _error(prog, str(e), 2)
    except Exception as e:
        # zoo.checkpoints imports torch: only look at it if the command already loaded it (keeps `zoo list` fast)
        ck = sys.modules.get("zoo.checkpoints")
        if ck is not None and isinstance(e, ck.CheckpointError):
            return _error(prog, str(e), 1)
        if isinstance(e, (ValueError, TypeError, FileNotFoundError)):
            return _error(prog, str(e), 2)
        raise


# ---------------------------------------------------------------------------------------------- zoo list


def list_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zoo list", description="List registered models (one name per line).")
    p.add_argument("pattern", nargs="?", default="*", help="glob on the model name, e.g. 'nextvit_*' (default: all)")
    p.add_argument("--task", default=None, help="only models of this task, e.g. image-classification")
    p.add_argument("--pretrained", action="store_true", help="list every NAME.TAG that has released weights")
    args = p.parse_args(argv)

    def work() -> int:
        from zoo.registry import list_models

        names = list_models(args.pattern, task=args.task, pretrained=args.pretrained)
        if not names:
            what = f"pattern {args.pattern!r}" + (f" and task {args.task!r}" if args.task else "")
            return _error("list", f"no registered model matches {what}", 1)
        print("\n".join(names))
        return 0

    return _run("list", work)


# ---------------------------------------------------------------------------------------------- zoo info


_TAG_KEYS = ("task", "input_size", "crop_pct", "interpolation", "mean", "std", "num_classes", "paper", "license")


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v)) if v and all(isinstance(x, int) for x in v) else f"({', '.join(f'{x:g}' if isinstance(x, float) else str(x) for x in v)})"
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_info(info: dict[str, Any], tag: str, requested: str | None = None) -> str:
    """A few readable lines: what the model is, its data config, and one line per checkpoint tag (what differs)."""
    from zoo.papers import PAPERS
    try:  # torch-free home of the pins (zoo.checkpoints imports torch)
        from zoo.registry import PINNED_SHA256
    except ImportError:
        from zoo.checkpoints import PINNED_SHA256

    cfg = info["default_cfg"]
    name = info["name"]
    lines = [f"{name}: {info['family']} {info['task']}, {info['params'] / 1e6:.2f} M parameters, license "
             f"{info['license'] or '-'}"]
    for pid in dict.fromkeys(c.get("paper") for c in [cfg, *info["tags"].values()] if c.get("paper")):
        paper = PAPERS.get(pid)
        lines.append(f"paper: {paper.title + ' ' if paper else ''}(arXiv {pid}, https://arxiv.org/abs/{pid})")
    if cfg.get("input_size"):
        lines.append(f"input: {_short(cfg['input_size'])}, crop_pct {_short(cfg['crop_pct'])}, "
                     f"{cfg['interpolation']}, mean {_short(cfg['mean'])}, std {_short(cfg['std'])}; "
                     f"{cfg['num_classes']} classes")
    lines.append("tags (* default, > shown above; verified = sha256 pinned):")
    width = max((len(t) for t in info["tags"]), default=0)
    for t, c in info["tags"].items():
        mark = ("*" if t == info["default_tag"] else " ") + (">" if t == tag else " ")
        metrics = ", ".join(f"{k} {_short(v)}" for k, v in (c.get("metrics") or {}).items()) or "-"
        diff = [f"{k} {_short(c[k])}" for k in _TAG_KEYS if k in c and c[k] != cfg.get(k)]
        src = c.get("source") or "no released weights"
        verified = " verified" if c.get("source") in PINNED_SHA256 else ""
        lines.append(f" {mark}{t or '(untagged)':<{width}}  {metrics}  {src}{verified}"
                     + (f"  [{'; '.join(diff)}]" if diff else ""))
    if cfg.get("notes"):
        lines.append(f"notes: {cfg['notes']}")
    shown = requested or (f"{name}.{tag}" if tag else name)
    lines.append(f"use: zoo.create_model({shown!r}{', pretrained=True' if cfg.get('source') else ''}); "
                 f"`zoo info {shown} --json` for every field, `--bibtex` to cite")
    return "\n".join(lines)


def info_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zoo info",
        description="Describe a model: family, parameters, paper, data config and its checkpoint tags (a few lines). "
        "--json prints every config field of every tag; --bibtex the BibTeX of the paper(s).",
    )
    p.add_argument("name", help="NAME or NAME.TAG")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the full model_info() dict as JSON")
    fmt.add_argument("--bibtex", action="store_true", help="BibTeX of the paper(s) the model and its tags come from")
    args = p.parse_args(argv)

    def work() -> int:
        from zoo.registry import model_info, split_model_name

        info = model_info(args.name)  # from the model index: no torch / model code imported
        tag = split_model_name(args.name)[1]
        tag = info["default_tag"] if tag is None else tag
        if args.bibtex:
            from zoo.papers import bibtex

            tags = [tag] if split_model_name(args.name)[1] is not None else [tag, *info["tags"]]
            ids = dict.fromkeys(info["tags"][t]["paper"] for t in tags if info["tags"][t]["paper"])
            if not ids:
                raise ValueError(f"{info['name']} records no paper")
            print("\n\n".join(bibtex(i) for i in ids))
            return 0
        print(json.dumps(info, indent=2, default=str) if args.json else format_info(info, tag, args.name))
        return 0

    return _run("info", work)


# ---------------------------------------------------------------------------------------------- zoo download


def download_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zoo download",
        description="Prefetch released checkpoints into the cache ($ZOO_HOME, default ~/.cache/zoo; Hugging Face "
        "files go to the huggingface_hub cache). Prints the local path of each file.",
    )
    p.add_argument("names", nargs="+", metavar="NAME.TAG", help="e.g. nextvit_small.bd_in1k (NAME alone: its default tag)")
    p.add_argument("--cache-dir", default=None, help="download here instead of the default cache")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)

    def work() -> int:
        from zoo.checkpoints import CheckpointError, download
        from zoo.registry import resolve_cfg

        for name in args.names:
            entry, tag, cfg = resolve_cfg(name)
            if cfg.source is None:
                with_weights = [t for t, c in entry.tags.items() if c.has_weights]
                raise CheckpointError(
                    f"{entry.name}{'.' + tag if tag else ''} has no released weights; tags with weights: "
                    f"{', '.join(with_weights) or '(none)'}"
                )
            path = download(cfg.source, cache_dir=args.cache_dir, progress=not args.quiet)
            print(f"{entry.name}.{tag}\t{path}")
        return 0

    return _run("download", work)


# ---------------------------------------------------------------------------------------------- zoo export


def _looks_like_file(arg: str) -> bool:
    return Path(arg).exists() or arg.endswith(CHECKPOINT_SUFFIXES) or "/" in arg or "\\" in arg


def export_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zoo export",
        description="Export a registered model (random or --pretrained weights) or a checkpoint file to ONNX, "
        "TorchScript or torch.export. The model is reparameterized first and the artifact is checked against eager "
        "PyTorch at a different batch size, unless told otherwise.",
    )
    p.add_argument("source", metavar="NAME_OR_CHECKPOINT",
                   help="registered NAME[.TAG], or a checkpoint file: a training output (deploy.safetensors, a "
                   "Lightning .ckpt) carries its architecture and input size; other files need --model")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "torch_export"))
    p.add_argument("--model", default=None,
                   help="architecture of a checkpoint file without zoo metadata (e.g. a released one), e.g. nextvit_small")
    p.add_argument("--pretrained", action="store_true", help="with a model NAME: load its released weights")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the checkpoint's / config's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the config's)")
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="example input size (default: the model's config input size)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size of the example input (default 2)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension instead of making it dynamic")
    p.add_argument("--no-reparameterize", action="store_true", help="export the training form as is")
    p.add_argument("--no-check", action="store_true", help="skip running the artifact and comparing with eager")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override, repeatable: --override depths=(1,1,2,1)")
    q = p.add_argument_group("int8 (static post-training quantization with onnxruntime, see zoo.deploy.quantize)")
    q.add_argument("--int8", action="store_true", help="write an int8 ONNX model (QDQ, per-channel weights) and "
                   "report its agreement with fp32 on the test split instead of the fp32 tolerance check")
    q.add_argument("--calibrate", default=None, metavar="RECIPE_OR_DATA",
                   help="calibration data: a recipe (name or YAML; its DataModule's train split, test split for the "
                   "report) or a .npy/.pt file of images (N, C, H, W). Default for a training output: the config.yaml "
                   "of its run")
    q.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile", "entropy", "moving_average"),
                   help="activation ranges: minmax, percentile, entropy, or moving_average (the ranges quantization-"
                        "aware training uses; robust to rare outliers)")
    q.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    q.add_argument("--report", default=None, metavar="JSON", help="also write the int8 parity report as JSON")
    args = p.parse_args(argv)

    def work() -> int:
        import torch

        import zoo
        from zoo.deploy import ExportParityError, export

        if args.int8 and args.format != "onnx":
            raise ValueError("--int8 writes an ONNX model; drop --format or use --format onnx")
        if not args.int8 and (args.calibrate or args.report):
            raise ValueError("--calibrate / --report go with --int8")

        overrides = parse_overrides(args.override)
        if _looks_like_file(args.source):
            ckpt = Path(args.source)
            if not ckpt.exists():
                raise FileNotFoundError(f"checkpoint file {ckpt} does not exist")
            if args.pretrained:
                raise ValueError("--pretrained loads released weights; it cannot be combined with a checkpoint file")
            if args.model:
                model = zoo.create_model(
                    args.model, checkpoint_path=ckpt, num_classes=args.num_classes, in_chans=args.in_chans, **overrides
                )
            else:  # a training output names its architecture, head and input size itself
                from zoo.deploy import load_trained_model

                if overrides or args.num_classes is not None or args.in_chans is not None:
                    raise ValueError("--override / --num-classes / --in-chans go with --model; a training output "
                                     "already records its architecture")
                model = load_trained_model(ckpt)
        else:
            if args.model and args.model != args.source:
                raise ValueError(f"--model is only for checkpoint files; {args.source!r} is not a file")
            model = zoo.create_model(
                args.source, pretrained=args.pretrained, num_classes=args.num_classes, in_chans=args.in_chans,
                **overrides,
            )
            if not args.pretrained:  # an easy slip: the file would look like a usable model
                print(f"zoo export: note: {args.source} is exported with RANDOM weights (add --pretrained for its "
                      f"released weights, or pass a checkpoint file); fine for shape / latency checks only",
                      file=sys.stderr)
        model.eval()
        size = tuple(args.input_size) if args.input_size else tuple(model.pretrained_cfg.input_size)
        if args.in_chans is not None and not args.input_size:
            size = (args.in_chans, *size[1:])
        if args.int8:
            return _export_int8(model, args, size)
        x = torch.randn(args.batch_size, *size)
        try:
            path = export(
                model, args.output, args.format, example_input=x, dynamic_batch=not args.static_batch,
                reparameterize=not args.no_reparameterize, check=not args.no_check, opset=args.opset,
            )
        except ExportParityError as e:
            return _error("export", f"parity check failed: {e}", 1)
        mb = Path(path).stat().st_size / 2**20
        checked = "not checked" if args.no_check else "parity checked against eager"
        print(f"wrote {path} ({args.format}, {mb:.1f} MiB, input {args.batch_size}x{'x'.join(map(str, size))}, {checked})")
        return 0

    return _run("export", work)


def _export_int8(model, args, size) -> int:
    """``zoo export --int8``: calibrate on a recipe's data (default: the training output's own run config)."""
    from zoo.deploy.quantize import QuantizationError, quantize

    calib = args.calibrate
    if calib is None and _looks_like_file(args.source):
        src = Path(args.source).resolve()
        found = [d / "config.yaml" for d in (src.parent, src.parent.parent) if (d / "config.yaml").is_file()]
        calib = str(found[0]) if found else None
    if calib is None:
        raise ValueError("--int8 needs calibration data: --calibrate RECIPE (e.g. quickstart, the recipe the model "
                         "was trained with) or --calibrate images.npy")
    if args.no_reparameterize:
        raise ValueError("--int8 quantizes the deploy form; drop --no-reparameterize")
    try:
        res = quantize(model, calib, args.output, method=args.calib_method, num_batches=args.calib_batches,
                       input_size=size)
    except QuantizationError as e:
        return _error("export", f"int8: {e}", 1)
    rep = res.report
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(rep, indent=2))
    mb = Path(res.path).stat().st_size / 2**20
    parts = [f"{rep['calibration_images']} calibration images ({args.calib_method})"]
    if "top1_agreement" in rep:
        parts.append(f"top-1 agreement with fp32 {100 * rep['top1_agreement']:.1f} % on {rep['images']} test images")
    if "max_logit_err" in rep:
        parts.append(f"max |int8 - fp32| {rep['max_logit_err']:.3g}")
    if "int8_top1" in rep:
        parts.append(f"accuracy fp32 {100 * rep['fp32_top1']:.1f} % / int8 {100 * rep['int8_top1']:.1f} %")
    print(f"wrote {res.path} (int8 ONNX, {mb:.1f} MiB, input Nx{'x'.join(map(str, size))}; {'; '.join(parts)}; "
          f"fp32 kept: {', '.join(rep['fp32_op_types']) or 'none'})")
    return 0
