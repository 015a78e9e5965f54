"""The full-size shapes (``FULL_SIZE_CONFIGS``) match the real checkpoints, and cutting their depth keeps what
Q-Zoom depends on (a full-attention vision block, a DeepStack tap, a valid B/R); benchmarks/full_width_check.py
runs the paths on these cuts."""

from __future__ import annotations

import pytest
import torch

from qzoom_swift.config import QZoomConfig
from qzoom_swift.synthetic.models import (
    FULL_SIZE_CONFIGS,
    FULL_SIZE_SHORT_NAMES,
    cut_full_size_config,
    full_size_config,
)

# name: (layers, hidden, heads, kv heads, head_dim, intermediate, vocab, rms eps, tied, mrope section)
TEXT_FACTS = {
    "Qwen2.5-VL-7B-Instruct": (28, 3584, 28, 4, 128, 18944, 152064, 1e-6, False, [16, 24, 24]),
    "Qwen2.5-VL-3B-Instruct": (36, 2048, 16, 2, 128, 11008, 151936, 1e-6, True, [16, 24, 24]),
    "Qwen3-VL-4B-Instruct": (36, 2560, 32, 8, 128, 9728, 151936, 1e-6, True, [24, 20, 20]),
    "llava-1.5-7b-hf": (32, 4096, 32, 32, 128, 11008, 32064, 1e-5, False, None),
}
# name: (vision depth, width, full-attention blocks, DeepStack taps, patch size)
VISION_FACTS = {
    "Qwen2.5-VL-7B-Instruct": (32, 1280, [7, 15, 23, 31], None, 14),
    "Qwen2.5-VL-3B-Instruct": (32, 1280, [7, 15, 23, 31], None, 14),
    "Qwen3-VL-4B-Instruct": (24, 1024, None, [5, 11, 17], 16),
    "llava-1.5-7b-hf": (24, 1024, None, None, 14),
}


def _head_dim(text) -> int:
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def test_every_full_size_shape_is_checked():
    assert set(TEXT_FACTS) == set(FULL_SIZE_CONFIGS) == set(VISION_FACTS) == set(FULL_SIZE_SHORT_NAMES.values())


@pytest.mark.parametrize("name", sorted(TEXT_FACTS))
def test_full_size_text_shapes(name):
    _, config = full_size_config(name)
    text = config.text_config
    layers, hidden, heads, kv, head_dim, inter, vocab, eps, tied, mrope = TEXT_FACTS[name]
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (
        layers, hidden, heads, kv)
    assert (_head_dim(text), text.intermediate_size, text.vocab_size, text.rms_norm_eps) == (head_dim, inter, vocab, eps)
    assert bool(config.tie_word_embeddings) is tied
    rope = getattr(text, "rope_parameters", None) or {}
    assert rope.get("mrope_section") == mrope
    if mrope is not None:
        assert sum(mrope) == head_dim // 2  # the sections split the rotary half of head_dim
    if name.startswith("Qwen3"):
        assert rope.get("mrope_interleaved") is True and rope["rope_theta"] == 5000000.0


@pytest.mark.parametrize("name", sorted(VISION_FACTS))
def test_full_size_vision_shapes(name):
    _, config = full_size_config(name)
    vision = config.vision_config
    depth, width, fullatt, deepstack, patch = VISION_FACTS[name]
    assert (getattr(vision, "depth", None) or vision.num_hidden_layers, vision.hidden_size, vision.patch_size) == (
        depth, width, patch)
    assert getattr(vision, "fullatt_block_indexes", None) == fullatt
    assert getattr(vision, "deepstack_visual_indexes", None) == deepstack
    if name.startswith("llava"):
        assert (vision.image_size, config.image_seq_length, config.vision_feature_layer) == (336, 576, -2)
    else:
        assert vision.out_hidden_size == config.text_config.hidden_size


def test_qwen2_5_vl_attention_reads_head_dim_128():
    """Qwen2.5-VL's config has no head_dim: the attention derives it (hidden / heads) from the config."""
    from transformers import AutoModelForImageTextToText

    _, config = full_size_config("Qwen2.5-VL-7B-Instruct")
    config.text_config.num_hidden_layers = 1
    config.vision_config.depth = 1
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    attn = model.model.language_model.layers[0].self_attn
    assert attn.head_dim == 128 and attn.k_proj.out_features == 4 * 128 and attn.q_proj.out_features == 3584


@pytest.mark.parametrize(("short", "vision_layers", "fullatt"), [
    ("qwen2_5_vl_7b", 8, (7,)), ("qwen2_5_vl_7b", 16, (7, 15)), ("qwen2_5_vl_3b", 6, (5,)),
])
def test_cut_keeps_a_full_attention_block(short, vision_layers, fullatt):
    cut = cut_full_size_config(short, 4, vision_layers)
    assert cut.config.vision_config.depth == vision_layers
    assert cut.full_attention_blocks == fullatt == tuple(cut.config.vision_config.fullatt_block_indexes)
    assert cut.config.vision_config.hidden_size == 1280 and cut.deepstack_taps == ()


@pytest.mark.parametrize(("text_layers", "vision_layers", "b", "taps"), [
    (4, 8, 1, (5,)), (4, 24, 1, (5,)), (5, 24, 2, (5, 11)), (6, 24, 3, (5, 11, 17)), (6, 4, 3, (3,)),
])
def test_cut_keeps_deepstack_taps_below_b(text_layers, vision_layers, b, taps):
    cut = cut_full_size_config("qwen3_vl_4b", text_layers, vision_layers)
    assert (cut.branch_layer, cut.deepstack_taps) == (b, taps)
    assert tuple(cut.config.vision_config.deepstack_visual_indexes) == taps
    assert len(taps) <= cut.branch_layer  # every injection lands below the branch layers


@pytest.mark.parametrize("short", sorted(FULL_SIZE_SHORT_NAMES))
@pytest.mark.parametrize("text_layers", [4, 7])
def test_cut_keeps_widths_and_a_valid_branch_layout(short, text_layers):
    family, full = full_size_config(FULL_SIZE_SHORT_NAMES[short])
    cut = cut_full_size_config(short, text_layers, 8)
    text, full_text = cut.config.text_config, full.text_config
    assert cut.family == family and text.num_hidden_layers == text_layers
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(text, key) == getattr(full_text, key), key
    assert _head_dim(text) == _head_dim(full_text) == 128
    assert cut.branch_depth == 3 and 1 <= cut.branch_layer and cut.branch_layer + 3 <= text_layers
    resolved = QZoomConfig().resolved_for(family, text_layers, text.hidden_size)
    assert resolved.branch_layer == cut.branch_layer  # what attach_branches will pick on the cut model


def test_cut_rejects_depths_without_room_and_fixes_llava_image_token():
    with pytest.raises(ValueError, match="keep >= 4"):
        cut_full_size_config("qwen2_5_vl_7b", 3, 8)
    with pytest.raises(ValueError, match="second to last"):
        cut_full_size_config("llava1_5_7b", 4, 1)
    with pytest.raises(KeyError, match="no full-size shape"):
        cut_full_size_config("qwen9", 4, 8)
    cut = cut_full_size_config("llava1_5_7b", 4, 3, image_token_id=753)
    assert cut.config.image_token_id == 753 and cut.config.vision_config.num_hidden_layers == 3
    assert cut.config.text_config.vocab_size == 32064
    assert cut_full_size_config("qwen2_5_vl_7b", 4, 8, image_token_id=753).config.image_token_id == 151655


@pytest.mark.parametrize(("name", "params"), [
    ("Qwen2.5-VL-7B-Instruct", 8_292_166_656), ("Qwen2.5-VL-3B-Instruct", 3_754_622_976),
    ("Qwen3-VL-4B-Instruct", 4_437_815_808), ("llava-1.5-7b-hf", 7_063_427_072),
])
def test_full_size_parameter_count_is_the_checkpoints(name, params):
    """The meta-device model has exactly the published checkpoint's parameter count (tied weights once)."""
    from transformers import AutoModelForImageTextToText

    _, config = full_size_config(name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
