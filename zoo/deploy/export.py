"""Export to ONNX, TorchScript or torch.export, with a parity check of the artifact at another batch size."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

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
    during tracing is caught. ONNX files under 2 GB are written as one self-contained file.
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

    if format == "onnx":
        nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        tmp = path.with_name(f".{path.name}.part")
        prog = torch.onnx.export(
            model, (x,), str(tmp), dynamo=True, dynamic_shapes=dyn, input_names=["input"],
            external_data=nbytes >= _TWO_GB, opset_version=opset, verbose=False,
        )
        del prog
        os.replace(tmp, path)
        if check:
            err = onnx_parity(path, model, check_x, rtol, atol)
            log.info("ONNX parity at batch %d: max |d| = %.3g", check_x.shape[0], err)
    elif format == "torchscript":
        traced = torch.jit.trace(model, (x,), check_trace=False)
        traced.save(str(path))
        if check:
            loaded = torch.jit.load(str(path))
            _compare(f"torchscript at batch {check_x.shape[0]}", _outputs(model(check_x)), _outputs(loaded(check_x)), rtol, atol)
    elif format == "torch_export":
        prog = torch.export.export(model, (x,), dynamic_shapes=dyn)
        torch.export.save(prog, str(path))
        if check:
            loaded = torch.export.load(str(path)).module()
            _compare(f"torch.export at batch {check_x.shape[0]}", _outputs(model(check_x)), _outputs(loaded(check_x)), rtol, atol)
    else:
        raise ValueError(f"unknown export format {format!r}; use 'onnx', 'torchscript' or 'torch_export'")
    return path
