"""Q-Zoom branches on the tiny models of all three families: copy-init, parity, heatmaps, gradients, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qzoom_swift.branches import attach_branches, get_branches
from qzoom_swift.checkpoint import BranchCheckpointError, load_branch_checkpoint, save_branch_checkpoint
from qzoom_swift.config import QZoomConfig, default_branch_layer
from qzoom_swift.families import get_adapter
from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.prefill import continue_prefill, prefill, prefill_to_branch, query_token_index


def _images():
    return [Image.new("RGB", (392, 280), (200, 30, 30)), Image.new("RGB", (280, 448), (20, 30, 200))]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_branch_weights_equal_source_layers(loaded, family):
    model, _ = loaded(family)
    branches = attach_branches(model, QZoomConfig(branch_layer=3, branch_depth=3))
    layers = get_adapter(model).decoder_layers(model)
    assert len(branches.gate.layers) == 3 and len(branches.rpn.layers) == 2
    for i, layer in enumerate(branches.gate.layers):
        src = layers[3 + i].state_dict()
        assert all(torch.equal(v, src[k]) for k, v in layer.state_dict().items())
    for i, layer in enumerate(branches.rpn.layers):
        src = layers[3 + i].state_dict()
        assert all(torch.equal(v, src[k]) for k, v in layer.state_dict().items())
    last = layers[5]
    head = branches.rpn.head
    assert torch.equal(head.q_proj.weight, last.self_attn.q_proj.weight)
    assert torch.equal(head.k_proj.weight, last.self_attn.k_proj.weight)
    assert torch.equal(head.input_layernorm.weight, last.input_layernorm.weight)
    # no dead weights: v/o projections and the MLP of layer B+R-1 are not kept
    names = set(head.state_dict())
    assert not any(("v_proj" in n or "o_proj" in n or "mlp" in n) for n in names)
    if family == "qwen3_vl":
        assert torch.equal(head.q_norm.weight, last.self_attn.q_norm.weight)
    else:
        assert head.q_norm is None
    # copies, not shared tensors
    assert branches.gate.layers[0].self_attn.q_proj.weight.data_ptr() != layers[3].self_attn.q_proj.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_base_logits_unchanged_and_split_prefill_parity(loaded, family, attn):
    model, processor = loaded(family, attn)
    inputs = chat_inputs(processor, _images(), "What is the colour of the shape?")
    with torch.no_grad():
        before = model(**inputs).logits
        attach_branches(model)
        after = model(**inputs).logits
    assert torch.equal(before, after), "attaching branches changed the base model's output"
    state = prefill(model, **inputs)
    logits = continue_prefill(model, state)
    assert (logits - before).abs().max().item() <= 1e-5
    last = continue_prefill(model, prefill(model, **inputs), last_only=True)
    assert last.shape == (1, 1, before.shape[-1])
    assert torch.allclose(last[:, -1], before[:, -1], atol=1e-5)
    # the [0, B) cache holds the prompt; layers >= B were filled by the continuation only
    b = state.branch_layer
    lengths = [layer.get_seq_length() for layer in state.cache.layers]
    assert lengths == [inputs["input_ids"].shape[1]] * len(lengths)
    fresh = prefill(model, **inputs)
    assert [layer.get_seq_length() for layer in fresh.cache.layers[b:]] == [0] * (len(lengths) - b)
    assert torch.isfinite(fresh.gate_prob).all() and 0 < fresh.gate_prob.item() < 1


@pytest.mark.parametrize("family", FAMILIES)
def test_heatmap_shape_equals_merged_grid_for_two_non_square_images(loaded, family):
    model, processor = loaded(family)
    attach_branches(model)
    inputs = chat_inputs(processor, _images(), "Where is the blue shape?")
    state = prefill(model, **inputs)
    maps = state.heatmaps()
    assert len(maps) == 2
    if family == "llava":
        expected = [(16, 16), (16, 16)]  # 224 px CLIP, patch 14
    else:
        merge = 2
        expected = [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
        assert expected[0] != expected[1] and expected[0][0] != expected[0][1]  # non-square, different grids
    assert [tuple(m.shape) for m in maps] == expected
    assert all(torch.isfinite(m).all() for m in maps)
    assert state.image_samples() == [0, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_rpn_heatmap_is_mean_over_heads_of_stock_attention_logits(loaded, family):
    """softmax(q.k) of the RPN head per head equals the stock eager attention of layer B+R-1 (copy-init)."""
    model, processor = loaded(family, "eager")
    branches = attach_branches(model, QZoomConfig(branch_layer=3, branch_depth=3))
    inputs = chat_inputs(processor, _images()[:1], "What is shown?")
    with torch.no_grad():
        stock = model(**inputs, output_attentions=True).attentions[5][0, :, -1]  # [H, S]
    adapter = get_adapter(model)
    state = prefill_to_branch(model, **inputs)
    with torch.no_grad():
        hidden = adapter.run_layers(model, branches.rpn.layers, 3, state.hidden, state.extras["rope"],
                                    adapter.causal_mask(model, state.hidden, state.attention_mask), None,
                                    state.embedded)
        cos, sin = state.extras["rope"]
        q, k = branches.rpn.head.query_key(hidden, cos, sin, adapter)
        per_head = torch.einsum("hd,hsd->hs", q[0, :, -1], k[0]) * branches.rpn.head.scaling
    assert torch.allclose(per_head.softmax(-1), stock, atol=1e-5)
    state = prefill(model, **inputs)
    heat = state.heatmaps()[0].flatten()
    visual = state.embedded.visual_mask[0]
    assert torch.allclose(heat, per_head.mean(0)[visual], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_samples_one_by_one(loaded, family):
    model, processor = loaded(family)
    attach_branches(model)
    imgs = _images()
    questions = ["What colour is the big shape?", "Colour?"]
    batch = chat_inputs(processor, [[imgs[0]], [imgs[1]]], questions)
    assert (batch["attention_mask"] == 0).any(), "the two prompts should need padding"
    together = prefill(model, **batch)
    maps = together.heatmaps()
    assert together.image_samples() == [0, 1]
    for i in range(2):
        alone = prefill(model, **chat_inputs(processor, [[imgs[i]]], [questions[i]]))
        assert torch.allclose(together.gate_logit[i], alone.gate_logit[0], atol=1e-4)
        assert torch.allclose(maps[i], alone.heatmaps()[0], atol=1e-4)


def test_query_token_index_rules():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert query_token_index(mask).tolist() == [4, 4, 2]
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, 5, 6, -100, -100]])
    assert query_token_index(None, labels).tolist() == [2, 0]
    with pytest.raises(ValueError, match="no supervised token"):
        query_token_index(None, torch.full((1, 3), -100))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", [("gate",), ("rpn",)])
def test_gradients_reach_only_the_selected_branch(loaded, family, which):
    from qzoom_swift.swift_plugin.tuner import prepare_branch_training

    model, processor = loaded(family)
    attach_branches(model)
    prepare_branch_training(model, which)
    try:
        model.train()
        inputs = chat_inputs(processor, [[_images()[0]], [_images()[1]]], ["Colour?", "Which colour?"],
                             padding_side="right")
        grids = prefill_to_branch(model, use_cache=False, **inputs).embedded.grids
        targets = {"qzoom_gate": torch.tensor([1, 0])} if which == ("gate",) else {
            "qzoom_rpn_labels": [torch.randint(0, 2, grid) for grid in grids]}
        out = model(**inputs, **targets)
        assert out.loss.requires_grad and torch.isfinite(out.loss)
        out.loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        prefix = f"qzoom_branch.{which[0]}."
        assert with_grad and all(n.startswith(prefix) for n in with_grad)
        assert trainable == {n for n, _ in model.named_parameters() if n.startswith(prefix)}
        # every trainable tensor of the gate gets a gradient; the RPN's v/o/MLP of its last layer do not exist
        if which == ("gate",):
            assert with_grad == trainable
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        from qzoom_swift.training import set_trained_branches

        set_trained_branches(model, None)
        model.requires_grad_(True)


@pytest.mark.parametrize("family", FAMILIES)
def test_branch_checkpoint_round_trip(loaded, tiny_dir, family, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, _ = loaded(family)
    branches = attach_branches(model, QZoomConfig(tau_gate=0.3))
    with torch.no_grad():
        for p in branches.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained" weights differ from the copy-init
    save_branch_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "qzoom_branch.safetensors", "qzoom_config.json"]
    card = (tmp_path / "README.md").read_text()  # the model card: base model, what trained, B, R, thresholds
    assert f"- base model: {model.config._name_or_path} (family {family}," in card
    assert f"- B (branch layer): {branches.first_layer}, R (branch depth): 3" in card
    assert "tau_gate 0.3" in card and "- trained: not recorded" in card and "- gate calibration: none" in card
    saved = json.loads((tmp_path / "qzoom_config.json").read_text())
    assert saved["family"] == family and saved["tau_gate"] == 0.3 and saved["branch_layer"] == branches.first_layer
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_dir(family)).eval()
    cfg = load_branch_checkpoint(fresh, tmp_path)
    assert cfg.tau_gate == 0.3
    loaded_state = get_branches(fresh).state_dict()
    assert set(loaded_state) == set(branches.state_dict())
    assert all(torch.equal(v, loaded_state[k]) for k, v in branches.state_dict().items())


def test_branch_checkpoint_errors_name_checkpoint_and_model(loaded, tmp_path):
    qwen, _ = loaded("qwen2_5_vl")
    attach_branches(qwen)
    save_branch_checkpoint(qwen, tmp_path / "qwen")
    llava, _ = loaded("llava")
    with pytest.raises(BranchCheckpointError, match=r"family qwen2_5_vl.*another model family.*family llava"):
        load_branch_checkpoint(llava, tmp_path / "qwen")
    with pytest.raises(BranchCheckpointError, match="no qzoom_branch.safetensors"):
        load_branch_checkpoint(qwen, tmp_path)
    # same family, other width: shapes recorded in the config do not fit
    cfg = json.loads((tmp_path / "qwen" / "qzoom_config.json").read_text())
    cfg["hidden_size"] = 256
    (tmp_path / "qwen" / "qzoom_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BranchCheckpointError, match=r"hidden 256.*does not fit.*hidden 128"):
        load_branch_checkpoint(qwen, tmp_path / "qwen")
    # a tensor of the wrong shape
    from safetensors.torch import load_file, save_file

    cfg["hidden_size"] = 128
    (tmp_path / "qwen" / "qzoom_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "qwen" / "qzoom_branch.safetensors"))
    tensors["gate.head.weight"] = torch.zeros(1, 64)
    save_file(tensors, str(tmp_path / "qwen" / "qzoom_branch.safetensors"))
    with pytest.raises(BranchCheckpointError, match=r"'gate.head.weight' has shape \(1, 64\).*need \(1, 128\)"):
        load_branch_checkpoint(qwen, tmp_path / "qwen")


@pytest.mark.parametrize(("name", "expected_b"), [
    ("Qwen2.5-VL-3B-Instruct", 24), ("Qwen2.5-VL-7B-Instruct", 18), ("Qwen3-VL-4B-Instruct", 24),
    ("llava-1.5-7b-hf", 15),
])
def test_default_branch_layer_of_released_checkpoints(name, expected_b):
    from qzoom_swift.families import family_of
    from qzoom_swift.synthetic.models import full_size_config

    family, config = full_size_config(name)
    assert family_of(config) == family
    text = config.text_config
    resolved = QZoomConfig().resolved_for(family, text.num_hidden_layers, text.hidden_size)
    assert resolved.branch_layer == expected_b and resolved.branch_depth == 3


def test_default_branch_layer_rule_for_unknown_sizes():
    assert default_branch_layer("llava", 40, 5120) == 15  # LLaVA-1.5-13B
    assert default_branch_layer("qwen2_5_vl", 20, 1024) == 13  # round(0.65 * 20)
    assert default_branch_layer("qwen3_vl", 4, 64) == 1  # clipped so that B + R <= L
    with pytest.raises(ValueError, match="does not fit"):
        QZoomConfig(branch_layer=6).resolved_for("qwen2_5_vl", 8, 128)
    with pytest.raises(ValueError, match="R must be >= 2"):
        QZoomConfig(branch_depth=1)
    with pytest.raises(ValueError, match="family"):
        QZoomConfig(family="blip")


def test_config_from_env_and_json_round_trip(tmp_path):
    from qzoom_swift.config import config_from_env

    cfg = config_from_env(environ={"QZOOM_TAU_GATE": "0.05", "QZOOM_BRANCH_LAYER": "auto",
                                   "QZOOM_BRANCH_DEPTH": "4", "QZOOM_TRAIN": "gate"})
    assert cfg.tau_gate == 0.05 and cfg.branch_layer is None and cfg.branch_depth == 4
    assert config_from_env(environ={"QZOOM_BRANCH_LAYER": "12"}).branch_layer == 12
    with pytest.raises(ValueError, match="QZOOM_TAU_ROI"):
        config_from_env(environ={"QZOOM_TAU_ROI": "high"})
    cfg.save(tmp_path)
    assert QZoomConfig.load(tmp_path) == cfg
    with pytest.raises(FileNotFoundError, match="qzoom_config.json"):
        QZoomConfig.load(tmp_path / "missing")
