"""scripts/make_model_card.py --check: exit 1 when MODEL_CARD.md's generated table disagrees with the registry or the
committed latency results, 0 when it agrees; the committed card itself is checked on a few rows (the full check
builds all ~40 models on the meta device, about a CPU-minute: `make model-card` / the script without --model)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_model_card.py"
CARD = ROOT / "MODEL_CARD.md"


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_model_card", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_exits_nonzero_on_a_stale_row_and_zero_when_it_matches(tmp_path, script, capsys):
    row, _ = script.table_row("snn_vgg11", {})
    assert row.startswith("| `snn_vgg11` | iir_snn |") and "| 36.20 / 36.20 |" in row
    head = "# Model card\n\n| Model | ... |\n|---|\n"
    good = tmp_path / "good.md"
    good.write_text(head + row + "\n\n" + script.MARKER + "\n\n## hand-written\n")
    assert script.main(["--check", "--models", "snn_vgg11", "--output", str(good)]) == 0

    stale = tmp_path / "stale.md"  # a parameter count the registry does not give
    stale.write_text(good.read_text().replace("| 36.20 / 36.20 |", "| 36.21 / 36.20 |"))
    capsys.readouterr()
    assert script.main(["--check", "--models", "snn_vgg11", "--output", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "`snn_vgg11`" in err and "36.21" in err and "make model-card" in err
    missing = tmp_path / "missing.md"
    missing.write_text(head + "\n" + script.MARKER + "\n")
    assert script.main(["--check", "--models", "snn_vgg11", "--output", str(missing)]) == 1
    assert "no row" in capsys.readouterr().err
    assert script.main(["--check", "--models", "no_such_model*", "--output", str(good)]) == 1
    # the process exit status, as CI sees it
    proc = _check("--models", "snn_vgg11", "--output", str(stale))
    assert proc.returncode == 1 and "36.21" in proc.stderr, proc.stderr


def test_latency_cells_come_from_the_committed_results_file(script):
    doc = json.loads(script.LATENCY_RESULTS.read_text())
    assert {"command", "date", "machine", "settings", "results"} <= set(doc)
    assert doc["machine"]["torch"] and doc["machine"]["cpu_count"] and doc["command"].startswith("python scripts/")
    r = next(r for r in doc["results"] if r["model"] == "nextvit_small" and r["runtime"] == "eager")
    lat = {(r["model"], r["runtime"]): r for r in doc["results"]}
    row, _ = script.table_row("nextvit_small", lat)
    assert f"| {r['median_ms']:.1f} / " in row


def test_committed_card_rows_are_up_to_date(script, capsys):
    rc = script.main(["--check", "--models", "nextvit_small,snn_vgg11,snn_resnet20,ssdlite_mobiledet_cpu"])
    assert rc == 0, capsys.readouterr().err
