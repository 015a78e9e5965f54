"""Shared set-up of the CPU benchmark scripts (imported before torch; scripts run from ``benchmarks/``).

Offline hub, CPU DeepSpeed, the repo's model cache, and OpenMP threads that sleep instead of spinning:
on a shared 2-core machine busy-waiting threads made timings 5-8x slower and erratic (bench_zoom.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("OMP_WAIT_POLICY", "PASSIVE"),
                     ("QZOOM_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "qzoom"))):
    os.environ.setdefault(_key, _value)


def setup_torch(threads: int) -> None:
    """``threads`` intra-op threads, one inter-op thread (if not already fixed by an earlier call)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, for the printed report."""
    args = [sys.executable, *sys.argv] if argv is None else [script, *argv]
    return " ".join(shlex.quote(a) for a in args)
