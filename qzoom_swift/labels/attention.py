"""Response-to-image attention of the base model while it generates its answer (stage-1 teacher signal).

What is recorded (reference §2.1): the model answers the question with greedy ``generate`` under eager
attention. Every decode step feeds one generated token y_j (j >= 1: the prefill, which produces y_1, is
skipped) and its attention row over the image's visual tokens is read at the selected layers. Rows are
averaged over the decode steps of each sample, i.e. over the queries y_1 ... y_{n-1}; the step that feeds
an end-of-sequence token and everything after it (padding of a finished sample in a batch) is excluded.
The map of an image is then the mean over the selected (layer, head) pairs. With ``queries="answer+prompt"``
the prefill's last prompt position (the query that predicts y_1) is averaged in too: for one-word answers
it is the only query that has to read the image (y_1 itself only predicts the end of the answer).

How: forward hooks. ``attn_implementation="eager"`` makes every decoder attention module of the three
families (Qwen2.5-VL, Qwen3-VL and LLaVA's Llama, transformers 5.19) return its softmax weights as the
second output, so a hook on ``self_attn`` of the selected layers sees ``[B, H, 1, K]`` at each decode step
and keeps only the visual columns, summed into a ``[H, N_vis]`` accumulator per sample and layer. No
``output_attentions`` tuple of all layers and steps is ever materialised. A forward pre-hook on the model
reads the token fed at each step (to drop finished samples); a pre-hook on a decoder layer reads its input
hidden states during the prefill (the visual-token L2 norms for the norm sink test).

Which (layer, heads):

- known checkpoints (keyed like ``KNOWN_BRANCH_LAYERS``: family, depth, width) use the hand-picked
  grounding and sink heads of the official release (Qwen2.5-VL-3B/7B, Qwen3-VL-4B/8B; reference §2.1,
  per ``mode``: ``textual`` = documents/OCR, ``natural`` = photos) and of SD-RPN for LLaVA-1.5-7B/13B;
- any other model: ``auto`` — record all heads of the middle-to-late layers
  (``[round(0.3 L), round(0.85 L))``, the depth band where every hand-picked head above lives), and keep
  the ``top_k`` layers (default 2) whose head-averaged maps are the most concentrated: the lowest mean
  normalised entropy ``H(p) / log N`` of the map (sinks zeroed by the norm test, so a layer that merely
  stares at a massive-activation token is not mistaken for a focused one), measured on the first
  records of the job (calibration) and then fixed for the whole job;
- or an explicit spec, e.g. ``"20:1,4;22:14"`` (layer 20 heads 1 and 4, layer 22 head 14) or ``"14;16"``
  (all heads of layers 14 and 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

MODES = ("textual", "natural")
AUTO_BAND = (0.3, 0.85)
"""Candidate layers of the automatic choice, as fractions of the depth: [round(0.3 L), round(0.85 L))."""
AUTO_TOP_K = 2
QUERIES = ("answer", "answer+prompt")
"""Which positions' attention rows make the map: the answer's tokens (as released), or also the last prompt token."""


@dataclass(frozen=True)
class HeadSelection:
    """Which attention heads make the grounding map (and the sink-head map)."""

    grounding: dict[int, tuple[int, ...] | None]
    """layer -> heads averaged into the map (None = all heads of that layer)."""
    sink: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    """layer -> heads of the official sink test (empty = no sink heads)."""
    sink_threshold: float = 1e-2
    """A token is a sink when the sink heads' attention to it is >= this."""
    source: str = "custom"
    """Where it comes from: ``known:<checkpoint>/<mode>``, ``auto`` or ``custom``."""

    def __post_init__(self) -> None:
        if not self.grounding:
            raise ValueError("a head selection needs at least one grounding layer")
        for name, table in (("grounding", self.grounding), ("sink", self.sink)):
            for layer, heads in table.items():
                if layer < 0 or (heads is not None and (not heads or min(heads) < 0)):
                    raise ValueError(f"{name} heads {layer}:{heads}: layers/heads must be >= 0, lists non-empty")

    @property
    def layers(self) -> list[int]:
        """Every layer whose attention must be recorded (grounding and sink)."""
        return sorted(set(self.grounding) | set(self.sink))

    def check(self, num_layers: int, num_heads: int) -> None:
        for layer, heads in {**self.grounding, **self.sink}.items():
            if layer >= num_layers:
                raise ValueError(f"head selection uses layer {layer}, the model has {num_layers} decoder layers")
            if heads is not None and max(heads) >= num_heads:
                raise ValueError(f"head selection uses head {max(heads)} of layer {layer}; the model has "
                                 f"{num_heads} heads")

    def to_dict(self) -> dict:
        def enc(table):
            return {str(k): (None if v is None else list(v)) for k, v in sorted(table.items())}

        return {"grounding": enc(self.grounding), "sink": enc(self.sink), "sink_threshold": self.sink_threshold,
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> HeadSelection:
        def dec(table):
            return {int(k): (None if v is None else tuple(int(h) for h in v)) for k, v in (table or {}).items()}

        return cls(dec(data["grounding"]), dec(data.get("sink")), float(data.get("sink_threshold", 1e-2)),
                   str(data.get("source", "custom")))

    @staticmethod
    def parse_spec(spec: str) -> dict[int, tuple[int, ...] | None]:
        """``"20:1,4;22:14"`` -> {20: (1, 4), 22: (14,)}; ``"14;16"`` -> {14: None, 16: None} (all heads)."""
        table: dict[int, tuple[int, ...] | None] = {}
        for part in (p.strip() for p in spec.split(";")):
            if not part:
                continue
            try:
                if ":" in part:
                    layer, heads = part.split(":", 1)
                    table[int(layer)] = tuple(int(h) for h in heads.split(",") if h.strip())
                else:
                    table[int(part)] = None
            except ValueError as exc:
                raise ValueError(f"bad head spec {spec!r}: expected 'LAYER:H,H;LAYER' (e.g. '20:1,4;22')") from exc
        if not table:
            raise ValueError(f"empty head spec {spec!r}")
        return table


def _sel(grounding: dict, sink: dict, name: str, mode: str, threshold: float = 1e-2) -> HeadSelection:
    as_tuple = {k: tuple(v) for k, v in grounding.items()}
    sink_t = {k: (None if v is None else tuple(v)) for k, v in sink.items()}
    return HeadSelection(as_tuple, sink_t, threshold, f"known:{name}/{mode}")


def _both(name: str, textual: tuple[dict, dict], natural: tuple[dict, dict], threshold: float = 1e-2):
    return {"textual": _sel(*textual, name, "textual", threshold), "natural": _sel(*natural, name, "natural", threshold)}


KNOWN_ATTENTION_HEADS: dict[tuple[str, int, int], dict[str, HeadSelection]] = {
    # Q-Zoom make_stage1_pseudo_labels.get_head_config (0-indexed layers and heads).
    ("qwen2_5_vl", 36, 2048): _both("Qwen2.5-VL-3B", ({20: [1, 4], 22: [14]}, {}),
                                    ({21: [9, 11], 22: [0, 7]}, {8: [1, 13]})),
    ("qwen2_5_vl", 28, 3584): _both("Qwen2.5-VL-7B", ({22: [1, 4], 23: [6, 11]}, {}),
                                    ({16: [1, 7, 17], 19: [17, 20]}, {9: [4, 22]})),
    ("qwen3_vl", 36, 2560): _both("Qwen3-VL-4B", ({19: [24, 27], 24: [21, 23]}, {24: [6, 10]}),
                                  ({20: [15, 21, 23], 21: [8, 10, 11]}, {20: [1, 24]})),
    ("qwen3_vl", 36, 4096): _both("Qwen3-VL-8B", ({19: [24, 26, 27], 24: [21, 22, 23]}, {24: [1, 2]}),
                                  ({20: [15, 21, 23], 21: [8, 10, 11]}, {21: [7]})),
    # SD-RPN (LLaVA/llava/eval/model_vqa_label.py): one table for both modes. The 7B sink test is "mean of
    # all heads of layer 2 >= 1e-3".
    ("llava", 32, 4096): _both("LLaVA-1.5-7B", ({14: [13, 24, 26]}, {2: None}), ({14: [13, 24, 26]}, {2: None}),
                               threshold=1e-3),
    ("llava", 40, 5120): _both("LLaVA-1.5-13B", ({13: [21, 23, 26], 15: [2], 16: [2, 21, 30]}, {16: [17, 22]}),
                               ({13: [21, 23, 26], 15: [2], 16: [2, 21, 30]}, {16: [17, 22]})),
}


def known_head_selection(family: str, num_layers: int, hidden_size: int, mode: str = "textual") -> HeadSelection | None:
    """The released (layer, heads) choice for a known checkpoint shape, or None."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    table = KNOWN_ATTENTION_HEADS.get((family, num_layers, hidden_size))
    return None if table is None else table[mode]


def auto_candidate_layers(num_layers: int) -> list[int]:
    """All layers of the middle-to-late band ``[round(0.3 L), round(0.85 L))`` (at least one layer)."""
    lo = max(0, int(round(AUTO_BAND[0] * num_layers)))
    hi = min(num_layers, max(lo + 1, int(round(AUTO_BAND[1] * num_layers))))
    return list(range(lo, hi))


def normalized_entropy(values: Tensor) -> float:
    """Entropy of ``values / sum`` divided by log(N): 0 = all mass on one token, 1 = uniform."""
    v = values.detach().float().flatten().clamp_min(0)
    n, total = v.numel(), float(v.sum())
    if n <= 1 or not total > 0:
        return 1.0
    p = v / total
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum()) / math.log(n)


def rank_layers_by_concentration(layer_maps: list[dict[int, Tensor]]) -> list[tuple[int, float]]:
    """(layer, mean normalised entropy over samples), most concentrated first.

    ``layer_maps`` holds, per calibration sample, each candidate layer's head-averaged map with sinks
    already zeroed.
    """
    if not layer_maps:
        raise ValueError("no calibration samples to choose attention layers from")
    layers = sorted(set.intersection(*(set(m) for m in layer_maps)))
    scores = [(layer, sum(normalized_entropy(m[layer]) for m in layer_maps) / len(layer_maps)) for layer in layers]
    return sorted(scores, key=lambda item: (item[1], item[0]))


# ----------------------------------------------------------------------------------------------- recording


@dataclass
class SampleAttention:
    """What one sample's generation left: per-layer decode-averaged attention and prefill norms."""

    per_layer: dict[int, Tensor]
    """layer -> float32 [H, N_vis]: attention of the decode-step queries to each visual token, step mean."""
    norms: dict[int, Tensor]
    """layer -> float32 [N_vis]: L2 norm of the visual tokens' hidden states entering that layer (prefill)."""
    num_steps: int
    """Decode steps averaged (answer tokens y_1..y_{n-1}); 0 = no map (answer of one token or none)."""

    def head_mean(self, table: dict[int, tuple[int, ...] | None]) -> Tensor | None:
        """Mean over the (layer, head) pairs of ``table`` (None heads = all), float32 [N_vis]; None if empty."""
        if not table:
            return None
        rows = []
        for layer, heads in sorted(table.items()):
            weights = self.per_layer[layer]
            rows.append(weights if heads is None else weights[list(heads)])
        return torch.cat(rows, dim=0).mean(dim=0)


def _visual_positions(input_ids: Tensor, image_token_id: int) -> list[Tensor]:
    return [torch.nonzero(row == image_token_id).flatten() for row in input_ids]


class AttentionRecorder:
    """Forward hooks that accumulate decode-step attention over visual tokens (see the module docstring).

    Use as a context manager around ``model.generate(**inputs)`` after :meth:`reset` with the batch's
    ``input_ids``; then :meth:`results` gives one :class:`SampleAttention` per sample.
    """

    def __init__(self, model: nn.Module, layers: list[int], norm_layers: list[int], eos_token_ids: list[int],
                 image_token_id: int, queries: str = "answer"):
        from qzoom_swift.families import get_adapter

        if queries not in QUERIES:
            raise ValueError(f"queries={queries!r}: choose from {', '.join(QUERIES)}")
        self.with_prompt = queries == "answer+prompt"
        self.model = model
        self.decoder_layers = get_adapter(model).decoder_layers(model)
        self.layers = sorted(set(layers))
        self.norm_layers = sorted(set(norm_layers))
        bad = [i for i in self.layers + self.norm_layers if not 0 <= i < len(self.decoder_layers)]
        if bad:
            raise ValueError(f"attention layers {bad} out of range: the model has {len(self.decoder_layers)} layers")
        self.eos = torch.tensor(sorted(set(int(t) for t in eos_token_ids)), dtype=torch.long)
        self.image_token_id = int(image_token_id)
        self._handles: list = []
        self._decoding = False
        self._positions: list[Tensor] = []

    # ---- lifecycle ----
    def reset(self, input_ids: Tensor) -> None:
        self._positions = [p.to(input_ids.device) for p in _visual_positions(input_ids, self.image_token_id)]
        batch = input_ids.shape[0]
        self._done = torch.zeros(batch, dtype=torch.bool)
        self._active = torch.zeros(batch, dtype=torch.bool)
        self._steps = torch.zeros(batch, dtype=torch.long)
        self._sums: list[dict[int, Tensor]] = [{} for _ in range(batch)]
        self._norms: list[dict[int, Tensor]] = [{} for _ in range(batch)]
        self._decoding = False

    def __enter__(self) -> AttentionRecorder:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for i in self.layers:
            attn = self.decoder_layers[i].self_attn
            self._handles.append(attn.register_forward_hook(self._make_attention_hook(i)))
        for i in self.norm_layers:
            self._handles.append(self.decoder_layers[i].register_forward_pre_hook(self._make_norm_hook(i),
                                                                                  with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- hooks ----
    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("AttentionRecorder needs generate() to pass input_ids (not inputs_embeds)")
        if input_ids.shape[1] > 1:
            self._decoding = False
            if self.with_prompt:  # the prefill's last position is one more query of every sample
                self._steps += 1
            return None
        fed = input_ids[:, 0].detach().cpu()
        is_eos = torch.isin(fed, self.eos)
        self._active = ~self._done & ~is_eos
        self._done |= is_eos
        self._steps += self._active.long()
        self._decoding = True
        return None

    def _make_attention_hook(self, layer: int):
        def hook(module, args, output):
            if not (self._decoding or self.with_prompt):
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("attention weights are not returned: load the model with "
                                   "attn_implementation='eager' (e.g. {'text_config': 'eager'})")
            samples = torch.nonzero(self._active).flatten().tolist() if self._decoding else range(len(self._positions))
            for b in samples:  # left padding: position -1 is every sample's last prompt token in the prefill
                row = weights[b, :, -1, self._positions[b]].detach().float().cpu()  # [H, N_vis]
                acc = self._sums[b].get(layer)
                self._sums[b][layer] = row if acc is None else acc + row

        return hook

    def _make_norm_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._decoding:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None or hidden.shape[1] == 1:
                return None
            for b, pos in enumerate(self._positions):
                self._norms[b][layer] = hidden[b, pos].detach().float().norm(dim=-1).cpu()
            return None

        return hook

    # ---- results ----
    def results(self, num_heads: int) -> list[SampleAttention]:
        out = []
        for b, pos in enumerate(self._positions):
            steps = int(self._steps[b])
            per_layer = {}
            for layer in self.layers:
                acc = self._sums[b].get(layer)
                if acc is None or steps == 0:
                    per_layer[layer] = torch.zeros(num_heads, pos.numel())
                else:
                    per_layer[layer] = acc / steps
            out.append(SampleAttention(per_layer, dict(self._norms[b]), steps))
        return out


def image_grids(model: nn.Module, inputs: dict) -> list[tuple[int, int]]:
    """Merged-token grid (rows, cols) of every image in a processor batch."""
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        merge = int(getattr(model.config.vision_config, "spatial_merge_size", 2))
        return [(int(h) // merge, int(w) // merge) for _, h, w in thw.tolist()]
    from qzoom_swift.families import get_adapter

    image_id = get_adapter(model).image_token_id(model)
    grids = []
    for count in (inputs["input_ids"] == image_id).sum(dim=1).tolist():
        side = math.isqrt(int(count))
        if side * side != count:
            raise ValueError(f"{count} visual tokens of a fixed-size image do not make a square grid")
        grids.append((side, side))
    return grids


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(int(i) for i in ids))


@torch.no_grad()
def generate_with_attention(model: nn.Module, inputs: dict, layers: list[int], norm_layers: list[int],
                            eos_ids: list[int], max_new_tokens: int = 128, queries: str = "answer",
                            **generate_kwargs) -> tuple[Tensor, list[SampleAttention]]:
    """Greedy ``generate`` on a processor batch (left-padded) while recording; returns (new token ids, per sample).

    ``generate_kwargs`` go to ``model.generate`` (e.g. a ``logits_processor``).
    """
    from qzoom_swift.families import get_adapter

    adapter = get_adapter(model)
    recorder = AttentionRecorder(model, layers, norm_layers, eos_ids, adapter.image_token_id(model), queries)
    recorder.reset(inputs["input_ids"])
    with recorder:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None, **generate_kwargs)
    num_heads = int(adapter.text_config(model).num_attention_heads)
    return out[:, inputs["input_ids"].shape[1]:], recorder.results(num_heads)


__all__ = [
    "AUTO_BAND", "AUTO_TOP_K", "AttentionRecorder", "HeadSelection", "KNOWN_ATTENTION_HEADS", "MODES", "QUERIES",
    "SampleAttention", "auto_candidate_layers", "eos_token_ids", "generate_with_attention", "image_grids",
    "known_head_selection", "normalized_entropy", "rank_layers_by_concentration",
]
