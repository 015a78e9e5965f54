"""Stage-1 tri-state labels on hand-made maps, the two sink filters, and label/grid alignment (non-square)."""

from __future__ import annotations

import math

import pytest
import torch

from qzoom_swift.config import LabelThresholds, QZoomConfig
from qzoom_swift.labels.tristate import (
    BG,
    FG,
    IGNORE,
    STATUS_BIG_BOX,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_WEAK_PEAK,
    blur_map,
    combine_sink_masks,
    label_kwargs,
    sink_mask_from_heads,
    sink_mask_from_norms,
    tristate_labels,
)
from qzoom_swift.roi import GridBox
from qzoom_swift.training import resample_label_map, rpn_token_labels

F, B, X = FG, BG, IGNORE


def _map(h, w, cells: dict, fill: float = 0.0) -> torch.Tensor:
    m = torch.full((h, w), fill)
    for (r, c), v in cells.items():
        m[r, c] = v
    return m


def test_fg_ignore_box_and_bg_on_a_hand_made_map():
    # 6 x 8 grid: a 1x2 foreground blob, one mid-range cell outside the box, the rest weak.
    attn = _map(6, 8, {(2, 3): 1.0, (2, 4): 0.5, (5, 0): 0.1, (0, 7): 0.04}, fill=0.01)
    res = tristate_labels(attn, tau_fg=0.2, tau_bg=0.05)
    assert res.status == STATUS_OK and res.peak == pytest.approx(1.0)
    # box = foreground bbox (rows 2, cols 3-4) grown by one cell by the k=3 blur
    assert res.box == GridBox(2, 1, 6, 4)
    expected = torch.tensor([
        [B, B, B, B, B, B, B, B],
        [B, B, X, X, X, X, B, B],
        [B, B, X, F, F, X, B, B],
        [B, B, X, X, X, X, B, B],
        [B, B, B, B, B, B, B, B],
        [X, B, B, B, B, B, B, B],  # 0.1 >= tau_bg * peak: neither fg nor bg -> ignored
    ])
    assert torch.equal(res.labels, expected)
    assert (res.num_fg, res.num_bg) == (2, 35)
    assert res.as_list() == expected.tolist()


def test_thresholds_are_relative_to_the_peak_and_strict_for_fg():
    attn = _map(5, 5, {(2, 2): 10.0, (0, 0): 2.0, (4, 4): 2.0001}, fill=0.0)
    res = tristate_labels(attn, tau_fg=0.2, tau_bg=0.05, max_box_fraction=1.0)
    # 2.0 is exactly tau_fg * peak: not foreground (strict >); 2.0001 is
    assert res.labels[2, 2] == F and res.labels[4, 4] == F and res.labels[0, 0] != F
    # box spans (2,2)..(4,4) grown by one -> rows/cols 1..4; (0,0) outside and 2.0 >= 0.5 -> ignored
    assert res.box == GridBox(1, 1, 5, 5)
    assert res.labels[0, 0] == X and res.labels[0, 1] == B


def test_box_is_clipped_at_the_grid_border():
    res = tristate_labels(_map(4, 6, {(0, 0): 1.0}), max_box_fraction=1.0)
    assert res.box == GridBox(0, 0, 2, 2)
    assert res.labels[0, 0] == F and res.labels[0, 1] == X and res.labels[1, 1] == X and res.labels[2, 2] == B


def test_box_follows_the_blur_kernel():
    attn = _map(9, 9, {(4, 4): 1.0})
    assert tristate_labels(attn, blur_kernel=1).box == GridBox(4, 4, 5, 5)
    assert tristate_labels(attn, blur_kernel=3).box == GridBox(3, 3, 6, 6)
    assert tristate_labels(attn, blur_kernel=5, blur_sigma=1.5).box == GridBox(2, 2, 7, 7)


def test_sample_ignored_when_box_covers_half_the_grid():
    # 4 x 4 grid; foreground row 1, cols 0..3 -> box rows 0..2 x all cols = 12 cells >= 8
    big = _map(4, 4, {(1, c): 1.0 for c in range(4)})
    res = tristate_labels(big)
    assert res.status == STATUS_BIG_BOX and res.ignored and res.as_list() is None
    assert bool((res.labels == X).all())
    # exactly at the fraction: 8 cells of 16 with max_box_fraction 0.5 is ignored, 0.51 keeps it
    half = _map(4, 4, {(0, 0): 1.0, (0, 2): 1.0})  # box rows 0..1, cols 0..3 = 8 cells
    assert tristate_labels(half, blur_kernel=3).box.area == 8
    assert tristate_labels(half).status == STATUS_BIG_BOX
    assert tristate_labels(half, max_box_fraction=0.51).status == STATUS_OK


def test_sample_ignored_when_the_peak_is_weak():
    attn = _map(6, 6, {(3, 3): 4e-3}, fill=1e-4)
    res = tristate_labels(attn, min_peak=5e-3)
    assert res.status == STATUS_WEAK_PEAK and bool((res.labels == X).all())
    assert tristate_labels(attn, min_peak=1e-3).status == STATUS_OK


@pytest.mark.parametrize("attn", [torch.zeros(3, 4), torch.full((3, 4), float("nan"))])
def test_empty_or_broken_map_is_ignored(attn):
    res = tristate_labels(attn)
    assert res.status == STATUS_EMPTY and res.box is None and bool((res.labels == X).all())


def test_sinks_are_zeroed_before_the_peak_and_become_background_outside_the_box():
    attn = _map(6, 6, {(0, 5): 50.0, (4, 1): 1.0, (3, 1): 0.9}, fill=0.01)
    sinks = torch.zeros(6, 6, dtype=torch.bool)
    sinks[0, 5] = True
    without = tristate_labels(attn)
    assert without.labels[0, 5] == F and without.labels[4, 1] == B  # the sink dominates
    res = tristate_labels(attn, sinks)
    assert res.peak == pytest.approx(1.0)
    assert res.labels[4, 1] == F and res.labels[3, 1] == F
    assert res.labels[0, 5] == B  # zeroed sink outside the box: background, as released
    # a sink inside the box is ignored, not foreground
    sinks[4, 1] = True
    inner = tristate_labels(attn, sinks)
    assert inner.labels[4, 1] == X and inner.labels[3, 1] == F


def test_non_square_grid_keeps_rows_and_columns_apart():
    attn = _map(3, 10, {(0, 8): 1.0, (0, 9): 0.8})
    res = tristate_labels(attn)
    assert res.labels.shape == (3, 10)
    assert res.box == GridBox(7, 0, 10, 2)
    assert res.labels[0, 8] == F and res.labels[0, 9] == F and res.labels[1, 7] == X
    assert res.labels[2, 8] == B and res.labels[0, 6] == B
    tall = tristate_labels(attn.T.contiguous())
    assert torch.equal(tall.labels, res.labels.T)


def test_label_kwargs_come_from_the_config():
    cfg = QZoomConfig(labelling=LabelThresholds(tau_fg=0.25, tau_bg=0.1, max_box_fraction=0.4, min_peak=1e-3),
                      blur_kernel=5, blur_sigma=2.0)
    assert label_kwargs(cfg) == dict(tau_fg=0.25, tau_bg=0.1, max_box_fraction=0.4, min_peak=1e-3, blur_kernel=5,
                                     blur_sigma=2.0)
    attn = _map(10, 10, {(5, 5): 1.0, (5, 6): 0.24})
    assert tristate_labels(attn, **label_kwargs(cfg)).labels[5, 6] != F  # 0.24 < 0.25
    assert tristate_labels(attn).labels[5, 6] != F  # default tau_fg 0.25 (the released scripts')
    assert tristate_labels(attn, tau_fg=0.2).labels[5, 6] == F  # the paper's ablation value


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tau_bg <= tau_fg"):
        tristate_labels(torch.ones(2, 2), tau_fg=0.1, tau_bg=0.2)
    with pytest.raises(ValueError, match="sink mask shape"):
        tristate_labels(torch.ones(2, 2), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        tristate_labels(torch.ones(4))


def test_blur_map_on_a_one_row_grid_blurs_only_along_the_row():
    out = blur_map(_map(1, 5, {(0, 2): 1.0}))
    side = math.exp(-0.5) / (1 + 2 * math.exp(-0.5))  # 1-D Gaussian weights, sigma 1, kernel 3
    expected = torch.tensor([[0.0, side, 1 - 2 * side, side, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(blur_map(torch.ones(1, 1)), torch.ones(1, 1))


# ---- sink filters ----


def test_sink_head_test_is_inclusive_and_none_means_no_sinks():
    sink_attn = torch.tensor([[0.0, 0.0099], [0.01, 0.5]])
    assert sink_mask_from_heads(sink_attn).tolist() == [[False, False], [True, True]]
    assert sink_mask_from_heads(sink_attn, threshold=1e-3).tolist() == [[False, True], [True, True]]
    assert not bool(sink_mask_from_heads(None, shape=(2, 3)).any())
    with pytest.raises(ValueError, match="grid shape"):
        sink_mask_from_heads(None)


def test_norm_test_is_relative_to_the_median_and_scale_free():
    norms = torch.tensor([[1.0, 1.1, 0.9], [1.0, 30.0, 5.01]])  # median (lower) = 1.0
    mask = sink_mask_from_norms(norms, tau_norm=5.0)
    assert mask.tolist() == [[False, False, False], [False, True, True]]
    assert torch.equal(sink_mask_from_norms(norms * 1000.0, tau_norm=5.0), mask)
    assert sink_mask_from_norms(norms, tau_norm=50.0).sum() == 0
    # at most half the tokens can exceed tau_norm >= 1 times the median
    assert int(sink_mask_from_norms(torch.arange(1.0, 11.0).view(2, 5), 1.0).sum()) <= 5


def test_combined_sink_masks():
    shape = (2, 3)
    heads = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    norms = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 9.0]])
    assert combine_sink_masks("heads", shape, sink_attn=heads).tolist() == [[True, False, False], [False] * 3]
    assert combine_sink_masks("norm", shape, norms=norms).tolist() == [[False] * 3, [False, False, True]]
    both = combine_sink_masks("both", shape, sink_attn=heads, norms=norms)
    assert both.tolist() == [[True, False, False], [False, False, True]]
    assert not bool(combine_sink_masks("none", shape).any())
    assert not bool(combine_sink_masks("heads", shape, sink_attn=None).any())  # a model without sink heads
    with pytest.raises(ValueError, match="needs the visual hidden-state norms"):
        combine_sink_masks("norm", shape)
    with pytest.raises(ValueError, match="choose from"):
        combine_sink_masks("l2", shape)


# ---- label / grid alignment (non-square images) ----


def _pattern(h, w) -> torch.Tensor:
    """A tri-state map whose every cell tells its (row, col) apart: 1 / 0 / -100 in a non-periodic layout."""
    values = torch.tensor([FG, BG, IGNORE])
    return values[(torch.arange(h)[:, None] * 7 + torch.arange(w)[None] * 3 + torch.arange(h)[:, None] // 2) % 3]


def test_resampling_keeps_labels_discrete_and_identity_at_the_same_grid():
    labels = _pattern(10, 14)
    assert resample_label_map(labels, (10, 14)) is labels
    out = resample_label_map(labels, (7, 23))
    assert out.dtype == torch.long and set(out.unique().tolist()) <= {FG, BG, IGNORE}


@pytest.mark.parametrize("src,dst", [((10, 14), (20, 28)), ((9, 12), (7, 23)), ((3, 5), (3, 11))])
def test_nearest_resampling_maps_each_cell_centre_to_the_source_cell_covering_it(src, dst):
    """Cell (i, j) of the training grid takes the label of the labelling-grid cell under its centre."""
    labels = _pattern(*src)
    out = resample_label_map(labels, dst)
    for i in range(dst[0]):
        for j in range(dst[1]):
            si = min(int((i + 0.5) * src[0] / dst[0]), src[0] - 1)
            sj = min(int((j + 0.5) * src[1] / dst[1]), src[1] - 1)
            assert out[i, j] == labels[si, sj], (i, j)


@pytest.mark.parametrize("src,dst", [((10, 14), (5, 7)), ((24, 17), (11, 8)), ((16, 16), (4, 4)), ((9, 12), (9, 5))])
def test_downsampling_pools_fg_if_any_bg_if_all_else_ignore(src, dst):
    """A coarser training grid: each cell summarises the labelling-grid cells it overlaps."""
    labels = _pattern(*src)
    out = resample_label_map(labels, dst)
    for i in range(dst[0]):
        for j in range(dst[1]):
            rows = range(i * src[0] // dst[0], -(-(i + 1) * src[0] // dst[0]))
            cols = range(j * src[1] // dst[1], -(-(j + 1) * src[1] // dst[1]))
            block = labels[rows.start:rows.stop, cols.start:cols.stop]
            expected = FG if bool((block == FG).any()) else BG if bool((block == BG).all()) else IGNORE
            assert out[i, j] == expected, (i, j)


def test_a_one_cell_target_at_high_resolution_survives_downsampling_to_the_low_grid():
    """Stage-1 labels from a 16x16 high-budget pass train an RPN that sees the image as 4x4 tokens."""
    labels = torch.full((16, 16), BG)
    labels[8:11, 6:9] = IGNORE  # the ignore ring around the box ...
    labels[9, 7] = FG  # ... whose cell lies in low-res cell (2, 1); the ring reaches into (2, 2)
    out = resample_label_map(labels, (4, 4))
    assert out[2, 1] == FG and int((out == FG).sum()) == 1
    assert out[2, 2] == IGNORE and int((out == IGNORE).sum()) == 1
    assert int((out == BG).sum()) == 14


def test_integer_upsampling_of_a_non_square_map_repeats_each_cell():
    labels = _pattern(10, 14)
    out = resample_label_map(labels, (20, 42))
    assert torch.equal(out, labels.repeat_interleave(2, dim=0).repeat_interleave(3, dim=1))


def test_a_labelled_box_lands_on_the_same_image_region_after_resampling():
    """Labels made at one (non-square) resolution cover the same fraction of the image at another."""
    src = torch.full((10, 14), BG)
    src[2:5, 7:12] = FG  # rows 20-50 %, cols 50-85.7 % of the image
    out = resample_label_map(src, (15, 21))
    rows, cols = torch.nonzero(out == FG, as_tuple=True)
    assert (rows.min().item(), rows.max().item() + 1) == (3, 7)  # 20-46.7 % of 15 rows
    assert (cols.min().item(), cols.max().item() + 1) == (10, 18)  # 47.6-85.7 % of 21 cols
    assert int((out == FG).sum()) == 4 * 8  # a filled rectangle, within one target cell of the source


def test_token_labels_follow_each_images_own_grid_in_a_batch():
    """Two non-square images in one batch: each map is resampled to its grid and scattered in order."""
    grids = [(2, 3), (3, 2)]
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[0, 2:8] = True
    visual[1, 1:7] = True
    first = torch.tensor([[FG, BG, IGNORE], [BG, FG, BG]])
    second_src = torch.tensor([[FG, BG, BG, BG], [BG, BG, BG, FG]])  # made at 2 x 4, trained at 3 x 2
    out = rpn_token_labels(visual, grids, [first, second_src])
    assert out[0, 2:8].tolist() == first.flatten().tolist()
    assert out[1, 1:7].tolist() == resample_label_map(second_src, (3, 2)).flatten().tolist()
    assert out[1, 1:7].tolist() == [BG, BG, BG, FG, BG, FG]  # rows 0,1,1 x cols 1,3 of the source
    assert bool((out[~visual] == IGNORE).all())
    none = rpn_token_labels(visual, grids, [None, second_src])
    assert bool((none[0] == IGNORE).all())
