"""Checkpoints: the real download code against a local HTTP server, safe loading, layouts and key reports.

The server runs on 127.0.0.1 in a thread; every test gets its own cache folder, so nothing touches ~/.cache.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import logging
import pathlib
import pickle
import socket
import threading

import pytest
import torch

import zoo
from zoo import checkpoints
from zoo.checkpoints import (
    CheckpointError,
    HashMismatchError,
    KeyMismatchError,
    UnsafeCheckpointError,
    clean_state_dict,
    download,
    load_file,
    save_file,
)
from zoo.registry import CheckpointSource, get_entry

# A small Next-ViT with every block type (NCB, NTB in stages 1-3), fast to build and run.
SMALL = dict(depths=(1, 1, 2, 1), ntb_period=2, ncb_widths=(32, 64, 64, 96), ntb_widths=(None, 64, 96, 128),
             stem_chs=(16, 16, 32))


# ---------------------------------------------------------------------------------------------- HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):  # noqa: N802 (http.server's naming); the Hugging Face client asks for metadata first
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):  # noqa: N802
        srv = self.server
        srv.requests.append(("HEAD " if head else "") + self.path)
        body = srv.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in srv.extra_headers.get(self.path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        if self.path in srv.truncate:  # announce the whole file, send half of it, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.truncate, srv.requests, srv.extra_headers = {}, set(), [], {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _serve(server, path: str, body: bytes, truncate: bool = False) -> str:
    server.files[path] = body
    if truncate:
        server.truncate.add(path)
    return server.url + path


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _st_bytes(sd: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------- download


def test_download_good_file_once_then_cache(server, tmp_path):
    body = _st_bytes({"w": torch.arange(10.0)})
    url = _serve(server, "/good/weights.safetensors", body)
    src = CheckpointSource(url=url, sha256=_sha(body))
    before = server.requests.count("/good/weights.safetensors")

    path = download(src, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == body
    assert path.is_relative_to(tmp_path) and path.name == "weights.safetensors"
    assert server.requests.count("/good/weights.safetensors") == before + 1

    again = download(src, cache_dir=tmp_path, progress=False)
    assert again == path
    assert server.requests.count("/good/weights.safetensors") == before + 1, "second call must use the cache"
    assert torch.equal(load_file(path)["w"], torch.arange(10.0))
    assert not [p for p in _files(tmp_path) if p.name.endswith(".part")]


def test_download_cache_respects_zoo_home(server, tmp_path, monkeypatch):
    body = b"\x00" * 100
    url = _serve(server, "/home/blob.bin", body)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo_home"))
    path = download(CheckpointSource(url=url, sha256=_sha(body)), progress=False)
    assert path.is_relative_to(tmp_path / "zoo_home")


def test_download_corrupted_file_is_not_kept(server, tmp_path):
    good = _st_bytes({"w": torch.ones(4)})
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    url = _serve(server, "/corrupt/weights.safetensors", bytes(bad))
    with pytest.raises(HashMismatchError) as ei:
        download(CheckpointSource(url=url, sha256=_sha(good)), cache_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "weights.safetensors" in msg and url in msg and _sha(good) in msg and _sha(bytes(bad)) in msg
    assert _files(tmp_path) == [], "a file that failed its hash check must not stay in the cache"


def test_download_replaces_corrupted_cache_entry(server, tmp_path):
    body = b"good bytes" * 10
    url = _serve(server, "/recache/blob.bin", body)
    src = CheckpointSource(url=url, sha256=_sha(body))
    dest = checkpoints.cached_path(src, tmp_path)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale or damaged")
    assert download(src, cache_dir=tmp_path, progress=False).read_bytes() == body


def test_download_missing_file_says_where_to_put_it(server, tmp_path):
    url = server.url + "/nowhere/model.safetensors"
    src = CheckpointSource(url=url, sha256="0" * 64)
    with pytest.raises(CheckpointError) as ei:
        download(src, cache_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "model.safetensors" in msg and url in msg and "404" in msg
    assert str(checkpoints.cached_path(src, tmp_path)) in msg, "the message must say where to place the file by hand"
    assert _files(tmp_path) == []


def test_download_interrupted_transfer_leaves_nothing(server, tmp_path):
    body = _st_bytes({"w": torch.randn(2000)})
    url = _serve(server, "/cut/weights.safetensors", body, truncate=True)
    with pytest.raises(CheckpointError) as ei:
        download(CheckpointSource(url=url, sha256=_sha(body)), cache_dir=tmp_path, progress=False)
    assert url in str(ei.value)
    assert _files(tmp_path) == [], "an interrupted download must leave no partial file"


def test_download_interrupted_without_hash_still_fails(server, tmp_path):
    # without a sha256 only the length check can notice the cut; it must, or half a file would be cached
    body = b"x" * 50_000
    url = _serve(server, "/cut2/blob.bin", body, truncate=True)
    with pytest.raises(CheckpointError):
        download(CheckpointSource(url=url), cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_download_dead_source(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/weights/nextvit.safetensors"
    src = CheckpointSource(url=url, sha256="0" * 64)
    with pytest.raises(CheckpointError) as ei:
        download(src, cache_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "nextvit.safetensors" in msg and url in msg and str(checkpoints.cached_path(src, tmp_path)) in msg
    assert _files(tmp_path) == []


@pytest.fixture
def hf_endpoint(server, monkeypatch):
    """Point huggingface_hub at the local server, as HF_ENDPOINT would (it is read when huggingface_hub is imported)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")

    def publish(repo: str, filename: str, body: bytes) -> str:
        path = f"/{repo}/resolve/main/{filename}"
        server.files[path] = body
        server.extra_headers[path] = {"X-Repo-Commit": "a" * 40, "ETag": f'"{_sha(body)}"'}
        return path

    return publish


def test_download_from_hugging_face_hub(server, hf_endpoint, tmp_path):
    body = _st_bytes({"w": torch.arange(6.0)})
    path = hf_endpoint("zoo-test/nextvit", "model.safetensors", body)
    src = CheckpointSource(hf_hub_id="zoo-test/nextvit", hf_filename="model.safetensors", sha256=_sha(body))
    got = download(src, cache_dir=tmp_path, progress=False)
    assert got.read_bytes() == body and got.is_relative_to(tmp_path)
    assert server.requests.count(path) == 1
    download(src, cache_dir=tmp_path, progress=False)
    assert server.requests.count(path) == 1, "the file must come from the hub cache the second time"

    with pytest.raises(HashMismatchError, match="zoo-test/nextvit"):
        download(CheckpointSource(hf_hub_id="zoo-test/nextvit", hf_filename="model.safetensors", sha256="1" * 64),
                 cache_dir=tmp_path / "other", progress=False)
    with pytest.raises(CheckpointError, match="hf://zoo-test/nextvit/absent.safetensors"):
        download(CheckpointSource(hf_hub_id="zoo-test/nextvit", hf_filename="absent.safetensors"),
                 cache_dir=tmp_path, progress=False)


def _dead_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["url", "hub"])
def test_offline_fails_at_once_and_says_where_to_place_the_file(server, hf_endpoint, tmp_path, monkeypatch, kind):
    import time

    body = _st_bytes({"w": torch.arange(4.0)})
    if kind == "url":
        url = _serve(server, "/offline/weights.safetensors", body)
        src, served = CheckpointSource(url=url, sha256=_sha(body)), "/offline/weights.safetensors"
    else:
        served = hf_endpoint("zoo-test/offline", "model.safetensors", body)
        src, url = CheckpointSource(hf_hub_id="zoo-test/offline", sha256=_sha(body)), server.url + served
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n0 = len(server.requests)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as ei:
        download(src, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t0 < 3
    dest = checkpoints.cached_path(src, tmp_path)
    msg = str(ei.value)
    assert "offline" in msg and url in msg and str(dest) in msg and dest.name in msg and _sha(body) in msg
    assert len(server.requests) == n0, "offline mode must not touch the network"

    # placing the file where the message says makes the same call work, still offline (and still hash-checked)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(body)
    assert download(src, cache_dir=tmp_path, progress=False) == dest
    dest.write_bytes(body[:-1] + b"!")
    with pytest.raises(CheckpointError, match="offline"):  # the corrupt copy is dropped, and offline means no refetch
        download(src, cache_dir=tmp_path, progress=False)
    assert not dest.exists()


@pytest.mark.parametrize("kind", ["url", "hub"])
def test_unreachable_server_fails_within_seconds(tmp_path, monkeypatch, kind):
    import time

    from huggingface_hub import constants

    dead = f"http://127.0.0.1:{_dead_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if kind == "url":
        src = CheckpointSource(url=dead + "/w/nextvit.safetensors")
    else:  # huggingface_hub alone retries a refused connection with back-off for ~25 s
        src = CheckpointSource(hf_hub_id="zoo-test/unreachable", hf_filename="model.safetensors")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as ei:
        download(src, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t0 < 5
    msg = str(ei.value)
    assert checkpoints.source_url(src) in msg and str(checkpoints.cached_path(src, tmp_path)) in msg
    assert "cannot be reached" in msg and _files(tmp_path) == []


def test_pinned_hashes_are_checked_and_belong_to_registered_tags(server, tmp_path, monkeypatch):
    from zoo.registry import list_models, resolve_cfg

    tag_of = {resolve_cfg(n)[2].source.location: n for n in list_models(pretrained=True)}
    assert checkpoints.PINNED_SHA256 and set(checkpoints.PINNED_SHA256) <= set(tag_of)
    card = (pathlib.Path(__file__).resolve().parents[1] / "MODEL_CARD.md").read_text()
    for loc, sha in checkpoints.PINNED_SHA256.items():  # the model card lists every verified tag
        assert f"| `{tag_of[loc]}` | `{loc}` | `{sha[:16]}` |" in card
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in checkpoints.PINNED_SHA256.values())

    body = b"pretend release" * 10
    url = _serve(server, "/pinned/file.bin", body)
    monkeypatch.setitem(checkpoints.PINNED_SHA256, url, "1" * 64)  # the page says another hash: refused, not kept
    with pytest.raises(HashMismatchError, match="1111"):
        download(CheckpointSource(url=url), cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []
    monkeypatch.setitem(checkpoints.PINNED_SHA256, url, _sha(body))
    assert download(CheckpointSource(url=url), cache_dir=tmp_path, progress=False).read_bytes() == body


def test_create_model_pretrained_offline_names_the_cache_path(tmp_path, monkeypatch):
    import time

    src = get_entry("nextvit_small").tags["bd_ssld_6m_in1k"].source  # imports the families before timing
    zoo.create_model("nextvit_small", **SMALL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as ei:
        zoo.create_model("nextvit_small.bd_ssld_6m_in1k", pretrained=True, cache_dir=tmp_path, **SMALL)
    assert time.perf_counter() - t0 < 5
    msg = str(ei.value)
    assert "/timm/nextvit_small.bd_ssld_6m_in1k/resolve/main/model.safetensors" in msg
    assert str(checkpoints.cached_path(src, tmp_path)) in msg and checkpoints.PINNED_SHA256[src.location] in msg


# ---------------------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this touches a marker file: stands in for a checkpoint that runs code when loaded."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))

    # control: an unrestricted load really runs the payload (so the test below would notice if it ran)
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as ei:
        load_file(path)
    assert str(path) in str(ei.value) and "safetensors" in str(ei.value)
    assert "pathlib" in str(ei.value), "the error names what the pickle would import"
    assert "weights_only" not in str(ei.value), "torch's advice to disable the safe loader is not repeated"
    assert not marker.exists(), "the checkpoint's code must never run"
    with pytest.raises(UnsafeCheckpointError):
        zoo.create_model("nextvit_small", checkpoint_path=path, **SMALL)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_file(junk)
    # random bytes and a truncated torch archive are corrupt files, not pickles that would run code, and the error
    # does not repeat torch's advice to load with weights_only=False
    rand = tmp_path / "random.pth"
    rand.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                     .numpy().tobytes())
    buf = io.BytesIO()
    torch.save({"w": torch.ones(100)}, buf)
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for bad in (junk, rand, trunc):
        with pytest.raises(CheckpointError) as ei:
            load_file(bad)
        assert not isinstance(ei.value, UnsafeCheckpointError), str(ei.value)
        msg = str(ei.value)
        assert str(bad) in msg and "corrupt" in msg and "weights_only" not in msg and "import or call" not in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "absent.safetensors")
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_file(bad_st)


def test_safetensors_torch_save_and_folder_load(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5)}
    save_file(sd, tmp_path / "st" / "model.safetensors")
    torch.save(sd, tmp_path / "model.pth")
    save_file({"c": torch.zeros(2)}, tmp_path / "st" / "model-2.safetensors")
    for got in (load_file(tmp_path / "st" / "model.safetensors"), load_file(tmp_path / "model.pth")):
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    folder = load_file(tmp_path / "st")
    assert set(folder) == {"a.weight", "b.bias", "c"}


def test_save_file_handles_shared_tensors(tmp_path):
    w = torch.randn(4, 4)
    save_file({"a": w, "b": w}, tmp_path / "tied.safetensors")  # safetensors alone refuses aliased tensors
    got = load_file(tmp_path / "tied.safetensors")
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w)
    assert not list(tmp_path.glob("*.part"))


def test_wrappers_unwrap():
    sd = {"stem.0.conv.weight": torch.randn(2, 3, 3, 3), "head.fc.bias": torch.randn(4)}
    lightning = {"epoch": 3, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in sd.items()},
                 "hyper_parameters": {"lr": 0.1}}
    for wrapped in (lightning, {"model": sd}, {"state_dict": sd}, {"model": {f"module.{k}": v for k, v in sd.items()}},
                    {f"_orig_mod.{k}": v for k, v in sd.items()}):
        got = clean_state_dict(wrapped)
        assert set(got) == set(sd) and all(got[k] is sd[k] for k in sd)
    # EMA weights win over the live ones, like timm
    ema = {k: v + 1 for k, v in sd.items()}
    got = clean_state_dict({"state_dict": sd, "state_dict_ema": ema})
    assert all(got[k] is ema[k] for k in sd)
    with pytest.raises(CheckpointError):
        clean_state_dict({"epoch": 1, "optimizer": {"lr": 0.1}})


def test_lightning_checkpoint_loads_through_create_model(tmp_path):
    torch.manual_seed(0)
    src = zoo.create_model("nextvit_small", num_classes=7, **SMALL).eval()
    ckpt = {"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
            "hyper_parameters": {"model_name": "nextvit_small", "num_classes": 7}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    m = zoo.create_model("nextvit_small", checkpoint_path=tmp_path / "last.ckpt", num_classes=7, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))


# ---------------------------------------------------------------------------------------------- key reports


def test_key_mismatch_report_names_every_problem(tmp_path):
    torch.manual_seed(0)
    sd = dict(zoo.create_model("nextvit_small", **SMALL).state_dict())
    sd.pop("stages.1.blocks.0.mhca.projection.weight")
    sd["stages.9.blocks.0.extra.weight"] = torch.zeros(1)
    sd["norm.weight"] = torch.ones(7)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(KeyMismatchError) as ei:
        zoo.create_model("nextvit_small", checkpoint_path=tmp_path / "broken.safetensors", **SMALL)
    err = ei.value
    assert err.missing == ["stages.1.blocks.0.mhca.projection.weight"]
    assert err.unexpected == ["stages.9.blocks.0.extra.weight"]
    assert [k for k, *_ in err.wrong_shape] == ["norm.weight"]
    msg = str(err)
    for needle in ("missing (1)", "unexpected (1)", "wrong shape (1)", "stages.1.blocks.0.mhca.projection.weight",
                   "stages.9.blocks.0.extra.weight", "norm.weight checkpoint (7,) vs model (128,)",
                   "broken.safetensors"):
        assert needle in msg, needle


def test_wrong_architecture_is_not_loaded_partially(tmp_path):
    small = zoo.create_model("nextvit_small", **SMALL)
    save_file(small.state_dict(), tmp_path / "small.safetensors")
    other = dict(SMALL, depths=(1, 1, 2, 2))
    with pytest.raises(KeyMismatchError, match="missing"):
        zoo.create_model("nextvit_small", checkpoint_path=tmp_path / "small.safetensors", **other)


# ---------------------------------------------------------------------------------------------- end to end


def _register_local_tag(monkeypatch, tag: str, url: str, sha: str, layout: str, num_classes: int):
    """Point a temporary tag of nextvit_small at the local server (config data only; the download is real)."""
    entry = get_entry("nextvit_small")
    base = entry.tags[entry.default_tag]
    import dataclasses

    cfg = dataclasses.replace(base, num_classes=num_classes, metrics={},
                              source=CheckpointSource(url=url, sha256=sha, layout=layout))
    monkeypatch.setitem(entry.tags, tag, cfg)


def _to_official(sd: dict, depths) -> dict:
    """Our / timm's keys -> the official repo's (flat features.k, mlp.conv1/2, proj_head.0)."""
    offsets = [sum(depths[:i]) for i in range(len(depths))]
    out = {}
    for k, v in sd.items():
        if k.startswith("stages."):
            _, i, _, j, rest = k.split(".", 4)
            k = f"features.{offsets[int(i)] + int(j)}.{rest}"
        k = k.replace("mlp.fc1.", "mlp.conv1.").replace("mlp.fc2.", "mlp.conv2.").replace("head.fc.", "proj_head.0.")
        out[k] = v
    return out


def test_pretrained_end_to_end_over_http(server, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    src = zoo.create_model("nextvit_small", num_classes=10, **SMALL).eval()
    # the released file is in the official layout, pickled like the official checkpoints ({'model': ...})
    buf = io.BytesIO()
    torch.save({"model": _to_official(src.state_dict(), SMALL["depths"]), "epoch": 299}, buf)
    body = buf.getvalue()
    url = _serve(server, "/release/nextvit_small_test.pth", body)
    _register_local_tag(monkeypatch, "test_local", url, _sha(body), "official", num_classes=10)
    path_req = "/release/nextvit_small_test.pth"
    n0 = server.requests.count(path_req)

    x = torch.randn(2, 3, 64, 80)
    m = zoo.create_model("nextvit_small.test_local", pretrained=True, cache_dir=tmp_path, **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))
    assert m.pretrained_cfg.num_classes == 10 and m.model_name == "nextvit_small"
    assert server.requests.count(path_req) == n0 + 1

    # different num_classes: the classifier is re-initialized (and that is logged), the rest is loaded
    with caplog.at_level(logging.WARNING, logger="zoo.factory"):
        m5 = zoo.create_model("nextvit_small.test_local", pretrained=True, cache_dir=tmp_path, num_classes=5,
                              in_chans=1, **SMALL).eval()
    assert server.requests.count(path_req) == n0 + 1, "the second model must come from the cache"
    assert any("re-initialized" in r.getMessage() and "head.fc" in r.getMessage() for r in caplog.records)
    assert m5.get_classifier().out_features == 5
    sd5, ref = m5.state_dict(), src.state_dict()
    # in_chans=1: the first conv's weights are the sum over the RGB channels (timm's adapt_input_conv)
    torch.testing.assert_close(sd5["stem.0.conv.weight"], ref["stem.0.conv.weight"].sum(1, keepdim=True))
    for k in ref:
        if not k.startswith(("head.fc.", "stem.0.conv.")):
            assert torch.equal(sd5[k], ref[k]), k
    with torch.no_grad():
        gray = x.mean(1, keepdim=True)
        # features of a gray image through the adapted stem equal those of the gray image repeated on RGB
        torch.testing.assert_close(m5.forward_features(gray), src.forward_features(gray.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-4)

    # headless feature extractor from the same release (timm's num_classes=0 idiom)
    m0 = zoo.create_model("nextvit_small.test_local", pretrained=True, cache_dir=tmp_path, num_classes=0, **SMALL)
    with torch.no_grad():
        torch.testing.assert_close(m0.eval()(x), src.forward_head(src.forward_features(x), pre_logits=True))

    # the deploy form straight from the released (training-form) weights
    md = zoo.create_model("nextvit_small.test_local", pretrained=True, cache_dir=tmp_path, deploy=True, **SMALL)
    with torch.no_grad():
        torch.testing.assert_close(md(x), src(x), rtol=1e-4, atol=1e-4)


def test_pretrained_without_weights_or_offline(server, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/nextvit_small_dead.safetensors"
    _register_local_tag(monkeypatch, "test_dead", url, "0" * 64, "zoo", num_classes=1000)
    with pytest.raises(CheckpointError) as ei:
        zoo.create_model("nextvit_small.test_dead", pretrained=True, cache_dir=tmp_path, **SMALL)
    assert url in str(ei.value) and "by hand" in str(ei.value)


@pytest.fixture(scope="module")
def timm_pair():
    """timm's nextvit_small (fewer blocks, same widths) with random weights and BN statistics, and our twin."""
    import timm

    torch.manual_seed(0)
    depths = (1, 1, 5, 1)  # stage 2 = [NCB x4, NTB], like the full model's repeat unit
    ref = timm.create_model("nextvit_small", depths=depths).eval()
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return ref, depths


@pytest.mark.parametrize("layout", ["timm", "official", "ours-deploy"])
def test_checkpoint_path_layouts(tmp_path, timm_pair, layout):
    ref, depths = timm_pair
    sd = ref.state_dict()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = ref(x)
    if layout == "timm":
        path = tmp_path / "timm_nextvit.safetensors"
        save_file(sd, path)
    elif layout == "official":
        path = tmp_path / "nextvit_small_in1k_224.pth"
        torch.save({"model": _to_official(sd, depths), "epoch": 299}, path)
    else:
        from zoo.deploy import reparameterize

        ours = zoo.create_model("nextvit_small", checkpoint_path=_save(tmp_path, sd), depths=depths)
        path = tmp_path / "deploy.safetensors"
        save_file(reparameterize(ours).state_dict(), path)
    deploy = layout == "ours-deploy"
    m = zoo.create_model("nextvit_small", checkpoint_path=path, depths=depths, deploy=deploy).eval()
    if deploy:
        assert not any(isinstance(mod, torch.nn.BatchNorm1d) for mod in m.modules())
    with torch.no_grad():
        got = m(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _save(tmp_path, sd):
    p = tmp_path / "src.safetensors"
    save_file(sd, p)
    return p


def test_checkpoint_path_head_size_follows_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = zoo.create_model("nextvit_small", num_classes=10, **SMALL).eval()
    save_file(src.state_dict(), tmp_path / "finetuned.safetensors")
    m = zoo.create_model("nextvit_small", checkpoint_path=tmp_path / "finetuned.safetensors", **SMALL).eval()
    assert m.num_classes == 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))


def test_compiled_submodule_keys_are_cleaned():
    sd = {"stem.0.conv.weight": torch.randn(2, 3, 3, 3)}
    got = clean_state_dict({"state_dict": {f"model._orig_mod.{k}": v for k, v in sd.items()}})
    assert list(got) == list(sd)


def test_download_broken_http_response(server, tmp_path):
    # a "server" that answers with garbage instead of an HTTP status line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.settimeout(10)
        port = s.getsockname()[1]

        def answer():  # every connection (download() first checks that the server is reachable) gets garbage
            for _ in range(2):
                try:
                    conn, _ = s.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"garbage that is not HTTP\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        url = f"http://127.0.0.1:{port}/weights.safetensors"
        with pytest.raises(CheckpointError) as ei:
            download(CheckpointSource(url=url, sha256="0" * 64), cache_dir=tmp_path, progress=False)
        t.join(5)
    assert url in str(ei.value)
    assert _files(tmp_path) == []
