"""Tiny local copies of the ``qzoom eval`` benchmarks, in the Hugging Face layout evalscope reads offline.

``write_eval_datasets(root, names, n)`` writes ``root/<benchmark>/`` for each benchmark with the same files,
configs and columns as the hub dataset that ``qzoom_swift.eval.suite.BENCHMARKS`` names (README ``configs:``
where evalscope passes a config name, the hub's file names, HF ``Image`` columns or base64 strings), filled
with ``n`` synthetic shape images whose answer is the shape's colour. Deterministic per seed.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.synthetic.images import COLOURS, QUESTION, ShapeSample, make_shape_image, sample_shapes

LETTERS = "ABCDE"


@dataclass(frozen=True)
class CorruptShape(ShapeSample):
    """A sample whose stored image is cut in half (PIL: "image file is truncated"), as a bad download is."""


@dataclass(frozen=True)
class LargeShape(ShapeSample):
    """A sample whose image is drawn at ``pixels`` (width, height) instead of the benchmark's size."""

    pixels: tuple[int, int] = (0, 0)


def _encoded(sample, size, fmt: str, **kwargs: Any) -> bytes:
    corrupt = isinstance(sample, CorruptShape)
    if isinstance(sample, LargeShape):
        sx, sy = sample.pixels[0] / size[0], sample.pixels[1] / size[1]
        x0, y0, x1, y1 = sample.box
        sample, size = ShapeSample(sample.colour, sample.shape, (int(x0 * sx), int(y0 * sy), int(x1 * sx),
                                                                 int(y1 * sy))), sample.pixels
    buf = io.BytesIO()
    make_shape_image(sample, size).save(buf, format=fmt, **kwargs)
    data = buf.getvalue()
    return data[: len(data) // 2] if corrupt else data


def _png(sample, size) -> bytes:
    return _encoded(sample, size, "PNG")


def _jpeg(sample, size) -> bytes:
    return _encoded(sample, size, "JPEG", quality=90)


def _options(answer: str, k: int, i: int) -> tuple[list[str], str]:
    """``k`` colour options containing ``answer`` at position ``i % k``; returns (options, letter)."""
    others = [c for c in COLOURS if c != answer][: k - 1]
    pos = i % k
    opts = others[:pos] + [answer] + others[pos:]
    return opts, LETTERS[pos]


def _write_parquet(rows: list[dict[str, Any]], path: Path, image_column: str | None) -> None:
    import datasets

    features = None
    if image_column is not None:
        probe = datasets.Dataset.from_list(rows[:1])
        feats = dict(probe.features)
        feats[image_column] = datasets.Image()
        features = datasets.Features(feats)
    ds = datasets.Dataset.from_list(rows, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def _readme(configs: list[tuple[str, str, str]]) -> str:
    """A dataset card with ``configs:`` (config name, split, data file glob), as on the hub."""
    lines = ["---", "configs:"]
    for name, split, glob in configs:
        lines += [f"- config_name: {name}", "  data_files:", f"  - split: {split}", f"    path: {glob}"]
    return "\n".join(lines + ["---", "", "Tiny synthetic copy written by qzoom_swift.testing.eval_data.", ""])


def _img(b: bytes) -> dict[str, Any]:
    return {"bytes": b, "path": None}


def _docvqa(folder: Path, shapes, size) -> None:
    rows = [{"questionId": str(i), "question": QUESTION, "question_types": ["figure/diagram"], "image": _img(_png(s, size)),
             "docId": i, "ucsf_document_id": f"doc{i}", "ucsf_document_page_no": "1", "answers": [s.colour]}
            for i, s in enumerate(shapes)]
    _write_parquet(rows, folder / "DocVQA" / "validation-00000-of-00001.parquet", "image")
    (folder / "README.md").write_text(_readme([("DocVQA", "validation", "DocVQA/validation-*")]))


def _infovqa(folder: Path, shapes, size) -> None:
    rows = [{"questionId": str(i), "question": QUESTION, "answers": [s.colour], "answer_type": ["single span"],
             "image": _img(_png(s, size)), "image_url": f"img{i}.png", "operation/reasoning": [], "ocr": "[]",
             "data_split": "val"} for i, s in enumerate(shapes)]
    _write_parquet(rows, folder / "InfographicVQA" / "validation-00000-of-00001.parquet", "image")
    (folder / "README.md").write_text(_readme([("InfographicVQA", "validation", "InfographicVQA/validation-*")]))


def _chartqa(folder: Path, shapes, size) -> None:
    rows = [{"type": ("human_test", "augmented_test")[i % 2], "question": QUESTION, "answer": s.colour,
             "image": _img(_png(s, size))} for i, s in enumerate(shapes)]
    _write_parquet(rows, folder / "data" / "test-00000-of-00001.parquet", "image")


def _ocr_bench(folder: Path, shapes, size) -> None:
    rows = [{"dataset": "IIIT5K", "question": QUESTION, "question_type": "Regular Text Recognition",
             "answer": [s.colour], "image": _img(_jpeg(s, size))} for s in shapes]
    _write_parquet(rows, folder / "data" / "test-00000-of-00001.parquet", "image")


def _textvqa(folder: Path, shapes, size) -> None:
    rows = [{"image_id": f"img{i}", "question_id": i, "question": QUESTION, "question_tokens": QUESTION.split(),
             "image": _img(_jpeg(s, size)), "image_width": size[0], "image_height": size[1],
             "answers": [s.colour] * 10, "ocr_tokens": [], "set_name": "val"} for i, s in enumerate(shapes)]
    _write_parquet(rows, folder / "data" / "validation-00000-of-00001.parquet", "image")


def _mm_star(folder: Path, shapes, size) -> None:
    rows = []
    for i, s in enumerate(shapes):
        opts, letter = _options(s.colour, 4, i)
        question = QUESTION + "\nOptions: " + ", ".join(f"{LETTERS[j]}: {o}" for j, o in enumerate(opts))
        rows.append({"index": i, "question": question, "image": _img(_jpeg(s, size)), "answer": letter,
                     "category": "coarse perception", "l2_category": "image scene and topic",
                     "meta_info": {"source": "synthetic", "split": "val", "image_path": f"img{i}.jpg"}})
    _write_parquet(rows, folder / "mmstar.parquet", "image")
    (folder / "README.md").write_text(_readme([("val", "val", "mmstar.parquet")]))


def _vstar_bench(folder: Path, shapes, size) -> None:
    rows = []
    for i, s in enumerate(shapes):
        opts, letter = _options(s.colour, 4, i)
        text = QUESTION + "\n" + "\n".join(f"({LETTERS[j]}) {o}" for j, o in enumerate(opts))
        rows.append({"image": _img(_jpeg(s, size)), "text": text, "label": letter, "category": "color",
                     "question_id": f"sa_{i}"})
    _write_parquet(rows, folder / "data" / "test-00000-of-00001.parquet", "image")


def _hr_bench(tag: str) -> Callable[[Path, Any, Any], None]:
    def write(folder: Path, shapes, size) -> None:
        rows = []
        for i, s in enumerate(shapes):
            opts, letter = _options(s.colour, 4, i)
            rows.append({"index": i, "question": QUESTION, "answer": letter,
                         "category": ("single", "cross")[i % 2], "cycle_category": i,
                         **{LETTERS[j]: o for j, o in enumerate(opts)},
                         "image": base64.b64encode(_jpeg(s, size)).decode("ascii")})
        # As the hub snapshot: the file is named after the benchmark (read by name, not as a split).
        _write_parquet(rows, folder / f"hr_bench_{tag}.parquet", None)
    return write


def _mme_realworld_lite(folder: Path, shapes, size) -> None:
    rows = []
    for i, s in enumerate(shapes):
        opts, letter = _options(s.colour, 5, i)
        rows.append({"index": i, "question_id": f"perception/{i}", "question": QUESTION,
                     "multi-choice options": [f"({LETTERS[j]}) {o}" for j, o in enumerate(opts)],
                     "answer": letter, "category": "Perception", "l2-category": "Monitoring",
                     "bytes": base64.b64encode(_jpeg(s, size)).decode("ascii")})
    _write_parquet(rows, folder / "data" / "train-00000-of-00001.parquet", None)


WRITERS: dict[str, Callable[[Path, Any, Any], None]] = {
    "docvqa": _docvqa, "infovqa": _infovqa, "chartqa": _chartqa, "ocr_bench": _ocr_bench, "textvqa": _textvqa,
    "mm_star": _mm_star, "vstar_bench": _vstar_bench, "hr_bench_4k": _hr_bench("4k"),
    "hr_bench_8k": _hr_bench("8k"), "mme_realworld_lite": _mme_realworld_lite,
}
HIGH_RES = {"vstar_bench", "hr_bench_4k", "hr_bench_8k", "mme_realworld_lite"}


def write_eval_datasets(root: str | Path, names: Iterable[str] = tuple(WRITERS), n: int = 2, *, seed: int = 0,
                        size: tuple[int, int] = (336, 224), hr_size: tuple[int, int] = (672, 448),
                        corrupt: Iterable[int] = (), large: Mapping[int, tuple[int, int]] | None = None,
                        ) -> dict[str, Path]:
    """Write tiny copies of ``names`` under ``root`` (one folder each); returns ``{name: folder}``.

    ``corrupt``: sample indices whose stored image is truncated (unreadable); ``large``: index -> (width,
    height) of a sample drawn far larger than the others (a memory-pressure probe).
    """
    corrupt, large = set(corrupt), dict(large or {})
    root = Path(root)
    out = {}
    for name in names:
        if name not in WRITERS:
            raise ValueError(f"no tiny writer for benchmark {name!r}; known: {', '.join(WRITERS)}")
        sz = hr_size if name in HIGH_RES else size
        shapes = [CorruptShape(*astuple(s)) if i in corrupt else LargeShape(*astuple(s), pixels=large[i]) if i in large
                  else s for i, s in enumerate(sample_shapes(n, sz, seed))]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        WRITERS[name](folder, shapes, sz)
        (folder / "qzoom_tiny.json").write_text(json.dumps({"benchmark": name, "n": n, "seed": seed}) + "\n")
        out[name] = folder
    return out
