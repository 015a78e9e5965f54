"""The LLaMA-Factory wing's tests, run in its own environment (.venv-lf; ``make test`` builds it).

LLaMA-Factory 0.9.5 caps transformers at 5.6.0 and datasets at 4.0.0, where ms-swift 4.6 does not import, so
its tests (tests/llamafactory/) cannot run in the main .venv: this test starts them there and fails on any
failure, error or skip. It also checks the environment itself: pip check clean, LLaMA-Factory 0.9.5, no
ms-swift (so the core is proven to stand without it).
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LF_BIN = REPO / ".venv-lf" / "bin"
TESTS = REPO / "tests" / "llamafactory"


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.fixture(scope="module")
def lf_python() -> Path:
    python = LF_BIN / "python"
    if not python.is_file():
        pytest.fail(f"{python} is missing: run `make venv-lf` (make test builds it)")
    return python


def test_the_llamafactory_environment_is_consistent_and_has_no_ms_swift(lf_python):
    check = _run([lf_python, "-m", "pip", "check"])
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr
    version = _run([LF_BIN / "llamafactory-cli", "version"])
    assert version.returncode == 0 and "version 0.9.5" in version.stdout, version.stdout + version.stderr
    probe = _run([lf_python, "-c", "import importlib.util, transformers, qzoom_swift; "
                  "print(importlib.util.find_spec('swift') is None, transformers.__version__, qzoom_swift.__file__)"])
    absent, tf_version, module = probe.stdout.split()
    assert absent == "True" and tf_version == "5.6.0", probe.stdout + probe.stderr
    assert Path(module).resolve().parent == REPO / "qzoom_swift"  # the checkout, installed editable


@pytest.mark.slow
def test_llamafactory_tests_pass_in_their_environment(lf_python, tmp_path):
    junit = tmp_path / "junit.xml"
    run = _run([lf_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS, f"--junitxml={junit}"],
               timeout=3000)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    print(f"tests/llamafactory in .venv-lf: {counts} in {float(suite.get('time')):.0f} s")  # -rA shows it
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, tail)
    defined = sum(path.read_text().count("\ndef test_") for path in TESTS.glob("test_*.py"))
    assert counts["tests"] >= defined > 0, (counts, defined)
