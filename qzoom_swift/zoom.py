"""Gated two-pass generation: one low-resolution prefill, then (only where needed) the zoomed pass.

Pass 1 runs the batch through base layers [0, B) once, with the KV cache, and feeds the gate (and,
if any sample zooms, the RPN). Each sample then takes one of two continuations:

- direct: layers [B, L) over its own prompt, then decoding;
- zoom: its heatmap gives a box, the box is cropped from the *original* image and re-encoded, the crop's
  tokens are inserted after the source image (continuous MRoPE positions for Qwen, sequential for LLaVA),
  only the new tokens run layers [0, B) on top of the reused prefix cache, then layers [B, L) run over the
  whole new sequence, then decoding.

Layers [B, L) never run twice on the low-resolution sequence and layers [0, B) never run twice on the
unchanged prefix. Decoding is ``model.generate`` continuing from the prepared cache, so generation
configs, stopping criteria and streamers behave as usual. The continuations run sample by sample.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from torch import nn

from qzoom_swift.branches import require_branches
from qzoom_swift.config import QZoomConfig
from qzoom_swift.families import Embedded, FamilyAdapter
from qzoom_swift.families.registry import FAMILIES
from qzoom_swift.prefill import BranchPrefill, gate_logits, prefill_to_branch, rpn_token_logits
from qzoom_swift.roi import GridBox, crop_image, grid_region, region_pixel_box, roi_box_from_heatmap

logger = logging.getLogger(__name__)
_WARNED = {"no_sink_map": False, "gate_untrained": False}
GATE_UNTRAINED = "gate_untrained"
"""``ZoomStats.fallback`` when mode ``zoom`` ran as ``always`` / ``never`` because the gate never trained."""


@dataclass
class ZoomStats:
    """What happened to one sample: the decision, the box and the cost of each pass."""

    zoomed: bool = False
    reason: str = ""
    """gate (zoomed by the gate), forced (mode=always), below_gate, never (mode=never), no_roi,
    no_image, gate_nan (the gate probability is not finite) or error (the crop failed); all but the first two
    are answered from the low-resolution pass."""
    gate_prob: float | None = None
    box: tuple[float, float, float, float] | None = None
    """Zoomed region as (left, top, right, bottom) fractions of the original image."""
    grid_box: tuple[int, int, int, int] | None = None
    """Zoomed cells (x0, y0, x1, y1) of the source image's merged-token grid ``grid`` (rows, cols)."""
    grid: tuple[int, int] | None = None
    fallback: str = ""
    """Why the sample ran another mode than asked: ``gate_untrained`` (mode ``zoom`` with a gate the checkpoint
    records as untrained ran ``always``, or ``never`` when the RPN is untrained too; ``reason`` is then
    ``forced`` / ``never``); empty otherwise."""
    sink_cells: int = 0
    """Heatmap cells masked as attention sinks before the blur (the family's released rule; 0 when off)."""
    visual_tokens_low: int = 0
    visual_tokens_roi: int = 0
    prompt_tokens: int = 0
    """Length of the sequence that was decoded from (pass 1, or pass 1 + inserted tokens)."""
    time_pass1_s: float = 0.0
    """This sample's share of the batched pass 1 (vision, layers [0, B), branches)."""
    time_pass2_s: float = 0.0
    """Continuation prefill: crop encoding and the second pass, or layers [B, L) for direct answers."""
    time_decode_s: float = 0.0

    @property
    def visual_tokens(self) -> int:
        return self.visual_tokens_low + self.visual_tokens_roi

    def to_dict(self) -> dict:
        out = asdict(self)
        out["visual_tokens"] = self.visual_tokens
        return out


@dataclass
class ZoomOutput:
    generated: list[torch.Tensor]
    """New token ids per sample (1-D, without the prompt)."""
    stats: list[ZoomStats] = field(default_factory=list)


def zoom_decisions(gate_probs: list[float | None], mode: str, tau_gate: float) -> list[tuple[bool, str]]:
    """Per-sample (zoom?, reason) from the gate probabilities; pure, so the rule is tested by hand."""
    out = []
    for p in gate_probs:
        if mode == "never":
            out.append((False, "never"))
        elif mode == "always":
            out.append((True, "forced"))
        elif p is None:
            out.append((False, "no_image"))
        elif not math.isfinite(p):  # a diverged gate: never zoom silently, say so (the caller warns)
            out.append((False, "gate_nan"))
        elif p >= tau_gate:
            out.append((True, "gate"))
        else:
            out.append((False, "below_gate"))
    return out


@dataclass(frozen=True)
class ZoomPlan:
    """Where one sample zooms, decided before pass 2: the box on its source image's grid and the encoded crop."""

    sample: int
    """Index of the sample in the batch."""
    start: int
    """First real (non-padding) token of the sample; the plan's sequence indices are relative to it."""
    grid: tuple[int, int]
    """Merged-token grid (rows, cols) of the source (last) image."""
    box: GridBox
    """Zoomed cells of ``grid``."""
    box_norm: tuple[float, float, float, float]
    """The crop as (left, top, right, bottom) fractions of the original image."""
    visual_index: torch.Tensor
    """Indices (relative to ``start``) of the source image's visual tokens."""
    encoded: dict[str, torch.Tensor]
    """The crop's processor outputs, on the model's device."""
    encode_s: float
    """Seconds spent cropping and encoding (part of the sample's pass-2 cost)."""

    @property
    def grid_box(self) -> tuple[int, int, int, int]:
        return (self.box.x0, self.box.y0, self.box.x1, self.box.y1)


@dataclass
class SampleSequence:
    """One sample's prompt after layers [0, B), as a batch of one: what layers [B, L) and decoding continue from.

    The direct answer takes it straight out of pass 1; the zoomed answer builds it with the crop inserted.
    """

    input_ids: torch.Tensor
    """[N] prompt ids, unpadded."""
    positions: torch.Tensor
    """[3, 1, N] (MRoPE) or [1, N] positions."""
    hidden: torch.Tensor
    """[1, N, d] hidden state after layer B-1."""
    embedded: Embedded
    """Visual mask and DeepStack rows of the sequence (what layers [B, L) still read)."""
    cache: object
    """DynamicCache holding layers [0, B) of the whole sequence."""
    num_roi: int = 0
    """Visual tokens of the inserted crop (0 for the direct answer)."""


def _prompt_start(state: BranchPrefill, b: int) -> int:
    """First real token of sample ``b`` (pass 1 always carries an explicit, left-padded attention mask)."""
    return int(state.attention_mask[b].nonzero()[0])


def _sample_cache(model: nn.Module, state: BranchPrefill, b: int, start: int, end: int):
    """A batch-of-one copy of pass 1's cache: positions [start, end) of sample ``b``, layers [0, B)."""
    from transformers import DynamicCache

    out = DynamicCache(config=state.adapter.text_config(model))
    for i in range(state.branch_layer):
        layer = state.cache.layers[i]
        out.layers[i].update(layer.keys[b:b + 1, :, start:end].clone(), layer.values[b:b + 1, :, start:end].clone())
    return out


def _slice_positions(positions: torch.Tensor, b: int, start: int, end: int | None = None) -> torch.Tensor:
    return positions[..., b:b + 1, start:end]


def _deepstack_rows(state: BranchPrefill, b: int) -> list[torch.Tensor] | None:
    """Sample ``b``'s DeepStack rows (its visual tokens, in order) out of the batch's concatenated rows."""
    if state.embedded.deepstack is None:
        return None
    counts = state.embedded.visual_mask.sum(dim=1).tolist()
    offset = int(sum(counts[:b]))
    return [level[offset:offset + int(counts[b])] for level in state.embedded.deepstack]


def _direct_sequence(model: nn.Module, state: BranchPrefill, b: int) -> SampleSequence:
    """Sample ``b``'s own prompt, unpadded: pass 1's layer-B state and cache, nothing recomputed."""
    start = _prompt_start(state, b)
    embedded = Embedded(state.embedded.inputs_embeds[b:b + 1, start:], state.embedded.visual_mask[b:b + 1, start:],
                        [], _deepstack_rows(state, b))
    return SampleSequence(state.input_ids[b, start:], _slice_positions(state.position_ids, b, start),
                          state.hidden[b:b + 1, start:], embedded,
                          _sample_cache(model, state, b, start, state.input_ids.shape[1]))


@torch.no_grad()
def _upper_layers(model: nn.Module, state: BranchPrefill, seq: SampleSequence) -> torch.Tensor:
    """Layers [B, L) over a whole batch-of-one sequence whose layers [0, B) are already in ``seq.cache``."""
    adapter, b_layer = state.adapter, state.branch_layer
    n = seq.hidden.shape[1]
    mask2d = torch.ones(1, n, dtype=torch.long, device=seq.hidden.device)
    layers = adapter.decoder_layers(model)
    mask = adapter.causal_mask(model, seq.hidden, mask2d, seq.cache, mask_layer_idx=b_layer)
    rope = adapter.rotary(model, seq.hidden, seq.positions)
    return adapter.run_layers(model, layers[b_layer:], b_layer, seq.hidden, rope, mask, seq.cache, seq.embedded)


@torch.no_grad()
def _continue_and_generate(model: nn.Module, state: BranchPrefill, seq: SampleSequence,
                           generate_kwargs: dict) -> tuple[torch.Tensor, float, float]:
    """Layers [B, L) over ``seq`` (its cache already holds [0, B)), then ``generate`` from the cache.

    The last prompt token is left to ``generate`` (its cache entries are cropped), so the first new token
    goes through the model's own sampling, logits processors and stopping criteria.
    """
    t0 = time.perf_counter()
    n = seq.input_ids.shape[-1]
    _upper_layers(model, state, seq)
    for layer in seq.cache.layers:
        layer.crop(-1)
    state.adapter.prepare_decode(model, float(seq.positions.reshape(-1, n)[0, -1]), n)
    t1 = time.perf_counter()
    mask2d = torch.ones(1, n, dtype=torch.long, device=seq.input_ids.device)
    out = model.generate(input_ids=seq.input_ids.view(1, n), attention_mask=mask2d, past_key_values=seq.cache,
                         **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[0, n:], t1 - t0, time.perf_counter() - t1


def generation_settings(model: nn.Module, generate_kwargs: dict) -> dict:
    """``generate_kwargs`` with the generation settings folded into one ``GenerationConfig``, built once per batch.

    Without an explicit config, every ``model.generate`` call instantiates a default model config to check
    for legacy generation keys (transformers 5: ~14 ms on CPU for Qwen2.5-VL, more than a small model's
    whole decode); zoom inference calls ``generate`` once per sample, so that check is paid here once.
    """
    if generate_kwargs.get("generation_config") is not None:
        return generate_kwargs
    import copy

    config = copy.deepcopy(model.generation_config)
    rest = config.update(**generate_kwargs)  # returns what is not a generation setting (model kwargs)
    return {**rest, "generation_config": config}


@dataclass
class ZoomPrefill:
    """The zoomed sequence of one sample after the second prefill (for parity checks and benchmarks)."""

    logits: torch.Tensor
    """[1, N, vocab] logits of the whole RoI-augmented sequence."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None
    """The crop's processor outputs (to rebuild the same sequence from scratch)."""
    grid_box: tuple[int, int, int, int]


def _attention_mask(inputs: dict) -> torch.Tensor:
    """The inputs' mask, or all ones: pass 1 always gets an explicit mask, since sample starts are read off it."""
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


def _pass1(model: nn.Module, inputs: dict, attention_mask: torch.Tensor) -> BranchPrefill:
    """Layers [0, B) of the whole batch with the cache; the mask is explicit so sample starts can be read off it."""
    return prefill_to_branch(model, **{k: v for k, v in inputs.items() if k != "attention_mask"},
                             attention_mask=attention_mask, use_cache=True)


@torch.no_grad()
def zoom_prefill(model: nn.Module, processor, inputs: dict, source_images: list[list[Image.Image]],
                 config: QZoomConfig | None = None, sample: int = 0) -> ZoomPrefill | None:
    """Pass 1 and the prefix-reusing pass 2 of one sample, forced to zoom; None when no region survives."""
    cfg = config or require_branches(model).qzoom_config
    state = _pass1(model, inputs, _attention_mask(inputs))
    rpn_token_logits(model, state)
    plan = _plan_zoom(processor, cfg, state, sample, source_images[sample][-1])
    if plan is None:
        return None
    seq = _zoom_prefix_pass(model, state, plan)
    out = _upper_layers(model, state, seq)
    return ZoomPrefill(state.adapter.final_logits(model, out), seq.input_ids, seq.positions,
                       plan.encoded["pixel_values"], plan.encoded.get("image_grid_thw"), plan.grid_box)


class TorchRouter:
    """Routing decisions computed by the branches in torch (the default).

    A router turns the layer-B state of pass 1 into gate logits [B] and RPN token scores [B, S]; the ONNX
    router (``qzoom_swift.onnx``) implements the same two methods with onnxruntime.
    """

    name = "torch"

    def gate_logits(self, model: nn.Module, state: BranchPrefill) -> torch.Tensor:
        return gate_logits(model, state)

    def rpn_token_logits(self, model: nn.Module, state: BranchPrefill) -> torch.Tensor:
        return rpn_token_logits(model, state)


def untrained_gate_mode(cfg: QZoomConfig) -> str | None:
    """The mode that replaces ``zoom`` when the config records an untrained gate; None otherwise.

    The rule: only a recorded training state counts. ``cfg.extra["trained_branches"]`` is written by the
    ``qzoom`` tuner into every checkpoint it saves (the branches trained so far, across stages), and set to
    ``[]`` by the ``qzoom_*`` model types when they attach fresh branches (``swift infer`` without
    ``--adapters``). When it lacks the gate, mode ``zoom`` would follow a gate that is a mere copy of base
    layers: run ``always`` if the RPN trained (a stage-1 checkpoint; every LLaVA checkpoint, which has no
    stage-3 recipe), ``never`` if nothing did. Branches without the record run the mode they are given:
    those attached in Python (``attach_branches``, ``QZoomModel`` without a checkpoint; the tests pick
    ``tau_gate`` by hand on them) and checkpoints saved before the record existed.
    ``branches.mark_trained_branches`` records a state explicitly.
    """
    trained = cfg.extra.get("trained_branches")
    if cfg.mode != "zoom" or trained is None or "gate" in trained:
        return None
    return "always" if "rpn" in trained else "never"


def _warn_gate_untrained(cfg: QZoomConfig, mode: str) -> None:
    """One warning per process: the fallback is visible per sample in ``ZoomStats.fallback`` and the log line."""
    if _WARNED[GATE_UNTRAINED]:
        return
    _WARNED[GATE_UNTRAINED] = True
    spec = FAMILIES.get(cfg.family or "")
    why = (f" ({spec.title} encodes every image at one size: it has no stage-3 gate recipe)"
           if spec is not None and spec.fixed_resolution else "")
    trained = ", ".join(cfg.extra.get("trained_branches") or []) or "none"
    logger.warning("Q-Zoom: mode 'zoom' asks the gate, but these branches record an untrained gate%s (trained: %s); "
                   "running mode %r instead (%s). Train the gate (stage 3), or set QZOOM_MODE=always|never to choose.",
                   why, trained, mode, "the RPN zooms every sample" if mode == "always" else "no zoom: the RPN is "
                   "untrained too")


def _route(model: nn.Module, state: BranchPrefill, cfg: QZoomConfig,
           router, mode: str) -> tuple[list[float | None], list[tuple[bool, str]]]:
    """Gate probabilities and (zoom?, reason) per sample under ``mode``; the RPN runs only when some sample zooms.

    Samples without an image never zoom, whatever the mode.
    """
    batch = state.input_ids.shape[0]
    owners = state.image_samples()
    has_image = [b in owners for b in range(batch)]
    probs: list[float | None] = [None] * batch
    if mode == "zoom":
        state.gate_logit = router.gate_logits(model, state).to(state.hidden.device)
        gate = torch.sigmoid(state.gate_logit).float().tolist()
        probs = [p if has_image[b] else None for b, p in enumerate(gate)]
    decisions = zoom_decisions(probs if mode == "zoom" else [0.0 if h else None for h in has_image],
                               mode, cfg.tau_gate)
    decisions = [(z and has_image[b], r if has_image[b] or not z else "no_image") for b, (z, r) in
                 enumerate(decisions)]
    nan = [b for b, (_, r) in enumerate(decisions) if r == "gate_nan"]
    if nan:
        logger.warning("Q-Zoom: non-finite gate probability for sample(s) %s (damaged branch weights or a diverged "
                       "gate?); answering them from the low-resolution pass", nan)
    if any(z for z, _ in decisions):
        state.rpn_token_logits = router.rpn_token_logits(model, state).to(state.hidden.device)
    return probs, decisions


def zoom_generate(model: nn.Module, processor, inputs: dict, source_images: list[list[Image.Image]],
                  config: QZoomConfig | None = None, router=None, **generate_kwargs) -> ZoomOutput:
    """Q-Zoom generation for a left-padded batch encoded at the low budget.

    ``inputs`` are the processor (or ms-swift template) outputs of pass 1; ``source_images`` the original,
    full-resolution images of each sample (crops are cut from these). ``config`` defaults to the branches'
    config. ``router`` computes the gate and RPN outputs (default: ``TorchRouter``). Returns the new tokens
    and a ``ZoomStats`` per sample.
    """
    router = router or TorchRouter()
    generate_kwargs = generation_settings(model, generate_kwargs)
    cfg = config or require_branches(model).qzoom_config
    attention_mask = _attention_mask(inputs)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("zoom_generate needs left padding (the prompts' last tokens must be real tokens)")

    t0 = time.perf_counter()
    state = _pass1(model, inputs, attention_mask)
    fallback_mode = untrained_gate_mode(cfg)
    if fallback_mode is not None:
        _warn_gate_untrained(cfg, fallback_mode)
    probs, decisions = _route(model, state, cfg, router, fallback_mode or cfg.mode)
    pass1 = (time.perf_counter() - t0) / len(decisions)

    visual_counts = state.embedded.visual_mask.sum(dim=1).tolist()
    out = ZoomOutput([])
    for b, (zoom, reason) in enumerate(decisions):
        st = ZoomStats(gate_prob=probs[b], reason=reason, visual_tokens_low=int(visual_counts[b]),
                       time_pass1_s=pass1, fallback=GATE_UNTRAINED if fallback_mode else "")
        plan = _plan_sample(processor, cfg, state, b, source_images[b], st) if zoom else None
        out.generated.append(_answer(model, state, b, plan, st, generate_kwargs))
        out.stats.append(st)
    return out


def _plan_sample(processor, cfg: QZoomConfig, state: BranchPrefill, b: int, images: list[Image.Image],
                 st: ZoomStats) -> ZoomPlan | None:
    """The plan of a sample the router zooms; when there is none, ``st.reason`` says why (no_roi, error)."""
    try:
        plan = _plan_zoom(processor, cfg, state, b, images[-1] if images else None, st)
    except Exception as exc:  # a crop that cannot be encoded is answered from pass 1
        logger.warning("Q-Zoom: sample %d zoom failed (%s); answering from the low-resolution pass", b, exc)
        st.reason = "error"
        return None
    if plan is None:
        st.reason = "no_roi"
    return plan


def _answer(model: nn.Module, state: BranchPrefill, b: int, plan: ZoomPlan | None, st: ZoomStats,
            generate_kwargs: dict) -> torch.Tensor:
    """Sample ``b``'s new tokens: directly from pass 1, or from its zoomed sequence; fills ``st``'s costs."""
    if plan is None:
        seq = _direct_sequence(model, state, b)
        new, t_pass2, t_dec = _continue_and_generate(model, state, seq, generate_kwargs)
    else:
        t1 = time.perf_counter()
        seq = _zoom_prefix_pass(model, state, plan)
        prep = time.perf_counter() - t1
        new, t_pass2, t_dec = _continue_and_generate(model, state, seq, generate_kwargs)
        t_pass2 += prep + plan.encode_s
        st.zoomed, st.box, st.grid_box, st.grid = True, plan.box_norm, plan.grid_box, plan.grid
        st.visual_tokens_roi = seq.num_roi
    st.prompt_tokens = int(seq.input_ids.numel())
    st.time_pass2_s, st.time_decode_s = t_pass2, t_dec
    return new


def sink_keep_mask(cfg: QZoomConfig, state: BranchPrefill, image_index: int) -> torch.Tensor | None:
    """The family's released sink mask of one image's heatmap (False = sink), or None (off, or no rule).

    Without it one attention sink in a corner stretches the box (which encloses every cell above tau_roi)
    to that corner.
    """
    if not cfg.sink_mask:
        return None
    heat = state.heatmaps()[image_index]
    sinks = state.sink_maps()
    sink = None if sinks is None else sinks[image_index]
    if sink is None and state.adapter.needs_sink_logits and not _WARNED["no_sink_map"]:
        _WARNED["no_sink_map"] = True
        logger.warning("Q-Zoom: the router gave no first-token sink map (ONNX graphs exported before it?); the "
                       "%s sink mask is skipped: re-export with `qzoom export-onnx`", state.adapter.name)
    return state.adapter.sink_keep_mask(heat, sink)


def _plan_zoom(processor, cfg: QZoomConfig, state: BranchPrefill, b: int,
               image: Image.Image | None, stats: ZoomStats | None = None) -> ZoomPlan | None:
    """Box, crop and encoded crop of sample ``b``'s last image; None when no region survives."""
    if image is None:
        return None
    image_index = max(i for i, owner in enumerate(state.image_samples()) if owner == b)
    grid = state.embedded.grids[image_index]
    keep = sink_keep_mask(cfg, state, image_index)
    if stats is not None:
        stats.sink_cells = 0 if keep is None else int((~keep).sum())
    box = roi_box_from_heatmap(state.heatmaps()[image_index].float(), cfg.tau_roi, cfg.blur_kernel, cfg.blur_sigma,
                               keep)
    if box is None:
        return None
    t0 = time.perf_counter()
    adapter = state.adapter
    # the grid may cover only part of the image (LLaVA's CLIP center-crops): map cells into that region
    pixel_box = region_pixel_box(box, grid, image.size, grid_region(image.size, processor), cfg.min_box_side)
    crop = adapter.prepare_crop(crop_image(image.convert("RGB"), pixel_box), processor, cfg.roi_min_tokens,
                                cfg.roi_max_tokens)
    encoded = adapter.encode_images(processor, [crop])
    encoded = {k: v.to(state.hidden.device) for k, v in encoded.items()}
    if "pixel_values" in encoded:
        encoded["pixel_values"] = encoded["pixel_values"].to(state.hidden.dtype)
    # visual indices of the zoomed (last) image within the sample, in unpadded coordinates
    start = _prompt_start(state, b)
    visual = state.embedded.visual_mask[b, start:].nonzero().flatten()
    rows, cols = grid
    return ZoomPlan(sample=b, start=start, grid=tuple(grid), box=box, box_norm=pixel_box.normalized(*image.size),
                    visual_index=visual[-rows * cols:], encoded=encoded, encode_s=time.perf_counter() - t0)


def roi_augmented_sequence(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                           positions: torch.Tensor, visual_index: torch.Tensor, src_grid: tuple[int, int],
                           box, roi_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokens and positions of one sample with a crop inserted after its source image.

    ``input_ids`` is the sample's unpadded prompt (1-D; at training time it also holds the answer),
    ``positions`` its positions ([3, 1, S] or [1, S]), ``visual_index`` the indices of the zoomed image's
    visual tokens, ``box`` the grid box the crop covers. Returns (ids [N], positions [..., 1, N], prefix_end):
    everything before ``prefix_end`` is unchanged (its KV cache is reusable). Inference and Post-SFT
    training (``qzoom_swift.post_sft``) both build the zoomed sequence here, so they see exactly the same
    tokens and positions.
    """
    prefix_end = adapter.prefix_end(model, input_ids, int(visual_index[-1]))
    tail = input_ids[prefix_end:]
    inserted = torch.tensor(adapter.roi_token_ids(model, roi_grid[0] * roi_grid[1]), dtype=input_ids.dtype,
                            device=input_ids.device)
    new_pos = adapter.roi_positions(model, positions, visual_index, src_grid, prefix_end, box, roi_grid,
                                    int(tail.numel()))
    prefix_pos = positions[..., :prefix_end]
    if new_pos.is_floating_point():
        prefix_pos = prefix_pos.to(new_pos.dtype)
    full_pos = torch.cat([prefix_pos, new_pos.to(prefix_pos.device)], dim=-1)
    return torch.cat([input_ids[:prefix_end], inserted, tail]), full_pos, prefix_end


@torch.no_grad()
def _zoom_prefix_pass(model: nn.Module, state: BranchPrefill, plan: ZoomPlan) -> SampleSequence:
    """Insert the crop after the source image and run only the new tokens through layers [0, B)."""
    adapter, b, start = state.adapter, plan.sample, plan.start
    roi_grid = adapter.encoded_grid(model, plan.encoded)
    full_ids, positions, prefix_end = roi_augmented_sequence(
        model, adapter, state.input_ids[b, start:], _slice_positions(state.position_ids, b, start),
        plan.visual_index, plan.grid, plan.box, roi_grid)
    embedded_new = adapter.embed(model, full_ids[prefix_end:][None], plan.encoded.get("pixel_values"),
                                 plan.encoded.get("image_grid_thw"))
    cache = _sample_cache(model, state, b, start, start + prefix_end)
    h_new = embedded_new.inputs_embeds
    mask2d = torch.ones(1, full_ids.numel(), dtype=torch.long, device=h_new.device)
    mask = adapter.causal_mask(model, h_new, mask2d, cache)
    rope = adapter.rotary(model, h_new, positions[..., prefix_end:])
    layers = adapter.decoder_layers(model)
    h_new = adapter.run_layers(model, layers[:state.branch_layer], 0, h_new, rope, mask, cache, embedded_new)
    hidden = torch.cat([state.hidden[b:b + 1, start:start + prefix_end], h_new], dim=1)
    embedded = _zoomed_embedded(state, plan, prefix_end, embedded_new)
    return SampleSequence(full_ids, positions, hidden, embedded, cache, num_roi=roi_grid[0] * roi_grid[1])


def _zoomed_embedded(state: BranchPrefill, plan: ZoomPlan, prefix_end: int, embedded_new: Embedded) -> Embedded:
    """Visual mask and DeepStack rows of the zoomed sequence: pass 1's prefix, then the new tokens'.

    Layers [B, L) need no input embeddings, only where the visual tokens are (and their DeepStack rows).
    """
    b, start = plan.sample, plan.start
    src_rows = _deepstack_rows(state, b)
    deepstack = None
    if src_rows is not None and embedded_new.deepstack is not None:
        deepstack = [torch.cat([s, r]) for s, r in zip(src_rows, embedded_new.deepstack)]
    visual_mask = torch.cat([state.embedded.visual_mask[b:b + 1, start:start + prefix_end], embedded_new.visual_mask], dim=1)
    return Embedded(torch.empty(0), visual_mask, [], deepstack)
