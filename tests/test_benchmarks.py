"""Smoke runs with tiny sizes: every benchmark script the MODEL_CARD figures come from, and ``python -m zoo.demo``.

The figures are meaningless at these sizes; what is checked is that each script runs end to end (building both
implementations, loading the same weights, exporting, timing) and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {  # script -> smallest arguments it has
    "bench_nextvit.py": ["--tiny", "--batch-sizes", "1", "--image-size", "32", "--threads", "1", "--warmup", "0",
                         "--rounds", "1", "--per-round", "1"],
    "bench_fastvit.py": ["--tiny", "--models", "fastvit_sa12", "--batch-sizes", "1", "--image-size", "64",
                         "--threads", "1", "--warmup", "0", "--rounds", "1", "--per-round", "1"],
    "bench_lfm2.py": ["--tiny", "--threads", "1", "--contexts", "16", "--prefill-len", "16", "--decode-steps", "2",
                      "--repeats", "1", "--batch-sizes", "1", "2", "--dtypes", "fp32", "bf16"],
    "bench_nemotron_flash.py": ["--tiny", "--threads", "1"],
    # fmvit_tiny is the smallest FMViT at its full architecture; 32 px is the smallest input every stage accepts
    "bench_fmvit.py": ["--models", "fmvit_tiny", "--batch-sizes", "1", "--image-size", "32", "--threads", "1",
                       "--warmup", "0", "--rounds", "1", "--per-round", "1"],
    "bench_startup.py": ["--repeat", "1", "--cases", "zoo --help", "import zoo"],
    # the family's reduced test depths (SmallCfg), 64 px, both variants timed once; --no-onnx: the two dynamo exports
    # cost ~20 of the smoke's ~35 CPU-s (the family's ONNX export is tested in tests/vision/test_pp_mobileseg.py)
    "bench_pp_mobileseg.py": ["--tiny", "--no-onnx", "--models", "pp_mobileseg_tiny", "--size", "64", "--iters", "1",
                              "--warmup", "0", "--threads", "1"],
    # open_clip's MobileCLIP2-S0 and ours, one block per image stage and one text layer, on the same weights
    # (--no-onnx as above: the two encoder exports are tested in tests/vision/test_mobileclip.py)
    "bench_mobileclip.py": ["--tiny", "--no-onnx", "--models", "mobileclip2_s0", "--rounds", "1", "--per-round",
                            "1", "--warmup", "0", "--threads", "1"],
    # the doclayout-yolo package's model and ours at 1/8 width, 64 px (84 anchors: top 50 kept); --no-onnx as above
    # (the export with the top-k head is tested in tests/vision/test_yolov10.py)
    "bench_doclayout_yolo.py": ["--tiny", "--no-onnx", "--size", "64", "--max-det", "50", "--batch-sizes", "1",
                                "--iters", "1", "--warmup", "0", "--threads", "1"],
    # a random tiny IIR-SNN at 16 px: quantized (2 calibration batches), parity report, interleaved timing, profile
    "bench_int8.py": ["--tiny", "--calib-batches", "2", "--rounds", "1", "--calls", "2", "--threads", "1"],
}
# scripts that also write their MODEL_CARD tables with --results (zoo.bench.write_results)
RESULTS = {"bench_nextvit.py": ["threads1"], "bench_fastvit.py": ["median", "ratios"]}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_script_smoke(script, tmp_path):
    out, results = tmp_path / "out.json", tmp_path / "results.json"
    extra = ["--results", str(results)] if script in RESULTS else []
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *SMOKE[script], "--json", str(out),
                           *extra], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc, script
    if script in RESULTS:  # the card's tables, with how they were made
        res = json.loads(results.read_text())
        assert sorted(res["tables"]) == sorted(RESULTS[script]) and res["provenance"] == "measured"
        assert res["machine"]["load_during_run"]["samples"] >= 1 and res["data"]["results"] == doc["results"]
        assert all(len(r) == len(t["columns"]) for t in res["tables"].values() for r in t["rows"])
        results.unlink()
    if script == "bench_pp_mobileseg.py":  # both variants and the upsampling stage alone timed
        (row,) = doc
        assert row["model"] == "pp_mobileseg_tiny" and row["onnx_vs_eager_batch2"] == {}
        assert all(row[f"{rt} {v} ms"] > 0 for rt in ("eager", "stage") for v in ("vim", "bilinear+argmax"))
        assert row["label_agreement"] > 0.5  # mostly the same labels (a tiny random model at 64 px: not all)
        assert list(tmp_path.iterdir()) == [out]
        return
    if script == "bench_mobileclip.py":  # ours == open_clip on the same weights, every runtime of both encoders
        assert {(r["encoder"], r["runtime"]) for r in doc["rows"]} == {
            (e, rt) for e in ("image", "text") for rt in ("open_clip", "ours train", "ours deploy")
        } | {("image", "open_clip reparam")}
        assert all(r["median_ms"] > 0 and r["max_abs_diff_image"] < 1e-4 and r["max_abs_diff_image_deploy"] < 1e-4
                   and r["max_abs_diff_text"] < 1e-4 for r in doc["rows"])
        assert list(tmp_path.iterdir()) == [out]
        return
    if script == "bench_int8.py":  # a results file: int8 vs fp32 agreement, both timed at batch 1 and 8, profiled
        (row,) = doc["tables"]["int8"]["rows"]
        assert row[0] == "tiny snn" and row[2] == "minmax, 2 batches"
        assert row[6] >= 90 and all(row[i] > 0 for i in (7, 8, 9, 10, 11, 12))
        (detail,) = doc["settings"]["details"]
        assert detail["calibration_images"] == 16 and detail["profile"] and doc["provenance"] == "measured"
        assert list(tmp_path.iterdir()) == [out]
        return
    if script == "bench_doclayout_yolo.py":  # a results file: same detections as the package, timed
        assert doc["provenance"] == "measured" and doc["settings"]["batch_sizes_done"] == [1]
        diffs = doc["settings"]["max_abs_diff_vs_ours"]
        assert set(diffs) == {"ref predict", "ref export-mode"}
        assert all(d["scores"] < 1e-3 and d["boxes"] < 1e-2 for d in diffs.values()), diffs
        rows = doc["tables"]["latency"]["rows"]
        assert [r[0] for r in rows[:3]] == ["ours deploy", "ref predict", "ref export-mode"] and len(rows) == 5
        assert all(isinstance(c, float) and c > 0 for r in rows[:3] for c in r[1:])
        assert list(tmp_path.iterdir()) == [out]
        return
    if script == "bench_nemotron_flash.py":  # ours == transformers' Mamba2 on the same weights; both context rows
        assert doc["mixer"]["max_abs_diff_prefill"] < 1e-4 and len(doc["context"]) == 2
        return
    if script == "bench_fmvit.py":  # exported, parity-checked and timed through onnxruntime
        assert [r["model"] for r in doc["results"]] == ["fmvit_tiny"] and doc["results"][0]["median_ms"] > 0
    elif script == "bench_startup.py":  # `import zoo` stays free of the heavy packages
        res = {r["case"]: r for r in doc["results"]}
        assert set(res) == {"zoo --help", "import zoo"} and res["import zoo"]["heavy_modules"] == []
    elif script == "bench_lfm2.py":  # every path ran; ours == transformers on the same weights
        assert {r[0] for r in doc["tables"]["decode"]["rows"]} == {"zoo fast", "zoo step", "zoo eager", "transformers"}
        assert len(doc["tables"]["batch"]["rows"]) == 2 and doc["tables"]["prefill"]["rows"]
        assert doc["settings"]["max_abs_logit_diff_vs_transformers"] < 1e-4
    else:
        assert doc["results"] and all(r["median_ms"] > 0 for r in doc["results"])
        diff_key = next(k for k in doc["results"][0] if k.startswith("max_abs_diff"))
        assert all(r[diff_key] < 1e-4 for r in doc["results"])  # ours == timm on the same weights
    assert list(tmp_path.iterdir()) == [out]  # nothing else left behind


def test_demo_runs_end_to_end_with_tiny_settings(tmp_path, monkeypatch, capsys):
    """``python -m zoo.demo``: the real quickstart recipe through Lightning (train, test the best checkpoint, deploy +
    ONNX, latency of the three runtimes, CSV and plot), with the training cut to two updates."""
    import zoo.training
    from zoo import demo

    real_cli = zoo.training.run_lightning_cli
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1"]
    monkeypatch.setattr(zoo.training, "run_lightning_cli", lambda args: real_cli([*args, *tiny]))
    monkeypatch.chdir(tmp_path)
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    runs = tmp_path / "runs" / "quickstart"
    files = {p.name for p in runs.rglob("*") if p.is_file()}
    assert {"bench.csv", "pareto.png", "metrics.csv"} <= files, files
    assert any(f.endswith(".onnx") for f in files) and any(f.endswith(".ckpt") for f in files)
    import csv

    with open(next(runs.rglob("bench.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [r["runtime"] for r in rows] == ["eager", "deploy", "onnxruntime"]
    assert all(float(r["median_ms"]) > 0 for r in rows)
    # results.json (zoo.bench.write_results): accuracy, latency and where the time went, with how it was made
    doc = json.loads(next(runs.rglob("results.json")).read_text())
    assert doc["command"] == "python -m zoo.demo" and doc["machine"]["torch"] and doc["settings"]["global_step"] == 2
    stages = dict(doc["tables"]["time"]["rows"])
    assert {"imports", "setup", "first_step", "training", "deploy_export", "test", "bench", "total"} <= set(stages)
    assert 0 < stages["first_step"] <= stages["training"] < stages["total"]
    assert doc["tables"]["accuracy"]["rows"][0][0] == "quickstart"
