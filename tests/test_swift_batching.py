"""`swift infer --max_batch_size N` and `swift deploy` under concurrent requests take the batched Q-Zoom path.

ms-swift's transformers engine hands the template one batch per ``generate`` call: ``swift infer`` cuts the
dataset into slices of ``--max_batch_size``, ``swift deploy`` groups the requests queued while the engine was
busy (same request settings, up to ``--max_batch_size``). The plugin's ``generate`` makes one
``zoom_generate`` call per batch and logs one ``qzoom:`` line per call with one ``; ``-separated entry per
sample, so the line's entry count is the batch size that reached ``zoom_generate``. The answers must not
depend on how requests were batched.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from qzoom_swift.bench.sft import run_swift_concurrently
from qzoom_swift.swift_plugin import MODEL_TYPES, plugin_path
from qzoom_swift.testing.serving import post_json, start_swift_deploy, stop_process_tree, wait_for_models

pytestmark = pytest.mark.slow  # runs the swift CLI: not in the quick loop (-m "not slow")

ZOOM_KWARGS = {"QZOOM_MODE": "always", "QZOOM_ROI_MIN_TOKENS": 16, "QZOOM_ROI_MAX_TOKENS": 64}
"""Zoom every image sample (fresh branches would fall back to mode never) at a small crop budget."""


def qzoom_batches(log: Path) -> list[list[str]]:
    """The per-sample decisions of every ``zoom_generate`` call in a swift log, one list per call."""
    lines = [line.split("qzoom: ", 1)[1] for line in log.read_text(errors="replace").splitlines() if "qzoom: " in line]
    return [line.split("; ") for line in lines]


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> Path:
    """7 rows: images of three sizes (so batches are padded), one text-only row, two question wordings."""
    from qzoom_swift.synthetic.images import write_shape_dataset

    root = tmp_path_factory.mktemp("batch_data")
    rows = []
    for k, size in enumerate([(392, 280), (280, 420), (448, 336)]):
        path = write_shape_dataset(root / f"s{k}", n=2, size=size, seed=10 + k)
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    rows[3]["messages"][0]["content"] = "<image>Name the colour of the shape in the picture, please."
    rows.insert(2, {"messages": [{"role": "user", "content": "Say a colour."},
                                 {"role": "assistant", "content": "red"}]})
    out = root / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def batch_runs(tiny_dir, mixed_dataset, tmp_path_factory):
    """``swift infer`` per family at --max_batch_size 1 and 4, all at once."""
    work = tmp_path_factory.mktemp("batch_infer")
    commands = {}
    for family, model_type in MODEL_TYPES.items():
        for size in (1, 4):
            commands[f"{family}-bs{size}"] = [
                "infer", "--external_plugins", plugin_path(), "--model", str(tiny_dir(family)), "--model_type",
                model_type, "--val_dataset", str(mixed_dataset), "--max_new_tokens", "4", "--temperature", "0",
                "--max_batch_size", str(size), "--result_path", str(work / f"{family}-bs{size}.jsonl"),
                "--model_kwargs", json.dumps(ZOOM_KWARGS)]
    return work, run_swift_concurrently(commands, work)


@pytest.mark.parametrize("family", list(MODEL_TYPES))
def test_swift_infer_max_batch_size_4_answers_as_batch_size_1(batch_runs, mixed_dataset, family):
    work, runs = batch_runs
    answers, batches = {}, {}
    for size in (1, 4):
        run = runs[f"{family}-bs{size}"]
        assert run.returncode == 0, run.tail()
        rows = [json.loads(line) for line in (work / f"{family}-bs{size}.jsonl").read_text().splitlines()]
        answers[size] = [r["response"] for r in rows]
        batches[size] = qzoom_batches(run.log)
    n = len(mixed_dataset.read_text().splitlines())
    assert [len(b) for b in batches[1]] == [1] * n  # one zoom_generate call per sample
    assert [len(b) for b in batches[4]] == [4, n - 4]  # one zoom_generate call per batch of the engine
    assert [d.split(" ")[0] for b in batches[4] for d in b] == [d.split(" ")[0] for b in batches[1] for d in b]
    assert any(d.startswith("zoom(") for b in batches[4] for d in b), batches[4]
    assert any(d.startswith("direct(no_image") for b in batches[4] for d in b), batches[4]
    assert answers[4] == answers[1]


def _image_uri(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    image = Image.new("RGB", size, (235, 235, 235))
    w, h = size
    image.paste(Image.new("RGB", (w // 3, h // 3), colour), (w // 4, h // 3))
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


REQUESTS = [((320, 240), (200, 30, 30), "What colour is it?"),
            ((240, 360), (30, 160, 60), "Which colour is the shape?"),
            ((400, 300), (40, 40, 200), "What colour is it?"),
            ((300, 300), (220, 200, 20), "Name the colour of the shape.")]


def _chat(base: str, name: str, request) -> str:
    size, colour, question = request
    payload = {"model": name, "max_tokens": 4, "temperature": 0,
               "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_uri(size, colour)}},
                                                         {"type": "text", "text": question}]}]}
    return post_json(f"{base}/v1/chat/completions", payload, timeout=180)["choices"][0]["message"]["content"]


def test_swift_deploy_batches_concurrent_requests_with_the_answers_of_sequential_ones(tiny_dir, tmp_path):
    proc, base, log = start_swift_deploy(tiny_dir("qwen2_5_vl"), tmp_path, ZOOM_KWARGS, "--max_batch_size", "4")
    try:
        name = wait_for_models(base, proc)
        assert name, f"swift deploy did not come up:\n{log.read_text(errors='replace')[-3000:]}"
        sequential = [_chat(base, name, r) for r in REQUESTS]
        assert [len(b) for b in qzoom_batches(log)] == [1] * len(REQUESTS)
        for _ in range(3):  # requests queued while the engine is busy form one batch; retry if all came apart
            n_calls = len(qzoom_batches(log))
            with ThreadPoolExecutor(len(REQUESTS)) as pool:
                concurrent = list(pool.map(lambda r: _chat(base, name, r), REQUESTS))
            assert concurrent == sequential
            time.sleep(0.5)
            sizes = [len(b) for b in qzoom_batches(log)[n_calls:]]
            assert sum(sizes) == len(REQUESTS)
            if max(sizes) > 1:
                break
        assert max(sizes) > 1, f"every concurrent request reached zoom_generate alone: {sizes}"
    finally:
        stop_process_tree(proc)
