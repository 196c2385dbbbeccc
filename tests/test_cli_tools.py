"""`zoo list / info / download / export`, run in-process through their main(argv) (one real subprocess call)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

import zoo
from tests.test_checkpoints import SMALL, _serve, server  # noqa: F401  (server is a fixture)
from zoo.checkpoints import save_file
from zoo.cli import main as cli_main
from zoo.registry import CheckpointSource, get_entry

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_ARGS = [a for k, v in SMALL.items() for a in ("--override", f"{k}={v!r}")]


def _tag(monkeypatch, tag, source):
    entry = get_entry("nextvit_small")
    cfg = dataclasses.replace(entry.tags[entry.default_tag], source=source)
    monkeypatch.setitem(entry.tags, tag, cfg)


def test_list(capsys):
    assert cli_main(["list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"nextvit_small", "nextvit_base", "nextvit_large"} <= set(names)
    assert names == zoo.list_models()

    assert cli_main(["list", "nextvit_*", "--pretrained"]) == 0
    tags = capsys.readouterr().out.split()
    assert "nextvit_small.bd_in1k" in tags and "nextvit_large.bd_ssld_6m_in1k_384" in tags
    assert all(t.startswith("nextvit_") and "." in t for t in tags)

    assert cli_main(["list", "--task", "image-classification", "nextvit_s*"]) == 0
    assert capsys.readouterr().out.split() == ["nextvit_small"]

    assert cli_main(["list", "no_such_family_*"]) == 1
    assert "no registered model matches" in capsys.readouterr().err


def test_info(capsys):
    assert cli_main(["info", "nextvit_small.bd_in1k_384"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "nextvit_small" and info["family"] == "nextvit" and info["paper"] == "2207.05501"
    assert info["params"] == 31_763_368
    assert info["default_cfg"]["input_size"] == [3, 384, 384]
    assert "bd_ssld_6m_in1k" in info["tags"]

    assert cli_main(["info", "nextvit_smal"]) == 2
    err = capsys.readouterr().err
    assert "nextvit_small" in err and "Traceback" not in err


def test_download_prefetches_into_the_cache(server, tmp_path, monkeypatch, capsys):  # noqa: F811
    body = b"released weights" * 100
    url = _serve(server, "/cli/nextvit_small_cli.safetensors", body)
    _tag(monkeypatch, "cli_test", CheckpointSource(url=url, sha256=hashlib.sha256(body).hexdigest()))
    n0 = server.requests.count("/cli/nextvit_small_cli.safetensors")

    assert cli_main(["download", "nextvit_small.cli_test", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    name, path = capsys.readouterr().out.strip().split("\t")
    assert name == "nextvit_small.cli_test"
    assert pathlib.Path(path).read_bytes() == body and pathlib.Path(path).is_relative_to(tmp_path)
    # a second prefetch is served from the cache
    assert cli_main(["download", "nextvit_small.cli_test", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    assert server.requests.count("/cli/nextvit_small_cli.safetensors") == n0 + 1


def test_download_errors(tmp_path, monkeypatch, capsys):
    _tag(monkeypatch, "no_weights", None)
    assert cli_main(["download", "nextvit_small.no_weights", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no released weights" in err and "bd_in1k" in err

    assert cli_main(["download", "nextvit_small.no_such_tag"]) == 2
    assert "available tags" in capsys.readouterr().err

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/nextvit_small_dead.safetensors"
    _tag(monkeypatch, "dead", CheckpointSource(url=dead, sha256="0" * 64))
    assert cli_main(["download", "nextvit_small.dead", "--cache-dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert dead in err and "by hand" in err and "Traceback" not in err


def test_export_model_name_to_onnx(tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "tiny.onnx"
    rc = cli_main(["export", "nextvit_small", "--format", "onnx", "-o", str(out), "--input-size", "3", "64", "64",
                   *SMALL_ARGS])
    assert rc == 0, capsys.readouterr().err
    assert "parity checked" in capsys.readouterr().out
    assert out.exists() and not list(tmp_path.glob("*.data")), "a small model's ONNX file must be self-contained"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: torch.randn(3, 3, 64, 64).numpy()})
    assert y.shape == (3, 1000)


def test_export_checkpoint_file(tmp_path, capsys):
    torch.manual_seed(0)
    src = zoo.create_model("nextvit_small", num_classes=4, **SMALL).eval()
    ckpt = tmp_path / "finetuned.safetensors"
    save_file(src.state_dict(), ckpt)

    # a checkpoint needs its architecture
    assert cli_main(["export", str(ckpt), "-o", str(tmp_path / "x.pt2")]) == 2
    assert "--model" in capsys.readouterr().err

    out = tmp_path / "finetuned.pt2"
    rc = cli_main(["export", str(ckpt), "--model", "nextvit_small", "--format", "torch_export", "-o", str(out),
                   "--input-size", "3", "64", "64", *SMALL_ARGS])
    assert rc == 0, capsys.readouterr().err
    prog = torch.export.load(str(out)).module()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(prog(x), src(x), rtol=1e-4, atol=1e-4)  # the fine-tuned 4-class head survived


def test_export_bad_input(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing.pth"), "--model", "nextvit_small", "-o", "x.onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["export", "nextvit_smal", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "nextvit_small" in capsys.readouterr().err
    assert cli_main(["export", "nextvit_small", "-o", "x.onnx", "--override", "depths"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown format
        cli_main(["export", "nextvit_small", "-o", "x.bin", "--format", "tflite"])


def test_cli_subprocess_list_and_unknown_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "zoo.cli", "list", "nextvit_*"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["nextvit_base", "nextvit_large", "nextvit_small"]
    assert cli_main(["lst"]) == 2
