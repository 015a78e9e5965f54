"""The family adapter: everything Q-Zoom needs to drive a stock transformers VLM layer by layer.

Q-Zoom splits one prefill at branch layer B, runs copied layers on the side and later reuses the cached
prefix. The stock ``forward`` cannot do that, so the adapters expose the model's own pieces (image
features, rotary positions, causal masks, decoder layers) with the exact semantics of the stock forward;
parity with it is what the tests check. Everything that differs between Qwen2.5-VL, Qwen3-VL and
LLaVA-1.5 lives in the subclasses and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from qzoom_swift.families.registry import FamilySpec, get_spec


@dataclass
class Embedded:
    """Input embeddings of a batch with its visual layout."""

    inputs_embeds: torch.Tensor
    """[B, S, d] token embeddings with the image features scattered in."""
    visual_mask: torch.Tensor
    """[B, S] bool, True at visual (image placeholder) tokens."""
    grids: list[tuple[int, int]]
    """Merged-token grid (rows, cols) of every image, in sequence order over the batch."""
    deepstack: list[torch.Tensor] | None = None
    """Qwen3-VL DeepStack features per level, [num visual tokens in batch, d]; None elsewhere."""


MASK_VALUE = torch.finfo(torch.float32).min
"""Additive mask value (finite, as transformers' eager masks: fully padded rows stay NaN-free)."""


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for x [B, S, d] and index [B] -> [B, 1, d] (a gather: exports to ONNX as one op)."""
    return torch.gather(x, 1, index[:, None, None].expand(-1, -1, x.shape[-1]))


def query_row_mask(attention_mask: torch.Tensor | None, query_index: torch.Tensor, seq_len: int,
                   window: int | None = None) -> torch.Tensor:
    """Additive float32 mask [B, 1, 1, S] of each sample's query row, as the full causal mask's row there.

    Key j is visible to the query token q of its sample iff j <= q, j is not padding (``attention_mask`` [B, S],
    1 at real tokens; None: no padding) and, for a sliding-window layer, j > q - ``window``.
    """
    pos = torch.arange(seq_len, device=query_index.device)
    row = pos.unsqueeze(0) <= query_index.unsqueeze(1)  # [B, S]
    if window is not None:
        row = row & (pos.unsqueeze(0) > query_index.unsqueeze(1) - window)
    if attention_mask is not None:
        row = row & (attention_mask.to(query_index.device) > 0)
    zero = torch.zeros((), dtype=torch.float32, device=query_index.device)
    low = torch.full((), MASK_VALUE, dtype=torch.float32, device=query_index.device)
    return torch.where(row, zero, low)[:, None, None, :]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
                    groups: int, dropout: float = 0.0, one_row: bool = False) -> torch.Tensor:
    """transformers' eager attention: q [B, H, rows, d], k/v [B, H/groups, S, d], additive float32 ``mask``
    [B, 1, rows, S]; returns [B, H, rows, d]. Query head h reads kv head h // groups (repeat_interleave).

    ``one_row`` (rows == 1) groups the query heads per kv head instead of copying keys and values per head.
    """
    if one_row and groups > 1:
        batch, num_heads = q.shape[:2]
        scores = torch.matmul(q.reshape(batch, num_heads // groups, groups, -1), k.transpose(2, 3)) * scaling
        weights = torch.softmax(scores.float() + mask, dim=-1).to(q.dtype)  # [B, Hkv, G, S]; mask [B, 1, 1, S]
        if dropout > 0.0:
            weights = nn.functional.dropout(weights, p=dropout, training=True)
        return torch.matmul(weights, v).reshape(batch, num_heads, 1, -1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    weights = torch.softmax((torch.matmul(q, k.transpose(2, 3)) * scaling).float() + mask, dim=-1).to(q.dtype)
    if dropout > 0.0:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, v)


class FamilyAdapter:
    """Base adapter; subclasses fill in the family-specific parts.

    A subclass names its family; the plain facts (model types, patch unit, fixed resolution) come from
    the registry entry, so they are written once.
    """

    name: str = ""

    @property
    def spec(self) -> FamilySpec:
        return get_spec(self.name)

    @property
    def model_types(self) -> tuple[str, ...]:
        """``config.model_type`` values this adapter accepts."""
        return self.spec.model_types

    @property
    def patch_unit(self) -> int:
        """Pixels per side of one merged visual token (resize rules and pixel boxes use it)."""
        return self.spec.patch_unit

    # ---- module handles ----
    def inner_model(self, model: nn.Module) -> nn.Module:
        return model.model

    def text_model(self, model: nn.Module) -> nn.Module:
        return self.inner_model(model).language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def text_config(self, model: nn.Module):
        return self.text_model(model).config

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    # ---- inputs ----
    def embed(self, model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_grid_thw: torch.Tensor | None = None) -> Embedded:
        raise NotImplementedError

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     mm_token_type_ids: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary positions of a prompt: [3, B, S] (MRoPE) or [B, S] (1-D)."""
        raise NotImplementedError

    # ---- layers ----
    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) from the model's own rotary embedding; float positions are accepted."""
        return self.text_model(model).rotary_emb(hidden, position_ids)

    def causal_mask(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                    cache=None, mask_layer_idx: int | None = None):
        """The mask the stock text model would build for queries ``hidden`` given ``cache``.

        ``mask_layer_idx`` selects the cache layer whose length sizes the key axis: after layers [0, B)
        have appended new tokens, layers [B, L) must be sized from an (empty) layer >= B.
        """
        from transformers.masking_utils import create_causal_mask

        from qzoom_swift.families import compat

        return compat.causal_mask(create_causal_mask, config=self.text_config(model), inputs_embeds=hidden,
                                  attention_mask=attention_mask, past_key_values=cache, layer_idx=mask_layer_idx)

    def layer_kwargs(self, model: nn.Module, layer_index: int, mask) -> dict:
        """Extra keyword arguments of decoder layer ``layer_index`` (the mask, chosen per layer type)."""
        return {"attention_mask": mask}

    def run_layers(self, model: nn.Module, layers, first_index: int, hidden: torch.Tensor,
                   position_embeddings, mask, cache=None, embedded: Embedded | None = None,
                   visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``layers`` (absolute indices ``first_index``...) the way the stock text model does."""
        for offset, layer in enumerate(layers):
            index = first_index + offset
            hidden = layer(hidden, position_embeddings=position_embeddings, past_key_values=cache,
                           **self.layer_kwargs(model, index, mask))
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            hidden = self.after_layer(model, index, hidden, embedded, visual_mask)
        return hidden

    def after_layer(self, model: nn.Module, index: int, hidden: torch.Tensor, embedded: Embedded | None,
                    visual_mask: torch.Tensor | None) -> torch.Tensor:
        """Hook run after decoder layer ``index`` (Qwen3-VL injects DeepStack features here)."""
        return hidden

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(self.text_model(model).norm(hidden))

    # ---- one decoder layer from its parts (the gate's last layer; the ONNX graphs) ----
    def layer_parts(self, layer: nn.Module) -> SimpleNamespace:
        """A pre-norm decoder layer's modules and attention shape, under the names ``decoder_layer_rows`` reads."""
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None)
        return SimpleNamespace(**self.qk_modules(layer), v_proj=attn.v_proj, o_proj=attn.o_proj,
                               post_attention_layernorm=layer.post_attention_layernorm, mlp=layer.mlp,
                               sliding_window=int(window) if window else None, **self.attention_shape(layer))

    def decoder_layer_rows(self, parts, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           mask: torch.Tensor, query_index: torch.Tensor | None = None,
                           dropout: float = 0.0) -> torch.Tensor:
        """One decoder layer over all rows ([B, S, d]), or only the query rows ([B, 1, d]) given ``query_index``.

        ``parts`` has the attributes of ``layer_parts`` (the ONNX graphs' layers have them too). Keys and
        values always cover every token; queries, attention output, o_proj, residual, post-attention norm and
        MLP only the rows computed. Attention is transformers' eager attention: scores times the layer's
        scale plus the additive float32 ``mask`` of those rows ([B, 1, S, S] or [B, 1, 1, S]), softmax in
        float32, query head h reading kv head h // groups. ``cos``/``sin`` [B, S, rope_dim] cover all tokens.
        """
        def heads(x, proj, norm):
            y = proj(x).unflatten(-1, (-1, parts.head_dim))
            return (y if norm is None else norm(y)).transpose(1, 2)

        x = parts.input_layernorm(hidden)
        k = heads(x, parts.k_proj, parts.k_norm)
        k = self.apply_rotary(k[:, :0], k, cos, sin)[1]  # a zero-head "query": only the keys are rotated
        v = heads(x, parts.v_proj, None)
        residual, xq, cos_q, sin_q = hidden, x, cos, sin
        if query_index is not None:
            residual, xq = gather_rows(hidden, query_index), gather_rows(x, query_index)
            cos_q, sin_q = gather_rows(cos, query_index), gather_rows(sin, query_index)
        q = heads(xq, parts.q_proj, parts.q_norm)
        q = self.apply_rotary(q, q[:, :0], cos_q, sin_q)[0]
        out = eager_attention(q, k, v, mask, parts.scaling, parts.num_kv_groups, dropout,
                              one_row=query_index is not None)
        h = residual + parts.o_proj(out.transpose(1, 2).flatten(2))
        return h + parts.mlp(parts.post_attention_layernorm(h))

    def last_token_layer(self, model: nn.Module, layer: nn.Module, index: int, hidden: torch.Tensor,
                         position_embeddings, query_index: torch.Tensor, attention_mask: torch.Tensor | None,
                         embedded: Embedded | None = None) -> torch.Tensor:
        """Decoder layer ``index`` for each sample's query token only: [B, 1, d], equal to the full layer's row.

        The query token attends to what it attends to in the full layer (all non-padding tokens up to and
        including itself, within the window of a sliding-window layer), with keys and values of all tokens.
        """
        cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in position_embeddings)
        parts = self.layer_parts(layer)
        mask = query_row_mask(attention_mask, query_index, hidden.shape[1], parts.sliding_window)
        dropout = float(getattr(layer.self_attn, "attention_dropout", 0.0)) if layer.training else 0.0
        rows = self.decoder_layer_rows(parts, hidden, cos, sin, mask.to(hidden.device), query_index, dropout)
        return self.after_layer_rows(model, index, rows, embedded, query_index)

    def after_layer_rows(self, model: nn.Module, index: int, rows: torch.Tensor, embedded: Embedded | None,
                         query_index: torch.Tensor) -> torch.Tensor:
        """``after_layer`` for the query rows ``rows`` [B, 1, d] alone (Qwen3-VL: DeepStack, if they are visual)."""
        return rows

    # ---- the RPN head's pieces of a decoder layer ----
    def qk_modules(self, layer: nn.Module) -> dict[str, nn.Module | None]:
        """The parts of a decoder layer that the RPN head keeps: input norm, q/k projections (+ q/k norms)."""
        attn = layer.self_attn
        return {"input_layernorm": layer.input_layernorm, "q_proj": attn.q_proj, "k_proj": attn.k_proj,
                "q_norm": getattr(attn, "q_norm", None), "k_norm": getattr(attn, "k_norm", None)}

    def attention_shape(self, layer: nn.Module) -> dict[str, float | int]:
        attn = layer.self_attn
        return {"head_dim": int(attn.head_dim), "num_kv_groups": int(attn.num_key_value_groups),
                "scaling": float(attn.scaling)}

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        raise NotImplementedError

    # ---- how an image is shown: the first pass, the labels' grid ----
    def source_image(self, image, processor=None):
        """The image as this family's first pass encodes it (identity; LLaVA-1.5 pads it to a square).

        Labelling, training and inference all show the model this view, so a label cell is the cell the RPN
        scores at inference. Crops are always taken from the original image (``source_region`` maps them).
        """
        return image

    def source_region(self, image_size: tuple[int, int], processor=None) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the original image's pixels of what the first pass's token grid covers."""
        from qzoom_swift.roi import grid_region

        return grid_region(image_size, processor)

    def square_fill(self, processor=None) -> tuple[int, int, int]:
        """The colour a square-grid (``qzoom_pad_square``) image is padded with: the released labelling's grey."""
        from qzoom_swift.families.registry import RELEASED_PAD_FILL

        return RELEASED_PAD_FILL

    def image_at_grid(self, image, grid_hw: tuple[int, int]):
        """The image resized to exactly ``grid_hw`` merged tokens (identity for fixed-size families).

        With ``budget_template_kwargs(h * w, h * w)`` the processor then keeps that size whatever the
        ``IMAGE_*_TOKEN_NUM`` environment says: stage-1 rows reach the model on their labels' grid.
        """
        if self.spec.fixed_resolution:
            return image
        h, w = (int(v) for v in grid_hw)
        if h < 1 or w < 1:
            raise ValueError(f"label grid {h}x{w}: expected positive rows and columns")
        size = (w * self.patch_unit, h * self.patch_unit)
        return image if image.size == size else image.resize(size, resample=3)  # bicubic, as labelling

    def stage1_image(self, image, processor=None, *, pad_square: bool = False, grid_hw: tuple[int, int] | None = None):
        """The image as stage-1 training shows it: the first-pass view, padded to a square when it was labelled so
        (``qzoom_pad_square``), at its label grid when given.

        The one rule both trainers follow (ms-swift's template, the LLaMA-Factory export), so a label cell is the
        cell the RPN trains on in either.
        """
        from qzoom_swift.roi import pad_to_square

        image = self.source_image(image, processor)
        if pad_square:
            image = pad_to_square(image.convert("RGB"), self.square_fill(processor))
        return image if grid_hw is None else self.image_at_grid(image, grid_hw)

    # ---- the zoom pass: how a re-encoded crop enters the sequence ----
    def resize_for_budget(self, image, min_tokens: int, max_tokens: int, what: str = "image"):
        """The image resized so the processor encodes it within the token budget (identity if fixed-size).

        ``what`` names the image in errors: ``image`` for an input, ``crop`` for a zoomed region.
        """
        return image

    def prepare_crop(self, crop, processor, min_tokens: int, max_tokens: int):
        """The RoI crop as the processor should get it: resized into the RoI token budget (Qwen), or padded
        to a square (LLaVA), so that the encoded pixels cover the whole crop."""
        return self.resize_for_budget(crop, min_tokens, max_tokens, what="crop")

    def budget_template_kwargs(self, min_tokens: int, max_tokens: int) -> dict[str, int]:
        """ms-swift template kwargs that encode images within a token budget (none for fixed-size families).

        The ms-swift templates and the jobs that feed them use this; the processor path (``QZoomModel``)
        resizes the image itself with ``resize_for_budget``. Both give the same token grid.
        """
        if self.spec.fixed_resolution:
            return {}
        unit = self.patch_unit ** 2
        return {"min_pixels": min_tokens * unit, "max_pixels": max_tokens * unit}

    def decode_pixels(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None,
                      image_processor) -> list:
        """The images an image processor turned into ``pixel_values`` (the inverse of ``encode_images``): what a
        host framework that hands over only processed pixels (LLaMA-Factory's HF engine) showed the model.
        Here [n, C, H, W] squares (LLaVA's CLIP processor: its resized, cropped view)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected [images, channels, "
                             "height, width]")
        return [unnormalise(x.float().cpu(), image_processor) for x in pixel_values]

    def encode_images(self, processor, images: list) -> dict[str, torch.Tensor]:
        """Processor outputs for images alone: ``pixel_values`` (+ ``image_grid_thw`` for Qwen)."""
        raise NotImplementedError

    def serving_image_embeds(self, model: nn.Module, features: torch.Tensor, grids: list[tuple[int, int]],
                             crop: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A serving engine's image-embedding input (vLLM's ``image_embeds`` item) for images already encoded
        (``features`` of the merged-token ``grids``, as ``embed`` scatters them) plus an optional ``crop`` still to
        encode (its processor outputs). Families that do not have it raise (``FamilySpec.vllm_image_embeds``)."""
        raise NotImplementedError(f"{self.name}: no image-embedding input for serving engines")

    def encoded_grid(self, model: nn.Module, encoded: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Merged-token grid (rows, cols) of one image encoded by ``encode_images``."""
        raise NotImplementedError

    def roi_token_ids(self, model: nn.Module, num_visual: int) -> list[int]:
        """Token ids inserted after the source image for a crop of ``num_visual`` visual tokens."""
        raise NotImplementedError

    def prefix_end(self, model: nn.Module, input_ids: torch.Tensor, last_visual: int) -> int:
        """End (exclusive) of the reused prefix: everything up to the source image's last token of markup."""
        raise NotImplementedError

    def roi_positions(self, model: nn.Module, positions: torch.Tensor, visual_index: torch.Tensor,
                      src_grid: tuple[int, int], prefix_end: int, box, roi_grid: tuple[int, int],
                      num_tail: int) -> torch.Tensor:
        """Positions of the inserted tokens and the shifted tail, shaped like ``positions`` (batch of 1).

        ``positions`` are one sample's prompt positions ([3, 1, S] or [1, S]), ``visual_index`` the
        sequence indices of the source image's visual tokens.
        """
        raise NotImplementedError

    needs_sink_logits: bool = False
    """Whether ``sink_keep_mask`` reads the first-token sink map (the router must provide it)."""

    def sink_keep_mask(self, heatmap: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor | None:
        """Bool ``[h, w]`` (False = attention sink) to zero before the RoI blur, or None (nothing masked).

        The released inference masks sinks per family (reference §5.2 C.2, §5.5); ``sink_logits`` is the
        image's first-token sink map (``BranchPrefill.sink_maps``), None when the router did not give one.
        No rule by default: the released code has none for LLaVA (its Q-Zoom release covers Qwen only).
        """
        return None

    def prepare_decode(self, model: nn.Module, last_position: float, num_tokens: int) -> None:
        """Make ``generate`` continue positions after ``last_position`` for a sequence of ``num_tokens``."""

    def prepare_batch_decode(self, model: nn.Module, last_positions: list[float], num_tokens: list[int]) -> None:
        """``prepare_decode`` for a left-padded batch: row b's last prompt position and its real token count.

        Nothing by default: ``generate`` counts a row's real tokens from the attention mask, which gives 1-D
        positions that continue every row (LLaVA).
        """


def unnormalise(x: torch.Tensor, image_processor):
    """[C, H, W] normalised floats -> the uint8 RGB image (mean/std and rescale undone, rounded)."""
    from PIL import Image

    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / float(image_processor.rescale_factor)
    array = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")
