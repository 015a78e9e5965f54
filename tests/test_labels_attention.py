"""Response-to-image attention recorded during generate(), checked against a teacher-forced eager forward.

Answers are scripted with a logits processor (one sample stops early with EOS, the other runs to the token
cap), so the decode steps that must count are known exactly, on all three families.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from qzoom_swift.families import get_adapter
from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.labels.attention import (
    KNOWN_ATTENTION_HEADS,
    HeadSelection,
    SampleAttention,
    auto_candidate_layers,
    eos_token_ids,
    generate_with_attention,
    image_grids,
    known_head_selection,
    normalized_entropy,
    rank_layers_by_concentration,
)
from qzoom_swift.synthetic.images import QUESTION, make_shape_image, sample_shapes


class Script(LogitsProcessor):
    """Force row b to emit ``tokens[b][step]`` (greedy then picks it)."""

    def __init__(self, tokens: list[list[int]], prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        for b, seq in enumerate(self.tokens):
            forced[b, seq[min(step, len(seq) - 1)]] = 0.0
        return forced


@pytest.fixture(scope="module", params=FAMILIES)
def eager(request, tiny_dir):
    family = request.param
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_dir(family), attn_implementation={"text_config": "eager", "vision_config": "sdpa"}).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir(family))
    return family, model, processor


@pytest.mark.parametrize("queries", ["answer", "answer+prompt"])
def test_recorded_rows_equal_teacher_forced_attention_and_stop_at_eos(eager, queries):
    family, model, processor = eager
    extra = int(queries == "answer+prompt")  # the last prompt position is one more query row
    samples = sample_shapes(2, seed=3)
    images = [make_shape_image(samples[0], (392, 280)), make_shape_image(samples[1], (224, 336))]  # non-square
    inputs = chat_inputs(processor, [[images[0]], [images[1]]], [QUESTION, QUESTION + " Answer briefly."])
    eos = eos_token_ids(model, processor.tokenizer)
    prompt_len = inputs["input_ids"].shape[1]
    script = [[101, 102, eos[0], eos[0], eos[0]], [201, 202, 203, 204, 205]]
    layers, norm_layers = [2, 5], [3]
    new, results = generate_with_attention(model, inputs, layers, norm_layers, eos, max_new_tokens=5, queries=queries,
                                           logits_processor=LogitsProcessorList([Script(script, prompt_len)]))
    assert new[0, :3].tolist() == script[0][:3] and new[1].tolist() == script[1]
    # sample 0 feeds y1, y2 (the EOS is never counted); sample 1 feeds y1..y4 (y5 is never fed)
    assert [r.num_steps for r in results] == [2 + extra, 4 + extra]

    full = torch.cat([inputs["input_ids"], new], dim=1)
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=full, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1),
                    output_attentions=True, output_hidden_states=True, **kwargs)
    image_id = get_adapter(model).image_token_id(model)
    grids = image_grids(model, inputs)
    num_heads = int(get_adapter(model).text_config(model).num_attention_heads)
    for b, res in enumerate(results):
        pos = torch.nonzero(inputs["input_ids"][b] == image_id).flatten()
        assert pos.numel() == grids[b][0] * grids[b][1]
        for layer in layers:
            first = prompt_len - extra
            rows = ref.attentions[layer][b, :, first:first + res.num_steps][:, :, pos].mean(dim=1)
            assert res.per_layer[layer].shape == (num_heads, pos.numel())
            torch.testing.assert_close(res.per_layer[layer], rows.float(), atol=1e-6, rtol=1e-5)
        # hidden_states[l] is the input of decoder layer l
        norms = ref.hidden_states[3][b, pos].float().norm(dim=-1)
        torch.testing.assert_close(res.norms[3], norms, atol=1e-5, rtol=1e-5)
    if family != "llava":
        assert grids[0] != grids[1] and grids[0][0] != grids[0][1]  # non-square and different per image


def test_sdpa_attention_gives_a_clear_error(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl"), attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(tiny_dir("qwen2_5_vl"))
    image = make_shape_image(sample_shapes(1)[0])
    inputs = chat_inputs(processor, [image], QUESTION)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        generate_with_attention(model, inputs, [1], [1], eos_token_ids(model, processor.tokenizer), max_new_tokens=3)


def test_head_mean_averages_the_selected_layer_head_pairs():
    per_layer = {3: torch.tensor([[1.0, 0.0], [3.0, 2.0]]), 5: torch.tensor([[5.0, 4.0], [7.0, 6.0]])}
    sample = SampleAttention(per_layer, {}, num_steps=2)
    assert sample.head_mean({3: (1,), 5: (0,)}).tolist() == [4.0, 3.0]
    assert sample.head_mean({3: None}).tolist() == [2.0, 1.0]
    assert sample.head_mean({3: None, 5: (1,)}).tolist() == pytest.approx([11 / 3, 8 / 3])
    assert sample.head_mean({}) is None


def test_head_selection_spec_round_trip_and_checks():
    assert HeadSelection.parse_spec("20:1,4;22:14") == {20: (1, 4), 22: (14,)}
    assert HeadSelection.parse_spec(" 14 ; 16 ") == {14: None, 16: None}
    with pytest.raises(ValueError, match="bad head spec"):
        HeadSelection.parse_spec("20:a")
    with pytest.raises(ValueError, match="empty head spec"):
        HeadSelection.parse_spec(" ; ")
    sel = HeadSelection({20: (1, 4), 22: None}, {8: (1,)}, 1e-3, "custom")
    assert sel.layers == [8, 20, 22]
    assert HeadSelection.from_dict(sel.to_dict()) == sel
    sel.check(num_layers=36, num_heads=16)
    with pytest.raises(ValueError, match="decoder layers"):
        sel.check(num_layers=21, num_heads=16)
    with pytest.raises(ValueError, match="heads"):
        HeadSelection({2: (9,)}).check(num_layers=8, num_heads=4)
    with pytest.raises(ValueError, match="at least one grounding layer"):
        HeadSelection({})


def test_known_tables_match_the_released_choices():
    q7 = known_head_selection("qwen2_5_vl", 28, 3584, "textual")
    assert q7.grounding == {22: (1, 4), 23: (6, 11)} and q7.sink == {}
    q7n = known_head_selection("qwen2_5_vl", 28, 3584, "natural")
    assert q7n.grounding == {16: (1, 7, 17), 19: (17, 20)} and q7n.sink == {9: (4, 22)}
    q3 = known_head_selection("qwen3_vl", 36, 2560, "textual")
    assert q3.grounding == {19: (24, 27), 24: (21, 23)} and q3.sink == {24: (6, 10)}
    assert known_head_selection("qwen2_5_vl", 36, 2048, "natural").sink == {8: (1, 13)}
    llava = known_head_selection("llava", 32, 4096)
    assert llava.grounding == {14: (13, 24, 26)} and llava.sink == {2: None} and llava.sink_threshold == 1e-3
    assert known_head_selection("qwen2_5_vl", 8, 128) is None  # tiny model: auto
    with pytest.raises(ValueError, match="mode"):
        known_head_selection("qwen2_5_vl", 28, 3584, "photo")
    for (family, layers, _), table in KNOWN_ATTENTION_HEADS.items():
        for sel in table.values():
            sel.check(layers, 64)
            assert sel.source.startswith("known:") and family in FAMILIES


def test_auto_candidates_cover_the_middle_to_late_band():
    assert auto_candidate_layers(8) == [2, 3, 4, 5, 6]
    assert auto_candidate_layers(28) == list(range(8, 24))
    assert auto_candidate_layers(36) == list(range(11, 31))
    assert auto_candidate_layers(1) == [0]
    # every released grounding layer lies inside the band of its model
    for (_, layers, _), table in KNOWN_ATTENTION_HEADS.items():
        band = set(auto_candidate_layers(layers))
        for sel in table.values():
            assert set(sel.grounding) <= band


def test_concentration_ranking_prefers_focused_maps():
    assert normalized_entropy(torch.ones(16)) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(0.0)
    half = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert normalized_entropy(half) == pytest.approx(math.log(2) / math.log(4))
    assert normalized_entropy(torch.zeros(4)) == 1.0
    flat, peaked, mid = torch.ones(9), torch.tensor([0.1] * 8 + [5.0]), torch.tensor([1.0] * 3 + [0.1] * 6)
    samples = [{2: flat, 3: peaked, 4: mid}, {2: flat, 3: mid, 4: peaked}, {2: flat, 3: peaked, 4: mid}]
    ranking = rank_layers_by_concentration(samples)
    assert [layer for layer, _ in ranking] == [3, 4, 2]
    assert ranking[-1][1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no calibration samples"):
        rank_layers_by_concentration([])
