"""families/compat.py on whichever transformers is installed: both sides of each version difference.

The main .venv (5.19) never takes the 5.6 paths through the models; these tests drive them directly against
references written here. tests/test_transformers_range.py runs the model tests under 5.6.0 itself.
"""

from __future__ import annotations

import torch

from qzoom_swift.families import compat


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _mrope_reference(q, cos3, sin3, section):
    """transformers 5.6's apply_multimodal_rotary_pos_emb, written out: chunk i of the channels from axis i % 3."""
    bounds = torch.tensor(section * 2).cumsum(0).tolist()
    cos = torch.empty(cos3.shape[1:])
    sin = torch.empty(sin3.shape[1:])
    start = 0
    for i, end in enumerate(bounds):
        cos[..., start:end], sin[..., start:end] = cos3[i % 3, ..., start:end], sin3[i % 3, ..., start:end]
        start = end
    return q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)


def test_compose_mrope_matches_the_per_axis_rotation_and_passes_composed_tables_through():
    g = torch.Generator().manual_seed(0)
    section = [2, 3, 3]  # head dim 16
    cos3, sin3 = torch.randn(3, 2, 5, 16, generator=g), torch.randn(3, 2, 5, 16, generator=g)
    q = torch.randn(2, 4, 5, 16, generator=g)
    cos, sin = compat.compose_mrope(cos3, sin3, section)
    assert cos.shape == (2, 5, 16)
    rotated = compat.qwen2_5_vl_apply_rotary(q, q, cos, sin)[0]
    torch.testing.assert_close(rotated, _mrope_reference(q, cos3, sin3, section), rtol=0, atol=0)
    assert compat.compose_mrope(cos, sin, section)[0] is cos  # already composed: untouched


def test_composed_tables_expanded_for_an_old_stock_layer_compose_back_exactly():
    g = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    three = tuple(t.unsqueeze(0).expand(3, *t.shape) for t in (cos, sin))
    again = compat.compose_mrope(*three, [2, 3, 3])
    assert torch.equal(again[0], cos) and torch.equal(again[1], sin)
    stock = compat.stock_mrope_tables((cos, sin))
    expected_ndim = 3 if compat.qwen2_5_vl_composes_mrope() else 4
    assert stock[0].ndim == expected_ndim and torch.equal(stock[0].reshape(-1, *cos.shape)[-1], cos)


def test_compose_mrope_names_a_missing_section():
    table = torch.zeros(3, 1, 2, 16)
    for section in (None, [2, 2, 2]):
        try:
            compat.compose_mrope(table, table, section)
        except ValueError as exc:
            assert "mrope_section" in str(exc)
        else:
            raise AssertionError(f"{section} accepted")


def test_mask_builders_get_the_requested_cache_layer_with_or_without_layer_idx():
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, length in ((0, 7), (1, 7), (2, 3)):  # layers [0, 2) saw 4 more tokens than layer 2
        cache.update(torch.zeros(1, 1, length, 4), torch.zeros(1, 1, length, 4), layer)
    seen = {}

    def new_builder(config, inputs_embeds, attention_mask, past_key_values=None, position_ids=None, layer_idx=None):
        seen["new"] = past_key_values.get_mask_sizes(inputs_embeds.shape[1], layer_idx)
        return "new"

    def old_builder(config, inputs_embeds, attention_mask, past_key_values=None, position_ids=None):
        assert not hasattr(past_key_values, "is_sliding")  # else 5.6 would pick a layer itself
        seen["old"] = (past_key_values.get_seq_length(), past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0))
        return "old"

    hidden = torch.zeros(1, 2, 4)
    for build in (new_builder, old_builder):
        assert compat.causal_mask(build, config=None, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=cache, layer_idx=2) == build.__name__.split("_")[0]
    assert seen["new"] == (5, 0)
    assert seen["old"] == (3, (5, 0))  # layer 2's length, not layer 0's 7


def test_deepstack_levels_are_one_tensor_per_level_in_both_shapes():
    a, b = torch.ones(4, 3), torch.zeros(2, 3)
    per_image = compat.concat_levels([(a, b), (b, a)])  # 5.19: split per image
    whole = compat.concat_levels([torch.cat([a, b]), torch.cat([b, a])])  # 5.6: one tensor per level
    assert all(torch.equal(x, y) for x, y in zip(per_image, whole)) and per_image[0].shape == (6, 3)
    assert compat.concat_levels(None) is None
