"""``swift deploy`` and ``swift infer`` with ``--infer_backend vllm`` and the ``qzoom_qwen2_5_vl`` template, the real
CLI on the tiny model: the front router decides in the template, vLLM answers. 8 concurrent OpenAI-style requests
give the sequential answers, which are ``QZoomModel.generate``'s (the transformers path) for the same settings;
the server logs the decisions, and they are the ones the transformers path takes."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import LOW_BUDGET

from qzoom_swift.synthetic.images import rectangles_image

pytestmark = pytest.mark.slow
FAMILY, MODEL_TYPE = "qwen2_5_vl", "qzoom_qwen2_5_vl"
MAX_TOKENS = 5
QUESTIONS = ["What is in the small box?", "Which colour is the top rectangle?", "Read the label.",
             "How many rectangles are there?"]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
ENGINE_ARGS = ("--infer_backend", "vllm", "--vllm_enforce_eager", "true", "--torch_dtype", "float32",
               "--vllm_max_model_len", "1024")


def _samples() -> list[tuple[object | None, str]]:
    """Seven images of three sizes and one text-only question."""
    sizes = [(640, 480), (480, 640), (560, 420)]
    images = [rectangles_image(sizes[i % 3], seed=i) for i in range(7)]
    return [(im, QUESTIONS[i % 4]) for i, im in enumerate(images)] + [(None, "Say hello.")]


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()


def _content(image, question: str) -> list | str:
    if image is None:
        return question
    return [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": question}]


def _decisions(text: str) -> list[tuple[str, float | None, str]]:
    """(decision(reason), gate probability, box) per ``qzoom:`` log line of the server (one line per request)."""
    out = []
    for m in re.finditer(r"qzoom: ((?:zoom|direct)\([^)]*\)) p=(\S+)(?: (box=\[[^]]*\]/\[[^]]*\]))? read=", text):
        out.append((m.group(1), None if m.group(2) == "None" else float(m.group(2)), m.group(3) or ""))
    return out


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    """The tiny model, a branch checkpoint, the settings that split the images between zoom and direct answers
    (from the transformers path's own gate probabilities), and that path's answers and decisions."""
    import torch

    from qzoom_swift.model import QZoomModel
    from qzoom_swift.roi import heatmap_probabilities
    from qzoom_swift.testing.soak import write_checkpoint

    work = tmp_path_factory.mktemp("swift_vllm")
    model_dir = tiny_dir(FAMILY)
    checkpoint = write_checkpoint(model_dir, work / "branches")
    samples = _samples()
    knobs = {"mode": "zoom", **LOW_BUDGET}
    qz = QZoomModel.from_pretrained(model_dir, checkpoint=checkpoint, dtype="float32", device="cpu",
                                    config_overrides=knobs)
    images = [[] if im is None else [im] for im, _ in samples]
    questions = [q for _, q in samples]
    first = qz.generate(images, questions, config_overrides={"tau_gate": 0.0, "tau_roi": 0.0}, max_new_tokens=1)
    probs = sorted(a.stats.gate_prob for a in first if a.stats.gate_prob is not None)
    tau_gate = (probs[2] + probs[3]) / 2  # 3 images below the gate, 4 above
    low = qz.adapter.resize_for_budget(samples[0][0], LOW_BUDGET["low_min_tokens"], LOW_BUDGET["low_max_tokens"])
    from qzoom_swift.inputs import chat_inputs

    with torch.no_grad():
        heat = heatmap_probabilities(qz.prefill(**chat_inputs(qz.processor, [low], questions[0])).heatmaps()[-1])
    tau_roi = float(heat.flatten().kthvalue(int(heat.numel() * 0.9)).values)  # a real sub-region, not the image
    knobs.update(tau_gate=tau_gate, tau_roi=tau_roi)
    want = qz.generate(images, questions, config_overrides=knobs, max_new_tokens=MAX_TOKENS)
    model_kwargs = {f"QZOOM_{k.upper()}": v for k, v in knobs.items()}
    return {"work": work, "model": model_dir, "checkpoint": checkpoint, "samples": samples, "want": want,
            "model_kwargs": model_kwargs}


def test_swift_deploy_vllm_answers_concurrent_requests_as_sequential_ones_and_as_transformers(served):
    from qzoom_swift.testing.serving import (
        answer_text,
        chat_status,
        start_swift_deploy,
        stop_process_tree,
        wait_for_models,
    )

    proc, base, log = start_swift_deploy(served["model"], served["work"], served["model_kwargs"], "--adapters",
                                         str(served["checkpoint"]), *ENGINE_ARGS, model_type=MODEL_TYPE,
                                         env_extra=ENGINE_ENV)
    try:
        name = wait_for_models(base, proc, timeout=600)
        assert name is not None, log.read_text(errors="replace")[-4000:]
        requests = [_content(im, q) for im, q in served["samples"]]
        sequential = [chat_status(base, name, c, max_tokens=MAX_TOKENS) for c in requests]
        seq_log = _decisions(log.read_text(errors="replace"))
        # the same 8 at once, with an unreadable image and a prompt longer than the engine takes among them
        image = served["samples"][0][0]
        truncated = "data:image/png;base64," + base64.b64encode(_png_bytes(image)[:2000]).decode()
        bad = [[{"type": "image_url", "image_url": {"url": truncated}}, {"type": "text", "text": "What is it?"}],
               [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                {"type": "text", "text": "word " * 1500}]]
        with ThreadPoolExecutor(len(requests) + 2) as pool:
            answered = list(pool.map(lambda c: chat_status(base, name, c, max_tokens=MAX_TOKENS), requests + bad))
        concurrent, (unreadable, too_long) = answered[:8], answered[8:]
    finally:
        stop_process_tree(proc)
    text = log.read_text(errors="replace")
    assert unreadable[0] == 400 and "messages[0].content[0]" in json.dumps(unreadable[1]), unreadable
    assert too_long[0] == 400 and "max_model_len=1024" in json.dumps(too_long[1]), too_long
    assert all(status == 200 for status, _ in sequential + concurrent), [b for s, b in sequential + concurrent
                                                                          if s != 200]
    seq_answers = [answer_text(b) for _, b in sequential]
    assert [answer_text(b) for _, b in concurrent] == seq_answers
    want = served["want"]
    assert seq_answers == [a.text for a in want]
    # the decisions: one line per request, in order for the sequential ones, equal to the transformers path's
    assert len(seq_log) == 8 and len(_decisions(text)) == 16  # the two bad requests were never decided
    want_decisions = [f"{'zoom' if a.stats.zoomed else 'direct'}({a.stats.reason})" for a in want]
    assert [d for d, _, _ in seq_log] == want_decisions
    assert {"zoom(gate)", "direct(below_gate)", "direct(no_roi)", "direct(no_image)"} <= set(want_decisions)
    for (_, p, box), a in zip(seq_log, want):
        assert (p is None) == (a.stats.gate_prob is None)
        assert p is None or abs(p - a.stats.gate_prob) <= 2e-3  # the log rounds to 3 places
        assert box == ("" if a.stats.grid_box is None else f"box={list(a.stats.grid_box)}/{list(a.stats.grid)}")
    assert any(a.stats.zoomed and a.stats.grid_box != (0, 0, a.stats.grid[1], a.stats.grid[0]) for a in want)
    # usage counts what vLLM read: the crop's tokens too
    for (_, body), a in zip(sequential, want):
        assert body["usage"]["prompt_tokens"] == a.stats.prompt_tokens


def test_swift_infer_vllm_writes_the_transformers_answers(served):
    """``swift infer`` (ms-swift's synchronous vLLM engine, its thread-pool encoding) over a dataset file."""
    from qzoom_swift.bench.sft import run_swift_concurrently
    from qzoom_swift.swift_plugin import plugin_path

    work = served["work"] / "infer"
    work.mkdir()
    rows = []
    for i, (im, q) in enumerate(served["samples"]):
        row = {"messages": [{"role": "user", "content": q if im is None else f"<image>{q}"}]}
        if im is not None:
            path = work / f"{i}.png"
            im.save(path)
            row["images"] = [str(path)]
        rows.append(row)
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = work / "result.jsonl"
    command = ["infer", "--external_plugins", plugin_path(), "--model", str(served["model"]),
                     "--model_type", MODEL_TYPE, "--adapters", str(served["checkpoint"]), *ENGINE_ARGS,
                     "--val_dataset", str(work / "data.jsonl"), "--result_path", str(result),
                     "--max_new_tokens", str(MAX_TOKENS), "--temperature", "0",
                     "--model_kwargs", json.dumps(served["model_kwargs"])]
    run = run_swift_concurrently({"infer": command}, work, env=ENGINE_ENV)["infer"]
    log = run.log.read_text(errors="replace")
    assert run.returncode == 0, log[-4000:]
    answers = [json.loads(line)["response"] for line in result.read_text().splitlines()]
    assert answers == [a.text for a in served["want"]]
    assert len(_decisions(log)) == 8
