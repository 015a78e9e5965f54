"""Boundary conditions a mutation run left unpinned (issue 29, item 10): each test fails when the comparison at
its edge flips (``>=`` / ``>``, ``<`` / ``<=``) or a value is off by one, and checks it directly rather than
through an error message's text, an ONNX parity or a slow end-to-end run."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

# ------------------------------------------------------------------ Qwen3-VL first-token sink rule at 0.75


def _float32_logit_at(prob: float) -> tuple[float, float]:
    """(x, x_below): the smallest float32 logit whose float32 ``torch.sigmoid`` is exactly ``prob``, and the
    float32 just below it (sigmoid < prob). Searched here, so the test holds whatever rounding torch uses."""
    x = np.float32(math.log(prob / (1 - prob)))
    for _ in range(64):  # walk down to the last float32 whose sigmoid still reaches prob
        below = np.nextafter(x, np.float32(-np.inf))
        if torch.sigmoid(torch.tensor(below)).item() < prob:
            break
        x = below
    while torch.sigmoid(torch.tensor(x)).item() < prob:  # or up, if log(3) itself rounds below
        x = np.nextafter(x, np.float32(np.inf))
    below = np.nextafter(x, np.float32(-np.inf))
    assert torch.sigmoid(torch.tensor(x)).item() == prob > torch.sigmoid(torch.tensor(below)).item()
    return float(x), float(below)


def test_first_token_sink_rule_masks_exactly_at_its_threshold():
    """sigmoid == 0.75 exactly is a sink (``>=``); the float32 just below is kept. The old test's log(3) cell
    has sigmoid 0.75000006 in float32, which a strict ``>`` also masks."""
    from qzoom_swift.families import get_adapter
    from qzoom_swift.families.qwen import FIRST_TOKEN_SINK_PROB, first_token_sink_keep_mask

    assert FIRST_TOKEN_SINK_PROB == 0.75
    at, below = _float32_logit_at(0.75)
    sink = torch.full((3, 4), -4.0)
    sink[0, 1], sink[2, 3], sink[1, 2] = at, below, 4.0
    keep = first_token_sink_keep_mask(sink)
    assert (~keep).nonzero().tolist() == [[0, 1], [1, 2]]
    heat = torch.zeros(3, 4)
    assert torch.equal(get_adapter("qwen3_vl").sink_keep_mask(heat, sink), keep)  # the family's rule is this one
    # a threshold reached exactly in any precision: sigmoid(0) == 0.5
    assert first_token_sink_keep_mask(torch.tensor([[0.0, -1e-6]]), 0.5).tolist() == [[False, True]]
    # half precision logits are judged in float32 (the router may hand fp16 scores)
    assert torch.equal(first_token_sink_keep_mask(sink.half()), first_token_sink_keep_mask(sink.half().float()))


def test_first_token_sink_logits_equal_a_loop_over_heads():
    """The torch score: the first *real* token's head-0 query . every head's keys * scale, mean over heads."""
    from qzoom_swift.prefill import first_token_sink_logits

    g = torch.Generator().manual_seed(3)
    batch, heads, seq, dim, scale = 2, 3, 5, 4, 0.5
    q = torch.randn(batch, heads, seq, dim, generator=g)
    k = torch.randn(batch, heads, seq, dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1 left-padded: its first real token is 2
    want = torch.zeros(batch, seq)
    for b, first in ((0, 0), (1, 2)):
        for s in range(seq):
            want[b, s] = sum(float(q[b, 0, first] @ k[b, h, s]) * scale for h in range(heads)) / heads
    got = first_token_sink_logits(q, k, mask, scale)
    assert got.dtype == torch.float32 and got.shape == (batch, seq)
    assert torch.allclose(got, want, atol=1e-6)
    no_mask = first_token_sink_logits(q, k, None, scale)  # no mask: token 0 of every row
    assert torch.allclose(no_mask[1], torch.stack([(q[1, 0, 0] @ k[1, :, s].T).mean() * scale for s in range(seq)]),
                          atol=1e-6)


def test_prefill_stores_the_first_token_sink_logits_of_its_rpn_head(tiny_dir):
    """On a real Qwen3-VL prefill (left-padded batch of two): ``state.rpn_sink_logits`` is the score above,
    computed from the RPN head's own rotated q/k (captured here), with the RPN's scale."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import attach_branches, get_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.prefill import prefill

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen3_vl")).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir("qwen3_vl"))
    attach_branches(model, QZoomConfig(branch_depth=2))
    head = get_branches(model).rpn.head
    captured = {}
    real = head.query_key

    def spy(*args, **kwargs):
        captured["qk"] = real(*args, **kwargs)
        return captured["qk"]

    head.query_key = spy
    images = [[Image.new("RGB", (224, 168), (200, 30, 30))], [Image.new("RGB", (168, 224), (30, 30, 200))]]
    inputs = chat_inputs(processor, images, ["Colour?", "Which colour is the large square in this picture?"])
    with torch.no_grad():
        state = prefill(model, **inputs)
    q, k = (t.float() for t in captured["qk"])
    mask = inputs["attention_mask"]
    assert int(mask[0].argmax()) > 0  # the shorter question is left-padded: its first real token is not 0
    for b in range(2):
        first = int(mask[b].argmax())
        want = torch.einsum("d,hsd->hs", q[b, 0, first], k[b]).mean(0) * head.scaling
        assert torch.allclose(state.rpn_sink_logits[b], want, atol=1e-5), b


# ------------------------------------------------------------------- padding cell centred on the image edge


def test_padding_cell_centred_exactly_on_the_pasted_edge():
    """A 6 x 8 image on an 8 x 8 canvas is pasted at x in [1, 7); the 4-cell grid has centres 1, 3, 5, 7 (exact).
    The rule keeps a centre on the left/top edge inside the image (``centre < left`` is padding) and puts one
    on the right/bottom edge outside (``centre >= left + width``)."""
    from qzoom_swift.roi import padding_cells, square_padding

    assert square_padding(6, 8) == (8, 1, 0)
    cells = padding_cells((6, 8), 4)
    assert cells.tolist() == [[False, False, False, True]] * 4
    assert padding_cells((8, 6), 4).tolist() == [[False] * 4] * 3 + [[True] * 4]  # the same along y
    # a centre one step inside the right edge is image: 10 x 12 on a 12-grid of 12 px, pasted at x in [1, 11)
    assert square_padding(10, 12) == (12, 1, 0)
    assert padding_cells((10, 12), 12)[0].tolist() == [True] + [False] * 10 + [True]


# ---------------------------------------------------------------- --max-prompt-tokens: at the limit and one over


def test_a_record_of_exactly_max_prompt_tokens_is_labelled_and_one_more_is_rejected(tiny_dir, tmp_path):
    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels
    from qzoom_swift.synthetic.images import write_shape_dataset

    data = write_shape_dataset(tmp_path / "img", n=1, size=(112, 84), seed=2)
    row = json.loads(data.read_text())
    question = row["messages"][0]["content"]
    longer = {**row, "messages": [{**row["messages"][0], "content": question + " zoom"}, row["messages"][1]]}
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps(row) + "\n" + json.dumps(longer) + "\n")

    def run(out, limit):
        opts = PseudoLabelOptions(model=str(tiny_dir("qwen2_5_vl")), dataset=str(both), out=str(tmp_path / out),
                                  max_new_tokens=2, progress=False, calibration=0, max_tokens=16, batch_size=2,
                                  max_prompt_tokens=limit, tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9)
        summary = run_pseudo_labels(opts)
        rejects = [json.loads(line) for line in (tmp_path / out / "rejects.jsonl").read_text().splitlines()]
        labelled = [json.loads(line) for shard in sorted((tmp_path / out).glob("shard-*.jsonl"))
                    for line in shard.read_text().splitlines()]
        return summary, rejects, labelled

    _, probe, _ = run("probe", 1)  # every record over a limit of 1: the rejects say each one's length
    lengths = [int(r["detail"].split(" prompt tokens")[0]) for r in sorted(probe, key=lambda r: r["index"])]
    assert lengths[1] == lengths[0] + 1, lengths  # " zoom" is one more token
    summary, rejects, labelled = run("edge", lengths[0])
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, "prompt_too_long")]
    assert f"{lengths[1]} prompt tokens" in rejects[0]["detail"] and f"the limit {lengths[0]}" in rejects[0]["detail"]
    assert [r["qzoom_id"].split("-")[0] for r in labelled] == ["0"] and summary["records_done"] == 2


def test_guarded_results_admit_the_limit_and_reject_one_more(tmp_path):
    """The rule itself (``LabelJob.guarded_results``): n == limit runs, n == limit + 1 is ``prompt_too_long``."""
    from qzoom_swift.labels.jobs import LabelJob, Reject

    class Opts:
        max_prompt_tokens = 100
        dataset, out, shard_size = str(tmp_path / "d.jsonl"), str(tmp_path / "out"), 10

    job = LabelJob(Opts())
    rejected = []
    job._reject_once = lambda rid, index, reject: rejected.append((index, reject.reason)) or reject
    ran = []
    out = job.guarded_results([(0, "a"), (1, "b"), (2, "c")], [99, 100, 101], job.prompt_limit(None, 64),
                              lambda pos: ran.extend(pos) or [f"ok{k}" for k in pos])
    assert ran == [0, 1] and out[:2] == ["ok0", "ok1"] and isinstance(out[2], Reject)
    assert rejected == [(2, "prompt_too_long")]


# ---------------------------------------------------------------------- Post-SFT global-image budget (576)


def test_mine_hard_writes_post_sft_rows_at_576_global_tokens_by_default(tiny_dir, tmp_path):
    """``qzoom mine-hard`` with its default ``--post-sft-tokens``: the Post-SFT rows encode the global image at
    576 tokens (min = max pixels), whatever budget the mining ran at. A random model finds no regression, so
    the shard's verdicts are set by hand and the CLI is run again (a resume: nothing recomputed, the rows
    rebuilt from the job's recorded budget)."""
    from PIL import Image
    from transformers import AutoProcessor

    from qzoom_swift.cli import main
    from qzoom_swift.synthetic.images import write_shape_dataset

    model, out = tiny_dir("qwen2_5_vl"), tmp_path / "mined"
    data = write_shape_dataset(tmp_path / "img", n=2, size=(112, 84), seed=4)
    args = ["mine-hard", "--model", str(model), "--dataset", str(data), "--out", str(out), "--max-new-tokens", "1",
            "--batch-size", "2", "--no-progress", "--low-min-tokens", "4", "--low-max-tokens", "16",
            "--roi-min-tokens", "4", "--roi-max-tokens", "16"]
    assert main(args) == 0
    shard = out / "shard-00000.jsonl"
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        row["qzoom_status"], row["qzoom_roi"] = "regression", {"box": [0.1, 0.2, 0.6, 0.7]}
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(args) == 0
    written = [json.loads(line) for line in (out / "post_sft.jsonl").read_text().splitlines()]
    assert len(written) == 2
    image_processor = AutoProcessor.from_pretrained(model).image_processor
    unit = (image_processor.patch_size * image_processor.merge_size) ** 2  # pixels per visual token
    for row in written:
        assert row["chat_template_kwargs"] == {"min_pixels": 576 * unit, "max_pixels": 576 * unit}
        assert row["chat_template_kwargs"] != rows[0]["qzoom_low"]  # not the mining budget
    # what those kwargs mean to the model's processor: a square image becomes exactly 576 tokens
    kwargs = written[0]["chat_template_kwargs"]
    grid = image_processor(images=[Image.new("RGB", (300, 300))], min_pixels=kwargs["min_pixels"],
                           max_pixels=kwargs["max_pixels"], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // image_processor.merge_size ** 2 == 576


# -------------------------------------------------------------------------------------------- config bounds


def test_roi_noise_bounds_are_inclusive():
    """QZOOM_ROI_NOISE is a probability: 0 and 1 are accepted, the floats just outside are refused."""
    from qzoom_swift.config import read_env

    assert read_env({"QZOOM_ROI_NOISE": "1"}).roi_noise == 1.0
    assert read_env({"QZOOM_ROI_NOISE": "0"}).roi_noise == 0.0
    for outside in (float(np.nextafter(1.0, 2.0)), float(np.nextafter(0.0, -1.0))):
        with pytest.raises(ValueError):
            read_env({"QZOOM_ROI_NOISE": repr(outside)})


def _bounded_fields():
    from qzoom_swift.config import (
        _CONFIG_RULES,
        _GATE_RULES,
        _LABEL_RULES,
        GateSampling,
        LabelThresholds,
        QZoomConfig,
    )

    for owner, rules in ((QZoomConfig, _CONFIG_RULES), (LabelThresholds, _LABEL_RULES), (GateSampling, _GATE_RULES)):
        for name, (kind, low, high, _) in rules.items():
            yield pytest.param(owner, name, kind, low, high, id=f"{owner.__name__}.{name}")


@pytest.mark.parametrize("cls,name,kind,low,high", list(_bounded_fields()))
def test_every_config_bound_admits_its_edge_and_refuses_just_beyond(cls, name, kind, low, high):
    """Each numeric field's range, at the edge itself and one step outside (next float, next integer)."""
    pair = {name.replace("_max_", "_min_"): 1} if name.endswith("_max_tokens") else {}  # min <= max holds at 1

    def owner(**kw):
        return cls(**pair, **kw)

    if kind == "odd":
        assert getattr(owner(**{name: low}), name) == low
        for bad in (low - 2, low + 1):
            with pytest.raises(ValueError):
                owner(**{name: bad})
        return
    if kind == "positive":
        tiny = float(np.nextafter(0.0, 1.0))
        assert getattr(owner(**{name: tiny}), name) == tiny
        with pytest.raises(ValueError):
            owner(**{name: 0.0})
    step_down = (lambda v: v - 1) if kind == "int" else (lambda v: float(np.nextafter(v, -np.inf)))
    step_up = (lambda v: v + 1) if kind == "int" else (lambda v: float(np.nextafter(v, np.inf)))
    if low is not None:
        edge = int(low) if kind == "int" else float(low)
        assert getattr(owner(**{name: edge}), name) == edge
        with pytest.raises(ValueError):
            owner(**{name: step_down(edge)})
    if high is not None:
        edge = int(high) if kind == "int" else float(high)
        assert getattr(owner(**{name: edge}), name) == edge
        with pytest.raises(ValueError):
            owner(**{name: step_up(edge)})


# ------------------------------------------------------------------ batched continuation: MRoPE deltas per row


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_batch_decode_deltas_continue_each_rows_own_positions(tiny_dir, family):
    """``prepare_batch_decode`` (what the batched continuation calls): the model's own decode-position rule
    (``compute_3d_position_ids`` with a cache, a left-padded mask) then gives row b the position last_b + 1 on
    every MRoPE axis, and last_b + 1 + t after t more tokens."""
    from transformers import AutoModelForImageTextToText
    from transformers.cache_utils import DynamicCache

    from qzoom_swift.families import get_adapter

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir(family)).eval()
    adapter = get_adapter(model)
    last, real = [57.0, 40.0], [50, 44]  # last prompt position (after a spliced RoI: beyond the token count)
    adapter.prepare_batch_decode(model, last, real)
    inner = adapter.inner_model(model)
    assert inner.rope_deltas.tolist() == [[8], [-3]]
    width, text = 52, model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = torch.zeros(2, text.num_key_value_heads, width, head_dim)
    cache = DynamicCache(config=text)
    for layer in range(text.num_hidden_layers):  # a prompt of `width` columns (left padding included) is cached
        cache.update(kv, kv, layer)
    for t in range(2):  # two decode steps, each one new token per row
        mask = torch.zeros(2, width + 1 + t, dtype=torch.long)
        mask[0, -(real[0] + 1 + t):], mask[1, -(real[1] + 1 + t):] = 1, 1
        pos = inner.compute_3d_position_ids(input_ids=torch.zeros(2, 1, dtype=torch.long), image_grid_thw=None,
                                            video_grid_thw=None, inputs_embeds=torch.zeros(2, 1, text.hidden_size),
                                            attention_mask=mask, past_key_values=cache)
        assert pos.shape[:2] == (3, 2) and pos[:, :, -1].tolist() == [[last[0] + 1 + t, last[1] + 1 + t]] * 3
        for layer in range(text.num_hidden_layers):
            cache.update(kv[:, :, :1], kv[:, :, :1], layer)


# ------------------------------------------------------------- stage-3 preprocessor: QZOOM_GATE_* plumbing


def test_registered_gate_preprocessor_reads_its_sampling_from_the_environment(monkeypatch):
    """``GateTrajectoryPreprocessor`` draws with ``GateSampling`` from ``QZOOM_GATE_*`` at load time (seed,
    positive probability, easy per transition, stable top); unset, the released defaults. The scoring rule
    itself is stubbed: this pins the plumbing only."""
    from datasets import Dataset as HfDataset

    import qzoom_swift.labels.gate as gate
    from qzoom_swift.config import GateSampling
    from qzoom_swift.swift_plugin.data_registry import GateTrajectoryPreprocessor

    seen = []
    row = {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
           "images": ["/nonexistent/x.png"], "qzoom_gate": 1}

    def fake_rows(records, sampling):
        seen.append((len(records), sampling))
        return [dict(row)], {"answered": len(records), "kinds": {}, "kept": 1, "labels": {}}

    monkeypatch.setattr(gate, "gate_training_rows", fake_rows)
    # set and restored by hand on whatever ``os.environ`` is at the end: ``datasets``' map replaces
    # ``os.environ`` with a copy, so monkeypatch.setenv would undo on a stale object and leak the values into
    # every later test's subprocesses (tests/test_fidelity.py::_load_with_env does the same)
    saved = {k: v for k, v in os.environ.items() if k.startswith("QZOOM_GATE_")}
    try:
        for key in saved:
            del os.environ[key]
        records = HfDataset.from_list([{"question": "q", "answers": ["a"]}] * 3)
        GateTrajectoryPreprocessor()(records, num_proc=1, load_from_cache_file=False)
        assert seen[-1] == (3, GateSampling())
        env = {"QZOOM_GATE_SEED": "7", "QZOOM_GATE_POSITIVE_PROB": "0.25", "QZOOM_GATE_EASY_PER_TRANSITION": "2.5",
               "QZOOM_GATE_STABLE_TOP": "3"}
        os.environ.update(env)
        out = GateTrajectoryPreprocessor()(records, num_proc=1, load_from_cache_file=False)
        sampling = seen[-1][1]
        assert (sampling.seed, sampling.positive_prob, sampling.easy_per_transition, sampling.stable_top) == \
            (7, 0.25, 2.5, 3)
        assert sampling == GateSampling(seed=7, positive_prob=0.25, easy_per_transition=2.5, stable_top=3)
        assert len(out) == 1 and int(out[0]["qzoom_gate"]) == 1  # the drawn rows go on through ms-swift's preprocessor
        os.environ["QZOOM_GATE_POSITIVE_PROB"] = "1.5"
        with pytest.raises(ValueError, match="QZOOM_GATE"):
            GateTrajectoryPreprocessor()(records, num_proc=1, load_from_cache_file=False)
    finally:
        for key in [k for k in os.environ if k.startswith("QZOOM_GATE_")]:
            del os.environ[key]
        os.environ.update(saved)
    assert not any(k.startswith("QZOOM_GATE_") for k in os.environ if k not in saved)
