"""Optional dependencies: checked where a command starts, with an error that names the extra to install.

The core plugin needs only the ms-swift stack; ONNX export and the onnxruntime router need the ``onnx``
extra, ``qzoom eval`` the ``eval`` extra. Without this a user meets a bare ``ModuleNotFoundError`` deep in
a job (or in a worker's log) instead of the one line that fixes it.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "eval": ("evalscope",),
}
"""extra -> the modules it brings (setup.cfg's ``extras_require`` installs them)."""


def require_extra(extra: str, purpose: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise ImportError naming ``pip install 'qzoom_swift[extra]'`` when a module of ``extra`` is missing."""
    missing = [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{purpose} needs {', '.join(missing)}: pip install 'qzoom_swift[{extra}]'")
