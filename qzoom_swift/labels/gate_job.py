"""``qzoom gate-labels`` and ``qzoom calibrate-gate``: stage-3 data and the gate threshold.

gate-labels, phase 1 (expensive, resumable): the base model answers every question at each budget of a
monotone resolution trajectory; answers, scores and right/wrong are written to shards as they come.
Phase 2 (cheap, rerun at the end of every run): trajectories are filtered for a clean step
(:mod:`qzoom_swift.labels.gate`), one budget is drawn per kept sample and labelled, easy samples are
balanced against transitions, and ``gate_train.jsonl`` is written for ``swift sft`` (QZOOM_TRAIN=gate).
Each training row carries ``chat_template_kwargs`` with min = max pixels of its budget, so ms-swift's
Qwen templates encode that sample at exactly that resolution.

calibrate-gate: gate probabilities at the inference low budget on held-out trajectories give the
accuracy / no-RoI curve; the chosen tau_gate is written into the checkpoint's ``qzoom_config.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import atomic_path, write_json_atomic, write_text_atomic
from qzoom_swift.labels.gate import (
    DEFAULT_TRAJECTORY,
    balance_easy,
    calibration_curve,
    choose_gate_example,
    choose_threshold,
    classify_trajectory,
    sample_rng,
)
from qzoom_swift.labels.jobs import (
    JOB_FILE,
    SUMMARY_FILE,
    JobError,
    OutputDir,
    Reject,
    prepare_out_dir,
    prepare_record,
    question_text,
    read_dataset,
)
from qzoom_swift.labels.matchers import get_matcher, is_correct

GATE_TRAIN_FILE = "gate_train.jsonl"
STATUS_OK = "ok"


@dataclass
class GateLabelOptions:
    model: str
    dataset: str
    out: str
    budgets: tuple[int, ...] = DEFAULT_TRAJECTORY
    """Visual-token budgets of the trajectory, ascending; budgets above the processor's maximum are dropped."""
    matcher: str = "exact"
    correct_threshold: float = 0.5
    judge_model: str | None = None
    """A local model judging right/wrong through ms-swift (the paper's judge prompt); None = ``matcher``."""
    judge_model_type: str | None = None
    max_new_tokens: int = 16
    batch_size: int = 4
    stable_top: int = 2
    positive_prob: float = 0.9
    easy_per_transition: float = 1.0
    seed: int = 0
    shard_size: int = 1000
    overwrite: bool = False
    limit: int | None = None
    progress: bool = True

    RESUME_KEYS = ("model", "dataset", "budgets", "matcher", "correct_threshold", "max_new_tokens", "limit",
                   "batch_size", "judge_model")


def _ground_truth(record: dict) -> str | list[str] | None:
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return message.get("content")
    return record.get("answer") or record.get("answers")


def load_base_model(model_dir: str):
    """The base model (no branches) and its processor, for answering at several budgets."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.families import get_adapter

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = get_adapter(model)
    if adapter.name == "llava":
        raise JobError("LLaVA-1.5 encodes every image at one fixed resolution: it has no resolution trajectory "
                       "to label a gate from; use a Qwen2.5-VL or Qwen3-VL model")
    return model, processor, adapter


def max_budget(processor, patch_unit: int) -> int:
    size = getattr(processor.image_processor, "size", None) or {}
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(longest) // (patch_unit * patch_unit) if longest else 1 << 30


def answer_at_budget(model, processor, adapter, chats: list[list[dict]], images: list, budget: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers of the plain model with every image resized to ``budget`` visual tokens."""
    import torch

    resized = [adapter.resize_for_budget(img, budget, budget) for img in images]
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=resized, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]


def run_gate_labels(opts: GateLabelOptions) -> dict[str, Any]:
    t_start = time.perf_counter()
    budgets = tuple(sorted(int(b) for b in opts.budgets))
    if len(budgets) < 2 or budgets[0] < 1:
        raise JobError(f"--budgets {budgets}: need at least two positive budgets")
    matcher = get_matcher(opts.matcher)
    dataset = Path(opts.dataset)
    if not dataset.is_file():
        raise JobError(f"dataset {dataset} not found")
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
    settings["budgets"] = list(budgets)
    root, _ = prepare_out_dir(opts.out, opts.overwrite, settings, GateLabelOptions.RESUME_KEYS, "gate-label",
                              (GATE_TRAIN_FILE,))
    model, processor, adapter = load_base_model(opts.model)
    judge = None
    if opts.judge_model:
        from qzoom_swift.labels.judge import LLMJudge

        judge = LLMJudge(opts.judge_model, opts.judge_model_type)
    cap = max_budget(processor, adapter.patch_unit)
    used = tuple(b for b in budgets if b <= cap)
    if len(used) < 2:
        raise JobError(f"budgets {budgets} exceed the processor's maximum of {cap} visual tokens")
    write_json_atomic(root / JOB_FILE, {"kind": "gate-labels", "settings": settings, "budgets_used": list(used)})

    records = read_dataset(dataset)[: opts.limit]
    out = OutputDir(root, opts.shard_size)
    out.scan()
    from tqdm import tqdm

    done_before = sum(1 for _, rid, _ in records if rid in out.done)
    bar = tqdm(total=len(records), initial=done_before, desc="gate-labels", unit="q", disable=not opts.progress)
    try:
        # Fixed blocks of input records: a resumed run batches (and pads) exactly as an uninterrupted one,
        # so its answers are the same; a block cut by a crash is recomputed whole, only missing lines written.
        for block_start in range(0, len(records), opts.batch_size):
            block = records[block_start:block_start + opts.batch_size]
            already = sum(1 for _, rid, _ in block if rid in out.done)
            if already == len(block):
                continue
            ready = []
            for i, rid, rec in block:
                prepared = prepare_record(rec, dataset.parent, None, "gate labelling")
                gt = _ground_truth(rec) if isinstance(rec, dict) else None
                if isinstance(prepared, Reject):
                    if rid not in out.done:
                        out.write_reject(rid, i, prepared)
                elif not gt:
                    if rid not in out.done:
                        out.write_reject(rid, i, Reject("no_ground_truth", "no assistant answer to score against"))
                else:
                    ready.append((i, rid, rec, prepared, gt))
            if ready:
                chats = [p.messages for *_, p, _ in ready]
                images = [p.image for *_, p, _ in ready]
                per_budget = [answer_at_budget(model, processor, adapter, chats, images, b, opts.max_new_tokens)
                              for b in used]
                for k, (_i, rid, rec, prepared, gt) in enumerate(ready):
                    if rid in out.done:
                        continue
                    answers = [per_budget[j][k] for j in range(len(used))]
                    if judge is not None:
                        correct = judge_trajectory(judge, question_text(prepared.messages), gt, answers)
                        scores = [None if c is None else float(c) for c in correct]
                    else:
                        scores = [float(matcher(a, gt)) for a in answers]
                        correct = [is_correct(s, opts.correct_threshold) for s in scores]
                    status = STATUS_OK if all(c is not None for c in correct) else "judge_unknown"
                    out.write_record({"qzoom_id": rid, "qzoom_status": status, **rec,
                                      "qzoom_budgets": list(used), "qzoom_answers": answers,
                                      "qzoom_scores": scores, "qzoom_correct": correct})
            bar.update(len(block) - already)
    finally:
        bar.close()
        out.close()
    summary = build_gate_dataset(root, opts, adapter.patch_unit)
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    summary["rejects"] = dict(out.reject_reasons)
    write_json_atomic(root / SUMMARY_FILE, summary)
    return summary


def judge_trajectory(judge, question: str, reference: str | list[str], answers: list[str]) -> list[bool | None]:
    """Right/wrong of every budget's answer from the LLM judge, two answers (A, B) per judge call.

    A verdict the judge output does not contain is None; such a trajectory is not used for training.
    """
    ref = reference if isinstance(reference, str) else " / ".join(reference)
    pairs = [(i, min(i + 1, len(answers) - 1)) for i in range(0, len(answers), 2)]
    verdicts = judge([(question, ref, answers[i], answers[j]) for i, j in pairs])
    out: list[bool | None] = [None] * len(answers)
    for (i, j), v in zip(pairs, verdicts):
        out[i] = v.a
        if j != i:
            out[j] = v.b
    return out


def read_trajectories(root: Path) -> list[dict]:
    rows = []
    for shard in sorted(root.glob("shard-*.jsonl")):
        for line in shard.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("qzoom_status") == STATUS_OK:
                    rows.append(row)
    return rows


def build_gate_dataset(root: Path, opts: GateLabelOptions, patch_unit: int) -> dict[str, Any]:
    """Phase 2: filter, draw one labelled budget per kept sample, balance, write ``gate_train.jsonl``."""
    rows = read_trajectories(Path(root))
    kinds: Counter = Counter()
    by_kind: dict[str, list[str]] = {}
    examples: dict[str, tuple[dict, int, int, str]] = {}
    for row in rows:
        cls = classify_trajectory(row["qzoom_correct"], opts.stable_top)
        kinds[cls.kind] += 1
        choice = choose_gate_example(cls, len(row["qzoom_budgets"]), sample_rng(row["qzoom_id"], opts.seed),
                                     opts.positive_prob)
        if choice is None:
            continue
        by_kind.setdefault(cls.kind, []).append(row["qzoom_id"])
        examples[row["qzoom_id"]] = (row, choice[0], choice[1], cls.kind)
    keep = balance_easy(by_kind, opts.easy_per_transition, opts.seed)
    labels: Counter = Counter()
    lines = []
    for rid in sorted(keep, key=lambda r: int(r.split("-", 1)[0])):
        row, label, index, kind = examples[rid]
        budget = row["qzoom_budgets"][index]
        pixels = budget * patch_unit * patch_unit
        record = {k: v for k, v in row.items() if not k.startswith("qzoom_")}
        kwargs = dict(record.get("chat_template_kwargs") or {}, min_pixels=pixels, max_pixels=pixels)
        record.update(chat_template_kwargs=kwargs, qzoom_gate=label,
                      qzoom_gate_meta={"id": rid, "kind": kind, "budget": budget})
        labels[label] += 1
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(Path(root) / GATE_TRAIN_FILE, "".join(line + "\n" for line in lines))
    return {"answered": len(rows), "kinds": dict(kinds), "kept": len(lines),
            "discarded": {k: kinds[k] for k in ("always_wrong", "unstable") if kinds[k]},
            "easy_dropped_for_balance": len(by_kind.get("easy", [])) - sum(1 for r in keep
                                                                            if examples[r][3] == "easy"),
            "labels": {"zoom(1)": labels[1], "no_zoom(0)": labels[0]}, "gate_train": str(Path(root) / GATE_TRAIN_FILE)}


@dataclass
class CalibrationResult:
    tau_gate: float
    accuracy: float
    skip_ratio: float
    samples: int
    curve_png: str
    config: str


def calibrate_gate(model_dir: str, checkpoint: str, trajectories: str, *, max_accuracy_drop: float | None = None,
                   target_skip_ratio: float | None = None, png: str | None = None,
                   batch_size: int = 4) -> CalibrationResult:
    """Gate probabilities at the low budget on held-out trajectories -> curve -> tau_gate into the checkpoint."""
    import torch

    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.prefill import prefill

    rows = read_trajectories(Path(trajectories))
    if not rows:
        raise JobError(f"{trajectories} holds no answered trajectories (run qzoom gate-labels on a held-out set)")
    qz = QZoomModel.from_pretrained(model_dir, checkpoint=checkpoint)
    cfg = qz.config
    probs, low_ok, zoom_ok = [], [], []
    base = Path(trajectories)
    for start in range(0, len(rows), batch_size):
        block = rows[start:start + batch_size]
        images, questions = [], []
        for row in block:
            prepared = prepare_record(row, base, None, "calibration")
            if isinstance(prepared, Reject):
                raise JobError(f"trajectory {row['qzoom_id']}: {prepared.detail}")
            images.append([qz.adapter.resize_for_budget(prepared.image, cfg.low_min_tokens, cfg.low_max_tokens)])
            questions.append(prepared.messages)
        texts = [qz.processor.apply_chat_template(chat, add_generation_prompt=True) for chat in questions]
        qz.processor.tokenizer.padding_side = "left"
        inputs = qz.processor(text=texts, images=[i[0] for i in images], return_tensors="pt", padding=True)
        with torch.inference_mode():
            state = prefill(qz.model, branches=("gate",), **inputs)
        probs += torch.sigmoid(state.gate_logit).float().tolist()
        for row in block:
            budgets, correct = row["qzoom_budgets"], row["qzoom_correct"]
            at_or_below = [j for j, b in enumerate(budgets) if b <= cfg.low_max_tokens]
            low_ok.append(bool(correct[at_or_below[-1] if at_or_below else 0]))
            zoom_ok.append(bool(correct[-1]))  # the top budget stands in for the zoomed answer
    curve = calibration_curve(probs, low_ok, zoom_ok)
    chosen = choose_threshold(curve, max_accuracy_drop=max_accuracy_drop, target_skip_ratio=target_skip_ratio)
    config = QZoomConfig.load(checkpoint)
    config.tau_gate = chosen.tau
    config.extra["gate_calibration"] = {"samples": len(probs), "accuracy": chosen.accuracy,
                                        "skip_ratio": chosen.skip_ratio, "max_accuracy_drop": max_accuracy_drop,
                                        "target_skip_ratio": target_skip_ratio}
    path = config.save(checkpoint)
    png_path = Path(png) if png else Path(checkpoint) / "gate_calibration.png"
    _plot_curve(curve, chosen, png_path)
    write_json_atomic(Path(checkpoint) / "gate_calibration.json",
                      {"chosen": asdict(chosen), "curve": [asdict(p) for p in curve]})
    return CalibrationResult(chosen.tau, chosen.accuracy, chosen.skip_ratio, len(probs), str(png_path), str(path))


def _plot_curve(curve, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p.skip_ratio for p in curve], [p.accuracy for p in curve], marker=".", label="gate threshold sweep")
    ax.scatter([chosen.skip_ratio], [chosen.accuracy], color="red", zorder=3, label=f"tau_gate={chosen.tau:.3g}")
    ax.set_xlabel("no-RoI ratio (answered from the low-resolution pass)")
    ax.set_ylabel("estimated accuracy")
    ax.set_title("Q-Zoom gate calibration")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
