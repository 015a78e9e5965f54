"""`swift sft --tuner_type qzoom` and `swift infer --adapters` through the real CLI, on the tiny models.

One sft run per family (gate for Qwen2.5-VL and LLaVA, RPN for Qwen3-VL), run concurrently; then the
checkpoints are checked file by file and reloaded both by `swift infer --adapters` and in-process.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS, run_swift_concurrently
from qzoom_swift.swift_plugin import MODEL_TYPES, plugin_path

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")


def trained_branch(family: str) -> str:
    """One family trains the RPN, the others the gate: both tuner paths are exercised in one run."""
    return "rpn" if family == "qwen3_vl" else "gate"


@pytest.fixture(scope="module")
def branch_dataset(shape_dataset, tmp_path_factory):
    """The shape dataset plus a gate label and a 4x4 tri-state RPN map per row (resampled at training)."""
    rows = [json.loads(line) for line in shape_dataset.read_text().splitlines() if line.strip()]
    out = tmp_path_factory.mktemp("branch_data") / "train.jsonl"
    for i, row in enumerate(rows):
        row["qzoom_gate"] = i % 2
        label = [[-100] * 4 for _ in range(4)]
        label[i % 4][(i + 1) % 4] = 1
        label[(i + 2) % 4][(i + 3) % 4] = 0
        row["qzoom_rpn_labels"] = label
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def sft_runs(tiny_dir, branch_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("qzoom_sft")
    commands = {}
    for family in MODEL_TYPES:
        commands[family] = _sft_command(tiny_dir, family, branch_dataset, work / family)
    runs = run_swift_concurrently(commands, work)
    return {family: (runs[family], work / family) for family in MODEL_TYPES}


def _sft_command(tiny_dir, family: str, dataset, out) -> list[str]:
    return ["sft", "--external_plugins", plugin_path(), "--model", str(tiny_dir(family)), "--model_type",
            MODEL_TYPES[family], "--tuner_type", "qzoom", "--dataset", str(dataset), "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_steps", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--output_dir", str(out), "--add_version", "false",
            "--strict", "true", "--model_kwargs", json.dumps({"QZOOM_TRAIN": trained_branch(family)}), *CPU_TRAIN_FLAGS]


@pytest.mark.parametrize("family", list(MODEL_TYPES))
def test_swift_sft_qzoom_writes_only_branch_files(sft_runs, tiny_dir, family):
    run, out = sft_runs[family]
    assert run.returncode == 0, run.tail()
    ckpt = out / "checkpoint-4"
    files = {p.name for p in ckpt.iterdir()}
    assert {"qzoom_branch.safetensors", "qzoom_config.json"} <= files
    assert not any(name.startswith(("model", "adapter_model")) and name.endswith(".safetensors") for name in files)
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert config["family"] == family and config["extra"]["trained_branches"] == [trained_branch(family)]
    metric = f"qzoom_{trained_branch(family)}_loss"
    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    assert any(metric in row for row in logs), f"{metric} not logged"

    # trained branch moved away from its copy-init, the other one still equals the base layers
    base = load_file(str(next(tiny_dir(family).glob("model*.safetensors"))))
    branch = load_file(str(ckpt / "qzoom_branch.safetensors"))
    b = config["branch_layer"]
    layer0 = next(k for k in base if k.endswith(f"layers.{b}.self_attn.q_proj.weight"))
    trained, frozen = trained_branch(family), ({"gate", "rpn"} - {trained_branch(family)}).pop()
    assert not torch.equal(branch[f"{trained}.layers.0.self_attn.q_proj.weight"], base[layer0])
    assert torch.equal(branch[f"{frozen}.layers.0.self_attn.q_proj.weight"], base[layer0])


@pytest.fixture(scope="module")
def infer_runs(sft_runs, shape_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("qzoom_infer")
    commands = {}
    for family, (run, out) in sft_runs.items():
        if run.returncode != 0:
            continue
        commands[family] = ["infer", "--adapters", str(out / "checkpoint-4"), "--val_dataset", str(shape_dataset),
                            "--max_new_tokens", "3", "--max_batch_size", "2", "--temperature", "0",
                            "--result_path", str(work / f"{family}.jsonl")]
    runs = run_swift_concurrently(commands, work)
    return {family: (runs[family], work / f"{family}.jsonl") for family in runs}


@pytest.mark.parametrize("family", list(MODEL_TYPES))
def test_swift_infer_reloads_qzoom_adapters(infer_runs, shape_dataset, family):
    assert family in infer_runs, "sft failed, nothing to reload"
    run, result = infer_runs[family]
    assert run.returncode == 0, run.tail()
    log = run.log.read_text(errors="replace")
    assert "tuner_type='qzoom'" in log and f"model_type='{MODEL_TYPES[family]}'" in log  # restored from args.json
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    n = sum(1 for line in shape_dataset.read_text().splitlines() if line.strip())
    assert len(rows) == n and all(isinstance(r["response"], str) for r in rows)


@pytest.mark.parametrize("family", list(MODEL_TYPES))
def test_adapter_round_trip_in_process(sft_runs, tiny_dir, family):
    """What `--adapters` does: the qzoom tuner loads the checkpoint into a freshly loaded qzoom model."""
    from swift.model import get_model_processor

    from qzoom_swift.branches import get_branches
    from qzoom_swift.swift_plugin import register
    from qzoom_swift.swift_plugin.tuner import QZoomTuner

    register()
    run, out = sft_runs[family]
    assert run.returncode == 0, run.tail()
    model, _ = get_model_processor(str(tiny_dir(family)), model_type=MODEL_TYPES[family], torch_dtype=torch.float32)
    QZoomTuner.from_pretrained(model, str(out / "checkpoint-4"))
    saved = load_file(str(out / "checkpoint-4" / "qzoom_branch.safetensors"))
    state = get_branches(model).state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def test_resume_from_a_branch_checkpoint_reproduces_the_uninterrupted_run(sft_runs, tiny_dir, branch_dataset,
                                                                         tmp_path):
    """--resume_from_checkpoint: the tuner reloads the branch, the trainer its optimizer/RNG state."""
    run, out = sft_runs["qwen2_5_vl"]
    assert run.returncode == 0, run.tail()
    cmd = [*_sft_command(tiny_dir, "qwen2_5_vl", branch_dataset, tmp_path / "resumed"),
           "--resume_from_checkpoint", str(out / "checkpoint-2")]
    resumed = run_swift_concurrently({"resume": cmd}, tmp_path)["resume"]
    assert resumed.returncode == 0, resumed.tail()
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "logging.jsonl").read_text().splitlines()]
    steps = [row["global_step/max_steps"] for row in logs if "loss" in row]
    assert steps == ["3/4", "4/4"]  # steps 1-2 were not redone
    full = load_file(str(out / "checkpoint-4" / "qzoom_branch.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "qzoom_branch.safetensors"))
    assert all(torch.allclose(full[k], again[k], atol=1e-6) for k in full)
    at_two = load_file(str(out / "checkpoint-2" / "qzoom_branch.safetensors"))
    assert any(not torch.equal(full[k], at_two[k]) for k in full)


def test_qzoom_tuner_requires_branch_choice_and_qzoom_model_type():
    from qzoom_swift.swift_plugin.tuner import QZoomTuner, branches_to_train

    assert branches_to_train({"QZOOM_TRAIN": "rpn,gate"}) == ("rpn", "gate")
    with pytest.raises(ValueError, match="QZOOM_TRAIN"):
        branches_to_train({})
    with pytest.raises(ValueError, match="choose from"):
        branches_to_train({"QZOOM_TRAIN": "lm_head"})

    class Args:
        model_type = "qwen2_5_vl"

    with pytest.raises(ValueError, match="qzoom_qwen2_5_vl"):
        QZoomTuner.prepare_model(Args(), torch.nn.Linear(2, 2))
