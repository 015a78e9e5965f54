"""vLLM model and processor subclasses that place a Q-Zoom crop at the source image's coordinates.

A zoomed request carries two images: the low-resolution image, then the crop, whose vision block follows the
source image's directly (the layout ``zoom.roi_augmented_sequence`` builds). vLLM's stock MRoPE positions already
equal Q-Zoom's there except for the crop tokens' h and w rows, which Q-Zoom interpolates over the box; vLLM keeps
positions as integers, so they are rounded. The box rides as a per-image field (``ROI_FIELD``): the processor takes
it out of ``mm_processor_kwargs`` before anything hashes or calls the HF processor (so the low-resolution image
keeps the hash of a direct request and shares its prefix-cache blocks), adds it to each image's kwargs and puts
it into the crop's hash only. Imported in vLLM's processes only (vLLM is an extra); never imports ms-swift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems

from qzoom_swift.families import get_adapter
from qzoom_swift.roi import GridBox

ROI_FIELD = "qzoom_roi"
"""``mm_processor_kwargs`` key (one entry per image: None, or the crop's grid box (x0, y0, x1, y1) on the
source image's merged-token grid) and the per-image field the model reads it from (-1s: not a crop)."""
NO_BOX = (-1, -1, -1, -1)


def _box_rows(boxes: list | None, num_images: int) -> torch.Tensor:
    rows = [NO_BOX if b is None else tuple(int(v) for v in b) for b in (boxes or [None] * num_images)]
    if len(rows) != num_images:
        raise ValueError(f"{ROI_FIELD}: {len(rows)} entries for {num_images} images (one per image, None if no crop)")
    return torch.tensor(rows, dtype=torch.int64).reshape(num_images, 4)


class _RoiFieldProcessor:
    """Mixin for a Qwen-VL multimodal processor: the ``ROI_FIELD`` box as a per-image field."""

    def _apply_hf_processor(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        boxes = kwargs.pop(ROI_FIELD, None)
        result = super()._apply_hf_processor(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        images = list(result.kwargs.get("image", []))
        if not images:
            if boxes and any(b is not None for b in boxes):
                raise ValueError(f"{ROI_FIELD} given for a request without images")
            return result
        rows = _box_rows(boxes, len(images))
        extra = MultiModalKwargsItems.from_hf_inputs({ROI_FIELD: rows},
                                                     {ROI_FIELD: MultiModalFieldConfig.batched("image",
                                                                                               keep_on_cpu=True)})
        for item, add in zip(images, extra["image"]):
            item[ROI_FIELD] = add[ROI_FIELD]
        hashes = dict(result.hashes)
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        hashes["image"] = [h if tuple(r.tolist()) == NO_BOX else
                           MultiModalHasher.hash_kwargs(algorithm, image=h, qzoom_roi=r.tolist())
                           for h, r in zip(hashes["image"], rows)]
        return result._replace(hashes=hashes)

    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        """Requests with a crop skip the processor cache (whose item split would lose the box); others use it."""
        if inputs.hf_processor_mm_kwargs.get(ROI_FIELD) is not None:
            return self._apply_hf_processor(inputs, timing_ctx)
        return super()._cached_apply_hf_processor(inputs, timing_ctx)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        return super()._get_mm_fields_config(hf_inputs, {k: v for k, v in hf_processor_mm_kwargs.items()
                                                         if k != ROI_FIELD})


class _RoiPositions:
    """Mixin for a Qwen-VL model: the crop's h/w position rows from the family adapter, rounded to integers."""

    qzoom_family: str = ""

    def get_mrope_input_positions(self, input_tokens, mm_features):
        positions, _ = super().get_mrope_input_positions(input_tokens, mm_features)
        images = sorted((f for f in mm_features if f.modality == "image"), key=lambda f: f.mm_position.offset)
        if not any(_box_of(f) is not None for f in images):
            return positions, int(positions.max()) + 1 - len(input_tokens)
        positions = roi_positions_for_request(self, get_adapter(self.qzoom_family), input_tokens, images, positions)
        return positions, int(positions.max()) + 1 - len(input_tokens)


def _box_of(feature) -> GridBox | None:
    data = feature.data
    if data is None or ROI_FIELD not in data:
        return None
    x0, y0, x1, y1 = (int(v) for v in data[ROI_FIELD].data.tolist())
    return None if x0 < 0 else GridBox(x0, y0, x1, y1)


def _grid(feature, merge: int) -> tuple[int, int]:
    _, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
    return h // merge, w // merge


def roi_positions_for_request(model, adapter, input_tokens: list[int], images: list, positions: torch.Tensor
                              ) -> torch.Tensor:
    """``positions`` ([3, L], vLLM's stock ones) with the crop's rows replaced by Q-Zoom's, rounded.

    The crop must be the last image and follow its source image (the image before it) directly.
    """
    merge = int(model.config.vision_config.spatial_merge_size)
    image_token = int(model.config.image_token_id)
    ids = torch.tensor(input_tokens)
    out = positions.clone()
    for k, feature in enumerate(images):
        box = _box_of(feature)
        if box is None:
            continue
        if k == 0 or k != len(images) - 1:
            raise ValueError(f"{ROI_FIELD}: the crop must be the last image of the request, after its source image")
        src = images[k - 1]
        lo = src.mm_position.offset
        span = torch.arange(lo, lo + src.mm_position.length)
        visual_index = span[ids[span] == image_token]
        src_grid, roi_grid = _grid(src, merge), _grid(feature, merge)
        prefix_end = adapter.prefix_end(model, ids, int(visual_index[-1]))
        num_tail = len(input_tokens) - prefix_end - (roi_grid[0] * roi_grid[1] + 2)
        new = adapter.roi_positions(model, positions[:, None, :].float(), visual_index, src_grid, prefix_end, box,
                                    roi_grid, num_tail)
        out[:, prefix_end:] = new[:, 0].round().to(out.dtype)
    return out


class QZoomQwen2_5_VLProcessor(_RoiFieldProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


class QZoomQwen3VLProcessor(_RoiFieldProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(QZoomQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class QZoomQwen2_5_VLForConditionalGeneration(_RoiPositions, Qwen2_5_VLForConditionalGeneration):
    qzoom_family = "qwen2_5_vl"


@MULTIMODAL_REGISTRY.register_processor(QZoomQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class QZoomQwen3VLForConditionalGeneration(_RoiPositions, Qwen3VLForConditionalGeneration):
    qzoom_family = "qwen3_vl"
