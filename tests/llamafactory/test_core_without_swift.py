"""The core stands without ms-swift: run in .venv-lf (LLaMA-Factory 0.9.5, transformers 5.6.0, no ms-swift).

Imports every module outside the ms-swift wing, answers with a zoom through ``QZoomModel``, labels a local
jsonl with ``qzoom pseudo-labels``, and checks that commands needing ms-swift say which extra to install.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

import qzoom_swift

QZOOM = Path(sys.executable).parent / "qzoom"


def test_this_environment_has_no_ms_swift_and_the_oldest_supported_transformers():
    assert importlib.util.find_spec("swift") is None
    assert transformers.__version__ == "5.6.0"


def test_every_module_outside_the_swift_wing_imports():
    names = [m.name for m in pkgutil.walk_packages(qzoom_swift.__path__, "qzoom_swift.")
             if not m.name.startswith("qzoom_swift.swift_plugin.")]
    assert len(names) > 60
    from qzoom_swift.extras import EXTRAS

    optional = {m for extra in ("eval", "onnx", "vllm") for m in EXTRAS[extra]}  # not installed here
    needing_extras = []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            assert exc.name.split(".")[0] in optional, f"{name}: {exc}"
            needing_extras.append(name)
    assert len(needing_extras) < 6, needing_extras  # only the evalscope, onnx and vLLM glue itself


@pytest.mark.parametrize("mode", ["never", "always"])
def test_qzoom_model_answers_with_the_zoom(tiny_dir, mode):
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.synthetic.images import make_shape_image, sample_shapes

    qz = QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"))
    image = make_shape_image(sample_shapes(1, seed=3)[0])
    answer = qz.generate(image, "What colour is the shape?", config_overrides={"mode": mode}, max_new_tokens=3)[0]
    assert answer.token_ids is not None and len(answer.token_ids) == 3
    assert answer.stats.zoomed is (mode == "always")
    if mode == "always":
        assert answer.stats.box is not None and answer.stats.visual_tokens_roi > 0


def test_pseudo_labels_on_a_local_jsonl_need_no_trainer(tiny_dir, shape_dataset, tmp_path):
    out = tmp_path / "labels"
    run = subprocess.run([str(QZOOM), "pseudo-labels", "--model", str(tiny_dir("qwen2_5_vl")), "--dataset",
                          str(shape_dataset), "--out", str(out), "--max-new-tokens", "2", "--batch-size", "2",
                          "--calibration", "2", "--no-progress", "--tau-fg", "0.9", "--tau-bg", "0.8",
                          "--max-box-fraction", "0.9", "--min-peak", "1e-3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "shard-00000.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("qzoom_rpn_labels" in r for r in rows)


@pytest.mark.parametrize("argv", [["demo", "--preset", "quick"],
                                  ["pseudo-labels", "--model", "m", "--dataset", "owner/name", "--out", "x"]])
def test_commands_that_need_ms_swift_name_the_extra(argv, tmp_path):
    run = subprocess.run([str(QZOOM), *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
    assert "pip install 'qzoom_swift[swift]'" in run.stderr and "Traceback" not in run.stderr
