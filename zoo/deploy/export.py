"""Export to ONNX, TorchScript or torch.export, with a parity check of the artifact at another batch size, and
the loader of training outputs (``load_trained_model``) that ``zoo export FILE`` uses."""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from zoo.deploy.reparam import reparameterize as _reparameterize

log = logging.getLogger(__name__)

_TWO_GB = 2 * 1024**3 - 1024**2


class ExportParityError(RuntimeError):
    pass


def _input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(input_size)
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        raise ValueError("input_size= is required for a model without pretrained_cfg (e.g. (3, 224, 224))")
    return tuple(cfg.input_size)


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _outputs(v)]
    return [t for v in out for t in _outputs(v)]


def _compare(name: str, ref: list[torch.Tensor], got: list, rtol: float, atol: float) -> float:
    if len(ref) != len(got):
        raise ExportParityError(f"{name}: {len(got)} outputs, eager gave {len(ref)}")
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        g = torch.as_tensor(g)
        if tuple(r.shape) != tuple(g.shape):
            raise ExportParityError(f"{name}: output {i} has shape {tuple(g.shape)}, eager {tuple(r.shape)}")
        r = r.float()
        g = g.float()
        err = (r - g).abs().max().item() if r.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        worst = max(worst, err)
        if err > atol + rtol * scale:
            raise ExportParityError(
                f"{name}: output {i} differs from eager by max |d|={err:.3g} (output scale {scale:.3g}, "
                f"allowed {atol + rtol * scale:.3g})"
            )
    return worst


def onnx_parity(path: str | os.PathLike, model: nn.Module, x: torch.Tensor, rtol=1e-4, atol=1e-5) -> float:
    """Run the ONNX file with onnxruntime on ``x`` and compare with eager ``model(x)``; returns the max abs error."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = _outputs(model(x))
    return _compare(f"onnxruntime on {Path(path).name} at batch {x.shape[0]}", ref, got, rtol, atol)


def _onnx_external_export(model, x, path: Path, dyn, opset, check, check_x, rtol, atol) -> None:
    """> 2 GB graphs keep their weights in a file named after the graph, so they are written under the final name;
    a failed check removes both files."""
    data = path.with_name(path.name + ".data")
    try:
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=dyn, input_names=["input"],
                          external_data=True, opset_version=opset, verbose=False)
        if check:
            onnx_parity(path, model, check_x, rtol, atol)
    except BaseException:
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise


@torch.no_grad()
def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    input_size: Sequence[int] | None = None,
    example_input: torch.Tensor | None = None,
    dynamic_batch: bool = True,
    reparameterize: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    opset: int | None = None,
) -> Path:
    """Export ``model`` (reparameterized first by default) and, with ``check``, verify the artifact against eager.

    The check runs at a batch size different from the one exported with, so a batch dimension that was frozen
    during tracing is caught. ONNX files under 2 GB are written as one self-contained file. When the check fails
    (``ExportParityError``) nothing is left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _reparameterize(model) if reparameterize else model.eval()
    if example_input is None:
        example_input = torch.randn(2, *_input_size(model, input_size))
    x = example_input
    check_x = torch.cat([x, x[:1] * 0.5], 0) if dynamic_batch else x * 0.5
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = ({0: batch},) if dynamic_batch else None

    if format not in ("onnx", "torchscript", "torch_export"):
        raise ValueError(f"unknown export format {format!r}; use 'onnx', 'torchscript' or 'torch_export'")
    # Written under a temporary name and checked there: only an artifact that passed its parity check ever
    # appears at ``path`` (a failed check leaves nothing behind, nor an earlier file half-replaced).
    if format == "onnx":
        nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        if nbytes >= _TWO_GB:
            _onnx_external_export(model, x, path, dyn, opset, check, check_x, rtol, atol)
            return path
    tmp = path.with_name(f".{path.name}.part")
    try:
        if format == "onnx":
            prog = torch.onnx.export(
                model, (x,), str(tmp), dynamo=True, dynamic_shapes=dyn, input_names=["input"],
                external_data=False, opset_version=opset, verbose=False,
            )
            del prog
            if check:
                err = onnx_parity(tmp, model, check_x, rtol, atol)
                log.info("ONNX parity at batch %d: max |d| = %.3g", check_x.shape[0], err)
        elif format == "torchscript":
            traced = torch.jit.trace(model, (x,), check_trace=False)
            traced.save(str(tmp))
            if check:
                loaded = torch.jit.load(str(tmp))
                _compare(f"torchscript at batch {check_x.shape[0]}", _outputs(model(check_x)), _outputs(loaded(check_x)), rtol, atol)
        else:
            prog = torch.export.export(model, (x,), dynamic_shapes=dyn)
            torch.export.save(prog, str(tmp))
            if check:
                loaded = torch.export.load(str(tmp)).module()
                _compare(f"torch.export at batch {check_x.shape[0]}", _outputs(model(check_x)), _outputs(loaded(check_x)), rtol, atol)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------ training outputs


def _read_training_output(path: Path) -> tuple[dict[str, Any], dict | None, list[str] | None]:
    """(create_model kwargs, data config, class names) recorded in a training output."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if not meta.get("model_name"):
            raise ValueError(
                f"{path} has no model_name in its metadata (not written by zoo.training.DeployExport or the SNN "
                "pipeline): pass the architecture, e.g. `zoo export FILE --model NAME --override KEY=VALUE`"
            )

        def parse(key):
            raw = meta.get(key)
            if not raw:
                return None
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return ast.literal_eval(raw)  # files written before the metadata was JSON

        args = dict(parse("model_args") or {})
        num_classes = meta.get("num_classes")
        kwargs = {"model_name": meta["model_name"], **args}
        if num_classes not in (None, "", "None"):
            kwargs["num_classes"] = int(num_classes)
        return kwargs, parse("data_config"), parse("class_names")
    if path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        hp = ckpt.get("hyper_parameters") or {}
        if not hp.get("model_name"):
            raise ValueError(f"{path}: a Lightning checkpoint without model_name in its hyper_parameters (not a zoo task)")
        kwargs = {"model_name": hp["model_name"], **dict(hp.get("model_args") or {})}
        if hp.get("num_classes") is not None:
            kwargs["num_classes"] = int(hp["num_classes"])
        if hp.get("timesteps") is not None and kwargs.get("spiking", True):  # IIR-SNN stages
            kwargs["timesteps"] = hp["timesteps"]
        return kwargs, ckpt.get("data_config"), ckpt.get("class_names")
    raise ValueError(f"{path}: expected a .safetensors training output or a Lightning .ckpt")


def _with_data_config(cfg, data_cfg: dict, num_classes: int | None):
    """The model config with the data config the model was trained with (input size, normalization)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct")
    upd = {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items() if k in keys}
    if num_classes is not None:
        upd["num_classes"] = num_classes
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, **{k: v for k, v in upd.items() if k in {f.name for f in dataclasses.fields(cfg)}})
    return type(cfg)({**cfg, **upd})


def load_trained_model(path: str | os.PathLike, *, deploy: bool = False) -> nn.Module:
    """Rebuild the model of a training output without naming its architecture: a ``deploy.safetensors`` written by
    :class:`zoo.training.DeployExport` (architecture, data config and class names in the file's metadata), an SNN
    pipeline ``model.safetensors``, or a Lightning ``.ckpt`` of a zoo task (its hyper-parameters).

    The model's ``pretrained_cfg`` holds the data config it was trained with, so timm's
    ``resolve_data_config({}, model=model)`` gives its preprocessing; ``model.class_names`` the labels when known.
    ``deploy`` folds a training-form file into the inference form (a deploy-form file is always built as such).
    """
    import zoo

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training output {path} does not exist")
    kwargs, data_cfg, names = _read_training_output(path)
    for k in ("pretrained", "checkpoint_path", "cache_dir", "features_only"):
        kwargs.pop(k, None)
    model = zoo.create_model(kwargs.pop("model_name"), checkpoint_path=path, deploy=deploy, **kwargs)
    if data_cfg and getattr(model, "pretrained_cfg", None) is not None:
        model.pretrained_cfg = _with_data_config(model.pretrained_cfg, data_cfg, kwargs.get("num_classes"))
    if names:
        model.class_names = list(names)
    return model.eval()
