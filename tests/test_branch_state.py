"""Branch training state checked at load: mode ``zoom`` with an untrained gate falls back, once and visibly."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from qzoom_swift import zoom
from qzoom_swift.branches import BRANCH_NAMES, attach_branches, detach_branches, mark_trained_branches
from qzoom_swift.config import QZoomConfig
from qzoom_swift.zoom import GATE_UNTRAINED, untrained_gate_mode

KNOBS = {"low_min_tokens": 16, "low_max_tokens": 64, "roi_min_tokens": 16, "roi_max_tokens": 64, "tau_roi": 0.0}


@pytest.mark.parametrize(("mode", "trained", "expected"), [
    ("zoom", None, None),  # no record (attached in Python, older checkpoints): the mode as given
    ("zoom", ["rpn", "gate"], None),
    ("zoom", ["gate"], None),
    ("zoom", ["rpn"], "always"),  # a stage-1 checkpoint (and every LLaVA one)
    ("zoom", [], "never"),  # fresh branches of a qzoom_* model type
    ("always", [], None),  # an explicit always / never is never overridden
    ("never", ["rpn"], None),
])
def test_untrained_gate_mode_rule(mode, trained, expected):
    extra = {} if trained is None else {"trained_branches": trained}
    assert untrained_gate_mode(QZoomConfig(mode=mode, extra=extra)) == expected


def test_mark_trained_branches_refuses_unknown_names(tiny_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl"))
    attach_branches(model)
    mark_trained_branches(model, ("rpn",))
    assert model.qzoom_branch.qzoom_config.extra["trained_branches"] == ["rpn"]
    with pytest.raises(ValueError, match="choose from"):
        mark_trained_branches(model, ("gates",))


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """Branch checkpoints of the tiny Qwen2.5-VL recording each training state (None: no record)."""
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.checkpoint import save_branch_checkpoint

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl"))
    out = {}
    for name, trained in (("none", []), ("rpn", ["rpn"]), ("both", list(BRANCH_NAMES)), ("unrecorded", None)):
        detach_branches(model)
        attach_branches(model)
        if trained is not None:
            mark_trained_branches(model, trained)
        out[name] = save_branch_checkpoint(model, tmp_path_factory.mktemp(f"ckpt-{name}"))
    return out


def _answer(tiny_dir, checkpoint, mode="zoom"):
    from qzoom_swift import QZoomModel

    qz = QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"), checkpoint=checkpoint,
                                    config_overrides={**KNOBS, "mode": mode, "tau_gate": 0.0})
    return qz.generate([Image.new("RGB", (224, 168), (200, 40, 40))], "Colour?", max_new_tokens=1)[0].stats


def test_loaded_checkpoint_with_untrained_gate_falls_back_with_one_warning(tiny_dir, checkpoints, caplog,
                                                                          monkeypatch):
    monkeypatch.setitem(zoom._WARNED, GATE_UNTRAINED, False)
    with caplog.at_level(logging.WARNING, logger="qzoom_swift.zoom"):
        rpn_only = _answer(tiny_dir, checkpoints["rpn"])
        again = _answer(tiny_dir, checkpoints["rpn"])
        nothing = _answer(tiny_dir, checkpoints["none"])
    # RPN trained, gate not: every sample zooms (tau_roi 0 keeps every cell), the gate never runs
    assert (rpn_only.reason, rpn_only.fallback, rpn_only.gate_prob) == ("forced", GATE_UNTRAINED, None)
    assert rpn_only.zoomed and rpn_only.visual_tokens_roi > 0 and again.fallback == GATE_UNTRAINED
    assert (nothing.reason, nothing.fallback, nothing.zoomed, nothing.visual_tokens_roi) == (
        "never", GATE_UNTRAINED, False, 0)
    warnings = [r.getMessage() for r in caplog.records if "untrained gate" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one warning per process, not one per batch
    assert "running mode 'always'" in warnings[0] and "(trained: rpn)" in warnings[0]


def test_trained_or_unrecorded_gate_keeps_zoom(tiny_dir, checkpoints):
    for name in ("both", "unrecorded"):
        stats = _answer(tiny_dir, checkpoints[name])
        assert stats.reason == "gate" and stats.fallback == "" and stats.gate_prob is not None, name
    explicit = _answer(tiny_dir, checkpoints["rpn"], mode="never")  # an explicit mode is taken as asked
    assert (explicit.reason, explicit.fallback) == ("never", "")


@pytest.mark.slow
def test_swift_infer_logs_the_fallback(tiny_dir, shape_dataset, tmp_path):
    """`swift infer`: fresh qzoom_* branches run `never`; a LLaVA stage-1 checkpoint (RPN only) runs `always`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift import QZoomModel
    from qzoom_swift.bench.sft import run_swift_concurrently
    from qzoom_swift.swift_plugin import MODEL_TYPES, plugin_path

    llava = QZoomModel(AutoModelForImageTextToText.from_pretrained(tiny_dir("llava")),
                       AutoProcessor.from_pretrained(tiny_dir("llava")))
    mark_trained_branches(llava.model, ["rpn"])
    ckpt = llava.save_branches(tmp_path / "llava-stage1")
    knobs = json.dumps({"QZOOM_TAU_ROI": 0.0})
    common = ["--val_dataset", str(shape_dataset), "--max_new_tokens", "2", "--temperature", "0",
              "--model_kwargs", knobs]
    runs = run_swift_concurrently({
        "fresh": ["infer", "--external_plugins", plugin_path(), "--model", str(tiny_dir("qwen2_5_vl")),
                  "--model_type", MODEL_TYPES["qwen2_5_vl"], "--result_path", str(tmp_path / "fresh.jsonl"), *common],
        "llava": ["infer", "--model", str(tiny_dir("llava")), "--adapters", str(ckpt),
                  "--result_path", str(tmp_path / "llava.jsonl"), *common],
    }, tmp_path / "runs")
    for name, expected in (("fresh", "direct(never,gate_untrained)"), ("llava", "zoom(forced,gate_untrained)")):
        run = runs[name]
        assert run.returncode == 0, run.tail()
        log = run.log.read_text(errors="replace")
        samples = [d for line in log.splitlines() if "qzoom: " in line for d in line.split("qzoom: ", 1)[1].split("; ")]
        assert samples and all(s.startswith(expected) for s in samples), (name, samples)
        assert log.count("untrained gate") == 1, name
    assert "LLaVA-1.5 encodes every image at one size" in runs["llava"].log.read_text(errors="replace")
