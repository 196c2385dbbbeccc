"""Checkpoints: download into a cache with hash checks, safe loading, layout cleaning and strict loading with a report.

Cache: ``$ZOO_HOME`` (default ``~/.cache/zoo``); Hugging Face files go through ``huggingface_hub`` and its cache
(``HF_HOME`` / ``HF_ENDPOINT`` respected). Every download is written to a temporary file in the cache folder and
renamed into place only after its sha256 matched, so an interrupted or corrupted transfer never leaves a file behind.

Sharded checkpoints (Hugging Face ``model.safetensors.index.json`` + ``model-0000K-of-0000N.safetensors``): a source
whose file is an ``*.index.json`` fetches the index and every shard its ``weight_map`` names into one folder (each
shard through the same temporary-file / hash / rename rules; a URL index is placed last, so a cache folder with an index
always has every shard), and :func:`load_file` on the index reads exactly the tensors it maps, naming any missing shard.
A hub source that names only the repository falls back to the index when the repository has no ``model.safetensors``,
as ``transformers`` does.

Offline: with ``HF_HUB_OFFLINE=1`` (or ``ZOO_OFFLINE=1``), or when the server cannot be reached within
``ZOO_CONNECT_TIMEOUT`` seconds (default 5), nothing is retried: the error names the file, its URL and the exact path
(:func:`cached_path`, for URL and hub files alike) where a copy placed by hand is picked up.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import pickle
import pickletools
import socket
import tempfile
import zipfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch

from zoo.registry import PINNED_SHA256, CheckpointSource  # noqa: F401  (PINNED_SHA256 re-exported)

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


# PINNED_SHA256 (sha256 of released files by source location) lives in zoo.registry, torch-free, so `zoo info`
# can show which tags are verified without importing torch.


def expected_sha256(source: CheckpointSource) -> str | None:
    """The sha256 a download must have: the source's own, else the pinned one for its location, else None."""
    return source.sha256 or PINNED_SHA256.get(source.location)


def _hf_filename(source: CheckpointSource) -> str:
    return source.hf_filename or "model.safetensors"


def source_url(source: CheckpointSource) -> str:
    """The http(s) URL a source is fetched from (for a hub file: the endpoint's resolve URL, HF_ENDPOINT respected)."""
    if source.hf_hub_id:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(source.hf_hub_id, _hf_filename(source))
    return source.url or "<no source>"


def cached_path(source: CheckpointSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a source is (or will be) cached by zoo, and where a copy downloaded by hand is picked up.

    URL files are downloaded here; for hub files this is checked before the Hugging Face cache, so placing the file
    here works for both kinds of source.
    """
    key = (expected_sha256(source) or hashlib.sha256(source.location.encode()).hexdigest())[:16]
    return Path(cache_dir or zoo_home()) / "checkpoints" / key / _file_name(source)


def _manual_hint(source: CheckpointSource, dest: Path) -> str:
    sha = expected_sha256(source)
    return (
        f"Download {_file_name(source)} from {source_url(source)} by hand and place it at {dest}"
        + (f" (sha256 {sha})" if sha else "")
        + (" with every shard it lists next to it" if is_shard_index(_file_name(source)) else "")
        + "; or pass checkpoint_path= / set ZOO_HOME to a folder that holds it."
    )


def offline() -> bool:
    """HF_HUB_OFFLINE or ZOO_OFFLINE set to a true value (read at call time)."""
    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "ZOO_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # noqa: BLE001 - an old huggingface_hub without the helper
        return False


def _unreachable(url: str) -> str | None:
    """Why ``url``'s server (or the proxy for its scheme) cannot be reached quickly; None when it answers.

    One TCP connect with a short timeout, so an offline machine fails in seconds instead of going through the
    HTTP client's retries and back-off.
    """
    parsed = urllib.request.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return None
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urllib.request.urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    timeout = float(os.environ.get("ZOO_CONNECT_TIMEOUT", "5"))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"
    return None


def _check_online(source: CheckpointSource, dest: Path) -> None:
    url = source_url(source)
    if offline():
        raise CheckpointError(
            f"{_file_name(source)} is not in the cache and offline mode is on (HF_HUB_OFFLINE / ZOO_OFFLINE). "
            + _manual_hint(source, dest)
        )
    why = _unreachable(url)
    if why:
        raise CheckpointError(f"could not download {_file_name(source)} from {url}: {why}. " + _manual_hint(source, dest))


def _verify(path: Path, source: CheckpointSource) -> None:
    sha = expected_sha256(source)
    if sha:
        got = sha256_file(path)
        if got != sha:
            raise HashMismatchError(
                f"sha256 mismatch for {_file_name(source)} from {source.location}: expected {sha}, "
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


def _hub_download(source: CheckpointSource, cache_dir, dest: Path) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    kw = dict(cache_dir=cache_dir, library_name="pareto-zoo")
    # The hub cache first, as a plain file lookup: no request at all (hf_hub_download, even with
    # local_files_only=True, builds HTTP headers, which may query the endpoint). Released files do not change.
    cached = try_to_load_from_cache(source.hf_hub_id, _hf_filename(source), cache_dir=cache_dir)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    _check_online(source, dest)
    try:
        return Path(hf_hub_download(source.hf_hub_id, _hf_filename(source), **kw))
    except Exception as e:  # hub errors come in many classes (404, gated repo, dropped connection)
        raise CheckpointError(f"could not fetch {source.location}: {e}. {_manual_hint(source, dest)}") from e


# ---------------------------------------------------------------------------------------------- sharded checkpoints


def is_shard_index(path: str | os.PathLike) -> bool:
    """A Hugging Face shard index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``)."""
    return str(path).endswith(".index.json")


def read_shard_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` ({tensor name: shard file name}) of a shard index. Shard names must be plain file names
    (the shards sit next to the index): a name with a folder part is refused rather than followed."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable shard index (JSON with a weight_map): {e}") from e
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path} has no weight_map: not a Hugging Face shard index")
    for k, f in wm.items():
        if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
            raise CheckpointError(f"{path}: tensor {k} maps to {f!r}, which is not a plain shard file name next to "
                                  f"the index; refusing to read it")
    return wm


def shard_files(path: str | os.PathLike) -> list[str]:
    """The shard file names an index lists, in order of first appearance."""
    return list(dict.fromkeys(read_shard_index(path).values()))


def _shard_source(source: CheckpointSource, shard: str) -> CheckpointSource:
    """The source of one shard listed by ``source``'s index: same repository / URL folder, no hash of its own unless
    one is pinned for its location (Hugging Face indexes carry no shard hashes)."""
    if source.hf_hub_id:
        folder = str(Path(_hf_filename(source)).parent)
        name = shard if folder in ("", ".") else f"{folder}/{shard}"
        return CheckpointSource(hf_hub_id=source.hf_hub_id, hf_filename=name, layout=source.layout)
    return CheckpointSource(url=urllib.parse.urljoin(source.url or "", shard), layout=source.layout, file_name=shard)


def _shard_error(source: CheckpointSource, shard: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"shard {shard} listed in {_file_name(source)} ({source.location}) could not be fetched: {e}")


def _download_sharded(source: CheckpointSource, cache_dir, progress: bool) -> Path:
    """Fetch an index and every shard it lists into one folder; return the index's local path."""
    dest = cached_path(source, cache_dir)
    if dest.exists():  # downloaded earlier or placed by hand (index + shards in that folder)
        try:
            _verify(dest, source)
        except HashMismatchError:
            log.warning("cached %s does not match its hash; downloading it again", dest)
            dest.unlink()
    if dest.exists():
        missing = [s for s in shard_files(dest) if not (dest.parent / s).is_file()]
        if not missing:
            return dest
        if source.hf_hub_id is None:
            _check_online(source, dest)
            for shard in missing:
                _fetch_url_shard(source, shard, dest.parent, progress)
            return dest
    if source.hf_hub_id:
        index = _hub_download(source, cache_dir, dest)
        _verify(index, source)
        for shard in shard_files(index):
            sub = _shard_source(source, shard)
            try:
                got = _hub_download(sub, cache_dir, dest.parent / shard)
            except CheckpointError as e:
                raise _shard_error(source, shard, e) from e
            _verify(got, sub)
            if got.parent != index.parent:  # another revision's copy: load_file reads shards next to the index
                raise CheckpointError(f"shard {shard} of {source.location} resolved to {got}, not next to {index}; "
                                      f"clear the hub cache entry for {source.hf_hub_id} and download again")
        return index
    _check_online(source, dest)
    # The index is fetched under a temporary name and renamed into place only after every shard is there, so a
    # cached index always comes with its shards; a failed shard leaves no partial file (and no index) behind.
    pending = dest.with_name(f".{dest.name}.pending")
    try:
        _download_url(source.url, pending, source, progress=False)
        for shard in shard_files(pending):
            if not (dest.parent / shard).is_file():
                _fetch_url_shard(source, shard, dest.parent, progress)
        os.replace(pending, dest)
    finally:
        pending.unlink(missing_ok=True)
    return dest


def _fetch_url_shard(source: CheckpointSource, shard: str, folder: Path, progress: bool) -> None:
    sub = _shard_source(source, shard)
    try:
        _download_url(sub.url, folder / shard, sub, progress)
    except CheckpointError as e:
        raise _shard_error(source, shard, e) from e


def download(source: CheckpointSource, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return a local, hash-verified path for ``source``, downloading it once.

    A file at :func:`cached_path` (downloaded earlier, or placed there by hand) is used first, for URL and hub
    sources alike; offline or with the server unreachable, the error says where to put the file. A source naming a
    shard index (``*.index.json``) also fetches every shard it lists, into the index's folder, and returns the
    index's path (which :func:`load_file` reads as one checkpoint), as ``transformers`` does for sharded repos.
    """
    if not source.url and not source.hf_hub_id:
        raise CheckpointError("checkpoint source has neither url nor hf_hub_id")
    if is_shard_index(_file_name(source)) and not (source.url and source.url.startswith("file://")):
        return _download_sharded(source, cache_dir, progress)
    if source.url and source.url.startswith("file://"):
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
    if source.hf_hub_id:
        try:
            path = _hub_download(source, cache_dir, dest)
        except CheckpointError as e:
            # like transformers: a repository named without a file that has no model.safetensors may be sharded
            if source.hf_filename is None and _entry_not_found(e):
                log.info("%s has no model.safetensors; fetching its shard index instead", source.hf_hub_id)
                import dataclasses

                try:
                    return download(dataclasses.replace(source, hf_filename="model.safetensors.index.json"),
                                    cache_dir, progress)
                except CheckpointError as e2:
                    if not _entry_not_found(e2):
                        raise
                    raise CheckpointError(f"{source.hf_hub_id} has neither model.safetensors nor "
                                          f"model.safetensors.index.json: {e}") from e2
            raise
        _verify(path, source)
        return path
    _check_online(source, dest)
    _download_url(source.url, dest, source, progress)
    return dest


def _entry_not_found(e: BaseException) -> bool:
    """Whether the hub answered that the file does not exist (not: offline, unreachable, gated, ...)."""
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # an old huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError
    while e is not None:
        if isinstance(e, EntryNotFoundError):
            return True
        e = e.__cause__
    return False


# ---------------------------------------------------------------------------------------------- safe loading


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a safetensors file, or a torch pickle with ``weights_only=True``: pickles that would run code are refused."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():
        path = path / "model.safetensors.index.json"  # a sharded folder: read what its index lists
    if is_shard_index(path):
        return _load_sharded(path)
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
    if path.suffix == ".pdparams":
        return load_paddle_pickle(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, IndexError, ... on bad files
        err = _load_error(path, e)
        if isinstance(err, UnsafeCheckpointError) and _is_ultralytics_pickle(path):
            # a pickled ultralytics / DocLayout-YOLO model: read its tensors without running anything
            return load_pickled_module_tensors(path)
        raise err from e


def _load_sharded(index: Path) -> dict[str, Any]:
    """Every tensor a shard index maps, read from the shards next to it; a missing shard, or a shard that does not
    hold what the index places in it (or holds tensors the index does not list), is an error naming both."""
    wm = read_shard_index(index)
    by_shard: dict[str, list[str]] = {}
    for k, f in wm.items():
        by_shard.setdefault(f, []).append(k)
    missing = [f for f in by_shard if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(
            f"shard {missing[0]} listed in {index.name} is missing: expected at {index.parent / missing[0]}"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + ". Download the checkpoint again (zoo fetches every shard an index lists) or place the shard there.")
    out: dict[str, Any] = {}
    for f, keys in by_shard.items():
        sd = load_file(index.parent / f)
        absent = [k for k in keys if k not in sd]
        extra = sorted(set(sd) - set(keys))
        if absent or extra:
            raise CheckpointError(
                f"{f} does not match {index.name}: "
                + (f"{len(absent)} tensors the index places there are absent ({', '.join(absent[:5])}) " if absent else "")
                + (f"{len(extra)} tensors are not in the index ({', '.join(extra[:5])})" if extra else "")
                + "; the shard and the index come from different checkpoints: download them again together.")
        out.update(sd)
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts / lists / tuples of numpy arrays and nothing else: any other global is refused before it is
    looked up, so no code from the file runs (numpy's array and dtype constructors are the only callables)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("builtins", "tuple"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # protocol 2 stores array bytes as latin-1 text
    }
    path: Path = Path()

    def find_class(self, module: str, name: str):
        import collections

        import numpy as np

        if (module, name) not in self._ALLOWED:
            raise UnsafeCheckpointError(
                f"refused to load {self.path}: it references {module}.{name}; only numpy arrays, dicts, lists and "
                f"tuples are read from Paddle checkpoints. Nothing from it was executed.")
        if name == "_reconstruct":
            def reconstruct(cls, shape, dtype):
                if cls is not np.ndarray:
                    raise UnsafeCheckpointError(f"refused to load {self.path}: array subclass {cls!r}")
                return np.ndarray.__new__(cls, shape, dtype)

            return reconstruct
        if name == "encode":
            def encode(text, encoding="utf-8"):
                if not isinstance(text, str) or encoding != "latin1":
                    raise UnsafeCheckpointError(f"refused to load {self.path}: unexpected _codecs.encode call")
                return text.encode("latin1")

            return encode
        return {"ndarray": np.ndarray, "dtype": np.dtype, "OrderedDict": collections.OrderedDict, "tuple": tuple}[name]


def load_paddle_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Paddle ``.pdparams`` file (``paddle.save`` of a state dict: a pickle of numpy arrays) without Paddle
    and without running pickled code. Returns ``{name: tensor}`` (nested dicts flattened with dots); Paddle's
    ``StructuredToParameterName@@`` table is dropped and Paddle 2.1's ``(name, array)`` tuples are unwrapped. Names
    and layouts stay Paddle's (``_mean`` / ``_variance``, Linear weights as (in, out)): family converters map them."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:
        up = _NumpyOnlyUnpickler(f, encoding="latin1")
        up.path = path
        try:
            obj = up.load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated / not a pickle
            raise CheckpointError(f"{path} is not a readable Paddle checkpoint: {e}") from e

    def walk(d: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k, v in d.items():
            if k == "StructuredToParameterName@@":
                continue
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], np.ndarray):
                v = v[1]
            if isinstance(v, np.ndarray):
                if v.dtype == object:
                    raise UnsafeCheckpointError(f"refused to load {path}: {prefix}{k} is an object array")
                out[f"{prefix}{k}"] = torch.from_numpy(np.ascontiguousarray(v))
            elif isinstance(v, Mapping):
                out.update(walk(v, f"{prefix}{k}."))
        return out

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a Paddle state dict")
    sd = walk(obj)
    if not sd:
        raise CheckpointError(f"{path} holds no arrays (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    return sd


# ------------------------------------------------------------------ pickled whole-model files (ultralytics)


class _Inert:
    """Stands in for every class or function a pickle names: constructing or "calling" it records the arguments,
    ``BUILD`` records the state, and nothing else happens (no import, no attribute lookup, no code)."""

    _zoo_global = "?"
    _zoo_args: tuple = ()
    _zoo_state: Any = None  # NEWOBJ creates instances without __init__: class-level defaults

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_zoo_args"] = args
        self.__dict__["_zoo_state"] = None
        self.__dict__["_zoo_items"] = []

    def __setstate__(self, state):
        self.__dict__["_zoo_state"] = state

    def __setitem__(self, key, value):  # SETITEMS on a dict subclass
        self.__dict__.setdefault("_zoo_items", []).append((key, value))

    def append(self, value):  # APPENDS on a list subclass
        self.__dict__.setdefault("_zoo_items", []).append(value)

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self):
        return f"<inert {self._zoo_global}>"


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in _STORAGE_DTYPES.values()}


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` zip archive with every global replaced by an :class:`_Inert` placeholder, except
    torch's tensor / parameter rebuild functions (reimplemented here on bytes read from the archive), the storage
    and dtype names and ``OrderedDict``."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}
        self.placeholders: dict[tuple[str, str], type] = {}
        self.named: set[str] = set()

    def find_class(self, module: str, name: str):
        import collections

        self.named.add(f"{module}.{name}")
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage_dtype", _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                                                 "_rebuild_parameter_with_state", "_rebuild_from_type_v2"):
            return getattr(self, name)
        key = (module, name)
        if key not in self.placeholders:
            self.placeholders[key] = type(name, (_Inert,), {"_zoo_global": f"{module}.{name}"})
        return self.placeholders[key]

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise UnsafeCheckpointError(f"refused to load {self.path}: unknown persistent id {saved_id!r:.80}")
        _, stype, key, _location, numel = saved_id
        dtype = stype[1] if isinstance(stype, tuple) and stype[:1] == ("storage_dtype",) else None
        if dtype is None:
            raise UnsafeCheckpointError(f"refused to load {self.path}: storage type {stype!r:.80} is not a tensor storage")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if t.numel() != int(numel):
                raise CheckpointError(f"{self.path}: storage {key} has {t.numel()} elements, the pickle says {numel}")
            self.storages[key] = t
        return self.storages[key]

    # torch's rebuild functions, on a flat tensor standing in for the storage
    @staticmethod
    def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        if not isinstance(storage, torch.Tensor):
            raise UnsafeCheckpointError("tensor rebuild without a storage")
        if not len(size):
            return storage[storage_offset].clone()
        return torch.as_strided(storage, tuple(size), tuple(stride), storage_offset).clone()

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
        return self._rebuild_tensor_v2(storage, storage_offset, size, stride).view(dtype)

    @staticmethod
    def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
        return data

    @staticmethod
    def _rebuild_parameter_with_state(data, requires_grad=True, backward_hooks=None, state=None):
        return data

    @staticmethod
    def _rebuild_from_type_v2(func, new_type, args, state):
        return func(*args) if callable(func) and not isinstance(func, type) else _Inert()


def _module_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    """Parameters and persistent buffers of a placeholder ``nn.Module`` tree, keyed as its ``state_dict`` would be."""
    if depth > 64 or not isinstance(obj, _Inert) or not isinstance(obj._zoo_state, dict):
        return
    state = obj._zoo_state
    skip = state.get("_non_persistent_buffers_set") or set()
    skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if isinstance(v, torch.Tensor) and not (group == "_buffers" and k in skip):
                out[prefix + k] = v
    for k, v in (state.get("_modules") or {}).items():
        _module_tensors(v, f"{prefix}{k}.", out, depth + 1)


def load_pickled_module_tensors(path: str | os.PathLike, keys: tuple[str, ...] = ("ema", "model")) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a pickled whole model (ultralytics / DocLayout-YOLO ``.pt``: ``{"model": DetectionModel,
    ...}``) **without executing anything from the file**: every class or function the pickle names becomes an inert
    placeholder (nothing is imported), tensors are rebuilt from the archive's raw storages, and only the module
    tree's ``_parameters`` / ``_buffers`` are read. ``keys``: where the model is in a checkpoint dict, first found
    wins (ultralytics prefers the EMA weights). Neither ultralytics nor doclayout_yolo needs to be installed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip archive (torch.save since 1.6); legacy pickles are not read")
    with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{path} is a zip file without data.pkl: not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        bo = f"{prefix}byteorder"
        if bo in z.namelist() and z.read(bo).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        import io

        up = _TensorOnlyUnpickler(io.BytesIO(z.read(pkl)), z, prefix, path)
        try:
            obj = up.load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated / malformed pickle
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e
    root = obj
    if isinstance(obj, Mapping):
        root = next((obj[k] for k in keys if isinstance(obj.get(k), _Inert)), None)
        if root is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            raise CheckpointError(f"{path} holds no pickled model under {', '.join(keys)} (keys: "
                                  f"{', '.join(map(str, list(obj)[:10]))})")
    out: dict[str, torch.Tensor] = {}
    _module_tensors(root, "", out)
    if not out:
        raise CheckpointError(f"{path}: the pickled object ({getattr(root, '_zoo_global', type(root).__name__)}) "
                              f"has no module parameters")
    return out


def _is_ultralytics_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            names = _pickle_globals(z.read(pkl)) if pkl else None
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False
    return bool(names) and any(n.startswith(("ultralytics.", "doclayout_yolo.")) for n in names)


# Opcodes that import or call something while unpickling; a torch checkpoint's only such targets are torch's tensor
# rebuilders, storages and OrderedDict, which torch's weights-only unpickler accepts.
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _pickle_globals(data: bytes, max_pickles: int = 4) -> list[str] | None:
    """The module.name globals named by the pickle(s) at the start of ``data``; None when it is not a pickle.

    Parsed with ``pickletools`` (reading opcodes only, nothing is executed). A legacy ``torch.save`` file is a few
    pickles in a row followed by raw storage bytes, hence ``max_pickles``.
    """
    names: list[str] = []
    pos = 0
    for _ in range(max_pickles):
        if pos >= len(data):
            break
        try:
            end = None
            recent: list[object] = []  # the last values pushed (strings, memo reads): STACK_GLOBAL's two operands
            memo: dict[int, object] = {}
            for op, arg, at in pickletools.genops(data[pos:]):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    recent.append(str(arg))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    recent.append(memo.get(int(arg)))
                elif op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(f"{recent[-2]}.{recent[-1]}" if len(recent) >= 2 else "?")
                else:
                    recent.append(None)
                if op.name == "STOP":
                    end = at + 1
        except Exception:  # noqa: BLE001 - unknown opcode, truncated stream: not (or no longer) a pickle
            return None if pos == 0 else names
        if end is None:
            return None if pos == 0 else names
        pos += end
    return names


def _load_error(path: Path, e: Exception) -> CheckpointError:
    """Tell a pickle that would run code apart from a file that is simply corrupt, truncated or not a checkpoint."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(pkl) if pkl else b""
        else:
            data = path.read_bytes()[: 64 << 20]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        data = b""
    names = _pickle_globals(data) if data else None
    if names is None:
        detail = str(e).strip().split(". ")[0] if isinstance(e, RuntimeError) else ""  # e.g. torch's zip reader
        return CheckpointError(
            f"{path} is corrupt, truncated or not a checkpoint: it is neither a safetensors file nor a readable torch "
            f"archive or pickle{(' (' + detail[:200] + ')') if detail else ''}. Nothing from it was executed. "
            f"Download it again or check that it is the file you meant."
        )
    unusual = sorted({n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))})
    ops = {op.name for op, _, _ in _safe_genops(data)}
    what = ", ".join(unusual[:8]) + (" ..." if len(unusual) > 8 else "") if unusual else ""
    if not what:  # torch's own message says which global or opcode it refused; keep that line, not its advice
        line = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error:" in ln or "Unsupported" in ln),
                    "")
        what = line.replace("WeightsUnpickler error:", "").strip() or ", ".join(sorted(ops & _CODE_OPS))
    return UnsafeCheckpointError(
        f"refused to load {path}: unpickling it would import or call code outside plain tensors and containers "
        f"({what or 'objects torch does not load safely'}). Nothing from it was executed. Convert it to safetensors in "
        f"a trusted environment, or re-save only its state_dict."
    )


def _safe_genops(data: bytes):
    try:
        return list(pickletools.genops(data))
    except Exception:  # noqa: BLE001
        return []


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

