"""Group concurrent calls into one batched call (standard library only).

evalscope's ``eval_batch_size`` runs that many samples in threads, each calling ``ModelAPI.generate`` for
one sample. A lock around the model made those threads take turns, so a larger ``eval_batch_size`` bought
nothing. A :class:`Batcher` instead queues the calls and a single worker thread runs them in batches:

- the oldest waiting call opens a collection window; the batch closes when ``max_batch`` calls with the
  same key are waiting or when the window since that call's arrival has passed (a call that waited for
  a busy model does not wait again), so no call waits longer than its window for companions;
- calls with different keys (other generation settings) never share a batch;
- one batch runs at a time (one model, one worker thread);
- an exception reaches only the calls of the batch that raised it, and a failing batch is retried one
  call at a time, so one bad sample fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)
_UNSET = object()


@dataclass(eq=False)
class _Call:
    item: Any
    key: Hashable
    max_batch: int
    window_s: float
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = _UNSET
    error: BaseException | None = None


class Batcher:
    """Runs ``run_batch(key, items) -> results`` (one result per item, same order) for concurrent callers."""

    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], name: str = "batcher") -> None:
        self._run_batch = run_batch
        self._name = name
        self._cond = threading.Condition()
        self._pending: list[_Call] = []
        self._thread: threading.Thread | None = None
        self.batch_sizes: list[int] = []
        """Size of every batch run so far (the retries of a failed batch count as batches of 1)."""

    def submit(self, item: Any, key: Hashable = None, *, max_batch: int = 1, window_s: float = 0.0) -> Any:
        """``item``'s result, computed in a batch with other calls of the same ``key``; re-raises its error."""
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"batcher: max_batch {max_batch} must be >= 1 and window_s {window_s} >= 0")
        call = _Call(item, key, int(max_batch), float(window_s))
        with self._cond:
            self._pending.append(call)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _loop(self) -> None:
        while True:
            self._run(self._next_batch())

    def _next_batch(self) -> list[_Call]:
        """Wait for the oldest call's batch to fill or for its window to pass; take that batch off the queue."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
            head = self._pending[0]
            deadline = head.arrived + head.window_s
            while True:
                batch = [c for c in self._pending if c.key == head.key][:head.max_batch]
                remaining = deadline - time.monotonic()
                if len(batch) >= head.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            for call in batch:
                self._pending.remove(call)
            return batch

    def _run(self, batch: list[_Call]) -> None:
        try:
            try:
                self._call(batch)
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                logger.warning("%s: a batch of %d failed (%s: %s); retrying its calls one by one", self._name,
                               len(batch), type(exc).__name__, exc)
                for call in batch:
                    try:
                        self._call([call])
                    except Exception as one:
                        call.error = one
        finally:
            for call in batch:  # whatever happened, no caller waits forever
                if call.result is _UNSET and call.error is None:
                    call.error = RuntimeError(f"{self._name}: the batch ended without a result for this call")
                call.done.set()

    def _call(self, batch: list[_Call]) -> None:
        self.batch_sizes.append(len(batch))
        results = list(self._run_batch(batch[0].key, [c.item for c in batch]))
        if len(results) != len(batch):
            raise RuntimeError(f"{self._name}: {len(results)} results for a batch of {len(batch)}")
        for call, result in zip(batch, results):
            call.result = result
