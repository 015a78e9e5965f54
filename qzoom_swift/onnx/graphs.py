"""Export-friendly twins of the gate and the RPN, built from the branches' own submodules.

The copied decoder layers dispatch attention through transformers' attention registry and take masks
from ``masking_utils``; neither is what a portable graph should contain. These wrappers re-implement
one decoder layer with the layer's own modules (norms, q/k/v/o projections, optional q/k norms, MLP)
through the family adapter's ``decoder_layer_rows`` (the code the torch gate's last layer runs too),
computing attention the way transformers' eager attention does (scores in the compute dtype times the
scale, plus an additive mask, softmax in float32). The causal + padding (+ sliding window, where a layer has one) mask is built inside the graph from a 2-D
padding mask, so the graph's inputs are what any serving stack already holds after layer B:

- ``hidden_states`` [B, S, d]: the layer-B hidden state (float32, or float16 for the fp16 graphs);
- ``attention_mask`` [B, S] int64: 1 at real tokens, 0 at padding (left or right);
- ``cos``, ``sin`` [B, S, rope_dim]: the model's rotary embedding of the prompt positions (MRoPE already
  composed for Qwen), same dtype as ``hidden_states``;
- ``query_index`` [B] int64: the query (last prompt) token of each sample.

Only the query row is needed after the last full layer, so the gate's last layer and the RPN's query
are computed for that row alone (keys and values still cover the whole sequence); the results equal the
torch branches up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from qzoom_swift.families import FamilyAdapter
from qzoom_swift.families.base import MASK_VALUE, gather_rows, query_row_mask

INPUT_NAMES = ("hidden_states", "attention_mask", "cos", "sin", "query_index")
GATE_OUTPUTS = ("gate_logit", "gate_prob")
RPN_OUTPUTS = ("token_logits", "sink_logits")
"""``sink_logits``: the first real token's head-0 query against every token (Qwen3-VL's released sink test)."""


class AttentionMasks(nn.Module):
    """Additive float32 masks [B, 1, S, S] (full rows) and [B, 1, 1, S] (the query row) from a padding mask."""

    def forward(self, attention_mask: torch.Tensor, query_index: torch.Tensor, window: int | None = None):
        pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        keys = (attention_mask > 0).unsqueeze(1)  # [B, 1, S]
        allowed = pos.unsqueeze(0) <= pos.unsqueeze(1)  # [S, S]: key <= query
        if window is not None:
            allowed = allowed & (pos.unsqueeze(0) > pos.unsqueeze(1) - window)
        allowed = allowed.unsqueeze(0) & keys  # [B, S, S]
        zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
        low = torch.full((), MASK_VALUE, dtype=torch.float32, device=attention_mask.device)
        row = query_row_mask(attention_mask, query_index, attention_mask.shape[1], window)  # the torch gate's rule
        return torch.where(allowed, zero, low).unsqueeze(1), row


class ExportDecoderLayer(nn.Module):
    """A pre-norm decoder layer (Qwen2.5-VL, Qwen3-VL, Llama) re-expressed with its own submodules."""

    def __init__(self, layer: nn.Module, adapter: FamilyAdapter):
        super().__init__()
        for name, value in vars(adapter.layer_parts(layer)).items():  # the modules are shared, not copied
            setattr(self, name, value)
        self._adapter = adapter

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
        """The layer over all rows ([B, S, d]), or only the query rows ([B, 1, d]) when ``query_index`` is given.

        ``mask`` is the additive float32 mask of the rows computed ([B, 1, S, S] or [B, 1, 1, S]). The math is
        the family adapter's ``decoder_layer_rows``, the same code the torch gate's last layer runs.
        """
        return self._adapter.decoder_layer_rows(self, hidden, cos, sin, mask, query_index)


class _BranchGraph(nn.Module):
    def __init__(self, layers, adapter: FamilyAdapter):
        super().__init__()
        self.layers = nn.ModuleList(ExportDecoderLayer(layer, adapter) for layer in layers)
        self.masks = AttentionMasks()
        self._adapter = adapter

    def _masks(self, attention_mask, query_index):
        windows = sorted({layer.sliding_window for layer in self.layers}, key=lambda w: -1 if w is None else w)
        return {w: self.masks(attention_mask, query_index, w) for w in windows}

    def _run(self, hidden, attention_mask, cos, sin, query_index, last_row_only: bool):
        masks = self._masks(attention_mask, query_index)
        for i, layer in enumerate(self.layers):
            full, row = masks[layer.sliding_window]
            if last_row_only and i == len(self.layers) - 1:
                return layer(hidden, cos, sin, row, query_index)
            hidden = layer(hidden, cos, sin, full)
        return hidden


class GateGraph(_BranchGraph):
    """(hidden_states, attention_mask, cos, sin, query_index) -> (gate_logit [B], gate_prob [B])."""

    def __init__(self, gate: nn.Module, adapter: FamilyAdapter):
        super().__init__(gate.layers, adapter)
        self.head = gate.head

    def forward(self, hidden_states, attention_mask, cos, sin, query_index):
        row = self._run(hidden_states, attention_mask, cos, sin, query_index, last_row_only=True)  # [B, 1, d]
        logit = self.head(row)[:, 0, 0].float()
        return logit, torch.sigmoid(logit)


class RPNGraph(_BranchGraph):
    """(hidden_states, attention_mask, cos, sin, query_index) -> token_logits [B, S] (mean_h q_query . k * scale),
    sink_logits [B, S] (mean_h q_first[head 0] . k_h * scale, the first real token read off the padding mask)."""

    def __init__(self, rpn: nn.Module, adapter: FamilyAdapter):
        super().__init__(rpn.layers, adapter)
        head = rpn.head
        self.input_layernorm, self.q_proj, self.k_proj = head.input_layernorm, head.q_proj, head.k_proj
        self.q_norm, self.k_norm = head.q_norm, head.k_norm
        self.head_dim, self.num_kv_groups, self.scaling = int(head.head_dim), int(head.num_kv_groups), float(
            head.scaling)

    def _query(self, x, cos, sin, index):
        """Rotated queries [B, H, 1, d] of the rows ``index`` [B]."""
        q = self.q_proj(gather_rows(x, index)).unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        return self._adapter.apply_rotary(q, q, gather_rows(cos, index), gather_rows(sin, index))[0]

    def forward(self, hidden_states, attention_mask, cos, sin, query_index):
        hidden = self._run(hidden_states, attention_mask, cos, sin, query_index, last_row_only=False)
        x = self.input_layernorm(hidden)
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = self._adapter.apply_rotary(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[1]  # [B, Hkv, S, d]
        q = self._query(x, cos, sin, query_index)
        # grouped heads: query head h uses key head h // groups, as repeat_interleave in the torch head
        q = q.unflatten(1, (-1, self.num_kv_groups)).squeeze(3)  # [B, Hkv, G, d]
        scores = torch.matmul(q, k.transpose(2, 3))  # [B, Hkv, G, S]
        tokens = (scores.float() * self.scaling).mean(dim=(1, 2))
        first = (attention_mask > 0).float().argmax(dim=1)  # the first real token, left or right padding
        q0 = self._query(x, cos, sin, first)[:, :1]  # head 0: [B, 1, 1, d]
        # the mean over the H expanded key heads equals the mean over the Hkv heads (each repeated G times)
        sink = (torch.matmul(q0, k.transpose(2, 3)).float() * self.scaling).mean(dim=(1, 2))
        return tokens, sink
