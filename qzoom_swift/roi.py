"""Region-of-interest geometry for Q-Zoom inference: heatmap -> box -> pixel box -> crop.

Kept free of model code (a family's resize and position rules live in its adapter module) so every rule of the official release (reference §3.3, §5.2 C, §5.4) can be
checked exhaustively by hand-made grids and numbers. Conventions used throughout:

- grid sizes are ``(height, width)`` in merged visual tokens (as Qwen's ``image_grid_thw`` without t);
- image sizes are ``(width, height)`` in pixels (as PIL's ``Image.size``);
- boxes are half-open: ``x1``/``y1``/``right``/``bottom`` are exclusive, like PIL's ``crop``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

logger = logging.getLogger(__name__)

MAX_ASPECT_RATIO: float = 200.0
"""The largest long/short side ratio a supported family's resize rule encodes (Qwen's ``MAX_RATIO``)."""

# Tolerance when turning normalised floats back into pixels: 0.3 * 10 is 3.0000000000000004 in floats,
# which must stay pixel 3 on both the floor (left/top) and the ceil (right/bottom) side.
_NORMALIZED_EPS = 1e-6


@dataclass(frozen=True)
class GridBox:
    """A box of merged-token grid cells; ``x1`` and ``y1`` are exclusive, so a 1-cell box has width 1."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if not (0 <= self.x0 < self.x1 and 0 <= self.y0 < self.y1):
            raise ValueError(f"empty or negative GridBox {self}: need 0 <= x0 < x1 and 0 <= y0 < y1")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        """Number of grid cells covered."""
        return self.width * self.height

    def fits_grid(self, grid_hw: tuple[int, int]) -> bool:
        """Whether the box lies inside a grid of ``(height, width)`` cells."""
        return self.x1 <= grid_hw[1] and self.y1 <= grid_hw[0]


@dataclass(frozen=True)
class PixelBox:
    """A box in pixels of the ORIGINAL image; ``right`` and ``bottom`` are exclusive, as in PIL's crop."""

    left: int
    top: int
    right: int
    bottom: int

    def __post_init__(self) -> None:
        if not (0 <= self.left < self.right and 0 <= self.top < self.bottom):
            raise ValueError(
                f"empty or negative PixelBox {self}: need 0 <= left < right and 0 <= top < bottom"
            )

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)``, the argument order of ``PIL.Image.crop``."""
        return (self.left, self.top, self.right, self.bottom)

    def normalized(self, image_w: int, image_h: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in [0, 1], to report or store a box independently of the image size."""
        return (self.left / image_w, self.top / image_h, self.right / image_w, self.bottom / image_h)

    @classmethod
    def from_normalized(cls, box: tuple[float, float, float, float], image_w: int, image_h: int) -> PixelBox:
        """Inverse of :meth:`normalized`: floor the left/top edge, ceil the right/bottom edge, clamp to the
        image, so the pixel box always covers the normalised one (and round-trips exactly)."""
        x0, y0, x1, y1 = box
        left = max(0, math.floor(x0 * image_w + _NORMALIZED_EPS))
        top = max(0, math.floor(y0 * image_h + _NORMALIZED_EPS))
        right = min(image_w, math.ceil(x1 * image_w - _NORMALIZED_EPS))
        bottom = min(image_h, math.ceil(y1 * image_h - _NORMALIZED_EPS))
        return cls(left, top, right, bottom)


def _check_heatmap(logits: Tensor) -> None:
    if logits.ndim != 2 or logits.numel() == 0:
        raise ValueError(f"expected a non-empty [h, w] heatmap, got shape {tuple(logits.shape)}")


def heatmap_probabilities(
    logits: Tensor,
    blur_kernel: int = 3,
    blur_sigma: float = 1.0,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """Sigmoid, then a Gaussian blur (torchvision, reflect padding), as the official release does.

    The blur fills one-cell holes and grows isolated peaks a little, so a box around the thresholded map
    is less ragged. ``keep_mask`` (bool ``[h, w]``, False = attention-sink cell) zeroes probabilities
    before the blur, like the official sink mask. Non-finite logits flow through unchanged (NaN stays
    NaN); :func:`roi_box_from_heatmap` decides what to do with them.

    Reflect padding mirrors without repeating the edge, so a cell on the border sees its inner neighbour
    twice: a peak one cell from the border lifts the border cell above its own blurred value.

    Reflect padding needs the padding to be smaller than the grid side, so on an axis shorter than the
    kernel the kernel is clamped to ``2 * side - 1`` (1 for a side of 1: that axis is not blurred).
    Returns float32 ``[h, w]``.
    """
    _check_heatmap(logits)
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel={blur_kernel}: expected a positive odd integer")
    if not blur_sigma > 0:
        raise ValueError(f"blur_sigma={blur_sigma}: expected a positive number")
    probs = torch.sigmoid(logits.detach().to(torch.float32))
    if keep_mask is not None:
        if keep_mask.shape != logits.shape:
            raise ValueError(
                f"keep_mask shape {tuple(keep_mask.shape)} != heatmap shape {tuple(logits.shape)}"
            )
        probs = probs * keep_mask.to(device=probs.device, dtype=torch.bool)
    h, w = probs.shape
    kernel_x = min(blur_kernel, 2 * w - 1)
    kernel_y = min(blur_kernel, 2 * h - 1)
    if kernel_x == 1 and kernel_y == 1:
        return probs
    blurred = gaussian_blur(probs.unsqueeze(0), [kernel_x, kernel_y], [float(blur_sigma), float(blur_sigma)])
    return blurred.squeeze(0)


def mask_bounding_box(mask: Tensor) -> GridBox | None:
    """The single axis-aligned box around ALL True cells of a bool ``[h, w]`` mask, or None if none.

    No connected components, on purpose: the official release keeps one box, so two distant blobs give
    one large box covering both.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an [h, w] mask, got shape {tuple(mask.shape)}")
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return GridBox(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def roi_box_from_heatmap(
    logits: Tensor,
    tau_roi: float,
    blur_kernel: int = 3,
    blur_sigma: float = 1.0,
    keep_mask: Tensor | None = None,
) -> GridBox | None:
    """The region to zoom into: cells whose blurred probability is strictly above ``tau_roi``, boxed.

    Returns None (no zoom: the caller answers from the low-resolution pass) when no cell survives, or,
    with a logged warning, when any logit is NaN or infinite, since a broken heatmap should never pick
    a crop. When every cell survives the box is the whole grid.
    """
    return select_roi_box(logits, tau_roi, blur_kernel, blur_sigma, keep_mask)[0]


PEAK_FRACTION: float = 0.5
"""``roi_fallback="peak"``: cells whose blurred probability reaches this fraction of the peak's join its region."""


def select_roi_box(
    logits: Tensor,
    tau_roi: float,
    blur_kernel: int = 3,
    blur_sigma: float = 1.0,
    keep_mask: Tensor | None = None,
    fallback: str = "none",
) -> tuple[GridBox | None, bool]:
    """The crop of one sample, and whether it came from the peak fallback: the cells above ``tau_roi``
    (:func:`roi_box_from_heatmap`), else with ``fallback="peak"`` the region around the peak
    (:func:`peak_region_box`). The heatmap is blurred once for both."""
    _check_heatmap(logits)
    if not math.isfinite(tau_roi):
        raise ValueError(f"tau_roi={tau_roi}: expected a finite number")
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        logger.warning(
            "RoI heatmap has %d non-finite logit(s) out of %d; skipping the zoom for this sample",
            int((~finite).sum()),
            logits.numel(),
        )
        return None, False
    probs = heatmap_probabilities(logits, blur_kernel, blur_sigma, keep_mask)
    box = mask_bounding_box(probs > tau_roi)
    if box is None and fallback == "peak":
        box = _peak_region(probs, PEAK_FRACTION)
        return box, box is not None
    return box, False


def peak_region_box(
    logits: Tensor,
    blur_kernel: int = 3,
    blur_sigma: float = 1.0,
    keep_mask: Tensor | None = None,
    fraction: float = PEAK_FRACTION,
) -> GridBox | None:
    """The box around the heatmap's peak: the 4-connected cells at >= ``fraction`` x the peak that reach it.

    The fallback when the gate says zoom but no cell passes ``tau_roi`` (``QZoomConfig.roi_fallback``): the
    gate's decision is kept and the crop goes where the RPN is most confident, instead of answering from
    the low-resolution pass. Only the region connected to the peak counts, so a second, weaker blob elsewhere
    does not stretch the box (unlike :func:`roi_box_from_heatmap`, which boxes every surviving cell as
    released). Ties for the peak go to the first cell in row-major order. The crop is grown to the minimum
    side later, by :func:`grid_box_to_pixel_box`. None when a logit is not finite or every cell is masked.
    """
    _check_heatmap(logits)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: expected a number in (0, 1]")
    if not bool(torch.isfinite(logits).all()):
        return None
    return _peak_region(heatmap_probabilities(logits, blur_kernel, blur_sigma, keep_mask), fraction)


def _peak_region(probs: Tensor, fraction: float) -> GridBox | None:
    peak = float(probs.max())
    if not peak > 0.0:
        return None
    from scipy import ndimage

    start = divmod(int(torch.argmax(probs)), probs.shape[1])
    components, _ = ndimage.label((probs >= fraction * peak).numpy())  # default structure: 4-connected
    return mask_bounding_box(torch.from_numpy(components == components[start]))


def _grow_span(lo: int, hi: int, target: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to ``min(target, limit)`` around its centre, then slide it back into [0, limit)."""
    target = min(target, limit)
    if hi - lo >= target:
        return lo, hi
    lo = (lo + hi - target) // 2  # floor of (centre - target / 2)
    lo = min(max(lo, 0), limit - target)
    return lo, lo + target


def grid_box_to_pixel_box(
    box: GridBox,
    grid_hw: tuple[int, int],
    image_wh: tuple[int, int],
    min_side: int = 28,
    max_aspect: float = MAX_ASPECT_RATIO,
) -> PixelBox:
    """Map grid cells to pixels of the original image, growing boxes too small or too thin to encode.

    A cell edge ``x`` maps to ``x * image_w / grid_w`` (likewise for y), exactly as the official
    ``get_bbox4src`` (which goes through the resized image; the patch size cancels). Left/top are
    floored and right/bottom ceiled, so the crop always covers the selected cells (the official code
    truncates both, which can shave a pixel). Then:

    - a side shorter than ``min_side`` pixels grows around its centre to ``min_side``, slides back inside
      the image and never exceeds the image side (28 source pixels for every backbone, as released);
    - if long/short side exceeds ``max_aspect``, the short side grows the same way until it does not, so
      Qwen's resize rule (which refuses ratios above 200) can always encode the crop unless the image
      itself is that thin. Pass ``math.inf`` to disable.
    """
    grid_h, grid_w = grid_hw
    image_w, image_h = image_wh
    if min(grid_h, grid_w, image_w, image_h) < 1:
        raise ValueError(f"grid_hw={grid_hw} and image_wh={image_wh} must be positive")
    if not box.fits_grid(grid_hw):
        raise ValueError(f"{box} does not fit a grid of (h, w)={grid_hw}")
    if min_side < 1:
        raise ValueError(f"min_side={min_side}: expected >= 1")
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect={max_aspect}: expected >= 1")
    left = box.x0 * image_w // grid_w
    top = box.y0 * image_h // grid_h
    right = -(-box.x1 * image_w // grid_w)  # ceil division
    bottom = -(-box.y1 * image_h // grid_h)
    left, right = _grow_span(left, right, min_side, image_w)
    top, bottom = _grow_span(top, bottom, min_side, image_h)
    width, height = right - left, bottom - top
    if math.isfinite(max_aspect) and max(width, height) / min(width, height) > max_aspect:
        short_target = math.ceil(max(width, height) / max_aspect)
        if width < height:
            left, right = _grow_span(left, right, short_target, image_w)
        else:
            top, bottom = _grow_span(top, bottom, short_target, image_h)
    return PixelBox(left, top, right, bottom)


def crop_image(image: Image.Image, box: PixelBox) -> Image.Image:
    """The region of the original image to re-encode. Refuses boxes reaching outside the image, which
    PIL would silently pad with black."""
    if box.right > image.width or box.bottom > image.height:
        raise ValueError(f"{box} reaches outside the {image.width}x{image.height} (w x h) image")
    return image.crop(box.as_tuple())


def grid_region(image_size: tuple[int, int], processor=None) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in pixels of the part of the image the visual-token grid covers."""
    w, h = image_size
    ip = getattr(processor, "image_processor", None)
    if ip is None or not getattr(ip, "do_center_crop", False):
        return (0.0, 0.0, float(w), float(h))
    size, crop = ip.size, ip.crop_size
    short = size.get("shortest_edge") if hasattr(size, "get") else None
    if not short:
        return (0.0, 0.0, float(w), float(h))
    scale = float(short) / min(w, h)
    cw, ch = min(w, crop["width"] / scale), min(h, crop["height"] / scale)
    left, top = (w - cw) / 2.0, (h - ch) / 2.0
    return (left, top, left + cw, top + ch)


def region_pixel_box(box: GridBox, grid_hw: tuple[int, int], image_wh: tuple[int, int],
                     region: tuple[float, float, float, float], min_side: int = 28) -> PixelBox:
    """``grid_box_to_pixel_box`` for a grid that covers only ``region`` of the image (a center-cropping
    processor such as LLaVA's CLIP sees the central square): cells map into the region, then shift."""
    left, top, right, bottom = region
    sub = grid_box_to_pixel_box(box, grid_hw, (max(1, round(right - left)), max(1, round(bottom - top))), min_side)
    dx, dy = int(round(left)), int(round(top))
    w, h = image_wh
    # a region larger than the image (a square-padded source) can put box edges in the padding: clip to the image,
    # then grow a side that the padding shortened back to ``min_side`` inside it
    x0, y0 = min(max(sub.left + dx, 0), w - 1), min(max(sub.top + dy, 0), h - 1)
    x1, y1 = min(max(sub.right + dx, x0 + 1), w), min(max(sub.bottom + dy, y0 + 1), h)
    x0, x1 = _grow_span(x0, x1, min_side, w)
    y0, y1 = _grow_span(y0, y1, min_side, h)
    return PixelBox(x0, y0, x1, y1)


def square_padding(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top) of an image centred on a square canvas, as LLaVA's ``expand2square`` pastes it."""
    if width < 1 or height < 1:
        raise ValueError(f"image of {width}x{height} (w x h) px is empty")
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def padded_region(image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the image's pixels of the square that ``pad_to_square`` makes of it.

    A square-padded encoder's grid covers this region (it reaches past the image on the short side), so
    ``region_pixel_box`` maps a box of its cells back onto the original image.
    """
    side, left, top = square_padding(*image_size)
    return (float(-left), float(-top), float(side - left), float(side - top))


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a ``fill``-coloured square, so a square-input encoder sees all of it.

    The released stage-1 labelling pads with grey (127, 127, 127); LLaVA-1.5 (``image_aspect_ratio: pad``)
    pads with the processor's mean colour. Square images are returned unchanged.
    """
    side, left, top = square_padding(*image.size)
    if image.width == image.height:
        return image
    canvas = Image.new(image.mode, (side, side), fill if image.mode == "RGB" else fill[0])
    canvas.paste(image, (left, top))
    return canvas


def padding_cells(image_wh: tuple[int, int], grid_side: int) -> Tensor:
    """Bool ``[grid_side, grid_side]``: True at the cells of the square-padded image whose centre is padding.

    The released labelling marks these as known background (``mask_known_bg``, reference §2.2): nothing of
    the image is there. A cell counts as padding when its centre lies outside the pasted image.
    """
    if grid_side < 1:
        raise ValueError(f"grid_side={grid_side}: expected >= 1")
    side, left, top = square_padding(*image_wh)
    centres = (torch.arange(grid_side, dtype=torch.float64) + 0.5) * side / grid_side
    outside_x = (centres < left) | (centres >= left + image_wh[0])
    outside_y = (centres < top) | (centres >= top + image_wh[1])
    return outside_y[:, None] | outside_x[None, :]
