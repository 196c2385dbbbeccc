"""`zoo lm-search`: a tiny aging-evolution run end to end, resume after a kill, and bad input."""
from __future__ import annotations

import json

import pytest

from zoo.language import operator_search as search

TINY = dict(budget=40_000, tolerance=0.3, operators=("conv", "full_attention"), min_layers=1, max_layers=3,
            width_multiple=16, population=2, sample=2, candidates=3, steps=3, batch_size=2, seq_len=16,
            val_tokens=64, decode_context=8, decode_steps=2, seed=3)
TIMING = {"decode_ms", "train_seconds"}  # measured, so they differ between runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A few local files in place of the stdlib (same split and byte tokenizer, milliseconds to read)."""
    d = data_files_dir(tmp_path_factory.mktemp("corpus"))
    return search.CorpusData.from_text(seq_len=16, val_tokens=64, files=[str(d / "*.py")])


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("search_full")
    history = search.run_search(search.SearchSettings(**TINY), out, data=data, log=None)
    return out, history


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def test_tiny_search_writes_history_and_pareto_plot(full_run):
    out, history = full_run
    assert [r["index"] for r in history] == [0, 1, 2]
    assert history[0]["parent"] is None and history[1]["parent"] is None  # the random initial population
    assert history[2]["parent"] in (0, 1) and history[2]["mutation"] != "random"
    for r in history:
        assert abs(r["params"] - TINY["budget"]) <= TINY["tolerance"] * TINY["budget"]
        assert set(r["pattern"]) - {"ffn"} <= {"conv", "full_attention"}
        assert 0 < r["bpb"] < 10 and r["decode_ms"] > 0
    assert search.load_history(out) == history
    assert json.loads((out / "search.json").read_text())["operators"] == ["conv", "full_attention"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["history.jsonl", "pareto.png", "search.json"]


def test_resume_after_kill_gives_the_uninterrupted_history(data, full_run, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_first(rec):
        raise Killed

    with pytest.raises(Killed):
        search.run_search(search.SearchSettings(**TINY), tmp_path, data=data, log=None, on_record=kill_after_first)
    with open(tmp_path / "history.jsonl", "a") as f:  # the kill also cut the next line mid-write
        f.write('{"index": 1, "key": "co')
    resumed = search.run_search(search.SearchSettings(**TINY), tmp_path, data=data, log=None)
    assert _strip(resumed) == _strip(full_run[1])
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 3
    # a finished search re-run does nothing new; one with other settings is refused, naming them
    assert _strip(search.run_search(search.SearchSettings(**TINY), tmp_path, data=data, log=None)) == _strip(resumed)
    with pytest.raises(ValueError, match="steps: 3 there vs 4 now"):
        search.run_search(search.SearchSettings(**{**TINY, "steps": 4}), tmp_path, data=data, log=None)


def test_bad_input_errors(tmp_path, capsys):
    from zoo.cli import main

    with pytest.raises(ValueError, match=r"unknown operator\(s\) \['lstm'\]"):
        search.SearchSettings(**{**TINY, "operators": ("conv", "lstm")}).resolved()
    with pytest.raises(search.BudgetError, match="parameter budget 1,000 is impossible"):
        search.run_search(search.SearchSettings(**{**TINY, "budget": 1000}), tmp_path / "x", log=None)
    assert not (tmp_path / "x").exists()  # nothing written for a search that cannot start
    with pytest.raises(ValueError, match="sample=5 cannot exceed population=2"):
        search.SearchSettings(**{**TINY, "sample": 5})
    assert main(["lm-search", "--output", str(tmp_path / "y"), "--operators", "conv,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown operator(s) ['bogus']" in err and "register_operator" in err
    with pytest.raises(ValueError, match="'ffn' must follow a mixer"):
        search.Candidate.from_pattern(["ffn", "conv"])


def test_operator_study_benchmark_smoke(tmp_path):
    """benchmarks/bench_operator_study.py end to end at tiny sizes (figures meaningless; the accounting is not)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_operator_study.py"
    spec = importlib.util.spec_from_file_location("bench_operator_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = str(Path(data_files_dir(tmp_path)) / "*.py")
    out = tmp_path / "study.json"
    assert mod.main(["--tiny", "--arms", "lfm2,nemotron_flash", "--contexts", "8,24", "--decode-steps", "2",
                     "--repeats", "1", "--files", files, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python benchmarks/bench_operator_study.py") and doc["machine"]["torch"]
    raw = doc["tables"]["raw"]
    rows = {r[0]: dict(zip(raw["columns"], r)) for r in raw["rows"]}
    # KV bytes per token = attention layers x (k, v) x kv heads (1) x head dim (32) x 4 bytes; recurrent state fixed
    assert rows["lfm2"]["cache_bytes_per_token"] == 2 * 2 * 32 * 4
    assert rows["nemotron_flash"]["cache_bytes_per_token"] == 1 * 2 * 32 * 4
    assert rows["nemotron_flash"]["cache_bytes_fixed"] > rows["lfm2"]["cache_bytes_fixed"] > 0
    for r in rows.values():
        assert abs(r["params"] - 5e5) < 0.05 * 5e5 and r["bpb"] > 0 and r["decode_tok_s@24"] > 0
    assert [row[0] for row in doc["tables"]["study"]["rows"]] == [mod.ARMS["lfm2"][0], mod.ARMS["nemotron_flash"][0]]


def data_files_dir(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    for i in range(6):
        (d / f"mod{i}.py").write_text(f"def f{i}(x, y):\n    return (x * {i} + y) % 7\n\n" * 30)
    return d
