"""Fidelity to the released Q-Zoom code (issue #20): sink masks, released stage-1 grid, judge prompt,
stage-3 scoring, LLaVA RoI padding, stage-3 gate initialisation, and value-level guards of two loss rules."""

from __future__ import annotations

import math

import pytest
import torch

from qzoom_swift.labels.tristate import BG, FG, IGNORE, tristate_labels
from qzoom_swift.losses import IGNORE_INDEX, gate_bce_loss

# ------------------------------------------------------------------------------ mutation guards (values)


def test_tristate_background_is_strictly_below_tau_bg_times_peak():
    """A cell exactly at tau_bg * peak is ignored, not background (``g < tau_bg * peak``, strict)."""
    attn = torch.zeros(6, 6)
    attn[0, 0] = 1.0  # the peak (foreground), boxed with its blurred 1-cell ring
    attn[5, 5] = 0.25  # exactly tau_bg * peak (0.25 and 1.0 are exact in float32)
    attn[5, 0] = 0.125  # below: background
    attn[0, 5] = 0.375  # above tau_bg * peak but below tau_fg * peak: ignored
    res = tristate_labels(attn, tau_fg=0.5, tau_bg=0.25, max_box_fraction=1.0)
    assert res.labels[0, 0].item() == FG
    assert res.labels[5, 5].item() == IGNORE
    assert res.labels[5, 0].item() == BG
    assert res.labels[0, 5].item() == IGNORE
    assert res.labels[3, 3].item() == BG  # zero attention, outside the box


def _bce(logit: float, label: int) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -math.log(p) if label else -math.log(1.0 - p)


def test_gate_bce_is_the_mean_over_valid_entries_not_the_sum():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    labels = torch.tensor([1, IGNORE_INDEX, 0, 0])
    want = (_bce(2.0, 1) + _bce(0.5, 0) + _bce(3.0, 0)) / 3
    assert gate_bce_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    # one valid entry: the loss is that entry's BCE, whatever the batch size
    one = gate_bce_loss(torch.tensor([0.3, 9.0, -9.0]), torch.tensor([IGNORE_INDEX, 1, IGNORE_INDEX]))
    assert one.item() == pytest.approx(_bce(9.0, 1), rel=1e-6)


def test_gate_bce_of_an_all_ignored_batch_is_an_exact_connected_zero():
    logits = torch.tensor([0.4, -2.0, 7.0], requires_grad=True)
    loss = gate_bce_loss(logits, torch.full((3,), IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3))


# ------------------------------------------------------------------------------------------ judge prompt


RELEASE_JUDGE_USER = (  # the user prompt printed in the release's qwen_src/README.md ("LLM-as-a-Judge"), line by line
    "You are an intelligent evaluator for a Visual Question Answering task.",
    "Compare the Model Predictions against the Ground Truth.",
    "",
    "--- DATA ---",
    "Question: How many cats?",
    "Ground Truth: 2",
    "Model A Prediction: There are two cats.",
    "Model B Prediction: (empty)",
    "",
    "--- CRITERIA ---",
    "1. **Containment**: If the Ground Truth is a short value (e.g., '6000') and the",
    "   Model Prediction contains it correctly within a sentence (e.g., 'The value is",
    "   6000'), mark it as **Yes**.",
    "2. **Synonyms**: Accept standard synonyms (e.g., 'Yes' = 'True', '10%' = '0.1').",
    "3. **Formatting**: Ignore punctuation or capitalization differences (e.g., 'april' = 'April').",
    "4. **Contradiction**: Only mark 'No' if the prediction is factually wrong or",
    "   missing the key information.",
    "",
    "--- TASK ---",
    "Does Model A provide the correct answer? (Yes/No)",
    "Does Model B provide the correct answer? (Yes/No)",
    "",
    "Respond in this exact format:",
    "A: [Yes/No]",
    "B: [Yes/No]",
)


def test_judge_prompt_is_the_released_text_verbatim():
    from qzoom_swift.labels.judge import judge_prompt, parse_judgement

    system, user = judge_prompt("How many cats?", "2", "There are two cats.", "")
    assert system == {"role": "system", "content": "You are a fair and robust evaluator. "
                                                   "You focus on semantic correctness over strict string matching."}
    assert user["role"] == "user"
    assert user["content"].split("\n") == list(RELEASE_JUDGE_USER)
    # parsing stays lenient, and reads the released format's brackets
    assert (parse_judgement("A: Yes\nB: No").a, parse_judgement("A: Yes\nB: No").b) == (True, False)
    assert (parse_judgement("A: [Yes]\nB: [No]").a, parse_judgement("A: [Yes]\nB: [No]").b) == (True, False)
    assert parse_judgement("**A**: no, b = YES.").b is True


# ------------------------------------------------------------------------------------- stage-3 scoring

# The lenient ``consensus`` scoring (an option; the release's own filter, ``released``, is the default and is
# checked against a transcription of the release in test_stage3_release.py).
# (answers at 5 ascending budgets, ground truth, expected kind, every (label, budget index) the draw can give;
# None = the released -100, no example). The top two budgets (3, 4) form the reference and are never inputs.
CONSENSUS_CASES = [
    (["blue", "blue", "red", "red", "Red."], "red", "transition", {(1, 0), (1, 1), (0, 2)}),
    (["red", "red", "red", "red", "red"], "red", "easy", {(0, 0), (0, 1), (0, 2)}),
    # containment: a sentence holding the truth is right; tie of the top two: the lower budget's answer
    (["The car is red.", "red", "red car", "red", "It is red"], "red", "easy", {(0, 0), (0, 1), (0, 2)}),
    # either direction: "car" is inside the consensus "the red car", so it counts as right
    (["blue", "car", "red car", "the red car", "red car"], "red", "transition", {(1, 0), (0, 1), (0, 2)}),
    (["blue", "red", "blue", "red", "red"], "red", "unstable", set()),  # wrong budgets are not a prefix
    (["red", "red", "red", "red", "blue"], "red", "unstable_top", set()),  # the top two disagree
    (["blue", "blue", "blue", "green", "green"], "red", "hallucinated", set()),  # consensus misses the truth
    (["blue", "blue", "blue", "red", "red"], "red", "transition", {(1, 1), (1, 2), None}),  # no right budget below
    (["7", "10%", "ten", "ten.", "Ten"], ["10", "ten"], "transition", {(1, 0), (1, 1), (0, 2)}),
    # deliberate difference: an empty answer is wrong here (the released substring test matched it)
    (["", "", "red", "red", "red"], "red", "transition", {(1, 0), (1, 1), (0, 2)}),
]


def _trajectory(answers, gt, i=0):
    truth = gt if isinstance(gt, str) else gt[0]
    return {"qzoom_id": f"{i}-case", "messages": [{"role": "user", "content": "<image>Which colour?"},
                                                  {"role": "assistant", "content": truth}],
            "answers": gt if not isinstance(gt, str) else None, "images": ["x.png"],
            "qzoom_budgets": [64, 144, 256, 576, 1024], "qzoom_answers": answers, "qzoom_patch_unit": 28}


@pytest.mark.parametrize(("answers", "gt", "kind", "draws"), CONSENSUS_CASES)
def test_stage3_labels_under_the_lenient_consensus_rule(answers, gt, kind, draws):
    from qzoom_swift.config import GateSampling
    from qzoom_swift.labels.gate import choose_gate_example, sample_rng, trajectory_class

    row = _trajectory(answers, gt)
    if not isinstance(gt, str):  # several ground truths: take them from the answers field
        row["messages"] = row["messages"][:1]
    cls, _ = trajectory_class(row, GateSampling(scoring="consensus"))
    assert cls.kind == kind
    seen = {choose_gate_example(cls, 5, sample_rng(f"s{i}", 0)) for i in range(300)}
    assert seen == (draws or {None})


def test_gate_training_rows_draw_the_consensus_rows_from_a_table():
    from qzoom_swift.config import GateSampling
    from qzoom_swift.labels.gate import gate_training_rows

    rows = [_trajectory(a, g, i) for i, (a, g, *_rest) in enumerate(CONSENSUS_CASES) if isinstance(g, str)]
    train, summary = gate_training_rows(rows, GateSampling(scoring="consensus", seed=3))
    assert summary["kinds"] == {"transition": 4, "easy": 2, "unstable": 1, "unstable_top": 1, "hallucinated": 1}
    assert summary["easy_dropped_for_balance"] == 0  # 2 easy <= 4 transitions: all kept (1:1 at most)
    for row in train:
        meta = row["qzoom_gate_meta"]
        case = CONSENSUS_CASES[int(meta["id"].split("-")[0])]
        index = [64, 144, 256, 576, 1024].index(meta["budget"])
        assert (row["qzoom_gate"], index) in case[3]
        assert row["chat_template_kwargs"] == {"min_pixels": meta["budget"] * 784, "max_pixels": meta["budget"] * 784}
        assert not any(k.startswith("qzoom_") for k in row if k not in ("qzoom_gate", "qzoom_gate_meta"))
    assert gate_training_rows(rows, GateSampling(scoring="consensus", seed=3))[0] == train  # seeded


def test_short_answer_instruction_is_appended_only_when_missing():
    from qzoom_swift.labels.gate import SHORT_ANSWER_INSTRUCTION, ensure_short_answer

    assert ensure_short_answer("What colour is it?") == "What colour is it?\n" + SHORT_ANSWER_INSTRUCTION
    kept = "What colour is it? Answer the question using a single word or phrase."
    assert ensure_short_answer(kept) == kept
    letter = "Which one? Answer with the option's letter from the given choices directly."
    assert ensure_short_answer(letter) == letter


# ------------------------------------------------------------------------------------------- sink masks


def _heat(h, w, cells, value=6.0, base=-10.0):
    heat = torch.full((h, w), base)
    for y, x in cells:
        heat[y, x] = value
    return heat


OBJECT = [(12, 14), (12, 15), (13, 14), (13, 15)]


def test_qwen2_5_corner_sink_is_masked_on_grids_above_256_cells():
    from qzoom_swift.families import get_adapter
    from qzoom_swift.families.qwen import corner_sink_keep_mask
    from qzoom_swift.roi import roi_box_from_heatmap

    adapter = get_adapter("qwen2_5_vl")
    sink = [(0, 0), (1, 0), (0, 1), (0, 2)]  # a strong sink in the top-left corner strips
    heat = _heat(20, 18, OBJECT + sink, value=8.0)  # 360 cells
    keep = adapter.sink_keep_mask(heat, None)
    assert keep is not None and int((~keep).sum()) == 20 // 4 + 18 // 4 - 1  # column 0 x 5 rows, row 0 x 4 cols
    assert not keep[:5, 0].any() and not keep[0, :4].any() and keep[5, 0] and keep[0, 4] and keep[1:, 1:].all()
    masked = roi_box_from_heatmap(heat, 0.3, keep_mask=keep)
    without_sink = roi_box_from_heatmap(_heat(20, 18, OBJECT, value=8.0), 0.3)
    assert masked == without_sink and masked.x0 > 2 and masked.y0 > 2  # the box excludes the sink
    assert roi_box_from_heatmap(heat, 0.3).x0 == 0  # unmasked, the sink stretches the box to the corner
    # a grid of <= 256 cells is unchanged (the released rule applies above 256 only)
    small = _heat(16, 16, [(10, 10), (0, 0), (1, 0)], value=8.0)
    assert corner_sink_keep_mask(16, 16).all()
    assert roi_box_from_heatmap(small, 0.3, keep_mask=adapter.sink_keep_mask(small, None)) == \
        roi_box_from_heatmap(small, 0.3)


def test_qwen3_first_token_sinks_are_masked():
    from qzoom_swift.families import get_adapter
    from qzoom_swift.roi import roi_box_from_heatmap

    adapter = get_adapter("qwen3_vl")
    pattern = [(2, 17), (3, 17), (19, 1)]  # tokens the first token's query hits (sigmoid >= 0.75)
    heat = _heat(20, 18, OBJECT + pattern, value=8.0)
    sink = _heat(20, 18, pattern, value=2.0, base=-3.0)  # sigmoid(2) = 0.88 >= 0.75 > sigmoid(-3)
    sink[5, 5] = math.log(3.0)  # sigmoid = 0.75 exactly: masked (>=)
    keep = adapter.sink_keep_mask(heat, sink)
    assert {(int(y), int(x)) for y, x in (~keep).nonzero().tolist()} == {*pattern, (5, 5)}
    masked = roi_box_from_heatmap(heat, 0.3, keep_mask=keep)
    assert masked == roi_box_from_heatmap(_heat(20, 18, OBJECT, value=8.0), 0.3)
    assert roi_box_from_heatmap(heat, 0.3) != masked
    assert adapter.sink_keep_mask(heat, None) is None  # no first-token map, no mask
    assert get_adapter("llava").sink_keep_mask(heat, sink) is None  # no released rule for LLaVA


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_zoom_plan_masks_sinks_counts_them_and_can_be_switched_off(tiny_dir, family):
    """Through ``zoom._plan_zoom`` on a real prefill: the planted sink is left out of the box, as if absent."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.prefill import prefill
    from qzoom_swift.zoom import ZoomStats, _plan_zoom

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir(family)).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir(family))
    attach_branches(model, QZoomConfig(branch_depth=2))
    image = Image.new("RGB", (640, 480), (120, 130, 140))
    with torch.no_grad():
        state = prefill(model, **chat_inputs(processor, [[image]], ["Colour?"]))
    rows, cols = state.embedded.grids[0]
    assert rows * cols > 256
    sink_cells = ([(0, 0), (1, 0), (0, 1)] if family == "qwen2_5_vl"  # blurred, a lone cell would stay below tau
                  else [(0, cols - 1), (0, cols - 2), (1, cols - 1), (1, cols - 2)])
    obj = [(rows // 2, cols // 2), (rows // 2 + 1, cols // 2)]

    def plant(cells):
        visual = state.embedded.visual_mask[0]
        tokens = torch.full((int(visual.sum()),), -10.0)
        for y, x in cells:
            tokens[y * cols + x] = 8.0
        state.rpn_token_logits = torch.full(visual.shape, -10.0)[None].clone()
        state.rpn_token_logits[0, visual] = tokens
        sink = torch.full((int(visual.sum()),), -5.0)
        for y, x in sink_cells if family == "qwen3_vl" else []:
            sink[y * cols + x] = 5.0
        state.rpn_sink_logits = torch.full(visual.shape, -5.0)[None].clone()
        state.rpn_sink_logits[0, visual] = sink

    cfg = QZoomConfig(tau_roi=0.3, roi_min_tokens=16, roi_max_tokens=64, branch_depth=2)
    plant(obj)
    clean = _plan_zoom(processor, cfg, state, 0, image).grid_box
    plant(obj + sink_cells)
    stats = ZoomStats()
    masked = _plan_zoom(processor, cfg, state, 0, image, stats)
    assert masked.grid_box == clean
    expected = rows // 4 + cols // 4 - 1 if family == "qwen2_5_vl" else len(sink_cells)
    assert stats.sink_cells == expected and ZoomStats(sink_cells=3).to_dict()["sink_cells"] == 3
    off = ZoomStats()
    unmasked = _plan_zoom(processor, QZoomConfig(**{**cfg.to_dict(), "sink_mask": False}), state, 0, image, off)
    assert off.sink_cells == 0 and unmasked.grid_box != clean


# ---------------------------------------------------------------------------------- stage-3 gate init


def test_stage3_starts_its_gate_from_the_model_it_trains_on(tiny_dir, tmp_path, monkeypatch):
    """Stage 1 ran on model A; stage 3 runs on B (A after "Post-SFT"): the gate must copy B's layers."""
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.branches import attach_branches, get_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.swift_plugin.tuner import QZoomTuner
    from qzoom_swift.training import set_trained_branches

    a = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl")).eval()
    branches = attach_branches(a, QZoomConfig(branch_depth=2))
    with torch.no_grad():
        for p in branches.rpn.parameters():
            p.add_(0.01)  # "stage-1 trained"
    set_trained_branches(a, ("rpn",))
    QZoomTuner.save_pretrained(a, tmp_path / "stage1")
    rpn_saved = {k: v.clone() for k, v in branches.rpn.state_dict().items()}

    b = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl")).eval()
    with torch.no_grad():
        for p in b.model.language_model.layers.parameters():
            p.add_(0.05)  # "Post-SFT" changed the layers
    monkeypatch.setenv("QZOOM_TRAIN", "gate")
    QZoomTuner.from_pretrained(b, str(tmp_path / "stage1"), is_trainable=True)
    loaded = get_branches(b)
    first = loaded.first_layer
    for i, layer in enumerate(loaded.gate.layers):
        want = b.model.language_model.layers[first + i].state_dict()
        stale = a.model.language_model.layers[first + i].state_dict()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, want[key]) and not torch.equal(value, stale[key])
    assert all(torch.equal(v, rpn_saved[k]) for k, v in loaded.rpn.state_dict().items())  # the RPN is stage 1's
    assert all(p.requires_grad for p in loaded.gate.parameters())
    assert not any(p.requires_grad for p in loaded.rpn.parameters())

    # a checkpoint whose gate has trained (a resumed stage 3) keeps its gate
    with torch.no_grad():
        for p in loaded.gate.parameters():
            p.add_(0.02)
    trained_gate = {k: v.clone() for k, v in loaded.gate.state_dict().items()}
    QZoomTuner.save_pretrained(b, tmp_path / "stage3")
    c = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl")).eval()
    QZoomTuner.from_pretrained(c, str(tmp_path / "stage3"), is_trainable=True)
    assert all(torch.equal(v, trained_gate[k]) for k, v in get_branches(c).gate.state_dict().items())


# ------------------------------------------------------------------------------------ released stage-1 grid


def test_padding_cells_of_a_500x375_image_on_the_24_grid():
    from qzoom_swift.roi import pad_to_square, padding_cells, square_padding

    assert square_padding(500, 375) == (500, 0, 62)
    cells = padding_cells((500, 375), 24)
    rows = cells.all(dim=1)
    assert rows.nonzero().flatten().tolist() == [0, 1, 2, 21, 22, 23] and not cells[3:21].any()
    assert padding_cells((375, 500), 24).equal(cells.T) and not padding_cells((300, 300), 24).any()
    from PIL import Image

    padded = pad_to_square(Image.new("RGB", (500, 375), (255, 0, 0)), (127, 127, 127))
    assert padded.size == (500, 500) and padded.getpixel((0, 61)) == (127, 127, 127)
    assert padded.getpixel((0, 62)) == (255, 0, 0) and padded.getpixel((499, 436)) == (255, 0, 0)
    assert padded.getpixel((0, 437)) == (127, 127, 127)


def test_known_background_cells_are_background_in_a_kept_sample():
    attn = torch.zeros(6, 6)
    attn[2, 2], attn[0, 5] = 1.0, 0.9  # a padding cell with high attention is zeroed, then background
    pad = torch.zeros(6, 6, dtype=torch.bool)
    pad[0] = True
    res = tristate_labels(attn, known_bg=pad, tau_fg=0.5, tau_bg=0.1, max_box_fraction=1.0)
    assert res.status == "ok" and (res.labels[0] == BG).all() and res.labels[2, 2] == FG
    assert res.box is not None and res.box.y0 == 1  # the zeroed padding does not widen the box


def test_stage1_labels_on_the_released_grid(tiny_dir, tmp_path):
    """A 500 x 375 image labelled on the released grid: 24 x 24 labels, padding rows background; the training
    template pads the image the same way."""
    import json

    from PIL import Image

    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels

    rows = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (500, 375), (40 * i, 120, 200)).save(path)
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is the picture?"},
                                  {"role": "assistant", "content": "blue"}], "images": [str(path)]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labels"
    summary = run_pseudo_labels(PseudoLabelOptions(
        model=str(tiny_dir("qwen2_5_vl")), dataset=str(data), out=str(out), grid="square", max_new_tokens=4,
        calibration=2, tau_fg=0.9, tau_bg=0.8, max_box_fraction=1.0, min_peak=0.0, progress=False))
    assert json.loads((out / "job.json").read_text())["label_grid"] == "square"
    records = [json.loads(line) for line in (out / "shard-00000.jsonl").read_text().splitlines()]
    assert len(records) == 2 and summary["outcomes"]["labelled"] == 2
    for rec in records:
        assert rec["qzoom_attn_grid"] == [24, 24] and rec["qzoom_pad_square"] is True
        labels = torch.tensor(rec["qzoom_rpn_labels"])
        assert labels.shape == (24, 24)
        assert (labels[[0, 1, 2, 21, 22, 23]] == BG).all()  # the grey padding is known background
        assert (labels[3:21] == FG).any()

    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.swift_plugin import register

    register()
    model, processor = get_model_processor(str(tiny_dir("qwen2_5_vl")), model_type="qzoom_qwen2_5_vl",
                                           torch_dtype=torch.float32)
    template = get_template(processor, template_type="qzoom_qwen2_5_vl")
    template.set_mode("train")
    template.model = model
    row = {k: v for k, v in records[0].items() if k in ("messages", "images", "qzoom_rpn_labels", "qzoom_pad_square")}
    padded = template.encode(row)
    _, h, w = padded["image_grid_thw"][0].tolist()
    assert (h // 2, w // 2) == (24, 24)  # trained on the padded square at exactly the labels' grid (not 18 x 18)
    unpadded = template.encode({**row, "qzoom_pad_square": None})
    assert unpadded["image_grid_thw"].tolist() == padded["image_grid_thw"].tolist()  # the label map's grid
    assert not torch.equal(unpadded["pixel_values"], padded["pixel_values"])  # but no grey padding


# ---------------------------------------------------------------------------------------- LLaVA RoI crops


def test_an_elongated_llava_crop_keeps_its_ends(tiny_dir):
    """The crop is padded to a square with the mean colour, so CLIP's centre crop no longer cuts its ends."""
    from PIL import Image
    from transformers import AutoProcessor

    from qzoom_swift.families import get_adapter
    from qzoom_swift.families.llava import mean_colour
    from qzoom_swift.roi import grid_region

    processor = AutoProcessor.from_pretrained(tiny_dir("llava"))
    adapter = get_adapter("llava")
    crop = Image.new("RGB", (300, 60), (0, 200, 0))
    crop.paste((255, 0, 0), (0, 0, 30, 60))  # left end red
    crop.paste((0, 0, 255), (270, 0, 300, 60))  # right end blue
    shown = adapter.prepare_crop(crop, processor, 16, 64)
    assert shown.size == (300, 300) and shown.getpixel((150, 0)) == mean_colour(processor)
    assert grid_region(shown.size, processor) == (0.0, 0.0, 300.0, 300.0)  # the encoded grid covers it all
    pixels = adapter.encode_images(processor, [shown])["pixel_values"][0]
    ip = processor.image_processor
    rgb = pixels * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]
    side = rgb.shape[-1]
    mid = side // 2
    left, right = rgb[:, mid, 2], rgb[:, mid, side - 3]
    assert left[0] > 0.8 and left[2] < 0.2  # the red end is encoded
    assert right[2] > 0.8 and right[0] < 0.2  # so is the blue end
    # the old path (no padding) lost both ends to the centre crop
    unpadded = adapter.encode_images(processor, [crop])["pixel_values"][0]
    rgb = unpadded * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]
    assert rgb[1, mid, 2] > 0.6 and rgb[0, mid, 2] < 0.2  # green: the left end was cut off


# ------------------------------------------------------------------------ stage-3 preprocessor in ms-swift


def _trajectory_dir(tmp_path, n=10):
    """A gate-labels output dir with hand-made trajectories (answers per budget, the ground truth)."""
    import json

    from qzoom_swift.labels.gate_job import GateLabelOptions, build_gate_dataset
    from qzoom_swift.synthetic.images import write_shape_dataset

    data = write_shape_dataset(tmp_path / "data", n=n, size=(392, 280), seed=4)
    root = tmp_path / "labels"
    root.mkdir()
    lines = []
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        gt = row["messages"][-1]["content"]
        answers = [[gt] * 4, ["no idea", gt, f"It is {gt}.", gt], ["no", "no", gt, gt], [gt, gt, gt, "x"]][i % 4]
        lines.append({"qzoom_id": f"{i}-t", "qzoom_status": "ok", **row, "qzoom_budgets": [16, 36, 64, 144],
                      "qzoom_answers": answers, "qzoom_scoring": "released", "qzoom_short_answer": True,
                      "qzoom_patch_unit": 28})
    (root / "shard-00000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = build_gate_dataset(root, GateLabelOptions(model="-", dataset=str(data), out=str(root), seed=5), 28)
    return root, summary


def _key(row):
    images = [i if isinstance(i, str) else i.get("path") for i in row["images"]]
    messages = [(m["role"], m["content"]) for m in row["messages"]]
    return messages, images, dict(row["chat_template_kwargs"]), int(row["qzoom_gate"])


def _load_with_env(path, **env):
    """ms-swift's ``load_dataset`` under ``env``; restored by hand: ``datasets``' multiprocess map replaces
    ``os.environ`` with a copy, so ``monkeypatch.setenv`` would undo on a stale object and leak."""
    import os

    from swift.dataset import load_dataset

    try:
        os.environ.update(env)
        return load_dataset([str(path)], num_proc=1, load_from_cache_file=False)[0]
    finally:
        for key in env:
            os.environ.pop(key, None)


@pytest.mark.slow
def test_swift_loads_trajectories_through_the_registered_preprocessor(tmp_path):
    import json

    from qzoom_swift.swift_plugin import register

    register()
    root, summary = _trajectory_dir(tmp_path)
    assert summary["kept"] >= 4 and summary["kinds"]["unstable_top"] >= 2
    export = [json.loads(line) for line in (root / "gate_train.jsonl").read_text().splitlines()]
    assert all("Answer the question using a single word or phrase." in r["messages"][0]["content"] for r in export)
    train = _load_with_env(root / "gate_trajectories.jsonl", QZOOM_GATE_SEED="5")
    assert [_key(r) for r in train] == [_key(r) for r in export]  # the job's rows, for the same seed
    # configurable: no positive examples at all
    other = _load_with_env(root / "gate_trajectories.jsonl", QZOOM_GATE_SEED="6", QZOOM_GATE_POSITIVE_PROB="0")
    assert {int(r["qzoom_gate"]) for r in other} == {0}


@pytest.mark.slow
def test_swift_sft_trains_the_gate_on_trajectory_records(tiny_dir, tmp_path):
    import json
    from pathlib import Path

    from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS, run_swift_concurrently

    repo = Path(__file__).resolve().parents[1]
    root, summary = _trajectory_dir(tmp_path)
    cmd = ["sft", str(repo / "recipes/tiny/stage3_gate.yaml"), "--model", str(tiny_dir("qwen2_5_vl")),
           "--dataset", str(root / "gate_trajectories.jsonl"), "--output_dir", str(tmp_path / "train"),
           "--external_plugins", str(repo / "qzoom_swift/swift_plugin/plugin.py"), "--max_steps", "3",
           "--save_steps", "3", *CPU_TRAIN_FLAGS]
    run = run_swift_concurrently({"sft": cmd}, tmp_path, env={"QZOOM_GATE_SEED": "5"})["sft"]
    assert run.returncode == 0, run.tail()
    log = run.log.read_text(errors="replace")
    assert f"-> {summary['kept']} rows" in log  # the registered preprocessor drew the job's rows
    logs = [json.loads(line) for line in (tmp_path / "train" / "logging.jsonl").read_text().splitlines()]
    assert len([r for r in logs if "qzoom_gate_loss" in r]) == 3
    assert (tmp_path / "train" / "checkpoint-3" / "qzoom_branch.safetensors").is_file()
