"""Run the real ``swift`` CLI from Python: ``swift sft`` on a recipe (in this process or as the CLI), and
several ``swift`` invocations at once.

The demo and the toy-model builder train several times in one run; ms-swift's own start-up (imports,
plugin loading) costs 20-40 s per subprocess on 2 cores, so in-process is the default there. Tests and
benchmarks run independent ``swift`` calls as concurrent subprocesses, which keeps the suite short.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def swift_executable() -> Path:
    path = Path(sys.executable).parent / "swift"
    if not path.is_file():
        raise FileNotFoundError(f"no `swift` script next to {sys.executable}: install ms-swift in this environment")
    return path


@dataclass
class SwiftRun:
    returncode: int
    seconds: float
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def run_swift_concurrently(commands: dict[str, list[str]], workdir: Path, env: dict[str, str] | None = None,
                           timeout_s: float = 900, envs: dict[str, dict[str, str]] | None = None) -> dict[str, SwiftRun]:
    """Run ``swift <args>`` for every entry at once; each gets its own log and ModelScope cache.

    ``envs`` adds per-command variables (e.g. a distinct MASTER_PORT per torchrun launch).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, args in commands.items():
        log = workdir / f"{name}.log"
        run_env = dict(os.environ, **(env or {}), **((envs or {}).get(name) or {}))
        run_env.setdefault("OMP_NUM_THREADS", "1")
        run_env["MODELSCOPE_CACHE"] = str(workdir / f"modelscope-{name}")  # no shared dataset-cache lock
        with open(log, "wb") as f:
            proc = subprocess.Popen([str(swift_executable()), *args], cwd=workdir, env=run_env, stdout=f,
                                    stderr=subprocess.STDOUT)
        procs[name] = (proc, time.perf_counter(), log)
    runs = {}
    for name, (proc, t0, log) in procs.items():
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        runs[name] = SwiftRun(rc, time.perf_counter() - t0, log)
    return runs


def run_logged(cmd: list, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> SwiftRun:
    """Run ``cmd`` with its stdout and stderr in ``log``; a non-zero exit raises with the log's tail (the demo's
    LLaMA-Factory steps: each command keeps its own log beside its outputs)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        rc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    run = SwiftRun(rc, time.perf_counter() - t0, log)
    if rc != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} {' '.join(map(str, cmd[1:3]))} failed (exit {rc}); log {log}:\n"
                           f"{run.tail(2000)}")
    return run


CPU_TRAIN_FLAGS = ["--check_model", "false", "--fp16", "false", "--bf16", "false", "--report_to", "none",
                   "--dataloader_num_workers", "0", "--torch_dtype", "float32"]
"""What `swift sft` needs on a CPU machine (see README): no hub check, no mixed precision, no workers."""


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
