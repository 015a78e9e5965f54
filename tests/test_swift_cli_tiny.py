"""The real ``swift infer`` CLI runs each locally built tiny model on a synthetic dataset (CPU, offline).

Each call costs about 20 s, nearly all of it imports and start-up, and uses about one core, so the three
families run as concurrent subprocesses (about 30 s together on 2 cores instead of about 65 s in a row).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qzoom_swift.families.registry import FAMILIES as SPECS
from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")

SWIFT = Path(sys.executable).parent / "swift"
TIMEOUT_S = 600


def swift_infer_cmd(model_dir: Path, model_type: str, dataset: Path, result: Path) -> list[str]:
    # `--check_model` is a training argument: `swift infer` rejects it (ValueError: remaining_argv).
    return [str(SWIFT), "infer", "--model", str(model_dir), "--model_type", model_type, "--template", model_type,
            "--infer_backend", "transformers", "--max_new_tokens", "4", "--temperature", "0",
            "--val_dataset", str(dataset), "--result_path", str(result)]


@pytest.fixture(scope="module")
def swift_runs(tiny_dir, shape_dataset, tmp_path_factory):
    """Start ``swift infer`` for every family at once; return {family: (returncode, seconds, result, log)}."""
    assert SWIFT.is_file(), f"no swift script next to {sys.executable}"
    out = tmp_path_factory.mktemp("swift_infer")
    procs = {}
    for family in FAMILIES:
        model_dir = tiny_dir(family)
        result = out / f"{family}.jsonl"
        log = out / f"{family}.log"
        # One MODELSCOPE_CACHE per process: concurrent runs would share the same dataset cache lock otherwise.
        env = dict(os.environ, MODELSCOPE_CACHE=str(out / f"modelscope-{family}"), OMP_NUM_THREADS="1")
        with open(log, "wb") as log_f:
            proc = subprocess.Popen(swift_infer_cmd(model_dir, SPECS[family].swift_model_type, shape_dataset, result),
                                    cwd=out, env=env, stdout=log_f, stderr=subprocess.STDOUT)
        procs[family] = (proc, time.perf_counter(), result, log)
    runs = {}
    deadline = time.perf_counter() + TIMEOUT_S
    while len(runs) < len(procs):  # poll, so each run gets its own wall time
        for family, (proc, t0, result, log) in procs.items():
            if family not in runs and proc.poll() is not None:
                runs[family] = (proc.returncode, time.perf_counter() - t0, result, log)
        if time.perf_counter() > deadline:
            for family, (proc, t0, result, log) in procs.items():
                if family not in runs:
                    proc.kill()
                    runs[family] = (proc.wait(), time.perf_counter() - t0, result, log)
        time.sleep(0.2)
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_swift_infer(swift_runs, shape_dataset, family, record_property):
    rc, seconds, result, log = swift_runs[family]
    record_property("swift_infer_s", round(seconds, 1))
    print(f"swift infer {family}: rc={rc} {seconds:.1f} s")
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    assert rc == 0, f"swift infer exited {rc}; log tail:\n{tail}"
    assert result.is_file(), f"no result file; log tail:\n{tail}"
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    n_data = sum(1 for line in shape_dataset.read_text().splitlines() if line.strip())
    assert len(rows) == n_data
    for row in rows:
        assert isinstance(row["response"], str)
