"""Q-Zoom on vLLM, per family: a zoomed request is the transformers zoomed sequence (ids, rounded positions,
prompt logprobs), the router answers as ``QZoomModel.generate`` in every mode, the direct prompt's blocks are
reused by the zoomed request, and bad input is contained. One engine per family (tiny models, fp32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BLOCK, LOW_BUDGET

from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.prefill import prefill
from qzoom_swift.roi import heatmap_probabilities
from qzoom_swift.synthetic.images import rectangles_image
from qzoom_swift.zoom import zoom_prefill

pytestmark = pytest.mark.slow
FAMILIES = list(FAMILY_NAMES)
QUESTION = "What is written in the small box?"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    """Module-scoped, so pytest runs every test of one family before starting the next family's engine."""
    return request.param


def _low(router, image):
    return router.adapter.resize_for_budget(image, LOW_BUDGET["low_min_tokens"], LOW_BUDGET["low_max_tokens"])


def _partial_tau(router, image, question) -> float:
    """A tau_roi at the 90th percentile of the blurred heatmap, so the box is a real sub-region."""
    inputs = chat_inputs(router.processor, [_low(router, image)], question)
    probs = heatmap_probabilities(router.prefill(**inputs).heatmaps()[-1].detach()).flatten()
    return float(probs.kthvalue(int(probs.numel() * 0.9)).values)


def _prompt_logprobs(output) -> torch.Tensor:
    """vLLM's logprob of every prompt token after the first."""
    return torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                         for t, d in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:])], dtype=torch.float64)


def _hf_prompt_logprobs(model, family, ids, positions, pixel_values, grid_thw) -> torch.Tensor:
    n = ids.numel()
    kwargs = dict(input_ids=ids[None], position_ids=positions, attention_mask=torch.ones(1, n, dtype=torch.long),
                  pixel_values=pixel_values)
    if family != "llava":
        kwargs["image_grid_thw"] = grid_thw
    with torch.no_grad():
        logits = model(**kwargs).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, ids[1:, None]).flatten()


def test_zoomed_request_is_the_transformers_zoomed_sequence(engines, family):
    from vllm import SamplingParams

    engine = engines(family)
    router, model = engine.router, engine.router.model
    image = rectangles_image(seed=5)
    overrides = {"mode": "always", "tau_roi": _partial_tau(router, image, QUESTION), "roi_min_tokens": 48}
    [req] = engine.plan([image], [QUESTION], overrides)
    assert req.error is None and req.stats.zoomed, req.stats
    # the core's own zoomed sequence, built independently by the transformers path (float positions)
    inputs = chat_inputs(router.processor, [_low(router, image)], QUESTION)
    cfg = router.config.with_overrides(overrides)
    z = zoom_prefill(model, router.processor, inputs, [[image]], cfg)
    assert z.grid_box == req.stats.grid_box
    rows, cols = prefill(model, **inputs).embedded.grids[-1]
    x0, y0, x1, y1 = z.grid_box
    assert (x1 - x0) * (y1 - y0) < rows * cols, "expected a sub-region of the image"
    [out] = engine.llm.generate([req.prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                use_tqdm=False)
    assert list(out.prompt_token_ids) == z.input_ids.tolist() == req.token_ids

    pixels = torch.cat([inputs["pixel_values"], z.pixel_values])
    grid_thw = None if family == "llava" else torch.cat([inputs["image_grid_thw"], z.image_grid_thw])
    got = _prompt_logprobs(out)
    rounded = _hf_prompt_logprobs(model, family, z.input_ids, z.positions.round(), pixels, grid_thw)
    exact = _hf_prompt_logprobs(model, family, z.input_ids, z.positions, pixels, grid_thw)
    d_rounded = (got - rounded).abs().max().item()
    d_exact = (got - exact).abs().max().item()
    print(f"\n{family}: |vLLM - transformers(rounded)| = {d_rounded:.2e}, |vLLM - transformers(float)| = "
          f"{d_exact:.2e}, rounding divergence (transformers float vs rounded) = "
          f"{(exact - rounded).abs().max().item():.2e}")
    assert d_rounded <= 1e-4
    if family == "llava":  # sequential positions: vLLM's stock two-image layout is already Q-Zoom's
        assert torch.equal(z.positions, torch.arange(z.input_ids.numel())[None].to(z.positions.dtype))
        return
    stock_pos = router.adapter.position_ids(model, z.input_ids[None], torch.ones(1, z.input_ids.numel()),
                                            image_grid_thw=grid_thw)
    assert not torch.equal(stock_pos.float(), z.positions.round()), "the crop's rows must differ from stock"
    stock = _hf_prompt_logprobs(model, family, z.input_ids, stock_pos, pixels, grid_thw)
    d_stock = (got - stock).abs().max().item()
    print(f"{family}: |vLLM - transformers(stock two-image layout)| = {d_stock:.2e}")
    assert d_stock >= 10 * max(d_rounded, 1e-4)


def _batch(router):
    """8 samples: 6 images with questions, a text-only question and an image whose question differs."""
    images = [rectangles_image(seed=s) for s in range(6)] + [None, rectangles_image(seed=9, size=(500, 700))]
    questions = ["What colour is the box?", QUESTION, "How many boxes?", "Where is the red box?",
                 "Read the label.", "Is there a circle?", "Say hello.", "What is at the top?"]
    return images, questions


def _thresholds(engine, images, questions) -> dict:
    """tau_gate and tau_roi that split the batch into zoomed, direct and no-region samples (from the router)."""
    router = engine.router
    has = [i for i, im in enumerate(images) if im is not None]
    low = [[] if im is None else [_low(router, im)] for im in images]
    state = router.prefill(**chat_inputs(router.processor, low, questions))  # the batch generate's router sees
    gate = [float(p) for i, p in enumerate(torch.sigmoid(state.gate_logit).tolist()) if i in has]
    peaks = [float(heatmap_probabilities(h.detach()).max()) for h in state.heatmaps()]
    order = sorted(range(len(has)), key=lambda k: gate[k])
    tau_gate = (gate[order[1]] + gate[order[2]]) / 2  # two direct samples
    zoomers = order[2:]
    by_peak = sorted(zoomers, key=lambda k: peaks[k])
    tau_roi = (peaks[by_peak[0]] + peaks[by_peak[1]]) / 2  # the lowest peak among zoomers finds no region
    assert gate[order[2]] - gate[order[1]] > 1e-5 and peaks[by_peak[1]] - peaks[by_peak[0]] > 1e-5, (gate, peaks)
    return {"tau_gate": tau_gate, "tau_roi": tau_roi, "sink_mask": False}


def test_routing_equals_transformers_in_every_mode(engines, family):
    from vllm import SamplingParams

    engine = engines(family)
    router = engine.router
    images, questions = _batch(router)
    taus = _thresholds(engine, images, questions)
    for mode in ("always", "zoom", "never"):
        overrides = {**taus, "mode": mode}
        got = engine.generate(images, questions, config_overrides=overrides, max_new_tokens=6)
        want = router.generate([[] if im is None else im for im in images], questions, config_overrides=overrides,
                               max_new_tokens=6)
        reasons = [a.stats.reason for a in got]
        print(f"\n{family} {mode}: {reasons}")
        assert [a.error for a in got] == [None] * 8
        assert reasons == [a.stats.reason for a in want]
        assert [a.stats.grid_box for a in got] == [a.stats.grid_box for a in want]
        assert [a.stats.visual_tokens for a in got] == [a.stats.visual_tokens for a in want]
        assert [a.token_ids for a in got] == [a.token_ids for a in want], mode
        if mode == "zoom":
            assert {"gate", "below_gate", "no_image", "no_roi"} <= set(reasons), reasons
        if mode == "never":  # plain vLLM: the chat prompt and the low-resolution images, no router involved
            prompts = []
            for im, q in zip(images, questions):
                content = ([] if im is None else [{"type": "image"}]) + [{"type": "text", "text": q}]
                text = router.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True)
                prompts.append({"prompt": text} if im is None else
                               {"prompt": text, "multi_modal_data": {"image": [_low(router, im)]}})
            plain = engine.llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
            assert [a.token_ids for a in got] == [list(o.outputs[0].token_ids) for o in plain]


def test_zoomed_request_reuses_the_direct_prompts_blocks(engines, family):
    engine = engines(family)
    image = rectangles_image(seed=11)
    question = f"Which box is largest ({family})?"  # a prompt no other test sent
    overrides = {"tau_roi": _partial_tau(engine.router, image, question)}
    [direct] = engine.generate([image], [question], config_overrides={**overrides, "mode": "never"},
                               max_new_tokens=2)
    [req] = engine.plan([image], [question], {**overrides, "mode": "always"})
    [zoomed] = engine.generate([image], [question], config_overrides={**overrides, "mode": "always"},
                               max_new_tokens=2)
    assert zoomed.stats.zoomed and not direct.stats.zoomed
    need = math.floor(req.prefix_end / BLOCK) * BLOCK
    print(f"\n{family}: prefix_end {req.prefix_end}, cached {zoomed.cached_tokens} (need >= {need}); "
          f"direct cached {direct.cached_tokens}")
    assert need > 0 and zoomed.cached_tokens >= need


def test_an_unreadable_image_or_a_too_long_prompt_gets_its_own_error(engines, family, tmp_path):
    engine = engines(family)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    images = [rectangles_image(seed=1), str(broken), str(tmp_path / "missing.jpg"), rectangles_image(seed=2),
              rectangles_image(seed=3)]
    questions = ["What colour?"] * 4 + ["box " * 1100]  # past max_model_len=1024
    answers = engine.generate(images, questions, config_overrides={"mode": "always"}, max_new_tokens=3)
    assert answers[0].error is None and answers[3].error is None
    assert len(answers[0].token_ids) == len(answers[3].token_ids) == 3
    assert "sample 4" in answers[4].error and "max_model_len=1024" in answers[4].error
    assert "sample 1" in answers[1].error and "broken.png" in answers[1].error
    assert "sample 2" in answers[2].error and "missing.jpg" in answers[2].error
    assert answers[1].token_ids is None and answers[1].stats.reason == "error"


def test_a_checkpoint_of_another_model_is_refused_naming_both(engines, family, tiny_dir, tmp_path):
    from qzoom_swift.checkpoint import BranchCheckpointError
    from qzoom_swift.vllm_plugin.engine import QZoomVLLM

    ckpt = engines(family).router.save_branches(tmp_path / f"{family}_branches")
    base = tiny_dir(FAMILIES[(FAMILIES.index(family) + 1) % len(FAMILIES)])
    with pytest.raises(BranchCheckpointError) as err:
        QZoomVLLM(base, checkpoint=ckpt)  # refused before any engine starts
    assert str(base) in str(err.value) and str(ckpt) in str(err.value)
