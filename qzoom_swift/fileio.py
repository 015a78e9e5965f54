"""File writing that never leaves half a file, and quieting transformers' chatter.

A leaf module (standard library only at import): the CLI, the jobs, the evaluation and the demo all
write through it, so a reader (a resuming job, a user, CI) sees either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A unique temporary path beside ``path``; renamed over ``path`` on success, removed on error.

    For writers that want a file name (safetensors, parquet, matplotlib: give ``suffix=".png"`` so the
    format is inferred). The name starts with ``.<name>.`` so resumable jobs can recognise leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """``data`` as indented JSON (trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One JSON object per line, written atomically (for whole datasets; appends use ``append_jsonl_line``)."""
    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl_line(f: IO[str], data: Any) -> None:
    """Append one JSON line and make it durable before returning: a killed job resumes after it."""
    f.write(json.dumps(data, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs (warnings and errors still show)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
