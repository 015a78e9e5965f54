"""``qzoom recipes``: the ``swift sft`` recipes shipped inside the package (list, print a path, copy).

The recipes live in ``qzoom_swift/recipes/`` as package data, so a pip-installed plugin has them; in the
source tree the top-level ``recipes`` is a symlink to that folder, and ``recipes/<model>/<stage>.yaml`` stays
the documented path. ``qzoom recipes NAME`` prints the absolute path of one recipe, so
``swift sft $(qzoom recipes tiny/stage1_sdrpn.yaml) ...`` works from any directory.

A recipe's ``external_plugins`` value is relative to the repository root (that is where the source tree's
plugin file is). Elsewhere pass ``--external_plugins $(qzoom plugin-path)`` after the recipe; ``--copy``
writes copies whose ``external_plugins`` is this installation's absolute plugin path instead.

Only the standard library is imported here (``qzoom --help`` stays fast).
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SUFFIXES = (".yaml", ".yml", ".json")
PLUGIN_RELPATH = "qzoom_swift/swift_plugin/plugin.py"
_PLUGIN_LINE = re.compile(r"^(external_plugins:\s*)(\S+)(.*)$", re.MULTILINE)

HELP = "list the shipped swift sft recipes, print one's absolute path, or copy them"
DESCRIPTION = (
    "The swift sft recipes (YAML) and DeepSpeed configs shipped with the package: one folder per model "
    "(stage1_sdrpn, stage2_post_sft, stage3_gate), tiny/ (what the tests run on CPU), toy/ (the zoom bench) and "
    "deepspeed/. Without NAME: list them with their one-line summary. With NAME (e.g. tiny/stage1_sdrpn.yaml, "
    "or a folder such as tiny): print its absolute path, so `swift sft $(qzoom recipes NAME) ...` works from any "
    "directory (add `--external_plugins $(qzoom plugin-path)` outside the source tree: the recipe's value is "
    "relative to the repository root). With --copy DIR: copy them (all, or NAME) into DIR, keeping the "
    "folders; the copies' external_plugins is this installation's absolute plugin path, so they run from "
    "anywhere. Files that exist with other content are kept unless --force."
)


def plugin_file() -> Path:
    """The file ``--external_plugins`` needs (the same path ``qzoom plugin-path`` prints)."""
    return Path(__file__).resolve().parent / "swift_plugin" / "plugin.py"


def list_recipes(root: Path = RECIPES_DIR) -> list[str]:
    """Every recipe and config below ``root``, as sorted posix paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix in SUFFIXES)


def resolve(name: str, root: Path = RECIPES_DIR) -> Path:
    """``tiny/stage1_sdrpn.yaml`` (also ``recipes/...``, or without the suffix) or a folder -> absolute path."""
    clean = name.strip().strip("/")
    if clean.startswith("recipes/"):
        clean = clean[len("recipes/"):]
    candidates = [root / clean, *(root / f"{clean}{s}" for s in SUFFIXES)]
    for path in candidates:
        if clean and (path.is_file() or path.is_dir()) and root in (path.resolve(), *path.resolve().parents):
            return path.resolve()
    names = list_recipes(root)
    folders = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    close = difflib.get_close_matches(clean, names + folders, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Folders: {', '.join(folders)}."
    raise FileNotFoundError(f"no recipe {name!r} in {root}.{hint} `qzoom recipes` lists them.")


def summary(path: Path) -> str:
    """The first line of a recipe's header comment (JSON configs have none)."""
    if path.suffix == ".json":
        return "DeepSpeed config: --deepspeed $(qzoom recipes " + path.parent.name + "/" + path.name + ")"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def localise(text: str) -> str:
    """A recipe's text with the repo-relative ``external_plugins`` value replaced by the absolute plugin path."""
    def swap(m: re.Match) -> str:
        if m.group(2) != PLUGIN_RELPATH:
            return m.group(0)
        return f"{m.group(1)}{plugin_file()}   # this installation's plugin (written by qzoom recipes --copy)"

    return _PLUGIN_LINE.sub(swap, text)


def copy_recipes(dest: Path, name: str | None = None, force: bool = False,
                 root: Path = RECIPES_DIR) -> tuple[list[Path], list[Path]]:
    """Copy all recipes (or NAME: one file or folder) into ``dest``; returns (written, kept because they differ)."""
    base = root.resolve()
    if dest.resolve() == base or base in dest.resolve().parents:
        raise FileNotFoundError(f"{dest} is the shipped recipes folder itself; copy them somewhere else")
    source = resolve(name, base) if name else base
    files = [source] if source.is_file() else [base / n for n in list_recipes(base) if (base / n).is_relative_to(source)]
    written, kept = [], []
    for path in files:
        target = dest / path.relative_to(base)
        text = path.read_text(encoding="utf-8")
        new = localise(text) if path.suffix in (".yaml", ".yml") else text
        if target.exists() and target.read_text(encoding="utf-8") != new and not force:
            kept.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(new, encoding="utf-8")
        shutil.copymode(path, target)
        written.append(target)
    return written, kept


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a recipe (e.g. tiny/stage1_sdrpn.yaml, qwen2_5_vl_7b/stage3_gate) or a folder (tiny)")
    p.add_argument("--copy", type=Path, metavar="DIR", default=None,
                   help="copy the recipes (all, or NAME) into DIR, keeping the folder layout")
    p.add_argument("--force", action="store_true", help="with --copy: overwrite files whose content differs")


def _print_list() -> int:
    names = list_recipes()
    width = max(len(n) for n in names) + 2
    for name in names:
        print(f"{name:<{width}}{summary(RECIPES_DIR / name)}".rstrip())
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.copy is not None:
            written, kept = copy_recipes(args.copy, args.name, force=args.force)
            print(f"copied {len(written)} file(s) to {args.copy.resolve()}")
            for path in kept:
                print(f"qzoom recipes: kept {path} (differs from the shipped recipe; --force overwrites)",
                      file=sys.stderr)
            return 0
        if args.name is None:
            return _print_list()
        path = resolve(args.name)
    except FileNotFoundError as exc:
        print(f"qzoom recipes: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    if path.is_file() and PLUGIN_RELPATH in path.read_text(encoding="utf-8") and not Path(PLUGIN_RELPATH).is_file():
        print("qzoom recipes: note: outside the source tree, add `--external_plugins $(qzoom plugin-path)` after "
              "the recipe (its external_plugins is relative to the repository root)", file=sys.stderr)
    return 0
