"""Stage 3 end to end on the tiny model: gate-labels (resume), training data, swift sft, calibration, swift infer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS, run_swift_concurrently
from qzoom_swift.labels.gate_job import GateLabelOptions, build_gate_dataset, calibrate_gate, run_gate_labels
from qzoom_swift.synthetic.images import write_shape_dataset

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")

REPO = Path(__file__).resolve().parents[1]
BUDGETS = "16,36"


def _shard_lines(root: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(root.glob("shard-*.jsonl")) for line in shard.read_text().splitlines()]


def test_gate_labels_kill_and_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    # enough records that a kill after the first lines lands mid-job even on an idle machine (6 did not)
    data = write_shape_dataset(tmp_path / "data", n=24, size=(392, 280), seed=3)
    model = str(tiny_dir("qwen2_5_vl"))
    opts = dict(model=model, dataset=str(data), budgets=(16, 36), max_new_tokens=2, batch_size=2, progress=False)
    whole = run_gate_labels(GateLabelOptions(out=str(tmp_path / "whole"), **opts))
    # random weights answer noise: under the released scoring no trajectory survives (top answers disagree, or
    # their consensus misses the ground truth)
    assert whole["answered"] == 24 and sum(whole["kinds"].values()) == 24 and whole["kept"] == 0
    assert set(whole["kinds"]) <= {"unstable_top", "hallucinated"}

    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "qzoom_swift.cli", "gate-labels", "--model", model, "--dataset", str(data),
           "--out", str(out), "--budgets", BUDGETS, "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_shard_lines(out)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_shard_lines(out))
    assert 0 < partial < 24, "the kill should land mid-job"
    resumed = run_gate_labels(GateLabelOptions(out=str(out), **opts))
    assert resumed["answered"] == 24
    a, b = _shard_lines(tmp_path / "whole"), _shard_lines(out)
    assert [r["qzoom_id"] for r in b] == [r["qzoom_id"] for r in a]  # no gap, no duplicate, same order
    assert [r["qzoom_answers"] for r in b] == [r["qzoom_answers"] for r in a]
    with pytest.raises(Exception, match="different settings"):
        run_gate_labels(GateLabelOptions(out=str(out), **{**opts, "budgets": (16, 64)}))


def _trajectory_shard(root: Path, data: Path, patterns: list[list[bool]]) -> None:
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (row, correct) in enumerate(zip(rows, patterns)):
        lines.append({"qzoom_id": f"{i}-x", "qzoom_status": "ok", **row, "qzoom_budgets": [16, 36, 64, 144],
                      "qzoom_answers": ["a"] * 4, "qzoom_scores": [float(c) for c in correct],
                      "qzoom_correct": correct})
    (root / "shard-00000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


PATTERNS = [[False, False, True, True], [False, True, True, True], [True, True, True, True],
            [True, True, True, True], [False, False, False, False], [True, False, True, True],
            [False, True, True, True], [True, True, True, True]]


def test_gate_dataset_rows_carry_label_and_budget(tmp_path):
    data = write_shape_dataset(tmp_path / "data", n=8, size=(392, 280), seed=1)
    root = tmp_path / "labels"
    _trajectory_shard(root, data, PATTERNS)
    opts = GateLabelOptions(model="-", dataset=str(data), out=str(root), easy_per_transition=1.0,
                            matcher="exact")  # the rows' stored right/wrong (the released rule is in test_fidelity)
    summary = build_gate_dataset(root, opts, patch_unit=28)
    assert summary["kinds"] == {"transition": 3, "easy": 3, "always_wrong": 1, "unstable": 1}
    rows = [json.loads(line) for line in (root / "gate_train.jsonl").read_text().splitlines()]
    assert len(rows) == summary["kept"] == 6  # 3 transitions + 3 easy (1:1)
    for row in rows:
        meta = row["qzoom_gate_meta"]
        budget = meta["budget"]
        assert row["chat_template_kwargs"] == {"min_pixels": budget * 784, "max_pixels": budget * 784}
        assert row["messages"] and row["images"] and not any(k.startswith("qzoom_") and k not in
                                                             ("qzoom_gate", "qzoom_gate_meta") for k in row)
        pattern = PATTERNS[int(meta["id"].split("-")[0])]
        index = [16, 36, 64, 144].index(budget)
        assert row["qzoom_gate"] == int(not pattern[index])  # 1 exactly where the answer is still wrong
        assert index < 2  # the top two budgets define the reference answer and are never inputs
    first = (root / "gate_train.jsonl").read_text()
    assert build_gate_dataset(root, opts, patch_unit=28) == summary  # deterministic: same draws, same file
    assert (root / "gate_train.jsonl").read_text() == first


def test_per_sample_budget_is_honoured_by_the_training_template(tiny_dir, tmp_path):
    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.swift_plugin import register

    register()
    data = write_shape_dataset(tmp_path / "data", n=2, size=(392, 280), seed=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    model, processor = get_model_processor(str(tiny_dir("qwen2_5_vl")), model_type="qzoom_qwen2_5_vl",
                                           torch_dtype=torch.float32)
    template = get_template(processor, template_type="qzoom_qwen2_5_vl")
    template.set_mode("train")
    template.model = model
    tokens = []
    for row, budget in zip(rows, (16, 64)):
        row = {**row, "qzoom_gate": 1, "chat_template_kwargs": {"min_pixels": budget * 784,
                                                                "max_pixels": budget * 784}}
        encoded = template.encode(row)
        assert encoded["qzoom_gate"] == 1
        tokens.append(int(encoded["image_grid_thw"].prod()) // 4)
    assert tokens[0] <= 16 < tokens[1] <= 64 and tokens[1] >= 40


@pytest.fixture(scope="module")
def stage3_runs(tiny_dir, tmp_path_factory):
    """swift sft with the tiny stage-3 recipe on labelled rows; returns (run, output dir, data)."""
    work = tmp_path_factory.mktemp("stage3")
    data = write_shape_dataset(work / "data", n=6, size=(392, 280), seed=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train = work / "gate_train.jsonl"
    with open(train, "w") as f:
        for i, row in enumerate(rows):
            budget = (16, 64)[i % 2]
            f.write(json.dumps({**row, "qzoom_gate": i % 2, "chat_template_kwargs": {
                "min_pixels": budget * 784, "max_pixels": budget * 784}}) + "\n")
    cmd = ["sft", str(REPO / "recipes/tiny/stage3_gate.yaml"), "--model", str(tiny_dir("qwen2_5_vl")),
           "--dataset", str(train), "--output_dir", str(work / "train"), "--external_plugins",
           str(REPO / "qzoom_swift/swift_plugin/plugin.py"), *CPU_TRAIN_FLAGS]
    run = run_swift_concurrently({"sft": cmd}, work)["sft"]
    return run, work / "train", data


def test_stage3_sft_lowers_the_gate_loss_and_trains_only_the_gate(stage3_runs, tiny_dir):
    run, out, _ = stage3_runs
    assert run.returncode == 0, run.tail()
    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    losses = [row["qzoom_gate_loss"] for row in logs if "qzoom_gate_loss" in row]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    ckpt = out / "checkpoint-10"
    branch = load_file(str(ckpt / "qzoom_branch.safetensors"))
    base = load_file(str(next(tiny_dir("qwen2_5_vl").glob("model*.safetensors"))))
    b = json.loads((ckpt / "qzoom_config.json").read_text())["branch_layer"]
    key = next(k for k in base if k.endswith(f"layers.{b}.self_attn.q_proj.weight"))
    assert not torch.equal(branch["gate.layers.0.self_attn.q_proj.weight"], base[key])
    assert torch.equal(branch["rpn.layers.0.self_attn.q_proj.weight"], base[key])


def test_gate_layers_of_a_stage1_checkpoint_start_from_the_base_layers(tiny_dir, tmp_path):
    """Continuing from a stage-1 checkpoint must not leave the gate random (the released stage-3 bug)."""
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.branches import attach_branches, get_branches
    from qzoom_swift.checkpoint import load_branch_checkpoint, save_branch_checkpoint

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen3_vl")).eval()
    branches = attach_branches(model)
    with torch.no_grad():
        for p in branches.rpn.parameters():
            p.add_(0.01)  # "stage-1 trained"
    save_branch_checkpoint(model, tmp_path)
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen3_vl")).eval()
    load_branch_checkpoint(fresh, tmp_path)
    gate = get_branches(fresh).gate
    layers = fresh.model.language_model.layers
    b = get_branches(fresh).first_layer
    for i, layer in enumerate(gate.layers):
        assert all(torch.equal(v, layers[b + i].state_dict()[k]) for k, v in layer.state_dict().items())


def test_calibration_writes_tau_gate_that_swift_infer_uses(stage3_runs, tiny_dir, tmp_path):
    run, out, data = stage3_runs
    assert run.returncode == 0, run.tail()
    ckpt = out / "checkpoint-10"
    traj = tmp_path / "heldout"
    _trajectory_shard(traj, data, [[False, False, True, True], [True] * 4, [False, True, True, True],
                                   [True] * 4, [False] * 4, [True] * 4])
    res = calibrate_gate(str(tiny_dir("qwen2_5_vl")), str(ckpt), str(traj), target_skip_ratio=0.5)
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert config["tau_gate"] == pytest.approx(res.tau_gate)
    assert config["extra"]["gate_calibration"]["samples"] == 6 and res.skip_ratio >= 0.5
    card = (ckpt / "README.md").read_text()  # the model card follows the calibrated config
    assert f"tau_gate {config['tau_gate']}," in card and '"samples": 6' in card and "stage 3 (gate)" in card
    assert config["extra"]["train_samples"]["gate"] > 0  # recorded by the trainer at save time
    assert f"gate {config['extra']['train_samples']['gate']} samples" in card
    assert Path(res.curve_png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((ckpt / "gate_calibration.json").read_text())["curve"]
    assert curve[0]["skip_ratio"] == 0.0 and curve[-1]["skip_ratio"] == 1.0

    infer = ["infer", "--adapters", str(ckpt), "--val_dataset", str(data), "--max_new_tokens", "2",
             "--max_batch_size", "2", "--temperature", "0", "--result_path", str(tmp_path / "r.jsonl")]
    result = run_swift_concurrently({"infer": infer}, tmp_path)["infer"]
    assert result.returncode == 0, result.tail()
    decisions = [d for line in result.log.read_text().splitlines() if "qzoom: " in line
                 for d in line.split("qzoom: ", 1)[1].split("; ")]
    assert len(decisions) == 6
    for d in decisions:  # the calibrated threshold decides: p >= tau zooms (or finds no region)
        p = float(d.split("p=", 1)[1].split()[0])
        zoomed = d.startswith("zoom(gate)") or d.startswith("direct(no_roi)")
        assert zoomed == (p >= round(res.tau_gate, 3) - 1e-3) or abs(p - res.tau_gate) < 2e-3, (d, res.tau_gate)
