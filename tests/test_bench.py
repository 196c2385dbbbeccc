"""`zoo bench`: GMACs counting, latency rows for each runtime, CSV / JSON / Pareto plot output."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import zoo
from tests.test_checkpoints import SMALL
from zoo import bench
from zoo.cli import main as cli_main


def _attention_gmacs(model, h: int, w: int) -> float:
    """Q K^T and A V of every E-MHSA, counted from the architecture: 2 * N * N_kv * C per block."""
    from zoo.vision.nextvit import NTB

    total = 0
    for i, stage in enumerate(model.stages):
        n = (h // (4 * 2**i)) * (w // (4 * 2**i))
        for blk in stage.blocks:
            if isinstance(blk, NTB):
                attn = blk.e_mhsa
                n_kv = n // attn.area if attn.sr_ratio > 1 else n
                total += 2 * n * n_kv * attn.q.in_features
    return total / 1e9


def test_gmacs_nextvit_small_on_meta():
    with torch.device("meta"):
        model = zoo.create_model("nextvit_small")
    assert all(p.is_meta for p in model.parameters())
    total, ops = bench.count_gmacs(model, torch.empty(1, 3, 224, 224, device="meta"), by_op=True)
    attn = _attention_gmacs(model, 224, 224)
    # convolutions and linear layers: the reference count (5.76 GMACs, timm and the official code)
    assert total - ops["aten.bmm"] == pytest.approx(5.76, abs=0.01)
    # plus the attention matmuls, which torch's counter misses for the fused CPU kernel but we count
    assert ops["aten.bmm"] == pytest.approx(attn, rel=1e-6)
    assert total == pytest.approx(5.76 + attn, abs=0.01)
    stats = bench.model_stats("nextvit_small")
    assert stats["params"] == 31_763_368 and stats["gmacs"] == pytest.approx(total)
    assert stats["has_deploy"] and 31.70e6 < stats["deploy_params"] < stats["params"]


def test_gmacs_real_tensors_match_meta():
    torch.manual_seed(0)
    model = zoo.create_model("nextvit_small", **SMALL)
    x = torch.randn(1, 3, 64, 64)
    cpu = bench.count_gmacs(model, x)
    meta = bench.count_gmacs(bench.build("nextvit_small", "meta", **SMALL), x.to("meta"))
    assert cpu == pytest.approx(meta, rel=1e-9)
    assert cpu > bench.count_gmacs(model, x, by_op=True)[1]["aten.convolution"]


def test_summarize():
    s = bench.summarize([float(t) for t in range(10, 0, -1)], batch_size=4)
    assert s["median_ms"] == 5.5 and s["p90_ms"] == 9 and s["min_ms"] == 1 and s["iters"] == 10
    assert s["throughput"] == pytest.approx(4 * 1000 / 5.5)


def test_pareto_front():
    pts = [(10, 80.0), (5, 79.0), (20, 79.5), (30, 82.0), (6, 78.0)]
    assert bench.pareto_front(pts) == [(5, 79.0), (10, 80.0), (30, 82.0)]


def test_bench_models_rows_per_runtime():
    rows = bench.bench_models(["nextvit_small"], runtimes=("eager", "deploy", "onnxruntime"), image_size=64,
                              threads=1, warmup=1, iters=3, overrides=SMALL, progress=False, skip_errors=False)
    assert [r["runtime"] for r in rows] == ["eager", "deploy", "onnxruntime"]
    for r in rows:
        assert set(r) == set(bench.COLUMNS)
        assert r["model"] == "nextvit_small" and r["input_size"] == "3x64x64" and r["threads"] == 1
        assert r["iters"] == 3 and not r["error"]
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["throughput"] == pytest.approx(1000 / r["median_ms"], rel=1e-2)
        assert r["top1"] is None, "a modified architecture has no published accuracy"
    eager, deploy, ort = rows
    assert eager["gmacs"] == deploy["gmacs"] > 0
    assert deploy["params_m"] < eager["params_m"] and ort["params_m"] == deploy["params_m"]
    with pytest.raises(ValueError, match="tensorrt"):
        bench.bench_models(["nextvit_small"], runtimes=("tensorrt",))


@pytest.fixture
def compile_without_codegen(monkeypatch):
    """torch.compile with the ``aot_eager`` backend: Dynamo graph capture and AOTAutograd run for real, Inductor's C++
    code generation does not. Why: Inductor compiled the 5-block test Next-ViT in 465 s on the shared 2-core machine
    (load ~16), far beyond the suite's budget; what the zoo code controls (that the compiled module is built, used
    and traced without errors) is fully exercised by Dynamo + AOTAutograd."""
    import functools

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (Dynamo) is not supported on this Python / platform")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_bench_compile_runtime_runs_a_compiled_model(compile_without_codegen):
    rows = bench.bench_models(["nextvit_small"], runtimes=("eager", "compile"), image_size=32, threads=1, warmup=1,
                              iters=2, overrides=SMALL, progress=False, skip_errors=False)
    assert [r["runtime"] for r in rows] == ["eager", "compile"] and not rows[1]["error"]
    assert rows[1]["median_ms"] > 0 and rows[1]["iters"] == 2
    assert compile_without_codegen["stats"]["unique_graphs"] >= 1  # Dynamo really captured the model
    assert rows[1]["params_m"] < rows[0]["params_m"]  # the deploy form was compiled, not the training form


def test_measure_keeps_the_model_and_threads():
    model = zoo.create_model("nextvit_small", **SMALL).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the 1 measured with (the suite runs with 1), so a leaked setting shows
    try:
        r = bench.measure(model, torch.randn(2, 3, 32, 32), "deploy", warmup=0, iters=2, threads=1)
        assert r["threads"] == 1 and r["iters"] == 2 and r["throughput"] > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert bench.has_deploy_form(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bench_cli_table_csv_json_plot(tmp_path, capsys):
    csv_path, json_path, png = tmp_path / "b.csv", tmp_path / "b.json", tmp_path / "pareto.png"
    rc = cli_main(["bench", "nextvit_s*", "--image-size", "64", "--runtime", "eager,deploy", "--threads", "1",
                   "--warmup", "1", "--iters", "2", "--csv", str(csv_path), "--json", str(json_path),
                   "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["model", "runtime"] and "GMACs" in lines[0] and "p90 ms" in lines[0]
    table = [ln.split() for ln in lines[2:4]]
    assert [t[:2] for t in table] == [["nextvit_small", "eager"], ["nextvit_small", "deploy"]]
    assert table[0][5] == "31.763" and table[0][-1] == "82.5"  # params (M) and published top-1

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["runtime"] for r in rows] == ["eager", "deploy"]
    assert float(rows[0]["params_m"]) == 31.763 and float(rows[1]["params_m"]) < 31.763
    assert float(rows[0]["gmacs"]) == pytest.approx(float(rows[1]["gmacs"])) and float(rows[0]["median_ms"]) > 0

    doc = json.loads(json_path.read_text())
    assert doc["settings"]["image_size"] == 64 and doc["settings"]["iters"] == 2
    assert doc["environment"]["torch"] == torch.__version__
    assert [r["runtime"] for r in doc["results"]] == ["eager", "deploy"]
    assert doc["results"][0]["top1"] == 82.5

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_needs_published_accuracy(tmp_path):
    rows = [{"model": "x", "runtime": "eager", "median_ms": 3.0, "top1": None, "batch_size": 1, "threads": 1}]
    with pytest.raises(ValueError, match="published top-1"):
        bench.plot_pareto(rows, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_bench_cli_bad_input(capsys):
    assert cli_main(["bench", "nextvit_smal", "--no-progress"]) == 2
    assert "nextvit_small" in capsys.readouterr().err
    assert cli_main(["bench", "nextvit_small", "--runtime", "eager,tensorrt", "--no-progress"]) == 2
    assert "tensorrt" in capsys.readouterr().err
