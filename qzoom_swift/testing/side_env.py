"""Running a test folder in another environment (.venv-tf56, .venv-lf, .venv-vllm) from the main suite.

Those environments hold stacks that cannot share one with the main .venv (transformers 5.6, LLaMA-Factory,
vLLM's torch); ``make test`` builds them, and one main-suite test per environment runs its tests there and fails
on any failure, error or skip, so CI runs them instead of skipping them.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def side_python(venv: str, make_target: str) -> Path:
    """The interpreter of ``venv``; a missing one names the make target that builds it."""
    python = REPO / venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"{python} is missing: run `make {make_target}` (make test builds it)")
    return python


def run_side(cmd: list, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})


def run_pytest(python: Path, args: list, junit: Path, timeout: float = 3000) -> tuple[dict[str, int], float, str]:
    """Run pytest under ``python``; (counts of tests/failures/errors/skipped, seconds, output tail).

    Raises AssertionError with the output tail when pytest exits non-zero.
    """
    run = run_side([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, f"--junitxml={junit}"],
                   timeout=timeout)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    return counts, float(suite.get("time")), tail


def defined_tests(folder: Path) -> int:
    """Test functions defined at module level in ``folder``'s test files (a lower bound of what must run)."""
    return sum(path.read_text().count("\ndef test_") for path in folder.glob("test_*.py"))
