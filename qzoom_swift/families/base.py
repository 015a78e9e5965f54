"""The family adapter: everything Q-Zoom needs to drive a stock transformers VLM layer by layer.

Q-Zoom splits one prefill at branch layer B, runs copied layers on the side and later reuses the cached
prefix. The stock ``forward`` cannot do that, so the adapters expose the model's own pieces (image
features, rotary positions, causal masks, decoder layers) with the exact semantics of the stock forward;
parity with it is what the tests check. Everything that differs between Qwen2.5-VL, Qwen3-VL and
LLaVA-1.5 lives in the subclasses and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

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

        return create_causal_mask(config=self.text_config(model), inputs_embeds=hidden,
                                  attention_mask=attention_mask, past_key_values=cache, position_ids=None,
                                  layer_idx=mask_layer_idx)

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

    def encode_images(self, processor, images: list) -> dict[str, torch.Tensor]:
        """Processor outputs for images alone: ``pixel_values`` (+ ``image_grid_thw`` for Qwen)."""
        raise NotImplementedError

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

