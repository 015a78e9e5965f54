"""Old import paths of modules that moved: they keep working, with a warning naming the new path.

Scripts written against an earlier layout (``python -m qzoom_swift.eval_command worker SPEC``,
``import qzoom_swift.evalscope_api``) still run; new code should import the new path.
"""

from __future__ import annotations

import importlib
import runpy
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make module ``old`` the module ``new`` (run it as ``__main__`` when ``old`` was started with ``-m``)."""
    as_main = old == "__main__"
    if as_main:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        old = spec.name if spec is not None else old
    warnings.warn(f"{old} moved to {new}; import {new} instead", DeprecationWarning, stacklevel=3)
    if as_main:
        runpy.run_module(new, run_name="__main__", alter_sys=True)
        return
    sys.modules[old] = importlib.import_module(new)
