"""Shared set-up of the vLLM wing's tests (run in .venv-vllm only): CPU engine settings, images, routers.

The vLLM engine runs in-process here until the ``vllm.general_plugins`` entry point is installed (then vLLM's
own processes register the models themselves); either way one engine per family and module.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import pytest  # noqa: E402
import torch  # noqa: E402

BLOCK = 32
LOW_BUDGET = {"low_min_tokens": 16, "low_max_tokens": 64, "roi_min_tokens": 16, "roi_max_tokens": 64}


@pytest.fixture(scope="module")
def engines(tiny_dir):
    """Factory: ``engines(family)`` -> QZoomVLLM on the tiny model with fresh branches (one alive at a time)."""
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.vllm_plugin.engine import QZoomVLLM

    held: dict[str, QZoomVLLM] = {}

    def get(family: str) -> QZoomVLLM:
        if family not in held:
            for other in list(held):
                held.pop(other).shutdown()
            path = tiny_dir(family)
            torch.manual_seed(0)  # the gate head is a fresh Linear: the same draw in every run
            router = QZoomModel.from_pretrained(path, QZoomConfig(**LOW_BUDGET), dtype="float32", device="cpu")
            held[family] = QZoomVLLM(path, router=router, dtype="float32", enforce_eager=True, block_size=BLOCK,
                                     max_model_len=1024, seed=0)
        return held[family]

    yield get
    for engine in held.values():
        engine.shutdown()
    # with the entry point installed the engine runs in spawned processes, which start multiprocessing's resource
    # tracker: it would outlive the module (the suite fails on leftover processes); nothing is tracked any more
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()
