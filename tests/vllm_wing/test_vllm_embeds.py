"""``QZoomVLLM(pass_embeddings=True)`` (Qwen2.5-VL): vLLM gets the router's image features instead of the images
and skips its vision tower; the prompt log-probabilities are the pixel path's, the crop's box still applies, and the
answers are ``QZoomModel.generate``'s."""

from __future__ import annotations

import pytest
import torch
from conftest import LOW_BUDGET

from qzoom_swift.synthetic.images import rectangles_image

pytestmark = pytest.mark.slow


def _prompt_logprobs(output) -> torch.Tensor:
    return torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                         for t, d in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:])], dtype=torch.float64)


def test_embeddings_pass_through_equals_the_pixel_path(tiny_dir):
    from vllm import SamplingParams

    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.vllm_plugin.engine import QZoomVLLM
    from qzoom_swift.vllm_plugin.router import VLLMRouter

    path = tiny_dir("qwen2_5_vl")
    torch.manual_seed(0)
    router = QZoomModel.from_pretrained(path, QZoomConfig(**LOW_BUDGET), dtype="float32", device="cpu")
    engine = QZoomVLLM(path, router=router, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                       pass_embeddings=True)
    try:
        images = [rectangles_image((640, 480), seed=i) for i in range(3)] + [None]
        questions = ["What is in the box?", "Which colour?", "Read it.", "Say hello."]
        forced = {"mode": "always", "tau_roi": 0.0}
        embeds = engine.plan(images, questions, forced)
        pixels = VLLMRouter(router).plan(images, questions, forced)
        assert all(isinstance(p.prompt["multi_modal_data"]["image"], dict) for p in embeds[:3])
        assert "multi_modal_data" not in embeds[3].prompt
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        no_box = [dict(p.prompt, mm_processor_kwargs={}) for p in embeds[:3]]
        outs = engine.llm.generate([p.prompt for p in embeds[:3]] + [p.prompt for p in pixels[:3]] + no_box, params,
                                   use_tqdm=False)
        emb, pix, bare = outs[:3], outs[3:6], outs[6:]
        for e, p in zip(emb, pix):
            assert list(e.prompt_token_ids) == list(p.prompt_token_ids)
        diff = max(float((_prompt_logprobs(e) - _prompt_logprobs(p)).abs().max()) for e, p in zip(emb, pix))
        no_box_diff = max(float((_prompt_logprobs(e) - _prompt_logprobs(p)).abs().max()) for e, p in zip(bare, pix))
        print(f"\nembeddings vs pixels: {diff:.2e}; embeddings without the crop's box vs pixels: {no_box_diff:.2e}")
        assert diff <= 1e-4 and no_box_diff >= 10 * diff
        cfg = {"mode": "zoom", "tau_gate": 0.0, "tau_roi": 0.0}
        got = engine.generate(images, questions, config_overrides=cfg, max_new_tokens=4)
        want = router.generate([[] if im is None else im for im in images], questions, config_overrides=cfg,
                               max_new_tokens=4)
        assert [g.token_ids for g in got] == [w.token_ids.tolist() if hasattr(w.token_ids, "tolist") else
                                              list(w.token_ids) for w in want]
        assert [g.stats.zoomed for g in got] == [w.stats.zoomed for w in want]
    finally:
        engine.shutdown()


def test_families_without_the_pass_through_refuse_it(tiny_dir):
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.vllm_plugin.router import VLLMRouter

    router = QZoomModel.from_pretrained(tiny_dir("llava"), QZoomConfig(**LOW_BUDGET), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="not done for llava"):
        VLLMRouter(router, pass_embeddings=True)
