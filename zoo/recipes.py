"""Packaged training recipes: ``zoo recipes`` lists them; ``-c NAME`` resolves a bare name to the packaged file."""
from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path


def recipes_root() -> Path:
    return Path(str(files("zoo") / "_recipes"))


def list_recipes() -> list[str]:
    root = recipes_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    """A path that exists is returned as is; else ``NAME`` / ``NAME.yaml`` under the packaged recipes."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (recipes_root() / name, recipes_root() / f"{name}.yaml"):
        if cand.is_file():
            return cand
    import difflib

    close = difflib.get_close_matches(name.removesuffix(".yaml"), list_recipes(), n=3)
    raise FileNotFoundError(
        f"recipe {name!r} is neither a file nor a packaged recipe"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + " (`zoo recipes` lists them)"
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="zoo recipes", description="List the packaged training recipes.")
    ap.add_argument("--path", action="store_true", help="print the file paths too")
    args = ap.parse_args(argv)
    for name in list_recipes():
        print(f"{name:<32} {recipes_root() / (name + '.yaml')}" if args.path else name)
    return 0
