"""Zoom inference through the real `swift infer` and `swift deploy` CLIs, and the plain Python API."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from qzoom_swift.bench.sft import run_swift_concurrently
from qzoom_swift.swift_plugin import MODEL_TYPES, plugin_path
from qzoom_swift.testing.serving import post_json, start_swift_deploy, stop_process_tree, wait_for_models

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")


@pytest.fixture(scope="module")
def zoom_infer_runs(tiny_dir, shape_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("zoom_infer")
    commands = {}
    for family, model_type in MODEL_TYPES.items():
        commands[family] = [
            "infer", "--external_plugins", plugin_path(), "--model", str(tiny_dir(family)), "--model_type", model_type,
            "--val_dataset", str(shape_dataset), "--max_new_tokens", "3", "--max_batch_size", "2",
            "--temperature", "0", "--result_path", str(work / f"{family}.jsonl"),
            "--model_kwargs", json.dumps({"QZOOM_MODE": "always", "QZOOM_ROI_MIN_TOKENS": 16,
                                          "QZOOM_ROI_MAX_TOKENS": 64}),
        ]
    runs = run_swift_concurrently(commands, work)
    return {family: (runs[family], work / f"{family}.jsonl") for family in MODEL_TYPES}


@pytest.mark.parametrize("family", list(MODEL_TYPES))
def test_swift_infer_runs_zoom(zoom_infer_runs, shape_dataset, family):
    run, result = zoom_infer_runs[family]
    assert run.returncode == 0, run.tail()
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    assert len(rows) == len(shape_dataset.read_text().splitlines())
    assert all(isinstance(r["response"], str) for r in rows)
    decisions = [line.split("qzoom: ", 1)[1] for line in run.log.read_text().splitlines() if "qzoom: " in line]
    samples = [d for line in decisions for d in line.split("; ")]
    assert len(samples) == len(rows)
    # mode=always: every sample zooms unless no region survives (then it says so)
    assert all(s.startswith("zoom(forced)") or s.startswith("direct(no_roi)") for s in samples), samples
    assert any(s.startswith("zoom(forced)") for s in samples)
    roi_tokens = [int(s.rsplit("+", 1)[1]) for s in samples if s.startswith("zoom")]
    if family == "llava":  # CLIP encodes every image, crops too, at its fixed 16x16 grid
        assert roi_tokens == [256] * len(roi_tokens)
    else:
        assert all(4 <= n <= 64 for n in roi_tokens), roi_tokens


def test_swift_deploy_answers_an_image_request_with_zoom(tiny_dir, tmp_path):
    proc, base, log = start_swift_deploy(tiny_dir("qwen2_5_vl"), tmp_path, {"QZOOM_MODE": "always"},
                                         "--max_new_tokens", "3")
    try:
        name = wait_for_models(base, proc, timeout=240)
        assert name is not None, log.read_text()[-3000:]
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (30, 160, 60)).save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        reply = post_json(f"{base}/v1/chat/completions", {
            "model": name, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "What colour is it?"}]}]})
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert reply["usage"]["completion_tokens"] >= 1
        time.sleep(0.5)
        assert "qzoom: zoom(forced)" in log.read_text() or "qzoom: direct(no_roi)" in log.read_text()
    finally:
        stop_process_tree(proc)


def test_python_api_generate_returns_answers_and_stats(tiny_dir):
    from qzoom_swift import QZoomModel

    qz = QZoomModel.from_pretrained(tiny_dir("qwen3_vl"), config_overrides={"roi_min_tokens": 16,
                                                                          "roi_max_tokens": 64})
    images = [Image.new("RGB", (500, 300), (200, 40, 40)), Image.new("RGB", (300, 500), (40, 40, 200))]
    answers = qz.generate([[images[0]], [images[1]]], ["Colour?", "Which colour is the picture?"], max_new_tokens=2,
                          config_overrides={"mode": "always"})
    assert len(answers) == 2 and all(isinstance(a.text, str) for a in answers)
    for a in answers:
        assert a.stats.reason in ("forced", "no_roi")
        assert a.stats.visual_tokens_low >= 256  # low budget: at least low_min_tokens
    never = qz.generate([images[0]], "Colour?", max_new_tokens=2, config_overrides={"mode": "never"})
    assert never[0].stats.reason == "never" and never[0].stats.visual_tokens_roi == 0
