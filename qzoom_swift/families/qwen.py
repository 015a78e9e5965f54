"""Qwen2.5-VL and Qwen3-VL: 3-D MRoPE positions from ``get_rope_index``; Qwen3-VL adds q/k norms and DeepStack.

The module-level functions are the Qwen rules as pure functions (token-budget resize, continuous RoI
positions), tested on hand-made numbers without a model.
"""

from __future__ import annotations

import torch
from qwen_vl_utils import smart_resize
from qwen_vl_utils.vision_process import MAX_RATIO as _QWEN_MAX_RATIO
from torch import Tensor, nn

from qzoom_swift.families import compat
from qzoom_swift.families.base import Embedded, FamilyAdapter, unnormalise
from qzoom_swift.roi import GridBox

MAX_RATIO: float = float(_QWEN_MAX_RATIO)
"""Qwen's resize rule refuses images whose long/short side ratio exceeds this (200)."""


def resized_hw_for_budget(
    height: int, width: int, *, patch_unit: int, min_tokens: int, max_tokens: int, what: str = "crop"
) -> tuple[int, int]:
    """``(height, width)`` in pixels that Qwen's resize rule gives an image under a visual-token budget.

    ``patch_unit`` is patch_size * merge_size (28 for Qwen2.5-VL, 32 for Qwen3-VL); one merged token
    covers ``patch_unit**2`` pixels. Sides become multiples of ``patch_unit``, the aspect ratio is kept
    as well as possible, large crops shrink to at most ``max_tokens`` and small ones are UP-sampled to
    at least ``min_tokens``: that up-sampling is the zoom.

    Uses ``qwen_vl_utils.smart_resize``, with each side floored at ``patch_unit`` like transformers'
    own rule (qwen_vl_utils can return a side of 0 for thin crops on a small budget). Aspect ratios
    above 200 raise a ValueError naming the crop size; :func:`grid_box_to_pixel_box` prevents them.
    ``what`` names the image in errors (``crop``, or ``image`` for an input image).
    """
    if height < 1 or width < 1:
        raise ValueError(f"{what} of {width}x{height} (w x h) px is empty")
    if patch_unit < 1:
        raise ValueError(f"patch_unit={patch_unit}: expected >= 1")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"token budget min={min_tokens}, max={max_tokens}: need 1 <= min <= max")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(
            f"{what} of {width}x{height} (w x h) px has aspect ratio {ratio:.1f} > {MAX_RATIO:g}, "
            "which Qwen's resize rule cannot encode; "
            + ("grow its short side first (grid_box_to_pixel_box does)" if what == "crop"
               else "pad it to a less extreme shape first")
        )
    unit_pixels = patch_unit * patch_unit
    new_h, new_w = smart_resize(
        height,
        width,
        factor=patch_unit,
        min_pixels=min_tokens * unit_pixels,
        max_pixels=max_tokens * unit_pixels,
    )
    return max(patch_unit, new_h), max(patch_unit, new_w)


def tokens_for_hw(height: int, width: int, patch_unit: int) -> int:
    """Merged visual tokens of a resized image: one per ``patch_unit x patch_unit`` pixel square."""
    if height < 1 or width < 1 or height % patch_unit or width % patch_unit:
        raise ValueError(f"{height}x{width} (h x w) px is not a positive multiple of patch_unit={patch_unit}")
    return (height // patch_unit) * (width // patch_unit)


def roi_position_ids(
    src_visual_positions: Tensor,
    src_grid_hw: tuple[int, int],
    src_vision_end_pos: float,
    box: GridBox,
    roi_grid_hw: tuple[int, int],
    num_tail: int,
) -> Tensor:
    """Continuous spatio-temporal MRoPE positions (t, h, w) of the tokens spliced after the source image.

    The RoI tokens reuse the source image's coordinate frame, so the model sees them as a finer sampling
    of the same place rather than as an unrelated second image (reference §3.3). The spliced tokens are:
    RoI ``<|vision_start|>``, the ``h' * w'`` RoI visual tokens (row-major), RoI ``<|vision_end|>``, then
    ``num_tail`` text tokens (the prompt after the source ``<|vision_end|>``, which stays in the cached
    prefix and keeps its position).

    - RoI ``<vs>``: ``src_vision_end_pos + 1`` on all axes.
    - RoI visual t: ``st + max(h_s, w_s) + 2`` with ``st`` the source t position (the code's value; the
      paper's "min" is not what was released).
    - RoI visual h of row i: ``linspace(h_pos[y0], h_pos[y1 - 1], h')[i]``, w of column j:
      ``linspace(w_pos[x0], w_pos[x1 - 1], w')[j]``, where ``h_pos``/``w_pos`` are the source positions of
      the grid rows/columns: end points are the first and last COVERED cells, values stay fractional.
    - RoI ``<ve>``: ``src_vision_end_pos + max(h', w') + 2``; tail token k: that + 1 + k, on all axes.

    ``src_visual_positions`` is the ``[3, h_s * w_s]`` (t, h, w) positions the source visual tokens had
    in the first pass, row-major. Returns float32 ``[3, 1 + h' * w' + 1 + num_tail]`` on its device.
    """
    src_h, src_w = src_grid_hw
    roi_h, roi_w = roi_grid_hw
    if min(src_h, src_w, roi_h, roi_w) < 1:
        raise ValueError(f"grids must be positive: src_grid_hw={src_grid_hw}, roi_grid_hw={roi_grid_hw}")
    if tuple(src_visual_positions.shape) != (3, src_h * src_w):
        raise ValueError(
            f"src_visual_positions shape {tuple(src_visual_positions.shape)} != (3, {src_h * src_w}) "
            f"for src_grid_hw={src_grid_hw}"
        )
    if not box.fits_grid(src_grid_hw):
        raise ValueError(f"{box} does not fit the source grid (h, w)={src_grid_hw}")
    if num_tail < 0:
        raise ValueError(f"num_tail={num_tail}: expected >= 0")

    src = src_visual_positions.detach().to(torch.float64).cpu()
    start_t = float(src[0, 0])
    row_h = src[1, ::src_w]  # h position of each source grid row (taken from column 0)
    col_w = src[2, :src_w]  # w position of each source grid column (taken from row 0)
    vision_end = float(src_vision_end_pos)

    roi_t = torch.full((roi_h * roi_w,), start_t + max(src_h, src_w) + 2, dtype=torch.float64)
    rows = torch.linspace(float(row_h[box.y0]), float(row_h[box.y1 - 1]), roi_h, dtype=torch.float64)
    cols = torch.linspace(float(col_w[box.x0]), float(col_w[box.x1 - 1]), roi_w, dtype=torch.float64)
    roi = torch.stack([roi_t, rows.repeat_interleave(roi_w), cols.repeat(roi_h)])

    roi_end = vision_end + max(roi_h, roi_w) + 2
    vision_start = torch.full((3, 1), vision_end + 1, dtype=torch.float64)
    end_and_tail = (roi_end + torch.arange(1 + num_tail, dtype=torch.float64)).expand(3, -1)
    positions = torch.cat([vision_start, roi, end_and_tail], dim=1)
    return positions.to(device=src_visual_positions.device, dtype=torch.float32)


CORNER_SINK_MIN_CELLS = 256
"""Qwen2.5-VL's released corner-sink rule applies to maps with more than this many cells."""
FIRST_TOKEN_SINK_PROB = 0.75
"""Qwen3-VL's released sink cut-off on the sigmoid of the first token's score."""


def corner_sink_keep_mask(height: int, width: int, min_cells: int = CORNER_SINK_MIN_CELLS) -> Tensor:
    """Qwen2.5-VL's released sink mask (reference §5.2 C.2): keep everything but the top-left strips.

    On maps of more than ``min_cells`` cells, the first column over the top ``height // 4`` rows and the first
    row over the left ``width // 4`` columns are attention sinks (False); smaller maps keep every cell.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid {height}x{width} (h x w) is empty")
    keep = torch.ones(height, width, dtype=torch.bool)
    if height * width > min_cells:
        keep[: height // 4, 0] = False
        keep[0, : width // 4] = False
    return keep


def first_token_sink_keep_mask(sink_logits: Tensor, threshold: float = FIRST_TOKEN_SINK_PROB) -> Tensor:
    """Qwen3-VL's released sink mask (reference §5.5): False where sigmoid(first-token score) >= ``threshold``."""
    if sink_logits.ndim != 2:
        raise ValueError(f"expected an [h, w] sink map, got shape {tuple(sink_logits.shape)}")
    return torch.sigmoid(sink_logits.detach().float()) < threshold


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
        deepstack = compat.concat_levels(getattr(out, "deepstack_features", None))
        if deepstack is not None:
            deepstack = [level.to(embeds.device, embeds.dtype) for level in deepstack]
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

    def resize_for_budget(self, image, min_tokens, max_tokens, what="image"):
        height, width = resized_hw_for_budget(image.height, image.width, patch_unit=self.patch_unit,
                                              min_tokens=min_tokens, max_tokens=max_tokens, what=what)
        if (width, height) == image.size:
            return image
        return image.resize((width, height), resample=3)  # bicubic, as qwen_vl_utils.fetch_image

    def decode_pixels(self, pixel_values, image_grid_thw, image_processor):
        """Patch rows back to images: ``pixel_values`` is [sum(t*h*w), C * temporal_patch * patch * patch] (rows of
        all images, in order), ``image_grid_thw`` [n, 3] in patches. The first temporal frame is the image (still
        images are repeated over ``temporal_patch_size``). In float32 the rounded values are the processor's uint8
        input exactly."""
        if image_grid_thw is None:
            raise ValueError("Qwen-VL pixel_values come with image_grid_thw (the patch grid of each image)")
        p, m = int(image_processor.patch_size), int(image_processor.merge_size)
        tps = int(image_processor.temporal_patch_size)
        channels = pixel_values.shape[-1] // (tps * p * p)
        out, offset = [], 0
        for t, gh, gw in image_grid_thw.tolist():
            n = t * gh * gw
            rows = pixel_values[offset:offset + n].float().cpu()
            offset += n
            # processor: [t, tps, C, gh/m, m, p, gw/m, m, p] -> permute(0, 3, 6, 4, 7, 2, 1, 5, 8) -> flatten
            x = rows.reshape(t, gh // m, gw // m, m, m, channels, tps, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
            out.append(unnormalise(x.reshape(t, tps, channels, gh * p, gw * p)[0, 0], image_processor))
        if offset != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw "
                             f"{image_grid_thw.tolist()} accounts for {offset}")
        return out

    def encode_images(self, processor, images):
        out = processor.image_processor(images=images, return_tensors="pt", do_resize=False)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def serving_image_embeds(self, model, features, grids, crop=None):
        """vLLM's Qwen-VL embedding item: the merged features and each image's patch grid ``[1, h, w]``."""
        inner = self.inner_model(model)
        merge = int(inner.visual.spatial_merge_size)
        feats, thw = [features], [[1, r * merge, c * merge] for r, c in grids]
        if crop is not None:
            out = inner.get_image_features(crop["pixel_values"], crop["image_grid_thw"], return_dict=True)
            feats.append(torch.cat(out.pooler_output, dim=0).to(features.dtype))
            thw += crop["image_grid_thw"].tolist()
        return {"image_embeds": torch.cat(feats).cpu(), "image_grid_thw": torch.tensor(thw, dtype=torch.int64)}

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
        src = positions[:, 0, visual_index]
        vision_end = float(positions[0, 0, prefix_end - 1])
        new = roi_position_ids(src, src_grid, vision_end, box, roi_grid, num_tail)
        return new[:, None, :]

    def prepare_decode(self, model, last_position, num_tokens):
        """``generate`` adds ``rope_deltas`` to the running token count to get MRoPE positions."""
        self.prepare_batch_decode(model, [last_position], [num_tokens])

    def prepare_batch_decode(self, model, last_positions, num_tokens):
        """One delta per row: ``generate`` counts each row's real tokens (attention mask) and adds its delta."""
        deltas = [[int(round(p)) + 1 - int(n)] for p, n in zip(last_positions, num_tokens)]
        self.inner_model(model).rope_deltas = torch.tensor(deltas, device=next(model.parameters()).device)


class Qwen2_5VLAdapter(_QwenVLAdapter):
    name = "qwen2_5_vl"
    modeling_module = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"

    def sink_keep_mask(self, heatmap, sink_logits):
        """The released corner rule (reference §5.2 C.2): it needs only the map's shape."""
        return corner_sink_keep_mask(*heatmap.shape).to(heatmap.device)

    def causal_mask(self, model, hidden, attention_mask, cache=None, mask_layer_idx=None):
        """Qwen2.5's text model keys masks by layer type (sliding windows are optional per layer)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = self.text_config(model)
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                      past_key_values=cache, layer_idx=mask_layer_idx)
        masks = {"full_attention": compat.causal_mask(create_causal_mask, **kwargs)}
        if "sliding_attention" in config.layer_types:
            masks["sliding_attention"] = compat.causal_mask(create_sliding_window_causal_mask, **kwargs)
        return masks

    def rotary(self, model, hidden, position_ids):
        """Composed MRoPE tables [B, S, d] on every transformers release (compat: 5.6 returns one per axis)."""
        cos, sin = super().rotary(model, hidden, position_ids)
        return compat.compose_mrope(cos, sin, self.text_config(model).rope_parameters.get("mrope_section"))

    def run_layers(self, model, layers, first_index, hidden, position_embeddings, *args, **kwargs):
        return super().run_layers(model, layers, first_index, hidden, compat.stock_mrope_tables(position_embeddings),
                                  *args, **kwargs)

    def apply_rotary(self, q, k, cos, sin):
        return compat.qwen2_5_vl_apply_rotary(q, k, cos, sin)

    def layer_kwargs(self, model, layer_index, mask):
        return {"attention_mask": mask[self.text_config(model).layer_types[layer_index]]}


class Qwen3VLAdapter(_QwenVLAdapter):
    name = "qwen3_vl"
    modeling_module = "transformers.models.qwen3_vl.modeling_qwen3_vl"
    sink_prob: float = FIRST_TOKEN_SINK_PROB
    needs_sink_logits = True

    def sink_keep_mask(self, heatmap, sink_logits):
        """The released first-token rule (reference §5.5); None when the router gave no first-token map."""
        if sink_logits is None:
            return None
        return first_token_sink_keep_mask(sink_logits, self.sink_prob).to(heatmap.device)

    def after_layer(self, model, index, hidden, embedded, visual_mask):
        """DeepStack: add level ``index``'s visual features at the visual tokens after layer ``index``."""
        if embedded is None or embedded.deepstack is None or index >= len(embedded.deepstack):
            return hidden
        mask = embedded.visual_mask if visual_mask is None else visual_mask
        text_model: nn.Module = self.text_model(model)
        return text_model._deepstack_process(hidden, mask, embedded.deepstack[index])

    def after_layer_rows(self, model, index, rows, embedded, query_index):
        """DeepStack at the query rows alone: a visual query token gets its own feature row of level ``index``."""
        if embedded is None or embedded.deepstack is None or index >= len(embedded.deepstack):
            return rows
        visual = embedded.visual_mask.to(rows.device)
        batch = torch.arange(rows.shape[0], device=rows.device)
        hit = visual[batch, query_index]
        if not bool(hit.any()):
            return rows
        order = visual.flatten().long().cumsum(0).view(visual.shape) - 1  # feature row of every visual token
        feats = embedded.deepstack[index].to(rows.device, rows.dtype)[order[batch, query_index][hit]]
        rows = rows.clone()
        rows[hit, 0] = rows[hit, 0] + feats
        return rows
