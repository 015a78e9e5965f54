"""The vLLM wing's front router without vLLM: it holds only what pass 1 runs and routes as the full model does;
a prompt templated for vLLM (one placeholder per image) is expanded and collapsed exactly."""

from __future__ import annotations

import pytest
import torch

from qzoom_swift.config import QZoomConfig
from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.model import QZoomModel
from qzoom_swift.synthetic.images import rectangles_image
from qzoom_swift.vllm_plugin.router import (
    VLLMRouter,
    collapse_image_runs,
    expand_image_placeholders,
    load_router,
)

BUDGET = {"low_min_tokens": 16, "low_max_tokens": 64, "roi_min_tokens": 16, "roi_max_tokens": 64, "mode": "always",
          "tau_roi": 0.0}


def test_placeholders_expand_and_collapse_back():
    ids = [1, 9, 2, 9, 3]
    long = expand_image_placeholders(ids, 9, [3, 2])
    assert long == [1, 9, 9, 9, 2, 9, 9, 3]
    assert collapse_image_runs(long, 9, [3, 2]) == ids
    with pytest.raises(ValueError, match="2 of its 3 image"):
        expand_image_placeholders(ids, 9, [1, 1, 1])


def test_image_runs_are_counted_not_split_by_runs():
    """LLaVA's crop tokens follow the source image's directly: one run, two images; LLaMA-Factory's view resized."""
    from qzoom_swift.inputs import resize_image_runs

    assert collapse_image_runs([1, 9, 9, 9, 9, 9, 2], 9, [2, 3]) == [1, 9, 9, 2]
    assert resize_image_runs([1, 7, 9, 9, 9, 8, 2, 7, 9, 8, 3], 9, [3, 1], [2, 4]) == \
        [1, 7, 9, 9, 8, 2, 7, 9, 9, 9, 9, 8, 3]
    with pytest.raises(ValueError, match="fewer than its 3 tokens"):
        resize_image_runs([7, 9, 9, 8], 9, [3], [1])
    with pytest.raises(ValueError, match="1 of its 2 image"):
        resize_image_runs([7, 9, 8], 9, [1, 1], [2, 2])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_router_holds_only_pass_one_and_routes_as_the_full_model(tiny_dir, tmp_path, family):
    torch.manual_seed(0)
    full = QZoomModel.from_pretrained(tiny_dir(family), QZoomConfig(**BUDGET), dtype="float32", device="cpu")
    checkpoint = full.save_branches(tmp_path / "branches")
    router = load_router(tiny_dir(family), checkpoint, device="cpu", dtype="float32", config_overrides=BUDGET)
    kept, loaded = router.router_parameters
    assert kept == sum(p.numel() for p in router.model.parameters()) and kept < loaded
    b = router.config.branch_layer
    layers = router.adapter.decoder_layers(router.model)
    assert all(sum(p.numel() for p in layer.parameters()) == 0 for layer in layers[b:])
    assert all(sum(p.numel() for p in layer.parameters()) > 0 for layer in layers[:b])

    images = [rectangles_image((640, 480), seed=1), rectangles_image((480, 640), seed=2)]
    questions = ["What is in the box?", "Which colour?"]
    got = VLLMRouter(router).plan(images, questions)
    want = VLLMRouter(full).plan(images, questions)
    for g, w in zip(got, want):
        assert g.error is None and g.token_ids == w.token_ids
        assert (g.stats.zoomed, g.stats.grid_box, g.stats.visual_tokens_roi) == \
            (w.stats.zoomed, w.stats.grid_box, w.stats.visual_tokens_roi)
        assert g.stats.gate_prob == pytest.approx(w.stats.gate_prob, abs=1e-6)
        assert g.prompt["prompt_token_ids"] == w.prompt["prompt_token_ids"]
    assert any(g.stats.zoomed for g in got)
    with pytest.raises(RuntimeError, match="dropped"):
        router.generate(images[0], questions[0], max_new_tokens=1)  # layers [B, L) are not there to answer with


@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen3-VL-4B-Instruct",
                                  "llava-1.5-7b-hf"])
def test_router_share_of_the_full_size_models(name):
    """At the published shapes (meta device, the released branch layer B): what the router keeps is vision,
    embeddings, layers [0, B), the branches and the final norm; printed with ``-s`` for the README."""
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.synthetic.models import full_size_config
    from qzoom_swift.vllm_plugin.router import drop_unrouted_modules

    family, config = full_size_config(name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
        attach_branches(model, QZoomConfig(family=family))
    adapter_layers = model.model.language_model.layers
    b = model.qzoom_branch.first_layer
    loaded = sum(p.numel() for p in model.parameters())
    upper = sum(p.numel() for layer in adapter_layers[b:] for p in layer.parameters())
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    freed = drop_unrouted_modules(model)
    assert freed == upper + head
    assert sum(p.numel() for p in model.parameters()) == loaded - freed
    branches = sum(p.numel() for p in model.qzoom_branch.parameters())
    base = loaded - branches
    print(f"\n{name}: B={b} of {len(adapter_layers)} layers; router {(loaded - freed) / 1e9:.2f} B parameters "
          f"(base {base / 1e9:.2f} B + branches {branches / 1e9:.2f} B), of which {(base - freed) / base:.0%} "
          f"of the base model")
