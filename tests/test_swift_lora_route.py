"""The stage-2 LoRA route through the real CLI: LoRA -> merge -> stage 3 on the merged model -> inference.

`swift sft --tuner_type lora` (branches detached, QZOOM_ATTACH=0) trains a LoRA on the LLM;
`swift export --merge_lora true` (QZOOM_ATTACH=0) writes a plain merged model; `swift sft --tuner_type qzoom`
trains the gate on it (a stage-3 checkpoint whose args.json names the merged model). Then:

- merged:   ``swift infer --adapters STAGE3`` (the merged model comes from the checkpoint's args.json);
- unmerged: ``swift infer --model BASE --adapters STAGE3 LORA`` (the qzoom tuner hands the LoRA to peft);
- no LoRA:  ``swift infer --model BASE --adapters STAGE3`` (shows that the LoRA changes the answers).

Merged and unmerged must give the same answers and the same gate decisions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS, run_swift_concurrently
from qzoom_swift.swift_plugin import plugin_path

MODEL_TYPE = "qzoom_qwen2_5_vl"
INFER_KWARGS = {"QZOOM_ROI_MIN_TOKENS": 16, "QZOOM_ROI_MAX_TOKENS": 64}


def _sft(model: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--external_plugins", plugin_path(), "--model", str(model), "--model_type", MODEL_TYPE,
            "--dataset", str(dataset), "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps", "2",
            "--output_dir", str(out), "--add_version", "false", "--strict", "true", *extra, *CPU_TRAIN_FLAGS]


def _run(commands: dict[str, list[str]], work: Path, **env: str) -> dict:
    runs = run_swift_concurrently(commands, work, env=env or None)
    for name, run in runs.items():
        assert run.returncode == 0, f"swift {commands[name][0]} ({name}) failed:\n{run.tail()}"
    return runs


@pytest.fixture(scope="module")
def lora_route(tiny_dir, tmp_path_factory):
    from qzoom_swift.synthetic.images import write_shape_dataset

    work = tmp_path_factory.mktemp("lora_route")
    data = write_shape_dataset(work / "data", n=6, size=(392, 280), seed=3)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    gate_data = work / "gate.jsonl"
    gate_data.write_text("".join(json.dumps({**r, "qzoom_gate": i % 2}) + "\n" for i, r in enumerate(rows)))
    base = tiny_dir("qwen2_5_vl")
    lora, merged, stage3 = work / "lora" / "checkpoint-2", work / "merged", work / "stage3" / "checkpoint-2"
    _run({"lora": _sft(base, data, work / "lora", "--tuner_type", "lora", "--target_modules", "all-linear",
                       "--learning_rate", "1e-2")}, work, QZOOM_ATTACH="0")
    _run({"merge": ["export", "--adapters", str(lora), "--merge_lora", "true", "--output_dir", str(merged),
                    "--exist_ok", "true"]}, work, QZOOM_ATTACH="0")
    _run({"stage3": _sft(merged, gate_data, work / "stage3", "--tuner_type", "qzoom", "--learning_rate", "1e-3",
                         "--model_kwargs", json.dumps({"QZOOM_TRAIN": "gate"}))}, work)
    common = ["--val_dataset", str(data), "--max_new_tokens", "4", "--temperature", "0", "--max_batch_size", "2",
              "--model_kwargs", json.dumps(INFER_KWARGS)]
    infer = {
        "merged": ["infer", "--adapters", str(stage3), *common],
        "unmerged": ["infer", "--model", str(base), "--adapters", str(stage3), str(lora), *common],
        "no_lora": ["infer", "--model", str(base), "--adapters", str(stage3), *common],
    }
    for name, cmd in infer.items():
        cmd += ["--result_path", str(work / f"{name}.jsonl")]
    runs = _run(infer, work / "infer")
    return {"work": work, "base": base, "lora": lora, "merged": merged, "stage3": stage3, "runs": runs}


def _answers(route, name: str) -> list[str]:
    return [json.loads(line)["response"] for line in (route["work"] / f"{name}.jsonl").read_text().splitlines()]


def _decisions(route, name: str) -> list[tuple[str, float]]:
    """(decision, gate probability) per sample, from the ``qzoom:`` log lines."""
    text = route["runs"][name].log.read_text(errors="replace")
    return [(m.group(1), float(m.group(2))) for m in re.finditer(r"(zoom|direct)\([^)]*\) p=([0-9.]+)", text)]


@pytest.mark.slow
def test_merged_lora_plus_branches_answers_as_unmerged_lora_plus_branches(lora_route):
    merged, unmerged, no_lora = (_answers(lora_route, n) for n in ("merged", "unmerged", "no_lora"))
    d_merged, d_unmerged, d_no_lora = (_decisions(lora_route, n) for n in ("merged", "unmerged", "no_lora"))
    assert len(merged) == 6 and len(d_merged) == 6
    assert merged == unmerged
    assert [d for d, _ in d_merged] == [d for d, _ in d_unmerged]
    assert all(abs(p - q) <= 2e-3 for (_, p), (_, q) in zip(d_merged, d_unmerged))  # the log rounds to 3 places
    # the comparison means something: without the LoRA the same branches see other hidden states
    assert no_lora != merged or any(abs(p - q) > 2e-3 for (_, p), (_, q) in zip(d_merged, d_no_lora))
    assert "tuner_type='qzoom'" in lora_route["runs"]["unmerged"].log.read_text(errors="replace")


@pytest.mark.slow
def test_the_merged_model_is_a_plain_model_with_the_lora_folded_in(lora_route, tiny_dir):
    merged = load_file(str(lora_route["merged"] / "model.safetensors"))
    base = load_file(str(tiny_dir("qwen2_5_vl") / "model.safetensors"))
    assert set(merged) == set(base), "branch weights must not be saved into the merged model"
    assert any(not torch.equal(merged[k], base[k]) for k in base), "the LoRA update was not merged"


@pytest.mark.slow
def test_a_stage3_checkpoint_on_the_merged_model_serves_with_its_trained_gate(lora_route):
    ckpt = lora_route["stage3"]
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert config["extra"]["trained_branches"] == ["gate"]
    assert Path(json.loads((ckpt / "args.json").read_text())["model"]) == lora_route["merged"]
    log = lora_route["runs"]["merged"].log.read_text(errors="replace")
    assert "(gate" in log and "gate_untrained" not in log  # the trained gate decides, no fallback
    assert str(lora_route["merged"]) in log  # the merged model came back from the checkpoint's args.json


def test_the_qzoom_tuner_hands_lora_adapters_to_peft_and_refuses_to_train_them(tmp_path):
    from qzoom_swift.swift_plugin.tuner import QZoomTuner, is_peft_adapter

    lora, branch = tmp_path / "lora", tmp_path / "branch"
    lora.mkdir()
    branch.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    for name in ("qzoom_branch.safetensors", "qzoom_config.json"):
        (branch / name).write_text("{}")
    assert is_peft_adapter(lora) and not is_peft_adapter(branch) and not is_peft_adapter(tmp_path)
    with pytest.raises(ValueError, match="merge the LoRA first"):
        QZoomTuner.from_pretrained(torch.nn.Linear(2, 2), str(lora), is_trainable=True)
