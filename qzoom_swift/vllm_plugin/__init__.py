"""The vLLM wing: Q-Zoom served by vLLM (continuous batching, paged attention, prefix caching).

- ``register()`` (the ``vllm.general_plugins`` entry point, run in every vLLM process) registers the model
  subclasses that place a crop at Q-Zoom's positions; an engine picks one with
  ``hf_overrides={"architectures": [ARCHITECTURES[family]]}``, so the model folder stays untouched.
- ``QZoomVLLM`` (``qzoom_swift.vllm_plugin.engine``) is the Python API: the front router (the core's pass 1,
  gate and RPN on the low-resolution prompt) decides each sample, then each sample is one vLLM request.

vLLM is an extra (``pip install 'qzoom_swift[vllm]'``): nothing here imports it at module import, and nothing
here imports ms-swift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qzoom_swift.vllm_plugin.registration import ARCHITECTURES, register

if TYPE_CHECKING:
    from qzoom_swift.vllm_plugin.engine import QZoomVLLM


def __getattr__(name: str):
    if name == "QZoomVLLM":
        from qzoom_swift.vllm_plugin.engine import QZoomVLLM

        return QZoomVLLM
    raise AttributeError(f"module 'qzoom_swift.vllm_plugin' has no attribute {name!r}")


__all__ = ["ARCHITECTURES", "QZoomVLLM", "register"]
