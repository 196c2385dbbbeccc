"""Every command shown in README.md, data/README.md and the recipe headers runs as shown.

The commands are extracted from the documents themselves (```bash blocks; in recipe headers, indented `#   zoo ...`
lines and `zoo ...` in backticks), so a command added to the docs is tested without touching this file. Each one is
run through the real `zoo` entry point, in-process, from a scratch working directory:

- the quickstart flow (fit, test, predict, export of its output) and training on an image folder run for real with
  tiny settings appended (one epoch of 2 updates, 1 validation batch);
- other recipe runs get ``--print_config`` (their data is not here, or a full run takes minutes; every recipe also
  trains two batches on stand-in data in tests/test_recipes.py);
- `zoo download` runs offline and must fail at once with its clear message; long tools (`zoo snn pipeline`,
  `zoo generate` of a hub model, `zoo bench` and `zoo export` of full-size registered models: minutes of CPU; their
  own tests run them on small overrides) get `--help`, and launchers (`torchrun`, `srun`) are checked through the
  inner command;
- `make TARGET` and `pip install ".[extras]"` are checked against the Makefile and pyproject.toml.

A command that matches none of these rules fails the test: decide how it is checked when you add it.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "data" / "README.md"]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
PROGRAMS = ("zoo", "python", "make", "pip", "torchrun", "srun", "git", "mkdir", "cd", "tar", "for")
# Shell steps that prepare something outside the project (a clone, a downloaded dataset): shown, not run.
NOT_RUN = ("git", "mkdir", "cd", "tar", "for")

# one short epoch (2 updates) that ends with a validation, so `--ckpt_path best` has a best checkpoint to find
TINY_FIT = ["--trainer.limit_train_batches=2", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--data.init_args.num_workers=0"]
TINY_EVAL = ["--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1",
             "--trainer.enable_progress_bar=false", "--data.init_args.num_workers=0"]
RUN_FOR_REAL = {"quickstart"}  # recipes whose README flow runs end to end (tiny); others get --print_config


# ---------------------------------------------------------------------------------------------- extraction


def _markdown_commands(path: Path) -> list[str]:
    cmds, block, lines = [], None, path.read_text().splitlines()
    for line in lines:
        if line.strip().startswith("```"):
            block = line.strip()[3:] if block is None else None
            continue
        if block == "bash":
            cmds.append(line)
    return _join(cmds)


def _join(lines: list[str]) -> list[str]:
    """Join backslash continuations, drop comments and blank lines, split `a && b`."""
    out, cur = [], ""
    for line in lines:
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmd = _strip_comment(cur)
        if cmd.split(" ", 1)[0] in NOT_RUN:  # a shell loop / setup line stays whole
            out.append(cmd)
        else:
            out += [part for part in (p.strip() for p in re.split(r"\s&&\s", cmd)) if part]
        cur = ""
    return out


def _strip_comment(cmd: str) -> str:
    """Drop a trailing `# comment` (outside quotes); keep the words' quoting."""
    lex = shlex.shlex(cmd, posix=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        words = list(lex)
    except ValueError:
        return cmd
    return shlex.join(words).replace("'&&'", "&&")


_CMD = r"(?:zoo|srun|torchrun|python -m zoo\.cli|python -c)"


def _recipe_commands(path: Path) -> list[str]:
    """Indented `#   zoo ...` lines (cut at a run of 3+ spaces: what follows is an annotation) and `zoo ...` in
    backticks, except abbreviations with `...` in running text."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break  # the header is the leading comment block
        body = line[1:]
        for m in re.finditer(rf"`({_CMD} [^`]+)`", body):
            if " ... " not in m.group(1):
                lines.append(m.group(1))
        m = re.match(rf"\s{{2,}}({_CMD} .*)$", body)
        if m:
            lines.append(re.split(r"\s{3,}", m.group(1).rstrip())[0])
        elif lines and lines[-1].endswith("\\"):  # continuation of the previous command line
            lines.append(re.split(r"\s{3,}", body.strip())[0])
    return _join(lines)


def all_commands() -> list[tuple[str, str]]:
    found = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS for c in _markdown_commands(p)]
    found += [(p.relative_to(ROOT).as_posix(), c) for p in RECIPES for c in _recipe_commands(p)]
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------- planning


def _words(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # OMP_NUM_THREADS=1 zoo ...
        words = words[1:]
    if words and words[0].endswith("/zoo"):  # .venv/bin/zoo
        words[0] = "zoo"
    if words[:3] == ["python", "-m", "zoo.cli"]:
        words = ["zoo", *words[3:]]
    if words and words[0].endswith("/pip"):
        words[0] = "pip"
    return words


def _inner_zoo(words: list[str]) -> list[str] | None:
    """`torchrun ... -m zoo.cli fit ...` / `srun zoo fit ...` -> ['zoo', 'fit', ...]."""
    if "zoo.cli" in words:
        return ["zoo", *words[words.index("zoo.cli") + 1:]]
    if "zoo" in words:
        return words[words.index("zoo"):]
    return None


def _recipe_of(words: list[str]) -> str | None:
    return words[words.index("-c") + 1] if "-c" in words else None


def plan(cmd: str) -> tuple[str, list[str]]:
    """(how, argv): how is 'run', 'print_config', 'help', 'offline', 'make', 'pip', 'not_run'."""
    words = _words(cmd)
    prog = words[0] if words else ""
    if prog in NOT_RUN or words[:3] == ["python", "-m", "venv"]:
        return "not_run", words
    if prog == "make":
        return "make", words
    if prog == "pip":
        return "pip", words
    if prog in ("torchrun", "srun"):
        inner = _inner_zoo(words)
        assert inner, f"no zoo command inside {cmd!r}"
        return "print_config", inner[1:]
    if words[:2] == ["python", "-c"]:
        return "python_c", words[2:]
    if prog == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
        return "script_help", words[1:]
    if prog == "python" and len(words) > 1 and words[1].startswith("scripts/"):
        return "script_help", words[1:]
    if prog != "zoo":
        raise AssertionError(f"no rule for {cmd!r}: decide how tests/test_readme_commands.py checks it")
    args = words[1:]
    sub = args[0] if args else ""
    if sub in ("fit", "validate", "test", "predict"):
        if "--print_config" in args or _recipe_of(args) not in RUN_FOR_REAL:
            return "print_config", args
        return "run", args
    if sub == "download":
        return "offline", args
    if sub == "snn" and args[1:2] == ["pipeline"]:
        return "help", args
    if sub == "snn" and args[1:2] == ["report"]:
        return "after_pipeline", args
    if sub == "generate":
        return "help", args
    if sub == "bench" or (sub == "export" and not _is_file_arg(args[1:2])):
        # minutes of ONNX export / timing of full-size models: tests/test_bench.py and tests/test_cli_tools.py run
        # these on small overrides; here the shown options go to the parser, followed by --help
        return "help_parse", args
    return "run", args


def _is_file_arg(args: list[str]) -> bool:
    return bool(args) and ("/" in args[0] or args[0].endswith((".safetensors", ".ckpt", ".pth", ".pt")))


# ---------------------------------------------------------------------------------------------- running


def _zoo(args: list[str]) -> tuple[int, str, str]:
    """Run `zoo ARGS` in-process; (exit code, stdout, stderr)."""
    from zoo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc or 0, out.getvalue(), err.getvalue()


def _tiny(args: list[str]) -> list[str]:
    sub = args[0]
    if sub == "fit":
        return [*args, *TINY_FIT]
    if sub in ("test", "predict", "validate"):
        return [*args, *TINY_EVAL]
    return args


def _stage(cmd: str) -> int:
    """Documents show training after export and inference; run them in the order a user would: data and training
    first, then resumes, then evaluation / prediction, then the tools that read a training output."""
    words = _words(cmd)
    if words[:2] == ["python", "-c"]:
        return 0
    if words[:2] == ["zoo", "fit"]:
        return 2 if "--ckpt_path" in words else 1
    if words[:2] in (["zoo", "test"], ["zoo", "validate"], ["zoo", "predict"]):
        return 3
    return 4


def _own_data(root: Path) -> None:
    """The folder layout the README shows for training on your own images (tiny and random)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 36), ("val", 4)):  # 72 training images: one full batch of the recipe's 64
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


def test_docs_show_commands_and_each_has_a_rule():
    cmds = all_commands()
    sources = {s for s, _ in cmds}
    assert "README.md" in sources and "data/README.md" in sources and any(s.startswith("recipes/") for s in sources)
    assert any(c.startswith("zoo fit -c quickstart") for _, c in cmds)
    # the README's export of a training output is where a deploy.safetensors export is checked for its size
    assert any(c.startswith("zoo export ") and _is_file_arg(_words(c)[2:3]) for _, c in cmds)
    for _, c in cmds:
        plan(c)  # raises for a command without a rule


def test_readme_commands_run_as_shown(tmp_path, monkeypatch):
    """Every command, in the order a user runs them (training before the test / predict / export of its output)."""
    import torch

    torch.set_num_threads(1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo_home"))
    _own_data(work / "data" / "pets")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    make_targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    failures = []
    seen = set()
    for source, cmd in sorted(all_commands(), key=lambda sc: _stage(sc[1])):
        if cmd in seen:  # shown in several places, run once
            continue
        seen.add(cmd)
        how, argv = plan(cmd)
        t0 = time.perf_counter()
        _run_one(source, cmd, how, argv, failures, extras, make_targets, monkeypatch)
        print(f"{time.perf_counter() - t0:6.1f} s  {how:<14} {cmd}")  # shown when the test fails
    assert not failures, "\n\n".join(failures)


def _run_one(source, cmd, how, argv, failures, extras, make_targets, monkeypatch) -> None:
    """Run or check one command as `plan` says; append a readable failure."""
    if how == "python_c":  # e.g. writing sample images for `zoo predict`
        try:
            exec(compile(argv[0], f"<{source}>", "exec"), {"__name__": "__main__"})
        except Exception as e:  # noqa: BLE001
            failures.append(f"{source}: {cmd}: {type(e).__name__}: {e}")
        return
    if how == "not_run":
        return
    if how == "make":
        if not set(argv[1:]) <= make_targets:
            failures.append(f"{source}: {cmd}: no such Makefile target")
        return
    if how == "pip":
        wanted = set(re.findall(r"\[([\w,]+)\]", cmd)[0].split(",")) if "[" in cmd else set()
        if not wanted <= extras:
            failures.append(f"{source}: {cmd}: extras {wanted - extras} not in pyproject.toml")
        return
    if how == "script_help":
        import runpy

        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
            monkeypatch.setattr(sys, "argv", [argv[0], "--help"])
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
        if e.value.code not in (0, None):
            failures.append(f"{source}: {cmd}: --help exited {e.value.code}")
        return
    if how == "print_config":
        args = [*argv, "--print_config"] if "--print_config" not in argv else argv
    elif how == "help":
        args = [argv[0], *(["pipeline"] if argv[0] == "snn" else []), "--help"]
    elif how == "help_parse":
        args = [*argv, "--help"]
    elif how == "after_pipeline":  # no finished pipeline here: the report must say so clearly
        rc, out, err = _zoo(argv)
        if rc != 2 or "zoo snn pipeline" not in err:
            failures.append(f"{source}: {cmd}: rc {rc}: {err[-400:]}")
        return
    elif how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        rc, out, err = _zoo(argv)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        if rc != 1 or "place it at" not in err or "Traceback" in err:
            failures.append(f"{source}: {cmd}: offline download did not give the clear error: {err[-400:]}")
        return
    else:
        args = _tiny(argv)
    rc, out, err = _zoo(args)
    if rc != 0:
        failures.append(f"{source}: {cmd}\n  ran: zoo {shlex.join(args)}\n  rc {rc}: {(err or out)[-1500:]}")
    elif args[0] == "export" and _is_file_arg(args[1:2]):
        _check_exported_training_output(source, cmd, args, failures)


def _check_exported_training_output(source, cmd, args, failures) -> None:
    """`zoo export <training output> -o X`: X takes the input size the run trained at, recorded in the file (the
    quickstart trains at 32 px, its architecture's default is 224). tests/test_training.py checks the same for a
    last.ckpt; this covers the deploy.safetensors the README exports."""
    import onnx

    from zoo.deploy import load_trained_model

    out = Path(args[args.index("-o") + 1])
    trained = list(load_trained_model(args[1]).pretrained_cfg["input_size"])
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[1:]]
    if dims != trained:
        failures.append(f"{source}: {cmd}: exported at {dims}, trained at {trained}")


def test_license_and_citation():
    from zoo.papers import PAPERS
    from zoo.registry import resolve_cfg

    import zoo

    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cff = (ROOT / "CITATION.cff").read_text()
    import yaml

    doc = yaml.safe_load(cff)
    assert doc["cff-version"] == "1.2.0" and doc["license"] == "Apache-2.0"
    assert doc["version"] == pyproject["project"]["version"] == zoo.__version__
    cited = {r["identifiers"][0]["value"].removeprefix("arXiv:") for r in doc["references"]}
    used = {c.paper for n in zoo.list_models() for c in resolve_cfg(n)[0].tags.values()}
    assert used <= set(PAPERS) and used <= cited, used - cited


def test_readme_model_table_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_readme_table
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = make_readme_table.main(["--check"])
    assert rc == 0, "README.md's model table is stale; run `python scripts/make_readme_table.py`:\n" + out.getvalue()


def test_randaugment_posterize_at_top_magnitude():
    """The image-folder training path uses timm's `rand-m9-mstd0.5-inc1`; its increasing Posterize keeps 0 bits when
    the sampled magnitude clips at 10, which Pillow >= 13 rejects (found by the own-data README command)."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    from zoo.data.images import _posterize_zero_bits_compat

    _posterize_zero_bits_compat()
    ra = rand_augment_transform("rand-n1-m10-mstd0-inc1", {})
    ops = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    assert ops
    ops[0].prob = 1.0
    img = Image.new("RGB", (8, 8), (200, 120, 40))
    out = ops[0](img)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
