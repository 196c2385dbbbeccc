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
    assert cli_main(["info", "nextvit_small.bd_in1k_384", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "nextvit_small" and info["family"] == "nextvit" and info["paper"] == "2207.05501"
    assert info["params"] == 31_763_368
    assert info["default_cfg"]["input_size"] == [3, 384, 384]
    assert "bd_ssld_6m_in1k" in info["tags"]

    assert cli_main(["info", "nextvit_smal"]) == 2
    err = capsys.readouterr().err
    assert "nextvit_small" in err and "Traceback" not in err


def test_info_is_concise_and_cites(capsys):
    from zoo.papers import PAPERS
    from zoo.registry import resolve_cfg

    assert cli_main(["info", "nextvit_small"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) <= 12, out  # was ~150 lines of JSON repeating the config per tag
    assert lines[0].startswith("nextvit_small: nextvit image-classification, 31.76 M parameters")
    assert "arXiv 2207.05501" in out and "3x224x224" in out and "{" not in out
    tag_lines = [ln for ln in lines if "hf://timm/nextvit_small." in ln]
    assert len(tag_lines) == 4 and "*>bd_in1k " in tag_lines[0]
    assert any("bd_ssld_6m_in1k " in ln and "verified" in ln for ln in tag_lines)  # its sha256 is pinned
    assert any("bd_in1k_384" in ln and "3x384x384" in ln for ln in tag_lines)  # only what differs is shown

    assert cli_main(["info", "nextvit_small", "--bibtex"]) == 0
    bib = capsys.readouterr().out
    assert bib.startswith("@misc{li2022nextvit,") and "eprint        = {2207.05501}" in bib
    assert "Li, Jiashi and Xia, Xin" in bib and bib.count("@") == 1
    assert cli_main(["info", "fastvit_mci0", "--bibtex"]) == 0  # MobileCLIP and MobileCLIP2 tags
    assert capsys.readouterr().out.count("@") == 2
    assert cli_main(["info", "fastvit_mci0.apple_mclip2_dfndr2b", "--bibtex"]) == 0
    one = capsys.readouterr().out
    assert one.count("@") == 1 and "journal       = {Transactions on Machine Learning Research}" in one

    # every registered model and tag names a paper we can cite
    for name in zoo.list_models():
        entry = resolve_cfg(name)[0]
        assert all(c.paper in PAPERS for c in entry.tags.values()), name


def test_version(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pareto-zoo {zoo.__version__}"


def test_rough_errors(tmp_path, capsys):
    # an untagged model without weights: no stray dot after its name
    assert cli_main(["download", "ssdlite_mobiledet_cpu", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ssdlite_mobiledet_cpu has no released weights" in err and "ssdlite_mobiledet_cpu." not in err
    with pytest.raises(Exception, match="ssdlite_mobiledet_cpu has no released weights"):
        zoo.create_model("ssdlite_mobiledet_cpu", pretrained=True)

    # `zoo snn report` on a folder without a finished pipeline
    missing = tmp_path / "nonexistent"
    assert cli_main(["snn", "report", "--out", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "zoo snn pipeline" in err and "Traceback" not in err
    (missing / "ann").mkdir(parents=True)
    (missing / "ann" / "metrics.json").write_text("{}")
    assert cli_main(["snn", "report", "--out", str(missing)]) == 2
    assert "snn_t5/metrics.json" in capsys.readouterr().err

    # Next-ViT with the wrong number of stages: a clear error naming the expected length
    for depths in ("(1,1)", "(1,1,1,1,1)"):
        assert cli_main(["export", "nextvit_small", "-o", str(tmp_path / "x.onnx"), "--override",
                         f"depths={depths}"]) == 2
        assert "depths needs 4 values (one per stage)" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()

    # random bytes in a .pth: a corrupt file, not a pickle that would run code
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 16)
    assert cli_main(["export", str(junk), "--model", "nextvit_small", "-o", str(tmp_path / "j.onnx")]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "import or call" not in err and "weights_only" not in err


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
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "parity checked" in captured.out
    assert "RANDOM weights" in captured.err and "--pretrained" in captured.err  # a name without --pretrained
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

    # `zoo list | head`: the reader goes away before the output is written; no BrokenPipeError traceback
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "zoo.cli", "list", "--pretrained"], cwd=ROOT, env=env,
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
