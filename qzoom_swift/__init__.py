"""qzoom_swift: Q-Zoom (query-aware adaptive perception) for stock transformers VLMs, as an ms-swift plugin.

The public surface is small and imported lazily, so ``import qzoom_swift`` (and the ``qzoom`` CLI's
``--help``) stays fast; torch and transformers load only when a name that needs them is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "QZoomConfig": "qzoom_swift.config",
    "QZoomModel": "qzoom_swift.model",
    "attach_branches": "qzoom_swift.branches",
    "detach_branches": "qzoom_swift.branches",
    "get_branches": "qzoom_swift.branches",
    "load_branch_checkpoint": "qzoom_swift.checkpoint",
    "save_branch_checkpoint": "qzoom_swift.checkpoint",
    "BranchCheckpointError": "qzoom_swift.checkpoint",
    "prefill": "qzoom_swift.prefill",
    "continue_prefill": "qzoom_swift.prefill",
    "family_of": "qzoom_swift.families",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qzoom_swift' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
