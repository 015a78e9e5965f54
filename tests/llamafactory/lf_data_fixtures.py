"""Shared pieces of the LLaMA-Factory dataset tests (run in .venv-lf): labelling-job outputs written by hand in the
shape each job writes them (``labels/pseudo.py``, ``gate_job.py``, ``mining.py``), and the real ``qzoom lf-dataset``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from qzoom_swift.families.registry import FAMILY_NAMES, get_spec

QZOOM = Path(sys.executable).parent / "qzoom"
LF_TEMPLATES = {name: get_spec(name).llamafactory_template for name in FAMILY_NAMES}
UNIT = {"qwen2_5_vl": 28, "qwen3_vl": 32}


def picture(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A PNG with a few coloured boxes (so crops and resizes are not uniform)."""
    img = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(img)
    w, h = size
    for k in range(4):
        x, y = (seed * 37 + k * 53) % max(1, w - 20), (seed * 19 + k * 41) % max(1, h - 20)
        draw.rectangle([x, y, x + w // 5, y + h // 5], fill=((60 * k + 40 * seed) % 256, 90, (200 - 50 * k) % 256))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def chat(question: str = "<image>What colour is the box?", answer: str | None = "red") -> list[dict]:
    msgs = [{"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def write_job(root: Path, kind: str, rows: list[dict]) -> Path:
    """A finished job folder: job.json, and the file the kind's ms-swift recipe trains on."""
    root.mkdir(parents=True, exist_ok=True)
    name = {"pseudo-labels": "shard-00000.jsonl", "gate-labels": "gate_train.jsonl", "mine-hard": "post_sft.jsonl"}
    (root / name[kind]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "job.json").write_text(json.dumps({"kind": kind, "settings": {"dataset": str(root / "data.jsonl")}}))
    (root / "summary.json").write_text("{}")
    return root


def lf_dataset(job: Path, model: Path, family: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real ``qzoom lf-dataset`` command (stdout and stderr together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(QZOOM), "lf-dataset", str(job), "--model", str(model), "--template",
                           LF_TEMPLATES[family], "--out", str(out), "--no-progress", *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)


def manifest(out: Path) -> dict:
    return json.loads((out / "qzoom_lf_dataset.json").read_text())


def tokenized(out: Path):
    from datasets import load_from_disk

    return load_from_disk(str(out / "tokenized"))["train"]


def exported_rows(out: Path) -> list[dict]:
    m = manifest(out)
    return json.loads((out / f"{m['name']}.json").read_text())


def mined_rows(tmp: Path) -> list[dict]:
    """Two ``post_sft.jsonl`` rows: one whose stored grid is the Post-SFT source grid (exact cells kept), one not."""
    a = picture(tmp / "src" / "wide.png", (500, 375), 1)
    b = picture(tmp / "src" / "tall.png", (300, 420), 2)
    budget = {"min_pixels": 20 * 784, "max_pixels": 20 * 784}
    return [
        {"messages": chat(), "images": [str(a)], "chat_template_kwargs": budget,
         "qzoom_roi": {"box": [0.25, 0.2, 0.6, 0.7], "grid_box": [1, 1, 3, 3], "grid": [3, 5]}},
        {"messages": chat("Where is the box?<image>", "left"), "images": [str(b)],
         "chat_template_kwargs": {"min_pixels": 30 * 784, "max_pixels": 30 * 784},
         "qzoom_roi": {"box": [0.1, 0.15, 0.45, 0.5], "grid_box": [0, 0, 2, 2], "grid": [9, 9]}},
    ]
