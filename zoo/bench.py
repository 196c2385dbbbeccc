"""Latency bench: params, GMACs, median / p90 latency and throughput per model and runtime; CSV / JSON / Pareto plot.

    zoo bench nextvit_small nextvit_base --runtime eager,deploy,onnxruntime --threads 2 --plot pareto.png

Runtimes:
    eager        the training form in eval mode under ``torch.inference_mode()``
    deploy       the inference form (``zoo.deploy.reparameterize``); skipped for families without one
    onnxruntime  the deploy form exported to ONNX (dynamo exporter, parity-checked), run by onnxruntime's CPU provider
    compile      ``torch.compile`` of the deploy form (compile time is part of the warm-up, not of the timings)
    onnxruntime-int8  the deploy form quantized to int8 (``zoo.deploy.quantize``: QDQ, per-channel weights), run by
                 onnxruntime; calibrated on 16 random-normal inputs (a text tower: 16 rows of random token ids), so it
                 times the int8 graph, not its accuracy

CLIP models (``encode_image`` / ``encode_text``, e.g. ``mobileclip_s0``) are timed per encoder: rows ``NAME:image`` and
``NAME:text`` (random token ids filling the context), as the two are used apart.

Latency is wall time per call (``time.perf_counter``) after ``warmup`` untimed calls; ``median`` and ``p90`` are over
``iters`` timed calls, throughput is ``batch_size / median``. GMACs are counted once per model for one image with
``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (no memory, no compute; GMACs = FLOPs / 2).
Attention matmuls are counted (the fused CPU SDPA kernel has no formula in torch, so one is registered here), so a
count on real CPU tensors agrees with the meta count.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

RUNTIMES = ("eager", "deploy", "onnxruntime", "compile", "onnxruntime-int8")
COLUMNS = (
    "model", "runtime", "batch_size", "input_size", "threads", "params_m", "gmacs", "median_ms", "p90_ms",
    "mean_ms", "min_ms", "throughput", "top1", "iters", "error",
)


# ---------------------------------------------------------------------------------------------- counting


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flop_formulas() -> dict:
    """Formulas FlopCounterMode lacks: the fused CPU attention kernels (counted like the CUDA ones)."""
    from torch.utils import flop_counter

    extra = {}
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward),
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            extra[op] = fn
    return extra


def count_gmacs(model: nn.Module, x: torch.Tensor, *, by_op: bool = False) -> float | tuple[float, dict[str, float]]:
    """GMACs of one forward of ``model`` on ``x`` (FLOPs / 2 / 1e9). Put model and ``x`` on ``meta`` to count for free.

    With ``by_op=True`` also returns the GMACs per aten op (``aten.convolution``, ``aten.mm``, ``aten.bmm``, ...).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    total = counter.get_total_flops() / 2e9
    if not by_op:
        return total
    ops = {str(k): v / 2e9 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return total, ops


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clip_towers(model: nn.Module) -> dict[str, nn.Module] | None:
    """The image and text encoders of a CLIP model (open_clip's API: ``encode_image`` / ``encode_text`` with towers
    ``visual`` and ``text``), which the bench times separately; ``None`` for any other model."""
    if not (callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None))):
        return None
    towers = {"image": getattr(model, "visual", None), "text": getattr(model, "text", None)}
    return towers if all(isinstance(t, nn.Module) for t in towers.values()) else None


def text_tokens(model: nn.Module, batch_size: int, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    """Token ids filling a CLIP model's (or text tower's) context (the text tower runs the whole context whatever the
    caption length), each row with the end-of-text id (the largest id, which EOT pooling looks for) at its last
    position."""
    n_ctx, vocab = int(model.context_length), int(model.vocab_size)
    ids = torch.randint(1, vocab - 1, (batch_size, n_ctx), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = vocab - 1
    return ids.to(device)


def has_deploy_form(model: nn.Module) -> bool:
    """Whether reparameterization changes anything: some submodule implements ``reparameterize()``."""
    return any(callable(getattr(m, "reparameterize", None)) for m in model.modules())


def build(name: str, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """``zoo.create_model`` (random weights) on ``device``; on ``meta`` falls back to building on CPU and moving.

    The fallback covers constructors that read tensor values (e.g. ``torch.linspace(...).tolist()``), which the meta
    device cannot serve.
    """
    import zoo

    if str(device) != "meta":
        return zoo.create_model(name, **overrides).to(device)
    try:
        with torch.device("meta"):
            return zoo.create_model(name, **overrides)
    except (NotImplementedError, RuntimeError):
        return zoo.create_model(name, **overrides).to("meta")


def default_input_size(name: str, image_size: int | Sequence[int] | None = None, in_chans: int | None = None):
    """(C, H, W) from the model's config, with ``image_size`` (int or (H, W)) and ``in_chans`` replacing parts."""
    from zoo.registry import resolve_cfg

    c, h, w = resolve_cfg(name)[2].input_size
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return (in_chans or c, h, w)


def model_stats(name: str, image_size=None, *, deploy: bool = True, **overrides: Any) -> dict[str, Any]:
    """Params (training and deploy form) and GMACs of one image at the default (or given) input, all on ``meta``."""
    from zoo.deploy import reparameterize

    size = default_input_size(name, image_size, overrides.get("in_chans"))
    model = build(name, "meta", **overrides).eval()
    out: dict[str, Any] = {"model": name, "input_size": size, "params": count_params(model)}
    out["gmacs"] = count_gmacs(model, torch.empty(1, *size, device="meta"))
    out["has_deploy"] = has_deploy_form(model)
    out["deploy_params"] = None
    if deploy and out["has_deploy"]:
        with torch.device("meta"):  # blocks create their fused layers on the default device: keep them on meta
            out["deploy_params"] = count_params(reparameterize(model, inplace=True))
    return out


# ---------------------------------------------------------------------------------------------- timing


def _time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int, per_round: int = 1
                     ) -> dict[str, list[float]]:
    """Call times (ms) of each function, the functions taking turns round by round, so that a burst of load from other
    processes falls on all of them alike (compare their medians, not single runs)."""
    for fn in fns.values():
        _time_calls(fn, warmup, 0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += _time_calls(fn, 0, per_round)
    return times


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    s = sorted(times_ms)
    p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
    med = statistics.median(s)
    return {
        "median_ms": med,
        "p90_ms": p90,
        "mean_ms": statistics.fmean(s),
        "min_ms": s[0],
        "throughput": batch_size * 1e3 / med if med > 0 else float("inf"),
        "iters": len(s),
    }


class _Threads:
    """Set torch's (and onnxruntime's) intra-op thread count for a block; restore torch's afterwards."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return torch.get_num_threads()

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def measure(
    model: nn.Module,
    x: torch.Tensor,
    runtime: str = "eager",
    *,
    warmup: int = 5,
    iters: int = 20,
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Latency of ``model(x)`` in one runtime; ``model`` is the training form and is not modified.

    Returns ``median_ms, p90_ms, mean_ms, min_ms, throughput (img/s), iters, threads, params`` (of the form that ran).
    ``deploy``, ``onnxruntime`` and ``compile`` run the reparameterized copy; a model without a deploy form runs as
    is (callers that want to leave such rows out check :func:`has_deploy_form`). ``onnx_path``: an ONNX file of this
    model's deploy form that already exists (e.g. written and parity-checked by ``DeployExport``), timed by the
    ``onnxruntime`` runtime instead of exporting again.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0 (got iters={iters}, warmup={warmup})")
    from zoo.deploy import export, reparameterize

    model = model.eval()
    with _Threads(threads) as n_threads:
        if runtime == "eager":
            run_model = model
        else:
            run_model = reparameterize(model) if has_deploy_form(model) else model
        params = count_params(run_model)
        if runtime in ("onnxruntime", "onnxruntime-int8"):
            import onnxruntime as ort

            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                if runtime == "onnxruntime-int8":
                    from zoo.deploy.quantize import quantize, takes_tokens

                    if x.is_floating_point():
                        calib = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(0))
                    elif takes_tokens(run_model):  # a text encoder: random token ids as long as the timed ones
                        calib = text_tokens(run_model, 16, seed=1)[:, -x.shape[1]:]
                    else:
                        raise ValueError(
                            f"onnxruntime-int8 calibrates on random inputs; {type(model).__name__} takes {x.dtype} "
                            "inputs but is not a token-id model (integer vocab_size and context_length attributes): "
                            "give it float inputs or leave this runtime out for it")
                    path = quantize(run_model, calib, Path(tmp) / "model.int8.onnx", num_batches=2, test_data=None,
                                    reparameterize=False, input_size=tuple(x.shape[1:])).path
                elif onnx_path is None and not x.is_floating_point():  # token ids: export's check perturbs floats
                    from zoo.deploy import onnx_parity

                    # traced at twice the batch (a batch of 1 gets specialised), checked at the timed batch size
                    path = export(run_model, Path(tmp) / "model.onnx", "onnx", example_input=torch.cat([x, x]),
                                  reparameterize=False, check=False)
                    onnx_parity(path, run_model, x)
                else:
                    path = onnx_path or export(run_model, Path(tmp) / "model.onnx", "onnx", example_input=x,
                                               reparameterize=False)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = n_threads
                opts.inter_op_num_threads = 1
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x.numpy()}
            times = _time_calls(lambda: sess.run(None, feed), warmup, iters)
        else:
            if runtime == "compile":
                run_model = torch.compile(run_model)
                warmup = max(warmup, 2)  # the first call compiles
            with torch.inference_mode():
                times = _time_calls(lambda: run_model(x), warmup, iters)
    return {**summarize(times, x.shape[0]), "threads": n_threads, "params": params}


# ---------------------------------------------------------------------------------------------- many models


def expand_names(names: Iterable[str]) -> list[str]:
    """Registered names; glob patterns (``nextvit_*``) expand to every match."""
    from zoo.registry import get_entry, list_models

    out: list[str] = []
    for n in names:
        if any(ch in n for ch in "*?["):
            found = list_models(n)
            if not found:
                raise ValueError(f"no registered model matches {n!r}")
            out += found
        else:
            get_entry(n)  # raises with the closest names
            out.append(n)
    return list(dict.fromkeys(out))


def published_top1(name: str) -> float | None:
    from zoo.registry import resolve_cfg

    metrics = resolve_cfg(name)[2].metrics
    return metrics.get("top1")


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="run", dynamic_ncols=True)
    except ImportError:  # tqdm comes with huggingface_hub; keep a plain fallback anyway
        class _Plain:
            def __init__(self):
                self.i = 0

            def set_description_str(self, s):
                if enabled:
                    print(f"[{self.i + 1}/{total}] {s}", file=sys.stderr, flush=True)

            def update(self, n=1):
                self.i += n

            def close(self):
                pass

        return _Plain()


def bench_models(
    names: Sequence[str],
    *,
    runtimes: Sequence[str] = ("eager",),
    batch_size: int = 1,
    image_size: int | Sequence[int] | None = None,
    threads: int | None = None,
    warmup: int = 5,
    iters: int = 20,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    skip_errors: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark every model in every runtime; one row (dict with ``COLUMNS``) per (model, runtime).

    A CLIP model (:func:`clip_towers`) gives rows ``NAME:image`` (images of the input size) and ``NAME:text`` (token
    ids filling its context), each with its own params and GMACs.
    ``deploy`` / ``compile`` rows of a family without a deploy form are left out. With ``skip_errors`` a runtime that
    fails (e.g. an op the ONNX exporter lacks) gives a row with ``error`` set instead of stopping the bench.
    Published top-1 is attached only when no architecture override changes the model.
    """
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise ValueError(f"unknown runtime(s) {', '.join(bad)}; choose from {', '.join(RUNTIMES)}")
    overrides = dict(overrides or {})
    names = expand_names(names)
    arch_changed = any(k not in ("num_classes", "drop_rate", "drop_path_rate") for k in overrides)
    rows: list[dict[str, Any]] = []
    bar = _progress(len(names) * len(runtimes), progress)
    try:
        for name in names:
            size = default_input_size(name, image_size, overrides.get("in_chans"))
            bar.set_description_str(f"{name}: counting GMACs")
            meta = build(name, "meta", **overrides)
            torch.manual_seed(0)
            model = build(name, **overrides).eval()
            towers, image_desc = clip_towers(model), "x".join(map(str, size))
            # (row name, module, input, input description, GMACs of one sample)
            if towers is None:
                parts = [(name, model, torch.randn(batch_size, *size), image_desc,
                          count_gmacs(meta, torch.empty(1, *size, device="meta")))]
            else:  # a CLIP model: image and text encoders are used apart (e.g. cached class embeddings), so timed apart
                meta_towers = clip_towers(meta)
                parts = [
                    (f"{name}:image", towers["image"], torch.randn(batch_size, *size), image_desc,
                     count_gmacs(meta_towers["image"], torch.empty(1, *size, device="meta"))),
                    (f"{name}:text", towers["text"], text_tokens(model, batch_size), f"{model.context_length} tokens",
                     count_gmacs(meta_towers["text"], text_tokens(meta, 1, "meta"))),
                ]
            del meta
            for rt in runtimes:
                for label, module, x, input_desc, gmacs in parts:
                    bar.set_description_str(f"{label} [{rt}]")
                    base = {
                        "model": label, "runtime": rt, "batch_size": batch_size, "input_size": input_desc,
                        "gmacs": round(gmacs, 4), "top1": None if arch_changed else published_top1(name), "error": "",
                    }
                    if rt == "deploy" and not has_deploy_form(module):  # nothing to fold: same as eager
                        continue
                    try:
                        r = measure(module, x, rt, warmup=warmup, iters=iters, threads=threads)
                    except Exception as e:  # noqa: BLE001 - reported in the row, the bench goes on
                        if not skip_errors:
                            raise
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                        print(f"warning: {label} [{rt}] failed: {msg}", file=sys.stderr)
                        rows.append({**base, "threads": threads or torch.get_num_threads(), "error": msg})
                    else:
                        rows.append({
                            **base, "threads": r["threads"], "params_m": round(r["params"] / 1e6, 3),
                            **{k: round(r[k], 3) for k in ("median_ms", "p90_ms", "mean_ms", "min_ms", "throughput")},
                            "iters": r["iters"],
                        })
                bar.update()
            del model, parts
    finally:
        bar.close()
    return [{c: row.get(c) for c in COLUMNS} for row in rows]


# ---------------------------------------------------------------------------------------------- output


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table, one line per row."""
    head = ("model", "runtime", "batch", "input", "thr", "params (M)", "GMACs", "median ms", "p90 ms", "img/s", "top-1")
    body = []
    for r in rows:
        cells = [
            r["model"], r["runtime"], _fmt(r["batch_size"]), _fmt(r["input_size"]), _fmt(r["threads"]),
            _fmt(r.get("params_m"), 3), _fmt(r.get("gmacs"), 3), _fmt(r.get("median_ms")), _fmt(r.get("p90_ms")),
            _fmt(r.get("throughput"), 1), _fmt(r.get("top1"), 1),
        ]
        if r.get("error"):
            cells[7] = "failed: " + r["error"][:60]
            cells[8:10] = ["-", "-"]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    left = {0, 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


def environment() -> dict[str, Any]:
    import timm

    return {
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return path


def write_json(rows: Sequence[dict[str, Any]], path: str | os.PathLike, settings: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(), "settings": settings or {}, "results": list(rows)}
    path.write_text(json.dumps(doc, indent=2))
    return path


def write_results(path: str | os.PathLike, tables: dict[str, dict[str, Any]], *, command: str | None = None,
                  settings: dict[str, Any] | None = None, notes: str = "", load: dict[str, Any] | None = None,
                  data: Any = None) -> Path:
    """Write measured figures as a small results file that MODEL_CARD tables are generated from.

    ``tables`` maps a table name to ``{"columns": [...], "rows": [[...], ...]}`` (cells: numbers or short strings, as
    the card shows them). The file also records how the figures were produced: the command (default: this process's
    argv), the UTC date, the machine and load average, the versions, ``settings`` and ``notes``. Written atomically.
    ``load``: the load average sampled while the figures were measured (:class:`LoadSampler`), kept with the machine;
    ``data``: the full-precision figures the tables were rounded from (kept under ``"data"``, not rendered).
    ``scripts/make_model_card.py`` renders a table between ``<!-- results FILE TABLE -->`` and ``<!-- end results -->``.
    """
    import datetime

    for name, t in tables.items():
        cols, rows = t.get("columns"), t.get("rows")
        if not cols or rows is None or any(len(r) != len(cols) for r in rows):
            raise ValueError(f"results table {name!r}: needs 'columns' and 'rows' of {len(cols or [])} cells each")
    path = Path(path)
    doc = {
        "command": command or " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                                        *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": "measured",
        "machine": {**environment(), "node": platform.node(),
                    "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "settings": settings or {},
        "notes": notes,
        "tables": tables,
    }
    if load:
        doc["machine"]["load_during_run"] = load
    if data is not None:
        doc["data"] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


class LoadSampler:
    """The 1-minute load average every ``period`` seconds while a measurement lasts (for :func:`write_results`'s
    ``load``: on a shared machine the load during the run says how far its times are inflated)."""

    def __init__(self, period: float = 20.0):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(period)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "min": round(min(s), 2), "max": round(max(s), 2), "samples": len(s)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal latency and higher-or-equal accuracy, by latency."""
    front, best = [], -math.inf
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def reported_only(name: str) -> bool:
    """True for a registered model whose top-1 is the paper's report, not released weights' (no tag has weights)."""
    from zoo.registry import UnknownModelError, get_entry

    try:
        entry = get_entry(name)
    except UnknownModelError:
        return False
    return not any(c.has_weights for c in entry.tags.values())


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Median latency (x) against published ImageNet top-1 (y), one series per runtime, with its Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r.get("top1") is not None and r.get("median_ms") is not None and not r.get("error")]
    if not usable:
        raise ValueError(
            "nothing to plot: no benchmarked model has a published top-1 in its config (models with architecture "
            "overrides have none)"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, rt in enumerate(dict.fromkeys(r["runtime"] for r in usable)):
        pts = [(r["median_ms"], r["top1"], r["model"]) for r in usable if r["runtime"] == rt]
        color = f"C{i}"
        # accuracy only reported by a paper whose weights we do not have (e.g. a reconstruction): hollow, labelled
        rep = [reported_only(p[2]) for p in pts]
        for hollow in (False, True):
            sel = [p for p, h in zip(pts, rep) if h == hollow]
            if sel:
                style = dict(facecolors="none", edgecolors=color) if hollow else dict(color=color)
                label = f"{rt} (reported top-1, no weights)" if hollow else rt
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], zorder=3, label=label, **style)
        for (lat, acc, name), hollow in zip(pts, rep):
            ax.annotate(name + (" (reported)" if hollow else ""), (lat, acc), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=color)
        front = pareto_front([(p[0], p[1]) for p in pts])
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, alpha=0.5, lw=1)
    r0 = usable[0]
    ax.set_xlabel(f"median latency (ms), batch {r0['batch_size']}, {r0['threads']} thread(s), CPU")
    ax.set_ylabel("published ImageNet-1k top-1 (%)")
    ax.set_title(title or "Accuracy vs latency (Pareto front per runtime)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from zoo.tools import _run, parse_overrides

    p = argparse.ArgumentParser(prog="zoo bench", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", help="registered NAME[.TAG] or glob (nextvit_*)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="S",
                   help="input size S or H W (default: each model's config input size)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's current setting)")
    p.add_argument("--runtime", default="eager", help=f"comma-separated, from {','.join(RUNTIMES)} (default eager)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--json", default=None, help="write the table, settings and environment as JSON")
    p.add_argument("--plot", default=None, help="write a latency vs published top-1 Pareto plot (PNG)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override for every model, repeatable: --override depths=(1,1,2,1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def work() -> int:
        if args.image_size is not None and len(args.image_size) not in (1, 2):
            raise ValueError("--image-size takes S or H W")
        runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
        image_size = None if args.image_size is None else (
            args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
        )
        settings = dict(
            batch_size=args.batch_size, image_size=image_size, threads=args.threads, runtimes=runtimes,
            warmup=args.warmup, iters=args.iters, overrides=parse_overrides(args.override),
        )
        rows = bench_models(args.names, progress=not args.no_progress, **settings)
        print(format_table(rows))
        if args.csv:
            print(f"wrote {write_csv(rows, args.csv)}")
        if args.json:
            print(f"wrote {write_json(rows, args.json, {**settings, 'overrides': {k: repr(v) for k, v in settings['overrides'].items()}})}")
        if args.plot:
            print(f"wrote {plot_pareto(rows, args.plot)}")
        return 1 if any(r["error"] for r in rows) else 0

    return _run("bench", work)


if __name__ == "__main__":
    sys.exit(main())
