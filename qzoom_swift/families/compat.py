"""Every transformers-version difference the families rely on, in one place (transformers 5.6 to 5.19).

The families run the stock model's own pieces (masks, rotary tables, vision features). Between 5.6 and 5.19
three of those changed shape; each difference is detected once here, from the installed code itself (a
signature, a module attribute, a return type) rather than from a version number, and the families call
these functions instead of the transformers internals:

1. ``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask`` take ``layer_idx`` in 5.19.
   In 5.6 they size the key axis from cache layer 0; :func:`causal_mask` then hands them a view of the cache
   that answers for the requested layer (the zoom pass sizes layers [B, L) from an empty layer >= B).
2. Qwen2.5-VL's rotary embedding returns composed MRoPE tables [B, S, d] and its attention applies them with
   ``apply_rotary_pos_emb`` in 5.19. In 5.6 it returns one table per axis [3, B, S, d] and the attention
   composes them with ``apply_multimodal_rotary_pos_emb(..., mrope_section)``. The families always work with
   composed tables (:func:`compose_mrope`); :func:`stock_mrope_tables` turns them back into what a 5.6
   stock decoder layer takes, exactly (three copies of the composed table compose to itself).
3. Qwen3-VL's ``get_image_features().deepstack_features`` is split per image in 5.19; in 5.6 each level is
   one tensor over all images. :func:`concat_levels` gives one tensor per level either way.
4. Checkpoint key renames (legacy names such as Qwen2.5-VL's ``model.layers.*`` or llava-hf's
   ``language_model.lm_head``) reach a remote-code subclass of a stock model (the LLaMA-Factory folder's class)
   by ``model_type`` in 5.6; 5.19 skips them for custom code unless the user registered them (by class name or
   model type). :func:`share_checkpoint_renames` registers the stock renames for the subclass.

The tests run the core files under both ends of the range (``make test``: the main .venv at 5.19 and
.venv-tf56 at 5.6.0, see requirements-tf56.txt).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from functools import cache

import torch

QWEN2_5_VL_MODELING = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"


# ---- 1. masks sized from a given cache layer ----
@cache
def _takes_layer_idx(fn: Callable) -> bool:
    return "layer_idx" in inspect.signature(fn).parameters


class _CacheAtLayer:
    """A cache as transformers' mask builders in 5.6 read it (layer 0 only), answering for ``layer``."""

    def __init__(self, cache, layer: int):
        self._cache, self._layer = cache, layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._cache.get_seq_length(self._layer)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self._layer)

    def __getattr__(self, name: str):  # is_compileable and the like come from the real cache
        if name == "is_sliding":  # hidden: the builder would then pick a layer itself
            raise AttributeError(name)
        return getattr(self._cache, name)


def causal_mask(build: Callable, *, config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                past_key_values=None, layer_idx: int | None = None):
    """``build`` (a ``masking_utils`` mask builder) for queries ``inputs_embeds``, its key axis sized from cache
    layer ``layer_idx`` (None: the builder's own choice, as the stock text model calls it)."""
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=None)
    if layer_idx is None:
        return build(past_key_values=past_key_values, **kwargs)
    if _takes_layer_idx(build):
        return build(past_key_values=past_key_values, layer_idx=layer_idx, **kwargs)
    view = None if past_key_values is None else _CacheAtLayer(past_key_values, layer_idx)
    return build(past_key_values=view, **kwargs)


# ---- 2. Qwen2.5-VL MRoPE tables ----
@cache
def qwen2_5_vl_composes_mrope() -> bool:
    """Whether the installed Qwen2.5-VL rotary embedding returns composed [B, S, d] tables (5.19: yes; 5.6: no)."""
    return hasattr(importlib.import_module(QWEN2_5_VL_MODELING), "apply_rotary_pos_emb")


def compose_mrope(cos: torch.Tensor, sin: torch.Tensor, mrope_section: Sequence[int] | None):
    """Per-axis tables [3, B, S, d] -> composed [B, S, d] (channel chunk i from axis i % 3, as the stock
    ``apply_multimodal_rotary_pos_emb`` does); composed tables pass through."""
    if cos.ndim != 4:
        return cos, sin
    if not mrope_section or 2 * sum(mrope_section) != cos.shape[-1]:
        raise ValueError(f"mrope_section={mrope_section} does not split rotary tables of width {cos.shape[-1]}: "
                         "the text config's rope_parameters need the model's 'mrope_section' (its sum is half the "
                         "head dim)")
    sections = list(mrope_section) * 2

    def compose(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[i % 3] for i, part in enumerate(table.split(sections, dim=-1))], dim=-1)

    return compose(cos), compose(sin)


def stock_mrope_tables(position_embeddings):
    """Composed Qwen2.5-VL tables as the installed stock decoder layer takes them: as they are (5.19), or
    expanded to [3, B, S, d] for ``apply_multimodal_rotary_pos_emb``, which then composes them back exactly."""
    if qwen2_5_vl_composes_mrope():
        return position_embeddings
    return tuple(t if t.ndim == 4 else t.unsqueeze(0).expand(3, *t.shape) for t in position_embeddings)


def qwen2_5_vl_apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [B, H, S, d] and k by composed tables [B, S, d] (the stock function where it exists; llama's,
    the same formula, on 5.6)."""
    module = importlib.import_module(QWEN2_5_VL_MODELING)
    rotate = getattr(module, "apply_rotary_pos_emb", None)
    if rotate is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rotate
    return rotate(q, k, cos, sin)


# ---- 3. Qwen3-VL DeepStack features ----
def concat_levels(deepstack) -> list[torch.Tensor] | None:
    """DeepStack features as one tensor per level over all images (5.19 splits each level per image)."""
    if deepstack is None:
        return None
    return [level if isinstance(level, torch.Tensor) else torch.cat(list(level), dim=0) for level in deepstack]


# ---- 4. checkpoint key renames for remote-code subclasses of stock models ----
def share_checkpoint_renames(class_name: str, stock_class_name: str, model_type: str) -> None:
    """Make the custom (remote-code) class ``class_name`` load and save the stock checkpoint key names.

    transformers 5.19 looks renames up by class name, then ``model_type`` (Qwen2.5-VL's are keyed by its class
    names, llava's by model type), and applies them to custom code only when the user registered them: this
    registers the stock class's renames under ``class_name``, or re-registers the model type's own. 5.6 applies
    them to every class of the model type: nothing to do there.
    """
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "is_custom_code"):
        return
    from transformers import conversion_mapping as cm

    if class_name in cm.USER_REGISTERED_MAPPINGS or model_type in cm.USER_REGISTERED_MAPPINGS:
        return
    by_class = cm.get_checkpoint_conversion_mapping(stock_class_name)
    if by_class is not None:
        cm.register_checkpoint_conversion_mapping(class_name, by_class, overwrite=True)
        return
    by_type = cm.get_checkpoint_conversion_mapping(model_type)
    if by_type is not None:
        cm.register_checkpoint_conversion_mapping(model_type, by_type, overwrite=True)
