"""``qzoom eval --backend vllm`` end to end: the real CLI in this environment on a tiny Qwen2.5-VL with a branch
checkpoint and a tiny local DocVQA, a baseline and a gated zoom run; every answer, decision and box is what
``QZoomModel.generate`` (the transformers path, computed here) gives for the same sample and settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

SAMPLES = 4
MAX_NEW = 4
MARK = "QZE_TEST_MARK"  # in the CLI's environment, so its processes can be found


def _gate_probs(ref, samples) -> list[float]:
    from qzoom_swift.eval.model_api import split_messages

    probs = []
    for sample in samples:
        images, question = split_messages(sample.input)
        [answer] = ref.generate([images], [question], config_overrides={"mode": "zoom", "tau_gate": 0.0,
                                                                         "low_min_tokens": 32, "low_max_tokens": 64},
                                max_new_tokens=1)
        probs.append(float(answer.stats.gate_prob))
    return probs


def _processes_of_run(mark: str, out: Path) -> list[str]:
    """Live processes of one ``qzoom eval``: the marker in their environment, or a file open under ``out`` (vLLM's
    engine processes retitle themselves, which overwrites their environment as /proc shows it; they keep the
    worker's log open)."""
    left = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and (proc.environ().get(MARK) == mark or any(
                    Path(f.path).is_relative_to(out) for f in proc.open_files())):
                left.append(f"{proc.pid} {proc.info['name']}")
        except psutil.Error:  # another user's process, or it ended meanwhile
            continue
    return left


@pytest.fixture(scope="module")
def served_eval(tiny_dir, tmp_path_factory):
    """Runs ``qzoom eval --backend vllm`` once; returns (out, reference model, completed process, seconds)."""
    from qzoom_swift.eval.local_data import load_benchmark_samples
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.testing.eval_data import write_eval_datasets

    root = tmp_path_factory.mktemp("vllm_eval")
    model = tiny_dir("qwen2_5_vl")
    torch.manual_seed(0)
    checkpoint = QZoomModel.from_pretrained(model, dtype="float32", device="cpu").save_branches(root / "checkpoint")
    ref = QZoomModel.from_pretrained(model, checkpoint=checkpoint, dtype="float32", device="cpu")
    write_eval_datasets(root / "data", ["docvqa"], n=SAMPLES)
    samples = load_benchmark_samples("docvqa", root / "data" / "docvqa", root / "hf")
    # a gate threshold in the widest gap between the samples' gate probabilities: some zoom, some do not
    probs = sorted(_gate_probs(ref, samples))
    gap, k = max((probs[i + 1] - probs[i], i) for i in range(len(probs) - 1))
    assert gap > 1e-3, probs
    tau = (probs[k] + probs[k + 1]) / 2
    out, mark = root / "out", uuid.uuid4().hex
    qzoom = Path(sys.executable).parent / "qzoom"  # the console script of this environment (.venv-vllm)
    argv = [str(qzoom), "eval", "--backend", "vllm", "--model", str(model), "--checkpoint", str(checkpoint),
            "--run", "baseline:64", "--run", f"zoom:64:tau_gate={tau:.6f}", "--benchmarks", "docvqa",
            "--data-root", str(root / "data"), "--out", str(out), "--limit", str(SAMPLES),
            "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--dtype", "float32",
            "--eval-batch-size", str(SAMPLES), "--progress-interval", "10",
            "--vllm-arg", "max_model_len=1024", "--vllm-arg", "kv_cache_space_gb=1", "--vllm-arg", "enforce_eager=true",
            "--vllm-arg", "block_size=32", "--vllm-arg", "seed=0"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf"), MARK: mark}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    print(f"qzoom eval --backend vllm (2 runs x {SAMPLES} samples, one engine start each): {seconds:.0f} s")
    logs = "\n".join(p.read_text()[-4000:] for p in out.glob("runs/*/log.txt"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    left = _processes_of_run(mark, out)
    assert not left, f"processes left running after qzoom eval: {left}"  # the engines were shut down
    return out, ref, proc, tau


@pytest.mark.slow
def test_qzoom_eval_on_vllm_answers_as_qzoom_model_generate(served_eval):
    from evalscope.api.evaluator.cache import ModelResult

    from qzoom_swift.eval.model_api import split_messages

    out, ref, proc, _ = served_eval
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["run"], r["mode"]) for r in summary["rows"]] == [("baseline@64", "baseline"), ("zoom@64", "zoom")]
    assert (out / "summary.md").is_file() and (out / "summary.csv").is_file()
    decisions: dict[str, list[bool]] = {}
    batch_sizes: list[int] = []
    for run_dir in sorted((out / "runs").iterdir()):
        stored = json.loads((run_dir / "bench" / "docvqa.json").read_text())
        overrides = stored["settings"]["overrides"]
        assert stored["result"]["samples"] == SAMPLES and not stored["result"].get("failed")
        rows = [json.loads(line) for f in sorted(run_dir.glob("evalscope/docvqa/predictions/*/*.jsonl"))
                for line in f.read_text().splitlines()]
        assert len(rows) == SAMPLES, run_dir
        for row in rows:
            result = ModelResult.model_validate(row)
            meta = row["model_output"]["metadata"]["qzoom"]
            images, question = split_messages(result.messages)
            [expected] = ref.generate([images], [question], config_overrides=overrides, max_new_tokens=MAX_NEW)
            st = expected.stats
            assert result.model_output.completion == expected.text, (run_dir.name, question)
            assert meta["backend"] == "vllm" and meta["batch_size"] >= 1 and meta["latency_s"] > 0
            assert (meta["zoomed"], meta["reason"]) == (st.zoomed, st.reason), (run_dir.name, meta)
            assert (meta["visual_tokens_low"], meta["visual_tokens_roi"]) == (st.visual_tokens_low,
                                                                             st.visual_tokens_roi)
            if st.gate_prob is None:
                assert meta["gate_prob"] is None
            else:
                assert meta["gate_prob"] == pytest.approx(st.gate_prob, abs=1e-4)
            assert (meta["box"] is None) is (st.box is None)
            if st.box is not None:
                assert meta["box"] == pytest.approx(list(st.box), abs=1e-6)
            decisions.setdefault(meta["mode"], []).append(meta["zoomed"])
            batch_sizes.append(meta["batch_size"])
    assert decisions["never"] == [False] * SAMPLES  # the baseline
    assert sorted(set(decisions["zoom"])) == [False, True], decisions  # the gate decided both ways
    assert max(batch_sizes) > 1, batch_sizes  # evalscope's concurrent samples reached vLLM together
    assert "done in" in proc.stdout


def test_backend_vllm_refuses_devices_in_one_line(capsys, tmp_path):
    from qzoom_swift import cli

    argv = ["eval", "--backend", "vllm", "--devices", "cpu,cpu", "--model", str(tmp_path), "--run", "baseline:64",
            "--benchmarks", "docvqa", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--devices runs transformers workers only" in err[0], err
    assert not (tmp_path / "out").exists()
