"""Unit tests of the pure RoI geometry (qzoom_swift.roi) and the families' pure resize/position rules: hand-made
heatmaps, boxes and positions."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from PIL import Image

from qzoom_swift.families.llava import sequential_position_ids
from qzoom_swift.families.qwen import MAX_RATIO, resized_hw_for_budget, roi_position_ids, tokens_for_hw
from qzoom_swift.roi import (
    MAX_ASPECT_RATIO,
    GridBox,
    PixelBox,
    crop_image,
    grid_box_to_pixel_box,
    heatmap_probabilities,
    mask_bounding_box,
    peak_region_box,
    roi_box_from_heatmap,
    select_roi_box,
)

HOT, COLD = 10.0, -10.0  # sigmoid(10) ~ 1, sigmoid(-10) ~ 4.5e-5

# Default blur (kernel 3, sigma 1) of a unit delta: 1-D weights exp(-x^2/2) normalised, 2-D = outer product.
_G1 = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)], dtype=torch.float64)
_G1 = _G1 / _G1.sum()  # [0.2741, 0.4519, 0.2741]
CENTRE, EDGE, DIAG = float(_G1[1] ** 2), float(_G1[0] * _G1[1]), float(_G1[0] ** 2)  # 0.204, 0.124, 0.075


def heatmap(h: int, w: int, hot_cells: list[tuple[int, int]] = (), fill: float = COLD) -> torch.Tensor:
    """Logits [h, w] at ``fill`` with HOT at each (row, col)."""
    logits = torch.full((h, w), fill)
    for r, c in hot_cells:
        logits[r, c] = HOT
    return logits


def qwen_source_positions(start: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(t, h, w) positions Qwen's get_rope_index gives an image starting at ``start``: t=st, h=st+row, w=st+col."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.zeros_like(rows), rows, cols]).float() + start


# --------------------------------------------------------------------------------------------- boxes


def test_grid_box_sizes():
    box = GridBox(2, 3, 7, 5)
    assert (box.width, box.height, box.area) == (5, 2, 10)
    assert box.fits_grid((5, 7)) and not box.fits_grid((4, 7)) and not box.fits_grid((5, 6))


@pytest.mark.parametrize("coords", [(2, 0, 2, 1), (0, 3, 1, 3), (3, 0, 1, 1), (-1, 0, 1, 1)])
def test_grid_box_rejects_empty_or_negative(coords):
    with pytest.raises(ValueError, match="GridBox"):
        GridBox(*coords)


def test_pixel_box_sizes_and_normalized():
    box = PixelBox(166, 125, 500, 250)
    assert (box.width, box.height) == (334, 125)
    assert box.as_tuple() == (166, 125, 500, 250)
    assert box.normalized(1000, 500) == pytest.approx((0.166, 0.25, 0.5, 0.5))


@pytest.mark.parametrize(
    "box, image_wh",
    [
        (PixelBox(3, 7, 10, 9), (10, 9)),
        (PixelBox(0, 0, 1, 1), (3, 7)),
        (PixelBox(1, 2, 2, 5), (3, 7)),
        (PixelBox(333, 101, 834, 375), (1000, 375)),
        (PixelBox(4095, 1, 4096, 2999), (4096, 3000)),
    ],
)
def test_pixel_box_normalized_round_trip(box, image_wh):
    assert PixelBox.from_normalized(box.normalized(*image_wh), *image_wh) == box


def test_pixel_box_from_normalized_covers_and_clamps():
    assert PixelBox.from_normalized((0.1234, 0.25, 0.5678, 0.75), 1000, 100) == PixelBox(123, 25, 568, 75)
    assert PixelBox.from_normalized((-0.1, -0.5, 1.2, 1.0), 640, 480) == PixelBox(0, 0, 640, 480)


@pytest.mark.parametrize("coords", [(5, 0, 5, 1), (0, 0, 1, 0), (-1, 0, 1, 1)])
def test_pixel_box_rejects_empty_or_negative(coords):
    with pytest.raises(ValueError, match="PixelBox"):
        PixelBox(*coords)


def test_mask_bounding_box():
    mask = torch.zeros(5, 7, dtype=torch.bool)
    assert mask_bounding_box(mask) is None
    mask[1, 5] = mask[3, 2] = True
    assert mask_bounding_box(mask) == GridBox(2, 1, 6, 4)
    with pytest.raises(ValueError, match="mask"):
        mask_bounding_box(mask[0])


# ------------------------------------------------------------------------------------------ heatmaps


def test_heatmap_probabilities_of_a_delta_is_the_gaussian_kernel():
    logits = torch.full((5, 5), -math.inf)
    logits[2, 2] = math.inf  # sigmoid gives an exact delta
    probs = heatmap_probabilities(logits)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    expected[1:4, 1:4] = torch.outer(_G1, _G1)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=0)


def test_heatmap_probabilities_reflect_padding_at_a_corner():
    logits = torch.full((4, 4), -math.inf)
    logits[0, 0] = math.inf
    probs = heatmap_probabilities(logits)
    # reflect padding mirrors without repeating the edge: the delta's neighbours outside the grid are 0
    assert probs[0, 0].item() == pytest.approx(CENTRE, abs=1e-6)
    assert probs[0, 1].item() == pytest.approx(EDGE, abs=1e-6)
    assert probs[1, 1].item() == pytest.approx(DIAG, abs=1e-6)
    assert probs[2, 2].item() == 0.0


def test_heatmap_probabilities_one_row_grid_blurs_only_along_the_row():
    logits = torch.full((1, 5), -math.inf)
    logits[0, 2] = math.inf
    probs = heatmap_probabilities(logits)
    expected = torch.tensor([[0.0, _G1[0], _G1[1], _G1[2], 0.0]], dtype=torch.float64)
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=0)


def test_heatmap_probabilities_one_cell_grid_is_the_sigmoid():
    probs = heatmap_probabilities(torch.tensor([[0.5]]))
    assert probs.item() == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_heatmap_probabilities_bfloat16_input_gives_float32():
    probs = heatmap_probabilities(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.full((3, 4), 0.5))


def test_heatmap_probabilities_keep_mask_zeroes_sinks_before_blur():
    logits = torch.full((3, 3), -math.inf)
    logits[1, 1] = math.inf
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[1, 1] = False
    assert heatmap_probabilities(logits, keep_mask=keep).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="keep_mask"):
        heatmap_probabilities(logits, keep_mask=keep[:2])


def test_heatmap_probabilities_passes_nan_through():
    logits = torch.zeros(3, 3)
    logits[1, 1] = math.nan
    assert torch.isnan(heatmap_probabilities(logits)).all()  # a 3x3 blur spreads the NaN to every cell


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"blur_kernel": 2}, "blur_kernel"),
        ({"blur_kernel": 0}, "blur_kernel"),
        ({"blur_sigma": 0.0}, "blur_sigma"),
    ],
)
def test_heatmap_probabilities_rejects_bad_blur(kwargs, match):
    with pytest.raises(ValueError, match=match):
        heatmap_probabilities(torch.zeros(4, 4), **kwargs)


@pytest.mark.parametrize("shape", [(4,), (1, 4, 4), (0, 4)])
def test_heatmap_probabilities_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match="heatmap"):
        heatmap_probabilities(torch.zeros(shape))


# ---------------------------------------------------------------------------------- heatmap -> box


@pytest.mark.parametrize(
    "tau, expected",
    [
        (0.05, GridBox(3, 2, 6, 5)),  # centre, edge and diagonal neighbours survive
        (0.10, GridBox(3, 2, 6, 5)),  # centre + the 4 edge neighbours: a plus whose box is still 3x3
        (0.15, GridBox(4, 3, 5, 4)),  # only the centre (0.204) is above
        (0.25, None),  # the blur lowers the peak to 0.204
    ],
)
def test_single_hot_cell(tau, expected):
    assert roi_box_from_heatmap(heatmap(8, 10, [(3, 4)]), tau) == expected


def test_blur_level_values_bracket_the_thresholds():
    # Guards the thresholds used above against a change of the default blur.
    assert DIAG < 0.1 < EDGE < 0.15 < CENTRE < 0.25
    assert 0.05 < DIAG


def test_two_distant_blobs_give_one_box_covering_both():
    logits = heatmap(8, 10, [(2, 2), (5, 7)])
    assert roi_box_from_heatmap(logits, 0.15) == GridBox(2, 2, 8, 6)
    assert roi_box_from_heatmap(logits, 0.1) == GridBox(1, 1, 9, 7)


def test_reflect_padding_doubles_the_neighbour_on_the_border():
    # A hot cell one row from the top: the border row sees it twice (once mirrored), 2 * 0.124 = 0.248,
    # more than the blurred peak itself (0.204). So the box reaches the border.
    logits = heatmap(8, 10, [(1, 4)])
    probs = heatmap_probabilities(logits)
    assert probs[0, 4].item() == pytest.approx(2 * EDGE, abs=1e-4)
    assert probs[1, 4].item() == pytest.approx(CENTRE, abs=1e-4)
    assert roi_box_from_heatmap(logits, 0.2) == GridBox(4, 0, 5, 2)
    assert roi_box_from_heatmap(logits, 0.22) == GridBox(4, 0, 5, 1)


def test_nothing_above_threshold_gives_none():
    assert roi_box_from_heatmap(heatmap(6, 9), 0.1) is None
    assert roi_box_from_heatmap(torch.zeros(6, 9), 0.5) is None  # 0.5 is not strictly above 0.5


@pytest.mark.parametrize("logits, tau", [(heatmap(6, 9, fill=HOT), 0.99), (heatmap(6, 9), 0.0)])
def test_everything_above_threshold_gives_whole_grid(logits, tau):
    assert roi_box_from_heatmap(logits, tau) == GridBox(0, 0, 9, 6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_give_none_and_a_warning(bad, caplog):
    logits = heatmap(6, 9, [(2, 2)])
    logits[4, 7] = bad
    with caplog.at_level(logging.WARNING, logger="qzoom_swift.roi"):
        assert roi_box_from_heatmap(logits, 0.1) is None
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert "1 non-finite logit(s) out of 54" in caplog.records[0].getMessage()


def test_keep_mask_removes_a_sink_from_the_box():
    logits = heatmap(8, 10, [(0, 0), (5, 6)])
    keep = torch.ones(8, 10, dtype=torch.bool)
    keep[0, 0] = False
    assert roi_box_from_heatmap(logits, 0.15) == GridBox(0, 0, 7, 6)
    assert roi_box_from_heatmap(logits, 0.15, keep_mask=keep) == GridBox(6, 5, 7, 6)


@pytest.mark.parametrize(
    "cell, expected",
    [
        ((0, 0), GridBox(0, 0, 2, 2)),  # corners: reflect padding keeps the box inside, one cell of growth
        ((0, 9), GridBox(8, 0, 10, 2)),
        ((7, 0), GridBox(0, 6, 2, 8)),
        ((7, 9), GridBox(8, 6, 10, 8)),
        ((0, 5), GridBox(4, 0, 7, 2)),  # border midpoints
        ((7, 5), GridBox(4, 6, 7, 8)),
        ((3, 0), GridBox(0, 2, 2, 5)),
        ((3, 9), GridBox(8, 2, 10, 5)),
    ],
)
def test_hot_cell_at_borders_and_corners(cell, expected):
    assert roi_box_from_heatmap(heatmap(8, 10, [cell]), 0.1) == expected


@pytest.mark.parametrize(
    "shape, cell, tau, expected",
    [
        ((1, 10), (0, 4), 0.1, GridBox(3, 0, 6, 1)),  # 1-D blur: 0.274 beside the 0.452 peak
        ((1, 10), (0, 4), 0.3, GridBox(4, 0, 5, 1)),
        ((1, 10), (0, 0), 0.1, GridBox(0, 0, 2, 1)),
        ((10, 1), (6, 0), 0.1, GridBox(0, 5, 1, 8)),
        ((10, 1), (9, 0), 0.3, GridBox(0, 9, 1, 10)),
        ((1, 1), (0, 0), 0.5, GridBox(0, 0, 1, 1)),  # no blur at all on a single cell
        ((2, 7), (1, 3), 0.1, GridBox(2, 0, 5, 2)),  # a side of 2 allows the full kernel
    ],
)
def test_thin_grids(shape, cell, tau, expected):
    assert roi_box_from_heatmap(heatmap(*shape, [cell]), tau) == expected


def test_one_by_one_grid_cold_gives_none():
    assert roi_box_from_heatmap(heatmap(1, 1), 0.1) is None


def test_non_square_grid_blob():
    logits = heatmap(6, 17, [(2, 12), (2, 13), (3, 12), (3, 13)])
    # a 2x2 blob: each hot cell keeps 0.527 after the blur, the side ring 0.199, the ring corners 0.075
    probs = heatmap_probabilities(logits)
    assert probs[2, 12].item() == pytest.approx(float((_G1[1] + _G1[2]) ** 2), abs=1e-4)
    assert probs[1, 12].item() == pytest.approx(float(_G1[0] * (_G1[1] + _G1[2])), abs=1e-4)
    assert roi_box_from_heatmap(logits, 0.3) == GridBox(12, 2, 14, 4)
    assert roi_box_from_heatmap(logits, 0.1) == GridBox(11, 1, 15, 5)
    assert roi_box_from_heatmap(logits, 0.05) == GridBox(11, 1, 15, 5)


def test_roi_box_rejects_non_finite_threshold():
    with pytest.raises(ValueError, match="tau_roi"):
        roi_box_from_heatmap(torch.zeros(3, 3), math.nan)


# ------------------------------------------------------------------------------------ box -> pixels


@pytest.mark.parametrize(
    "box, expected",
    [
        (GridBox(1, 1, 3, 2), PixelBox(166, 125, 500, 250)),  # 1000/6 = 166.7 floored, 3000/6 = 500 exact
        (GridBox(2, 0, 5, 3), PixelBox(333, 0, 834, 375)),  # right edge 833.3 ceiled
        (GridBox(0, 0, 6, 4), PixelBox(0, 0, 1000, 500)),  # whole grid = whole image
        (GridBox(5, 3, 6, 4), PixelBox(833, 375, 1000, 500)),
    ],
)
def test_grid_to_pixels_non_square(box, expected):
    # grid (h=4, w=6) over a 1000x500 (w x h) image: cells are 166.7 x 125 px
    assert grid_box_to_pixel_box(box, (4, 6), (1000, 500)) == expected


def test_grid_to_pixels_tall_image_and_grid():
    # grid (h=9, w=2) over a 300x1000 image: cells are 150 x 111.1 px
    assert grid_box_to_pixel_box(GridBox(1, 2, 2, 5), (9, 2), (300, 1000)) == PixelBox(150, 222, 300, 556)


@pytest.mark.parametrize(
    "box, expected",
    [
        (GridBox(0, 0, 1, 1), PixelBox(0, 0, 28, 28)),  # top-left: grown then slid right/down
        (GridBox(99, 0, 100, 1), PixelBox(972, 0, 1000, 28)),  # top-right
        (GridBox(0, 49, 1, 50), PixelBox(0, 472, 28, 500)),  # bottom-left
        (GridBox(99, 49, 100, 50), PixelBox(972, 472, 1000, 500)),  # bottom-right
        (GridBox(50, 25, 51, 26), PixelBox(491, 241, 519, 269)),  # centre: grown symmetrically
        (GridBox(10, 10, 14, 11), PixelBox(100, 91, 140, 119)),  # only the short side grows
    ],
)
def test_min_side_growth(box, expected):
    # grid (h=50, w=100) over a 1000x500 image: cells are 10x10 px, under the 28 px minimum
    pixel_box = grid_box_to_pixel_box(box, (50, 100), (1000, 500))
    assert pixel_box == expected
    assert pixel_box.right <= 1000 and pixel_box.bottom <= 500
    assert min(pixel_box.width, pixel_box.height) == 28


def test_min_side_larger_than_the_image_side_is_clamped_to_it():
    # a 20x100 image: the width cannot reach 28, so it becomes the full width 20
    assert grid_box_to_pixel_box(GridBox(0, 0, 1, 1), (10, 2), (20, 100)) == PixelBox(0, 0, 20, 28)
    assert grid_box_to_pixel_box(GridBox(1, 9, 2, 10), (10, 2), (20, 100)) == PixelBox(0, 72, 20, 100)


def test_min_side_custom():
    assert grid_box_to_pixel_box(GridBox(50, 25, 51, 26), (50, 100), (1000, 500), min_side=64) == PixelBox(
        473, 223, 537, 287
    )
    assert grid_box_to_pixel_box(GridBox(50, 25, 51, 26), (50, 100), (1000, 500), min_side=1) == PixelBox(
        500, 250, 510, 260
    )


def test_extreme_aspect_box_grows_its_short_side():
    # grid (h=100, w=8) over an 8000x1000 image: one grid row is an 8000x10 px strip
    box = GridBox(0, 50, 8, 51)
    assert grid_box_to_pixel_box(box, (100, 8), (8000, 1000), max_aspect=math.inf) == PixelBox(
        0, 491, 8000, 519
    )
    grown = grid_box_to_pixel_box(box, (100, 8), (8000, 1000))
    assert grown == PixelBox(0, 485, 8000, 525)  # 8000 / 200 = 40 px high, centred on the 28 px strip
    assert grown.width / grown.height == MAX_ASPECT_RATIO == MAX_RATIO == 200.0


def test_extreme_aspect_tall_box_and_thin_image():
    # tall strip: the width grows instead
    box = GridBox(3, 0, 4, 8)
    # 10 px wide strip at x 30..40: min side -> 21..49, then 8000 / 200 = 40 px -> 15..55
    assert grid_box_to_pixel_box(box, (8, 100), (1000, 8000)) == PixelBox(15, 0, 55, 8000)
    # the image itself is thinner than 200:1, nothing to grow into: left for resized_hw_for_budget to refuse
    thin = grid_box_to_pixel_box(GridBox(0, 0, 400, 1), (1, 400), (12000, 30))
    assert thin == PixelBox(0, 0, 12000, 30)


@pytest.mark.parametrize(
    "box, grid_hw, image_wh, kwargs, match",
    [
        (GridBox(0, 0, 7, 1), (4, 6), (100, 100), {}, "does not fit"),
        (GridBox(0, 0, 1, 5), (4, 6), (100, 100), {}, "does not fit"),
        (GridBox(0, 0, 1, 1), (0, 6), (100, 100), {}, "positive"),
        (GridBox(0, 0, 1, 1), (4, 6), (100, 0), {}, "positive"),
        (GridBox(0, 0, 1, 1), (4, 6), (100, 100), {"min_side": 0}, "min_side"),
        (GridBox(0, 0, 1, 1), (4, 6), (100, 100), {"max_aspect": 0.5}, "max_aspect"),
    ],
)
def test_grid_to_pixels_rejects_bad_input(box, grid_hw, image_wh, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grid_box_to_pixel_box(box, grid_hw, image_wh, **kwargs)


# -------------------------------------------------------------------------------------------- crop


def test_crop_size_and_content():
    image = Image.new("RGB", (1000, 500), (0, 0, 0))
    image.putpixel((333, 101), (255, 0, 0))
    image.putpixel((833, 374), (0, 255, 0))
    box = PixelBox(333, 101, 834, 375)
    crop = crop_image(image, box)
    assert crop.size == (box.width, box.height) == (501, 274)
    assert crop.getpixel((0, 0)) == (255, 0, 0)
    assert crop.getpixel((500, 273)) == (0, 255, 0)


def test_crop_of_a_converted_box_has_the_box_size():
    image = Image.new("L", (640, 480))
    box = grid_box_to_pixel_box(GridBox(3, 2, 9, 7), (12, 16), (640, 480))
    assert box == PixelBox(120, 80, 360, 280)
    assert crop_image(image, box).size == (240, 200)


def test_crop_refuses_box_outside_image():
    with pytest.raises(ValueError, match="outside"):
        crop_image(Image.new("RGB", (100, 50)), PixelBox(0, 0, 101, 50))


# ------------------------------------------------------------------------------------ token budget

# (height, width, patch_unit, min_tokens, max_tokens) -> resized (height, width); the same values as
# transformers 5.19's Qwen2VLImageProcessor smart_resize (checked once by hand, not imported: it is slow).
RESIZE_CASES = [
    ((28, 28, 28, 256, 576), (448, 448)),  # tiny crop: up-sampled 16x to the 256-token minimum
    ((3000, 4000, 28, 256, 576), (560, 756)),  # huge crop: shrunk under the 576-token maximum
    ((100, 300, 28, 256, 576), (280, 784)),
    ((2000, 500, 28, 512, 4096), (1988, 504)),
    ((1000, 1000, 32, 256, 576), (768, 768)),  # Qwen3-VL unit
    ((300, 200, 32, 256, 576), (640, 448)),
    ((64, 64, 32, 128, 576), (384, 384)),
    ((28, 5600, 28, 256, 576), (56, 6356)),  # exactly 200:1 is accepted
    ((31, 1990, 28, 64, 64), (28, 1792)),  # qwen_vl_utils alone would give a height of 0 here
]


@pytest.mark.parametrize("args, expected", RESIZE_CASES)
def test_resized_hw_matches_qwen_rule(args, expected):
    h, w, unit, lo, hi = args
    assert resized_hw_for_budget(h, w, patch_unit=unit, min_tokens=lo, max_tokens=hi) == expected


@pytest.mark.parametrize("unit", [28, 32])
@pytest.mark.parametrize(
    "h, w, lo, hi",
    [
        (28, 28, 256, 576),
        (50, 90, 256, 576),
        (120, 80, 128, 576),
        (700, 500, 256, 576),
        (4000, 3000, 256, 576),
        (3000, 9000, 512, 4096),
        (60, 40, 512, 4096),
        (1234, 777, 512, 4096),
    ],
)
def test_resized_hw_respects_budget_units_and_aspect(unit, h, w, lo, hi):
    new_h, new_w = resized_hw_for_budget(h, w, patch_unit=unit, min_tokens=lo, max_tokens=hi)
    assert new_h % unit == 0 and new_w % unit == 0
    tokens = tokens_for_hw(new_h, new_w, unit)
    assert lo <= tokens <= hi
    # each side is rounded to a multiple of the unit once: the ratio moves by at most that rounding
    tolerance = (1 + unit / new_h) * (1 + unit / new_w)
    assert 1 / tolerance <= (new_w / new_h) / (w / h) <= tolerance
    if h * w < lo * unit * unit:
        assert new_h * new_w > h * w  # small crops are zoomed in


def test_resized_hw_extreme_aspect_names_the_crop():
    with pytest.raises(ValueError, match=r"crop of 5657x28 \(w x h\) px has aspect ratio 202\.0 > 200"):
        resized_hw_for_budget(28, 5657, patch_unit=28, min_tokens=256, max_tokens=576)
    with pytest.raises(ValueError, match=r"crop of 30x12000 \(w x h\)"):
        resized_hw_for_budget(12000, 30, patch_unit=32, min_tokens=256, max_tokens=576)


def test_grown_extreme_box_can_be_resized():
    box = grid_box_to_pixel_box(GridBox(0, 50, 8, 51), (100, 8), (8000, 1000))
    new_h, new_w = resized_hw_for_budget(box.height, box.width, patch_unit=28, min_tokens=256, max_tokens=576)
    assert (box.height, box.width) == (40, 8000)
    assert (new_h, new_w) == (28, 8008)  # the output may be thinner than 200:1; only the input is checked
    assert tokens_for_hw(new_h, new_w, 28) == 286


@pytest.mark.parametrize(
    "h, w, kwargs, match",
    [
        (0, 10, {}, "empty"),
        (10, 10, {"min_tokens": 600}, "token budget"),
        (10, 10, {"min_tokens": 0}, "token budget"),
        (10, 10, {"patch_unit": 0}, "patch_unit"),
    ],
)
def test_resized_hw_rejects_bad_input(h, w, kwargs, match):
    args = {"patch_unit": 28, "min_tokens": 256, "max_tokens": 576} | kwargs
    with pytest.raises(ValueError, match=match):
        resized_hw_for_budget(h, w, **args)


@pytest.mark.parametrize(
    "h, w, unit, expected", [(448, 448, 28, 256), (560, 756, 28, 540), (64, 96, 32, 6), (28, 28, 28, 1)]
)
def test_tokens_for_hw(h, w, unit, expected):
    assert tokens_for_hw(h, w, unit) == expected


@pytest.mark.parametrize("h, w", [(448, 450), (30, 28), (0, 28)])
def test_tokens_for_hw_rejects_non_multiples(h, w):
    with pytest.raises(ValueError, match="multiple"):
        tokens_for_hw(h, w, 28)


# ------------------------------------------------------------------------------------- positions


def test_worked_example_of_reference_3_3():
    # Source grid 24x32 starting at st=15 (so its <ve> is at 15 + 32 = 47), box x 8..15 / y 4..11, RoI 18x18.
    src = qwen_source_positions(15, 24, 32)
    pos = roi_position_ids(src, (24, 32), 47.0, GridBox(8, 4, 16, 12), (18, 18), num_tail=5)
    assert pos.shape == (3, 1 + 18 * 18 + 1 + 5)
    assert pos.dtype == torch.float32
    assert pos[:, 0].tolist() == [48.0, 48.0, 48.0]  # RoI <vs>
    roi = pos[:, 1 : 1 + 324].view(3, 18, 18)
    assert (roi[0] == 49.0).all()  # t_roi = 15 + max(24, 32) + 2
    expected_h = torch.linspace(19, 26, 18).unsqueeze(1).expand(18, 18)
    expected_w = torch.linspace(23, 30, 18).unsqueeze(0).expand(18, 18)
    torch.testing.assert_close(roi[1], expected_h)
    torch.testing.assert_close(roi[2], expected_w)
    assert roi[1, :, 0].tolist()[:2] == pytest.approx([19.0, 19 + 7 / 17])
    assert roi[1, -1, -1].item() == 26.0 and roi[2, -1, -1].item() == 30.0
    assert pos[:, 325].tolist() == [67.0, 67.0, 67.0]  # RoI <ve> = 47 + 18 + 2
    assert pos[:, 326:].tolist() == [[68.0, 69.0, 70.0, 71.0, 72.0]] * 3  # the question starts at 68


def test_positions_for_a_top_left_box():
    src = qwen_source_positions(5, 4, 6)  # <ve> at 5 + 6 = 11
    pos = roi_position_ids(src, (4, 6), 11, GridBox(0, 0, 2, 2), (3, 3), num_tail=2)
    half = [5.0, 5.5, 6.0]
    expected = torch.tensor(
        [
            [12.0] + [13.0] * 9 + [16.0, 17.0, 18.0],
            [12.0] + [v for v in half for _ in range(3)] + [16.0, 17.0, 18.0],
            [12.0] + half * 3 + [16.0, 17.0, 18.0],
        ]
    )
    torch.testing.assert_close(pos, expected)


def test_positions_for_a_one_cell_box_are_constant():
    src = qwen_source_positions(5, 4, 6)
    pos = roi_position_ids(src, (4, 6), 11, GridBox(3, 2, 4, 3), (2, 4), num_tail=0)
    assert pos.shape == (3, 1 + 8 + 1)
    roi = pos[:, 1:9]
    assert roi[0].tolist() == [13.0] * 8
    assert roi[1].tolist() == [7.0] * 8  # source row 2 sits at h = 5 + 2
    assert roi[2].tolist() == [8.0] * 8  # source column 3 sits at w = 5 + 3
    assert pos[:, 9].tolist() == [17.0] * 3  # 11 + max(2, 4) + 2


def test_positions_for_a_roi_grid_larger_than_its_box_interpolate():
    src = qwen_source_positions(15, 24, 32)
    pos = roi_position_ids(src, (24, 32), 47, GridBox(8, 4, 10, 6), (10, 12), num_tail=1)
    roi = pos[:, 1 : 1 + 120].view(3, 10, 12)
    rows, cols = roi[1, :, 0], roi[2, 0, :]
    assert (roi[1] == rows.unsqueeze(1)).all() and (roi[2] == cols.unsqueeze(0)).all()
    assert rows[0].item() == 19.0 and rows[-1].item() == 20.0  # first and last covered source rows 4, 5
    assert cols[0].item() == 23.0 and cols[-1].item() == 24.0
    assert ((rows[1:-1] > 19.0) & (rows[1:-1] < 20.0)).all()
    assert ((cols[1:-1] > 23.0) & (cols[1:-1] < 24.0)).all()
    assert (rows.diff() > 0).all() and (cols.diff() > 0).all()
    torch.testing.assert_close(rows.diff(), torch.full((9,), 1 / 9))
    assert pos[:, -2:].tolist() == [[61.0, 62.0]] * 3  # <ve> = 47 + 12 + 2, then one tail token


def test_positions_read_the_source_positions_rather_than_assume_them():
    # a non-standard source frame: h advances by 2 per row, w by 3 per column, t at 100
    src = torch.stack(
        [
            torch.full((12,), 100.0),
            (10.0 + 2 * torch.arange(3)).repeat_interleave(4),
            (20.0 + 3 * torch.arange(4)).repeat(3),
        ]
    )
    pos = roi_position_ids(src, (3, 4), 200.0, GridBox(1, 0, 4, 3), (3, 2), num_tail=0)
    roi = pos[:, 1:7].view(3, 3, 2)
    assert roi[0].unique().tolist() == [106.0]  # 100 + max(3, 4) + 2
    assert roi[1, :, 0].tolist() == [10.0, 12.0, 14.0]
    assert roi[2, 0].tolist() == [23.0, 29.0]
    assert pos[:, 0].tolist() == [201.0] * 3 and pos[:, -1].tolist() == [205.0] * 3


def test_positions_accept_fractional_vision_end_and_keep_device():
    src = qwen_source_positions(0, 2, 2).double()
    pos = roi_position_ids(src, (2, 2), 2.5, GridBox(0, 0, 2, 2), (1, 1), num_tail=1)
    assert pos.dtype == torch.float32 and pos.device == src.device
    assert pos.tolist() == [[3.5, 4.0, 5.5, 6.5], [3.5, 0.0, 5.5, 6.5], [3.5, 0.0, 5.5, 6.5]]


@pytest.mark.parametrize(
    "src_shape, box, roi_grid, num_tail, match",
    [
        ((3, 11), GridBox(0, 0, 1, 1), (2, 2), 0, "shape"),
        ((2, 12), GridBox(0, 0, 1, 1), (2, 2), 0, "shape"),
        ((3, 12), GridBox(0, 0, 5, 1), (2, 2), 0, "does not fit"),
        ((3, 12), GridBox(0, 0, 1, 1), (0, 2), 0, "positive"),
        ((3, 12), GridBox(0, 0, 1, 1), (2, 2), -1, "num_tail"),
    ],
)
def test_positions_reject_bad_input(src_shape, box, roi_grid, num_tail, match):
    with pytest.raises(ValueError, match=match):
        roi_position_ids(torch.zeros(src_shape), (3, 4), 4.0, box, roi_grid, num_tail)


def test_sequential_position_ids():
    ids = sequential_position_ids(41, 4)
    assert ids.dtype == torch.long
    assert ids.tolist() == [42, 43, 44, 45]
    assert sequential_position_ids(41, 0).tolist() == []
    with pytest.raises(ValueError, match="num_new"):
        sequential_position_ids(41, -1)


# ------------------------------------------------------------------------------ roi_fallback="peak"


@pytest.mark.parametrize("fraction, expected", [
    (0.5, GridBox(3, 2, 6, 5)),  # threshold 0.102: the centre (0.204) and its 4 edge neighbours (0.124)
    (0.7, GridBox(4, 3, 5, 4)),  # threshold 0.143: the centre alone
    (0.3, GridBox(3, 2, 6, 5)),  # the diagonals (0.075) join too; same 3x3 box
])
def test_peak_box_around_a_single_hot_cell(fraction, expected):
    assert peak_region_box(heatmap(8, 10, [(3, 4)]), fraction=fraction) == expected


def test_peak_box_exists_where_no_cell_passes_tau_roi():
    # A weak peak: sigmoid(-5) = 0.0067, blurred 0.0014; nothing is above tau_roi = 0.1, the peak still is a region.
    logits = heatmap(6, 9)
    logits[2, 4] = -5.0
    assert roi_box_from_heatmap(logits, 0.1) is None
    assert peak_region_box(logits) == GridBox(3, 1, 6, 4)


def test_select_roi_box_falls_back_to_the_peak_only_when_asked_and_blurs_once(monkeypatch):
    import qzoom_swift.roi as roi

    weak = heatmap(6, 9)
    weak[2, 4] = -5.0  # no cell above 0.1 (previous test)
    strong = heatmap(8, 10, [(3, 4)])
    assert select_roi_box(strong, 0.1, fallback="peak") == (roi_box_from_heatmap(strong, 0.1), False)
    assert select_roi_box(weak, 0.1) == (None, False)
    assert select_roi_box(weak, 0.1, fallback="peak") == (peak_region_box(weak), True)
    broken = weak.clone()
    broken[0, 0] = float("nan")
    assert select_roi_box(broken, 0.1, fallback="peak") == (None, False)
    calls = []
    blur = roi.heatmap_probabilities
    monkeypatch.setattr(roi, "heatmap_probabilities", lambda *a, **k: calls.append(1) or blur(*a, **k))
    assert select_roi_box(weak, 0.1, fallback="peak")[1] and len(calls) == 1


def test_peak_box_ignores_a_weaker_blob_that_does_not_touch_the_peak():
    logits = heatmap(8, 10, [(2, 2)])
    logits[5, 7] = 2.0  # sigmoid 0.88: blurred 0.18, above half the peak (0.102) but not connected to it
    assert roi_box_from_heatmap(logits, 0.1) == GridBox(1, 1, 9, 7)  # the released rule boxes both
    assert peak_region_box(logits) == GridBox(1, 1, 4, 4)


def test_peak_box_follows_connected_cells_and_the_keep_mask():
    logits = heatmap(8, 10, [(0, 0)])
    logits[5, 6] = 2.0
    keep = torch.ones(8, 10, dtype=torch.bool)
    keep[0, 0] = False
    assert peak_region_box(logits) == GridBox(0, 0, 2, 2)  # the sink wins without the mask
    assert peak_region_box(logits, keep_mask=keep) == GridBox(5, 4, 8, 7)
    ridge = heatmap(5, 9, [(2, c) for c in range(1, 7)])  # a horizontal ridge is one region
    assert peak_region_box(ridge, blur_kernel=1) == GridBox(1, 2, 7, 3)
    diagonal = heatmap(5, 9, [(1, 1), (2, 2)])  # touching only at a corner: 4-connected, so two regions
    diagonal[1, 1] += 1.0
    assert peak_region_box(diagonal, blur_kernel=1) == GridBox(1, 1, 2, 2)


def test_peak_box_ties_flat_maps_and_refusals():
    assert peak_region_box(torch.zeros(4, 6)) == GridBox(0, 0, 6, 4)  # flat: every cell reaches the peak
    assert peak_region_box(heatmap(4, 6), keep_mask=torch.zeros(4, 6, dtype=torch.bool)) is None  # all masked
    bad = heatmap(4, 6, [(1, 1)])
    bad[3, 3] = math.nan
    assert peak_region_box(bad) is None
    with pytest.raises(ValueError, match="fraction"):
        peak_region_box(heatmap(4, 6), fraction=0.0)


def test_peak_box_is_grown_to_the_minimum_crop():
    box = peak_region_box(heatmap(32, 32, [(10, 20)]), fraction=0.9)
    assert box == GridBox(20, 10, 21, 11)  # one 14 px cell of a 448 px image
    assert grid_box_to_pixel_box(box, (32, 32), (448, 448), min_side=28) == PixelBox(273, 133, 301, 161)
