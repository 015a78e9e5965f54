"""Stage-1 tri-state pseudo labels (fg = 1 / bg = 0 / ignore = -100) from a response-to-image attention map.

Pure functions on ``[h, w]`` grids of merged visual tokens (rows, cols), no model code. The rule is the
official ``create_pseudo_labels`` (reference §2.2), with the thresholds of ``QZoomConfig``:

1. sinks (a bool mask, see the two filters below) are zeroed: ``g = a * ~sink``; ``peak = max(g)``;
2. foreground = ``g > tau_fg * peak``;
3. the foreground-masked map ``g * fg`` is Gaussian-blurred (``blur_kernel``/``blur_sigma``, as the RoI
   heatmap) and boxed around every cell > 0: with a k-cell kernel that is the foreground's bounding box
   grown by ``k // 2`` cells per side, clipped to the grid;
4. inside the box, non-foreground cells are ignored (the object's fuzzy border: neither fg nor bg);
5. outside the box, ``g < tau_bg * peak`` is background (sinks there have g = 0, so they become background,
   as in the official code), the middle range is ignored;
6. the whole sample is ignored (every cell -100) when the box covers ``>= max_box_fraction`` of the grid
   (no localised evidence) or ``peak < min_peak`` (the answer hardly looked at the image), or the map has
   no finite positive value.
7. on the released grid (the image padded to a square), the padding cells are zeroed in step 1 and labelled
   background in a kept sample (``known_bg``; the released ``mask_known_bg``).

Sink filters (tokens that soak up attention whatever the question, e.g. massive-activation tokens):

- :func:`sink_mask_from_heads` — the official test: the attention that dedicated *sink heads* pay to a
  token (averaged like the grounding map) is ``>= sink_threshold`` (default 1e-2; LLaVA-1.5-7B used 1e-3).
- :func:`sink_mask_from_norms` — the paper's test on the visual hidden states. The paper gives no value,
  so we define it relative to the image itself: a visual token is a sink when the L2 norm of its hidden
  state (the input of the attention layer the map is read from) exceeds ``tau_norm`` times the median
  norm over that image's visual tokens (default 5). Massive-activation sinks are one to three orders of
  magnitude above the median, ordinary tokens within a small factor of it, so the test needs no
  per-model calibration and is invariant to the overall scale of the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from qzoom_swift.roi import GridBox, mask_bounding_box

FG, BG, IGNORE = 1, 0, -100

DEFAULT_SINK_THRESHOLD = 1e-2
"""Official sink-head threshold (``roi_sink_threshold``)."""
DEFAULT_TAU_NORM = 5.0
"""Norm-sink test: hidden-state L2 norm > tau_norm x the image's median visual-token norm."""

STATUS_OK = "ok"
STATUS_BIG_BOX = "ignored_box"
STATUS_WEAK_PEAK = "ignored_peak"
STATUS_EMPTY = "ignored_empty"
IGNORED_STATUSES = (STATUS_BIG_BOX, STATUS_WEAK_PEAK, STATUS_EMPTY)


@dataclass(frozen=True)
class TriStateLabels:
    """Result of :func:`tristate_labels`."""

    labels: Tensor
    """long ``[h, w]`` of 1 / 0 / -100 (all -100 when the sample is ignored)."""
    status: str
    """``ok`` or why the sample is ignored (``ignored_box``, ``ignored_peak``, ``ignored_empty``)."""
    box: GridBox | None
    """The ignore box around the (blurred) foreground; None when nothing is foreground."""
    peak: float
    """Max of the sink-free map."""

    @property
    def ignored(self) -> bool:
        return self.status != STATUS_OK

    @property
    def num_fg(self) -> int:
        return int((self.labels == FG).sum())

    @property
    def num_bg(self) -> int:
        return int((self.labels == BG).sum())

    def as_list(self) -> list[list[int]] | None:
        """The label map as nested lists (the ``qzoom_rpn_labels`` column), None for an ignored sample."""
        return None if self.ignored else self.labels.tolist()


def _check_map(name: str, value: Tensor) -> None:
    if value.ndim != 2 or value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty [h, w] map, got shape {tuple(value.shape)}")


def blur_map(values: Tensor, kernel: int = 3, sigma: float = 1.0) -> Tensor:
    """Gaussian blur of an ``[h, w]`` map (torchvision, reflect padding; kernel clamped on short axes)."""
    _check_map("blur_map", values)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel={kernel}: expected a positive odd integer")
    if not sigma > 0:
        raise ValueError(f"blur sigma={sigma}: expected a positive number")
    h, w = values.shape
    kx, ky = min(kernel, 2 * w - 1), min(kernel, 2 * h - 1)
    if kx == 1 and ky == 1:
        return values.clone()
    return gaussian_blur(values[None].float(), [kx, ky], [float(sigma), float(sigma)])[0]


def tristate_labels(attn: Tensor, sink_mask: Tensor | None = None, *, tau_fg: float = 0.25, tau_bg: float = 0.05,
                    max_box_fraction: float = 0.5, min_peak: float = 5e-3, blur_kernel: int = 3,
                    blur_sigma: float = 1.0, known_bg: Tensor | None = None) -> TriStateLabels:
    """Tri-state labels of one image from its attention map (see the module docstring for the rule).

    ``attn`` is a float ``[h, w]`` map on the merged-token grid; ``sink_mask`` a bool ``[h, w]`` map (True =
    sink) or None. ``known_bg`` (bool ``[h, w]``): cells known to hold nothing, the square padding of the
    released grid (``mask_known_bg``, reference §2.2): zeroed like sinks, then labelled background in a kept
    sample wherever they are. Thresholds default to ``QZoomConfig``'s; pass ``**label_kwargs(config)``.
    """
    _check_map("attention map", attn)
    if not (0.0 <= tau_bg <= tau_fg <= 1.0):
        raise ValueError(f"need 0 <= tau_bg <= tau_fg <= 1, got tau_bg={tau_bg}, tau_fg={tau_fg}")
    if not (0.0 < max_box_fraction <= 1.0):
        raise ValueError(f"max_box_fraction={max_box_fraction}: expected a number in (0, 1]")
    g = attn.detach().to(torch.float32).cpu().clone()
    if sink_mask is not None:
        if tuple(sink_mask.shape) != tuple(g.shape):
            raise ValueError(f"sink mask shape {tuple(sink_mask.shape)} != attention map shape {tuple(g.shape)}")
        g[sink_mask.to(torch.bool).cpu()] = 0.0
    if known_bg is not None:
        if tuple(known_bg.shape) != tuple(g.shape):
            raise ValueError(f"known_bg shape {tuple(known_bg.shape)} != attention map shape {tuple(g.shape)}")
        known_bg = known_bg.to(torch.bool).cpu()
        g[known_bg] = 0.0
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    h, w = g.shape
    ignored = torch.full((h, w), IGNORE, dtype=torch.long)
    peak = float(g.max())
    if not peak > 0.0:
        return TriStateLabels(ignored, STATUS_EMPTY, None, peak)
    fg = g > tau_fg * peak
    box = mask_bounding_box(blur_map(g * fg, blur_kernel, blur_sigma) > 0)
    if box is None:  # cannot happen for peak > 0 (the peak is foreground); kept for safety
        return TriStateLabels(ignored, STATUS_EMPTY, None, peak)
    if peak < min_peak:
        return TriStateLabels(ignored, STATUS_WEAK_PEAK, box, peak)
    if box.area >= max_box_fraction * h * w:
        return TriStateLabels(ignored, STATUS_BIG_BOX, box, peak)
    labels = ignored.clone()
    in_box = torch.zeros((h, w), dtype=torch.bool)
    in_box[box.y0:box.y1, box.x0:box.x1] = True
    labels[~in_box & (g < tau_bg * peak)] = BG
    labels[fg] = FG
    if known_bg is not None:
        labels[known_bg] = BG
    return TriStateLabels(labels, STATUS_OK, box, peak)


def label_kwargs(config) -> dict:
    """The keyword arguments of :func:`tristate_labels` taken from a ``QZoomConfig`` (its ``labelling`` and blur)."""
    t = config.labelling
    return dict(tau_fg=t.tau_fg, tau_bg=t.tau_bg, max_box_fraction=t.max_box_fraction, min_peak=t.min_peak,
                blur_kernel=config.blur_kernel, blur_sigma=config.blur_sigma)


def sink_mask_from_heads(sink_attn: Tensor | None, threshold: float = DEFAULT_SINK_THRESHOLD,
                         shape: tuple[int, int] | None = None) -> Tensor:
    """Official sink test: True where the sink heads' attention is ``>= threshold``.

    ``sink_attn`` None (a model/mode without sink heads) means no sinks; then ``shape`` gives the grid.
    """
    if sink_attn is None:
        if shape is None:
            raise ValueError("sink_mask_from_heads: give the grid shape when there is no sink-head map")
        return torch.zeros(shape, dtype=torch.bool)
    _check_map("sink-head map", sink_attn)
    if not threshold > 0:
        raise ValueError(f"sink threshold={threshold}: expected a positive number")
    return torch.nan_to_num(sink_attn.detach().float().cpu(), nan=0.0) >= threshold


def sink_mask_from_norms(norms: Tensor, tau_norm: float = DEFAULT_TAU_NORM) -> Tensor:
    """Paper's sink test: True where a visual token's hidden-state L2 norm is ``> tau_norm * median`` norm.

    ``norms`` is the ``[h, w]`` map of one image's visual-token norms. The median (lower median for an even
    count, as ``torch.median``) is taken over that image, so the test is scale-free; with ``tau_norm >= 1``
    at most half the tokens can be sinks.
    """
    _check_map("norm map", norms)
    if not tau_norm > 0:
        raise ValueError(f"tau_norm={tau_norm}: expected a positive number")
    n = norms.detach().float().cpu()
    median = torch.median(n)
    return n > tau_norm * median


SINK_FILTERS = ("heads", "norm", "both", "none")


def combine_sink_masks(method: str, shape: tuple[int, int], *, sink_attn: Tensor | None = None,
                       norms: Tensor | None = None, sink_threshold: float = DEFAULT_SINK_THRESHOLD,
                       tau_norm: float = DEFAULT_TAU_NORM) -> Tensor:
    """The sink mask selected by ``method``: ``heads``, ``norm``, ``both`` (union) or ``none``."""
    if method not in SINK_FILTERS:
        raise ValueError(f"sink filter {method!r}: choose from {', '.join(SINK_FILTERS)}")
    mask = torch.zeros(shape, dtype=torch.bool)
    if method in ("heads", "both"):
        mask |= sink_mask_from_heads(sink_attn, sink_threshold, shape)
    if method in ("norm", "both"):
        if norms is None:
            raise ValueError(f"sink filter {method!r} needs the visual hidden-state norms")
        mask |= sink_mask_from_norms(norms, tau_norm)
    return mask


__all__ = [
    "BG", "DEFAULT_SINK_THRESHOLD", "DEFAULT_TAU_NORM", "FG", "IGNORE", "IGNORED_STATUSES", "SINK_FILTERS",
    "STATUS_BIG_BOX", "STATUS_EMPTY", "STATUS_OK", "STATUS_WEAK_PEAK", "TriStateLabels", "blur_map",
    "combine_sink_masks", "label_kwargs", "sink_mask_from_heads", "sink_mask_from_norms", "tristate_labels",
]
