"""Local benchmark folders are read as they are now, never from a cache entry of another folder.

evalscope reads a local Hugging Face dataset folder with ``datasets.load_dataset(folder, name=subset)``,
and the datasets cache keys that by builder and config name (``docvqa/DocVQA/0.0.0/<hash>``), not by the
folder or its files: a second folder of the same name, or edited files, were served the first one's
samples. Loads go through :func:`local_datasets_cache`, which points the cache at a directory named by
the folder's resolved path and each file's size and mtime, so any change is a new entry.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HF_CACHE_DIR = "hf-datasets"
"""Name of the per-fingerprint cache root under an evaluation's dataset dir."""
IGNORED_FILES = ("dataset_infos.json",)
"""Files evalscope deletes from a local folder when it loads it: not part of the data's identity."""


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """16 hex of the folder's resolved path and every file's relative path, size and mtime (symlinks followed)."""
    root = Path(folder).resolve()
    digest = hashlib.sha256(str(root).encode())
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in IGNORED_FILES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in files:
        st = path.stat()
        rel = path.name if path == root else path.relative_to(root).as_posix()
        digest.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@contextmanager
def local_datasets_cache(folder: str | os.PathLike, cache_root: str | os.PathLike) -> Iterator[Path]:
    """While inside, the Hugging Face datasets cache is ``cache_root/<fingerprint of folder>``.

    ``datasets`` reads ``config.HF_DATASETS_CACHE`` at each load (the environment variable only when it
    is imported), so this works whatever the process already imported; the old value is restored.
    """
    import datasets

    cache = Path(cache_root) / folder_fingerprint(folder)
    cache.mkdir(parents=True, exist_ok=True)
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    try:
        yield cache
    finally:
        datasets.config.HF_DATASETS_CACHE = old


def load_benchmark_samples(name: str, folder: str | os.PathLike, cache_root: str | os.PathLike, **task) -> list:
    """Every sample evalscope's ``name`` adapter reads from ``folder`` (what ``qzoom eval`` would evaluate)."""
    from evalscope import TaskConfig
    from evalscope.api.registry import get_benchmark

    import qzoom_swift.eval.benchmarks  # noqa: F401  (registers the plugin benchmarks)

    config = TaskConfig(datasets=[name], dataset_args={name: {"dataset_id": str(folder)}},
                        **{"eval_type": "mock_llm", "model": "mock", **task})
    with local_datasets_cache(folder, cache_root):
        data = get_benchmark(name, config).load_dataset()
    return [sample for subset in data.keys() for sample in data[subset]]
