"""Measured results behind MODEL_CARD.md: small committed files in benchmarks/results/ (written by
``zoo.bench.write_results``) from which the card's measured tables are generated; ``make_model_card.py --check``
fails when a table in the card differs from its file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def card_script():
    spec = importlib.util.spec_from_file_location("make_model_card_results", ROOT / "scripts" / "make_model_card.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_results_file_records_how_it_was_made_and_the_card_matches(card_script):
    # lm_search_settings.json is not a results file: it is the settings file `zoo lm-search` keeps next to the
    # committed history (lm_search_history.jsonl), copied as the command wrote it
    files = sorted(f for f in (ROOT / "benchmarks" / "results").glob("*.json") if f.name != "lm_search_settings.json")
    assert len(files) >= 6
    meta = {"command", "date", "date_note", "machine", "provenance", "transcribed_from", "settings", "notes"}
    for f in files:
        doc = json.loads(f.read_text())
        assert doc.get("command") and doc.get("date") and doc.get("machine"), f
        assert set(doc) - meta, f"{f}: no figures besides how they were made"
        if doc.get("provenance") == "transcribed":
            assert doc.get("transcribed_from"), f"{f}: a transcribed figure says where it was first recorded"
    card = (ROOT / "MODEL_CARD.md").read_text()
    blocks = list(card_script.RESULTS_BLOCK.finditer(card))
    named = {m[1] for m in blocks}
    assert {"snn_digits.json", "nextvit_latency.json", "mobiledet_shapes.json", "lfm2_stdlib_tiny.json"} <= named
    assert card_script.check_results_blocks(card) == []


def test_written_results_render_and_a_stale_card_table_fails_the_check(card_script, tmp_path, monkeypatch, capsys):
    from zoo.bench import write_results

    with pytest.raises(ValueError, match="'acc'.*2 cells"):
        write_results(tmp_path / "bad.json", {"acc": {"columns": ["run", "top1"], "rows": [["a"]]}})
    assert not (tmp_path / "bad.json").exists()
    path = write_results(tmp_path / "demo.json", {"acc": {"columns": ["run", "top1 %"], "rows": [["a", 97.5]]}},
                         command="python -m zoo.demo", settings={"epochs": 1})
    doc = json.loads(path.read_text())
    assert doc["provenance"] == "measured" and doc["machine"]["torch"] and doc["settings"] == {"epochs": 1}
    monkeypatch.setattr(card_script, "RESULTS_DIR", tmp_path)
    row, _ = card_script.table_row("snn_vgg11", {})
    head = "# Model card\n\n" + row + "\n\n" + card_script.MARKER + "\n\n## Section\n\n"
    card = tmp_path / "card.md"
    card.write_text(head + "<!-- results demo.json acc -->\nold\n<!-- end results -->\n\ntext after\n")
    assert card_script.check_results_blocks(card.read_text())  # never generated
    assert card_script.main(["--results-only", "--output", str(card)]) == 0
    text = card.read_text()
    assert "| a | 97.5 |" in text and "`python -m zoo.demo`" in text and text.endswith("text after\n")
    assert card_script.check_results_blocks(text) == []
    assert "missing.json" in card_script.check_results_blocks(text.replace("demo.json acc", "missing.json acc"))[0]
    card.write_text(text.replace("| a | 97.5 |", "| a | 98.5 |"))  # a figure edited by hand: the process fails
    capsys.readouterr()
    assert card_script.main(["--check", "--models", "snn_vgg11", "--output", str(card)]) == 1
    assert "demo.json acc" in capsys.readouterr().err
