"""Defaults that follow the released Q-Zoom code (issue 26): tau_fg, the gate head's init, the Post-SFT judges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qzoom_swift.config import LabelThresholds, QZoomConfig
from qzoom_swift.labels.tristate import label_kwargs, tristate_labels

RECIPES = Path(__file__).resolve().parents[1] / "qzoom_swift" / "recipes"


def test_tau_fg_defaults_to_the_released_scripts_value():
    # every released stage-1 script passes roi_binary_coeff 0.25 (the paper's ablation found 0.2 best)
    assert LabelThresholds().tau_fg == 0.25
    assert label_kwargs(QZoomConfig())["tau_fg"] == 0.25
    attn = torch.zeros(6, 6)
    attn[2, 2], attn[2, 3], attn[2, 4] = 1.0, 0.26, 0.24
    labels = tristate_labels(attn, max_box_fraction=1.0).labels  # the function's own default agrees
    assert labels[2, 3] == 1 and labels[2, 4] != 1  # 0.26 > 0.25 x peak is foreground, 0.24 is not


def test_gate_head_starts_as_the_release_did_normal_init_zero_bias():
    from qzoom_swift.branches import GATE_HEAD_STD, QZoomGate

    torch.manual_seed(0)
    head = QZoomGate([], 40000).head
    weight = head.weight.detach()
    assert GATE_HEAD_STD == 0.02
    assert torch.equal(head.bias.detach(), torch.zeros(1))
    assert abs(float(weight.std()) - 0.02) < 0.001  # PyTorch's default would give 1/sqrt(3 * 40000) = 0.0029
    assert abs(float(weight.mean())) < 0.001


@pytest.mark.parametrize("std", [1e-4, 0.3])
def test_gate_head_init_reads_the_models_initializer_range(loaded, std):
    from qzoom_swift.branches import attach_branches, detach_branches
    from qzoom_swift.families import get_adapter

    model, _ = loaded("qwen2_5_vl")
    config = get_adapter(model).text_config(model)
    saved = getattr(config, "initializer_range", None)
    config.initializer_range = std
    try:
        torch.manual_seed(0)
        head = attach_branches(model).gate.head
        d = head.weight.shape[1]
        assert torch.equal(head.bias.detach(), torch.zeros(1))
        if std < 1e-3:  # PyTorch's default bound 1/sqrt(d) is far above 5 std
            assert float(head.weight.detach().abs().max()) < 6 * std < 1 / d**0.5
        else:  # far beyond the default bound: drawn from the normal, not the uniform
            assert float(head.weight.detach().abs().max()) > 1 / d**0.5
    finally:
        config.initializer_range = saved
        detach_branches(model)


PAPER_JUDGES = {"qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct",
                "qwen3_vl_4b": "Qwen/Qwen3-VL-8B-Instruct"}


@pytest.mark.parametrize(("recipe", "judge"), PAPER_JUDGES.items())
def test_post_sft_recipes_mine_with_the_papers_judge(recipe, judge):
    text = (RECIPES / recipe / "stage2_post_sft.yaml").read_text()
    assert re.findall(r"--judge-model (\S+)", text) == [judge]
