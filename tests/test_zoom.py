"""Zoom inference on the tiny models: prefix-reuse parity, decoding, per-sample decisions and fallbacks."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from qzoom_swift.branches import attach_branches, detach_branches
from qzoom_swift.config import QZoomConfig
from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.prefill import prefill
from qzoom_swift.zoom import zoom_decisions, zoom_generate, zoom_prefill


def _image(size=(640, 480), seed=0):
    img = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(img)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        x0, y0 = (torch.randint(0, size[0] - 60, (1,), generator=g).item(),
                  torch.randint(0, size[1] - 60, (1,), generator=g).item())
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
        draw.rectangle((x0, y0, x0 + 50, y0 + 40), fill=colour)
    return img


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            path = tiny_dir(family)
            model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn).eval()
            cache[(family, attn)] = (model, AutoProcessor.from_pretrained(path))
        model, processor = cache[(family, attn)]
        detach_branches(model)
        torch.manual_seed(0)  # the gate head is a fresh Linear: same draw whatever ran before
        attach_branches(model)
        return model, processor

    return get


def _partial_box_config(model, inputs, family, **overrides) -> QZoomConfig:
    """A tau_roi at the 90th percentile of the blurred heatmap, so the box is a real sub-region."""
    from qzoom_swift.roi import heatmap_probabilities

    probs = heatmap_probabilities(prefill(model, **inputs).heatmaps()[-1].detach()).flatten()
    tau = float(probs.kthvalue(int(probs.numel() * 0.9)).values)
    base = dict(tau_roi=tau, roi_min_tokens=16, roi_max_tokens=64, mode="always")
    base.update(overrides)
    return QZoomConfig(**base).resolved_for(family, 8, 128)


def _stock_logits(model, family, z, inputs):
    n = z.input_ids.numel()
    kwargs = dict(input_ids=z.input_ids[None], position_ids=z.positions,
                  attention_mask=torch.ones(1, n, dtype=torch.long),
                  pixel_values=torch.cat([inputs["pixel_values"], z.pixel_values]))
    if family != "llava":
        kwargs["image_grid_thw"] = torch.cat([inputs["image_grid_thw"], z.image_grid_thw])
    with torch.no_grad():
        return model(**kwargs).logits


def test_zoom_decisions_rule():
    assert zoom_decisions([0.2, 0.05, None], "zoom", 0.1) == [(True, "gate"), (False, "below_gate"),
                                                               (False, "no_image")]
    assert zoom_decisions([0.1], "zoom", 0.1) == [(True, "gate")]  # >= tau zooms
    assert zoom_decisions([0.0, 0.9], "always", 0.5) == [(True, "forced"), (True, "forced")]
    assert zoom_decisions([0.99], "never", 0.0) == [(False, "never")]
    assert zoom_decisions([float("nan")], "zoom", 0.1) == [(False, "gate_nan")]  # its own reason (issue #21)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_reuse_matches_from_scratch_prefill(loaded, family, attn):
    model, processor = loaded(family, attn)
    img = _image()
    inputs = chat_inputs(processor, [img], "What is written in the small box?")
    # a RoI budget larger than the box, so the crop's positions fall between source positions
    cfg = _partial_box_config(model, inputs, family, roi_min_tokens=128, roi_max_tokens=256)
    z = zoom_prefill(model, processor, inputs, [[img]], cfg)
    assert z is not None
    x0, y0, x1, y1 = z.grid_box
    grid = prefill(model, **inputs).embedded.grids[-1]
    assert (x1 - x0) * (y1 - y0) < grid[0] * grid[1], "expected a sub-region of the image"
    ref = _stock_logits(model, family, z, inputs)
    assert (ref - z.logits).abs().max().item() <= 1e-4
    # the inserted sequence: source prompt up to the image markup, the crop, then the question again
    ids = inputs["input_ids"][0]
    assert torch.equal(z.input_ids[-8:], ids[-8:])
    assert z.input_ids.numel() > ids.numel()
    if family != "llava":
        assert z.positions.is_floating_point() and z.positions.shape == (3, 1, z.input_ids.numel())
        assert not torch.equal(z.positions, z.positions.round()), "expected interpolated (fractional) positions"
        # positions matter: rounding the continuous RoI positions changes the stock logits
        z.positions = z.positions.round()
        assert (_stock_logits(model, family, z, inputs) - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_zoomed_decoding_equals_greedy_on_the_full_sequence(loaded, family):
    model, processor = loaded(family)
    img = _image(seed=3)
    inputs = chat_inputs(processor, [img], "Which colour is the top-left box?")
    cfg = _partial_box_config(model, inputs, family)
    z = zoom_prefill(model, processor, inputs, [[img]], cfg)
    out = zoom_generate(model, processor, inputs, [[img]], cfg, max_new_tokens=3, do_sample=False)
    assert out.stats[0].zoomed and out.stats[0].grid_box == z.grid_box
    # manual greedy loop with the stock forward over the whole sequence, positions continuing by +1
    ids, pos = z.input_ids[None], z.positions
    expected = []
    for _ in range(3):
        n = ids.shape[1]
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones(1, n, dtype=torch.long),
                           pixel_values=torch.cat([inputs["pixel_values"], z.pixel_values]),
                           image_grid_thw=torch.cat([inputs["image_grid_thw"], z.image_grid_thw])).logits
        token = int(logits[0, -1].argmax())
        expected.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    assert out.generated[0].tolist() == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_mode_never_equals_the_plain_model(loaded, family):
    model, processor = loaded(family)
    img = _image(seed=1)
    inputs = chat_inputs(processor, [img], "What colour is the box?")
    cfg = QZoomConfig(mode="never").resolved_for(family, 8, 128)
    out = zoom_generate(model, processor, inputs, [[img]], cfg, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.generated[0].tolist() == plain[0, inputs["input_ids"].shape[1]:].tolist()
    st = out.stats[0]
    assert not st.zoomed and st.reason == "never" and st.visual_tokens_roi == 0 and st.gate_prob is None
    assert st.visual_tokens_low == int((inputs["input_ids"] == model.config.image_token_id).sum())


MIX_QUESTIONS = ["What colour is the box on the left?", "Colour?", "Which shape is the largest one here?",
                 "Say hello."]


def _mixed_batch(model, processor, family, mix: str):
    """Four samples (three images, one text-only) and a config giving the ``mix`` of continuations.

    ``mixed``: the gate zooms the two most likely samples, one of which has no original to crop (no region),
    the third stays below the gate, the fourth has no image. ``all`` / ``none``: mode always / never.
    """
    from qzoom_swift.roi import heatmap_probabilities

    imgs = [_image(seed=4), _image(size=(480, 640), seed=5), _image(size=(560, 420), seed=8)]
    prompt_images = [[imgs[0]], [imgs[1]], [imgs[2]], []]
    state = prefill(model, **chat_inputs(processor, prompt_images, MIX_QUESTIONS))
    probs = torch.sigmoid(state.gate_logit.detach())[:3].tolist()
    order = sorted(range(3), key=lambda i: -probs[i])
    blurred = heatmap_probabilities(state.heatmaps()[order[0]].detach()).flatten()
    tau_roi = float(blurred.kthvalue(int(blurred.numel() * 0.75)).values)  # a real sub-region of that image
    sources = [list(images) for images in prompt_images]
    if mix == "mixed":
        second, third = probs[order[1]], probs[order[2]]
        assert second - third > 3e-4  # well above batch-vs-single numerical noise (< 1e-4)
        tau_gate, sources[order[1]] = (second + third) / 2, []
    cfg = QZoomConfig(mode={"mixed": "zoom", "all": "always", "none": "never"}[mix],
                      tau_gate=tau_gate if mix == "mixed" else 0.5, tau_roi=tau_roi, roi_min_tokens=16,
                      roi_max_tokens=64).resolved_for(family, 8, 128)
    return prompt_images, sources, cfg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mix", ["mixed", "all", "none"])
def test_batched_continuation_gives_the_same_answers_as_one_by_one(loaded, family, attn, mix):
    """The contract of the batched continuation: a batch answers each sample as a batch of one would."""
    model, processor = loaded(family, attn)
    prompt_images, sources, cfg = _mixed_batch(model, processor, family, mix)
    batch = chat_inputs(processor, prompt_images, MIX_QUESTIONS)
    gen = dict(max_new_tokens=4, do_sample=False)
    together = zoom_generate(model, processor, batch, sources, cfg, **gen)
    per_sample = zoom_generate(model, processor, batch, sources, cfg, continuation="per_sample", **gen)
    reasons = [s.reason for s in together.stats]
    expected = {"mixed": {"gate", "no_roi", "below_gate", "no_image"}, "all": {"forced", "no_image"},
                "none": {"never"}}[mix]
    assert set(reasons) == expected, reasons
    for i in range(len(MIX_QUESTIONS)):
        alone = zoom_generate(model, processor, chat_inputs(processor, [prompt_images[i]], [MIX_QUESTIONS[i]]),
                              [sources[i]], cfg, **gen)
        for out in (together, per_sample):
            assert out.generated[i].tolist() == alone.generated[0].tolist(), (i, reasons[i])
            got, ref = out.stats[i], alone.stats[0]
            assert (got.zoomed, got.reason, got.grid_box, got.visual_tokens_roi, got.prompt_tokens) == \
                (ref.zoomed, ref.reason, ref.grid_box, ref.visual_tokens_roi, ref.prompt_tokens)
            assert (got.gate_prob is None) == (ref.gate_prob is None)
            if ref.gate_prob is not None:
                assert abs(got.gate_prob - ref.gate_prob) < 1e-4
    assert sum(s.zoomed for s in together.stats) == {"mixed": 1, "all": 3, "none": 0}[mix]
    assert all(s.time_pass2_s > 0 and s.time_decode_s > 0 for s in together.stats)


def test_unknown_continuation_is_refused(loaded):
    model, processor = loaded("llava")
    with pytest.raises(ValueError, match="continuation"):
        zoom_generate(model, processor, chat_inputs(processor, [_image()], "Colour?"), [[_image()]],
                      continuation="sideways", max_new_tokens=1)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_no_region_falls_back_to_the_low_resolution_answer(loaded, family):
    model, processor = loaded(family)
    img = _image(seed=2)
    inputs = chat_inputs(processor, [img], "What colour is the box?")
    nothing = QZoomConfig(mode="always", tau_roi=1.0).resolved_for(family, 8, 128)  # no cell can exceed 1.0
    out = zoom_generate(model, processor, inputs, [[img]], nothing, max_new_tokens=3, do_sample=False)
    never = zoom_generate(model, processor, inputs, [[img]], QZoomConfig(mode="never").resolved_for(family, 8, 128),
                          max_new_tokens=3, do_sample=False)
    assert out.stats[0].reason == "no_roi" and not out.stats[0].zoomed
    assert out.generated[0].tolist() == never.generated[0].tolist()


def test_stats_account_for_both_passes(loaded):
    model, processor = loaded("qwen2_5_vl")
    img = _image(size=(800, 600), seed=6)
    inputs = chat_inputs(processor, [img], "Read the text.")
    cfg = _partial_box_config(model, inputs, "qwen2_5_vl", roi_min_tokens=32, roi_max_tokens=32)
    st = zoom_generate(model, processor, inputs, [[img]], cfg, max_new_tokens=2, do_sample=False).stats[0]
    assert st.zoomed and st.reason == "forced"
    assert 16 <= st.visual_tokens_roi <= 32  # within the 32-token RoI budget (smart_resize rounds down)
    left, top, right, bottom = st.box
    assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
    assert st.prompt_tokens == inputs["input_ids"].shape[1] + st.visual_tokens_roi + 2  # + <vs>, <ve>
    assert st.time_pass1_s > 0 and st.time_pass2_s > 0 and st.time_decode_s > 0
    assert st.to_dict()["visual_tokens"] == st.visual_tokens_low + st.visual_tokens_roi


def test_right_padding_is_refused(loaded):
    model, processor = loaded("llava")
    batch = chat_inputs(processor, [[_image()], [_image()]], ["Colour?", "What is the colour here?"],
                        padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        zoom_generate(model, processor, batch, [[_image()], [_image()]], max_new_tokens=1)


def test_generation_settings_are_folded_into_one_config_per_batch(loaded):
    """zoom_generate builds the GenerationConfig once, so generate() skips its per-call legacy-config check."""
    from qzoom_swift.zoom import generation_settings

    model, _ = loaded("qwen2_5_vl")
    out = generation_settings(model, {"max_new_tokens": 3, "do_sample": False, "use_model_defaults": False})
    assert out["generation_config"].max_new_tokens == 3 and out["generation_config"].do_sample is False
    assert out["use_model_defaults"] is False and "max_new_tokens" not in out  # not a setting: passed through
    assert out["generation_config"] is not model.generation_config  # the model's own config is untouched
    assert model.generation_config.max_new_tokens != 3
    given = {"generation_config": out["generation_config"], "max_new_tokens": 5}
    assert generation_settings(model, given) is given
