"""Checkpoints: download into a cache with hash checks, safe loading, layout cleaning and strict loading with a report.

Cache: ``$ZOO_HOME`` (default ``~/.cache/zoo``); Hugging Face files go through ``huggingface_hub`` and its cache
(``HF_HOME`` / ``HF_ENDPOINT`` respected). Every download is written to a temporary file in the cache folder and
renamed into place only after its sha256 matched, so an interrupted or corrupted transfer never leaves a file behind.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch

from zoo.registry import CheckpointSource

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be fetched, verified, read or loaded."""


class HashMismatchError(CheckpointError):
    pass


class UnsafeCheckpointError(CheckpointError):
    pass


def zoo_home() -> Path:
    return Path(os.environ.get("ZOO_HOME", Path.home() / ".cache" / "zoo")).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_name(source: CheckpointSource) -> str:
    if source.file_name:
        return source.file_name
    if source.hf_hub_id:
        return source.hf_filename or "model.safetensors"
    return Path(urllib.request.urlparse(source.url or "").path).name or "checkpoint.bin"


def cached_path(source: CheckpointSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a URL source is (or will be) cached."""
    key = (source.sha256 or hashlib.sha256((source.url or "").encode()).hexdigest())[:16]
    return Path(cache_dir or zoo_home()) / "checkpoints" / key / _file_name(source)


def _manual_hint(source: CheckpointSource, dest: Path) -> str:
    return (
        f"Download {source.location} by hand and place it at {dest} "
        f"(or pass checkpoint_path= / set ZOO_HOME to a folder that holds it)."
    )


def _verify(path: Path, source: CheckpointSource) -> None:
    if source.sha256:
        got = sha256_file(path)
        if got != source.sha256:
            raise HashMismatchError(
                f"sha256 mismatch for {_file_name(source)} from {source.location}: expected {source.sha256}, "
                f"got {got}. The file was not kept; retry the download or check the source."
            )


def _download_url(url: str, dest: Path, source: CheckpointSource, progress: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                while block := resp.read(1 << 20):
                    out.write(block)
                    done += len(block)
                    if progress and total:
                        print(f"\r{dest.name}: {done / total:6.1%}", end="", flush=True)
                if progress and total:
                    print()
                if total and done != total:
                    raise CheckpointError(f"interrupted download of {url}: got {done} of {total} bytes")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # HTTPException: broken response
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"could not download {dest.name} from {url}: {e}. {_manual_hint(source, dest)}") from e
        _verify(tmp, source)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(source: CheckpointSource, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return a local, hash-verified path for ``source``, downloading it once."""
    if source.hf_hub_id:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(
                hf_hub_download(
                    source.hf_hub_id,
                    source.hf_filename or "model.safetensors",
                    cache_dir=cache_dir,
                    library_name="pareto-zoo",
                )
            )
        except Exception as e:  # hub errors come in many classes (offline, 404, gated repo)
            raise CheckpointError(
                f"could not fetch {source.location}: {e}. Download it by hand and pass checkpoint_path=."
            ) from e
        _verify(path, source)
        return path
    if not source.url:
        raise CheckpointError("checkpoint source has neither url nor hf_hub_id")
    if source.url.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.request.urlparse(source.url).path))
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} does not exist")
        _verify(path, source)
        return path
    dest = cached_path(source, cache_dir)
    if dest.exists():
        try:
            _verify(dest, source)
            return dest
        except HashMismatchError:
            log.warning("cached %s does not match its hash; downloading again", dest)
            dest.unlink()
    _download_url(source.url, dest, source, progress)
    return dest


# ---------------------------------------------------------------------------------------------- safe loading


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a safetensors file, or a torch pickle with ``weights_only=True``: pickles that would run code are refused."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} is a folder without *.safetensors files")
        out: dict[str, Any] = {}
        for f in files:
            out.update(load_file(f))
        return out
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused to load {path}: unpickling it would import or call code outside plain tensors and containers "
            f"({str(e).splitlines()[0]}). Nothing from it was executed. Convert it to safetensors in a trusted "
            f"environment, or re-save only its state_dict."
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def clean_state_dict(obj: Mapping[str, Any], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Unwrap training checkpoints ({'model': ...}, Lightning's {'state_dict': ...}) and strip wrapper prefixes."""
    sd: Any = obj
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if key is None:
            break
        sd = sd[key]
    if not isinstance(sd, Mapping):
        raise CheckpointError("checkpoint holds no state dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in ("module.", "_orig_mod."):
            if k.startswith(p):
                k = k[len(p):]
        out[k.replace("._orig_mod.", ".")] = v  # torch.compile'd submodule, e.g. Lightning's model._orig_mod.*
    if not out:
        top = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"checkpoint holds no tensors to load (top-level keys: {top})")
    # Lightning task modules keep the network under `model.`; strip it when every key has it.
    strip = prefix if prefix is not None else ("model." if out and all(k.startswith("model.") for k in out) else "")
    if strip:
        out = {k[len(strip):] if k.startswith(strip) else k: v for k, v in out.items()}
    return out


def save_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write a safetensors file atomically (shared tensors are cloned: safetensors refuses aliases)."""
    from safetensors.torch import save_file as st_save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        tensors[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    tmp = path.with_name(f".{path.name}.part")
    st_save(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- strict loading


class KeyMismatchError(CheckpointError):
    def __init__(self, missing, unexpected, wrong_shape, context=""):
        self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), list(wrong_shape)
        super().__init__(self.report(context))

    def report(self, context: str = "") -> str:
        def show(items, n=12):
            items = list(items)
            more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
            return ", ".join(map(str, items[:n])) + more

        lines = [f"checkpoint does not match the model{(' ' + context) if context else ''}:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {show(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {show(self.unexpected)}")
        if self.wrong_shape:
            lines.append(
                f"  wrong shape ({len(self.wrong_shape)}): "
                + show(f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.wrong_shape)
            )
        lines.append("  Check the model name / overrides, or pass the matching checkpoint.")
        return "\n".join(lines)


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]):
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [(k, state_dict[k].shape, own[k].shape) for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    return missing, unexpected, wrong


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing: tuple[str, ...] = (),
    context: str = "",
    assign: bool = False,
) -> None:
    """Load strictly; the only keys allowed to be absent are those in ``allow_missing`` (e.g. a re-initialized head)."""
    missing, unexpected, wrong = check_keys(model, state_dict)
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected or wrong:
        raise KeyMismatchError(missing, unexpected, wrong, context)
    model.load_state_dict(state_dict, strict=False, assign=assign)

