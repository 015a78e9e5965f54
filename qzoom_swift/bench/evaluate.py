"""Zoom-bench evaluation: every run answers every test question; accuracy, cost and localisation with GT.

A *run* is one way of answering: the base model alone at a visual-token budget (``mode=never`` at that
budget: the same split prefill and decoding code as Q-Zoom, no branch output used), or Q-Zoom at the low
budget (``zoom``, gated) and its ``always`` ablation. Answers are written to ``answers.jsonl`` as they come
(one line per run and question, flushed), so an interrupted evaluation resumes where it stopped. Runs are
interleaved per question, in rotating order, so machine load hits every run alike.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.bench.dataset import BenchRecord
from qzoom_swift.bench.render import token_cell


@dataclass(frozen=True)
class EvalRun:
    name: str
    mode: str
    """never (the base model at ``tokens``), zoom (gated Q-Zoom), always (Q-Zoom, every sample zoomed)."""
    tokens: int
    """Visual-token budget of the first (or only) pass."""
    roi_fallback: str = "none"
    """``QZoomConfig.roi_fallback`` of a zooming run (none: no cell above tau_roi answers from the low pass)."""
    roi_max_tokens: int | None = None
    """``QZoomConfig.roi_max_tokens`` of a zooming run (None: the checkpoint's)."""

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "low_min_tokens": self.tokens, "low_max_tokens": self.tokens}
        if self.mode == "never":
            return out
        out["roi_fallback"] = self.roi_fallback
        if self.roi_max_tokens is not None:
            out["roi_max_tokens"] = self.roi_max_tokens
        return out


def normalise_answer(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes (torchvision's box_iou, one pair)."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    return float(tv_box_iou(torch.tensor([list(a)], dtype=torch.float64),
                            torch.tensor([list(b)], dtype=torch.float64))[0, 0])


def box_contains(outer: Sequence[float], inner: Sequence[float]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); None without both classes."""
    from scipy.stats import rankdata

    pos = sum(bool(x) for x in labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(list(scores))
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def low_res_cell(box: Sequence[int], canvas: int, grid: int) -> tuple[float, float, float, float]:
    """The pixel square of the ``grid x grid`` token cell that holds ``box``'s centre."""
    col, row = token_cell(tuple(box), canvas, grid)
    side = canvas / grid
    return col * side, row * side, (col + 1) * side, (row + 1) * side


def _done(path: Path) -> dict[tuple[str, str], dict]:
    """Answers already on disk; a torn last line (a kill mid-write) is cut off."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        path.write_bytes(keep)
    out = {}
    for line in keep.decode().splitlines():
        if line.strip():
            row = json.loads(line)
            out[(row["run"], row["id"])] = row
    return out


def answer_row(run: EvalRun, rec: BenchRecord, text: str, token_ids, stats, latency_s: float,
               **extra: Any) -> dict[str, Any]:
    """One answer as the bench stores and scores it (every backend's rows: transformers, vLLM)."""
    return {"run": run.name, "id": rec.id, "kind": rec.kind, "answer": text, "gt": rec.answer,
            "correct": normalise_answer(text) == normalise_answer(rec.answer), "latency_s": round(latency_s, 6),
            "new_tokens": len(token_ids if token_ids is not None else []), **stats.to_dict(), **extra}


def answer_all(qz, records: list[BenchRecord], runs: list[EvalRun], out: Path, *, max_new_tokens: int = 4,
               progress: bool = True) -> list[dict[str, Any]]:
    """Answer every record with every run, appending to ``out`` (jsonl) and skipping what it already holds."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    todo = [r for r in records if any((run.name, r.id) not in done for run in runs)]
    with open(out, "a", encoding="utf-8") as f:
        for i, rec in enumerate(tqdm(todo, desc="evaluate", unit="question", disable=not progress)):
            with Image.open(rec.image) as im:
                image = im.convert("RGB")
            order = runs[i % len(runs):] + runs[: i % len(runs)]
            for run in order:
                if (run.name, rec.id) in done:
                    continue
                t0 = time.perf_counter()
                with torch.inference_mode():
                    ans = qz.generate([image], rec.question, config_overrides=run.overrides(),
                                      max_new_tokens=max_new_tokens)[0]
                seconds = time.perf_counter() - t0
                row = answer_row(run, rec, ans.text, ans.token_ids, ans.stats, seconds)
                f.write(json.dumps(row) + "\n")
                f.flush()
                done[(run.name, rec.id)] = row
        os.fsync(f.fileno())
    return [done[(run.name, r.id)] for run in runs for r in records]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_metrics(rows: list[dict[str, Any]], records: dict[str, BenchRecord], low_grid: int) -> dict[str, Any]:
    """Accuracy by kind, cost, zoom rate by kind and, for zoomed fine questions, the box against GT."""
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in ("fine", "coarse")}
    seconds = sum(r["latency_s"] for r in rows)
    m: dict[str, Any] = {
        "samples": len(rows),
        "accuracy": _mean([float(r["correct"]) for r in rows]),
        "accuracy_fine": _mean([float(r["correct"]) for r in by_kind["fine"]]),
        "accuracy_coarse": _mean([float(r["correct"]) for r in by_kind["coarse"]]),
        "samples_per_s": len(rows) / seconds if seconds > 0 else None,
        "mean_latency_ms": 1000 * seconds / len(rows) if rows else None,
        "mean_prefill_ms": _mean([1000 * (r["time_pass1_s"] + r["time_pass2_s"]) for r in rows]),
        "mean_decode_ms": _mean([1000 * r["time_decode_s"] for r in rows]),
        "mean_visual_tokens": _mean([r["visual_tokens"] for r in rows]),
        "zoom_rate": _mean([float(r["zoomed"]) for r in rows]),
        "zoom_rate_fine": _mean([float(r["zoomed"]) for r in by_kind["fine"]]),
        "zoom_rate_coarse": _mean([float(r["zoomed"]) for r in by_kind["coarse"]]),
        "peak_box_rate_fine": _mean([float("roi_peak" in (r.get("fallback") or "")) for r in by_kind["fine"]]),
        "reasons": {},
    }
    for r in rows:
        m["reasons"][r["reason"]] = m["reasons"].get(r["reason"], 0) + 1
    asked = [r for r in by_kind["fine"] if r["zoomed"] or r["reason"] == "no_roi"]  # the RPN was asked for a box
    if asked:
        boxed = [r for r in asked if r.get("box")]
        contains, ious, cell_ious = [], [], []
        for r in boxed:
            rec = records[r["id"]]
            box = [v * rec.canvas for v in r["box"]]
            contains.append(box_contains(box, rec.target_box))
            ious.append(box_iou(box, rec.target_box))
            cell_ious.append(box_iou(box, low_res_cell(rec.target_box, rec.canvas, low_grid)))
        misses = [0.0] * (len(asked) - len(boxed))  # no cell above tau_roi: answered from the low-res pass
        m["box"] = {"fine_asked": len(asked), "fine_boxed": len(boxed),
                    "contains_target": sum(contains) / len(asked),
                    "contains_target_when_boxed": _mean([float(c) for c in contains]),
                    "median_iou": statistics.median(ious + misses),
                    "median_cell_iou": statistics.median(cell_ious + misses),
                    "mean_box_area": _mean([(b[2] - b[0]) * (b[3] - b[1]) for b in (r["box"] for r in boxed)])}
    probs = [(r["gate_prob"], r["kind"] == "fine") for r in rows if r.get("gate_prob") is not None]
    if probs:
        m["gate_auc_fine_vs_coarse"] = roc_auc([p for p, _ in probs], [y for _, y in probs])
    return m


def summarise(rows: list[dict[str, Any]], records: list[BenchRecord], runs: list[EvalRun], reference: str,
              low_grid: int) -> dict[str, Any]:
    """Per-run metrics plus throughput relative to the ``reference`` run (the highest-budget baseline)."""
    by_id = {r.id: r for r in records}
    out = {"runs": {}, "reference": reference}
    for run in runs:
        metrics = run_metrics([r for r in rows if r["run"] == run.name], by_id, low_grid)
        out["runs"][run.name] = {**asdict(run), **metrics}
    ref = out["runs"][reference]
    for m in out["runs"].values():
        sps = m["samples_per_s"]
        m["relative_throughput"] = sps / ref["samples_per_s"] if sps and ref["samples_per_s"] else None
        # the part Q-Zoom changes: vision + prefill (pass 1, and crop encoding + pass 2), without decoding
        pre = m["mean_prefill_ms"]
        m["relative_prefill_throughput"] = ref["mean_prefill_ms"] / pre if pre and ref["mean_prefill_ms"] else None
    return out


def pseudo_label_quality(shard_rows: list[dict[str, Any]], gt_by_image_question: dict[tuple[str, str], BenchRecord]
                         ) -> dict[str, Any]:
    """Stage-1 labels against GT boxes: foreground precision (fg cells touching the GT box) and hit rate."""
    per_kind: dict[str, dict[str, list[float]]] = {}
    for row in shard_rows:
        question = row["messages"][0]["content"].replace("<image>", "").strip()
        rec = gt_by_image_question.get((row["images"][0], question))
        labels = row.get("qzoom_rpn_labels")
        stats = per_kind.setdefault(rec.kind if rec else "unknown", {"precision": [], "hit": [], "ignored": []})
        stats["ignored"].append(float(labels is None))
        if rec is None or labels is None:
            continue
        rows_n, cols_n = len(labels), len(labels[0])
        cw, ch = rec.canvas / cols_n, rec.canvas / rows_n
        fg = [(i, j) for i in range(rows_n) for j in range(cols_n) if labels[i][j] == 1]
        if not fg:
            continue
        touching = [box_iou((j * cw, i * ch, (j + 1) * cw, (i + 1) * ch), rec.box) > 0 for i, j in fg]
        stats["precision"].append(sum(touching) / len(fg))
        stats["hit"].append(float(any(touching)))
    return {kind: {"samples": len(s["ignored"]), "ignored_rate": _mean(s["ignored"]),
                   "fg_precision": _mean(s["precision"]), "hit_rate": _mean(s["hit"])}
            for kind, s in per_kind.items()}
