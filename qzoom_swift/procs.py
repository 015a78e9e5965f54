"""Child processes that never outlive their parent (standard library only).

Two launchers leave orphans otherwise: ms-swift's ``swift`` command runs the real program (``swift deploy``'s
server, ``swift sft``) as a child and does not pass SIGTERM on, and ``qzoom eval`` runs each run in a worker.
A child asks the kernel for a signal when its parent dies (``PR_SET_PDEATHSIG`` through ctypes, Linux), which
also covers a parent killed with SIGKILL; a parent that runs a child forwards SIGTERM/SIGINT/SIGHUP to it and
waits for it to exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 20.0
"""Seconds a child gets to exit after SIGTERM before it is killed."""


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits; True when that is in place.

    ``parent_pid`` closes the race of a parent that died before the call: then ``sig`` is raised at once.
    Only Linux has the call; elsewhere nothing happens (False).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def exit_when_reparented(sig: int = signal.SIGTERM, poll_s: float = 1.0) -> threading.Thread:
    """Send ``sig`` to this process once its parent is gone (it has been reparented), from a daemon thread.

    For processes a library starts (vLLM's engine core): ``PR_SET_PDEATHSIG`` fires when the parent's *thread*
    that started the child exits, which may be long before the parent does; polling the parent id does not.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, name="qzoom-parent-watch", daemon=True)
    thread.start()
    return thread


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def started_by_swift_launcher(argv: Sequence[str] | None = None, parent: int | None = None) -> bool:
    """Whether this process is the program ms-swift's ``swift`` command runs as its child (``swift/cli/*.py``)."""
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parent.as_posix().split("/")[-2:] != ["swift", "cli"]:
        return False
    launcher = _cmdline(os.getppid() if parent is None else parent)
    return any(Path(a).name == "swift" or a.endswith("swift/cli/main.py") or a == "swift.cli.main"
               for a in launcher[:3])


def stop_with_swift_launcher() -> bool:
    """In the child of ``swift deploy|infer|sft``: exit (SIGTERM) when the launcher is stopped or killed."""
    if not started_by_swift_launcher():
        return False
    return die_with_parent(signal.SIGTERM, os.getppid())


def forward_stop_signals(received: list[int], children: Callable[[], Iterable[subprocess.Popen]]) -> dict:
    """Handle SIGTERM/SIGINT/SIGHUP by recording the signal in ``received`` and terminating ``children()``.

    Returns the previous handlers for :func:`restore_signals`; off the main thread nothing is installed.
    """
    def forward(signum, _frame):
        received.append(signum)
        for proc in list(children()):
            if proc.poll() is None:
                proc.terminate()

    previous = {}
    for sig in FORWARDED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: the caller keeps its own handling
            break
    return previous


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class ChildStopped(SystemExit):
    """Raised by :func:`run_child` after it stopped the child because this process was asked to stop."""


def run_child(cmd: Sequence[str], *, on_poll: Callable[[], None] | None = None, poll_s: float = 1.0,
              **popen_kwargs) -> int:
    """``subprocess.run`` that stops the child when this process is stopped; returns the child's exit code.

    SIGTERM, SIGINT and SIGHUP are passed on as SIGTERM (SIGKILL after ``STOP_GRACE_S``), the child is
    waited for, and :class:`ChildStopped` (exit code 128 + signal) ends this process's work too. The
    child should call :func:`die_with_parent` to also go when this process is killed outright.
    ``on_poll`` is called every ``poll_s`` seconds while the child runs (``qzoom eval``'s progress lines).
    """
    proc = subprocess.Popen(list(cmd), **popen_kwargs)
    received: list[int] = []
    previous = forward_stop_signals(received, lambda: [proc])
    try:
        while True:
            stopping = bool(received)
            try:
                rc = proc.wait(timeout=STOP_GRACE_S if stopping else (poll_s if on_poll else None))
                break
            except subprocess.TimeoutExpired:
                if stopping:
                    proc.kill()
                elif on_poll is not None and not received:
                    on_poll()
    finally:
        restore_signals(previous)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if received:
        raise ChildStopped(128 + received[0])
    return rc


def run_under_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m qzoom_swift.cli ARGV``, as
    ``swift sft`` does for ``NPROC_PER_NODE=N``: each process finds its rank in ``RANK`` / ``WORLD_SIZE``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "qzoom_swift.cli", *argv]
    print(f"qzoom: NPROC_PER_NODE={nproc}: {' '.join(cmd[1:6])} ... {' '.join(argv[:1])}", file=sys.stderr)
    return run_child(cmd)
