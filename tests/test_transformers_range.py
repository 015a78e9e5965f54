"""The core test files again under transformers 5.6.0, the oldest release the core supports.

The main .venv has transformers 5.19. ``.venv-tf56`` (``make venv-tf56``; ``make test`` builds it) is the same
environment with ``requirements-tf56.txt`` installed over it, so every difference between the two runs is
the transformers release (and the tokenizers it requires). The differences the families see are handled in
``qzoom_swift/families/compat.py``; this test is what keeps that module honest. Tests that run the ``swift``
CLI are left out: ms-swift is checked on 5.18-5.19 only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qzoom_swift.testing.side_env import REPO, run_pytest, run_side, side_python

CORE_FILES = (
    "tests/test_zoom.py", "tests/test_tiny_models.py", "tests/test_gate_tail.py", "tests/test_branches.py",
    "tests/test_post_sft.py", "tests/test_fidelity.py", "tests/test_onnx.py", "tests/test_compat.py",
)
# the tests of those files that launch the swift CLI (swift sft / swift infer)
SWIFT_CLI_TESTS = (
    "test_stage2_deepspeed_sft_saves_a_checkpoint_that_swift_infer_loads",
    "test_swift_sft_trains_the_gate_on_trajectory_records",
    "test_swift_infer_with_the_onnx_router_answers_like_torch",
)
SELECTION = ["-k", " and ".join(f"not {name}" for name in SWIFT_CLI_TESTS)]


def _pinned_transformers() -> str:
    for line in (REPO / "requirements-tf56.txt").read_text().splitlines():
        if line.startswith("transformers=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("requirements-tf56.txt pins no transformers==...")


def _collected(python: Path) -> int:
    """How many tests the selection collects under ``python``."""
    out = subprocess.run([str(python), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *CORE_FILES, *SELECTION], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sum(1 for line in out.stdout.splitlines() if "::" in line)


@pytest.mark.slow
def test_core_files_pass_under_the_oldest_supported_transformers(tmp_path):
    python = side_python(".venv-tf56", "venv-tf56")
    version = run_side([python, "-c", "import transformers; print(transformers.__version__)"], timeout=300)
    assert version.stdout.strip() == _pinned_transformers(), version.stdout + version.stderr

    counts, seconds, tail = run_pytest(python, [*CORE_FILES, *SELECTION], tmp_path / "junit.xml")
    print(f"transformers {_pinned_transformers()}: {counts} in {seconds:.0f} s")  # -rA shows it
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, tail)
    # every selected test ran there: as many as the main environment collects
    assert counts["tests"] == _collected(Path(sys.executable)) > 100, (counts, tail)
