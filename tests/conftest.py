"""Shared pytest set-up: offline/CPU environment, tiny model dirs and a synthetic ms-swift dataset.

The environment variables are set at import, before any test module imports transformers, swift or
deepspeed. Model dirs are cached under ``QZOOM_CACHE`` (default ``<repo>/.cache/qzoom``, gitignored), so
only the first run of the suite pays for building them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QZOOM_CACHE", str(REPO / ".cache" / "qzoom"))
# swift writes its dataset map caches under MODELSCOPE_CACHE; keep them out of ~/.cache.
os.environ.setdefault("MODELSCOPE_CACHE", str(REPO / ".cache" / "modelscope"))


@pytest.fixture(scope="session")
def tiny_dir() -> Callable[..., Path]:
    """Factory: ``tiny_dir("qwen2_5_vl")`` -> Path of the locally built tiny model dir (built once, cached)."""
    from qzoom_swift.synthetic.models import build_model_dir

    built: dict[tuple[str, str, int], Path] = {}

    def get(family: str, size: str = "tiny", seed: int = 0) -> Path:
        key = (family, size, seed)
        if key not in built:
            built[key] = build_model_dir(family, size, seed=seed)
        return built[key]

    return get


@pytest.fixture(scope="session")
def shape_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ms-swift jsonl of 4 rows (392x280 PNGs with one coloured shape; answer = colour); returns its path."""
    from qzoom_swift.synthetic.images import write_shape_dataset

    return write_shape_dataset(tmp_path_factory.mktemp("shape_data"), n=4, size=(392, 280), seed=0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite leaves no process (hence no port) behind: a child of pytest still running fails the run."""
    import psutil

    names = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{p.pid}: {' '.join(p.cmdline()[:4])}")
                p.kill()
        except psutil.Error:  # it ended meanwhile
            continue
    if not names:
        return
    print("\nprocesses left running by the tests (killed now):\n  " + "\n  ".join(names))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def loaded(tiny_dir) -> Callable[..., tuple]:
    """Factory: ``loaded(family, attn)`` -> (tiny model in float32 with no branches attached, processor).

    Models are cached per test module; every call detaches branches a previous test attached.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import detach_branches

    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, attn: str = "sdpa") -> tuple:
        key = (family, attn)
        if key not in cache:
            path = tiny_dir(family)
            model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn,
                                                                dtype=torch.float32).eval()
            cache[key] = (model, AutoProcessor.from_pretrained(path))
        model, processor = cache[key]
        detach_branches(model)
        return model, processor

    return get


# tests/llamafactory/ runs in the LLaMA-Factory environment (.venv-lf, transformers 5.6, no ms-swift), started by
# tests/test_llamafactory.py; the main environment cannot import LLaMA-Factory, so it does not collect them.
# (It looks for llamafactory.cli: this folder itself would pass for a namespace package named llamafactory.)
collect_ignore = [] if importlib.util.find_spec("llamafactory.cli") else ["llamafactory"]
# tests/vllm_wing/ likewise runs in .venv-vllm (started by tests/test_vllm.py).
if importlib.util.find_spec("vllm") is None:
    collect_ignore.append("vllm_wing")
