"""One sample's failure stays that sample's: how the labelling jobs and ``qzoom eval`` classify and contain it.

Out of memory, on GPU as on CPU, is one rule for every job that rejects a sample instead of dying.

A CUDA allocation failure is ``torch.OutOfMemoryError``; a CPU one is not: torch's CPU allocator raises a
plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory ... Error code 12"), numpy and PIL a
``MemoryError`` ("Unable to allocate 7.45 GiB ..."), other libraries "not enough memory". All of them are
the sample's size against the machine, not a bug, so they share the reason ``out_of_memory``.
"""

from __future__ import annotations

OOM_REASON = "out_of_memory"
MODEL_ERROR = "model_error"
MAX_CONSECUTIVE_FAILURES = 16
"""More model failures in a row than this is a broken model or setup, not bad samples: the job stops."""
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
              "unable to allocate", "std::bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure (CUDA or CPU), by type or by the allocator's message, also when it is the
    cause of another error (e.g. an image decoder's ``MemoryError`` re-raised as "not a readable image")."""
    seen = 0
    while exc.__cause__ is not None and seen < 8:
        if _is_oom_itself(exc):
            return True
        exc, seen = exc.__cause__, seen + 1
    return _is_oom_itself(exc)


def _is_oom_itself(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    text = str(exc).lower()
    return any(t in text for t in _OOM_TEXTS)


def release_memory() -> None:
    """Give back what a failed forward pass held (CUDA caching allocator), so the next sample can run."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_failure_reason(exc: BaseException) -> str:
    """``out_of_memory`` or ``model_error``: the reason recorded for a sample that failed inside the model."""
    return OOM_REASON if is_out_of_memory(exc) else MODEL_ERROR
