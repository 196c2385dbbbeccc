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
    assert "Measured once (not asserted by a test). Source: `benchmarks/results/demo.json`" in text
    assert card_script.check_results_blocks(text) == []
    assert "missing.json" in card_script.check_results_blocks(text.replace("demo.json acc", "missing.json acc"))[0]
    card.write_text(text.replace("| a | 97.5 |", "| a | 98.5 |"))  # a figure edited by hand: the process fails
    capsys.readouterr()
    assert card_script.main(["--check", "--models", "snn_vgg11", "--output", str(card)]) == 1
    assert "demo.json acc" in capsys.readouterr().err


def test_recipe_results_records_a_real_fit_and_test(tmp_path):
    """benchmarks/recipe_results.py, the one producer of the training-recipe tables (digits, LFM2): a real Lightning
    fit + test of a recipe, its metrics and the run's cost written as a results file."""
    spec = importlib.util.spec_from_file_location("recipe_results", ROOT / "benchmarks" / "recipe_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "digits.json"
    assert mod.main(["snn/digits_vgg_ann", "--results", str(out), "--metric", "Input px=data.image_size",
                     "--metric", "val acc=val/acc", "--metric", "test acc=test/acc", "--metric",
                     "loss ratio=test/loss / val/loss", "--", "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=2",
                     "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false"]) == 0
    doc = json.loads(out.read_text())
    t = doc["tables"]["results"]
    assert t["columns"][:4] == ["Recipe", "Model", "Params (M)", "Updates"] and t["columns"][-2:] == ["Wall (min)",
                                                                                                    "CPU-min"]
    (row,) = t["rows"]
    (run,) = doc["data"]["runs"]
    assert row[:2] == ["snn/digits_vgg_ann", "snn_vgg16"] and row[3] == 2 and row[4] == 16
    assert row[5] == run["metrics"]["val/acc"] and row[6] == run["metrics"]["test/acc"] and 0 <= row[6] <= 1
    assert row[7] == round(run["metrics"]["test/loss"] / run["metrics"]["val/loss"], 3) > 0
    assert run["test_ckpt"].endswith("last.ckpt") and Path(run["test_ckpt"]).is_relative_to(tmp_path / "run")
    assert doc["command"].startswith("python benchmarks/recipe_results.py snn/digits_vgg_ann")
    assert doc["machine"]["load_during_run"]["samples"] >= 1 and doc["settings"]["test_ckpt"] == "last"
    fake = {"recipe": "r", "metrics": {"val/acc": 0.5}, "_data": object(), "_trainer": object()}
    with pytest.raises(ValueError, match=r"no metric 'val/top1'.*val/acc"):
        mod.resolve("val/top1", fake)
    with pytest.raises(ValueError, match="has no attribute 'unigram_bpb'"):
        mod.resolve("data.unigram_bpb", fake)


def test_snn_pipeline_results_tables():
    """``zoo snn pipeline/report --results``: the stage and efficiency tables the card renders."""
    from zoo.snn.pipeline import results_tables

    stage = dict(epochs=6, wall_s=60.4)
    res = {"stages": [dict(stage="ann", timesteps=None, test_acc=0.99, epochs=30, wall_s=100.0),
                      dict(stage="snn_t5", timesteps=5, test_acc=0.975, **stage),
                      dict(stage="snn_t1", timesteps=1, test_acc=0.9925, **stage)],
           "efficiency": {"snn_t1": dict(mean_spike_rate=0.1381, snn_acs=585e3, snn_macs=74e3, ann_macs=4.926e6,
                                         energy_ratio=26.19)}}
    t = results_tables(res)
    assert t["stages"]["rows"] == [["ann", "-", 99.0, "", 30, 100], ["snn_t5", 5, 97.5, "-1.50", 6, 60],
                                   ["snn_t1", 1, 99.25, "+0.25", 6, 60]]
    assert t["efficiency"]["rows"] == [["snn_t1", 0.138, 0.585, 0.074, 4.926, "26.19x"]]
    assert "efficiency" not in results_tables({"stages": res["stages"]})
