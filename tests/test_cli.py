"""The ``qzoom`` command: help, plugin-path and build-tiny (in-process through ``main``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from qzoom_swift.cli import COMMANDS, main

QZOOM = Path(sys.executable).parent / "qzoom"


def test_help_lists_commands_and_is_fast():
    assert QZOOM.is_file(), "qzoom console script missing: pip install -e . (make venv does it)"
    t0 = time.perf_counter()
    res = subprocess.run([str(QZOOM), "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    for name in COMMANDS:
        assert name in res.stdout
    assert seconds < 5, f"qzoom --help took {seconds:.1f} s: a heavy module is imported at top level"


def test_help_in_process_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "plugin-path" in capsys.readouterr().out


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: qzoom" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: qzoom {name}" in capsys.readouterr().out


def test_plugin_path(capsys):
    assert main(["plugin-path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_absolute()
    assert path.parts[-2:] == ("swift_plugin", "plugin.py")
    assert path.parent.parent == Path(__file__).resolve().parents[1] / "qzoom_swift"


def test_build_tiny_llava(tmp_path, capsys):
    assert main(["build-tiny", "--family", "llava", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    d = Path(lines[0])
    assert d.parent == tmp_path / "models"
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    # a second call reuses the dir
    assert main(["build-tiny", "--family", "llava", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(d)
