"""Stage 2 (Post-SFT): the training sequence of a stored RoI equals the inference sequence; judge parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")


def _image():
    img = Image.new("RGB", (640, 480), (230, 230, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((400, 60, 520, 150), fill=(200, 30, 30))
    draw.rectangle((40, 300, 200, 420), fill=(30, 30, 200))
    return img


@pytest.mark.parametrize("family", FAMILIES)
def test_training_sequence_of_a_stored_roi_equals_the_inference_sequence(tiny_dir, tmp_path, family):
    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.roi import heatmap_probabilities
    from qzoom_swift.swift_plugin import MODEL_TYPES, register
    from qzoom_swift.zoom import zoom_generate, zoom_prefill

    register()
    model_type = MODEL_TYPES[family]
    model, processor = get_model_processor(str(tiny_dir(family)), model_type=model_type, torch_dtype=torch.float32)
    path = tmp_path / "img.png"
    _image().save(path)
    original = Image.open(path).convert("RGB")
    question = {"role": "user", "content": "<image>What colour is the small box?"}
    row = {"messages": [question, {"role": "assistant", "content": "red"}], "images": [str(path)]}
    unit = {"qwen2_5_vl": 784, "qwen3_vl": 1024}.get(family)
    low = {"min_pixels": 64 * unit, "max_pixels": 64 * unit} if unit else {}  # LLaVA's CLIP has a fixed size

    # inference: the template encodes the prompt, zoom picks a box from the RPN
    template = get_template(processor, template_type=model_type)
    template.set_mode("transformers")
    template.model = model
    infer = template.encode({"messages": [question], "images": [str(path)], "chat_template_kwargs": low})
    batch = template.data_collator([infer])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                       "image_grid_thw", "mm_token_type_ids")}
    from qzoom_swift.prefill import prefill

    probs = heatmap_probabilities(prefill(model, **inputs).heatmaps()[-1].detach()).flatten()
    cfg = QZoomConfig(mode="always", tau_roi=float(probs.kthvalue(int(probs.numel() * 0.85)).values),
                      roi_min_tokens=16, roi_max_tokens=64).resolved_for(family, 8, 128)
    z = zoom_prefill(model, processor, inputs, [[original]], cfg)
    stats = zoom_generate(model, processor, inputs, [[original]], cfg, max_new_tokens=1).stats[0]
    assert stats.zoomed and stats.grid_box == z.grid_box

    # training: the stored RoI (what mine-hard writes) rebuilds the same tokens and positions
    roi = {"box": list(stats.box), "grid_box": list(stats.grid_box), "grid": list(stats.grid)}
    train = get_template(processor, template_type=model_type)
    train.set_mode("train")
    train.model = model
    import os

    os.environ.update(QZOOM_MODE="always", QZOOM_ROI_MIN_TOKENS="16", QZOOM_ROI_MAX_TOKENS="64")
    try:
        encoded = train.encode({**row, "chat_template_kwargs": low, "qzoom_roi": roi})
        collated = train.data_collator([dict(encoded)])  # the collator pops keys from the rows it gets
    finally:
        for key in ("QZOOM_MODE", "QZOOM_ROI_MIN_TOKENS", "QZOOM_ROI_MAX_TOKENS"):
            os.environ.pop(key)
    ids = torch.as_tensor(encoded["input_ids"])
    n = z.input_ids.numel()
    assert torch.equal(ids[:n], z.input_ids), "training tokens differ from the zoomed inference prompt"
    labels = torch.as_tensor(encoded["labels"])
    assert (labels[:n] == -100).all() and (labels[n:] != -100).any()  # only the answer is supervised
    assert torch.equal(torch.as_tensor(encoded["pixel_values"])[-z.pixel_values.shape[0]:], z.pixel_values)
    if family != "llava":
        assert torch.equal(encoded["image_grid_thw"][-1], z.image_grid_thw[0])
        assert torch.allclose(encoded["qzoom_position_ids"][:, :n], z.positions[:, 0], atol=0)
        assert torch.allclose(collated["position_ids"][:, 0, :n], z.positions[:, 0], atol=0)
        assert collated["position_ids"].is_floating_point()


def test_llava_grid_maps_into_the_center_crop_it_sees(tiny_dir):
    from transformers import AutoProcessor

    from qzoom_swift.roi import GridBox, grid_region, region_pixel_box

    processor = AutoProcessor.from_pretrained(tiny_dir("llava"))
    region = grid_region((640, 480), processor)
    assert region == (80.0, 0.0, 560.0, 480.0)  # shortest edge to 224, then a centered 224 x 224 crop
    assert region_pixel_box(GridBox(0, 0, 16, 16), (16, 16), (640, 480), region).as_tuple() == (80, 0, 560, 480)
    assert region_pixel_box(GridBox(0, 0, 8, 8), (16, 16), (640, 480), region).as_tuple() == (80, 0, 320, 240)
    assert grid_region((640, 480), None) == (0.0, 0.0, 640.0, 480.0)  # Qwen: the grid covers the whole image


def test_judge_parsing_is_lenient_and_never_raises():
    from qzoom_swift.labels.judge import parse_judgement

    assert (parse_judgement("A: Yes\nB: No").a, parse_judgement("A: Yes\nB: No").b) == (True, False)
    assert (parse_judgement("a: yes\nb: NO").a, parse_judgement("a: yes\nb: NO").b) == (True, False)
    v = parse_judgement("Sure, here is my verdict.\n**A:** Correct\n**B:** Incorrect\nThanks!")
    assert (v.a, v.b, v.complete) == (True, False, True)
    v = parse_judgement("A: No")  # missing line -> unknown
    assert (v.a, v.b, v.complete) == (False, None, False)
    for junk in ("", None, "I cannot tell", "The data: yes"):
        v = parse_judgement(junk)
        assert (v.a, v.b) == (None, None)
    v = parse_judgement("A: Yes\nB: No\nA: No")  # the first verdict per candidate wins
    assert (v.a, v.b) == (True, False)


def test_mined_rows_classification():
    from qzoom_swift.labels.mining import classify

    assert classify(True, False, True) == "regression"
    assert classify(False, True, True) == "improvement"
    assert classify(True, True, True) == "both_right" and classify(False, False, True) == "both_wrong"
    assert classify(True, False, False) == "no_roi"  # the RoI path fell back: nothing learnt about the RoI
    assert classify(None, True, True) == "unknown"


def test_mine_hard_job_writes_post_sft_rows_and_resumes(tiny_dir, tmp_path):
    from qzoom_swift.labels.mining import MineOptions, build_post_sft_dataset, run_mine_hard
    from qzoom_swift.synthetic.images import write_shape_dataset

    data = write_shape_dataset(tmp_path / "data", n=4, size=(392, 280), seed=5)
    opts = MineOptions(model=str(tiny_dir("qwen2_5_vl")), checkpoint=None, dataset=str(data), out=str(tmp_path / "m"),
                       max_new_tokens=2, batch_size=2, progress=False,
                       config_overrides={"low_min_tokens": 16, "low_max_tokens": 64, "roi_min_tokens": 16,
                                         "roi_max_tokens": 64})
    summary = run_mine_hard(opts)
    assert summary["answered"] == 4 and sum(summary["categories"].values()) == 4
    shard = [json.loads(line) for line in (tmp_path / "m" / "shard-00000.jsonl").read_text().splitlines()]
    for row in shard:  # random weights answer noise: both wrong, or no region
        assert row["qzoom_status"] in ("both_wrong", "no_roi")
        if row["qzoom_roi"] is not None:
            assert len(row["qzoom_roi"]["box"]) == 4 and all(0 <= v <= 1 for v in row["qzoom_roi"]["box"])
        assert row["qzoom_low"] == {"min_pixels": 16 * 784, "max_pixels": 64 * 784}
    again = run_mine_hard(opts)  # everything is done: nothing is recomputed or duplicated
    assert again["answered"] == 4 and len((tmp_path / "m" / "shard-00000.jsonl").read_text().splitlines()) == 4
    # the Post-SFT file from hand-set verdicts: regressions plus the mixed improvements
    for i, row in enumerate(shard):
        row["qzoom_status"] = ["regression", "improvement", "regression", "both_right"][i]
        row["qzoom_roi"] = {"box": [0.1, 0.1, 0.5, 0.6]}
    (tmp_path / "m" / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard))
    out = build_post_sft_dataset(tmp_path / "m", mixing_ratio=0.5, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "m" / "post_sft.jsonl").read_text().splitlines()]
    assert out["post_sft_rows"] == 3 and out["regressions"] == 2 and out["improvements_mixed"] == 1
    assert all(r["qzoom_roi"]["box"] == [0.1, 0.1, 0.5, 0.6] and r["chat_template_kwargs"]["max_pixels"] == 64 * 784
               for r in rows)
    assert not any(k.startswith("qzoom_") and k != "qzoom_roi" for r in rows for k in r)


@pytest.fixture(scope="module")
def stage2_runs(tiny_dir, tmp_path_factory):
    """NPROC_PER_NODE=1 swift sft with the tiny stage-2 recipe (ZeRO-2), full and LoRA, then swift infer."""
    from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS, run_swift_concurrently
    from qzoom_swift.synthetic.images import write_shape_dataset

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path_factory.mktemp("stage2")
    data = write_shape_dataset(work / "data", n=4, size=(392, 280), seed=6)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train = work / "post_sft.jsonl"
    train.write_text("".join(json.dumps({**r, "qzoom_roi": {"box": [0.1 * i, 0.1, 0.5 + 0.1 * i, 0.7]},
                                         "chat_template_kwargs": {"min_pixels": 16 * 784, "max_pixels": 64 * 784}})
                             + "\n" for i, r in enumerate(rows)))
    base = ["sft", str(repo / "recipes/tiny/stage2_post_sft.yaml"), "--model", str(tiny_dir("qwen2_5_vl")),
            "--dataset", str(train), "--external_plugins", str(repo / "qzoom_swift/swift_plugin/plugin.py"),
            *CPU_TRAIN_FLAGS]
    env = {"NPROC_PER_NODE": "1"}
    runs = run_swift_concurrently({
        "full": [*base, "--output_dir", str(work / "full"), "--deepspeed", str(repo / "recipes/deepspeed/zero2.json")],
        "lora": [*base, "--output_dir", str(work / "lora"), "--tuner_type", "lora", "--target_modules", "all-linear",
                 "--learning_rate", "1e-3", "--deepspeed", str(repo / "recipes/deepspeed/zero2.json")],
    }, work, env=env, envs={"full": {"MASTER_PORT": "29531"}, "lora": {"MASTER_PORT": "29532"}})
    infer = {}
    common = ["--val_dataset", str(data), "--max_new_tokens", "2", "--temperature", "0"]
    if runs["full"].returncode == 0:
        infer["full"] = ["infer", "--model", str(work / "full" / "checkpoint-2"), "--model_type", "qzoom_qwen2_5_vl",
                         "--external_plugins", str(repo / "qzoom_swift/swift_plugin/plugin.py"),
                         "--result_path", str(work / "full.jsonl"), *common]
    if runs["lora"].returncode == 0:
        infer["lora"] = ["infer", "--adapters", str(work / "lora" / "checkpoint-2"), "--result_path",
                         str(work / "lora.jsonl"), *common]
    infer_runs = run_swift_concurrently(infer, work / "infer")
    return runs, infer_runs, work


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_stage2_deepspeed_sft_saves_a_checkpoint_that_swift_infer_loads(stage2_runs, variant):
    runs, infer_runs, work = stage2_runs
    run = runs[variant]
    assert run.returncode == 0, run.tail()
    log = run.log.read_text(errors="replace")
    assert "zero_optimization" in log or "DeepSpeed" in log or "deepspeed" in log
    ckpt = work / variant / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    if variant == "full":
        assert any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    else:
        assert "adapter_model.safetensors" in files
    losses = [json.loads(line).get("loss") for line in (work / variant / "logging.jsonl").read_text().splitlines()]
    assert any(isinstance(x, (int, float)) and x > 0 for x in losses)
    result = infer_runs[variant]
    assert result.returncode == 0, result.tail()
    rows = [json.loads(line) for line in (work / f"{variant}.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["response"], str) for r in rows)
