"""Zoom-bench splits on disk: PNGs, ms-swift jsonl questions and ground truth, deterministic by seed.

``write_bench(root, sizes, seed)`` writes, per split (``train``, ``val``, ``test``)::

    <root>/<split>/images/00000.png ...
    <root>/<split>/questions.jsonl   ms-swift rows: {"messages": [user "<image>Q", assistant A], "images": [png]}
    <root>/<split>/gt.jsonl          one line per question row (same order): id, kind, answer, boxes
    <root>/bench.json                spec, seed, sizes, counts (written last: its presence means "complete")

``train`` asks both questions of every image (labelling jobs and the toy model use both); ``val`` and
``test`` ask one question per image, alternating fine / coarse, so the two kinds are independent samples.
Extra ground truth lives in ``gt.jsonl`` rather than in the rows, so the rows stay plain ms-swift data that
every ``swift`` and ``qzoom`` command reads unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.bench.render import DEFAULT_SPEC, KINDS, BenchSpec, question_for, render_scene
from qzoom_swift.fileio import atomic_path, write_json_atomic, write_jsonl_atomic

SPLITS = ("train", "val", "test")
BENCH_FILE = "bench.json"
BENCH_VERSION = 1


@dataclass(frozen=True)
class BenchRecord:
    """One question of a split, as written to ``questions.jsonl`` + ``gt.jsonl``."""

    id: str
    image: str
    kind: str
    question: str
    answer: str
    box: tuple[int, int, int, int]
    """What the question is about, in canvas pixels: the digit's box (fine) or the big shape's (coarse)."""
    target_box: tuple[int, int, int, int]
    canvas: int

    def row(self) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": f"<image>{self.question}"},
                             {"role": "assistant", "content": self.answer}], "images": [self.image]}

    def gt(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image, "kind": self.kind, "question": self.question,
                "answer": self.answer, "box": list(self.box), "target_box": list(self.target_box),
                "canvas": self.canvas}

    @classmethod
    def from_gt(cls, gt: dict[str, Any]) -> BenchRecord:
        return cls(gt["id"], gt["image"], gt["kind"], gt["question"], gt["answer"], tuple(gt["box"]),
                   tuple(gt["target_box"]), int(gt["canvas"]))


def split_seed(seed: int, split: str) -> int:
    return seed * 1000 + SPLITS.index(split) + 1


def write_split(out: Path, split: str, n_images: int, spec: BenchSpec, seed: int,
                progress: bool = False) -> list[BenchRecord]:
    """Render ``n_images`` scenes of ``split`` into ``out`` and write its jsonl files; returns the records."""
    from tqdm import tqdm

    rng = random.Random(split_seed(seed, split))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records: list[BenchRecord] = []
    for i in tqdm(range(n_images), desc=f"bench {split}", disable=not progress, unit="img"):
        img, scene = render_scene(rng, spec)
        path = images / f"{i:05d}.png"
        img.save(path, format="PNG")
        kinds = KINDS if split == "train" else (KINDS[i % 2],)
        for kind in kinds:
            records.append(BenchRecord(f"{split}-{i:05d}-{kind}", str(path.resolve()), kind, question_for(kind),
                                       scene.answer(kind), scene.gt_box(kind), scene.target_box, spec.canvas))
    write_jsonl_atomic(out / "gt.jsonl", [r.gt() for r in records])
    write_jsonl_atomic(out / "questions.jsonl", [r.row() for r in records])
    return records


def write_bench(root: str | Path, sizes: dict[str, int], *, seed: int = 0, spec: BenchSpec = DEFAULT_SPEC,
                progress: bool = False) -> Path:
    """Write every split of ``sizes`` (images per split) under ``root``; reuse a complete identical bench.

    Returns the path of ``bench.json``. A bench with other settings, or one left half-written, is replaced.
    """
    root = Path(root).resolve()
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown bench splits {sorted(unknown)}; expected {SPLITS}")
    meta = {"version": BENCH_VERSION, "seed": seed, "sizes": {s: int(sizes[s]) for s in SPLITS if s in sizes},
            "spec": spec.to_dict()}
    meta = json.loads(json.dumps(meta))  # as it reads back (tuples become lists)
    marker = root / BENCH_FILE
    if marker.is_file():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in meta} == meta:
            return marker
    marker.unlink(missing_ok=True)
    counts = {}
    for split, n in meta["sizes"].items():
        shutil.rmtree(root / split, ignore_errors=True)
        records = write_split(root / split, split, n, spec, seed, progress)
        counts[split] = {kind: sum(r.kind == kind for r in records) for kind in KINDS}
    write_json_atomic(marker, {**meta, "questions": counts})  # last: its presence means every split is complete
    return marker


def read_split(root: str | Path, split: str) -> list[BenchRecord]:
    path = Path(root) / split / "gt.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write the bench first (qzoom demo writes it)")
    return [BenchRecord.from_gt(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def questions_path(root: str | Path, split: str) -> Path:
    return Path(root).resolve() / split / "questions.jsonl"


EVALSCOPE_NAME = "qzoom_bench"


def write_evalscope_split(root: str | Path, split: str = "test") -> Path:
    """The split as a local evalscope dataset in Hugging Face layout, for ``qzoom eval --benchmarks qzoom_bench``.

    Writes ``<root>/evalscope/qzoom_bench/data/<split>-00000-of-00001.parquet`` (columns: question, answers,
    image (HF Image, the PNG bytes), kind, box, question_id) and returns the data root to pass as
    ``--data-root`` (``<root>/evalscope``). Rewritten only when missing.
    """
    import datasets

    out = Path(root) / "evalscope"
    path = out / EVALSCOPE_NAME / "data" / f"{split}-00000-of-00001.parquet"
    if path.is_file():
        return out
    rows = [{"question_id": r.id, "question": r.question, "answers": [r.answer], "kind": r.kind,
             "box": list(r.box), "image": {"bytes": Path(r.image).read_bytes(), "path": None}}
            for r in read_split(root, split)]
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")),
                                  "kind": datasets.Value("string"), "box": datasets.Sequence(datasets.Value("int64")),
                                  "image": datasets.Image()})
    with atomic_path(path) as tmp:
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp))
    return out
