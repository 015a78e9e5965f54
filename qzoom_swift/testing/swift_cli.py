"""Run the real ``swift`` CLI from tests and benchmarks, several invocations at once.

A ``swift`` call on a tiny model is ~20 s of imports and start-up on one core; running independent calls
as concurrent subprocesses keeps the suite short on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


CPU_TRAIN_FLAGS = ["--check_model", "false", "--fp16", "false", "--bf16", "false", "--report_to", "none",
                   "--dataloader_num_workers", "0", "--torch_dtype", "float32"]
"""What `swift sft` needs on a CPU machine (see README): no hub check, no mixed precision, no workers."""
