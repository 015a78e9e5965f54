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


def _subparsers():
    import argparse

    from qzoom_swift.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_has_help_and_a_snake_case_spelling(name):
    sub = _subparsers()[name]
    for action in sub._actions:
        assert action.help and action.help.strip(), f"qzoom {name} {action.option_strings or action.dest}: no help"
        for option in action.option_strings:
            if option.startswith("--") and "-" in option[2:]:
                snake = "--" + option[2:].replace("-", "_")
                assert sub._option_string_actions.get(snake) is action, f"qzoom {name}: {snake} not accepted"
    assert "--log-level" in sub._option_string_actions


def test_snake_case_flags_parse_like_kebab_case(tmp_path, capsys):
    assert main(["build-tiny", "--family", "llava", "--cache_dir", str(tmp_path), "--log_level", "warning"]) == 0
    assert Path(capsys.readouterr().out.strip()).parent == tmp_path / "models"


def test_exit_codes_usage_2_job_failure_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build-tiny", "--family", "blip"])  # a value argparse refuses
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["plugin-path", "--no-such-flag"])
    assert exc.value.code == 2
    capsys.readouterr()
    code = main(["gate-labels", "--model", str(tmp_path), "--dataset", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 1 and "missing.jsonl" in capsys.readouterr().err
    res = subprocess.run([str(QZOOM), "--help"], capture_output=True, text=True, timeout=60)
    assert "exit codes: 0 done; 1 the job failed" in " ".join(res.stdout.split())


def test_log_level_configures_the_library_logger(capsys):
    import logging

    assert main(["plugin-path", "--log-level", "debug"]) == 0
    assert logging.getLogger("qzoom_swift").level == logging.DEBUG
    assert main(["plugin-path", "--log-level", "warning"]) == 0
    assert logging.getLogger("qzoom_swift").level == logging.WARNING


def test_export_onnx_takes_the_checkpoint_as_a_flag_like_every_command(tmp_path, capsys):
    base = ["export-onnx", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    assert main(base) == 2 and "--checkpoint CKPT" in capsys.readouterr().err  # none given
    assert main([*base, "--checkpoint", str(tmp_path / "a"), str(tmp_path / "b")]) == 2  # given twice
    # the old positional form still reaches the export, which fails naming the missing model (exit 1)
    assert main([*base, str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert "positional CKPT is deprecated" in err and f"cannot load the model {tmp_path / 'model'}" in err
