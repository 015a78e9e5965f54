"""Run ``swift sft`` on a recipe from Python: in this process (no second start-up) or as the real CLI.

The demo and the toy-model builder train several times in one run; ms-swift's own start-up (imports,
plugin loading) costs 20-40 s per subprocess on 2 cores, so in-process is the default there.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (Python, C libraries, tqdm) to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def swift_sft(recipe: Path, overrides: list[str], workdir: Path, env: dict[str, str] | None = None,
              in_process: bool = True) -> Path:
    """``swift sft <recipe> <overrides>`` with ``env`` set; returns its log file (``workdir/sft.log``).

    In-process: the YAML is expanded by ms-swift's own ``parse_yaml_args`` and ``sft_main`` runs here, with
    the environment restored afterwards and all output sent to the log. Subprocess: the real ``swift`` CLI.
    ``env`` is set before the recipe's ENV block, which only fills keys that are unset.
    """
    from qzoom_swift.swift_plugin import plugin_path
    from qzoom_swift.testing.swift_cli import CPU_TRAIN_FLAGS, run_swift_concurrently

    argv = [str(recipe), *overrides, "--external_plugins", str(plugin_path()), *CPU_TRAIN_FLAGS]
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "sft.log"
    log.unlink(missing_ok=True)
    if not in_process:
        run = run_swift_concurrently({"sft": ["sft", *argv]}, workdir, env=env)["sft"]
        if run.returncode != 0:
            raise RuntimeError(f"swift sft failed (exit {run.returncode}); log {run.log}:\n{run.tail(2000)}")
        return run.log
    saved = dict(os.environ)
    try:
        os.environ.update(env or {})
        with output_to(log):
            from swift import sft_main
            from swift.cli.main import parse_yaml_args

            parse_yaml_args(argv)
            sft_main(argv)
    except BaseException as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"swift sft failed ({type(exc).__name__}: {exc}); log {log}:\n{tail}") from exc
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return log
