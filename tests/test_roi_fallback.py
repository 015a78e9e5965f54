"""``QZoomConfig.roi_fallback``: a gated zoom whose heatmap passes no cell at tau_roi crops around the peak."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from qzoom_swift.config import QZoomConfig, effective_config, read_env


def test_roi_fallback_is_validated_and_set_by_overrides_and_the_environment():
    assert QZoomConfig().roi_fallback == "none"  # off by default: the released behaviour
    with pytest.raises(ValueError, match=r"roi_fallback='nearest'; choose from none, peak"):
        QZoomConfig(roi_fallback="nearest")
    assert QZoomConfig().with_overrides({"roi_fallback": "peak"}).roi_fallback == "peak"
    assert read_env({"QZOOM_ROI_FALLBACK": "peak"}).config_overrides == {"roi_fallback": "peak"}
    assert effective_config(None, None, {"QZOOM_ROI_FALLBACK": "peak"}).roi_fallback == "peak"
    assert effective_config(None, {"roi_fallback": "none"}, {"QZOOM_ROI_FALLBACK": "peak"}).roi_fallback == "none"
    assert QZoomConfig.from_dict({**QZoomConfig().to_dict(), "roi_fallback": "peak"}).roi_fallback == "peak"


def _image() -> Image.Image:
    img = Image.new("RGB", (640, 480), (235, 235, 235))
    ImageDraw.Draw(img).rectangle((300, 200, 360, 250), fill=(200, 30, 30))
    return img


def test_zoom_without_a_cell_above_tau_roi_uses_the_peak_region_when_asked(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.zoom import zoom_generate

    path = tiny_dir("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    torch.manual_seed(0)
    attach_branches(model)
    img = _image()
    inputs = chat_inputs(processor, [img], "What colour is the box?")
    kw = dict(mode="always", tau_roi=1.0, roi_min_tokens=16, roi_max_tokens=64)  # no cell can exceed 1.0
    released = QZoomConfig(**kw).resolved_for("qwen2_5_vl", 8, 128)
    peak = QZoomConfig(**kw, roi_fallback="peak").resolved_for("qwen2_5_vl", 8, 128)
    off = zoom_generate(model, processor, inputs, [[img]], released, max_new_tokens=2, do_sample=False).stats[0]
    on = zoom_generate(model, processor, inputs, [[img]], peak, max_new_tokens=2, do_sample=False).stats[0]
    assert (off.reason, off.zoomed, off.fallback, off.box) == ("no_roi", False, "", None)
    assert (on.reason, on.zoomed, on.fallback) == ("forced", True, "roi_peak")
    assert on.box is not None and on.visual_tokens_roi >= 16
    x0, y0, x1, y1 = on.grid_box
    assert 0 <= x0 < x1 <= on.grid[1] and 0 <= y0 < y1 <= on.grid[0]
