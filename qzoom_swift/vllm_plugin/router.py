"""The front router of the vLLM wing: pass 1 on the low-resolution prompt, the decision, the box, the vLLM prompt.

vLLM cannot change a running request's prompt, so each sample is decided before its request: the core's pass 1
(``prefill_to_branch``: vision, layers [0, B)), gate and RPN, and the core's decision and box rules
(``zoom.route_and_plan``). The sample then becomes one vLLM prompt: the plain low-resolution prompt, or the
low-resolution image followed by the crop (the token layout of ``zoom.roi_augmented_sequence``) with the crop's
box as a per-image field, from which the registered model places Q-Zoom's positions (``models.py``).

Two callers: ``QZoomVLLM`` (questions in, chat prompts built here) and ms-swift's vLLM engine serving a
``qzoom_*`` template (the template's own prompt, ``route_prompt``). Neither vLLM nor ms-swift is imported here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from qzoom_swift.inputs import resize_image_runs
from qzoom_swift.model import QZoomModel
from qzoom_swift.vllm_plugin.registration import ARCHITECTURES
from qzoom_swift.zoom import ZoomPlan, ZoomStats

ROI_FIELD = "qzoom_roi"  # models.ROI_FIELD (models.py imports vLLM at import; this module must not)
UNREADABLE_IMAGE, PROMPT_TOO_LONG = "unreadable_image", "prompt_too_long"


@dataclass
class PlannedRequest:
    """One sample after the router: the vLLM prompt and the stats so far; ``error`` when it cannot be sent."""

    stats: ZoomStats
    prompt: dict | None = None
    """vLLM prompt (``prompt_token_ids``, ``multi_modal_data``, ``mm_processor_kwargs``)."""
    token_ids: list[int] = field(default_factory=list)
    """The prompt the model sees once vLLM expands the image placeholders (``roi_augmented_sequence``'s ids when
    zoomed); checked against vLLM's own expansion by the tests."""
    positions: torch.Tensor | None = None
    """Q-Zoom's positions of ``token_ids`` (float for a Qwen crop: vLLM rounds them)."""
    prefix_end: int = 0
    """Tokens before the inserted crop (unchanged from the direct prompt, so their KV blocks are shareable)."""
    error: str | None = None
    failure: str | None = None
    """What kind of input ``error`` is about: ``unreadable_image`` or ``prompt_too_long`` (the sample's own data,
    not a failing model: evaluation scores it and goes on)."""


def collapse_image_runs(ids: list[int], image_token: int, counts: list[int]) -> list[int]:
    """Each image's ``counts[k]`` image tokens as one placeholder: vLLM expands them itself, from its own grid."""
    return resize_image_runs(ids, image_token, counts, [1] * len(counts))


def expand_image_placeholders(ids: list[int], image_token: int, counts: list[int]) -> list[int]:
    """The inverse of ``collapse_image_runs``: what the processor's text expansion gives a vLLM-templated prompt."""
    return resize_image_runs(ids, image_token, [1] * len(counts), counts)


class DroppedModule(nn.Module):
    """Stands where the router dropped a module it never runs; running it is a bug, said loudly."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module was dropped: the vLLM front router runs vision, layers [0, B) and the "
                           "branches only (vLLM answers)")


def drop_unrouted_modules(model: nn.Module) -> int:
    """Drop what pass 1 never runs: base layers [B, L) (the branches hold their own copies of B..B+R-1) and an
    untied LM head; returns the number of parameters freed."""
    from qzoom_swift.branches import require_branches
    from qzoom_swift.families import get_adapter

    layers = get_adapter(model).decoder_layers(model)
    freed = 0
    for i in range(require_branches(model).first_layer, len(layers)):
        freed += sum(p.numel() for p in layers[i].parameters())
        layers[i] = DroppedModule()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:
        freed += head.weight.numel()
        model.set_output_embeddings(DroppedModule())
    return freed


def load_router(model_dir, checkpoint=None, *, processor=None, device: str | None = None, dtype=None,
                config_overrides: dict | None = None) -> QZoomModel:
    """The router's ``QZoomModel`` with only the weights pass 1 needs on ``device`` (auto: the GPU when there is
    one): loaded on the CPU, trimmed (``drop_unrouted_modules``), then moved, so the device never holds the
    whole model a second time beside vLLM's copy. A checkpoint that does not fit the base is refused here."""
    from qzoom_swift.checkpoint import BranchCheckpointError
    from qzoom_swift.loading import resolve_device, resolve_dtype

    target = resolve_device(device)
    try:
        qz = QZoomModel.from_pretrained(model_dir, checkpoint=checkpoint, processor=processor, device="cpu",
                                        dtype=resolve_dtype(dtype, target), config_overrides=config_overrides)
    except BranchCheckpointError as exc:
        raise BranchCheckpointError(f"base model {model_dir}: {exc}") from exc
    total = sum(p.numel() for p in qz.model.parameters())
    freed = drop_unrouted_modules(qz.model)
    qz.model.to(target)
    qz.router_parameters = (total - freed, total)  # (kept, loaded): the share of the model the router holds
    return qz


class VLLMRouter:
    """Routes samples for vLLM with a ``QZoomModel`` (its pass 1, gate, RPN and rules); one pass runs at a time.

    ``max_model_len``: prompts longer than the engine takes get ``error`` instead of a request.
    """

    def __init__(self, model: QZoomModel, batch_size: int = 8, max_model_len: int | None = None,
                 pass_embeddings: bool = False):
        self.model = model
        self.family = model.adapter.name
        self.batch_size = max(1, int(batch_size))
        self.max_model_len = max_model_len
        if pass_embeddings and not model.adapter.spec.vllm_image_embeds:
            raise ValueError(f"pass_embeddings: not done for {self.family} (Qwen2.5-VL only)")
        self.pass_embeddings = pass_embeddings
        """Send the router's image features (the low-resolution image's from pass 1, the crop's encoded here)
        instead of the images, so vLLM does not run the vision tower again (the engine needs enable_mm_embeds)."""
        self._lock = threading.Lock()  # concurrent server requests share one router model

    def plan(self, images, questions: str | list[str], config_overrides: dict | None = None) -> list[PlannedRequest]:
        """Route every sample (pass 1, gate, RPN, box) and build its vLLM prompt; bad samples get ``error``."""
        from qzoom_swift.config import effective_config
        from qzoom_swift.inputs import chat_inputs, load_image

        if isinstance(questions, str):
            questions, images = [questions], [images]
        if not isinstance(images, list | tuple) or len(images) != len(questions):
            raise ValueError(f"images: expected one entry per question ({len(questions)})")
        cfg = effective_config(self.model.config, config_overrides)
        planned: list[PlannedRequest | None] = [None] * len(questions)
        ready: list[tuple[int, list, list]] = []
        for i, item in enumerate(images):
            items = [] if item is None else list(item) if isinstance(item, list | tuple) else [item]
            try:
                src = [load_image(x, f"sample {i} image {j}") for j, x in enumerate(items)]
                low = [self.model._low_image(img, cfg, i, j) for j, img in enumerate(src)]
            except (ValueError, TypeError) as exc:
                planned[i] = PlannedRequest(ZoomStats(reason="error"), error=str(exc), failure=UNREADABLE_IMAGE)
                continue
            ready.append((i, src, low))
        for lo in range(0, len(ready), self.batch_size):
            chunk = ready[lo:lo + self.batch_size]
            inputs = chat_inputs(self.model.processor, [low for _, _, low in chunk], [questions[i] for i, _, _ in chunk])
            routed = self.route(inputs, [src for _, src, _ in chunk], [low for _, _, low in chunk], cfg)
            for (i, _, _), req in zip(chunk, routed):
                planned[i] = req
        for i, req in enumerate(planned):
            self._check_length(req, f"sample {i}")
        return planned

    def route_prompt(self, prompt_ids: list[int], sources: list, lows: list, config_overrides: dict | None = None,
                     what: str = "the request") -> PlannedRequest:
        """Route one prompt templated for vLLM (one image placeholder per image, e.g. by an ms-swift template in
        ``vllm`` mode): ``lows`` are the images as that prompt shows them, ``sources`` the originals to crop."""
        from qzoom_swift.config import effective_config

        cfg = effective_config(self.model.config, config_overrides)
        adapter, model, processor = self.model.adapter, self.model.model, self.model.processor
        inputs: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if lows:
            inputs = adapter.encode_images(processor, lows)
            grids = inputs.get("image_grid_thw")
            counts = [r * c for r, c in (adapter.encoded_grid(model, {} if grids is None else
                                                              {"image_grid_thw": grids[k:k + 1]})
                                          for k in range(len(lows)))]
        ids = expand_image_placeholders(list(prompt_ids), adapter.image_token_id(model), counts)
        if self.max_model_len is not None and len(ids) > self.max_model_len:  # no pass 1 for a prompt vLLM refuses
            req = PlannedRequest(ZoomStats(reason="error"), token_ids=ids)
            self._check_length(req, what)
            return req
        inputs["input_ids"] = torch.tensor([ids])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        [req] = self.route(inputs, [list(sources)], [list(lows)], cfg)
        self._check_length(req, what)
        return req

    @torch.no_grad()
    def route(self, inputs: dict, sources: list[list], lows: list[list], cfg) -> list[PlannedRequest]:
        """Pass 1 on a (left-padded) batch of low-resolution prompts, then each sample's plan and vLLM prompt."""
        from qzoom_swift.prefill import prefill_to_branch
        from qzoom_swift.zoom import route_and_plan

        model = self.model
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        with self._lock:
            t0 = time.perf_counter()
            state = prefill_to_branch(model.model, **inputs, use_cache=False)
            stats, plans = route_and_plan(model.model, model.processor, state, cfg, sources, started=t0)
            return [self._request(state, b, low, stats[b], plans[b]) for b, low in enumerate(lows)]

    def _request(self, state, b: int, low: list, st: ZoomStats, plan: ZoomPlan | None) -> PlannedRequest:
        from qzoom_swift.zoom import roi_augmented_sequence

        model, adapter = self.model.model, self.model.adapter
        start = int(state.attention_mask[b].nonzero()[0])
        ids, positions = state.input_ids[b, start:], state.position_ids[..., b:b + 1, start:]
        images, boxes, prefix_end = list(low), [None] * len(low), int(ids.numel())
        counts = [r * c for (r, c), owner in zip(state.embedded.grids, state.image_samples()) if owner == b]
        if plan is not None:
            roi_grid = adapter.encoded_grid(model, plan.encoded)
            ids, positions, prefix_end = roi_augmented_sequence(model, adapter, ids, positions, plan.visual_index,
                                                                plan.grid, plan.box, roi_grid)
            images.append(plan.crop)
            counts.append(roi_grid[0] * roi_grid[1])
            boxes.append(list(plan.grid_box))
            st.zoomed, st.box, st.grid_box, st.grid = True, plan.box_norm, plan.grid_box, plan.grid
            st.visual_tokens_roi = roi_grid[0] * roi_grid[1]
            st.time_pass2_s += plan.encode_s  # the crop's encoding; vLLM's prefill is not seen from here
        token_ids = ids.tolist()
        prompt: dict = {"prompt_token_ids": collapse_image_runs(token_ids, adapter.image_token_id(model), counts)}
        if images and self.pass_embeddings:
            t0 = time.perf_counter()
            prompt["multi_modal_data"] = {"image": self._image_embeds(state, b, plan)}
            st.time_pass2_s += time.perf_counter() - t0 if plan is not None else 0.0
        elif images:
            prompt["multi_modal_data"] = {"image": images}
        if plan is not None and ARCHITECTURES[self.family] is not None:  # a Q-Zoom model class reads the box
            prompt["mm_processor_kwargs"] = {ROI_FIELD: boxes}
        st.prompt_tokens = len(token_ids)
        return PlannedRequest(st, prompt, token_ids, positions, prefix_end)

    def _image_embeds(self, state, b: int, plan: ZoomPlan | None) -> dict[str, torch.Tensor]:
        """vLLM's embedding input of sample ``b``: its images' features from pass 1 and the crop, encoded here."""
        grids = [g for g, owner in zip(state.embedded.grids, state.image_samples()) if owner == b]
        features = state.embedded.inputs_embeds[b][state.embedded.visual_mask[b]]
        return self.model.adapter.serving_image_embeds(self.model.model, features, grids,
                                                       None if plan is None else plan.encoded)

    def _check_length(self, req: PlannedRequest, what: str) -> None:
        if self.max_model_len is None or req.error is not None or len(req.token_ids) <= self.max_model_len:
            return
        req.failure = PROMPT_TOO_LONG
        req.error = (f"{what}: its prompt has {len(req.token_ids)} tokens, more than the engine's "
                     f"max_model_len={self.max_model_len}; raise max_model_len or lower the token budgets")
        req.prompt = None
