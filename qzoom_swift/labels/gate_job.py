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
    Block,
    JobError,
    Prepared,
    ReferenceJob,
    Reject,
    assistant_answer,
    prepare_record,
    question_text,
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


def load_base_model(model_dir: str):
    """The base model (no branches) and its processor, for answering at several budgets."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.families import FAMILIES, get_adapter

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = get_adapter(model)
    if adapter.spec.fixed_resolution:
        usable = " or ".join(spec.title for spec in FAMILIES.values() if not spec.fixed_resolution)
        raise JobError(f"{adapter.spec.title} encodes every image at one fixed resolution: it has no resolution "
                       f"trajectory to label a gate from; use a {usable} model")
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


class GateLabelJob(ReferenceJob):
    """Phase 1 per block (the answers at every budget, scored), phase 2 as the summary."""

    job_name = "gate-label"
    progress_desc = "gate-labels"
    progress_unit = "q"
    opts: GateLabelOptions
    own_files = (GATE_TRAIN_FILE,)
    purpose = "gate labelling"

    def configure(self) -> dict:
        opts = self.opts
        self.budgets = tuple(sorted(int(b) for b in opts.budgets))
        if len(self.budgets) < 2 or self.budgets[0] < 1:
            raise JobError(f"--budgets {self.budgets}: need at least two positive budgets")
        self.matcher = get_matcher(opts.matcher)
        self.find_dataset()
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
        settings["budgets"] = list(self.budgets)
        return settings

    def setup(self) -> None:
        self.model, self.processor, self.adapter = load_base_model(self.opts.model)
        self.judge = self.load_judge()
        cap = max_budget(self.processor, self.adapter.patch_unit)
        self.used = tuple(b for b in self.budgets if b <= cap)
        if len(self.used) < 2:
            raise JobError(f"budgets {self.budgets} exceed the processor's maximum of {cap} visual tokens")
        self.write_job({"kind": "gate-labels", "settings": self.settings, "budgets_used": list(self.used)})

    def reference(self, record: dict) -> str | list[str] | None:
        """The last assistant turn, else an ``answer``/``answers`` field (VQA-style records)."""
        return assistant_answer(record, record.get("answer") or record.get("answers"))

    def process_block(self, block: Block) -> None:
        ready = self.scorable(block)
        if not ready:
            return
        chats = [p.messages for *_, p, _ in ready]
        images = [p.image for *_, p, _ in ready]
        per_budget = [answer_at_budget(self.model, self.processor, self.adapter, chats, images, b,
                                       self.opts.max_new_tokens) for b in self.used]
        for k, (_i, rid, rec, prepared, gt) in enumerate(ready):
            if self.is_done(rid):
                continue
            answers = [per_budget[j][k] for j in range(len(self.used))]
            scores, correct = self._score(prepared, gt, answers)
            status = STATUS_OK if all(c is not None for c in correct) else "judge_unknown"
            self.write_record({"qzoom_id": rid, "qzoom_status": status, **rec, "qzoom_budgets": list(self.used),
                               "qzoom_answers": answers, "qzoom_scores": scores, "qzoom_correct": correct})

    def _score(self, prepared: Prepared, gt: str | list[str],
               answers: list[str]) -> tuple[list[float | None], list[bool | None]]:
        """(scores, right/wrong) of one trajectory's answers, from the judge or the matcher."""
        if self.judge is not None:
            correct = judge_trajectory(self.judge, question_text(prepared.messages), gt, answers)
            return [None if c is None else float(c) for c in correct], correct
        scores = [float(self.matcher(a, gt)) for a in answers]
        return scores, [is_correct(s, self.opts.correct_threshold) for s in scores]

    def summarize(self) -> dict[str, Any]:
        summary = build_gate_dataset(self.root, self.opts, self.adapter.patch_unit)
        summary["seconds"] = round(self.elapsed(), 2)
        summary["rejects"] = dict(self.out.reject_reasons)
        return summary


def run_gate_labels(opts: GateLabelOptions) -> dict[str, Any]:
    """Run (or resume) phase 1, then rebuild ``gate_train.jsonl``; returns the summary."""
    return GateLabelJob(opts).run()


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
