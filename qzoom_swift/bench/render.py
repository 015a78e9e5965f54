"""Zoom-bench scenes: PIL-rendered images with a ground-truth box, and the two kinds of question they carry.

A scene is a light canvas with grey clutter, one big coloured shape and one small digit inside a white
box with a red outline. The *coarse* question (the big shape's colour) is answerable at any resolution;
the *fine* one (the digit) only when the digit is seen near its native scale. With the defaults (448 px
canvas, 16 px font) the digit is legible at 256 visual tokens and a 2-3 px smudge at 16, while a 112 px
crop around it re-encoded at 16 tokens shows it at native scale.

The target box snaps to the ``cell`` grid (28 px, Qwen2.5-VL's merged-token side) at a fixed phase: a
tiny from-scratch vision tower learns to read glyphs at one or two patch phases within CPU minutes, not
at all 196 (``shared/reference/toy-bench-probe.md``). ``free_placement`` and ``distractors`` make the
harder variants.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BENCH_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 170),
    "black": (20, 20, 20),
}
"""Colours of the big shape. Red is left out: it marks the target box."""
SHAPE_KINDS = ("square", "disc", "triangle")
FINE_QUESTION = "What digit is in the red box?"
COARSE_QUESTION = "What is the color of the large shape?"
KINDS = ("fine", "coarse")
TARGET_RED = (220, 20, 20)


@dataclass(frozen=True)
class BenchSpec:
    """How scenes are drawn. Defaults are the miniature the toy model is trained for."""

    canvas: int = 448
    """Side of the square canvas in pixels (the high-resolution view is the canvas at native scale)."""
    cell: int = 28
    """Grid the target box snaps to (unless ``free_placement``): the merged visual token's side."""
    font_size: int = 16
    """Digit font size; 16 gives a glyph of about 9x11 px."""
    box_size: tuple[int, int] = (18, 20)
    """Target box (width, height) in pixels, including its 2 px red outline."""
    box_offset: tuple[int, int] = (4, 5)
    """Range of the box's offset inside its grid cell (same on both axes)."""
    clutter: tuple[int, int] = (8, 16)
    """Number of grey clutter items (rectangles, dots, lines), inclusive range."""
    shape_size: tuple[int, int] = (110, 190)
    """Side of the big shape, inclusive range."""
    free_placement: bool = False
    """Harder variant: the box may sit at any pixel offset, not just on the grid."""
    distractors: int = 0
    """Harder variant: extra digits in grey-outlined boxes that the fine question does not ask about."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_canvas(cls, canvas: int, **fields: Any) -> BenchSpec:
        """The default scene on a ``canvas`` px side: the big shape scaled with the side and the clutter with the
        area, so a larger canvas is the same scene seen at a higher resolution, not an emptier one. The digit,
        its box and the grid keep their pixel sizes: they are what must be read at native scale."""
        base = cls()
        scale = canvas / base.canvas
        return cls(canvas=canvas, shape_size=tuple(round(v * scale) for v in base.shape_size),
                   clutter=tuple(round(v * scale * scale) for v in base.clutter), **fields)


DEFAULT_SPEC = BenchSpec()


@dataclass(frozen=True)
class Scene:
    """One rendered scene's ground truth (pixels of the canvas; boxes are (x0, y0, x1, y1), exclusive)."""

    digit: int
    colour: str
    shape: str
    target_box: tuple[int, int, int, int]
    shape_box: tuple[int, int, int, int]
    distractors: tuple[tuple[tuple[int, int, int, int], int], ...] = ()
    """(box, digit) of each grey-outlined distractor (``BenchSpec.distractors``); not written to ``gt.jsonl``."""

    def answer(self, kind: str) -> str:
        return str(self.digit) if kind == "fine" else self.colour

    def gt_box(self, kind: str) -> tuple[int, int, int, int]:
        """What a question is about: the digit's box (fine) or the big shape's box (coarse)."""
        return self.target_box if kind == "fine" else self.shape_box


def question_for(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"question kind {kind!r}; expected one of {KINDS}")
    return FINE_QUESTION if kind == "fine" else COARSE_QUESTION


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place_box(rng: random.Random, spec: BenchSpec, avoid: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    w, h = spec.box_size
    for _ in range(1000):
        if spec.free_placement:
            x0, y0 = rng.randint(0, spec.canvas - w), rng.randint(0, spec.canvas - h)
        else:
            cells = spec.canvas // spec.cell
            off = rng.randint(*spec.box_offset)
            x0 = rng.randrange(cells) * spec.cell + off
            y0 = rng.randrange(cells) * spec.cell + off
            if x0 + w > spec.canvas or y0 + h > spec.canvas:
                continue
        box = (x0, y0, x0 + w, y0 + h)
        if not any(_overlaps(box, other, margin=4) for other in avoid):
            return box
    raise RuntimeError(f"no free place for a {w}x{h} box on a {spec.canvas} px canvas; lower shape_size")


def _draw_digit_box(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], digit: int, outline: tuple,
                    font) -> None:
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255), outline=outline, width=2)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    draw.text((cx, cy), str(digit), fill=(0, 0, 0), font=font, anchor="mm")


def render_scene(rng: random.Random, spec: BenchSpec = DEFAULT_SPEC) -> tuple[Image.Image, Scene]:
    """Draw one scene from ``rng`` (all randomness comes from it, so a seed fixes the image)."""
    if spec.canvas % spec.cell:
        raise ValueError(f"canvas {spec.canvas} px is not a multiple of the cell {spec.cell} px")
    size = spec.canvas
    background = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(*spec.clutter)):
        grey = rng.randint(110, 190)
        kind = rng.randrange(3)
        x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
        if kind == 0:
            w, h = rng.randint(6, 30), rng.randint(6, 30)
            draw.rectangle((x, y, x + w, y + h), outline=(grey,) * 3, width=1)
        elif kind == 1:
            r = rng.randint(2, 5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey,) * 3)
        else:
            draw.line((x, y, x + rng.randint(-40, 40), y + rng.randint(-40, 40)), fill=(grey,) * 3, width=1)
    side = rng.randint(*spec.shape_size)
    sx, sy = rng.randint(0, size - side), rng.randint(0, size - side)
    shape_box = (sx, sy, sx + side, sy + side)
    colour = rng.choice(list(BENCH_COLOURS))
    shape = rng.choice(SHAPE_KINDS)
    fill = BENCH_COLOURS[colour]
    if shape == "square":
        draw.rectangle((sx, sy, sx + side - 1, sy + side - 1), fill=fill)
    elif shape == "disc":
        draw.ellipse((sx, sy, sx + side - 1, sy + side - 1), fill=fill)
    else:
        draw.polygon([(sx + side // 2, sy), (sx, sy + side - 1), (sx + side - 1, sy + side - 1)], fill=fill)
    font = ImageFont.load_default(size=spec.font_size)
    taken = [shape_box]
    target_box = _place_box(rng, spec, taken)
    taken.append(target_box)
    digit = rng.randrange(10)
    distractors = []
    for _ in range(spec.distractors):
        other = _place_box(rng, spec, taken)
        taken.append(other)
        distractors.append((other, rng.randrange(10)))
        _draw_digit_box(draw, other, distractors[-1][1], (120, 120, 120), font)
    _draw_digit_box(draw, target_box, digit, TARGET_RED, font)
    return img, Scene(digit, colour, shape, target_box, shape_box, tuple(distractors))


def token_cell(box: tuple[int, int, int, int], canvas: int, grid: int) -> tuple[int, int]:
    """(column, row) of the ``grid x grid`` token grid over the canvas that holds ``box``'s centre."""
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return min(cx * grid // canvas, grid - 1), min(cy * grid // canvas, grid - 1)


def aligned_crop_around(box: tuple[int, int, int, int], side: int, canvas: int, rng: random.Random,
                        unit: int = 28) -> tuple[int, int, int, int]:
    """A ``side``-px square crop on the ``unit`` grid that contains ``box`` (random position among those).

    Crops on the token grid keep the digit at the phase the vision tower reads; ``side`` must be a multiple
    of ``unit`` and at least the box's extent rounded out to the grid.
    """
    if side % unit or side > canvas:
        raise ValueError(f"crop side {side} must be a multiple of {unit} and at most the canvas {canvas}")
    lo_x = max(0, -(-box[2] // unit) * unit - side)
    hi_x = min(box[0] // unit * unit, canvas - side)
    lo_y = max(0, -(-box[3] // unit) * unit - side)
    hi_y = min(box[1] // unit * unit, canvas - side)
    if lo_x > hi_x or lo_y > hi_y:
        raise ValueError(f"no {side} px crop on the {unit} px grid contains {box}")
    x0 = unit * rng.randint(-(-lo_x // unit), hi_x // unit)
    y0 = unit * rng.randint(-(-lo_y // unit), hi_y // unit)
    return x0, y0, x0 + side, y0 + side
