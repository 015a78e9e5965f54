"""Optional dependencies: checked where a command starts, with an error that names the extra to install.

The core needs only torch and transformers; each trainer is an extra (``swift``: ms-swift, for ``swift sft``,
``qzoom demo``, hub datasets and checkpoints; ``llamafactory``: LLaMA-Factory), ONNX export and the onnxruntime
router need the ``onnx`` extra, ``qzoom eval`` the ``eval`` extra. Without this a user meets a bare ``ModuleNotFoundError`` deep in
a job (or in a worker's log) instead of the one line that fixes it.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "eval": ("evalscope",),
    "swift": ("swift",),
    "llamafactory": ("llamafactory.cli",),
    "vllm": ("vllm",),
}
"""extra -> the modules it brings (setup.cfg's ``extras_require`` installs them)."""


class MissingExtraError(ImportError):
    """An optional part is not installed; the message is the one line that fixes it (``qzoom`` prints only it)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name (llamafactory.cli) whose parent package is missing
        return False


def require_extra(extra: str, purpose: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError naming ``pip install 'qzoom_swift[extra]'`` when a module of ``extra`` is missing."""
    missing = [m for m in (modules or EXTRAS[extra]) if not _installed(m)]
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}: pip install 'qzoom_swift[{extra}]'")
