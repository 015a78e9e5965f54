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
from qzoom_swift.families import Embedded, FamilyAdapter, get_adapter
from qzoom_swift.prefill import BranchPrefill, gate_logits, prefill_to_branch, rpn_token_logits
from qzoom_swift.roi import GridBox, crop_image, grid_region, region_pixel_box, roi_box_from_heatmap

logger = logging.getLogger(__name__)


@dataclass
class ZoomStats:
    """What happened to one sample: the decision, the box and the cost of each pass."""

    zoomed: bool = False
    reason: str = ""
    """gate (zoomed by the gate), forced (mode=always), below_gate, never (mode=never), no_roi,
    no_image or error (the crop failed; answered from the low-resolution pass)."""
    gate_prob: float | None = None
    box: tuple[float, float, float, float] | None = None
    """Zoomed region as (left, top, right, bottom) fractions of the original image."""
    grid_box: tuple[int, int, int, int] | None = None
    """Zoomed cells (x0, y0, x1, y1) of the source image's merged-token grid ``grid`` (rows, cols)."""
    grid: tuple[int, int] | None = None
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
        elif p is None or not math.isfinite(p):
            out.append((False, "no_image"))
        elif p >= tau_gate:
            out.append((True, "gate"))
        else:
            out.append((False, "below_gate"))
    return out


def _sample_cache(cache, b: int, start: int, end: int, num_layers: int, text_config):
    """A batch-of-one cache with positions [start, end) of sample ``b`` for the first ``num_layers`` layers."""
    from transformers import DynamicCache

    out = DynamicCache(config=text_config)
    for i in range(num_layers):
        layer = cache.layers[i]
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


@torch.no_grad()
def _upper_layers(model: nn.Module, adapter: FamilyAdapter, cache, hidden_b: torch.Tensor, positions: torch.Tensor,
                  embedded: Embedded | None, branch_layer: int) -> torch.Tensor:
    """Layers [B, L) over a whole batch-of-one sequence whose layers [0, B) are already in ``cache``."""
    n = hidden_b.shape[1]
    mask2d = torch.ones(1, n, dtype=torch.long, device=hidden_b.device)
    layers = adapter.decoder_layers(model)
    mask = adapter.causal_mask(model, hidden_b, mask2d, cache, mask_layer_idx=branch_layer)
    rope = adapter.rotary(model, hidden_b, positions)
    return adapter.run_layers(model, layers[branch_layer:], branch_layer, hidden_b, rope, mask, cache, embedded)


@torch.no_grad()
def _continue_and_generate(model: nn.Module, adapter: FamilyAdapter, cache, hidden_b: torch.Tensor,
                           positions: torch.Tensor, embedded: Embedded | None, input_ids: torch.Tensor,
                           branch_layer: int, generate_kwargs: dict) -> tuple[torch.Tensor, float, float]:
    """Layers [B, L) over ``hidden_b`` (cache already holds [0, B)), then ``generate`` from the cache.

    The last prompt token is left to ``generate`` (its cache entries are cropped), so the first new token
    goes through the model's own sampling, logits processors and stopping criteria.
    """
    t0 = time.perf_counter()
    n = input_ids.shape[-1]
    _upper_layers(model, adapter, cache, hidden_b, positions, embedded, branch_layer)
    for layer in cache.layers:
        layer.crop(-1)
    adapter.prepare_decode(model, float(positions.reshape(-1, n)[0, -1]), n)
    t1 = time.perf_counter()
    mask2d = torch.ones(1, n, dtype=torch.long, device=input_ids.device)
    out = model.generate(input_ids=input_ids.view(1, n), attention_mask=mask2d, past_key_values=cache,
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


@torch.no_grad()
def zoom_prefill(model: nn.Module, processor, inputs: dict, source_images: list[list[Image.Image]],
                 config: QZoomConfig | None = None, sample: int = 0) -> ZoomPrefill | None:
    """Pass 1 and the prefix-reusing pass 2 of one sample, forced to zoom; None when no region survives."""
    adapter = get_adapter(model)
    cfg = config or require_branches(model).qzoom_config
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(inputs["input_ids"])
    state = prefill_to_branch(model, **{k: v for k, v in inputs.items() if k != "attention_mask"},
                              attention_mask=attention_mask, use_cache=True)
    rpn_token_logits(model, state)
    start = int(attention_mask[sample].nonzero()[0])
    plan = _plan_zoom(model, adapter, processor, cfg, state, sample, start, state.image_samples(), state.heatmaps(),
                      source_images[sample][-1])
    if plan is None:
        return None
    cache, hidden, positions, embedded, full_ids = _zoom_prefix_pass(model, adapter, state, sample, start, plan)
    out = _upper_layers(model, adapter, cache, hidden, positions, embedded, state.branch_layer)
    encoded = plan["encoded"]
    return ZoomPrefill(adapter.final_logits(model, out), full_ids, positions, encoded["pixel_values"],
                       encoded.get("image_grid_thw"), plan["grid_box"])


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
    adapter = get_adapter(model)
    cfg = config or require_branches(model).qzoom_config
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("zoom_generate needs left padding (the prompts' last tokens must be real tokens)")
    batch = input_ids.shape[0]

    t0 = time.perf_counter()
    state = prefill_to_branch(model, **{k: v for k, v in inputs.items() if k != "attention_mask"},
                              attention_mask=attention_mask, use_cache=True)
    owners = state.image_samples()
    has_image = [b in owners for b in range(batch)]
    probs: list[float | None] = [None] * batch
    if cfg.mode == "zoom":
        state.gate_logit = router.gate_logits(model, state).to(state.hidden.device)
        gate = torch.sigmoid(state.gate_logit).float().tolist()
        probs = [p if has_image[b] else None for b, p in enumerate(gate)]
    decisions = zoom_decisions(probs if cfg.mode == "zoom" else [0.0 if h else None for h in has_image],
                               cfg.mode, cfg.tau_gate)
    decisions = [(z and has_image[b], r if has_image[b] or not z else "no_image") for b, (z, r) in
                 enumerate(decisions)]
    heatmaps = None
    if any(z for z, _ in decisions):
        state.rpn_token_logits = router.rpn_token_logits(model, state).to(state.hidden.device)
        heatmaps = state.heatmaps()
    pass1 = (time.perf_counter() - t0) / batch

    text_config = adapter.text_config(model)
    b_layer = state.branch_layer
    visual_counts = state.embedded.visual_mask.sum(dim=1).tolist()
    generated: list[torch.Tensor] = []
    stats: list[ZoomStats] = []
    for b in range(batch):
        zoom, reason = decisions[b]
        st = ZoomStats(gate_prob=probs[b], reason=reason, visual_tokens_low=int(visual_counts[b]),
                       time_pass1_s=pass1)
        start = int(attention_mask[b].nonzero()[0])
        ids_b = input_ids[b, start:]
        pos_b = _slice_positions(state.position_ids, b, start)
        plan = None
        if zoom:
            try:
                plan = _plan_zoom(model, adapter, processor, cfg, state, b, start, owners, heatmaps,
                                  source_images[b][-1] if source_images[b] else None)
            except Exception as exc:  # a crop that cannot be encoded is answered from pass 1
                logger.warning("Q-Zoom: sample %d zoom failed (%s); answering from the low-resolution pass", b, exc)
                plan, st.reason = None, "error"
            if plan is None and st.reason != "error":
                st.reason = "no_roi"
        if plan is None:
            cache = _sample_cache(state.cache, b, start, input_ids.shape[1], b_layer, text_config)
            emb = Embedded(state.embedded.inputs_embeds[b:b + 1, start:], state.embedded.visual_mask[b:b + 1, start:],
                           [], _deepstack_rows(state, b))
            new, t_pass2, t_dec = _continue_and_generate(
                model, adapter, cache, state.hidden[b:b + 1, start:], pos_b, emb, ids_b, b_layer, generate_kwargs)
            st.prompt_tokens = int(ids_b.numel())
        else:
            t1 = time.perf_counter()
            cache, hidden, positions, embedded, full_ids = _zoom_prefix_pass(model, adapter, state, b, start, plan)
            prep = time.perf_counter() - t1
            new, t_pass2, t_dec = _continue_and_generate(model, adapter, cache, hidden, positions, embedded,
                                                         full_ids, b_layer, generate_kwargs)
            t_pass2 += prep + plan["encode_s"]
            st.zoomed = True
            st.box = plan["box_norm"]
            st.grid_box = plan["grid_box"]
            st.grid = tuple(plan["grid"])
            st.visual_tokens_roi = plan["num_roi"]
            st.prompt_tokens = int(full_ids.numel())
        st.time_pass2_s, st.time_decode_s = t_pass2, t_dec
        generated.append(new)
        stats.append(st)
    return ZoomOutput(generated, stats)


def _plan_zoom(model, adapter: FamilyAdapter, processor, cfg: QZoomConfig, state: BranchPrefill, b: int,
               start: int, owners: list[int], heatmaps: list[torch.Tensor], image: Image.Image | None):
    """Box, crop and encoded crop of sample ``b``'s last image; None when no region survives."""
    if image is None:
        return None
    image_index = max(i for i, owner in enumerate(owners) if owner == b)
    grid = state.embedded.grids[image_index]
    box = roi_box_from_heatmap(heatmaps[image_index].float(), cfg.tau_roi, cfg.blur_kernel, cfg.blur_sigma)
    if box is None:
        return None
    t0 = time.perf_counter()
    # the grid may cover only part of the image (LLaVA's CLIP center-crops): map cells into that region
    pixel_box = region_pixel_box(box, grid, image.size, grid_region(image.size, processor), cfg.min_box_side)
    crop = adapter.resize_for_budget(crop_image(image.convert("RGB"), pixel_box), cfg.roi_min_tokens,
                                     cfg.roi_max_tokens)
    encoded = adapter.encode_images(processor, [crop])
    encoded = {k: v.to(state.hidden.device) for k, v in encoded.items()}
    if "pixel_values" in encoded:
        encoded["pixel_values"] = encoded["pixel_values"].to(state.hidden.dtype)
    # visual indices of the zoomed (last) image within the sample, in unpadded coordinates
    visual = state.embedded.visual_mask[b, start:].nonzero().flatten()
    rows, cols = grid
    visual_index = visual[-rows * cols:]
    return {"grid": grid, "grid_box": (box.x0, box.y0, box.x1, box.y1), "box": box, "encoded": encoded,
            "visual_index": visual_index, "box_norm": pixel_box.normalized(*image.size),
            "encode_s": time.perf_counter() - t0, "num_roi": 0}


def roi_augmented_sequence(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                           positions: torch.Tensor, visual_index: torch.Tensor, src_grid: tuple[int, int],
                           box, roi_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokens and positions of one sample with a crop inserted after its source image.

    ``input_ids`` is the sample's unpadded prompt (1-D; at training time it also holds the answer),
    ``positions`` its positions ([3, 1, S] or [1, S]), ``visual_index`` the indices of the zoomed image's
    visual tokens, ``box`` the grid box the crop covers. Returns (ids [N], positions [..., 1, N], prefix_end):
    everything before ``prefix_end`` is unchanged (its KV cache is reusable). Inference and Post-SFT
    training both build the zoomed sequence here, so they see exactly the same tokens and positions.
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
def _zoom_prefix_pass(model, adapter: FamilyAdapter, state: BranchPrefill, b: int, start: int, plan: dict):
    """Insert the crop after the source image and run only the new tokens through layers [0, B)."""
    encoded = plan["encoded"]
    roi_grid = adapter.encoded_grid(model, encoded)
    plan["num_roi"] = roi_grid[0] * roi_grid[1]
    full_ids, positions, prefix_end = roi_augmented_sequence(
        model, adapter, state.input_ids[b, start:], _slice_positions(state.position_ids, b, start),
        plan["visual_index"], plan["grid"], plan["box"], roi_grid)
    new_ids = full_ids[prefix_end:][None]
    embedded_new = adapter.embed(model, new_ids, encoded.get("pixel_values"), encoded.get("image_grid_thw"))
    new_pos = positions[..., prefix_end:]

    text_config = adapter.text_config(model)
    b_layer = state.branch_layer
    cache = _sample_cache(state.cache, b, start, start + prefix_end, b_layer, text_config)
    h_new = embedded_new.inputs_embeds
    total = full_ids.numel()
    mask2d = torch.ones(1, total, dtype=torch.long, device=h_new.device)
    mask = adapter.causal_mask(model, h_new, mask2d, cache)
    rope = adapter.rotary(model, h_new, new_pos)
    layers = adapter.decoder_layers(model)
    h_new = adapter.run_layers(model, layers[:b_layer], 0, h_new, rope, mask, cache, embedded_new)

    hidden = torch.cat([state.hidden[b:b + 1, start:start + prefix_end], h_new], dim=1)
    src_rows = _deepstack_rows(state, b)
    deepstack = None
    if src_rows is not None and embedded_new.deepstack is not None:
        deepstack = [torch.cat([s, r]) for s, r in zip(src_rows, embedded_new.deepstack)]
    visual_mask = torch.cat([state.embedded.visual_mask[b:b + 1, start:start + prefix_end], embedded_new.visual_mask],
                            dim=1)
    embedded = Embedded(torch.empty(0), visual_mask, [], deepstack)
    return cache, hidden, positions, embedded, full_ids


def roi_grid_box(roi: dict, src_grid: tuple[int, int]) -> GridBox:
    """The grid cells of a stored RoI: the exact cells when the grid is unchanged, else those the box covers."""
    if roi.get("grid_box") is not None and tuple(roi.get("grid") or ()) == tuple(src_grid):
        return GridBox(*[int(v) for v in roi["grid_box"]])
    rows, cols = src_grid
    left, top, right, bottom = roi["box"]
    x0, y0 = min(int(math.floor(left * cols)), cols - 1), min(int(math.floor(top * rows)), rows - 1)
    x1, y1 = max(int(math.ceil(right * cols)), x0 + 1), max(int(math.ceil(bottom * rows)), y0 + 1)
    return GridBox(x0, y0, min(x1, cols), min(y1, rows))


def random_roi(rng, min_side: float = 0.1, max_side: float = 0.6) -> dict:
    """A random box (sides U(min_side, max_side) of the image) for Post-SFT's RoI noise."""
    w, h = rng.uniform(min_side, max_side), rng.uniform(min_side, max_side)
    left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return {"box": [left, top, left + w, top + h]}


@torch.no_grad()
def roi_training_sequence(model: nn.Module, processor, family: str, encoded: dict, image: Image.Image, roi: dict,
                          config: QZoomConfig) -> dict:
    """Training tensors of a sample with its stored RoI inserted, exactly as inference inserts it.

    ``encoded`` is the template's encoding of the plain sample (prompt + answer, labels on the answer);
    ``image`` the original image of its (last) source image. Returns input ids, labels (crop tokens -100),
    pixel values / grids for source + crop, and the positions (Qwen: continuous MRoPE; LLaVA: None, the
    model's sequential positions already are the zoomed ones).
    """
    from qzoom_swift.families import get_adapter
    from qzoom_swift.roi import PixelBox

    adapter = get_adapter(family)
    ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long)
    grid_thw = encoded.get("image_grid_thw")
    mm = encoded.get("mm_token_type_ids")
    positions = adapter.position_ids(model, ids[None], None, None if mm is None else torch.as_tensor(mm).view(1, -1),
                                     grid_thw)
    src_grid = adapter.encoded_grid(model, {"image_grid_thw": grid_thw[-1:]} if grid_thw is not None else {})
    visual = (ids == adapter.image_token_id(model)).nonzero().flatten()
    visual_index = visual[-src_grid[0] * src_grid[1]:]
    box = roi_grid_box(roi, src_grid)
    pixel_box = PixelBox.from_normalized(tuple(roi["box"]), *image.size)
    crop = adapter.resize_for_budget(crop_image(image.convert("RGB"), pixel_box), config.roi_min_tokens,
                                     config.roi_max_tokens)
    enc = adapter.encode_images(processor, [crop])
    roi_grid = adapter.encoded_grid(model, enc)
    full_ids, full_pos, prefix_end = roi_augmented_sequence(model, adapter, ids, positions.to(ids.device),
                                                            visual_index, src_grid, box, roi_grid)
    inserted = full_ids.numel() - ids.numel()
    out = {"input_ids": full_ids.tolist(), "image_token_id": adapter.image_token_id(model),
           "labels": list(encoded["labels"][:prefix_end]) + [-100] * inserted + list(encoded["labels"][prefix_end:])}
    if encoded.get("loss_scale") is not None:
        scale = list(encoded["loss_scale"])
        out["loss_scale"] = scale[:prefix_end] + [0.0] * inserted + scale[prefix_end:]
    pixel_values = torch.as_tensor(encoded["pixel_values"])
    out["pixel_values"] = torch.cat([pixel_values, enc["pixel_values"].to(pixel_values.dtype)])
    if grid_thw is not None:
        out["image_grid_thw"] = torch.cat([grid_thw, enc["image_grid_thw"]])
        out["position_ids"] = full_pos[:, 0]
    return out
