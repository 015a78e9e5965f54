"""bfloat16 end to end on CPU: labelling, zoom inference and ONNX export run in bf16, and the zoom path's
decisions and boxes agree with float32.

Tolerance, and why: bfloat16 keeps 8 significand bits (relative rounding error 2**-8 ~ 0.4 % per
operation). On the tiny models the measured error after the first B layers is ~3e-3 on a gate probability
and ~1e-3 on a heatmap cell, so probabilities are compared at 2e-2 and a gate decision must match wherever
float32 is more than 2e-2 from tau_gate. A random RPN's heatmap is flat (all cells within 0.49-0.54, sorted
cells ~2e-3 apart: closer than bf16's error), so its heads are sharpened (the q.k scale x30, the same in
both precisions) to the contrast a trained RPN has; even then a cell can sit within the error of tau_roi,
so boxes must be identical in at least 3 of 4 samples per family and overlap (IoU) >= 0.6 in every one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qzoom_swift.branches import attach_branches
from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.prefill import prefill
from qzoom_swift.synthetic.images import write_shape_dataset

PROB_TOL = 2e-2
SHARPEN = 30.0
TAU_ROI = 0.5


def _inputs(processor, images, text="What colour is the shape?"):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"
    return processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)


def _state(model_dir, dtype, images):
    from qzoom_swift.branches import require_branches
    from qzoom_swift.loading import LoadSettings, load_model

    model, processor = load_model(model_dir, LoadSettings("cpu", dtype))
    torch.manual_seed(0)  # the gate head is new: the same seed gives both precisions the same initial weights
    attach_branches(model)  # the rest are copies of the base layers
    require_branches(model).rpn.head.scaling *= SHARPEN
    inputs = _inputs(processor, images)
    with torch.inference_mode():
        return prefill(model, branches=("gate", "rpn"), **inputs)


def _iou(a, b) -> float:
    if a is None or b is None:
        return float(a == b)
    ix, iy = max(0, min(a.x1, b.x1) - max(a.x0, b.x0)), max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    return inter / ((a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gate_and_boxes_in_bf16_agree_with_fp32(family, tiny_dir, tmp_path):
    from PIL import Image

    from qzoom_swift.roi import roi_box_from_heatmap

    data = write_shape_dataset(tmp_path, n=4, size=(392, 280), seed=2)
    images = [Image.open(tmp_path / json.loads(line)["images"][0]).convert("RGB")
              for line in data.read_text().splitlines()]
    full, half = (_state(str(tiny_dir(family)), dtype, images) for dtype in ("float32", "bfloat16"))
    p32, p16 = full.gate_prob.float(), half.gate_prob.float()
    assert half.gate_logit.dtype == torch.bfloat16 and torch.isfinite(p16).all()
    assert (p32 - p16).abs().max() < PROB_TOL
    for tau_gate in (0.3, 0.5, 0.7):
        clear = (p32 - tau_gate).abs() > PROB_TOL
        assert torch.equal((p32 > tau_gate)[clear], (p16 > tau_gate)[clear])
    boxes = [(roi_box_from_heatmap(a.float(), TAU_ROI, 3, 1.0), roi_box_from_heatmap(b.float(), TAU_ROI, 3, 1.0))
             for a, b in zip(full.heatmaps(), half.heatmaps())]
    assert all(a is not None for a, _ in boxes), "sharpened heatmaps should give boxes at tau_roi 0.5"
    assert sum(a == b for a, b in boxes) >= 3
    assert min(_iou(a, b) for a, b in boxes) >= 0.6


def test_zoom_generate_runs_in_bf16(tiny_dir, tmp_path):
    from PIL import Image

    from qzoom_swift.model import QZoomModel

    data = write_shape_dataset(tmp_path, n=2, size=(392, 280), seed=4)
    images = [Image.open(tmp_path / json.loads(line)["images"][0]).convert("RGB")
              for line in data.read_text().splitlines()]
    qz = QZoomModel.from_pretrained(str(tiny_dir("qwen2_5_vl")), device="cpu", dtype="bfloat16",
                                    config_overrides={"mode": "always", "tau_roi": 0.0})
    assert next(qz.model.parameters()).dtype == torch.bfloat16
    answers = qz.generate(images, ["What colour?", "Which shape?"], max_new_tokens=3)
    assert len(answers) == 2 and all(a.stats.zoomed for a in answers)
    assert all(a.token_ids for a in answers)


def test_pseudo_labels_in_bf16(tiny_dir, tmp_path):
    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels

    data = write_shape_dataset(tmp_path / "d", n=3, size=(392, 280), seed=1)
    common = dict(model=str(tiny_dir("qwen2_5_vl")), dataset=str(data), max_new_tokens=3, progress=False,
                  heads="5:0,1;6", tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9, device="cpu")
    s16 = run_pseudo_labels(PseudoLabelOptions(out=str(tmp_path / "bf16"), dtype="bfloat16", **common))
    run_pseudo_labels(PseudoLabelOptions(out=str(tmp_path / "fp32"), dtype="float32", **common))
    assert s16["complete"] and s16["outcomes"]["rejected"] == 0
    rows = {}
    for name in ("bf16", "fp32"):
        rows[name] = {r["qzoom_id"]: r for r in map(json.loads, (tmp_path / name / "shard-00000.jsonl")
                                                   .read_text().splitlines())}
    assert rows["bf16"].keys() == rows["fp32"].keys()
    compared = 0
    for rid, r16 in rows["bf16"].items():
        a, b = torch.tensor(r16["qzoom_attn"]), torch.tensor(rows["fp32"][rid]["qzoom_attn"])
        assert a.shape == b.shape and torch.isfinite(a).all()
        if r16["qzoom_answer"] == rows["fp32"][rid]["qzoom_answer"]:  # same answer tokens: same queries
            assert (a - b).abs().max() <= PROB_TOL * float(b.max())
            compared += 1
    assert compared >= 1


def test_onnx_export_of_a_bf16_checkpoint(tiny_dir, tmp_path):
    """Branches trained in bf16 are saved in bf16; the export reads them into float32 and passes parity."""
    pytest.importorskip("onnxruntime")
    from qzoom_swift.checkpoint import save_branch_checkpoint
    from qzoom_swift.loading import LoadSettings, load_model
    from qzoom_swift.onnx.export import export_checkpoint

    model_dir = str(tiny_dir("qwen2_5_vl"))
    model, _ = load_model(model_dir, LoadSettings("cpu", "bfloat16"), processor=False)
    attach_branches(model)
    ckpt = save_branch_checkpoint(model, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(ckpt / "qzoom_branch.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    result = export_checkpoint(ckpt, model_dir, tmp_path / "onnx", precisions=("fp32",))
    assert result.report["precisions"]["fp32"]["passed"]


@pytest.mark.slow
def test_branch_training_with_swift_sft_in_bf16(tiny_dir, tmp_path):
    """Stage 1 in bf16 through the real CLIs: bf16 pseudo labels, then ``swift sft --torch_dtype bfloat16
    --bf16 true --use_cpu true`` (transformers allows bf16 mixed precision on the CPU only with use_cpu); the
    RPN loss is real and finite and the branch is saved in bf16."""
    from safetensors import safe_open

    from qzoom_swift.bench.sft import run_swift_concurrently
    from qzoom_swift.cli import main
    from qzoom_swift.swift_plugin import plugin_path

    model = str(tiny_dir("qwen2_5_vl"))
    data = write_shape_dataset(tmp_path / "data", n=6, seed=5, size=(392, 280))
    labels = tmp_path / "labels"
    assert main(["pseudo-labels", "--model", model, "--dataset", str(data), "--out", str(labels), "--dtype",
                 "bfloat16", "--max-new-tokens", "4", "--batch-size", "3", "--calibration", "3", "--no-progress",
                 "--tau-fg", "0.9", "--tau-bg", "0.8", "--max-box-fraction", "0.9", "--min-peak", "1e-3"]) == 0
    assert json.loads((labels / "summary.json").read_text())["outcomes"]["labelled"] >= 1
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "stage1_sdrpn.yaml")
    out = tmp_path / "train"
    runs = run_swift_concurrently({"bf16": ["sft", recipe, "--model", model, "--dataset",
                                            str(labels / "shard-00000.jsonl"), "--output_dir", str(out),
                                            "--external_plugins", plugin_path(), "--torch_dtype", "bfloat16",
                                            "--bf16", "true", "--use_cpu", "true",  # transformers: bf16 on CPU
                                            "--max_steps", "4", "--save_steps", "4"]},
                                  tmp_path)
    assert runs["bf16"].returncode == 0, runs["bf16"].tail(3000)
    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines() if line.strip()]
    losses = [float(entry["qzoom_rpn_loss"]) for entry in logs if "qzoom_rpn_loss" in entry]
    assert losses and all(math.isfinite(v) for v in losses) and max(losses) > 0
    with safe_open(str(out / "last-checkpoint" / "qzoom_branch.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
