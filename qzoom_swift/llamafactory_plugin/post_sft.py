"""Stage 2 (Post-SFT) under ``llamafactory-cli train``: Q-Zoom's zoomed positions, recomputed in ``forward``.

``qzoom lf-dataset`` exports a mined row as two images, the source at its Post-SFT budget and the crop at the
RoI budget, so LLaMA-Factory's own tokenization yields exactly the zoomed sequence inference decodes from
(Qwen: ``<|vision_start|> crop <|vision_end|>`` right after the source image's block; LLaVA: the crop's tokens
right after the source's). Its positions do not: LLaMA-Factory places the crop as a second image on its own
integer grid, where Q-Zoom gives the crop continuous positions spread over the source cells it covers
(``zoom.roi_augmented_sequence``). :func:`zoomed_position_ids` rebuilds them per row from ``qzoom_roi``: strip the
crop's block, take the one-image sequence's stock positions, and insert the crop again as inference does.
LLaVA's positions are sequential, and sequential over the two-image sequence already are the zoomed ones, so it
needs nothing but the inserted tokens: its positions pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from qzoom_swift.families import get_adapter
from qzoom_swift.roi import GridBox
from qzoom_swift.zoom import roi_augmented_sequence

ROI_COLUMNS = 6
"""``qzoom_roi``: [x0, y0, x1, y1] grid box on the source image's merged grid, then [src_rows, src_cols]."""


def _merged_grids(model: nn.Module, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
    merge = int(get_adapter(model).inner_model(model).visual.spatial_merge_size)
    return [(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()]


def _row_sequence(model: nn.Module, ids: torch.Tensor, grids: list[tuple[int, int]], thw: torch.Tensor,
                  roi: list[int], row: int) -> torch.Tensor:
    """Q-Zoom's positions ([3, 1, N]) of one unpadded two-image row (source, crop) with its ``qzoom_roi``."""
    adapter = get_adapter(model)
    if len(grids) != 2:
        raise ValueError(f"row {row}: a qzoom_roi row holds two images (source, then crop), this one {len(grids)}; "
                         "export stage-2 rows with `qzoom lf-dataset`")
    (src_rows, src_cols), roi_grid = grids
    if [src_rows, src_cols] != [int(v) for v in roi[4:6]]:
        raise ValueError(f"row {row}: qzoom_roi was made for a {roi[4]}x{roi[5]} source grid but the source image "
                         f"is encoded at {src_rows}x{src_cols}: the recipe's image_max_pixels / image_min_pixels "
                         "must keep the exported images at their size (see the export's qzoom_lf_dataset.json)")
    visual = (ids == adapter.image_token_id(model)).nonzero().flatten()
    src_index = visual[:src_rows * src_cols]
    prefix_end = adapter.prefix_end(model, ids, int(src_index[-1]))
    inserted = len(adapter.roi_token_ids(model, roi_grid[0] * roi_grid[1]))
    base_ids = torch.cat([ids[:prefix_end], ids[prefix_end + inserted:]])
    base_pos = adapter.position_ids(model, base_ids[None], None, None, thw[:1])
    box = GridBox(*[int(v) for v in roi[:4]])
    full_ids, full_pos, _ = roi_augmented_sequence(model, adapter, base_ids, base_pos.to(ids.device), src_index,
                                                   (src_rows, src_cols), box, roi_grid)
    if not torch.equal(full_ids, ids):
        raise ValueError(f"row {row}: its tokens are not the zoomed layout (the crop's block right after the "
                         "source image's); export stage-2 rows with `qzoom lf-dataset`")
    return full_pos


def zoomed_position_ids(model: nn.Module, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                        qzoom_roi, position_ids: torch.Tensor | None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """``position_ids`` with every ``qzoom_roi`` row's positions replaced by Q-Zoom's continuous RoI positions.

    ``position_ids`` is what LLaMA-Factory's collator computed (Qwen: [3, B, S], or [4, B, S] with the text
    positions first, which stay: the zoomed sequence has the same length); None computes the stock ones first.
    ``qzoom_roi`` is [B, 6]; a row whose box starts with -1 has no RoI and keeps its positions. Rows are located
    through ``attention_mask`` when given (else the whole row, padding included, is the sequence: positions then
    differ by a constant shift at most, which RoPE does not see). Returns float positions (the RoI's are
    fractional). LLaVA (no ``image_grid_thw``): returned unchanged.
    """
    adapter = get_adapter(model)
    if image_grid_thw is None or adapter.spec.fixed_resolution:
        return position_ids
    rois = torch.as_tensor(qzoom_roi).long().view(-1, ROI_COLUMNS) if qzoom_roi is not None else None
    if rois is None or rois.shape[0] != input_ids.shape[0]:
        raise ValueError(f"qzoom_roi {None if rois is None else tuple(rois.shape)}: expected one row of "
                         f"{ROI_COLUMNS} ints per sample of the batch ({input_ids.shape[0]})")
    if position_ids is None:
        position_ids = adapter.position_ids(model, input_ids, attention_mask, None, image_grid_thw)
    out = position_ids.to(torch.float32).clone()
    mrope = out[1:] if out.dim() == 3 and out.shape[0] == 4 else out
    grids = _merged_grids(model, image_grid_thw)
    image_token = adapter.image_token_id(model)
    cursor = 0
    for b in range(input_ids.shape[0]):
        cols = attention_mask[b].nonzero().flatten() if attention_mask is not None else \
            torch.arange(input_ids.shape[1], device=input_ids.device)
        ids = input_ids[b, cols]
        n_visual = int((ids == image_token).sum())
        first, total = cursor, 0
        while total < n_visual and cursor < len(grids):
            total += grids[cursor][0] * grids[cursor][1]
            cursor += 1
        if total != n_visual:
            raise ValueError(f"row {b}: {n_visual} image tokens do not match the images' grids {grids[first:]}")
        if int(rois[b, 0]) < 0:
            continue
        full = _row_sequence(model, ids, grids[first:cursor], image_grid_thw[first:cursor], rois[b].tolist(), b)
        mrope[:, b, cols] = full[:, 0].to(out.device, out.dtype)
    return out


__all__ = ["ROI_COLUMNS", "zoomed_position_ids"]
