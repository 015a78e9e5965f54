"""Installing the plugin into an existing ms-swift environment: packaging, bounds, `qzoom recipes`, the wheel.

The slow tests build an sdist and a wheel from a copy of the source tree and install the wheel into the locked
environment in two ways: a pip dry run in the locked `.venv` itself (what would change), and a real install
into a fresh venv that sees the locked packages through a `.pth` file, from where `qzoom` and a tiny
`swift sft` run in a directory outside the repository with PYTHONPATH unset.

(A venv made with `--system-site-packages` from `.venv/bin/python` would not see the locked packages: its
"system" site-packages are those of the interpreter `.venv` was made from, not `.venv`'s own.)
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS
from qzoom_swift.cli import main
from qzoom_swift.recipes_command import RECIPES_DIR, list_recipes

REPO = Path(__file__).resolve().parents[1]
SETUP_CFG = REPO / "setup.cfg"
# What an sdist is built from: the package, its metadata and the files setup.cfg / MANIFEST.in name.
SOURCE_FILES = ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "requirements.in", "requirements-lock.txt")
EXTRAS = ("swift", "onnx", "eval", "deepspeed")
"""The extras the locked .venv satisfies; ``llamafactory`` is checked against requirements-llamafactory.txt."""


def _setup() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    return cfg


def _requirements(text: str) -> list[Requirement]:
    return [Requirement(line.strip()) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# ------------------------------------------------------------------------------------------- recipes


def test_recipes_live_in_the_package_and_the_top_level_folder_points_there():
    assert (REPO / "recipes").resolve() == RECIPES_DIR == REPO / "qzoom_swift" / "recipes"
    names = list_recipes()
    for model in ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_4b"):
        assert {f"{model}/stage1_sdrpn.yaml", f"{model}/stage2_post_sft.yaml", f"{model}/stage3_gate.yaml"} <= set(names)
    assert {"llava1_5_7b/stage1_sdrpn.yaml", "tiny/stage1_sdrpn.yaml", "deepspeed/zero2.json"} <= set(names)
    cfg = _setup()
    patterns = cfg["options.package_data"]["qzoom_swift"].split()
    from fnmatch import fnmatch

    for name in names:  # every shipped file is matched by the package data globs
        assert any(fnmatch(f"recipes/{name}", pattern) for pattern in patterns), name


def test_qzoom_recipes_lists_prints_and_refuses_unknown_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the source tree: the note about --external_plugins appears
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == len(list_recipes())
    assert any(line.startswith("tiny/stage1_sdrpn.yaml") and "Stage 1" in line for line in listing)

    assert main(["recipes", "tiny/stage1_sdrpn.yaml"]) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()) == RECIPES_DIR / "tiny" / "stage1_sdrpn.yaml" and Path(out.strip()).is_file()
    assert "--external_plugins $(qzoom plugin-path)" in err
    for alias in ("recipes/tiny/stage1_sdrpn.yaml", "tiny/stage1_sdrpn"):
        assert main(["recipes", alias]) == 0 and capsys.readouterr().out.strip() == out.strip()
    assert main(["recipes", "tiny"]) == 0 and Path(capsys.readouterr().out.strip()) == RECIPES_DIR / "tiny"

    assert main(["recipes", "tiny/stage1_sdrp"]) == 2
    assert "tiny/stage1_sdrpn.yaml" in capsys.readouterr().err  # the close match is suggested
    assert main(["recipes", "../setup.cfg"]) == 2  # nothing outside the recipes folder


def test_qzoom_recipes_copy_writes_runnable_copies_and_keeps_edits(capsys, tmp_path):
    from qzoom_swift.swift_plugin import plugin_path

    dest = tmp_path / "recipes"
    assert main(["recipes", "--copy", str(dest)]) == 0
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert copied == list_recipes()
    recipe = yaml.safe_load((dest / "tiny" / "stage1_sdrpn.yaml").read_text())
    assert recipe["external_plugins"] == plugin_path()  # absolute: the copy runs from any directory
    shipped = yaml.safe_load((RECIPES_DIR / "tiny" / "stage1_sdrpn.yaml").read_text())
    assert {k: v for k, v in recipe.items() if k != "external_plugins"} == \
        {k: v for k, v in shipped.items() if k != "external_plugins"}
    assert (dest / "deepspeed" / "zero2.json").read_bytes() == (RECIPES_DIR / "deepspeed" / "zero2.json").read_bytes()

    edited = dest / "tiny" / "stage3_gate.yaml"
    edited.write_text(edited.read_text() + "max_steps: 99\n")
    capsys.readouterr()
    assert main(["recipes", "--copy", str(dest)]) == 0
    assert "max_steps: 99" in edited.read_text() and "kept" in capsys.readouterr().err
    assert main(["recipes", "tiny", "--copy", str(dest), "--force"]) == 0
    assert "max_steps: 99" not in edited.read_text()

    assert main(["recipes", "--copy", str(REPO / "recipes" / "tiny")]) == 2  # never onto the shipped files
    only = tmp_path / "one"
    assert main(["recipes", "qwen2_5_vl_7b/stage3_gate.yaml", "--copy", str(only)]) == 0
    assert [p.relative_to(only).as_posix() for p in only.rglob("*.yaml")] == ["qwen2_5_vl_7b/stage3_gate.yaml"]


# -------------------------------------------------------------------------------- bounds and extras


def _block(key: str) -> list[str]:
    """The raw lines (comments kept) of a multi-line setup.cfg value, e.g. ``install_requires``."""
    lines = SETUP_CFG.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
    block = []
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            break
        block.append(line.strip())
    return block


def test_every_dependency_bound_has_a_reason_and_the_locked_environment_satisfies_it():
    block = _block("install_requires")
    reqs = _requirements("\n".join(block))
    assert {"torch", "transformers"} <= {r.name for r in reqs}
    assert "ms-swift" not in {r.name for r in reqs}, "ms-swift is the [swift] extra: the core must install without it"
    for i, line in enumerate(block):
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        if req.specifier:
            ops = {s.operator for s in req.specifier}
            assert ">=" in ops and "<" in ops, f"{req}: needs a lower and an upper bound"
            assert block[i - 1].startswith("#"), f"{req}: no comment above it giving the reason for its bounds"
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"locked {req.name} {installed} is outside {req}"
    extras = _setup()["options.extras_require"]
    assert set(EXTRAS) <= set(extras)
    for extra in EXTRAS:
        for req in _requirements(extras[extra]):
            installed = metadata.version(req.name)
            assert req.specifier.contains(installed, prereleases=True), f"[{extra}] {req} vs locked {installed}"
    # the LLaMA-Factory environment's lock satisfies the core's bounds and the [llamafactory] extra
    lf_lock = dict(line.split("==", 1) for line in (REPO / "requirements-llamafactory.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#"))
    lf_lock = {name.lower(): version for name, version in lf_lock.items()}
    for req in [*_requirements(extras["llamafactory"]), *(r for r in reqs if r.specifier)]:
        assert req.specifier.contains(lf_lock[req.name.lower()]), f"{req} vs requirements-llamafactory.txt"


@pytest.mark.parametrize(("matcher", "module"), [("anls", "evalscope.metrics.nlp.metrics"),
                                                  ("relaxed", "evalscope.benchmarks.chartqa.utils"),
                                                  ("vqa", "evalscope.benchmarks.vqav2.vqav2_adapter")])
def test_evalscope_matchers_without_evalscope_name_the_extra(monkeypatch, matcher, module):
    from qzoom_swift.labels.matchers import get_matcher

    assert get_matcher(matcher)("hello", ["hello"] * 4) == 1.0
    monkeypatch.setitem(sys.modules, module, None)  # importing the scorer's module now raises ImportError
    with pytest.raises(ImportError, match=rf"'{matcher}' matcher .*pip install 'qzoom_swift\[eval\]'"):
        get_matcher(matcher)("hello", "help")


# ---------------------------------------------------------------------------------------- the wheel


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """sdist from a snapshot of the source tree (the repository itself is not written to), then a wheel from it."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "qzoom_swift", src / "qzoom_swift", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "recipes").symlink_to("qzoom_swift/recipes")
    python = sys.executable
    _run([python, "-c", "from setuptools import build_meta as b; print(b.build_sdist('../dist'))"], src)
    sdist = next((root / "dist").glob("qzoom_swift-*.tar.gz"))
    _run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-index",
          "-w", root / "dist", sdist], root)
    whl = next((root / "dist").glob("qzoom_swift-*.whl"))
    import zipfile

    names = set(zipfile.ZipFile(whl).namelist())
    assert {f"qzoom_swift/recipes/{n}" for n in list_recipes()} <= names, "recipes missing from the wheel"
    assert "qzoom_swift/swift_plugin/plugin.py" in names and "qzoom_swift/recipes_command.py" in names
    return whl


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    return {**env, **extra}


@pytest.mark.slow
def test_pip_install_of_the_wheel_changes_nothing_in_the_locked_environment(wheel, tmp_path):
    """A dry run into the locked .venv, extras included: pip would install qzoom_swift and nothing else."""
    report = tmp_path / "report.json"
    spec = f"qzoom_swift[{','.join(EXTRAS)}] @ {wheel.as_uri()}"
    _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--report", report, spec], tmp_path,
         env=_clean_env())
    planned = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert set(planned) <= {"qzoom-swift"}, f"pip would also install or replace: {planned}"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv that sees the locked packages (a .pth file), with the wheel installed by pip; returns bin/."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], venv.parent, env=_clean_env())
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     venv.parent, env=_clean_env()).strip())
    (site / "_locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    report = venv.parent / "report.json"
    # dependencies are resolved (not --no-deps) but nothing may be fetched: the locked packages must satisfy them
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-index", "--report", report,
          f"qzoom_swift[swift] @ {wheel.as_uri()}"], venv.parent, env=_clean_env())
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert names == ["qzoom_swift"], names
    # the console script pip writes for ms-swift, for this interpreter (ms-swift itself is the locked one)
    swift = venv / "bin" / "swift"
    swift.write_text(f"#!{venv / 'bin' / 'python'}\n" + (Path(sys.executable).parent / "swift").read_text().split("\n", 1)[1])
    swift.chmod(0o755)
    assert (venv / "bin" / "qzoom").is_file()
    return venv / "bin"


@pytest.mark.slow
def test_installed_plugin_trains_a_tiny_recipe_from_outside_the_repository(installed, tiny_dir, tmp_path):
    env = _clean_env(OMP_NUM_THREADS="1", MODELSCOPE_CACHE=str(tmp_path / "ms"))
    site = Path(_run([installed / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).strip())
    module = Path(_run([installed / "python", "-c", "import qzoom_swift; print(qzoom_swift.__file__)"], tmp_path, env)
                  .strip())
    assert module.parent == site / "qzoom_swift", "the installed copy must be imported, not the source tree"
    plugin = Path(_run([installed / "qzoom", "plugin-path"], tmp_path, env).strip())
    assert plugin == site / "qzoom_swift" / "swift_plugin" / "plugin.py" and plugin.is_file()
    listing = _run([installed / "qzoom", "recipes"], tmp_path, env)
    assert "tiny/stage1_sdrpn.yaml" in listing and "qwen2_5_vl_7b/stage3_gate.yaml" in listing
    recipe = Path(_run([installed / "qzoom", "recipes", "tiny/stage1_sdrpn.yaml"], tmp_path, env).strip())
    assert recipe == site / "qzoom_swift" / "recipes" / "tiny" / "stage1_sdrpn.yaml" and recipe.is_file()

    from qzoom_swift.synthetic.images import write_shape_dataset

    data = write_shape_dataset(tmp_path / "data", n=4, size=(392, 280), seed=1)
    _run([installed / "qzoom", "pseudo-labels", "--model", tiny_dir("qwen2_5_vl"), "--dataset", data, "--out",
          "labels", "--max-new-tokens", "2", "--batch-size", "2", "--calibration", "2", "--no-progress",
          "--tau-fg", "0.9", "--tau-bg", "0.8", "--max-box-fraction", "0.9", "--min-peak", "1e-3"], tmp_path, env)
    log = _run([installed / "swift", "sft", recipe, "--external_plugins", plugin, "--model", tiny_dir("qwen2_5_vl"),
                "--dataset", "labels/shard-00000.jsonl", "--output_dir", "train", "--max_steps", "2",
                "--save_steps", "2", *CPU_TRAIN_FLAGS], tmp_path, env, timeout=900)
    ckpt = tmp_path / "train" / "last-checkpoint"
    assert (ckpt / "qzoom_branch.safetensors").is_file(), log[-3000:]
    assert json.loads((ckpt / "qzoom_config.json").read_text())["extra"]["trained_branches"] == ["rpn"]
    args = json.loads((tmp_path / "train" / "args.json").read_text())
    assert args["external_plugins"] == [str(plugin)] and args["tuner_type"] == "qzoom"
    assert os.path.realpath(ckpt) == str(tmp_path / "train" / "checkpoint-2")
