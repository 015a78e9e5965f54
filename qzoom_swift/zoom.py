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
configs, stopping criteria and streamers behave as usual. By default the continuations run batched: the
zoomed samples' crops are encoded in one call and their new tokens run layers [0, B) in one call (padded to one
length, masked); then every sample's sequence (pass 1's rows as they are, or the zoomed sequence) is left-padded
to one length, layers [B, L) run once over the batch and one ``generate`` decodes it, each sample keeping its
own positions (MRoPE deltas per row) and DeepStack rows. ``continuation="per_sample"`` runs them one by one (the earlier
path, kept for comparison and for streamers, which take one sequence).
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
from qzoom_swift.roi import (
    GridBox,
    crop_image,
    region_pixel_box,
    select_roi_box,
)

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
    ``forced`` / ``never``), or ``roi_peak`` (no cell passed tau_roi and ``roi_fallback="peak"`` boxed the region
    around the heatmap's peak); joined with ``+`` when both apply; empty otherwise."""
    sink_cells: int = 0
    """Heatmap cells masked as attention sinks before the blur (the family's released rule; 0 when off)."""
    visual_tokens_low: int = 0
    visual_tokens_roi: int = 0
    prompt_tokens: int = 0
    """Length of the sequence that was decoded from (pass 1, or pass 1 + inserted tokens)."""
    time_pass1_s: float = 0.0
    """This sample's share of the batched pass 1 (vision, layers [0, B), branches)."""
    time_pass2_s: float = 0.0
    """Continuation prefill: the sample's own crop encoding and RoI pass over layers [0, B) (zoomed samples),
    plus layers [B, L): its own time under ``per_sample``, its 1/batch share of the batched pass under
    ``batched``."""
    time_decode_s: float = 0.0
    """Decoding: its own ``generate`` under ``per_sample``, its 1/batch share of the batch's under ``batched``.
    Counts (tokens, decisions, boxes) are exact per sample either way; only the times are shares."""

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
    crop: Image.Image | None = field(default=None, compare=False, repr=False)
    """The resized crop that ``encoded`` holds (a serving engine re-encodes it, e.g. the vLLM wing)."""

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


CONTINUATIONS = ("batched", "per_sample")
"""How samples continue after pass 1: one [B, L) pass and one ``generate`` for the batch, or one per sample."""


def zoom_generate(model: nn.Module, processor, inputs: dict, source_images: list[list[Image.Image]],
                  config: QZoomConfig | None = None, router=None, continuation: str = "batched",
                  **generate_kwargs) -> ZoomOutput:
    """Q-Zoom generation for a left-padded batch encoded at the low budget.

    ``inputs`` are the processor (or ms-swift template) outputs of pass 1; ``source_images`` the original,
    full-resolution images of each sample (crops are cut from these). ``config`` defaults to the branches'
    config. ``router`` computes the gate and RPN outputs (default: ``TorchRouter``). ``continuation``:
    ``batched`` (default) or ``per_sample`` (see the module docstring; a ``streamer`` forces per-sample).
    Returns the new tokens and a ``ZoomStats`` per sample.
    """
    if continuation not in CONTINUATIONS:
        raise ValueError(f"continuation={continuation!r}; choose from {', '.join(CONTINUATIONS)}")
    router = router or TorchRouter()
    generate_kwargs = generation_settings(model, generate_kwargs)
    cfg = config or require_branches(model).qzoom_config
    attention_mask = _attention_mask(inputs)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("zoom_generate needs left padding (the prompts' last tokens must be real tokens)")

    t0 = time.perf_counter()
    state = _pass1(model, inputs, attention_mask)
    stats, plans = route_and_plan(model, processor, state, cfg, source_images, router, t0)
    if continuation == "per_sample" or generate_kwargs.get("streamer") is not None:
        generated = [_answer(model, state, b, plan, stats[b], generate_kwargs) for b, plan in enumerate(plans)]
    else:
        generated = _answer_batched(model, state, plans, stats, generate_kwargs)
    return ZoomOutput(generated, stats)


def describe_decisions(stats: list[ZoomStats]) -> str:
    """The ``qzoom:`` log line of one generate call or request, the same for every backend (ms-swift's
    transformers and vLLM engines, LLaMA-Factory): serving APIs have no field for the decision, and scripts and
    tests read it from the log."""
    parts = []
    for s in stats:
        p = None if s.gate_prob is None else round(s.gate_prob, 3)
        box = "" if s.grid_box is None else f" box={list(s.grid_box)}/{list(s.grid)}"
        fallback = "," + s.fallback if s.fallback else ""
        parts.append(f"{'zoom' if s.zoomed else 'direct'}({s.reason}{fallback}) p={p}{box} read={s.prompt_tokens} "
                     f"visual={s.visual_tokens_low}+{s.visual_tokens_roi}")
    return "qzoom: " + "; ".join(parts)


def route_and_plan(model: nn.Module, processor, state: BranchPrefill, cfg: QZoomConfig,
                   source_images: list[list[Image.Image]], router=None,
                   started: float | None = None) -> tuple[list[ZoomStats], list[ZoomPlan | None]]:
    """The decision and the box of every sample after pass 1: ``ZoomStats`` (reason, gate probability) and the
    zoomed samples' plans (None: answered from the low-resolution prompt).

    One home for the routing rules, shared by ``zoom_generate`` and the serving wings (vLLM's front router), so
    every backend zooms the same samples on the same boxes. ``started`` (``perf_counter`` before pass 1) sets
    the pass-1 time share.
    """
    router = router or TorchRouter()
    fallback_mode = untrained_gate_mode(cfg)
    if fallback_mode is not None:
        _warn_gate_untrained(cfg, fallback_mode)
    probs, decisions = _route(model, state, cfg, router, fallback_mode or cfg.mode)
    pass1 = 0.0 if started is None else (time.perf_counter() - started) / len(decisions)

    visual_counts = state.embedded.visual_mask.sum(dim=1).tolist()
    stats = [ZoomStats(gate_prob=probs[b], reason=reason, visual_tokens_low=int(visual_counts[b]),
                       time_pass1_s=pass1, fallback=GATE_UNTRAINED if fallback_mode else "")
             for b, (_, reason) in enumerate(decisions)]
    plans = [_plan_sample(processor, cfg, state, b, source_images[b], stats[b]) if zoom else None
             for b, (zoom, _) in enumerate(decisions)]
    return stats, plans


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
        _record_zoom(st, plan, seq)
    st.prompt_tokens = int(seq.input_ids.numel())
    st.time_pass2_s, st.time_decode_s = t_pass2, t_dec
    return new


def _record_zoom(st: ZoomStats, plan: ZoomPlan, seq: SampleSequence) -> None:
    st.zoomed, st.box, st.grid_box, st.grid = True, plan.box_norm, plan.grid_box, plan.grid
    st.visual_tokens_roi = seq.num_roi


def _answer_batched(model: nn.Module, state: BranchPrefill, plans: list[ZoomPlan | None], stats: list[ZoomStats],
                    generate_kwargs: dict) -> list[torch.Tensor]:
    """Every sample's new tokens from one [B, L) pass and one ``generate``; fills ``stats`` (times as shares).

    The zoomed samples first build their sequences together (crop tokens through layers [0, B) on their
    reused prefixes, ``_zoom_prefix_passes``); then all rows are left-padded to one length
    (``_batched_continuation``). A zoomed sample's pass-2 time is its crop encoding, its share of the RoI pass
    and its share of layers [B, L).
    """
    zoomed = [plan for plan in plans if plan is not None]
    t0 = time.perf_counter()
    seqs = dict(zip([p.sample for p in zoomed], _zoom_prefix_passes(model, state, zoomed) if zoomed else []))
    roi_share = (time.perf_counter() - t0) / max(1, len(zoomed))
    own = [0.0 if plan is None else plan.encode_s + roi_share for plan in plans]
    for plan in zoomed:
        _record_zoom(stats[plan.sample], plan, seqs[plan.sample])
    t0 = time.perf_counter()
    cont = _batched_continuation(model, state, seqs, generate_kwargs.get("generation_config"))
    new, t_upper, t_dec = _continue_and_generate_batch(model, state, cont, generate_kwargs)
    t_upper += time.perf_counter() - t0 - t_upper - t_dec  # the re-layout counts with layers [B, L)
    lengths = cont.attention_mask.sum(dim=1).tolist()
    for b, st in enumerate(stats):
        st.prompt_tokens = int(lengths[b])
        st.time_pass2_s = own[b] + t_upper / len(stats)
        st.time_decode_s = t_dec / len(stats)
    return new


@dataclass
class BatchContinuation:
    """The whole batch after layers [0, B), left-padded to one length: what one [B, L) pass and one decode take."""

    input_ids: torch.Tensor
    """[batch, N] ids (padding on the left)."""
    attention_mask: torch.Tensor
    """[batch, N] 1 at real tokens."""
    positions: torch.Tensor
    """[3, batch, N] (MRoPE; float when a row holds interpolated RoI positions) or [batch, N]."""
    hidden: torch.Tensor
    """[batch, N, d] hidden state after layer B-1."""
    embedded: Embedded
    """Visual mask [batch, N] and DeepStack rows (sample by sample, in sequence order)."""
    cache: object
    """DynamicCache holding layers [0, B) of every row."""


def _left_pad(x: torch.Tensor, pad: int, dim: int, value: float | bool = 0) -> torch.Tensor:
    """``x`` with ``pad`` entries of ``value`` prepended along ``dim`` (a copy either way: rows are rewritten)."""
    if pad == 0:
        return x.clone()
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x.new_full(shape, value), x], dim=dim)


def _pad_token_id(generation_config) -> int:
    """An id for left padding (masked out everywhere, so any id works; the pad id reads best)."""
    for value in (getattr(generation_config, "pad_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _batched_continuation(model: nn.Module, state: BranchPrefill, seqs: dict[int, SampleSequence],
                          generation_config=None) -> BatchContinuation:
    """Pass 1's rows as they are, left-padded to the longest sequence, with each zoomed row replaced by its sequence.

    Direct rows keep pass 1's layer-B state, positions and cache; a zoomed row takes its own (longer, with the
    crop inserted and continuous positions), right-aligned.
    """
    batch, s = state.input_ids.shape
    n = max([s] + [int(q.input_ids.numel()) for q in seqs.values()])
    pad = n - s
    pad_id = _pad_token_id(generation_config)
    ids = _left_pad(state.input_ids, pad, 1, pad_id)
    mask = _left_pad(state.attention_mask.long(), pad, 1)
    positions = state.position_ids
    if any(q.positions.is_floating_point() for q in seqs.values()):
        positions = positions.float()
    positions = _left_pad(positions, pad, positions.dim() - 1)
    hidden = _left_pad(state.hidden, pad, 1)
    visual = _left_pad(state.embedded.visual_mask, pad, 1, False)
    kv = [[_left_pad(t, pad, 2) for t in (layer.keys, layer.values)]
          for layer in state.cache.layers[:state.branch_layer]]
    for b, q in seqs.items():
        lo = n - int(q.input_ids.numel())
        hidden[b, :lo], hidden[b, lo:] = 0, q.hidden[0]
        for row, src, fill in ((ids[b], q.input_ids, pad_id), (mask[b], 1, 0),
                               (visual[b], q.embedded.visual_mask[0], False),
                               (positions[..., b, :], q.positions[..., 0, :], 0)):
            row[..., :lo] = fill
            row[..., lo:] = src
        for i, pair in enumerate(kv):
            for t, src in zip(pair, (q.cache.layers[i].keys, q.cache.layers[i].values)):
                t[b, :, :lo] = 0
                t[b, :, lo:] = src[0]
    deepstack = None
    if state.embedded.deepstack is not None:
        rows = [seqs[b].embedded.deepstack if b in seqs else _deepstack_rows(state, b) for b in range(batch)]
        deepstack = [torch.cat([r[level] for r in rows]) for level in range(len(state.embedded.deepstack))]
    from transformers import DynamicCache

    cache = DynamicCache(config=state.adapter.text_config(model))
    for i, (keys, values) in enumerate(kv):
        cache.layers[i].update(keys, values)
    return BatchContinuation(ids, mask, positions, hidden, Embedded(torch.empty(0), visual, [], deepstack), cache)


def _eos_ids(generation_config) -> set[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def _until_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """A batched row's new tokens up to its first end-of-sequence token (inclusive), as one-by-one ``generate``
    returns them: after it, a finished row of a batch only holds padding."""
    for i, token in enumerate(tokens.tolist()):
        if token in eos:
            return tokens[:i + 1]
    return tokens


@torch.no_grad()
def _continue_and_generate_batch(model: nn.Module, state: BranchPrefill, cont: BatchContinuation,
                                 generate_kwargs: dict) -> tuple[list[torch.Tensor], float, float]:
    """Layers [B, L) over the padded batch, then one ``generate`` from its cache (as ``_continue_and_generate``).

    Each row's MRoPE delta (Qwen) makes decoding continue that row's own positions.
    """
    adapter, b_layer = state.adapter, state.branch_layer
    t0 = time.perf_counter()
    mask = adapter.causal_mask(model, cont.hidden, cont.attention_mask, cont.cache, mask_layer_idx=b_layer)
    rope = adapter.rotary(model, cont.hidden, cont.positions)
    layers = adapter.decoder_layers(model)
    adapter.run_layers(model, layers[b_layer:], b_layer, cont.hidden, rope, mask, cont.cache, cont.embedded)
    for layer in cont.cache.layers:
        layer.crop(-1)
    n = cont.input_ids.shape[1]
    last = cont.positions.reshape(-1, *cont.input_ids.shape)[0, :, -1].tolist()
    adapter.prepare_batch_decode(model, last, cont.attention_mask.sum(dim=1).tolist())
    t1 = time.perf_counter()
    out = model.generate(input_ids=cont.input_ids, attention_mask=cont.attention_mask, past_key_values=cont.cache,
                         **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    config = generate_kwargs.get("generation_config") or model.generation_config
    per_sample = int(getattr(config, "num_return_sequences", None) or 1)  # rows b*k .. b*k+k-1 are sample b's
    eos = _eos_ids(config)
    new = [_until_eos(sequences[b * per_sample, n:], eos) for b in range(cont.input_ids.shape[0])]
    return new, t1 - t0, time.perf_counter() - t1


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
    # peak fallback: the gate said zoom, so with no cell above tau_roi crop around the peak, not answer from pass 1
    box, from_peak = select_roi_box(state.heatmaps()[image_index].float(), cfg.tau_roi, cfg.blur_kernel,
                                    cfg.blur_sigma, keep, cfg.roi_fallback)
    if from_peak and stats is not None:
        stats.fallback = "+".join(x for x in (stats.fallback, "roi_peak") if x)
    if box is None:
        return None
    t0 = time.perf_counter()
    adapter = state.adapter
    # the grid covers the family's view of the image (LLaVA: the padded square): map cells into that region
    pixel_box = region_pixel_box(box, grid, image.size, adapter.source_region(image.size, processor),
                                 cfg.min_box_side)
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
                    visual_index=visual[-rows * cols:], encoded=encoded, encode_s=time.perf_counter() - t0, crop=crop)


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


@torch.no_grad()
def _zoom_prefix_passes(model: nn.Module, state: BranchPrefill, plans: list[ZoomPlan]) -> list[SampleSequence]:
    """``_zoom_prefix_pass`` of several zoomed samples at once: one crop embedding, one layers-[0, B) call.

    Each sample's new tokens (crop + tail) sit right-aligned in a block of one length, after its reused
    prefix right-aligned in a block of another; the 2-D mask hides both paddings. The result is split
    back into per-sample sequences (``_batched_continuation`` lays them out again with the direct rows).
    """
    if len(plans) == 1:
        return [_zoom_prefix_pass(model, state, plans[0])]
    adapter = state.adapter
    built = []
    for plan in plans:
        roi_grid = adapter.encoded_grid(model, plan.encoded)
        built.append((roi_grid, *roi_augmented_sequence(
            model, adapter, state.input_ids[plan.sample, plan.start:],
            _slice_positions(state.position_ids, plan.sample, plan.start), plan.visual_index, plan.grid, plan.box,
            roi_grid)))
    ends = [prefix_end for *_, prefix_end in built]
    news = [int(ids.numel()) - end for (_, ids, _, end) in built]
    p_max, n_max = max(ends), max(news)
    first = plans[0].encoded
    pixels = torch.cat([p.encoded["pixel_values"] for p in plans]) if "pixel_values" in first else None
    grid_thw = torch.cat([p.encoded["image_grid_thw"] for p in plans]) if "image_grid_thw" in first else None
    ids = torch.stack([_left_pad(full[end:], n_max - (full.numel() - end), 0, int(full[-1]))
                       for (_, full, _, end) in built])  # padded with a text token: its embedding is masked
    embedded = adapter.embed(model, ids, pixels, grid_thw)
    positions = torch.stack([_left_pad(pos[..., 0, end:], n_max - (pos.shape[-1] - end), pos.dim() - 2)
                             for (_, _, pos, end) in built], dim=-2)
    mask2d = torch.zeros(len(plans), p_max + n_max, dtype=torch.long, device=ids.device)
    from transformers import DynamicCache

    cache = DynamicCache(config=adapter.text_config(model))
    for i in range(state.branch_layer):
        layer = state.cache.layers[i]
        keys, values = [torch.stack([_left_pad(t[p.sample, :, p.start:p.start + end], p_max - end, 1)
                                     for p, end in zip(plans, ends)]) for t in (layer.keys, layer.values)]
        cache.layers[i].update(keys, values)
    for row, (end, new) in enumerate(zip(ends, news)):
        mask2d[row, p_max - end:p_max] = 1
        mask2d[row, p_max + n_max - new:] = 1
    h_new = embedded.inputs_embeds
    mask = adapter.causal_mask(model, h_new, mask2d, cache)
    rope = adapter.rotary(model, h_new, positions)
    h_new = adapter.run_layers(model, adapter.decoder_layers(model)[:state.branch_layer], 0, h_new, rope, mask,
                               cache, embedded)
    return [_split_zoomed(model, state, plan, built[row], row, cache, h_new, embedded, p_max)
            for row, plan in enumerate(plans)]


def _split_zoomed(model: nn.Module, state: BranchPrefill, plan: ZoomPlan, built: tuple, row: int, cache,
                  h_new: torch.Tensor, embedded: Embedded, p_max: int) -> SampleSequence:
    """Row ``row`` of the batched RoI pass as the batch-of-one sequence ``_zoom_prefix_pass`` would give."""
    from transformers import DynamicCache

    roi_grid, full_ids, positions, prefix_end = built
    b, start, n_max = plan.sample, plan.start, h_new.shape[1]
    new = int(full_ids.numel()) - prefix_end
    keep = torch.cat([torch.arange(p_max - prefix_end, p_max), torch.arange(p_max + n_max - new, p_max + n_max)])
    keep = keep.to(h_new.device)
    out = DynamicCache(config=state.adapter.text_config(model))
    for i in range(state.branch_layer):
        layer = cache.layers[i]
        out.layers[i].update(layer.keys[row:row + 1, :, keep], layer.values[row:row + 1, :, keep])
    deepstack = None
    if embedded.deepstack is not None:
        counts = embedded.visual_mask.sum(dim=1).tolist()
        offset = int(sum(counts[:row]))
        deepstack = [level[offset:offset + int(counts[row])] for level in embedded.deepstack]
    own = Embedded(torch.empty(0), embedded.visual_mask[row:row + 1, n_max - new:], [], deepstack)
    hidden = torch.cat([state.hidden[b:b + 1, start:start + prefix_end], h_new[row:row + 1, n_max - new:]], dim=1)
    return SampleSequence(full_ids, positions, hidden, _zoomed_embedded(state, plan, prefix_end, own), out,
                          num_roi=roi_grid[0] * roi_grid[1])
