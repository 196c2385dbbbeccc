"""Start-up time of the ``zoo`` command and of ``import zoo``, against timm's equivalents (issue 10 targets).

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5]

Each case runs in a fresh interpreter (what a user waits for); the median wall time of ``--repeat`` runs is printed,
with the heavy packages the process imported. Targets: ``zoo --help`` and ``zoo recipes`` < 0.5 s, ``zoo list`` and
``zoo info NAME`` < 2 s, ``import zoo`` without Lightning / wandb / transformers (and without torch).
The reference rows are timm's: ``import timm`` and ``timm.list_models()`` (timm imports torch, and wandb when it is
installed, at import).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "timm", "lightning", "wandb", "transformers")
# what each case runs, as Python (so the imported modules can be reported); the CLI cases call zoo.cli.main exactly as
# the `zoo` console script does
CASES = {
    "zoo --help": "from zoo.cli import main; main(['--help'])",
    "zoo recipes": "from zoo.cli import main; main(['recipes'])",
    "zoo list": "from zoo.cli import main; main(['list'])",
    "zoo info nextvit_small": "from zoo.cli import main; main(['info', 'nextvit_small'])",
    "import zoo": "import zoo",
    "zoo.create_model (tiny)": "import zoo; zoo.create_model('nextvit_small', depths=(1, 1, 2, 1), ntb_period=2)",
    "ref: import timm": "import timm",
    "ref: timm.list_models()": "import timm; timm.list_models()",
}
TARGETS = {"zoo --help": 0.5, "zoo recipes": 0.5, "zoo list": 2.0, "zoo info nextvit_small": 2.0}


def run(code: str) -> tuple[float, list[str]]:
    probe = f"{code}\nimport sys\nprint('@@', ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{code!r} failed:\n{r.stderr[-2000:]}")
    loaded = next(line[3:].split(",") for line in r.stderr.splitlines() if line.startswith("@@ "))
    return dt, [m for m in loaded if m]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                    help="run only these cases (default: all)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    print(f"{'case':<26} {'median s':>9} {'min s':>7} {'target':>7}  heavy modules imported")
    rows = []
    for name, code in ((n, CASES[n]) for n in args.cases):
        runs = [run(code) for _ in range(args.repeat)]
        times = [t for t, _ in runs]
        target = TARGETS.get(name)
        ok = "" if target is None else ("ok" if statistics.median(times) < target else "SLOW")
        print(f"{name:<26} {statistics.median(times):>9.2f} {min(times):>7.2f} "
              f"{(f'<{target:g}' if target else ''):>7}  {', '.join(runs[0][1]) or '-'} {ok}")
        rows.append({"case": name, "median_s": statistics.median(times), "min_s": min(times), "target_s": target,
                     "heavy_modules": runs[0][1]})
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"repeat": args.repeat, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
