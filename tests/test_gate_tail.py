"""The gate's cheaper tail: its last layer for the query token only equals the full layer's row (issue #18.4).

``gate_logits(model, state)`` runs the last gate layer for each sample's query token alone (keys and values
of every token); ``gate_logits(..., full_last_layer=True)`` is the old full-sequence layer. Both run here in
one process on the tiny models of the three families, eager and sdpa attention, with left and right padding
and per-sample query positions; probabilities must agree to 1e-5 (fp32) and gate-loss gradients too.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qzoom_swift.branches import attach_branches, require_branches
from qzoom_swift.config import QZoomConfig
from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.losses import gate_bce_loss
from qzoom_swift.prefill import gate_logits, prefill_to_branch
from qzoom_swift.training import branch_training_step

TOL = 1e-5


def _batch(processor, padding_side: str = "left"):
    imgs = [Image.new("RGB", (392, 280), (200, 30, 30)), Image.new("RGB", (280, 448), (20, 30, 200))]
    batch = chat_inputs(processor, [[imgs[0]], [imgs[1]]], ["What colour is the big shape in this picture?", "Colour?"],
                        padding_side=padding_side)
    assert (batch["attention_mask"] == 0).any(), "the two prompts should need padding"
    return batch


def _perturb_gate(model, seed: int = 0) -> None:
    """Make the gate differ from the base layers (and its head non-trivial), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in require_branches(model).gate.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _both(model, state) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        full = torch.sigmoid(gate_logits(model, state, full_last_layer=True)).clone()
        tail = torch.sigmoid(gate_logits(model, state)).clone()
    return full, tail


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tail_equals_full_last_layer(loaded, family, attn):
    model, processor = loaded(family, attn)
    attach_branches(model, QZoomConfig(branch_layer=3, branch_depth=3))
    _perturb_gate(model)
    for side in ("left", "right"):
        batch = _batch(processor, side)
        state = prefill_to_branch(model, use_cache=False, **batch)
        mask = batch["attention_mask"]
        real = [torch.nonzero(mask[i]).flatten() for i in range(mask.shape[0])]
        # the last prompt token, then other (per-sample different) real tokens as the query
        queries = [state.query_index.clone(), torch.stack([real[0][-3], real[1][-7]]),
                   torch.stack([real[0][5], real[1][-1]])]
        for query in queries:
            state.query_index = query
            full, tail = _both(model, state)
            assert (full - tail).abs().max() <= TOL, (side, query.tolist(), full.tolist(), tail.tolist())
            assert state.gate_logit.shape == (2,)


def test_tail_applies_deepstack_to_a_visual_query_token(loaded):
    """Qwen3-VL at B=1, R=2: DeepStack level 2 is added after the last gate layer (at visual tokens).

    The tiny model has two DeepStack levels; a third (random) one stands in for a real model's level 2.
    """
    model, processor = loaded("qwen3_vl")
    attach_branches(model, QZoomConfig(branch_layer=1, branch_depth=2))
    _perturb_gate(model, seed=1)
    batch = _batch(processor)
    state = prefill_to_branch(model, use_cache=False, **batch)
    deepstack = state.embedded.deepstack
    assert deepstack is not None
    while len(deepstack) < 3:
        deepstack.append(torch.randn(deepstack[0].shape, generator=torch.Generator().manual_seed(3)))
    visual = [torch.nonzero(state.embedded.visual_mask[i]).flatten() for i in range(2)]
    for query in (torch.stack([visual[0][4], visual[1][-1]]), torch.stack([visual[0][0], state.query_index[1]])):
        state.query_index = query
        full, tail = _both(model, state)
        assert (full - tail).abs().max() <= TOL, (query.tolist(), full.tolist(), tail.tolist())


def _gate_grads(model) -> dict[str, torch.Tensor]:
    gate = require_branches(model).gate
    names = [f"head.{n}" for n, _ in gate.head.named_parameters()]
    names += [f"layers.{len(gate.layers) - 1}.{n}" for n, _ in gate.layers[-1].named_parameters()]
    names += [f"layers.0.{n}" for n, _ in gate.layers[0].named_parameters()]
    params = dict(gate.named_parameters())
    grads = {n: params[n].grad.detach().clone() for n in names if params[n].grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_training_gradients_equal_full_last_layer(loaded, family):
    model, processor = loaded(family)
    attach_branches(model, QZoomConfig(branch_layer=3, branch_depth=3))
    _perturb_gate(model, seed=2)
    batch = dict(_batch(processor, "right"))
    labels = torch.full_like(batch["input_ids"], -100)
    for i, supervised in enumerate((2, 5)):  # the query token is the one before the first supervised token
        end = int(torch.nonzero(batch["attention_mask"][i]).max()) + 1
        labels[i, end - supervised:end] = batch["input_ids"][i, end - supervised:end]
    batch["labels"] = labels
    targets = torch.tensor([1, 0])
    model.zero_grad(set_to_none=True)
    out = branch_training_step(model, ("gate",), qzoom_gate=targets, **dict(batch))  # the training path (tail)
    out.loss.backward()
    tail = _gate_grads(model)
    state = prefill_to_branch(model, use_cache=False, **batch)
    assert state.query_index[0] != state.query_index[1]
    loss = gate_bce_loss(gate_logits(model, state, full_last_layer=True), targets)
    assert torch.allclose(loss, out.loss.detach(), atol=TOL)
    loss.backward()
    full = _gate_grads(model)
    assert set(tail) == set(full) and any(n.startswith("head.") for n in tail)
    last = [n for n in tail if n.startswith(f"layers.{len(require_branches(model).gate.layers) - 1}.")]
    assert any("mlp" in n for n in last) and any("q_proj" in n for n in last) and any("k_proj" in n for n in last)
    for name in tail:
        assert torch.allclose(tail[name], full[name], atol=TOL, rtol=1e-4), (name, (tail[name] - full[name]).abs().max())
