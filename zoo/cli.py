"""The ``zoo`` command.

``zoo fit|validate|test|predict`` run the Lightning CLI on a recipe; the other subcommands are small tools. Each
subcommand is a ``main(argv)`` function named in ``SUBCOMMANDS`` and imported only when used, so ``zoo --help``
stays fast and a missing optional extra only affects the subcommand that needs it.
"""
from __future__ import annotations

import importlib
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# arguments that make a Lightning subcommand line complete enough to parse (a recipe, a class, or help)
_LIGHTNING_ENTRY_ARGS = {"-c", "--config", "--model", "--data", "-h", "--help", "--print_config"}

# name -> ("module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "recipes": ("zoo.recipes:main", "list the packaged training recipes"),
    "list": ("zoo.tools:list_main", "list registered models (glob pattern, --task, --pretrained)"),
    "info": ("zoo.tools:info_main", "print a model's config, tags and parameter count as JSON"),
    "download": ("zoo.tools:download_main", "prefetch a released checkpoint: zoo download NAME.TAG"),
    "export": ("zoo.tools:export_main", "export a model or checkpoint to ONNX / TorchScript / torch.export"),
    "generate": ("zoo.language.generate_cli:main", "stream text from a language model: zoo generate NAME_OR_DIR --prompt ..."),
    "bench": ("zoo.bench:main", "latency / GMACs / params table, CSV/JSON and a Pareto plot"),
    "lm-search": ("zoo.language.operator_search:main",
                  "aging-evolution search over hybrid LM layer patterns: bits/byte vs decode latency (resumable)"),
    "docsynth": ("zoo.data.docsynth:main", "synthesize document-layout pages (Mesh-candidate BestFit) as a COCO dataset"),
    "snn": ("zoo.snn.pipeline:main", "IIR-SNN: ANN -> SNN T=5 -> 3 -> 1 pipeline and its table (zoo snn pipeline)"),
}


def _usage() -> str:
    lines = ["usage: zoo <command> [options]    (zoo --version)", "", "training (Lightning CLI, see `zoo fit --help`):"]
    lines += [f"  {c:<10} {c} a LightningModule from a recipe: zoo {c} -c RECIPE.yaml" for c in LIGHTNING_SUBCOMMANDS]
    lines += ["", "tools:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _version() -> str:
    try:  # the installed distribution's version; a bare checkout falls back to the package's
        from importlib.metadata import version

        return version("pareto-zoo")
    except Exception:  # noqa: BLE001 - PackageNotFoundError
        from zoo import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:  # `zoo list | head`: the reader left; stop quietly like other Unix tools
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"pareto-zoo {_version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING_SUBCOMMANDS:
        if not any(a.split("=", 1)[0] in _LIGHTNING_ENTRY_ARGS or a.startswith(("--model.", "--data.")) for a in rest):
            print(f"zoo {cmd}: error: no recipe given. Run `zoo {cmd} -c RECIPE [--trainer.max_epochs 5 ...]` "
                  f"(`zoo recipes` lists them); `zoo {cmd} --help` shows every Lightning option (trainer, model, "
                  "data, ckpt_path).", file=sys.stderr)
            return 2
        from zoo.training import RecipeNotFoundError, run_lightning_cli

        try:
            run_lightning_cli([cmd, *rest])
        except RecipeNotFoundError as e:
            print(f"zoo {cmd}: error: {e}", file=sys.stderr)
            return 2
        return 0
    if cmd not in SUBCOMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, [*LIGHTNING_SUBCOMMANDS, *SUBCOMMANDS], n=3)
        print(f"zoo: unknown command {cmd!r}" + (f"; did you mean {', '.join(close)}?" if close else ""), file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    mod, fn = SUBCOMMANDS[cmd][0].split(":")
    if cmd == "generate" and "torch" not in sys.modules:
        import os

        # decoding splits its products over its own thread pool; PyTorch's OpenMP workers, spinning after each
        # parallel op, took the other cores from it (2-thread int8 decode 51 -> 66 tok/s on this project's 2-core VM)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return getattr(importlib.import_module(mod), fn)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
