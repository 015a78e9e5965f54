"""Small synthetic image-question datasets in ms-swift's jsonl format, built offline and deterministically.

Each row is ``{"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
{"role": "assistant", "content": "red"}], "images": ["/abs/path/img0.png"]}``: one coloured shape (rectangle
or ellipse) on a light background, the answer being its colour name. ``swift sft --dataset`` and
``swift infer --val_dataset`` read the file as is; the demo and tests use the images directly too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from qzoom_swift.fileio import write_jsonl_atomic

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("rectangle", "ellipse")
QUESTION = "What colour is the shape?"


@dataclass(frozen=True)
class ShapeSample:
    """One synthetic image: a single shape of ``colour`` inside ``box`` (x0, y0, x1, y1, pixels)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]


def make_shape_image(sample: ShapeSample, size: tuple[int, int] = (392, 280)):
    """Draw ``sample`` on a light grey canvas of ``size`` (width, height) and return a PIL RGB image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(img)
    fill = COLOURS[sample.colour]
    if sample.shape == "rectangle":
        draw.rectangle(sample.box, fill=fill)
    else:
        draw.ellipse(sample.box, fill=fill)
    return img


def sample_shapes(n: int, size: tuple[int, int] = (392, 280), seed: int = 0) -> list[ShapeSample]:
    """``n`` deterministic samples (colours cycle, so the first ``len(COLOURS)`` are all different)."""
    rng = random.Random(seed)
    width, height = size
    names = list(COLOURS)
    out = []
    for i in range(n):
        w = rng.randint(width // 6, width // 3)
        h = rng.randint(height // 6, height // 3)
        x0 = rng.randint(0, width - w - 1)
        y0 = rng.randint(0, height - h - 1)
        out.append(ShapeSample(names[(i + seed) % len(names)], SHAPES[rng.randrange(len(SHAPES))],
                               (x0, y0, x0 + w, y0 + h)))
    return out


def write_shape_dataset(out_dir: str | Path, n: int = 4, *, size: tuple[int, int] = (392, 280), seed: int = 0,
                        name: str = "data.jsonl") -> Path:
    """Write ``n`` PNG images and an ms-swift jsonl under ``out_dir``; return the jsonl path.

    Image paths in the jsonl are absolute, so the file can be passed to ``swift`` from any working directory.
    Same ``seed`` and ``size`` give byte-identical files.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(sample_shapes(n, size, seed)):
        png = out / f"img{i}.png"
        make_shape_image(sample, size).save(png, format="PNG")
        rows.append({"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                  {"role": "assistant", "content": sample.colour}],
                     "images": [str(png)]})
    jsonl = out / name
    write_jsonl_atomic(jsonl, rows)
    return jsonl


def rectangles_image(size: tuple[int, int] = (640, 480), seed: int = 0):
    """Six seeded coloured rectangles on grey: an image whose every region differs, for parity tests of crops."""
    import torch
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(img)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        x0 = int(torch.randint(0, size[0] - 60, (1,), generator=g))
        y0 = int(torch.randint(0, size[1] - 60, (1,), generator=g))
        draw.rectangle((x0, y0, x0 + 50, y0 + 40), fill=tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g)))
    return img
