"""Configuration read once at the boundary: the ``QZOOM_*`` parser, its truthiness rule, the precedence of the
effective inference config, and the stage-1 thresholds kept apart from the inference knobs."""

from __future__ import annotations

import json

import pytest

from qzoom_swift.config import (
    CONFIG_NAME,
    FALSE_WORDS,
    TRUE_WORDS,
    LabelThresholds,
    QZoomConfig,
    effective_config,
    parse_bool,
    read_env,
)


def test_defaults_when_nothing_is_set():
    env = read_env({})
    assert env.config_overrides == {} and env.attach is True and env.train == ()
    assert env.roi_noise == 0.0 and env.router == "torch" and env.onnx_dir == ""
    assert (env.onnx_provider, env.onnx_precision) == ("auto", "fp32")
    assert env.cache_dir.name == "qzoom_swift"


@pytest.mark.parametrize("word", [*TRUE_WORDS, "TRUE", " Yes "])
def test_one_truthiness_rule_true(word):
    assert parse_bool("QZOOM_ATTACH", word) is True
    assert read_env({"QZOOM_ATTACH": word}).attach is True


@pytest.mark.parametrize("word", [*FALSE_WORDS, "FALSE", " No "])
def test_one_truthiness_rule_false(word):
    assert parse_bool("QZOOM_ATTACH", word) is False
    assert read_env({"QZOOM_ATTACH": word}).attach is False


@pytest.mark.parametrize("name,value,match", [
    ("QZOOM_ATTACH", "maybe", "QZOOM_ATTACH='maybe': expected true or false \\(1, true"),
    ("QZOOM_TRAIN", "lm_head", "QZOOM_TRAIN='lm_head': choose from gate, rpn"),
    ("QZOOM_ROUTER", "tensorrt", "choose from torch, onnx"),
    ("QZOOM_ROI_NOISE", "lots", "QZOOM_ROI_NOISE='lots'"),
    ("QZOOM_ROI_NOISE", "1.5", "probability in \\[0, 1\\]"),
    ("QZOOM_TAU_ROI", "high", "QZOOM_TAU_ROI='high'"),
    ("QZOOM_BRANCH_DEPTH", "three", "QZOOM_BRANCH_DEPTH"),
])
def test_unknown_values_are_errors_naming_the_variable(name, value, match):
    with pytest.raises(ValueError, match=match):
        read_env({name: value})


def test_every_variable_is_parsed(tmp_path):
    env = read_env({"QZOOM_TRAIN": "rpn+gate", "QZOOM_ROI_NOISE": "0.8", "QZOOM_ROUTER": "ONNX",
                    "QZOOM_ONNX_DIR": " /x/onnx ", "QZOOM_ONNX_PROVIDER": "cpu", "QZOOM_ONNX_PRECISION": "fp16",
                    "QZOOM_CACHE": str(tmp_path), "QZOOM_MODE": "always", "QZOOM_LOW_MAX_TOKENS": "64",
                    "QZOOM_BRANCH_LAYER": "auto"})
    assert env.train == ("rpn", "gate") and env.roi_noise == 0.8 and env.router == "onnx"
    assert (env.onnx_dir, env.onnx_provider, env.onnx_precision) == ("/x/onnx", "cpu", "fp16")
    assert env.cache_dir == tmp_path
    assert env.config_overrides == {"mode": "always", "low_max_tokens": 64, "branch_layer": None}


def test_precedence_checkpoint_then_environment_then_call():
    checkpoint = QZoomConfig(tau_gate=0.3, tau_roi=0.2, mode="always")
    environ = {"QZOOM_TAU_GATE": "0.5", "QZOOM_MODE": "never"}
    assert effective_config(checkpoint, environ={}) == checkpoint  # nothing else: the checkpoint's values
    by_env = effective_config(checkpoint, environ=environ)
    assert (by_env.tau_gate, by_env.mode, by_env.tau_roi) == (0.5, "never", 0.2)  # env beats checkpoint
    by_call = effective_config(checkpoint, {"mode": "zoom"}, environ=environ)
    assert (by_call.tau_gate, by_call.mode, by_call.tau_roi) == (0.5, "zoom", 0.2)  # the call beats env
    assert effective_config(None, environ={}) == QZoomConfig()  # no checkpoint: the defaults
    with pytest.raises(ValueError, match="mode"):
        effective_config(checkpoint, {"mode": "sometimes"}, environ={})


def test_label_thresholds_travel_with_the_config(tmp_path):
    cfg = QZoomConfig(labelling=LabelThresholds(tau_fg=0.25, min_peak=1e-3))
    cfg.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["labelling"] == {"tau_fg": 0.25, "tau_bg": 0.05, "max_box_fraction": 0.5, "min_peak": 1e-3}
    assert "tau_fg" not in saved  # not an inference knob
    assert QZoomConfig.load(tmp_path) == cfg


def test_configs_saved_before_the_split_still_load(tmp_path):
    legacy = {**QZoomConfig().to_dict(), "tau_fg": 0.3, "tau_bg": 0.1}
    del legacy["labelling"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(legacy))
    loaded = QZoomConfig.load(tmp_path)
    assert loaded.labelling == LabelThresholds(tau_fg=0.3, tau_bg=0.1)
    with pytest.raises(ValueError, match="LabelThresholds.tau_fg"):
        LabelThresholds(tau_fg=1.5)


def test_python_api_applies_the_environment_between_checkpoint_and_call(tiny_dir, monkeypatch):
    """``QZoomModel.generate`` builds its settings with ``effective_config``: env over checkpoint, call over env."""
    from PIL import Image

    from qzoom_swift import QZoomModel

    qz = QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"), config_overrides={"mode": "always", "tau_roi": 0.0,
                                                                            "roi_min_tokens": 16, "roi_max_tokens": 32})
    image = Image.new("RGB", (448, 336), (200, 40, 40))
    assert qz.generate([image], "Colour?", max_new_tokens=1)[0].stats.reason == "forced"  # the checkpoint's mode
    monkeypatch.setenv("QZOOM_MODE", "never")
    assert qz.generate([image], "Colour?", max_new_tokens=1)[0].stats.reason == "never"  # env over checkpoint
    call = qz.generate([image], "Colour?", max_new_tokens=1, config_overrides={"mode": "always"})
    assert call[0].stats.reason == "forced"  # the call over env
    assert qz.config.mode == "always"  # the attached branches' config is not changed by either


# ------------------------------------------------------------------- issue 29 item 5: unknown QZOOM_* names warn


def test_unknown_variable_warns_once_naming_the_closest_and_the_known_ones():
    from qzoom_swift.config import UnknownEnvWarning, known_env_names

    env = {"QZOOM_TAU_GAIT": "0.2", "QZOOM_TAU_GATE": "0.3"}
    with pytest.warns(UnknownEnvWarning) as caught:
        settings = read_env(env)
    assert settings.config_overrides == {"tau_gate": 0.3}  # the known one still applies; the typo changes nothing
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "QZOOM_TAU_GAIT" in text and "did you mean QZOOM_TAU_GATE?" in text
    assert "QZOOM_CACHE" in text and "QZOOM_GATE_SEED" in text and "QZOOM_ROUTER" in text
    assert len(known_env_names()) == text.count("QZOOM_") - 2  # every known name listed, once
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_env(env)  # the same name again: no second warning in this process


def test_every_variable_the_docs_and_recipes_set_is_known():
    """The known list is the real one: each ``QZOOM_*`` name in the README, recipes and examples is read."""
    import re
    from pathlib import Path

    from qzoom_swift.config import known_env_names

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *(p for d in ("recipes", "examples") for p in (root / d).rglob("*") if p.is_file())]
    used = {m for f in files for m in re.findall(r"QZOOM_[A-Z0-9_]*[A-Z0-9]", f.read_text(errors="ignore"))}
    used -= {"QZOOM_GATE", "QZOOM_TAU_GAIT"}  # the README's ``QZOOM_GATE_<FIELD>`` pattern and its typo example
    assert used and not used - set(known_env_names())
    for name in ("QZOOM_TRAIN", "QZOOM_ROUTER", "QZOOM_ATTACH", "QZOOM_CACHE", "QZOOM_ROI_NOISE", "QZOOM_TAU_ROI",
                 "QZOOM_GATE_POSITIVE_PROB", "QZOOM_ONNX_DIR", "QZOOM_SINK_MASK"):
        assert name in known_env_names()


def test_qzoom_command_warns_about_a_mistyped_variable(tmp_path):
    """Through the real console script: the warning reaches stderr once and the command still succeeds."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    qzoom = Path(sys.executable).with_name("qzoom")
    env = {**os.environ, "QZOOM_TAU_GAIT": "0.2"}
    proc = subprocess.run([str(qzoom), "plugin-path"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("QZOOM_TAU_GAIT is not a Q-Zoom setting") == 1
    assert "did you mean QZOOM_TAU_GATE?" in proc.stderr
    clean = subprocess.run([str(qzoom), "plugin-path"], env={k: v for k, v in env.items() if k != "QZOOM_TAU_GAIT"},
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0 and "not a Q-Zoom setting" not in clean.stderr
