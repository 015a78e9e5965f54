"""``qzoom eval --devices``: (run x benchmark) jobs on several devices at once, one worker process each.

Without ``--devices`` a run's benchmarks go through one worker after another, so a machine with eight
GPUs evaluated on one. With ``--devices cuda:0,cuda:1,...`` every pending (run, benchmark) pair is a job,
and up to one job per listed device runs at a time, each in its own worker process on its own device
(the same worker as the sequential path, given a spec with one benchmark). Each job keeps its spec, log
and progress file under ``<run_dir>/jobs/<benchmark>/``; its result goes to the same
``<run_dir>/bench/<benchmark>.json`` as a sequential run's, written atomically by the worker, so a job
that fails loses nothing of the others and a restart redoes only what is missing. ``cpu`` may be listed
several times (CPU workers split the cores); so may a GPU, to share it. Standard library only.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qzoom_swift.procs import STOP_GRACE_S, ChildStopped, forward_stop_signals, restore_signals

DEVICE_RE = re.compile(r"^(cpu|mps|(cuda|xpu|npu)(:\d+)?)$")
TICK_S = 0.2
"""How often the scheduler looks for finished workers (progress lines still follow ``poll_s``)."""


def parse_devices(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``; a clear error for anything torch would not take."""
    devices = [d.strip() for d in str(text).split(",") if d.strip()]
    bad = [d for d in devices if not DEVICE_RE.match(d)]
    if bad or not devices:
        raise ValueError(f"--devices {text!r}: expected a comma-separated list like cuda:0,cuda:1 or cpu,cpu"
                         + (f" (not a device: {', '.join(bad)})" if bad else ""))
    return devices


def device_kind(devices: list[str]) -> str:
    """What a result's fingerprint records: ``cuda`` for any mix of ``cuda:N`` (results do not depend on N)."""
    kinds = sorted({d.split(":")[0] for d in devices})
    return ",".join(kinds)


def cpu_threads(devices: list[str], cores: int | None = None) -> int | None:
    """Threads per CPU worker so that several of them share the cores; None with at most one CPU worker."""
    n = sum(1 for d in devices if d == "cpu")
    if n <= 1:
        return None
    return max(1, (cores or os.cpu_count() or 1) // n)


@dataclass(eq=False)
class Job:
    """One (run, benchmark) worker: where its spec, log and progress live."""

    run: str
    benchmark: str
    run_dir: Path
    returncode: int | None = None
    device: str = ""
    slot: int = -1
    pid: int | None = None
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.run}/{self.benchmark}"

    @property
    def dir(self) -> Path:
        return self.run_dir / "jobs" / self.benchmark

    @property
    def spec_path(self) -> Path:
        return self.dir / "spec.json"

    @property
    def log(self) -> Path:
        return self.dir / "log.txt"

    @property
    def progress(self) -> Path:
        return self.dir / "progress.json"


Launch = Callable[[Job, str, int], subprocess.Popen]
"""Starts ``job`` on ``device`` (worker slot ``slot``) and returns its process."""


def run_on_devices(jobs: list[Job], devices: list[str], launch: Launch, *, poll_s: float = 30.0,
                   on_poll: Callable[[Job], None] | None = None,
                   on_exit: Callable[[Job], None] | None = None) -> list[Job]:
    """Run ``jobs`` with at most one per device slot at a time, in order; returns the jobs that failed.

    SIGTERM/SIGINT/SIGHUP stop every running worker (SIGTERM, then SIGKILL after ``STOP_GRACE_S``), start no
    new one, and raise :class:`ChildStopped`, as ``procs.run_child`` does for one child. ``on_poll(job)`` runs
    every ``poll_s`` seconds per running job; ``on_exit(job)`` when a job ends (``job.returncode`` set).
    """
    queue, free = deque(jobs), list(range(len(devices)))
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}
    received: list[int] = []
    previous = forward_stop_signals(received, lambda: [proc for _, proc, _ in running.values()])
    last_poll = time.monotonic()
    try:
        while (queue and not received) or running:
            while queue and free and not received:
                slot = free.pop(0)
                job = queue.popleft()
                job.device, job.slot = devices[slot], slot
                proc = launch(job, devices[slot], slot)
                job.pid = proc.pid
                running[slot] = (job, proc, time.perf_counter())
            _reap(running, free, on_exit)
            if received:
                _stop_all(running)
                continue
            if on_poll is not None and time.monotonic() - last_poll >= poll_s:
                last_poll = time.monotonic()
                for job, _, _ in list(running.values()):
                    on_poll(job)
            time.sleep(TICK_S)
    finally:
        restore_signals(previous)
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if received:
        raise ChildStopped(128 + received[0])
    return [job for job in jobs if job.returncode not in (0, None)]


def _reap(running: dict, free: list[int], on_exit: Callable[[Job], None] | None) -> None:
    for slot, (job, proc, t0) in list(running.items()):
        rc = proc.poll()
        if rc is None:
            continue
        job.returncode, job.elapsed_s = rc, time.perf_counter() - t0
        del running[slot]
        free.append(slot)
        free.sort()
        if on_exit is not None:
            on_exit(job)


def _stop_all(running: dict) -> None:
    """Wait for the terminated workers; kill those still alive after the grace period."""
    deadline = time.monotonic() + STOP_GRACE_S
    for _, proc, _ in running.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    running.clear()
