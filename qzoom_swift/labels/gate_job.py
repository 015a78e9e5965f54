"""``qzoom gate-labels`` and ``qzoom calibrate-gate``: stage-3 data and the gate threshold.

gate-labels, phase 1 (expensive, resumable): the base model answers every question at each budget of a
monotone resolution trajectory (by default with the released short-answer instruction appended to prompts
that lack one); answers, scores and right/wrong are written to shards as they come. The default scoring is
the release's filter (``released``: the top two answers must be identical once normalised and contain or be
contained in the ground truth, each budget is right when it contains or is contained in theirs); the lenient
``consensus`` rule, the matchers and an LLM judge are options.
Phase 2 (cheap, rerun at the end of every run): the trajectories are collected into
``gate_trajectories.jsonl``, which ``swift sft`` reads through the registered preprocessor
(``swift_plugin.data_registry``: the released filter, 1:1 balance and positive-budget draw at load time), and
the same draw (:func:`qzoom_swift.labels.gate.gate_training_rows`, the one home of the rule) is exported as
``gate_train.jsonl``. Each training row carries ``chat_template_kwargs`` with min = max pixels of its
budget, so ms-swift's Qwen templates encode that sample at exactly that resolution.

calibrate-gate: gate probabilities at the inference low budget on held-out trajectories give the
accuracy / no-RoI curve; the chosen tau_gate is written into the checkpoint's ``qzoom_config.json``. It is
an estimate: a sample's zoomed answer is not run, its correctness is taken to be the top budget's (see
:func:`calibrate_gate`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.checkpoint import saved_branches, write_model_card
from qzoom_swift.config import GateSampling
from qzoom_swift.fileio import atomic_path, write_json_atomic, write_text_atomic
from qzoom_swift.labels.gate import (
    CONSENSUS_SCORERS,
    DEFAULT_TRAJECTORY,
    SHORT_ANSWER_INSTRUCTION,
    asks_short_answer,
    calibration_curve,
    choose_threshold,
    ensure_short_answer,
    gate_training_rows,
    matches_truth,
    trajectory_reference,
)
from qzoom_swift.labels.jobs import (
    Block,
    JobError,
    Prepared,
    ReferenceJob,
    Reject,
    RunOptions,
    model_context,
    prepare_record,
    question_text,
    text_tokens,
)
from qzoom_swift.labels.matchers import get_matcher, is_correct

GATE_TRAIN_FILE = "gate_train.jsonl"
TRAJECTORIES_FILE = "gate_trajectories.jsonl"
"""Every answered trajectory in one file: what ``swift sft`` reads through the registered preprocessor."""
STATUS_OK = "ok"
SCORINGS = ("released", "consensus", "exact", "vqa", "anls", "relaxed")


@dataclass
class GateLabelOptions(RunOptions):
    model: str
    dataset: str
    out: str
    budgets: tuple[int, ...] = DEFAULT_TRAJECTORY
    """Visual-token budgets of the trajectory, ascending; budgets above the processor's maximum are dropped."""
    matcher: str = "released"
    """released (the release's filter), consensus (its lenient form) or a matcher against the ground truth:
    exact, vqa, anls, relaxed."""
    correct_threshold: float = 0.5
    judge_model: str | None = None
    """A local model judging right/wrong through ms-swift (the paper's judge prompt); None = ``matcher``."""
    judge_model_type: str | None = None
    judge_batch_size: int = 8
    """Answer pairs per judge call (ms-swift's engine batch); verdicts do not depend on it under greedy decoding."""
    max_new_tokens: int = 16
    batch_size: int = 4
    stable_top: int = 2
    positive_prob: float = 0.9
    easy_per_transition: float = 1.0
    seed: int = 0
    short_answer: bool = True
    """Append the released short-answer instruction to prompts that lack one (answers become comparable)."""
    shard_size: int = 1000
    overwrite: bool = False
    limit: int | None = None
    progress: bool = True
    max_prompt_tokens: int | None = None
    """Longer prompts (text + top budget) are rejected before the model runs; None = top budget + 4096 text."""

    RESUME_KEYS = ("model", "dataset", "budgets", "matcher", "correct_threshold", "max_new_tokens", "limit",
                   "batch_size", "judge_model", "short_answer")

    def sampling(self) -> GateSampling:
        """The draw of the training rows (``labels.gate.gate_training_rows``) these options ask for."""
        return GateSampling(scoring="stored" if self.judge_model else self.matcher,
                            correct_threshold=self.correct_threshold, stable_top=self.stable_top,
                            positive_prob=self.positive_prob, easy_per_transition=self.easy_per_transition,
                            seed=self.seed)


def load_base_model(model_dir: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto",
                    local_rank: int | None = None):
    """The base model (no branches) and its processor, for answering at several budgets."""
    from qzoom_swift.families import FAMILIES, get_adapter
    from qzoom_swift.loading import LoadSettings, ModelLoadError, load_model

    try:
        model, processor = load_model(model_dir, LoadSettings(device, dtype, attn_implementation),
                                      local_rank=local_rank)
    except ModelLoadError as exc:
        raise JobError(str(exc)) from exc
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
    kind = "gate-labels"
    progress_desc = "gate-labels"
    progress_unit = "q"
    opts: GateLabelOptions
    own_files = (GATE_TRAIN_FILE, TRAJECTORIES_FILE)
    purpose = "gate labelling"

    def configure(self) -> dict:
        opts = self.opts
        self.budgets = tuple(sorted(int(b) for b in opts.budgets))
        if len(self.budgets) < 2 or self.budgets[0] < 1:
            raise JobError(f"--budgets {self.budgets}: need at least two positive budgets")
        if opts.matcher not in SCORINGS:
            raise JobError(f"--matcher {opts.matcher!r}: choose from {', '.join(SCORINGS)}")
        self.matcher = None if opts.matcher in CONSENSUS_SCORERS else get_matcher(opts.matcher)
        opts.sampling()  # validates the sampling options before the model loads
        self.find_dataset()
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
        settings["budgets"] = list(self.budgets)
        return settings

    def setup(self) -> None:
        opts = self.opts
        self.model, self.processor, self.adapter = load_base_model(opts.model, opts.device, opts.dtype,
                                                                   opts.attn_implementation, self.local_rank)
        self.patch_unit = self.adapter.patch_unit
        self.judge = self.load_judge()
        cap = max_budget(self.processor, self.adapter.patch_unit)
        self.used = tuple(b for b in self.budgets if b <= cap)
        if len(self.used) < 2:
            raise JobError(f"budgets {self.budgets} exceed the processor's maximum of {cap} visual tokens")
        self.write_job({"kind": self.kind, "settings": self.settings, "budgets_used": list(self.used),
                        "patch_unit": self.patch_unit})

    def reference(self, record: dict) -> str | list[str] | None:
        """The last assistant turn, else an ``answer``/``answers`` field (VQA-style records)."""
        return trajectory_reference(record)  # the preprocessor reads the ground truth the same way

    def process_block(self, block: Block) -> None:
        ready = self.scorable(block)
        if not ready:
            return
        chats = [_with_short_answer(p.messages) if self.opts.short_answer else p.messages for *_, p, _ in ready]
        images = [p.image for *_, p, _ in ready]
        tokens = [text_tokens(self.processor, chat) + max(self.used) for chat in chats]

        def run(pos: list[int]) -> list[list[str]]:
            per_budget = [answer_at_budget(self.model, self.processor, self.adapter, [chats[k] for k in pos],
                                           [images[k] for k in pos], b, self.opts.max_new_tokens) for b in self.used]
            return [[answers[n] for answers in per_budget] for n in range(len(pos))]

        trajectories = self.guarded_results([(i, rid) for i, rid, *_ in ready], tokens,
                                            self.prompt_limit(model_context(self.model), max(self.used)), run)
        for k, (_i, rid, rec, prepared, gt) in enumerate(ready):
            if self.is_done(rid) or isinstance(trajectories[k], Reject):
                continue
            answers = trajectories[k]
            scores, correct = self._score(prepared, gt, answers)
            status = STATUS_OK if all(c is not None for c in correct) else "judge_unknown"
            self.write_record({"qzoom_id": rid, "qzoom_status": status, **rec, "qzoom_budgets": list(self.used),
                               "qzoom_answers": answers, "qzoom_scores": scores, "qzoom_correct": correct,
                               "qzoom_scoring": "judge" if self.judge is not None else self.opts.matcher,
                               "qzoom_short_answer": bool(self.opts.short_answer),
                               "qzoom_patch_unit": self.adapter.patch_unit})

    def _score(self, prepared: Prepared, gt: str | list[str],
               answers: list[str]) -> tuple[list[float | None], list[bool | None]]:
        """(scores, right/wrong) of one trajectory's answers, from the judge, the released rule or the matcher.

        ``released`` / ``consensus``: the score is 1 when the answer is right against the ground truth alone,
        right/wrong is against the consensus of the top budgets (the ground truth when that consensus is dropped).
        """
        if self.judge is not None:
            correct = judge_trajectory(self.judge, question_text(prepared.messages), gt, answers)
            return [None if c is None else float(c) for c in correct], correct
        if self.matcher is None:
            scores = [float(matches_truth(self.opts.matcher, a, gt)) for a in answers]
            return scores, list(CONSENSUS_SCORERS[self.opts.matcher](answers, gt, self.opts.stable_top).correct)
        scores = [float(self.matcher(a, gt)) for a in answers]
        return scores, [is_correct(s, self.opts.correct_threshold) for s in scores]

    def restore(self, job: dict) -> None:
        self.patch_unit = int(job["patch_unit"])

    def summarize(self) -> dict[str, Any]:
        summary = build_gate_dataset(self.root, self.opts, self.patch_unit)
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
    """Every answered trajectory of a gate-labels output, in dataset order (however the job was sharded)."""
    rows = []
    for shard in sorted(root.glob("shard-*.jsonl")):
        for line in shard.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("qzoom_status") == STATUS_OK:
                    rows.append(row)
    return sorted(rows, key=lambda row: int(str(row["qzoom_id"]).split("-", 1)[0]))


def build_gate_dataset(root: Path, opts: GateLabelOptions, patch_unit: int) -> dict[str, Any]:
    """Phase 2: write ``gate_trajectories.jsonl`` (every answered trajectory, for the ms-swift preprocessor)
    and export the same seeded draw as ``gate_train.jsonl`` (``labels.gate.gate_training_rows``)."""
    rows = read_trajectories(Path(root))
    write_text_atomic(Path(root) / TRAJECTORIES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    train, summary = gate_training_rows(rows, opts.sampling(), patch_unit)
    write_text_atomic(Path(root) / GATE_TRAIN_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    summary.update(gate_train=str(Path(root) / GATE_TRAIN_FILE), trajectories=str(Path(root) / TRAJECTORIES_FILE),
                   scoring=opts.sampling().scoring)
    return summary


def _with_short_answer(messages: list[dict]) -> list[dict]:
    """A prepared chat whose user turn ends with the short-answer instruction (unless it asks for one already)."""
    out = []
    for message in messages:
        if message.get("role") != "user":
            out.append(message)
            continue
        parts = [dict(part) for part in message["content"]]
        if any(part.get("type") == "text" and asks_short_answer(part["text"]) for part in parts):
            pass
        elif parts and parts[-1].get("type") == "text":
            parts[-1]["text"] = ensure_short_answer(parts[-1]["text"])
        else:
            parts.append({"type": "text", "text": SHORT_ANSWER_INSTRUCTION})
        out.append({**message, "content": parts})
    return out


@dataclass
class CalibrationResult:
    tau_gate: float
    accuracy: float
    skip_ratio: float
    samples: int
    curve_png: str
    config: str
    rule: str = "plateau-middle"
    plateau: tuple[float, float] = (0.0, 0.0)
    """(low, high]: the thresholds as good as the chosen one on the held-out set (``labels.gate.threshold_plateau``)."""


def calibrate_gate(model_dir: str, checkpoint: str, trajectories: str, *, max_accuracy_drop: float | None = None,
                   target_skip_ratio: float | None = None, png: str | None = None,
                   batch_size: int = 4, device: str = "auto", dtype: str = "auto",
                   attn_implementation: str = "auto", rule: str = "plateau-middle") -> CalibrationResult:
    """Gate probabilities at the low budget on held-out trajectories -> curve -> tau_gate into the checkpoint.

    An estimate, by design: no zoomed answer is generated. A sample answered directly counts as right when its
    answer at the highest trajectory budget <= the low budget was right; a zoomed sample counts as right when
    the answer at the TOP budget was right, i.e. the zoom is assumed to recover the full-resolution answer.
    Where Q-Zoom's crop misses (or the RoI budget is below the top budget), real zoomed accuracy is lower and
    the chosen tau_gate skips less than it could; check the choice with ``qzoom eval``. The assumption is
    recorded as ``zoom_correctness`` in the checkpoint's ``gate_calibration`` entry.

    ``rule`` places tau_gate within the plateau of thresholds as good as the chosen decisions on the held-out
    set (``labels.gate.THRESHOLD_RULES``); the plateau is recorded with it.
    """
    import torch

    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.prefill import prefill

    rows = read_trajectories(Path(trajectories))
    if not rows:
        raise JobError(f"{trajectories} holds no answered trajectories (run qzoom gate-labels on a held-out set)")
    qz = QZoomModel.from_pretrained(model_dir, checkpoint=checkpoint, device=device, dtype=dtype,
                                    attn_implementation=attn_implementation)
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
        inputs = qz.processor(text=texts, images=[i[0] for i in images], return_tensors="pt",
                              padding=True).to(qz.device)
        with torch.inference_mode():
            state = prefill(qz.model, branches=("gate",), **inputs)
        probs += torch.sigmoid(state.gate_logit).float().tolist()
        for row in block:
            budgets, correct = row["qzoom_budgets"], row["qzoom_correct"]
            at_or_below = [j for j, b in enumerate(budgets) if b <= cfg.low_max_tokens]
            low_ok.append(bool(correct[at_or_below[-1] if at_or_below else 0]))
            zoom_ok.append(bool(correct[-1]))  # the top budget stands in for the zoomed answer
    curve = calibration_curve(probs, low_ok, zoom_ok)
    chosen, plateau = choose_threshold(curve, max_accuracy_drop=max_accuracy_drop,
                                       target_skip_ratio=target_skip_ratio, rule=rule)
    config = QZoomConfig.load(checkpoint)
    config.tau_gate = chosen.tau
    config.extra["gate_calibration"] = {"samples": len(probs), "accuracy": chosen.accuracy,
                                        "zoom_correctness": "top trajectory budget (estimate, no zoomed answer run)",
                                        "skip_ratio": chosen.skip_ratio, "max_accuracy_drop": max_accuracy_drop,
                                        "target_skip_ratio": target_skip_ratio, "rule": rule,
                                        "plateau": [plateau.low, plateau.high]}
    path = config.save(checkpoint)
    write_model_card(checkpoint, config, saved_branches(checkpoint))  # the card shows the new threshold
    png_path = Path(png) if png else Path(checkpoint) / "gate_calibration.png"
    _plot_curve(curve, chosen, png_path)
    write_json_atomic(Path(checkpoint) / "gate_calibration.json",
                      {"chosen": asdict(chosen), "rule": rule, "plateau": asdict(plateau),
                       "curve": [asdict(p) for p in curve]})
    return CalibrationResult(chosen.tau, chosen.accuracy, chosen.skip_ratio, len(probs), str(png_path), str(path),
                             rule, (plateau.low, plateau.high))


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
