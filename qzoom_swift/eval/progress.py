"""Per-worker progress of ``qzoom eval``: the worker writes a small file, the parent prints lines from it.

A benchmark of 5000 samples on a real model runs for an hour; without this, ``qzoom eval`` printed nothing
between "started" and "done". The worker records (benchmark, samples done / total, start time) in
``<run_dir>/progress.json`` after every sample, taken from evalscope's own work pool (its ``total`` counts
cached samples too, so a resumed benchmark starts part-way). Standard library only at import.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import write_json_atomic

PROGRESS_NAME = "progress.json"
HEARTBEAT_S = 60.0
"""The parent repeats an unchanged progress line this often (a slow sample still shows the run is alive)."""


def progress_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PROGRESS_NAME


def read_progress(run_dir: str | Path, path: str | Path | None = None) -> dict[str, Any] | None:
    """The worker's last record (``path``, default ``progress_path(run_dir)``), or None before its first one."""
    try:
        return json.loads(Path(path or progress_path(run_dir)).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def track_evalscope_progress(run_dir: str | Path, benchmark: str, index: int, count: int,
                             path: str | Path | None = None) -> Iterator[None]:
    """Write ``progress.json`` for each sample evalscope's evaluator finishes while the block runs.

    Wraps ``run_in_threads_with_progress`` as evalscope's evaluator module imported it (its one work pool
    over all subsets); an evalscope without it just gives no per-sample counts. ``path`` (default
    ``progress_path(run_dir)``) lets parallel workers of one run keep one file each.
    """
    from evalscope.evaluator import evaluator as module

    original = getattr(module, "run_in_threads_with_progress", None)
    path = Path(path or progress_path(run_dir))
    record = {"benchmark": benchmark, "index": index, "count": count, "done": 0, "total": None,
              "started": time.time()}
    write_json_atomic(path, record)
    if original is None:
        yield
        return

    def pool(items, worker, *, on_result=None, initial: int = 0, total: int | None = None, **kwargs):
        record.update(done=initial, total=total if total is not None else initial + len(items), started=time.time())
        write_json_atomic(path, record)

        def counted(item, result):
            if on_result is not None:
                on_result(item, result)
            record["done"] += 1
            write_json_atomic(path, record)

        return original(items, worker, on_result=counted, initial=initial, total=total, **kwargs)

    module.run_in_threads_with_progress = pool
    try:
        yield
    finally:
        module.run_in_threads_with_progress = original


def progress_line(run: str, progress: dict[str, Any] | None, log: Path, now: float | None = None) -> str:
    """``[qzoom eval] RUN: BENCH (i/n) done/total samples, E s elapsed, ETA T s (log: LOG)``."""
    if progress is None:
        return f"[qzoom eval] {run}: loading the model (log: {log})"
    done, total = int(progress.get("done") or 0), progress.get("total")
    elapsed = max(0.0, (time.time() if now is None else now) - float(progress.get("started") or 0.0))
    where = f"{progress.get('benchmark')} ({progress.get('index')}/{progress.get('count')})"
    if total is None:
        return f"[qzoom eval] {run}: {where} loading the data, {elapsed:.0f} s elapsed (log: {log})"
    eta = f"{elapsed / done * (int(total) - done):.0f} s" if done else "unknown"
    return (f"[qzoom eval] {run}: {where} {done}/{total} samples, {elapsed:.0f} s elapsed, ETA {eta} "
            f"(log: {log})")


def progress_printer(run: str, run_dir: Path, log: Path, heartbeat_s: float = HEARTBEAT_S,
                     emit: Callable[[str], None] | None = None, path: Path | None = None) -> Callable[[], None]:
    """A poll function for ``procs.run_child``: prints a line when the progress changed, or every ``heartbeat_s``."""
    emit = emit or (lambda line: print(line, flush=True))
    last: dict[str, Any] = {"key": (), "at": 0.0}

    def poll() -> None:
        progress = read_progress(run_dir, path)
        key = (None,) if progress is None else (progress.get("benchmark"), progress.get("done"), progress.get("total"))
        now = time.monotonic()
        if key != last["key"] or now - last["at"] >= heartbeat_s:
            last.update(key=key, at=now)
            emit(progress_line(run, progress, log))

    return poll
