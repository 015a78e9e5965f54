"""``qzoom pseudo-labels`` and ``qzoom visualize``: argument declarations and runners for the CLI registry.

Only the standard library is imported here; torch/transformers load inside the runners, so ``qzoom --help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qzoom_swift.loading import add_model_args

PSEUDO_LABELS_DESCRIPTION = (
    "Stage 1: run the base model on an ms-swift dataset (messages + one local image per record), record its "
    "response-to-image attention while it answers (eager attention, averaged over decode steps and the chosen "
    "layers/heads), turn it into tri-state RPN labels and write OUT/shard-*.jsonl (input records + qzoom_attn, "
    "qzoom_attn_grid, qzoom_answer, qzoom_rpn_labels), OUT/rejects.jsonl and OUT/summary.json. The shards "
    "feed `swift sft --tuner_type qzoom` (QZOOM_TRAIN=rpn) directly. Rerunning the same command resumes after "
    "a crash; --overwrite starts again."
)


def add_job_args(p: argparse.ArgumentParser, reads_attention: bool = False) -> None:
    """The flags every resumable labelling job shares: limit, shards, overwrite, prompt limit, model, split."""
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--shard-size", type=int, default=1000, help="records per output shard file (default 1000)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete this job's earlier output in --out and start again (default: resume)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="reject a record whose prompt (text + visual budget) is longer, before the model runs "
                        "(default: the visual budget + 4096, within the model's context); a record that fails "
                        "inside the model (out of memory included) is rejected too, and the job goes on")
    add_model_args(p, reads_attention=reads_attention)
    add_shard_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    """The data-parallel flags every labelling job shares (``labels.jobs.Part``)."""
    p.add_argument("--num-shards", type=int, default=None,
                   help="split the job over this many independent processes (e.g. a Slurm array, one per GPU); "
                        "each writes its own files into --out and the last to finish merges summary.json. Under "
                        "torchrun --nproc_per_node N (or NPROC_PER_NODE=N) the split is automatic")
    p.add_argument("--shard-index", type=int, default=None, help="this process's shard, 0 .. --num-shards - 1")


def shard_options(args: argparse.Namespace) -> dict:
    """The loader and shard flags as options-dataclass keywords (``labels.jobs.RunOptions``)."""
    return {"device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation,
            "num_shards": args.num_shards, "shard_index": args.shard_index}


def reported_part(summary: dict) -> bool:
    """Print the summary of one shard whose job is not complete yet (True), or leave it to the caller (False)."""
    if summary.get("complete", True) is not False or "part" not in summary:
        return False
    print(f"shard {summary['part']}: {summary['records_done']}/{summary['records']} of its records done "
          f"({summary['processed']} this run, {summary['seconds']} s); other shards are still running. The last "
          f"to finish writes {Path(summary['output']) / 'summary.json'} (or run `qzoom merge-shards "
          f"{summary['output']}`)")
    return True


DATASET_SOURCES = ("; or anything ms-swift loads: a dataset folder, PATH#N (a seeded draw of N rows), "
                   "a hub id; or a LLaMA-Factory dataset, path/to/dataset_info.json:NAME")
"""The ``--dataset`` forms read through ms-swift's or LLaMA-Factory's loader (``labels.sources``)."""

def pseudo_labels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model dir (Qwen2.5-VL, Qwen3-VL or LLaVA-1.5-HF)")
    p.add_argument("--dataset", required=True, type=Path, help="ms-swift jsonl (or json list) with local images" + DATASET_SOURCES)
    p.add_argument("--out", required=True, type=Path, help="output dir (shards, rejects.jsonl, summary.json)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="records per generate() call (default 1); higher is faster on GPUs, costs memory")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default 128, as released)")
    p.add_argument("--mode", choices=("textual", "natural"), default="textual",
                   help="head table of known checkpoints: textual (documents/OCR) or natural (photos)")
    p.add_argument("--heads", default="default",
                   help="grounding heads: 'default' (known table, else auto), 'auto' (most concentrated layers "
                        "of the middle-to-late band), or a spec 'LAYER:H,H;LAYER' (no ':' = all heads)")
    p.add_argument("--sink-heads", default=None,
                   help="sink heads spec overriding the table ('' = none), used by --sink heads")
    p.add_argument("--sink", choices=("auto", "heads", "norm", "both", "none"), default="auto",
                   help="sink filter: heads (official: sink-head attention >= --sink-threshold), norm (hidden-state "
                        "L2 norm > --tau-norm x median), both, none; auto = heads for known models, else norm")
    p.add_argument("--sink-threshold", type=float, default=None,
                   help="sink-head threshold (default: the table's, 1e-2; 1e-3 for LLaVA-1.5-7B)")
    p.add_argument("--tau-norm", type=float, default=5.0, help="norm sink test factor (default 5)")
    p.add_argument("--queries", choices=("answer", "answer+prompt"), default="answer",
                   help="whose attention makes the map: the answer's tokens (default, as released) or also the last "
                        "prompt token, which is the only reader of the image when answers are one word")
    p.add_argument("--grounding-prompt", choices=("auto", "on", "off"), default="auto",
                   help="append the official grounding instruction to the question (auto: on for --mode natural)")
    p.add_argument("--max-tokens", type=int, default=576,
                   help="visual tokens per image while labelling, Qwen families (default 576 as released; 0 = "
                        "the processor's setting). Training encodes each row at exactly the grid it was labelled on")
    p.add_argument("--grid", choices=("auto", "square", "native"), default="auto",
                   help="square: the released grid (image padded to a grey square, exactly 24x24 tokens, padding "
                        "cells labelled background; training pads the same way); native: the image's aspect ratio "
                        "at up to --max-tokens; auto (default): square for the paper's checkpoints, else native. "
                        "LLaVA-1.5 is always square (padded with its mean colour, as it is at inference)")
    p.add_argument("--calibration", type=int, default=16, help="records used by --heads auto (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="layers kept by --heads auto (default 2)")
    p.add_argument("--tau-fg", type=float, default=None,
                   help="foreground: attention > tau_fg x peak (default 0.25, the released scripts'; the paper's "
                        "ablation found 0.2 best)")
    p.add_argument("--tau-bg", type=float, default=None, help="background: outside the box and < tau_bg x peak "
                                                              "(default 0.05)")
    p.add_argument("--max-box-fraction", type=float, default=None,
                   help="ignore a sample whose box covers >= this fraction of the grid (default 0.5)")
    p.add_argument("--min-peak", type=float, default=None, help="ignore a sample whose peak is below (default 5e-3)")

    add_job_args(p, reads_attention=True)

def pseudo_labels_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from qzoom_swift.labels.pseudo import JobError, PseudoLabelOptions, run_pseudo_labels

    opts = PseudoLabelOptions(
        model=str(args.model), dataset=str(args.dataset), out=str(args.out), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, mode=args.mode, queries=args.queries, heads=args.heads,
        sink_heads=args.sink_heads, sink=args.sink, sink_threshold=args.sink_threshold, tau_norm=args.tau_norm,
        grounding_prompt=args.grounding_prompt, max_tokens=args.max_tokens, grid=args.grid,
        calibration=args.calibration,
        top_k=args.top_k, tau_fg=args.tau_fg, tau_bg=args.tau_bg, max_box_fraction=args.max_box_fraction,
        min_peak=args.min_peak, shard_size=args.shard_size, overwrite=args.overwrite, limit=args.limit,
        progress=not args.no_progress, max_prompt_tokens=args.max_prompt_tokens, **shard_options(args))
    try:
        summary = run_pseudo_labels(opts)
    except JobError as exc:
        print(f"qzoom pseudo-labels: error: {exc}", file=sys.stderr)
        return 1  # the job failed (usage errors exit 2 from argparse)
    if reported_part(summary):
        return 0
    o = summary["outcomes"]
    run = summary["this_run"]
    print(f"{summary['records_done']}/{summary['records_total']} records done: {o['labelled']} labelled, "
          f"{summary['ignored']} ignored, {o['rejected']} rejected; this run {run['processed']} in "
          f"{run['seconds']} s ({run['samples_per_s']} samples/s)")
    print(f"wrote {Path(summary['output']) / 'summary.json'}")
    return 0


VISUALIZE_DESCRIPTION = (
    "Write a PNG for one pseudo-label record: the image, its raw attention map, the tri-state pseudo label "
    "and, with --checkpoint, the RPN heatmap predicted by a trained Q-Zoom branch checkpoint with its box, "
    "side by side (each map drawn over the part of the image the visual tokens cover)."
)


def visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", required=True, type=Path, help="a pseudo-label shard (OUT/shard-00000.jsonl)")
    p.add_argument("--index", type=int, default=0, help="line of the shard (default 0)")
    p.add_argument("--id", default=None, help="or the record's qzoom_id")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--checkpoint", default=None, help="Q-Zoom branch checkpoint dir (qzoom_branch.safetensors)")
    p.add_argument("--model", default=None, help="base model dir (default: the job's, from job.json next to the shard)")
    p.add_argument("--tau-roi", type=float, default=None, help="box threshold on the predicted heatmap "
                                                               "(default: the checkpoint's)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")
    add_model_args(p)


def visualize_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from qzoom_swift.labels.visualize import render_record_png
    from qzoom_swift.loading import LoadSettings

    try:
        path, size = render_record_png(args.shard, args.out, index=args.index, record_id=args.id,
                                       checkpoint=args.checkpoint, model=args.model, tau_roi=args.tau_roi,
                                       dpi=args.dpi, load=LoadSettings.from_args(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"qzoom visualize: error: {exc}", file=sys.stderr)
        return 1  # the job failed (usage errors exit 2 from argparse)
    print(f"wrote {path} ({size[0]}x{size[1]})")
    return 0


GATE_LABELS_DESCRIPTION = (
    "Stage 3: the base model answers every question of an ms-swift dataset (with ground-truth answers) at each "
    "visual-token budget of a resolution trajectory (prompts without a short-answer instruction get the "
    "released one); answers are scored (default: the release's filter, each budget against the top two's "
    "identical normalised answer, checked against the ground truth, by containment) and written to "
    "OUT/shard-*.jsonl as they come (rerun to resume; "
    "--overwrite to restart). OUT/gate_trajectories.jsonl collects them for `swift sft` with the stage-3 recipe, "
    "whose registered preprocessor keeps clean steps (wrong ... right), labels one budget per sample 1 (zoom: "
    "still wrong there) or 0 (already right) and balances easy samples 1:1 against transitions at load time; "
    "the same seeded draw is exported as OUT/gate_train.jsonl (each row carries its budget in "
    "chat_template_kwargs). OUT/summary.json counts the outcomes."
)


def gate_labels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory or hub id (Qwen2.5-VL / Qwen3-VL)")
    p.add_argument("--dataset", required=True, type=Path, help="ms-swift jsonl with one image and an answer per row" + DATASET_SOURCES)
    p.add_argument("--out", required=True, type=Path, help="output directory (resumable job)")
    p.add_argument("--budgets", default="64,144,256,576,1024,2048",
                   help="ascending visual-token budgets of the trajectory (default: 64,144,256,576,1024,2048; "
                        "budgets above the processor's maximum are dropped)")
    p.add_argument("--matcher", default="released",
                   choices=["released", "consensus", "exact", "vqa", "anls", "relaxed"],
                   help="how answers become right/wrong (default released, the release's filter: answers lower-cased "
                        "and stripped of punctuation, the top two must be identical and contain or be contained in "
                        "the one ground truth (punctuation kept), each budget right when it contains or is contained "
                        "in theirs; consensus: the same, lenient: top answers need only contain each other, ground "
                        "truths normalised too, several allowed); the others compare each answer with the ground truth")
    p.add_argument("--correct-threshold", type=float, default=0.5, help="matcher score counted as right (default 0.5)")
    p.add_argument("--no-short-answer", action="store_true",
                   help="send prompts as they are (default: append the released short-answer instruction to "
                        "prompts that lack one, so answers at every budget are comparable)")
    p.add_argument("--judge-model", default=None,
                   help="local model judging the answers (the paper's judge prompt, through ms-swift) instead of "
                        "--matcher; trajectories with an unreadable verdict are kept out of training")
    p.add_argument("--judge-model-type", default=None, help="ms-swift model_type of the judge, if not detected")
    p.add_argument("--judge-batch-size", type=int, default=8, help="answer pairs the judge reads together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    p.add_argument("--batch-size", type=int, default=4, help="questions answered together (default 4)")
    p.add_argument("--stable-top", type=int, default=2,
                   help="the top N budgets must all be right for a sample to be kept (default 2)")
    p.add_argument("--positive-prob", type=float, default=0.9,
                   help="transition samples: chance of a zoom (1) example rather than a no-zoom one (default 0.9)")
    p.add_argument("--easy-per-transition", type=float, default=1.0,
                   help="easy samples kept per transition sample (default 1.0; negative keeps all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-sample draws and the balancing")
    add_job_args(p)


def gate_labels_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from qzoom_swift.labels.gate_job import GateLabelOptions, run_gate_labels
    from qzoom_swift.labels.jobs import JobError

    try:
        budgets = tuple(int(b) for b in str(args.budgets).split(",") if b.strip())
        opts = GateLabelOptions(
            model=str(args.model), dataset=str(args.dataset), out=str(args.out), budgets=budgets,
            matcher=args.matcher, correct_threshold=args.correct_threshold, judge_model=args.judge_model,
            judge_model_type=args.judge_model_type, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, stable_top=args.stable_top, positive_prob=args.positive_prob,
            easy_per_transition=args.easy_per_transition, seed=args.seed, short_answer=not args.no_short_answer,
            limit=args.limit,
            shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress,
            max_prompt_tokens=args.max_prompt_tokens, judge_batch_size=args.judge_batch_size, **shard_options(args))
        summary = run_gate_labels(opts)
    except (JobError, ValueError) as exc:
        print(f"qzoom gate-labels: error: {exc}", file=sys.stderr)
        return 1  # the job failed (usage errors exit 2 from argparse)
    if reported_part(summary):
        return 0
    print(f"{summary['answered']} trajectories: {summary['kinds']}; kept {summary['kept']} "
          f"({summary['labels']}), rejects {summary['rejects']}; {summary['seconds']} s")
    print(f"wrote {summary['trajectories']} (swift sft, stage-3 recipe) and {summary['gate_train']} (export)")
    return 0


CALIBRATE_GATE_DESCRIPTION = (
    "Choose tau_gate for a trained gate: on held-out trajectories (a `qzoom gate-labels` output directory) the "
    "gate probability at the checkpoint's low budget decides zoom or not; the low-budget answer's correctness "
    "(or the top budget's, standing in for the zoomed answer) gives the accuracy / no-RoI curve over tau. The "
    "chosen tau_gate is written into CHECKPOINT/qzoom_config.json (then used by swift infer --adapters), with "
    "gate_calibration.json and a PNG of the curve."
)


def calibrate_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory or hub id")
    p.add_argument("--checkpoint", required=True, help="Q-Zoom branch checkpoint (qzoom_branch.safetensors)")
    p.add_argument("--trajectories", required=True, help="held-out `qzoom gate-labels` output directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--max-accuracy-drop", type=float,
                       help="skip the most while staying within this of the best accuracy (e.g. 0.01)")
    group.add_argument("--target-skip", type=float, help="smallest tau that skips at least this fraction")
    p.add_argument("--png", default=None, help="curve PNG (default: CHECKPOINT/gate_calibration.png)")
    from qzoom_swift.labels.gate import THRESHOLD_RULES

    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default=THRESHOLD_RULES[0],
                   help="plateau-middle (default): the middle, in logit space, of the thresholds at least as accurate "
                        "on the held-out set and skipping at most the accuracy drop less (a margin to both sides); "
                        "edge: the least confident zoomed held-out sample's probability (the earlier rule)")
    add_model_args(p)


def calibrate_gate_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from qzoom_swift.labels.gate_job import calibrate_gate
    from qzoom_swift.labels.jobs import JobError

    try:
        res = calibrate_gate(args.model, args.checkpoint, args.trajectories, max_accuracy_drop=args.max_accuracy_drop,
                             target_skip_ratio=args.target_skip, png=args.png, device=args.device,
                             dtype=args.dtype, attn_implementation=args.attn_implementation, rule=args.threshold_rule)
    except (JobError, FileNotFoundError, ValueError) as exc:
        print(f"qzoom calibrate-gate: error: {exc}", file=sys.stderr)
        return 1  # the job failed (usage errors exit 2 from argparse)
    print(f"tau_gate={res.tau_gate:.4g} ({res.rule} of the plateau {res.plateau[0]:.4g} < tau <= {res.plateau[1]:.4g}): "
          f"estimated accuracy {res.accuracy:.3f}, no-RoI ratio {res.skip_ratio:.3f} on {res.samples} samples; wrote "
          f"{res.config} and {res.curve_png}")
    return 0


MINE_HARD_DESCRIPTION = (
    "Stage 2: for each question of an ms-swift pool with ground truth, answer from the low-resolution view "
    "(mode never) and with the RoI (mode always, boxes from the stage-1 checkpoint), judge both (a local LLM "
    "judge through ms-swift with --judge-model, else a rule matcher), and keep the regressions (base right, "
    "RoI wrong). Writes OUT/shard-*.jsonl (every judged question; rerun to resume), OUT/post_sft.jsonl "
    "(regressions + --mixing-ratio improvements, each with the RoI used and the low budget, ready for "
    "`swift sft` with the stage-2 recipe) and OUT/summary.json."
)


def mine_hard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory or hub id")
    p.add_argument("--checkpoint", default=None, help="stage-1 Q-Zoom branch checkpoint (the RPN that picks boxes)")
    p.add_argument("--dataset", required=True, type=Path, help="ms-swift jsonl with one image and an answer per row" + DATASET_SOURCES)
    p.add_argument("--out", required=True, type=Path, help="output directory (resumable job)")
    p.add_argument("--judge-model", default=None,
                   help="local model for the LLM judge (the paper: Qwen2.5-VL-7B-Instruct); default: --matcher")
    p.add_argument("--judge-model-type", default=None, help="ms-swift model_type of the judge, if not detected")
    p.add_argument("--judge-batch-size", type=int, default=8, help="answer pairs the judge reads together (default 8)")
    p.add_argument("--matcher", default="exact", choices=["exact", "vqa", "anls", "relaxed"],
                   help="rule matcher when no judge model is given (default exact)")
    p.add_argument("--mixing-ratio", type=float, default=0.0,
                   help="improvements mixed in per regression (default 0, as released)")
    p.add_argument("--post-sft-tokens", type=int, default=576,
                   help="visual tokens of the global image in the Post-SFT rows (default 576, fixed as released; "
                        "0 = the low budget the mining ran at)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="questions answered together (fixed blocks: a resume batches identically; default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="answer length limit of the base and RoI answers (default 32)")
    p.add_argument("--tau-roi", type=float, default=None, help="override the checkpoint's tau_roi")
    p.add_argument("--low-min-tokens", type=int, default=None,
                   help="override the low-resolution budget's minimum (must be <= --low-max-tokens)")
    p.add_argument("--low-max-tokens", type=int, default=None, help="override the low-resolution budget")
    p.add_argument("--roi-min-tokens", type=int, default=None,
                   help="override the RoI budget's minimum (must be <= --roi-max-tokens)")
    p.add_argument("--roi-max-tokens", type=int, default=None, help="override the RoI budget")
    p.add_argument("--seed", type=int, default=0, help="seed of the improvements mixed into the Post-SFT rows")
    add_job_args(p)


def mine_hard_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from qzoom_swift.labels.jobs import JobError
    from qzoom_swift.labels.mining import MineOptions, run_mine_hard

    overrides = {k: getattr(args, k) for k in ("tau_roi", "low_min_tokens", "low_max_tokens", "roi_min_tokens",
                                               "roi_max_tokens") if getattr(args, k) is not None}
    opts = MineOptions(model=str(args.model), checkpoint=args.checkpoint, dataset=str(args.dataset),
                       out=str(args.out), judge_model=args.judge_model, judge_model_type=args.judge_model_type,
                       matcher=args.matcher, mixing_ratio=args.mixing_ratio, post_sft_tokens=args.post_sft_tokens,
                       batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, seed=args.seed, config_overrides=overrides,
                       limit=args.limit, shard_size=args.shard_size, overwrite=args.overwrite,
                       progress=not args.no_progress, max_prompt_tokens=args.max_prompt_tokens,
                       judge_batch_size=args.judge_batch_size, **shard_options(args))
    try:
        summary = run_mine_hard(opts)
    except (JobError, ValueError, FileNotFoundError) as exc:
        print(f"qzoom mine-hard: error: {exc}", file=sys.stderr)
        return 1  # the job failed (usage errors exit 2 from argparse)
    if reported_part(summary):
        return 0
    print(f"{summary['answered']} questions judged ({summary['judge']}): {summary['categories']}; "
          f"{summary['post_sft_rows']} Post-SFT rows; rejects {summary['rejects']}; {summary['seconds']} s")
    print(f"wrote {summary['post_sft']}")
    return 0


MERGE_SHARDS_DESCRIPTION = (
    "Merge the output of a labelling job that ran as several processes (torchrun, or --num-shards N "
    "--shard-index I): check that every record of the dataset was answered by some shard, then write OUT/summary.json "
    "and the job's other outputs (gate_trajectories.jsonl and gate_train.jsonl for gate-labels, post_sft.jsonl for "
    "mine-hard) from all shards' files. The last shard to finish does this by itself; run it when that shard was "
    "stopped, or after resuming a shard by hand. No model is loaded."
)

JOB_KINDS = {
    "pseudo-labels": ("qzoom_swift.labels.pseudo", "PseudoLabelOptions", "PseudoLabelJob"),
    "gate-labels": ("qzoom_swift.labels.gate_job", "GateLabelOptions", "GateLabelJob"),
    "mine-hard": ("qzoom_swift.labels.mining", "MineOptions", "MineHardJob"),
}
"""``job.json``'s ``kind`` -> (module, options class, job class): how ``merge-shards`` rebuilds a job."""


def merge_shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="OUT", help="the job's output directory (holds job.json)")


def merge_shards_run(args: argparse.Namespace) -> int:
    import dataclasses
    import importlib
    import json

    from qzoom_swift.labels.jobs import JOB_FILE, JobError

    job_path = Path(args.out) / JOB_FILE
    try:
        job = json.loads(job_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"qzoom merge-shards: error: cannot read {job_path} ({exc}): is OUT a labelling job's output?",
              file=sys.stderr)
        return 1
    kind, options = job.get("kind"), job.get("options")
    if kind not in JOB_KINDS or not isinstance(options, dict):
        print(f"qzoom merge-shards: error: {job_path} has kind {kind!r} and "
              f"{'no' if not isinstance(options, dict) else 'its'} options; merge-shards handles "
              f"{', '.join(JOB_KINDS)} jobs written by this version (resume one shard to rewrite job.json)",
              file=sys.stderr)
        return 1
    module_name, options_name, job_name = JOB_KINDS[kind]
    module = importlib.import_module(module_name)
    options_cls = getattr(module, options_name)
    known = {f.name for f in dataclasses.fields(options_cls)}
    values = {k: v for k, v in options.items() if k in known}
    values.update(out=str(args.out), overwrite=False, progress=False, num_shards=None, shard_index=None)
    try:
        summary = getattr(module, job_name)(options_cls(**values)).merge()
    except JobError as exc:
        print(f"qzoom merge-shards: error: {exc}", file=sys.stderr)
        return 1
    parts = summary.get("parts") or []
    print(f"merged {kind}: {len(parts)} shard summaries; wrote {Path(args.out) / 'summary.json'}")
    return 0
