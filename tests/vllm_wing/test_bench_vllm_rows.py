"""The zoom bench's vLLM rows (``bench/vllm_rows.py``) on a small bench and the tiny Qwen2.5-VL: the rows the demo
adds with ``vllm_bin`` answer as its transformers rows do, resume, and plain vLLM is Q-Zoom's ``never``.

One engine for the module (tiny model, fp32, CPU), started by ``vllm_rows.start_engine`` from a saved branch
checkpoint, as the demo's subprocess starts it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import LOW_BUDGET

pytestmark = pytest.mark.slow  # one vLLM engine start (about a minute here)

LOW, HIGH = 16, 64
QUESTIONS = 8


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """A 8-question test split, a branch checkpoint whose tau_gate splits it, the spec and a running engine."""
    from qzoom_swift.bench.dataset import read_split, write_bench
    from qzoom_swift.bench.vllm_rows import VLLMRowsSpec, start_engine, vllm_runs
    from qzoom_swift.branches import mark_trained_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.model import QZoomModel

    tmp = tmp_path_factory.mktemp("bench_vllm")
    root = write_bench(tmp / "bench", {"test": QUESTIONS}, seed=0).parent
    records = read_split(root, "test")
    base = tiny_dir("qwen2_5_vl")
    torch.manual_seed(0)  # the gate head is a fresh Linear: the same draw in every run
    qz = QZoomModel.from_pretrained(base, QZoomConfig(**LOW_BUDGET), dtype="float32", device="cpu")
    mark_trained_branches(qz.model, ["rpn", "gate"])  # as a stage-3 checkpoint records it
    from PIL import Image

    lows = [[qz.adapter.resize_for_budget(Image.open(r.image).convert("RGB"), LOW, LOW)] for r in records]
    probs = sorted(float(p) for p in torch.sigmoid(qz.prefill(**chat_inputs(
        qz.processor, lows, [r.question for r in records])).gate_logit).tolist())
    half = len(probs) // 2
    assert probs[half] - probs[half - 1] > 1e-5, probs  # a threshold between them zooms half the questions
    qz.config.tau_gate = (probs[half - 1] + probs[half]) / 2
    ckpt = qz.save_branches(tmp / "branches")
    runs = vllm_runs(LOW, HIGH, "peak", HIGH)
    spec = VLLMRowsSpec(str(base), str(ckpt), str(root), str(tmp / "vllm"), [asdict(r) for r in runs], runs[-1].name,
                        low_tokens=LOW, max_model_len=1024)
    engine = start_engine(spec)
    yield spec, engine, records
    engine.shutdown()
    from multiprocessing import resource_tracker  # see conftest.engines

    resource_tracker._resource_tracker._stop()


def test_rows_answer_as_the_transformers_rows_and_resume(setup, tmp_path):
    from qzoom_swift.bench.evaluate import answer_all
    from qzoom_swift.bench.vllm_rows import ANSWERS_FILE, METRICS_FILE, compare, run_spec, transformers_name
    from qzoom_swift.model import QZoomModel

    spec, engine, records = setup
    metrics = run_spec(spec, engine=engine, progress=False)
    runs = spec.eval_runs()
    assert list(metrics["runs"]) == ["qzoom (vLLM)", f"baseline@{LOW} (vLLM)", f"baseline@{HIGH} (vLLM)"]
    for m in metrics["runs"].values():
        assert m["samples"] == QUESTIONS and 0.0 <= m["accuracy"] <= 1.0 and m["errors"] == 0
        assert m["samples_per_s"] > 0 and m["accuracy_fine"] is not None
    q = metrics["runs"]["qzoom (vLLM)"]
    assert 0 < q["zoom_rate"] < 1 and 0 < q["router_share"] < 1, q  # gated: some zoomed, the router timed apart
    assert metrics["runs"][f"baseline@{HIGH} (vLLM)"]["mean_visual_tokens"] == HIGH
    assert json.loads((Path(spec.out) / METRICS_FILE).read_text())["runs"].keys() == metrics["runs"].keys()

    # the demo's transformers rows (evaluate.answer_all: batch 1, QZoomModel.generate) with the same checkpoint
    qz = QZoomModel.from_pretrained(spec.model_dir, checkpoint=spec.checkpoint, dtype="float32", device="cpu")
    t_runs = [type(r)(**{**asdict(r), "name": transformers_name(r.name)}) for r in runs]
    t_rows = answer_all(qz, records, t_runs, tmp_path / "answers.jsonl", progress=False)
    answers = Path(spec.out) / ANSWERS_FILE
    v_rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert all(r["new_tokens"] > 0 for r in v_rows)  # real answers, not empty strings matching empty strings
    cmp = compare(v_rows, metrics, t_rows)
    for name, c in cmp.items():
        print(f"\n{name}: vLLM {c['accuracy_vllm']:.3f} vs transformers {c['accuracy_transformers']:.3f}, "
              f"same answer {c['same_answer']:.2f}, same decision {c['same_decision']:.2f}")
        assert c["questions"] == QUESTIONS and c["same_answer"] == 1.0 and c["same_decision"] == 1.0, (name, c)
        assert c["difference_points"] == 0.0 and not c["flag"]
    by_id = {(r["run"], r["id"]): json.loads(json.dumps(r)) for r in t_rows}  # as on disk: boxes as lists
    for r in v_rows:
        if r["run"] == "qzoom (vLLM)":
            t = by_id[("qzoom", r["id"])]
            assert (r["reason"], r["grid_box"], r["visual_tokens"]) == (t["reason"], t["grid_box"], t["visual_tokens"])

    # a rerun answers nothing again; a torn last line (a kill mid-write) is cut off and that answer redone
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    again = run_spec(spec, engine=engine, progress=False)
    assert answers.read_text().splitlines()[:-1] == lines[:-1] and len(answers.read_text().splitlines()) == len(lines)
    assert {k: v["accuracy"] for k, v in again["runs"].items()} == {k: v["accuracy"] for k, v in metrics["runs"].items()}


def test_plain_rows_are_qzoom_never_on_the_low_prompt(setup):
    from PIL import Image

    from qzoom_swift.bench.vllm_rows import answer_batch

    spec, engine, records = setup
    images = [Image.open(r.image).convert("RGB") for r in records]
    questions = [r.question for r in records]
    plain_run = spec.eval_runs()[1]
    assert plain_run.mode == "never" and plain_run.tokens == LOW
    plain, seconds = answer_batch(engine, images, questions, plain_run, max_new_tokens=6)
    never = engine.generate(images, questions, config_overrides=plain_run.overrides(), max_new_tokens=6)
    assert seconds["router"] == 0.0
    assert [a["token_ids"] for a in plain] == [a.token_ids for a in never]
    assert [a["stats"].visual_tokens for a in plain] == [a.stats.visual_tokens for a in never] == [LOW] * QUESTIONS
