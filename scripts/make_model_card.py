"""Generate the per-model table at the top of MODEL_CARD.md from the registry and the latency bench.

One row per registered model (``zoo.list_models()``): family, task, parameters of the training and deploy forms,
GMACs at the default input, the published metric, the checkpoint tags, license, and measured CPU latency (eager,
deploy, onnxruntime) for the models that match ``--latency-models``. Parameters and GMACs are counted on the
``meta`` device (no weights are allocated), so every row costs well under a second except the latency runs.

Everything below the line ``<!-- generated table ends -->`` in MODEL_CARD.md is hand-written (one section per
family) and kept as is.

Latency cells come from ``benchmarks/results/model_card_latency.json`` (command, date, machine, versions and the
rows), written whenever latency is measured; nothing is timed unless ``--latency-models`` asks for it.

    python scripts/make_model_card.py                                  # regenerate the table (latency from the file)
    python scripts/make_model_card.py --latency-models 'nextvit_*'     # time these now (minutes), update the file
    python scripts/make_model_card.py --check                          # exit 1 if the card's rows are out of date
    python scripts/make_model_card.py --check --models 'snn_*'         # check only some rows (fast)
    python scripts/make_model_card.py --latency-json bench.json        # latency from an earlier `zoo bench --json`
    python scripts/make_model_card.py --results-only                   # only the tables from benchmarks/results/
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo import bench  # noqa: E402
from zoo.registry import resolve_cfg  # noqa: E402

MARKER = "<!-- generated table ends -->"
LATENCY_RUNTIMES = ("eager", "deploy", "onnxruntime")
# The latency cells come from this committed file, written when latency is measured (``--latency-models``): the
# figures keep the command, date, machine and versions that produced them, and ``--check`` stays deterministic.
LATENCY_RESULTS = ROOT / "benchmarks" / "results" / "model_card_latency.json"
# Measured tables in the hand-written sections are generated too. The card holds
#     <!-- results FILE.json TABLE -->
#     ... (generated: the table, then a line naming its source) ...
#     <!-- end results -->
# and the lines between the markers are rendered from table TABLE of benchmarks/results/FILE.json, written by the
# script that measured it (``zoo.bench.write_results``: command, date, machine, versions, "tables"). Figures from runs
# made before results files existed carry "provenance": "transcribed" and say where they were first recorded.
# To add a table: commit its results file, put the two marker lines in the card, run `make model-card`.
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_BLOCK = re.compile(r"^<!-- results (\S+) (\S+) -->\n(.*?)^<!-- end results -->$", re.S | re.M)


def _meta_stats(name: str) -> dict:
    """Params (train / deploy) and GMACs at the default input, counted on the meta device."""
    from zoo.deploy import reparameterize

    _, _, cfg = resolve_cfg(name)
    out = {"params": None, "deploy_params": None, "gmacs": None, "gmacs_at": "", "notes": []}
    with torch.device("meta"):
        model = zoo.create_model(name).eval()
    out["params"] = bench.count_params(model)
    if len(cfg.input_size) == 3:  # an image model
        x = torch.empty(1, *cfg.input_size, device="meta")
        out["gmacs_at"] = "x".join(map(str, cfg.input_size[1:]))
    else:  # a language model: MACs of one token
        x = torch.zeros(1, 1, dtype=torch.long, device="meta")
        out["gmacs_at"] = "1 token"
    try:
        out["gmacs"] = bench.count_gmacs(model, x)
    except Exception as e:  # noqa: BLE001 - e.g. data-dependent post-processing cannot run on meta
        out["notes"].append(f"GMACs not counted ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    if bench.has_deploy_form(model):
        try:
            with torch.device("meta"):
                out["deploy_params"] = bench.count_params(reparameterize(model, inplace=True))
        except Exception:  # noqa: BLE001 - some folds read values; do it for real on CPU if the model is small
            if out["params"] < 100e6:
                out["deploy_params"] = bench.count_params(reparameterize(zoo.create_model(name), inplace=True))
            else:
                out["notes"].append("deploy params not counted (reparameterization needs real weights)")
    return out


def _fmt_metric(metrics: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in metrics.items()) if metrics else "-"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def collect_latency(names, args) -> dict[tuple[str, str], dict]:
    lat: dict[tuple[str, str], dict] = {}
    if args.latency_json:
        doc = json.loads(Path(args.latency_json).read_text())
        for r in doc.get("results", doc if isinstance(doc, list) else []):
            if r.get("median_ms") is not None and not r.get("error"):
                lat[(r["model"], r["runtime"])] = r
    patterns = [p for p in (args.latency_models or "").split(",") if p]
    todo = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)
            and len(resolve_cfg(n)[2].input_size) == 3 and resolve_cfg(n)[2].task != "object-detection"]
    for name in todo:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows = bench.bench_models([name], runtimes=LATENCY_RUNTIMES, batch_size=1, threads=args.threads,
                                  warmup=args.warmup, iters=args.iters, progress=True, skip_errors=True)
        for r in rows:
            if not r["error"]:
                lat[(name, r["runtime"])] = r
    if todo:
        write_latency_results(lat, args)
    return lat


def write_latency_results(lat: dict[tuple[str, str], dict], args) -> Path:
    """The measured rows (and those kept from the earlier file) with how they were produced."""
    import platform

    path = Path(args.latency_results)
    doc = {
        "command": "python scripts/make_model_card.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**bench.environment(), "node": platform.node(), "load_average": list(os.getloadavg())},
        "settings": {"threads": args.threads, "warmup": args.warmup, "iters": args.iters, "batch_size": 1,
                     "runtimes": list(LATENCY_RUNTIMES)},
        "results": sorted(lat.values(), key=lambda r: (r["model"], LATENCY_RUNTIMES.index(r["runtime"]))),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)  # no half-written results file
    print(f"wrote {path}", file=sys.stderr)
    return path


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def render_results_table(file: str, table: str) -> str:
    """The markdown of table ``table`` of ``benchmarks/results/<file>`` and a line naming its source."""
    path = RESULTS_DIR / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file named in MODEL_CARD.md does not exist")
    doc = json.loads(path.read_text())
    t = (doc.get("tables") or {}).get(table)
    if t is None:
        raise KeyError(f"{path}: no table {table!r} (has {sorted(doc.get('tables') or {})})")
    lines = ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
    m = doc.get("machine") or {}
    transcribed = doc.get("provenance") == "transcribed"
    how = f"`{doc.get('command', '?')}`, {str(doc.get('date', '?'))[:10]}"
    how += "".join(f", {k} {m[k]}" for k in ("torch", "timm") if m.get(k))
    if m.get("cpu_count"):
        how += f", {m['cpu_count']} CPUs"
    la, run_load = m.get("load_average"), m.get("load_during_run")
    if run_load:  # sampled while the figures were measured (zoo.bench.LoadSampler)
        how += f", load average {run_load['mean']:.1f} during the run ({run_load['min']:g}-{run_load['max']:g})"
    elif la:  # a measured file records the 1-minute load at the end; a transcribed one the range the card quoted
        how += f", load average {'-'.join(f'{x:g}' for x in la) if transcribed else format(la[0], '.1f')}"
    if transcribed:
        how += f"; transcribed: {doc.get('transcribed_from', 'an earlier single run, origin not recorded')}"
    # every results table is a single measurement: say so, and whether it was re-run or copied from an older card
    what = "Copied from an earlier single run (not re-run; not asserted by a test)" if transcribed else \
        "Measured once (not asserted by a test)"
    lines += ["", f"<sub>{what}. Source: `benchmarks/results/{file}` ({how}).</sub>"]
    return "\n".join(lines) + "\n"


def fill_results_blocks(text: str) -> str:
    """``text`` with every results block regenerated from its results file."""
    return RESULTS_BLOCK.sub(lambda m: f"<!-- results {m[1]} {m[2]} -->\n{render_results_table(m[1], m[2])}"
                                       f"<!-- end results -->", text)


def check_results_blocks(text: str) -> list[str]:
    problems = []
    for m in RESULTS_BLOCK.finditer(text):
        try:
            want = render_results_table(m[1], m[2])
        except (OSError, KeyError, ValueError) as e:
            problems.append(f"results block {m[1]} {m[2]}: {e}")
            continue
        if m[3] != want:
            problems.append(f"results block {m[1]} {m[2]}: the card's table differs from benchmarks/results/{m[1]}")
    return problems


def table_row(name: str, lat: dict[tuple[str, str], dict]) -> tuple[str, list[str]]:
    """One model's row of the generated table, and its notes."""
    entry, tag, cfg = resolve_cfg(name)
    try:
        s = _meta_stats(name)
    except Exception as e:  # noqa: BLE001 - one broken model must not hide the others
        traceback.print_exc()
        s = {"params": None, "deploy_params": None, "gmacs": None, "gmacs_at": "",
             "notes": [f"could not be built on meta ({type(e).__name__})"]}
    params = f"{_fmt(s['params'] and s['params'] / 1e6, '.2f')} / {_fmt(s['deploy_params'] and s['deploy_params'] / 1e6, '.2f')}"
    gmacs = f"{_fmt(s['gmacs'], '.3f')} @ {s['gmacs_at']}" if s["gmacs"] is not None else "-"
    tags = ", ".join(t for t, c in entry.tags.items() if c.has_weights) or "(none)"
    ms = " / ".join(_fmt(lat.get((name, rt), {}).get("median_ms"), ".1f") for rt in LATENCY_RUNTIMES)
    row = (f"| `{name}` | {cfg.family} | {cfg.task} | {params} | {gmacs} | {_fmt_metric(cfg.metrics)} | {tags} | "
           f"{cfg.license or '-'} | {ms} |")
    return row, [f"`{name}`: {n}" for n in s["notes"]]


def check_card(card: str, args) -> list[str]:
    """Differences between the card's generated rows and the registry (+ the latency results file).

    ``--models`` restricts the check to matching models (a quick check of a few rows); without it every registered
    model must have exactly its row, and the card no row of an unregistered model."""
    generated = card.split(MARKER, 1)[0] if MARKER in card else card
    rows = {}
    for line in generated.splitlines():
        if line.startswith("| `"):
            rows[line.split("`", 2)[1]] = line
    names = zoo.list_models()
    patterns = [p for p in (args.models or "").split(",") if p]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not names:
            return [f"--models {args.models!r} matches no registered model"]
    lat = collect_latency([], args)
    problems = []
    for name in names:
        want, _ = table_row(name, lat)
        have = rows.get(name)
        if have is None:
            problems.append(f"`{name}`: registered but has no row in the card")
        elif have != want:
            problems.append(f"`{name}`: the card says\n    {have}\n  the registry gives\n    {want}")
    if not patterns:
        problems += [f"`{n}`: row in the card but not registered" for n in rows if n not in set(names)]
    problems += check_results_blocks(card)
    return problems


def build_table(args) -> str:
    names = zoo.list_models()
    lat = collect_latency(names, args)
    lines = [
        "# Model card",
        "",
        f"Generated by `scripts/make_model_card.py` on {datetime.date.today().isoformat()} from the registry "
        f"(`zoo.list_models()`) and `zoo.bench`; do not edit this table by hand (`make model-card`).",
        "",
        "- **Params**: training form / deploy form (after `zoo.deploy.reparameterize`; `-` where the family has no "
        "deploy form). Counted on the `meta` device.",
        "- **GMACs**: one image at the default input (`torch.utils.flop_counter`, MACs = FLOPs / 2, attention matmuls "
        "included); language models: one token.",
        "- **Published**: the metric the paper / release reports for the default tag (`ModelCfg.metrics`).",
        "- **CPU latency**: median ms, batch 1 at the default input, eager / deploy / onnxruntime, measured once "
        "(not asserted) and read from `benchmarks/results/model_card_latency.json`, which records the command, date, "
        "machine, load average, versions, threads and iterations of the run (`--latency-models` re-measures). "
        "`-`: not measured.",
        "",
        "| Model | Family | Task | Params (M) train / deploy | GMACs @ input | Published | Tags with weights | "
        "License | CPU ms eager / deploy / ORT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name in names:
        row, row_notes = table_row(name, lat)
        notes += row_notes
        lines.append(row)
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "MODEL_CARD.md"))
    p.add_argument("--latency-models", default="",
                   help="comma-separated globs of models to time now (e.g. 'nextvit_*'; default none: the figures of "
                        "--latency-json); measured rows are written to --latency-results")
    p.add_argument("--latency-json", default=str(LATENCY_RESULTS) if LATENCY_RESULTS.exists() else None,
                   help="take latency from this file (default: the committed benchmarks/results/"
                        "model_card_latency.json) or an earlier `zoo bench --json` file")
    p.add_argument("--latency-results", default=str(LATENCY_RESULTS), help="where measured latency rows are written")
    p.add_argument("--models", default="", help="with --check: only check these comma-separated globs")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: stable on a shared machine; 2-thread eager runs degrade badly under load)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 (listing the differences) if the card's table disagrees with the "
                        "registry and the latency results, 0 if it agrees")
    p.add_argument("--print", action="store_true", help="print the table instead of writing the file")
    p.add_argument("--results-only", action="store_true",
                   help="only regenerate the measured tables from benchmarks/results/*.json (seconds; builds no model)")
    args = p.parse_args(argv)

    if args.check:
        out = Path(args.output)
        problems = check_card(out.read_text() if out.exists() else "", args)
        for msg in problems:
            print(msg, file=sys.stderr)
        if problems:
            print(f"{out}: {len(problems)} row(s) out of date; regenerate with `make model-card`", file=sys.stderr)
            return 1
        print(f"{out}: generated table up to date")
        return 0
    if args.results_only:
        out = Path(args.output)
        out.write_text(fill_results_blocks(out.read_text()))
        print(f"wrote the results tables of {out}")
        return 0
    table = build_table(args)
    if args.print:
        print(table)
        return 0
    out = Path(args.output)
    old = out.read_text() if out.exists() else ""
    if MARKER in old:
        rest = old.split(MARKER, 1)[1]
    else:  # first run: whatever was there becomes the hand-written part
        rest = "\n\n" + old if old.strip() else "\n"
    out.write_text(table + "\n" + MARKER + fill_results_blocks(rest))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
