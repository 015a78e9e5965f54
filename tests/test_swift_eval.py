"""`swift eval` with the plugin: ms-swift deploys the Q-Zoom model in a spawned process, evalscope queries it.

Two ms-swift 4.6 / evalscope 1.14 mismatches stop `swift eval` before the plugin matters, for every model:
``EvalArguments`` lists OpenCompass datasets even for the Native backend (needs ``ms-opencompass``, from
``ms-swift[eval]``), and the eval pipeline uses ``EvalType.SERVICE``, which evalscope 1.14 calls
``OPENAI_API``. The plugin refuses the second with the routes that work (``test_swift_backends``); this test
bridges both in a launcher script to show that everything of the plugin under `swift eval` works: the
spawned deploy process unpickles the Q-Zoom model meta, imports the plugin, and zooms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qzoom_swift.swift_plugin import plugin_path
from qzoom_swift.testing.serving import free_port

pytestmark = pytest.mark.slow  # runs swift eval (deploy + evalscope): not in the quick loop (-m "not slow")

LAUNCHER = '''
import sys

from evalscope.constants import EvalType
from swift.arguments import EvalArguments


def list_eval_dataset(eval_backend=None):  # the Native list only: ms-opencompass is not installed
    from evalscope.api.registry import BENCHMARK_REGISTRY
    return {"Native": sorted(BENCHMARK_REGISTRY.keys())}


EvalArguments.list_eval_dataset = staticmethod(list_eval_dataset)
EvalType.SERVICE = EvalType.OPENAI_API  # evalscope 1.14's name for it
if __name__ == "__main__":
    from swift.pipelines import eval_main
    eval_main(sys.argv[1:])
'''


def test_swift_eval_runs_a_local_benchmark_on_the_qzoom_model(tiny_dir, tmp_path):
    from qzoom_swift.testing.eval_data import write_eval_datasets

    folder = write_eval_datasets(tmp_path / "data", ["docvqa"], n=2)["docvqa"]
    launcher = tmp_path / "swift_eval.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "eval_output"
    cmd = [sys.executable, str(launcher), "--external_plugins", plugin_path(), "--model", str(tiny_dir("qwen2_5_vl")),
           "--model_type", "qzoom_qwen2_5_vl", "--eval_dataset", "docvqa",
           "--eval_dataset_args", json.dumps({"docvqa": {"dataset_id": str(folder)}}), "--eval_limit", "2",
           "--eval_num_proc", "2", "--eval_output_dir", str(out), "--port", str(free_port()),
           "--max_new_tokens", "4", "--max_batch_size", "2", "--eval_generation_config", json.dumps({"max_tokens": 4}),
           "--model_kwargs", json.dumps({"QZOOM_MODE": "always", "QZOOM_ROI_MIN_TOKENS": 16,
                                         "QZOOM_ROI_MAX_TOKENS": 64})]
    env = dict(os.environ, MODELSCOPE_CACHE=str(tmp_path / "ms"), EVALSCOPE_CACHE=str(tmp_path / "evalscope"),
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    log = tmp_path / "eval.log"
    with open(log, "wb") as f:  # swift eval polls the port forever if its deploy process dies: bound it
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=420)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    reports = list(out.glob("native/*/reports/*/docvqa.json"))
    assert len(reports) == 1, text[-2000:]
    assert json.loads(reports[0].read_text())["metrics"][0]["num"] == 2
    samples = [d for line in text.splitlines() if "qzoom: " in line for d in line.split("qzoom: ", 1)[1].split("; ")]
    assert len(samples) == 2 and all(s.startswith(("zoom(forced)", "direct(no_roi)")) for s in samples), samples
