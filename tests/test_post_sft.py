"""Stage 2 (Post-SFT): the training sequence of a stored RoI equals the inference sequence; judge parsing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")


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
