"""The LLaMA-Factory wing's tests, run in its own environment (.venv-lf; ``make test`` builds it).

LLaMA-Factory 0.9.5 caps transformers at 5.6.0 and datasets at 4.0.0, where ms-swift 4.6 does not import, so
its tests (tests/llamafactory/) cannot run in the main .venv: this test starts them there and fails on any
failure, error or skip. It also checks the environment itself: pip check clean, LLaMA-Factory 0.9.5, no
ms-swift (so the core is proven to stand without it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qzoom_swift.testing.side_env import REPO, defined_tests, run_pytest, run_side, side_python

TESTS = REPO / "tests" / "llamafactory"


@pytest.fixture(scope="module")
def lf_python() -> Path:
    return side_python(".venv-lf", "venv-lf")


def test_the_llamafactory_environment_is_consistent_and_has_no_ms_swift(lf_python):
    check = run_side([lf_python, "-m", "pip", "check"])
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr
    version = run_side([lf_python.parent / "llamafactory-cli", "version"])
    assert version.returncode == 0 and "version 0.9.5" in version.stdout, version.stdout + version.stderr
    probe = run_side([lf_python, "-c", "import importlib.util, transformers, qzoom_swift; "
                      "print(importlib.util.find_spec('swift') is None, transformers.__version__, qzoom_swift.__file__)"])
    absent, tf_version, module = probe.stdout.split()
    assert absent == "True" and tf_version == "5.6.0", probe.stdout + probe.stderr
    assert Path(module).resolve().parent == REPO / "qzoom_swift"  # the checkout, installed editable


@pytest.mark.slow
def test_llamafactory_tests_pass_in_their_environment(lf_python, tmp_path):
    counts, seconds, tail = run_pytest(lf_python, [TESTS], tmp_path / "junit.xml")
    print(f"tests/llamafactory in .venv-lf: {counts} in {seconds:.0f} s")  # -rA shows it
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, tail)
    assert counts["tests"] >= defined_tests(TESTS) > 0, counts
