"""Static int8 post-training quantization of the deploy form, with onnxruntime's quantization tooling.

    from zoo.deploy import quantize
    res = quantize(model, "quickstart", "model.int8.onnx", method="percentile")   # recipe name, DataModule, tensor
    print(res.report)      # int8 vs fp32 on the test split: top-1 agreement, max logit error, accuracies
    # a text encoder takes token ids: calibrate on tokenized captions (a recipe's DataModule, or texts + tokenizer)
    res = quantize(clip.text, "mobileclip/digits_teacher", "text.int8.onnx")   # report: embedding cosine similarity

Flow: reparameterize -> fp32 ONNX (``zoo.deploy.export``, parity-checked) -> onnxruntime's ``quant_pre_process``
(shape inference, graph fusions) -> ``quantize_static`` in QDQ format (int8 per-channel symmetric weights, uint8
activations calibrated on a fixed number of batches: MinMax / Percentile / Entropy / moving-average MinMax) -> a
parity report of the int8 model against the fp32 one on the test split. The file appears at ``path`` only when
everything passed.

What stays fp32 is declared in one place, :data:`FAMILY_RULES`: every family gets the default rule (weighted layers
and the ops between them quantized, the tail after the last weighted layer, e.g. a detector's box decoding and NMS,
left in fp32); a family that needs more (attention softmax in fp32, ...) adds an entry keyed by its module name.

Token-id models (a CLIP text encoder: ``vocab_size`` and ``context_length`` attributes) are calibrated on integer
(N, L) token batches (``batch["text"]`` of a caption DataModule, an integer tensor, or texts with ``tokenizer=``);
their embedding table is quantized when the family rule lists ``Gather`` (int8 table, fp32 lookup result).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "moving_average")
# ops onnxruntime quantizes in QDQ form by default; everything else (Softmax, Exp, Div, Greater, NonMaxSuppression,
# TopK on scores, ...) stays fp32 unless a family rule adds it
DEFAULT_OP_TYPES = (
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice",
)
WEIGHTED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class QuantizationError(RuntimeError):
    """Quantization could not produce a usable int8 model (bad calibration data, an op the tooling cannot handle)."""


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """What a family keeps in fp32 and why.

    Args:
        fp32_op_types: op types never quantized (on top of everything outside ``DEFAULT_OP_TYPES``).
        fp32_outputs_of: op types whose outputs stay fp32 (their inputs and weights are still int8).
        fp32_tail: keep every node after the last weighted layer in fp32 (post-processing, decoding).
        fp32_depthwise: keep grouped (depthwise) convolutions in fp32.
        int8_op_types: op types quantized on top of ``DEFAULT_OP_TYPES`` (e.g. ``Gather``: a token embedding table).
        why: the reason, shown in the report.
    """

    fp32_op_types: tuple[str, ...] = ()
    int8_op_types: tuple[str, ...] = ()
    fp32_outputs_of: tuple[str, ...] = ()
    fp32_tail: bool = True
    fp32_depthwise: bool = False
    why: str = ""


# THE place where families declare their int8 special handling, keyed by the last part of the model class's module
# (``zoo.vision.nextvit`` -> ``nextvit``); families without an entry (DocLayout-YOLO, new ones) get the default.
FAMILY_RULES: dict[str, QuantRule] = {
    "default": QuantRule(why="weighted layers and the ops between them in int8; the tail after the last weighted "
                             "layer (decoding, NMS) in fp32"),
    "nextvit": QuantRule(fp32_op_types=("Softmax",), why="attention softmax in fp32 (E-MHSA)"),
    "fastvit": QuantRule(fp32_op_types=("Softmax",), why="attention softmax in fp32 (stage-4 MHSA)"),
    "mobileclip": QuantRule(fp32_op_types=("Softmax", "LayerNormalization"), int8_op_types=("Gather",),
                            why="attention softmax and LayerNorm in fp32 (text and image transformers); the text "
                                "tower's token embedding table int8 (Gather), the token ids stay int64"),
    "fmvit": QuantRule(fp32_op_types=("Softmax",), why="attention softmax in fp32"),
    "pp_mobileseg": QuantRule(fp32_op_types=("Softmax",), why="attention softmax in fp32"),
    "mobiledets": QuantRule(why="box decoding, score sigmoid and NMS after the SSDLite head in fp32"),
}


def rule_for(model: nn.Module) -> tuple[str, QuantRule]:
    family = type(model).__module__.rsplit(".", 1)[-1]
    return (family, FAMILY_RULES[family]) if family in FAMILY_RULES else ("default", FAMILY_RULES["default"])


@dataclasses.dataclass
class QuantizationResult:
    path: Path
    report: dict[str, Any]
    fp32_path: Path | None = None

    def session(self, threads: int | None = None):
        return ort_session(self.path, threads)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimizations (QDQ pairs fuse into QLinear* / int8 kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------- data


def datamodule_from_recipe(recipe: str | os.PathLike):
    """Instantiate the DataModule of a recipe (packaged name or YAML file) without building its model or trainer.

    The recipe's ``data`` section is used as Lightning's CLI would; the model name is passed on like the CLI's link
    (``model.init_args.model_name`` -> ``data.init_args.model_name``) when the DataModule takes one.
    """
    import importlib
    import inspect

    import yaml

    from zoo.recipes import resolve_recipe

    path = resolve_recipe(str(recipe))
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    data = cfg.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"recipe {path} has no data: class_path section to calibrate with")
    mod, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    kwargs = dict(data.get("init_args") or {})
    model_name = ((cfg.get("model") or {}).get("init_args") or {}).get("model_name")
    if model_name and "model_name" in inspect.signature(cls).parameters and "model_name" not in kwargs:
        kwargs["model_name"] = model_name
    return cls(**kwargs)


def _images(batch) -> torch.Tensor:
    """The image tensor of a batch: a tensor, the first item of a tuple/list, or ``batch['image'|'images'|...]``."""
    if isinstance(batch, dict):
        for k in ("image", "images", "pixel_values", "input"):
            if k in batch:
                return _images(batch[k])
        raise QuantizationError(f"a calibration batch is a dict without an image entry (keys {sorted(batch)})")
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise QuantizationError("an empty calibration batch")
        if isinstance(batch[0], torch.Tensor) and batch[0].dim() == 3 and len(batch) > 1 and all(
            isinstance(b, torch.Tensor) and b.shape == batch[0].shape for b in batch
        ):
            return torch.stack(list(batch))  # a list of same-size images
        return _images(batch[0])
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise QuantizationError(f"a calibration batch of type {type(batch).__name__}; expected images (N, C, H, W)")
    return batch


TOKEN_KEYS = ("text", "input_ids", "tokens")


def takes_tokens(model: nn.Module) -> bool:
    """A token-id model (e.g. a CLIP text encoder): integer ``vocab_size`` and ``context_length`` attributes."""
    return all(isinstance(getattr(model, a, None), int) for a in ("vocab_size", "context_length"))


def _tokens(batch, tokenizer=None) -> torch.Tensor:
    """The (N, L) token ids of a batch: an integer tensor, the first item of a tuple, ``batch['text'|'input_ids'|
    'tokens']``, or a list of texts run through ``tokenizer``."""
    if isinstance(batch, dict):
        for k in TOKEN_KEYS:
            if k in batch:
                return _tokens(batch[k], tokenizer)
        raise QuantizationError(f"a calibration batch is a dict without token ids (keys {sorted(batch)}; expected "
                                f"one of {', '.join(TOKEN_KEYS)})")
    if isinstance(batch, str):
        batch = [batch]
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, str) for t in batch):
        if tokenizer is None:
            raise QuantizationError("calibration texts need a tokenizer: pass tokenizer= (e.g. "
                                    "zoo.get_tokenizer(model_name)) or token ids")
        return torch.as_tensor(tokenizer(list(batch)))
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise QuantizationError("an empty calibration batch")
        return _tokens(batch[0], tokenizer)
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise QuantizationError(f"a calibration batch of type {type(batch).__name__}; expected token ids (N, L)")
    return batch


def _model_input(batch, tokens: bool, tokenizer=None) -> torch.Tensor:
    if tokens:
        return _tokens(batch, tokenizer).detach().cpu()
    return _images(batch).detach().float().cpu()


def _first_matching(loaders: Sequence, tokens: bool):
    """Of a DataModule's several loaders for one split (e.g. zero-shot images and caption pairs), the first whose
    batches hold what the model takes (token ids or images)."""
    for dl in loaders:
        batch = next(iter(dl), None)
        if batch is None:
            continue
        if not tokens or isinstance(batch, dict) and any(k in batch for k in TOKEN_KEYS) or (
                isinstance(batch, torch.Tensor) and not batch.is_floating_point()):
            return dl
    want = "token ids" if tokens else "images"
    raise QuantizationError(f"none of the {len(loaders)} loaders of this split gives {want}")


def _labels(batch):
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and not isinstance(batch[0], (int, float)):
        return batch[1]
    if isinstance(batch, dict):
        return batch.get("label", batch.get("labels"))
    return None


def _loader(data, split: str, tokens: bool = False):
    """An iterable of batches for ``split`` from a DataModule, recipe, tensor/array/file, list of texts (``tokens``)
    or iterable of batches."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.suffix in (".npy", ".pt", ".pth") and p.is_file():
            arr = torch.from_numpy(np.load(p)) if p.suffix == ".npy" else torch.load(p, map_location="cpu",
                                                                                    weights_only=True)
            return _loader(arr, split, tokens)
        data = datamodule_from_recipe(data)
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        want = 2 if tokens else 4
        if data.dim() != want:
            raise QuantizationError(f"calibration {'token ids' if tokens else 'images'} of shape {tuple(data.shape)}; "
                                    f"expected {'(N, L)' if tokens else '(N, C, H, W)'}")
        return [data[i:i + 8] for i in range(0, len(data), 8)]
    if tokens and isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return [list(data[i:i + 8]) for i in range(0, len(data), 8)]  # texts, tokenized per batch
    if hasattr(data, "train_dataloader") and hasattr(data, "setup"):  # a LightningDataModule
        data.setup("fit" if split == "train" else split)
        loader = getattr(data, f"{split}_dataloader")()
        return _first_matching(loader, tokens) if isinstance(loader, (list, tuple)) else loader
    return data


def calibration_batches(data, num_batches: int, split: str = "train", seed: int = 0, tokens: bool = False,
                        tokenizer=None) -> list[torch.Tensor]:
    """The first ``num_batches`` image (or, with ``tokens``, token-id) batches of ``split`` (deterministic: the
    loader's sampler and any augmentation draw from generators seeded with ``seed``)."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 (got {num_batches})")
    loader = _loader(data, split, tokens)
    out: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in loader:
            out.append(_model_input(batch, tokens, tokenizer))
            if len(out) == num_batches:
                break
    return out


# ------------------------------------------------------------------------------------------------- graph


def _tail_nodes(model_proto) -> list[str]:
    """Names of the nodes that come after the last weighted layer on every path (no weighted descendant)."""
    nodes = list(model_proto.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    feeds: dict[int, bool] = {}  # node -> some weighted node at or after it

    def leads(i: int, depth: int = 0) -> bool:
        if i in feeds:
            return feeds[i]
        feeds[i] = False  # graphs are acyclic; guards recursion
        n = nodes[i]
        res = n.op_type in WEIGHTED_OP_TYPES or any(leads(j) for t in n.output for j in consumers.get(t, ()))
        feeds[i] = res
        return res

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(nodes) + 1000))
    try:
        # visit from the end backwards so the recursion stays shallow on long chains
        for i in reversed(range(len(nodes))):
            leads(i)
    finally:
        sys.setrecursionlimit(limit)
    return [nodes[i].name for i in range(len(nodes)) if not feeds[i]]


def _check_tokens(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Token batches: integer (N, L), one L for all (the export fixes it), at most the context, ids in the vocab."""
    ctx, vocab = model.context_length, model.vocab_size
    for i, b in enumerate(batches):
        if b.dim() != 2 or b.is_floating_point():
            raise QuantizationError(
                f"calibration batch {i} has shape {tuple(b.shape)} ({b.dtype}) but {type(model).__name__} takes "
                "token ids, an integer (N, L) tensor: calibrate with tokenized texts (a caption DataModule, or "
                "texts with tokenizer=)")
        if b.shape[1] != batches[0].shape[1] or b.shape[1] > ctx:
            raise QuantizationError(
                f"calibration batch {i} has {b.shape[1]} tokens per row (batch 0: {batches[0].shape[1]}); every "
                f"batch needs the same length, at most the context length {ctx}: tokenize with "
                f"context_length={ctx}")
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab):
            raise QuantizationError(f"calibration batch {i} has token ids outside [0, {vocab}) (the vocabulary)")


class _Reader:
    """onnxruntime CalibrationDataReader over fixed numpy batches."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]):
        self.name, self.batches, self.i = name, list(batches), 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    m = method.lower().replace("-", "").replace("_", "")
    table = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy, "movingaverage": CalibrationMethod.MinMax}
    if m not in table:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    return table[m]


# ------------------------------------------------------------------------------------------------- report


def _outputs(sess, x: np.ndarray) -> list[np.ndarray]:
    return sess.run(None, {sess.get_inputs()[0].name: x})


def parity_report(fp32_path, int8_path, batches: Iterable, threads: int | None = None, tokens: bool = False,
                  tokenizer=None) -> dict[str, Any]:
    """int8 against fp32 (both run by onnxruntime) on ``batches`` of images or (images, labels) (or, with
    ``tokens``, of token ids).

    For every output: max / mean absolute error, the fp32 output scale and the cosine similarity of int8 and fp32
    along the last axis (min and mean over rows: the figure for embeddings); for an output with a class axis
    (last), the agreement of the arg-max (top-1 agreement for logits; per-anchor class for a detector head). With
    integer labels, fp32 and int8 top-1 accuracy.
    """
    s32, s8 = ort_session(fp32_path, threads), ort_session(int8_path, threads)
    n = 0
    stats: list[dict[str, float]] = []
    correct32 = correct8 = labelled = 0
    for batch in batches:
        x = _model_input(batch, tokens, tokenizer).numpy()
        y = None if tokens else _labels(batch)
        o32, o8 = _outputs(s32, x), _outputs(s8, x)
        if not stats:
            stats = [dict(max_abs_err=0.0, sum_abs_err=0.0, count=0, scale=0.0, agree=0, argmax_n=0, cos_min=1.0,
                          cos_sum=0.0, cos_n=0) for _ in o32]
        for st, a, b in zip(stats, o32, o8):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.size == 0:
                continue
            d = np.abs(a - b)
            st["max_abs_err"] = max(st["max_abs_err"], float(d.max()))
            st["sum_abs_err"] += float(d.sum())
            st["count"] += d.size
            st["scale"] = max(st["scale"], float(np.abs(a).max()))
            if a.ndim >= 2 and a.shape[-1] > 1:
                norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
                cos = np.where(norms > 0, (a * b).sum(-1) / np.maximum(norms, 1e-30), 1.0)
                st["cos_min"] = min(st["cos_min"], float(cos.min()))
                st["cos_sum"] += float(cos.sum())
                st["cos_n"] += cos.size
            if a.ndim >= 2 and a.shape[-1] > 1 and np.issubdtype(np.asarray(o32[0]).dtype, np.floating):
                st["agree"] += int((a.argmax(-1) == b.argmax(-1)).sum())
                st["argmax_n"] += int(np.prod(a.shape[:-1]))
        if isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point() and o32[0].ndim == 2:
            yy = y.numpy()
            correct32 += int((o32[0].argmax(-1) == yy).sum())
            correct8 += int((o8[0].argmax(-1) == yy).sum())
            labelled += len(yy)
        n += len(x)
    if n == 0:
        raise QuantizationError("the test data for the parity report is empty")
    outs = []
    for st in stats:
        o = {"max_abs_err": st["max_abs_err"], "mean_abs_err": st["sum_abs_err"] / max(1, st["count"]),
             "fp32_scale": st["scale"]}
        if st["cos_n"]:
            o["cosine_min"], o["cosine_mean"] = st["cos_min"], st["cos_sum"] / st["cos_n"]
        if st["argmax_n"]:
            o["argmax_agreement"] = st["agree"] / st["argmax_n"]
        outs.append(o)
    rep: dict[str, Any] = {"images": n, "outputs": outs}
    if "argmax_agreement" in outs[0] and not tokens:
        rep["top1_agreement"] = outs[0]["argmax_agreement"]
    if "cosine_min" in outs[0]:
        rep["cosine_min"], rep["cosine_mean"] = outs[0]["cosine_min"], outs[0]["cosine_mean"]
    rep["max_logit_err"] = outs[0]["max_abs_err"]
    if labelled:
        rep["fp32_top1"], rep["int8_top1"] = correct32 / labelled, correct8 / labelled
    return rep


# ------------------------------------------------------------------------------------------------- quantize


def quantize(
    model: nn.Module,
    calibration_data,
    path: str | os.PathLike,
    *,
    method: str = "minmax",
    num_batches: int = 8,
    min_samples: int = 16,
    percentile: float = 99.999,
    per_channel: bool = True,
    test_data="auto",
    reparameterize: bool = True,
    input_size: Sequence[int] | None = None,
    fp32_path: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    family: str | None = None,
    tokenizer=None,
    quant_format: str = "qdq",
    reduce_range: bool = False,
    extra_options: dict | None = None,
) -> QuantizationResult:
    """Static int8 quantization of ``model``'s deploy form to an ONNX file run by onnxruntime.

    Args:
        calibration_data: a recipe (packaged name such as ``"quickstart"`` or a YAML path; its DataModule's train
            split is used), a LightningDataModule, an iterable of batches (images or (images, labels)), a tensor /
            array (N, C, H, W) or a ``.npy`` / ``.pt`` file of one. For a token-id model (:func:`takes_tokens`,
            e.g. ``clip.text``): batches of integer token ids (N, L) (a caption DataModule's ``batch["text"]``), an
            integer tensor, or a list of texts with ``tokenizer``.
        path: the int8 ONNX file to write (only written when quantization and the report succeeded).
        method: activation calibration, ``minmax``, ``percentile`` (``percentile`` of |x|), ``entropy`` or
            ``moving_average`` (the mean over the calibration batches of each batch's min / max: the ranges the
            fake quantizers of quantization-aware training (:func:`prepare_qat`) use, so deploy a QAT model with it).
        num_batches: calibration batches (the first ones of the split, deterministic); at least ``min_samples``
            images in all.
        test_data: what the parity report runs on: ``"auto"`` (the test split when ``calibration_data`` is a
            recipe or DataModule, else the calibration batches), anything ``calibration_data`` accepts, or ``None``.
        input_size: (C, H, W) the model takes (default: ``model.pretrained_cfg.input_size``); calibration batches of
            another shape are refused.
        fp32_path: also keep the fp32 ONNX file the int8 one was made from.
        family: the :data:`FAMILY_RULES` entry to apply (default: the one of the model class's module).
        tokenizer: texts -> (N, L) token ids, for calibration / test data given as texts.
        quant_format: ``"qdq"`` (QuantizeLinear / DequantizeLinear pairs, fused by onnxruntime at session time) or
            ``"qoperator"`` (QLinearConv / QLinearMatMul ... nodes written into the file).
        reduce_range / extra_options: passed on to onnxruntime's ``quantize_static`` (``extra_options`` updates
            the defaults, e.g. ``{"ActivationSymmetric": True}``).

    Returns:
        :class:`QuantizationResult` with ``path`` and ``report`` (family rule, quantized node counts and the int8 vs
        fp32 parity: ``top1_agreement``, ``max_logit_err``, ``cosine_min`` / ``cosine_mean`` of the outputs,
        accuracies when the test data has labels).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from zoo.deploy.export import export

    import onnx

    calib_method = _ort_method(method)
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format.lower() not in formats:
        raise ValueError(f"unknown quant_format {quant_format!r}; choose from {', '.join(formats)}")
    fmt = formats[quant_format.lower()]
    path = Path(path)
    if family is not None and family not in FAMILY_RULES:
        raise ValueError(f"unknown family {family!r}; FAMILY_RULES has {', '.join(FAMILY_RULES)}")
    family, rule = rule_for(model) if family is None else (family, FAMILY_RULES[family])
    tokens = takes_tokens(model)
    batches = calibration_batches(calibration_data, num_batches, "train", seed, tokens, tokenizer)
    n_calib = sum(len(b) for b in batches)
    if len(batches) < num_batches or n_calib < min_samples:
        raise QuantizationError(
            f"too few calibration samples: the data gave {len(batches)} batch(es), {n_calib} "
            f"{'token sequence' if tokens else 'image'}(s); "
            f"num_batches={num_batches} and at least min_samples={min_samples} images are needed (pass more data, "
            "or lower num_batches / min_samples)")
    if tokens:
        _check_tokens(model, batches)
    elif input_size is None:
        cfg = getattr(model, "pretrained_cfg", None)
        input_size = getattr(cfg, "input_size", None) if cfg is not None and not isinstance(cfg, dict) else (
            cfg.get("input_size") if isinstance(cfg, dict) else None)
    for i, b in enumerate([] if tokens else batches):
        if b.dim() != 4 or (input_size is not None and tuple(b.shape[1:]) != tuple(input_size)):
            want = f"(N, {', '.join(map(str, input_size))})" if input_size is not None else "(N, C, H, W)"
            raise QuantizationError(
                f"calibration batch {i} has shape {tuple(b.shape)} but the model takes {want}: calibrate with the "
                "data (recipe) the model was trained with, or pass input_size= for a model exported at another size")
        if not torch.isfinite(b).all():
            raise QuantizationError(f"calibration batch {i} holds NaN or inf values")
    if test_data == "auto":
        is_dm = isinstance(calibration_data, (str, os.PathLike)) and not str(calibration_data).endswith(
            (".npy", ".pt", ".pth")) or hasattr(calibration_data, "test_dataloader")
        test_data = _loader(calibration_data, "test", tokens) if is_dm else batches
    elif test_data is not None:
        test_data = _loader(test_data, "test", tokens)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".quantize-") as work:
        work = Path(work).resolve()
        f32, pre = work / "fp32.onnx", work / "pre.onnx"
        example = batches[0][:2]
        try:
            # export's own check perturbs float inputs; token ids are checked here, at another batch size
            deployed = export(model, f32, "onnx", example_input=example, reparameterize=reparameterize,
                              check=not tokens)
            if tokens:
                from zoo.deploy.export import onnx_parity

                onnx_parity(deployed, model.eval(), torch.cat([example, batches[0][-1:]]))
        except Exception as e:  # noqa: BLE001 - named for the user
            raise QuantizationError(f"the deploy form of {type(model).__name__} does not export to ONNX, so it "
                                    f"cannot be quantized: {type(e).__name__}: {e}") from e
        try:
            # when its symbolic shape inference is incomplete, onnxruntime dumps the graph (plus a uuid-named weights
            # file) into the current directory before raising: keep that litter in the work folder
            with contextlib.chdir(work):
                quant_pre_process(str(f32), str(pre), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - fusions are an optimization; quantize the exported graph as is
            log.warning("onnxruntime quant_pre_process failed (%s); quantizing the graph without its fusions", e)
            pre = f32
        proto = onnx.load(str(pre))
        present = {n.op_type for n in proto.graph.node}
        op_types = [t for t in (*DEFAULT_OP_TYPES, *rule.int8_op_types) if t in present
                    and t not in rule.fp32_op_types]
        if not any(t in present for t in WEIGHTED_OP_TYPES):
            raise QuantizationError(
                f"{type(model).__name__} has no op the int8 quantizer handles (no Conv / MatMul / Gemm in its ONNX "
                f"graph; ops: {', '.join(sorted(present))}): nothing to quantize")
        exclude = _tail_nodes(proto) if rule.fp32_tail else []
        if rule.fp32_depthwise:
            exclude += [n.name for n in proto.graph.node if n.op_type == "Conv"
                        and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        input_name = proto.graph.input[0].name
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": percentile,
                 "CalibTensorRangeSymmetric": False, **(extra_options or {})}
        if method.lower().replace("-", "").replace("_", "") == "movingaverage":
            # onnxruntime's MinMax with CalibMovingAverage: the mean over the batches of each batch's min / max,
            # the range torch's MovingAverageMinMaxObserver (the QAT fake quantizers) converges to
            extra["CalibMovingAverage"] = True
        if rule.fp32_outputs_of:
            extra["OpTypesToExcludeOutputQuantization"] = list(rule.fp32_outputs_of)
        del proto
        try:
            quantize_static(
                str(pre), str(tmp), _Reader(input_name, [b.numpy() for b in batches]),
                quant_format=fmt, op_types_to_quantize=op_types, per_channel=per_channel,
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, calibrate_method=calib_method, extra_options=extra,
            )
            qproto = onnx.load(str(tmp))
            n_q = sum(n.op_type == "QuantizeLinear" for n in qproto.graph.node)
            n_dq = sum(n.op_type == "DequantizeLinear" for n in qproto.graph.node)
            if fmt == QuantFormat.QOperator:  # int8 nodes written as such: count those
                n_dq = sum(n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or
                           n.op_type == "DequantizeLinear" for n in qproto.graph.node)
            fp32_ops = sorted({n.op_type for n in qproto.graph.node if n.op_type not in op_types
                               and n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                               and not n.op_type.startswith("QLinear") and not n.op_type.endswith("Integer")})
            del qproto
            if n_dq == 0:
                raise QuantizationError(f"onnxruntime quantized no node of {type(model).__name__}")
            report: dict[str, Any] = {
                "family": family, "rule": rule.why, "method": method, "per_channel": per_channel,
                "format": quant_format.lower(), "reduce_range": reduce_range,
                "inputs": "token ids" if tokens else "images",
                "calibration_batches": len(batches), "calibration_images": n_calib,
                "quantize_nodes": n_q, "dequantize_nodes": n_dq, "fp32_op_types": fp32_ops,
                "fp32_tail_nodes": len(exclude),
            }
            if test_data is not None:
                report.update(parity_report(f32, tmp, test_data, threads, tokens, tokenizer))
            if fp32_path is not None:
                fp32_path = Path(fp32_path)
                fp32_path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f32, fp32_path)
            os.replace(tmp, path)
        except QuantizationError:
            raise
        except Exception as e:  # noqa: BLE001 - the quantizer's own errors name the node; say what failed
            raise QuantizationError(f"onnxruntime could not quantize {type(model).__name__}: {type(e).__name__}: {e}"
                                    ) from e
        finally:
            tmp.unlink(missing_ok=True)
    return QuantizationResult(path=path, report=report, fp32_path=Path(fp32_path) if fp32_path else None)


# ------------------------------------------------------------------------------------------------- QAT
#
# The fake quantizers sit where the int8 graph that quantize() deploys has its Q/DQ pairs, so fine-tuning trains
# for the grid that is deployed. In onnxruntime's QDQ graph of the exported deploy form (BatchNorm folded):
#   - every Conv / Gemm / MatMul weight: int8 per output channel, symmetric, [-127, 127] (absmax / 127)
#   - every activation tensor entering or leaving a quantized op: uint8 affine, one range per tensor; that is the
#     folded conv's output *before* its activation (e.g. the input of HardSigmoid / Mul of a hard-swish), the
#     HardSigmoid / Sigmoid output feeding the Mul, the Mul output, a residual Add's output, an SE block's product,
#     a pooled tensor entering a conv, the network input
#   - except a ReLU / ReLU6 (Relu / Clip) right after a conv: the quantizer removes it and quantizes the conv output
#     with the activation's range (one Q/DQ, after the activation)
#   - the tail after the last weighted layers (box decoding, NMS) stays fp32.
# torch has no graph for this, so module hooks stand in for the ONNX tensors: a forward hook fake-quantizes the
# output of every module (not the root) unless the output already is a fake-quantized tensor (marked by an
# attribute) or the module is a conv followed by its BatchNorm (the fold) or a conv / BatchNorm followed by a ReLU
# (the merge); a pre-hook on every conv / linear fake-quantizes an input no hook has quantized (functional ops:
# ``x.mean()``, the image); hard-swish / SiLU (exported as HardSigmoid / Sigmoid + Mul) quantize the gate and the
# product. Activations run out of place during QAT (an in-place activation would overwrite its quantized input).

_MERGED_ACTS = (nn.ReLU, nn.ReLU6)  # onnxruntime's removable activations (Relu, Clip)
_GATED_ACTS = {nn.Hardswish: torch.nn.functional.hardsigmoid, nn.SiLU: torch.sigmoid}  # x * gate(x) in ONNX
_MARK = "_zoo_int8_fq"


def _act_fake_quant(device):
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    # uint8 affine per tensor, the range including 0, scale (max - min) / 255: onnxruntime's activation scheme
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine).to(device)


def _marked(t) -> bool:
    return getattr(t, _MARK, False)


def _fq(fq, t: torch.Tensor) -> torch.Tensor:
    out = fq(t)
    setattr(out, _MARK, True)
    return out


def _unfused_outputs(model: nn.Module) -> set[int]:
    """ids of modules whose output is not a tensor of the deployed int8 graph: a conv / linear directly followed by
    its BatchNorm (folded), a conv or BatchNorm directly followed by a ReLU / ReLU6 (merged by the quantizer).
    "Directly followed": the next child of the same parent in registration order (``nn.Sequential``, ConvNorm's
    conv / norm / act), skipping ``nn.Identity``."""
    out: set[int] = set()
    for parent in model.modules():
        kids = [m for m in parent.children() if not isinstance(m, nn.Identity)]
        for a, b in zip(kids, kids[1:]):
            if isinstance(a, (nn.Conv1d, nn.Conv2d, nn.Linear)) and isinstance(b, nn.modules.batchnorm._BatchNorm):
                out.add(id(a))
            if isinstance(a, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) and isinstance(
                    b, _MERGED_ACTS):
                out.add(id(a))
    return out


class _QatHooks(list):
    """The hook handles of :func:`prepare_qat` with their fake quantizers and the activations made out of place."""

    fake_quants: list
    inplace: list


def prepare_qat(model: nn.Module, activations: bool = True, weights: bool = True) -> list:
    """Insert int8 fake quantization (``torch.ao.quantization.FakeQuantize``) for quantization-aware fine-tuning at
    the places :func:`quantize` puts its Q/DQ pairs (see the comment above): per-channel symmetric int8 weights of
    every Conv / Linear (a weight parametrization; BatchNorm folding afterwards scales each output channel, which
    keeps its symmetric per-channel grid) and uint8 affine activations on every tensor of the deployed int8 graph
    (module hooks); ``activations`` / ``weights`` switch either off. Returns the hook handles for :func:`remove_qat`
    / :func:`set_qat_observers`."""
    import torch.nn.utils.parametrize as P
    from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver, ObserverBase

    handles = _QatHooks()
    handles.fake_quants, handles.inplace = [], []
    device = next(model.parameters()).device
    modules = [m for m in model.modules() if not isinstance(m, (P.ParametrizationList, FakeQuantize, ObserverBase))]
    for m in modules if weights else ():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not P.is_parametrized(m, "weight"):
            # averaging_constant=1: the range of the current weights, as the post-training quantizer will see them
            fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, quant_min=-127,
                              quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
            P.register_parametrization(m, "weight", fq.to(m.weight.device))
    if not activations:
        return handles
    unfused = _unfused_outputs(model)

    def new_fq():
        fq = _act_fake_quant(device)
        handles.fake_quants.append(fq)
        return fq

    for m in modules:  # the model's own modules, not the weight fake quantizers just added
        if m is model:
            continue
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            handles.inplace.append(m)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            def pre(mod, args, fq=new_fq()):
                x = args[0]
                if isinstance(x, torch.Tensor) and x.is_floating_point() and not _marked(x):
                    return (_fq(fq, x), *args[1:])
                return None

            handles.append(m.register_forward_pre_hook(pre))
        if id(m) in unfused or isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):  # no op in the graph
            continue
        gate = next((g for t, g in _GATED_ACTS.items() if type(m) is t), None)
        if gate is not None:
            def gated(mod, args, out, gate=gate, fq_g=new_fq(), fq_y=new_fq()):
                x = args[0]
                return _fq(fq_y, x * _fq(fq_g, gate(x)))

            handles.append(m.register_forward_hook(gated))
            continue

        def post(mod, args, out, fq=new_fq()):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and not _marked(out):
                return _fq(fq, out)
            return None

        handles.append(m.register_forward_hook(post))
    return handles


def remove_qat(model: nn.Module, handles: Sequence = ()) -> nn.Module:
    """Undo :func:`prepare_qat`: the float (latent) weights stay, the fake quantizers go."""
    import torch.nn.utils.parametrize as P

    for h in handles:
        h.remove()
    for m in getattr(handles, "inplace", ()):
        m.inplace = True
    for m in model.modules():
        if P.is_parametrized(m, "weight"):
            P.remove_parametrizations(m, "weight", leave_parametrized=False)
    return model


def plain_state_dict_keys(state: dict) -> dict:
    """A state dict of a model under :func:`prepare_qat` with the keys of the plain model (``x.weight``): the
    weight parametrization's ``parametrizations.weight.original`` renamed, its fake-quantizer buffers dropped."""
    out = {}
    for k, v in state.items():
        if ".parametrizations.weight.original" in k:
            out[k.replace(".parametrizations.weight.original", ".weight")] = v
        elif ".parametrizations.weight." not in k:
            out[k] = v
    return out


def set_qat_observers(model: nn.Module, handles: Sequence, enabled: bool) -> None:
    """Freeze (``False``) or resume (``True``) the range observers, e.g. frozen for validation."""
    from torch.ao.quantization import FakeQuantize

    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)] + list(getattr(handles, "fake_quants", ()))
    for fq in fqs:
        fq.enable_observer() if enabled else fq.disable_observer()
