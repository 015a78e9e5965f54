"""The zoomed layout rebuilt for Post-SFT training, exactly as zoom inference builds it.

A Post-SFT sample carries the RoI that ``qzoom mine-hard`` stored (or a random one, as RoI noise); the
ms-swift template turns it into the sequence inference would decode from: the crop's tokens inserted
after the source image by ``qzoom_swift.zoom.roi_augmented_sequence``, with the same positions. Only
training needs this module, so inference never imports it.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import nn

from qzoom_swift.config import QZoomConfig
from qzoom_swift.families import get_adapter
from qzoom_swift.roi import GridBox, PixelBox, crop_image
from qzoom_swift.zoom import roi_augmented_sequence


def roi_grid_box(roi: dict, src_grid: tuple[int, int]) -> GridBox:
    """The grid cells of a stored RoI: the exact cells when the grid is unchanged, else those the box covers."""
    if roi.get("grid_box") is not None and tuple(roi.get("grid") or ()) == tuple(src_grid):
        return GridBox(*[int(v) for v in roi["grid_box"]])
    rows, cols = src_grid
    left, top, right, bottom = roi["box"]
    x0, y0 = min(int(math.floor(left * cols)), cols - 1), min(int(math.floor(top * rows)), rows - 1)
    x1, y1 = max(int(math.ceil(right * cols)), x0 + 1), max(int(math.ceil(bottom * rows)), y0 + 1)
    return GridBox(x0, y0, min(x1, cols), min(y1, rows))


def random_roi(rng, min_side: float = 0.1, max_side: float = 0.6) -> dict:
    """A random box (sides U(min_side, max_side) of the image) for Post-SFT's RoI noise."""
    w, h = rng.uniform(min_side, max_side), rng.uniform(min_side, max_side)
    left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return {"box": [left, top, left + w, top + h]}


@torch.no_grad()
def roi_training_sequence(model: nn.Module, processor, family: str, encoded: dict, image: Image.Image, roi: dict,
                          config: QZoomConfig) -> dict:
    """Training tensors of a sample with its stored RoI inserted, exactly as inference inserts it.

    ``encoded`` is the template's encoding of the plain sample (prompt + answer, labels on the answer);
    ``image`` the original image of its (last) source image. Returns input ids, labels (crop tokens -100),
    pixel values / grids for source + crop, and the positions (Qwen: continuous MRoPE; LLaVA: None, the
    model's sequential positions already are the zoomed ones).
    """
    adapter = get_adapter(family)
    ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long)
    grid_thw = encoded.get("image_grid_thw")
    mm = encoded.get("mm_token_type_ids")
    positions = adapter.position_ids(model, ids[None], None, None if mm is None else torch.as_tensor(mm).view(1, -1),
                                     grid_thw)
    src_grid = adapter.encoded_grid(model, {"image_grid_thw": grid_thw[-1:]} if grid_thw is not None else {})
    visual = (ids == adapter.image_token_id(model)).nonzero().flatten()
    visual_index = visual[-src_grid[0] * src_grid[1]:]
    box = roi_grid_box(roi, src_grid)
    pixel_box = PixelBox.from_normalized(tuple(roi["box"]), *image.size)
    crop = adapter.prepare_crop(crop_image(image.convert("RGB"), pixel_box), processor, config.roi_min_tokens,
                                config.roi_max_tokens)
    enc = adapter.encode_images(processor, [crop])
    roi_grid = adapter.encoded_grid(model, enc)
    full_ids, full_pos, prefix_end = roi_augmented_sequence(model, adapter, ids, positions.to(ids.device),
                                                            visual_index, src_grid, box, roi_grid)
    inserted = full_ids.numel() - ids.numel()
    out = {"input_ids": full_ids.tolist(), "image_token_id": adapter.image_token_id(model),
           "labels": list(encoded["labels"][:prefix_end]) + [-100] * inserted + list(encoded["labels"][prefix_end:])}
    if encoded.get("loss_scale") is not None:
        scale = list(encoded["loss_scale"])
        out["loss_scale"] = scale[:prefix_end] + [0.0] * inserted + scale[prefix_end:]
    pixel_values = torch.as_tensor(encoded["pixel_values"])
    out["pixel_values"] = torch.cat([pixel_values, enc["pixel_values"].to(pixel_values.dtype)])
    if grid_thw is not None:
        out["image_grid_thw"] = torch.cat([grid_thw, enc["image_grid_thw"]])
        out["position_ids"] = full_pos[:, 0]
    return out
