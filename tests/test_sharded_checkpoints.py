"""Sharded Hugging Face checkpoints (``model.safetensors.index.json`` + shards) through the real download code and a
local HTTP server on 127.0.0.1: URL and hub sources, the cache, a missing / truncated shard (no partial file, no
index left behind, the shard named), an index that disagrees with its shards, and ``create_model(pretrained=True)``
of a (tiny) Nemotron-Flash tag whose release is sharded like the 3B's."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import zoo
from tests.test_checkpoints import _files, _sha, _st_bytes, hf_endpoint, server  # noqa: F401  (fixtures)
from zoo.checkpoints import CheckpointError, download, load_file
from zoo.registry import CheckpointSource, get_entry

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _release(sd: dict) -> dict[str, bytes]:
    """{file name: bytes} of ``sd`` split over two safetensors shards plus the index, as the hub stores them."""
    keys = sorted(sd)
    parts = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    files = {name: _st_bytes({k: sd[k] for k in part}) for name, part in zip(SHARDS, parts)}
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": {k: name for name, part in zip(SHARDS, parts) for k in part}}
    files[INDEX] = json.dumps(index).encode()
    return files


def _publish(server, folder: str, files: dict[str, bytes]) -> str:  # noqa: F811
    for name, body in files.items():
        server.files[f"{folder}/{name}"] = body
    return f"{server.url}{folder}/{INDEX}"


SD = {"a.weight": torch.arange(6.0).view(2, 3), "b.weight": torch.ones(4), "c.bias": torch.zeros(2),
      "d.weight": torch.full((3,), 2.0)}


def test_sharded_url_download_cache_and_load(server, tmp_path):  # noqa: F811
    files = _release(SD)
    url = _publish(server, "/sharded/ok", files)
    src = CheckpointSource(url=url, sha256=_sha(files[INDEX]))
    n0 = len(server.requests)
    index = download(src, cache_dir=tmp_path, progress=False)
    assert index.name == INDEX and sorted(p.name for p in index.parent.iterdir()) == sorted([INDEX, *SHARDS])
    got = load_file(index)
    assert sorted(got) == sorted(SD) and all(torch.equal(got[k], SD[k]) for k in SD)
    assert load_file(index.parent).keys() == got.keys()  # the folder reads through its index
    n1 = len(server.requests)
    assert n1 - n0 == 3
    assert download(src, cache_dir=tmp_path, progress=False) == index
    assert len(server.requests) == n1, "a complete cached folder makes no request"
    # a shard deleted from the cache is fetched again (only that one)
    (index.parent / SHARDS[1]).unlink()
    download(src, cache_dir=tmp_path, progress=False)
    assert server.requests[n1:] == [f"/sharded/ok/{SHARDS[1]}"]
    # a cached index that no longer matches its hash is fetched again (the shards are kept)
    index.write_bytes(b'{"weight_map": {}}')
    n2 = len(server.requests)
    assert download(src, cache_dir=tmp_path, progress=False) == index and index.read_bytes() == files[INDEX]
    assert server.requests[n2:] == ["/sharded/ok/" + INDEX]
    # the index's own hash is checked like any file's
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        download(CheckpointSource(url=url, sha256="0" * 64), cache_dir=tmp_path / "bad", progress=False)
    assert _files(tmp_path / "bad") == []


@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_broken_shard_leaves_nothing_and_is_named(server, tmp_path, fault):  # noqa: F811
    files = _release(SD)
    url = _publish(server, f"/sharded/{fault}", files)
    if fault == "missing":
        del server.files[f"/sharded/{fault}/{SHARDS[1]}"]
    else:
        server.truncate.add(f"/sharded/{fault}/{SHARDS[1]}")
    with pytest.raises(CheckpointError, match=rf"shard {SHARDS[1]} listed in {INDEX}") as ei:
        download(CheckpointSource(url=url), cache_dir=tmp_path, progress=False)
    assert url.rsplit("/", 1)[0] in str(ei.value)
    left = [p.name for p in _files(tmp_path)]
    assert left == [SHARDS[0]], f"only the complete shard may stay (no index, no partial file): {left}"


def test_offline_sharded_says_where_to_put_index_and_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    src = CheckpointSource(url="http://127.0.0.1:9/release/" + INDEX)
    with pytest.raises(CheckpointError, match="offline mode.* with every shard it lists next to it"):
        download(src, cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_index_and_shards_must_agree(tmp_path):
    files = _release(SD)
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    (tmp_path / SHARDS[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {SHARDS[1]} listed in {INDEX} is missing: expected at "):
        load_file(tmp_path / INDEX)
    (tmp_path / SHARDS[1]).write_bytes(_st_bytes({"c.bias": torch.zeros(2), "zzz": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=rf"{SHARDS[1]} does not match {INDEX}: 1 tensors the index places "
                                              r"there are absent \(d.weight\) 1 tensors are not in the index \(zzz\)"):
        load_file(tmp_path / INDEX)
    bad = {"weight_map": {"a.weight": "../elsewhere.safetensors"}}
    (tmp_path / INDEX).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="not a plain shard file name"):
        load_file(tmp_path / INDEX)


def test_pretrained_sharded_nemotron_flash_from_the_hub(server, hf_endpoint, tmp_path, monkeypatch):  # noqa: F811
    """A tag whose source is a sharded hub repo (as nvidia/Nemotron-Flash-3B) loads with pretrained=True; the release
    layout (bf16 shards) goes through the family converter."""
    from tests.language.test_nemotron_flash import TINY, _to_release
    from zoo.language.nemotron_flash import NemotronFlashLM

    torch.manual_seed(0)
    ref = NemotronFlashLM(**TINY).eval()
    release = {k: v.to(torch.bfloat16) for k, v in _to_release(ref.state_dict(), ref.config.layer_types).items()}
    for name, body in _release(release).items():
        hf_endpoint("zoo-test/flash-sharded", name, body)
    entry = get_entry("nemotron_flash_3b")
    assert entry.tags["nvidia"].source.hf_filename == INDEX  # the released 3B is sharded
    cfg = dataclasses.replace(entry.tags["nvidia"], source=CheckpointSource(
        hf_hub_id="zoo-test/flash-sharded", hf_filename=INDEX, layout="hf"))
    monkeypatch.setitem(entry.tags, "test_sharded", cfg)
    m = zoo.create_model("nemotron_flash_3b.test_sharded", pretrained=True, cache_dir=tmp_path, **TINY).eval()
    ids = torch.randint(1, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref(ids), rtol=0.1, atol=0.1)  # bf16 release vs fp32 original
        conv = NemotronFlashLM(**TINY).eval()
        from zoo.language.nemotron_flash import checkpoint_filter_fn

        conv.load_state_dict({k: v.float() for k, v in checkpoint_filter_fn(release, conv).items()})
        torch.testing.assert_close(m(ids), conv(ids))
    assert not [p for p in _files(tmp_path) if p.name.endswith((".part", ".pending"))]
    # timm's pretrained_cfg_overlay naming only the repository: like transformers, a repository without
    # model.safetensors is read through its index (from the cache now: no shard is fetched again)
    n0 = len(server.requests)
    m2 = zoo.create_model("nemotron_flash_3b", pretrained=True, cache_dir=tmp_path,
                          pretrained_cfg_overlay=dict(hf_hub_id="zoo-test/flash-sharded"), **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(ids), conv(ids))
    assert not any(SHARDS[0] in r or SHARDS[1] in r for r in server.requests[n0:])
    # a repository with neither file says so
    with pytest.raises(CheckpointError, match="zoo-test/no-such-file has neither model.safetensors nor model.safe"):
        download(CheckpointSource(hf_hub_id="zoo-test/no-such-file"), cache_dir=tmp_path / "x", progress=False)
