"""One prefill through layer B feeds both branches; nothing below B ever runs twice.

``prefill_to_branch`` embeds the prompt and runs base layers [0, B) (filling the KV cache when asked);
``gate_logits`` and ``rpn_token_logits`` read its hidden state; ``continue_prefill`` runs layers [B, L)
for the direct (no-zoom) answer. Training the branches uses the same functions without a cache and
without ever running layers [B, L) or the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qzoom_swift.branches import require_branches
from qzoom_swift.families import Embedded, FamilyAdapter, get_adapter

IGNORE_INDEX = -100


@dataclass
class BranchPrefill:
    """State of a batch after base layers [0, B): what the branches and the rest of the model need."""

    hidden: torch.Tensor
    """[B, S, d] hidden state after base layer B-1 (the branches' input)."""
    input_ids: torch.Tensor
    embedded: Embedded
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    query_index: torch.Tensor
    """[B] index of the query token (last prompt token) of each sample."""
    branch_layer: int
    """B: the first layer not yet run (the branches sit beside it)."""
    adapter: FamilyAdapter
    """The model's family adapter, resolved once by ``prefill_to_branch`` for everything that reads the state."""
    cache: object | None = None
    """DynamicCache holding layers [0, B) of the prompt, when requested."""
    gate_logit: torch.Tensor | None = None
    rpn_token_logits: torch.Tensor | None = None
    rpn_sink_logits: torch.Tensor | None = None
    """[B, S] the first token's head-0 query scored against every token (Qwen3-VL's released sink test)."""
    extras: dict = field(default_factory=dict)

    @property
    def gate_prob(self) -> torch.Tensor | None:
        return None if self.gate_logit is None else torch.sigmoid(self.gate_logit)

    def image_samples(self) -> list[int]:
        """Sample index of every image (images are numbered in sequence order over the batch)."""
        return images_per_sample_index(self.embedded.visual_mask, self.embedded.grids)

    def heatmaps(self) -> list[torch.Tensor]:
        """RPN logit map [rows, cols] of every image, in the order of ``embedded.grids``."""
        if self.rpn_token_logits is None:
            raise ValueError("run rpn_token_logits(...) (or prefill with branches including 'rpn') first")
        return heatmaps_from_token_logits(self.rpn_token_logits, self.embedded.visual_mask, self.embedded.grids)

    def sink_maps(self) -> list[torch.Tensor] | None:
        """First-token sink logits [rows, cols] of every image (None when the router gave none)."""
        if self.rpn_sink_logits is None:
            return None
        return heatmaps_from_token_logits(self.rpn_sink_logits, self.embedded.visual_mask, self.embedded.grids)


def query_token_index(attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
                      seq_len: int | None = None) -> torch.Tensor:
    """Index of the token whose query the branches read: the last prompt token.

    With labels (training), it is the token just before the first supervised one (the newline after
    ``assistant``); otherwise the last non-padding token, for left or right padding alike.
    """
    if labels is not None:
        supervised = labels != IGNORE_INDEX
        if not bool(supervised.any(dim=1).all()):
            bad = (~supervised.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"samples {bad} have no supervised token: cannot locate the query token")
        first = supervised.int().argmax(dim=1)
        return (first - 1).clamp(min=0)
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("query_token_index needs attention_mask, labels or seq_len")
        return torch.full((1,), seq_len - 1, dtype=torch.long)
    flipped = attention_mask.flip(dims=[1]).int()
    return attention_mask.shape[1] - 1 - flipped.argmax(dim=1)


def images_per_sample_index(visual_mask: torch.Tensor, grids: list[tuple[int, int]]) -> list[int]:
    counts = visual_mask.sum(dim=1).tolist()
    owners: list[int] = []
    sample, used = 0, 0
    for rows, cols in grids:
        while sample < len(counts) and used >= counts[sample]:
            sample, used = sample + 1, 0
        if sample >= len(counts):
            raise ValueError("more image grids than visual tokens in the batch")
        owners.append(sample)
        used += rows * cols
    return owners


def heatmaps_from_token_logits(token_logits: torch.Tensor, visual_mask: torch.Tensor,
                               grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Split per-token scores [B, S] into one [rows, cols] map per image."""
    flat = token_logits[visual_mask]
    sizes = [r * c for r, c in grids]
    if sum(sizes) != flat.numel():
        raise ValueError(f"visual tokens ({flat.numel()}) do not match the image grids {grids}")
    return [chunk.view(r, c) for chunk, (r, c) in zip(torch.split(flat, sizes), grids)]


def prefill_to_branch(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      mm_token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, use_cache: bool = True,
                      **_: object) -> BranchPrefill:
    """Embed the prompt and run base layers [0, B); with ``use_cache`` their KV is kept for reuse.

    Runs without autograd: the base model is frozen in every Q-Zoom stage that uses this path.
    """
    adapter, b = get_adapter(model), require_branches(model).first_layer
    with torch.no_grad():
        embedded = adapter.embed(model, input_ids, pixel_values, image_grid_thw)
        if position_ids is None:
            position_ids = adapter.position_ids(model, input_ids, attention_mask, mm_token_type_ids,
                                                image_grid_thw)
        hidden = embedded.inputs_embeds
        cache = None
        if use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=adapter.text_config(model))
        mask = adapter.causal_mask(model, hidden, attention_mask, cache)
        rope = adapter.rotary(model, hidden, position_ids)
        layers = adapter.decoder_layers(model)
        hidden = adapter.run_layers(model, layers[:b], 0, hidden, rope, mask, cache, embedded)
    query = query_token_index(attention_mask, labels, seq_len=input_ids.shape[1]).to(input_ids.device)
    if query.numel() == 1 and input_ids.shape[0] > 1:
        query = query.expand(input_ids.shape[0])
    return BranchPrefill(hidden=hidden, input_ids=input_ids, embedded=embedded, position_ids=position_ids,
                         attention_mask=attention_mask, query_index=query, branch_layer=b, adapter=adapter,
                         cache=cache, extras={"rope": rope})


def _branch_input(state: BranchPrefill) -> torch.Tensor:
    hidden = state.hidden
    if torch.is_grad_enabled():
        # A leaf that requires grad: keeps (reentrant) gradient checkpointing in the branch layers from
        # silently dropping their parameter gradients when the frozen trunk produced no graph.
        hidden = hidden.detach().requires_grad_(True)
    return hidden


def _run_branch_layers(model: nn.Module, layers: nn.ModuleList, state: BranchPrefill,
                       query_rows_only: bool = False) -> torch.Tensor:
    """The branch layers over the sequence ([B, S, d]); with ``query_rows_only``, the last layer runs for the
    query token of each sample only ([B, 1, d], equal to those rows of the full layer)."""
    adapter = state.adapter
    hidden = _branch_input(state)
    full = layers[:-1] if query_rows_only and len(layers) > 0 else layers
    if len(full) > 0:
        mask = adapter.causal_mask(model, hidden, state.attention_mask, None)  # never the base cache
        hidden = adapter.run_layers(model, full, state.branch_layer, hidden, state.extras["rope"], mask, None,
                                    state.embedded)
    if not query_rows_only:
        return hidden
    if len(layers) == 0:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), state.query_index][:, None]
    return adapter.last_token_layer(model, layers[-1], state.branch_layer + len(layers) - 1, hidden,
                                    state.extras["rope"], state.query_index, state.attention_mask, state.embedded)


def gate_logits(model: nn.Module, state: BranchPrefill, full_last_layer: bool = False) -> torch.Tensor:
    """[B] gate logits: the gate's layers over the sequence, Linear on the query token.

    The last gate layer runs for the query token only (keys and values of every token; the same result as
    the full layer's row). ``full_last_layer`` runs it over the whole sequence instead (the reference the
    tests and benchmarks compare with).
    """
    gate = require_branches(model).gate
    if full_last_layer:
        hidden = _run_branch_layers(model, gate.layers, state)
        query = hidden[torch.arange(hidden.shape[0], device=hidden.device), state.query_index]
    else:
        query = _run_branch_layers(model, gate.layers, state, query_rows_only=True)[:, 0]
    state.gate_logit = gate.head(query).squeeze(-1)
    return state.gate_logit


def rpn_token_logits(model: nn.Module, state: BranchPrefill) -> torch.Tensor:
    """[B, S] RPN scores of every token against the query: mean over heads of q.k / sqrt(d), rotated."""
    rpn = require_branches(model).rpn
    hidden = _run_branch_layers(model, rpn.layers, state)
    cos, sin = state.extras["rope"]
    q, k = rpn.head.query_key(hidden, cos, sin, state.adapter)
    rows = torch.arange(q.shape[0], device=q.device)
    q_last = q[rows, :, state.query_index]  # [B, H, d]
    scores = torch.einsum("bhd,bhsd->bhs", q_last, k) * rpn.head.scaling
    state.rpn_token_logits = scores.mean(dim=1)
    with torch.no_grad():  # inference reads it to mask sinks; training never back-propagates through it
        state.rpn_sink_logits = first_token_sink_logits(q, k, state.attention_mask, rpn.head.scaling)
    return state.rpn_token_logits


def first_token_index(attention_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """[B] index of each sample's first real token (left or right padding); 0 without a mask."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (attention_mask > 0).int().argmax(dim=1)


def first_token_sink_logits(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float) -> torch.Tensor:
    """[B, S] the released Qwen3-VL sink score: the first token's head-0 query against every head's keys.

    ``q`` [B, H, S, d] and ``k`` [B, H, S, d] are the RPN head's rotated queries and (expanded) keys; the
    score is q_first[head 0] . k[h] * scale, averaged over heads h (reference §5.5). Computed for every
    family (one query row); only a family whose rule uses it reads it.
    """
    rows = torch.arange(q.shape[0], device=q.device)
    first = first_token_index(attention_mask, q.shape[0], q.device)
    q0 = q[rows, 0, first]  # [B, d]
    return (torch.einsum("bd,bhsd->bhs", q0, k) * scaling).mean(dim=1).float()


def prefill(model: nn.Module, branches: tuple[str, ...] = ("gate", "rpn"), **inputs) -> BranchPrefill:
    """Layers [0, B) once (cached), then the requested branches on the layer-B state."""
    state = prefill_to_branch(model, **inputs)
    if "gate" in branches:
        gate_logits(model, state)
    if "rpn" in branches:
        rpn_token_logits(model, state)
    return state


def continue_prefill(model: nn.Module, state: BranchPrefill, last_only: bool = False) -> torch.Tensor:
    """Layers [B, L) on the same prompt (the direct answer's path); returns logits [B, S, vocab].

    Fills the cache of layers [B, L), so ``state.cache`` then holds the whole prompt for decoding.
    ``last_only`` computes the LM head for the last position only ([B, 1, vocab]), as decoding needs.
    """
    adapter = state.adapter
    with torch.no_grad():
        layers = adapter.decoder_layers(model)
        b = state.branch_layer
        mask = adapter.causal_mask(model, state.hidden, state.attention_mask, state.cache,
                                   mask_layer_idx=b if state.cache is not None else None)
        hidden = adapter.run_layers(model, layers[b:], b, state.hidden, state.extras["rope"], mask, state.cache,
                                    state.embedded)
        if last_only:
            hidden = hidden[:, -1:]
        return adapter.final_logits(model, hidden)
