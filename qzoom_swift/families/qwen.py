"""Qwen2.5-VL and Qwen3-VL: 3-D MRoPE positions from ``get_rope_index``; Qwen3-VL adds q/k norms and DeepStack."""

from __future__ import annotations

import torch
from torch import nn

from qzoom_swift.families.base import Embedded, FamilyAdapter


class _QwenVLAdapter(FamilyAdapter):
    modeling_module: str = ""

    def embed(self, model, input_ids, pixel_values, image_grid_thw=None) -> Embedded:
        inner = self.inner_model(model)
        embeds = inner.get_input_embeddings()(input_ids)
        visual_mask = input_ids == self.image_token_id(model)
        if pixel_values is None:
            return Embedded(embeds, visual_mask, [])
        if image_grid_thw is None:
            raise ValueError("Qwen-VL inputs with pixel_values need image_grid_thw (the processor returns it)")
        out = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        feats = torch.cat(out.pooler_output, dim=0).to(embeds.device, embeds.dtype)
        mask3, _ = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(mask3, feats)
        merge = int(inner.visual.spatial_merge_size)
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()]
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack is not None:
            deepstack = [torch.cat(level, dim=0).to(embeds.device, embeds.dtype) for level in deepstack]
        return Embedded(embeds, visual_mask, grids, deepstack)

    def position_ids(self, model, input_ids, attention_mask, mm_token_type_ids=None, image_grid_thw=None):
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.image_token_id(model)).to(torch.int32)
        pos, _ = self.inner_model(model).get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask)
        return pos

    def apply_rotary(self, q, k, cos, sin):
        import importlib

        return importlib.import_module(self.modeling_module).apply_rotary_pos_emb(q, k, cos, sin)

    def resize_for_budget(self, image, min_tokens, max_tokens):
        from qzoom_swift.roi import resized_hw_for_budget

        height, width = resized_hw_for_budget(image.height, image.width, patch_unit=self.patch_unit,
                                              min_tokens=min_tokens, max_tokens=max_tokens)
        if (width, height) == image.size:
            return image
        return image.resize((width, height), resample=3)  # bicubic, as qwen_vl_utils.fetch_image

    def encode_images(self, processor, images):
        out = processor.image_processor(images=images, return_tensors="pt", do_resize=False)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def encoded_grid(self, model, encoded):
        merge = int(self.inner_model(model).visual.spatial_merge_size)
        _, h, w = encoded["image_grid_thw"][0].tolist()
        return int(h) // merge, int(w) // merge

    def roi_token_ids(self, model, num_visual):
        config = model.config
        return [config.vision_start_token_id] + [self.image_token_id(model)] * num_visual + [config.vision_end_token_id]

    def prefix_end(self, model, input_ids, last_visual):
        end_id = model.config.vision_end_token_id
        if last_visual + 1 >= input_ids.numel() or int(input_ids[last_visual + 1]) != end_id:
            raise ValueError("Qwen-VL prompt without <|vision_end|> after the image tokens")
        return last_visual + 2

    def roi_positions(self, model, positions, visual_index, src_grid, prefix_end, box, roi_grid, num_tail):
        from qzoom_swift.roi import roi_position_ids

        src = positions[:, 0, visual_index]
        vision_end = float(positions[0, 0, prefix_end - 1])
        new = roi_position_ids(src, src_grid, vision_end, box, roi_grid, num_tail)
        return new[:, None, :]

    def prepare_decode(self, model, last_position, num_tokens):
        """``generate`` adds ``rope_deltas`` to the running token count to get MRoPE positions."""
        inner = self.inner_model(model)
        delta = int(round(last_position)) + 1 - num_tokens
        inner.rope_deltas = torch.tensor([[delta]], device=next(model.parameters()).device)


class Qwen2_5VLAdapter(_QwenVLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    patch_unit = 28
    modeling_module = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"

    def causal_mask(self, model, hidden, attention_mask, cache=None, mask_layer_idx=None):
        """Qwen2.5's text model keys masks by layer type (sliding windows are optional per layer)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = self.text_config(model)
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                      past_key_values=cache, position_ids=None, layer_idx=mask_layer_idx)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def layer_kwargs(self, model, layer_index, mask):
        return {"attention_mask": mask[self.text_config(model).layer_types[layer_index]]}


class Qwen3VLAdapter(_QwenVLAdapter):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    patch_unit = 32
    modeling_module = "transformers.models.qwen3_vl.modeling_qwen3_vl"

    def after_layer(self, model, index, hidden, embedded, visual_mask):
        """DeepStack: add level ``index``'s visual features at the visual tokens after layer ``index``."""
        if embedded is None or embedded.deepstack is None or index >= len(embedded.deepstack):
            return hidden
        mask = embedded.visual_mask if visual_mask is None else visual_mask
        text_model: nn.Module = self.text_model(model)
        return text_model._deepstack_process(hidden, mask, embedded.deepstack[index])
