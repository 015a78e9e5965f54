"""Old import paths that users may have in scripts keep working after the layout change, and name the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

MOVED = {
    "qzoom_swift.eval_command": "qzoom_swift.eval.command",
    "qzoom_swift.eval_report": "qzoom_swift.eval.report",
    "qzoom_swift.eval_suite": "qzoom_swift.eval.suite",
    "qzoom_swift.evalscope_api": "qzoom_swift.eval.model_api",
    "qzoom_swift.evalscope_benchmarks": "qzoom_swift.eval.benchmarks",
    "qzoom_swift.demo": "qzoom_swift.bench.demo",
}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_module_is_the_new_one_and_warns(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_old_worker_entry_still_runs_as_a_module():
    """``python -m qzoom_swift.eval_command worker SPEC`` (written by older `qzoom eval` runs) reaches the new main."""
    proc = subprocess.run([sys.executable, "-W", "always", "-m", "qzoom_swift.eval_command"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "usage: python -m qzoom_swift.eval.command worker SPEC.json" in proc.stderr
    assert "qzoom_swift.eval_command moved to qzoom_swift.eval.command" in proc.stderr
