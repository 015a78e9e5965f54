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
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import write_json_atomic, write_text_atomic
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

POST_SFT_FILE = "post_sft.jsonl"
CATEGORIES = ("regression", "improvement", "both_right", "both_wrong", "no_roi", "unknown")


@dataclass
class MineOptions:
    model: str
    checkpoint: str | None
    dataset: str
    out: str
    judge_model: str | None = None
    """A local model for the LLM judge (ms-swift loads it); None = the rule ``matcher``."""
    judge_model_type: str | None = None
    matcher: str = "exact"
    correct_threshold: float = 0.5
    batch_size: int = 4
    max_new_tokens: int = 32
    mixing_ratio: float = 0.0
    """Improvements mixed in per regression (the released recipe uses 0)."""
    seed: int = 0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    shard_size: int = 1000
    overwrite: bool = False
    limit: int | None = None
    progress: bool = True

    RESUME_KEYS = ("model", "checkpoint", "dataset", "judge_model", "matcher", "correct_threshold", "max_new_tokens",
                   "config_overrides", "limit", "batch_size")


def _ground_truth(record: dict) -> str | None:
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return message.get("content")
    return None


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


def run_mine_hard(opts: MineOptions) -> dict[str, Any]:
    t_start = time.perf_counter()
    dataset = Path(opts.dataset)
    if not dataset.is_file():
        raise JobError(f"dataset {dataset} not found")
    settings = asdict(opts)
    root, _ = prepare_out_dir(opts.out, opts.overwrite, settings, MineOptions.RESUME_KEYS, "mine-hard",
                              (POST_SFT_FILE,))
    write_json_atomic(root / JOB_FILE, {"kind": "mine-hard", "settings": settings})
    from qzoom_swift.model import QZoomModel

    qz = QZoomModel.from_pretrained(opts.model, checkpoint=opts.checkpoint, config_overrides=opts.config_overrides)
    cfg = qz.config
    judge = None
    if opts.judge_model:
        from qzoom_swift.labels.judge import LLMJudge

        judge = LLMJudge(opts.judge_model, opts.judge_model_type)
    matcher = get_matcher(opts.matcher)
    low_kwargs = {}
    if qz.adapter.name != "llava":
        unit = qz.adapter.patch_unit ** 2
        low_kwargs = {"min_pixels": cfg.low_min_tokens * unit, "max_pixels": cfg.low_max_tokens * unit}

    records = read_dataset(dataset)[: opts.limit]
    out = OutputDir(root, opts.shard_size)
    out.scan()
    from tqdm import tqdm

    bar = tqdm(total=len(records), initial=sum(1 for _, rid, _ in records if rid in out.done), desc="mine-hard",
               unit="q", disable=not opts.progress)
    try:
        for start in range(0, len(records), opts.batch_size):  # fixed blocks: a resume batches identically
            block = records[start:start + opts.batch_size]
            already = sum(1 for _, rid, _ in block if rid in out.done)
            if already == len(block):
                continue
            ready = []
            for i, rid, rec in block:
                prepared = prepare_record(rec, dataset.parent, None, "mining")
                gt = _ground_truth(rec) if isinstance(rec, dict) else None
                if isinstance(prepared, Reject) or not gt:
                    if rid not in out.done:
                        out.write_reject(rid, i, prepared if isinstance(prepared, Reject) else
                                         Reject("no_ground_truth", "no assistant answer to judge against"))
                    continue
                ready.append((rid, rec, prepared, gt, question_text(prepared.messages)))
            if ready:
                images = [[p.image] for _, _, p, _, _ in ready]
                questions = [q for *_, q in ready]
                base = qz.generate(images, questions, config_overrides={"mode": "never"},
                                   max_new_tokens=opts.max_new_tokens)
                zoom = qz.generate(images, questions, config_overrides={"mode": "always"},
                                   max_new_tokens=opts.max_new_tokens)
                if judge is not None:
                    verdicts = judge([(q, gt, b.text, z.text) for (_, _, _, gt, q), b, z in zip(ready, base, zoom)])
                    oks = [(v.a, v.b, v.raw) for v in verdicts]
                else:
                    oks = [(is_correct(matcher(b.text, gt), opts.correct_threshold),
                            is_correct(matcher(z.text, gt), opts.correct_threshold), None)
                           for (_, _, _, gt, _), b, z in zip(ready, base, zoom)]
                for (rid, rec, _p, _gt, _q), b, z, (base_ok, roi_ok, raw) in zip(ready, base, zoom, oks):
                    if rid in out.done:
                        continue
                    st = z.stats
                    roi = ({"box": list(st.box), "grid_box": list(st.grid_box), "grid": list(st.grid)}
                           if st.zoomed else None)
                    out.write_record({"qzoom_id": rid, "qzoom_status": classify(base_ok, roi_ok, st.zoomed), **rec,
                                      "qzoom_base_answer": b.text, "qzoom_roi_answer": z.text,
                                      "qzoom_base_correct": base_ok, "qzoom_roi_correct": roi_ok,
                                      "qzoom_judge": raw, "qzoom_roi": roi, "qzoom_low": low_kwargs})
            bar.update(len(block) - already)
    finally:
        bar.close()
        out.close()
    summary = build_post_sft_dataset(root, opts.mixing_ratio, opts.seed)
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    summary["rejects"] = dict(out.reject_reasons)
    summary["judge"] = opts.judge_model or f"matcher:{opts.matcher}"
    write_json_atomic(root / SUMMARY_FILE, summary)
    return summary


def build_post_sft_dataset(root: Path, mixing_ratio: float, seed: int) -> dict[str, Any]:
    """Regressions (+ ``mixing_ratio`` improvements each) as Post-SFT rows with their RoI and low budget."""
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
        if r.get("qzoom_low"):
            record["chat_template_kwargs"] = dict(record.get("chat_template_kwargs") or {}, **r["qzoom_low"])
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(Path(root) / POST_SFT_FILE, "".join(line + "\n" for line in lines))
    return {"answered": len(rows), "categories": {c: counts[c] for c in CATEGORIES if counts[c]},
            "post_sft_rows": len(lines), "regressions": len(regressions), "improvements_mixed": want,
            "post_sft": str(Path(root) / POST_SFT_FILE)}
