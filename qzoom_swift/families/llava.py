"""LLaVA-1.5 (HF port): CLIP features projected into a Llama; plain 1-D rotary positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qzoom_swift.families.base import Embedded, FamilyAdapter


def sequential_position_ids(last_prefix_pos: int, num_new: int) -> Tensor:
    """1-D positions of tokens appended after a prefix (LLaVA: RoI visual tokens, then the tail text).

    LLaVA has no vision start/end tokens and plain 1-D RoPE, so the new tokens simply continue from the
    last cached position. Returns int64 ``[num_new]``.
    """
    if num_new < 0:
        raise ValueError(f"num_new={num_new}: expected >= 0")
    return torch.arange(last_prefix_pos + 1, last_prefix_pos + 1 + num_new, dtype=torch.long)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""LLaVA-1.5's CLIP image mean (``OPENAI_CLIP_MEAN``): the padding colour when no processor is at hand."""


def mean_colour(processor=None) -> tuple[int, int, int]:
    """The processor's mean colour in 0-255, LLaVA-1.5's square-padding fill (``expand2square``)."""
    mean = getattr(getattr(processor, "image_processor", processor), "image_mean", None) or CLIP_MEAN
    return tuple(int(m * 255) for m in mean[:3])


class LlavaAdapter(FamilyAdapter):
    name = "llava"

    def image_token_id(self, model) -> int:
        config = model.config
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    def embed(self, model, input_ids, pixel_values, image_grid_thw=None) -> Embedded:
        inner = self.inner_model(model)
        embeds = inner.get_input_embeddings()(input_ids)
        visual_mask = input_ids == self.image_token_id(model)
        if pixel_values is None:
            return Embedded(embeds, visual_mask, [])
        config = model.config
        out = inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                                       return_dict=True)
        per_image = list(out.pooler_output)
        feats = torch.cat(per_image, dim=0).to(embeds.device, embeds.dtype)
        mask3 = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(mask3, feats)
        grids = []
        for f in per_image:
            side = math.isqrt(f.shape[0])
            if side * side != f.shape[0]:
                raise ValueError(f"LLaVA image with {f.shape[0]} visual tokens is not a square grid")
            grids.append((side, side))
        return Embedded(embeds, visual_mask, grids)

    def position_ids(self, model, input_ids, attention_mask, mm_token_type_ids=None, image_grid_thw=None):
        """Sequential positions that skip left padding, as ``generate`` computes them."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def source_image(self, image, processor=None):
        """LLaVA-1.5 shows every image padded to a square with the mean colour (``image_aspect_ratio: pad``), in
        its own training and evaluation and in the released SD-RPN's labelling, training and inference. llava-hf's
        CLIP processor would instead centre-crop it, cutting the ends of a non-square image off: the padded
        square reaches the processor instead, so its resize and centre crop keep all of it."""
        from qzoom_swift.roi import pad_to_square

        return pad_to_square(image.convert("RGB"), mean_colour(processor))

    def source_region(self, image_size, processor=None):
        """The grid covers the padded square: cells over the padding map outside the image (clipped there)."""
        from qzoom_swift.roi import padded_region

        return padded_region(image_size)

    def square_fill(self, processor=None):
        return mean_colour(processor)

    def resize_for_budget(self, image, min_tokens, max_tokens, what="image"):
        """The budget is fixed (576 tokens at 336 px); the image is padded to its square (``source_image``)."""
        return self.source_image(image)

    def prepare_crop(self, crop, processor, min_tokens, max_tokens):
        """LLaVA-1.5 pads to a square (``image_aspect_ratio: pad``): llava-hf's CLIP processor would otherwise
        centre-crop an elongated RoI and drop both ends. The padded square is encoded whole, so every cell of
        the crop's grid maps into the square (``roi.grid_region`` of it is the whole square)."""
        from qzoom_swift.roi import pad_to_square

        return pad_to_square(crop.convert("RGB"), mean_colour(processor))

    def encode_images(self, processor, images):
        return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]}

    def encoded_grid(self, model, encoded):
        side = math.isqrt(int(model.config.image_seq_length))
        return side, side

    def roi_token_ids(self, model, num_visual):
        return [self.image_token_id(model)] * num_visual

    def prefix_end(self, model, input_ids, last_visual):
        return last_visual + 1

    def roi_positions(self, model, positions, visual_index, src_grid, prefix_end, box, roi_grid, num_tail):
        """LLaVA has 1-D positions: the crop's tokens and the tail simply continue the prefix."""
        num_new = roi_grid[0] * roi_grid[1] + num_tail
        return sequential_position_ids(int(positions[0, prefix_end - 1]), num_new)[None].to(positions.device)

    def apply_rotary(self, q, k, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)
