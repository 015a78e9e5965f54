"""``qzoom mine-hard``: stage-2 data, the questions where the zoomed input made the model worse.

For every question of an ms-swift pool with ground truth, the model answers twice: from the
low-resolution view alone (mode ``never``) and with the RoI (mode ``always``, boxes from the stage-1
RPN). A judge (a local LLM through ms-swift, or a rule matcher) says which answers are right. Regressions
(base right, RoI wrong) become the Post-SFT set, optionally mixed with some improvements; every row keeps
the box that was used, so training rebuilds exactly the input inference saw (``qzoom_roi``), and the
low-resolution budget (``chat_template_kwargs``). Resumable like every labelling job (``labels.jobs``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import write_text_atomic
from qzoom_swift.labels.jobs import (
    Block,
    JobError,
    ReferenceJob,
    Reject,
    RunOptions,
    model_context,
    question_text,
    text_tokens,
)
from qzoom_swift.labels.matchers import get_matcher, is_correct

POST_SFT_FILE = "post_sft.jsonl"
CATEGORIES = ("regression", "improvement", "both_right", "both_wrong", "no_roi", "unknown")


@dataclass
class MineOptions(RunOptions):
    model: str
    checkpoint: str | None
    dataset: str
    out: str
    judge_model: str | None = None
    """A local model for the LLM judge (ms-swift loads it); None = the rule ``matcher``."""
    judge_model_type: str | None = None
    judge_batch_size: int = 8
    """Answer pairs per judge call (ms-swift's engine batch)."""
    matcher: str = "exact"
    correct_threshold: float = 0.5
    batch_size: int = 4
    max_new_tokens: int = 32
    mixing_ratio: float = 0.0
    """Improvements mixed in per regression (the released recipe uses 0)."""
    post_sft_tokens: int | None = 576
    """Visual tokens of the global image in the Post-SFT rows: the released recipe fixes 576 (min = max pixels);
    None or 0 keeps the low budget the mining ran at. The stored RoI maps onto either grid (``post_sft``)."""
    seed: int = 0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    shard_size: int = 1000
    overwrite: bool = False
    limit: int | None = None
    progress: bool = True
    max_prompt_tokens: int | None = None
    """Longer prompts (text + visual budget) are rejected before the model runs; None = visual + 4096 text."""

    RESUME_KEYS = ("model", "checkpoint", "dataset", "judge_model", "matcher", "correct_threshold", "max_new_tokens",
                   "config_overrides", "limit", "batch_size")


def classify(base_ok: bool | None, roi_ok: bool | None, zoomed: bool) -> str:
    if not zoomed:
        return "no_roi"
    if base_ok is None or roi_ok is None:
        return "unknown"
    if base_ok and not roi_ok:
        return "regression"
    if roi_ok and not base_ok:
        return "improvement"
    return "both_right" if base_ok else "both_wrong"


class MineHardJob(ReferenceJob):
    """Per block: answers without and with the RoI, judged; the Post-SFT file is built as the summary."""

    job_name = "mine-hard"
    kind = "mine-hard"
    progress_desc = "mine-hard"
    progress_unit = "q"
    opts: MineOptions
    own_files = (POST_SFT_FILE,)
    purpose = "mining"
    no_reference = "no assistant answer to judge against"

    def configure(self) -> dict:
        """Check the Q-Zoom settings (checkpoint < environment < options) before anything is written."""
        from qzoom_swift.config import QZoomConfig, effective_config

        self.find_dataset()
        opts = self.opts
        try:
            base = QZoomConfig.load(opts.checkpoint) if opts.checkpoint else None
            effective_config(base, opts.config_overrides)
        except (ValueError, FileNotFoundError) as exc:
            raise JobError(f"Q-Zoom settings: {exc}") from exc
        return asdict(self.opts)

    def setup(self) -> None:
        from qzoom_swift.model import QZoomModel

        opts = self.opts
        self.write_job({"kind": self.kind, "settings": self.settings})
        try:
            self.qz = QZoomModel.from_pretrained(opts.model, checkpoint=opts.checkpoint,
                                                 config_overrides=opts.config_overrides, device=self.model_device(),
                                                 dtype=opts.dtype, attn_implementation=opts.attn_implementation)
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot load --model {opts.model} (checkpoint {opts.checkpoint}): {exc}") from exc
        self.judge = self.load_judge()
        self.matcher = get_matcher(opts.matcher)
        cfg = self.qz.config
        self.low_kwargs = self.qz.adapter.budget_template_kwargs(cfg.low_min_tokens, cfg.low_max_tokens)
        tokens = opts.post_sft_tokens
        self.post_sft_kwargs = self.qz.adapter.budget_template_kwargs(tokens, tokens) if tokens else None
        self.write_job({"kind": self.kind, "settings": self.settings, "post_sft_kwargs": self.post_sft_kwargs})
        self.context = model_context(self.qz.model)

    def process_block(self, block: Block) -> None:
        ready = self.scorable(block)
        if not ready:
            return
        images = [[p.image] for *_, p, _ in ready]
        questions = [question_text(p.messages) for *_, p, _ in ready]
        refs = [gt for *_, gt in ready]
        cfg = self.qz.config
        visual = cfg.low_max_tokens + cfg.roi_max_tokens  # the zoomed prompt holds both
        tokens = [text_tokens(self.qz.processor, p.messages) + visual for *_, p, _ in ready]

        def run(pos: list[int]) -> list[tuple]:
            imgs, qs = [images[k] for k in pos], [questions[k] for k in pos]
            base = self.qz.generate(imgs, qs, config_overrides={"mode": "never"},
                                    max_new_tokens=self.opts.max_new_tokens)
            zoom = self.qz.generate(imgs, qs, config_overrides={"mode": "always"},
                                    max_new_tokens=self.opts.max_new_tokens)
            return list(zip(base, zoom, self._judge([refs[k] for k in pos], qs, base, zoom)))

        results = self.guarded_results([(i, rid) for i, rid, *_ in ready], tokens,
                                       self.prompt_limit(self.context, visual), run)
        for (_i, rid, rec, _p, _gt), result in zip(ready, results):
            if self.is_done(rid) or isinstance(result, Reject):
                continue
            b, z, (base_ok, roi_ok, raw) = result
            st = z.stats
            roi = {"box": list(st.box), "grid_box": list(st.grid_box), "grid": list(st.grid)} if st.zoomed else None
            self.write_record({"qzoom_id": rid, "qzoom_status": classify(base_ok, roi_ok, st.zoomed), **rec,
                               "qzoom_base_answer": b.text, "qzoom_roi_answer": z.text,
                               "qzoom_base_correct": base_ok, "qzoom_roi_correct": roi_ok,
                               "qzoom_judge": raw, "qzoom_roi": roi, "qzoom_low": self.low_kwargs})

    def _judge(self, refs: list[str], questions: list[str], base: list, zoom: list) -> list[tuple]:
        """(base right, RoI right, judge output or None) per question, from the judge or the matcher."""
        if self.judge is not None:
            verdicts = self.judge([(q, gt, b.text, z.text) for q, gt, b, z in zip(questions, refs, base, zoom)])
            return [(v.a, v.b, v.raw) for v in verdicts]
        threshold = self.opts.correct_threshold
        return [(is_correct(self.matcher(b.text, gt), threshold), is_correct(self.matcher(z.text, gt), threshold),
                 None) for gt, b, z in zip(refs, base, zoom)]

    def restore(self, job: dict) -> None:
        self.post_sft_kwargs = job.get("post_sft_kwargs")

    def summarize(self) -> dict[str, Any]:
        summary = build_post_sft_dataset(self.root, self.opts.mixing_ratio, self.opts.seed, self.post_sft_kwargs)
        summary["seconds"] = round(self.elapsed(), 2)
        summary["rejects"] = dict(self.out.reject_reasons)
        summary["judge"] = self.opts.judge_model or f"matcher:{self.opts.matcher}"
        return summary


def run_mine_hard(opts: MineOptions) -> dict[str, Any]:
    """Run (or resume) the mining, then rebuild ``post_sft.jsonl``; returns the summary."""
    return MineHardJob(opts).run()


def build_post_sft_dataset(root: Path, mixing_ratio: float, seed: int,
                           global_kwargs: dict[str, int] | None = None) -> dict[str, Any]:
    """Regressions (+ ``mixing_ratio`` improvements each) as Post-SFT rows with their RoI and global budget.

    ``global_kwargs`` (``chat_template_kwargs`` min/max pixels) sets the global image's budget, the released
    fixed 576 tokens by default in ``qzoom mine-hard``; None keeps each row's mining budget (``qzoom_low``).
    """
    rows = [json.loads(line) for shard in sorted(Path(root).glob("shard-*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]
    counts = Counter(r["qzoom_status"] for r in rows)
    regressions = [r for r in rows if r["qzoom_status"] == "regression"]
    improvements = sorted((r for r in rows if r["qzoom_status"] == "improvement"), key=lambda r: r["qzoom_id"])
    want = min(len(improvements), int(round(mixing_ratio * len(regressions))))
    mixed = random.Random(seed).sample(improvements, want)
    lines = []
    for r in sorted(regressions + mixed, key=lambda r: int(r["qzoom_id"].split("-", 1)[0])):
        record = {k: v for k, v in r.items() if not k.startswith("qzoom_")}
        record["qzoom_roi"] = r["qzoom_roi"]
        budget = global_kwargs if global_kwargs is not None else r.get("qzoom_low")
        if budget:
            record["chat_template_kwargs"] = dict(record.get("chat_template_kwargs") or {}, **budget)
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(Path(root) / POST_SFT_FILE, "".join(line + "\n" for line in lines))
    return {"answered": len(rows), "categories": {c: counts[c] for c in CATEGORIES if counts[c]},
            "post_sft_rows": len(lines), "regressions": len(regressions), "improvements_mixed": want,
            "post_sft": str(Path(root) / POST_SFT_FILE)}
