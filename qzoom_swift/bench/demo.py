"""``qzoom demo``: the whole Q-Zoom pipeline on the zoom bench, a miniature of the paper measured on CPU.

No real weights or benchmark data can be reached from our machines, so the demo trains its own toy VLM on a
synthetic fine-detail VQA bench with ground-truth boxes (:mod:`qzoom_swift.bench`) and runs every Q-Zoom
stage on it. Stages, in order (each writes under ``--out`` and a record ``stages/<name>.json``; a rerun skips
a stage whose record matches the current settings and whose files still exist, ``--force`` redoes them):

1. ``bench``          the bench splits: PNGs, ms-swift jsonl questions, ground truth (``bench/``);
2. ``toy_base``       the toy Qwen2.5-VL: vision warm-up, then ``swift sft recipes/toy/base_sft.yaml`` full
                      tuning at mixed resolutions (cached under ``$QZOOM_CACHE/toy/<settings hash>``);
                      with ``toy_preset`` another preset's toy instead (``--preset hires``: the full preset's,
                      trained on 448 px scenes, with its processor's image cap raised to ``high_tokens``);
3. ``pseudo_labels``  stage 1: ``qzoom pseudo-labels`` on train questions, from a high-budget pass;
4. ``rpn_train``      stage 1: ``swift sft recipes/toy/stage1_sdrpn.yaml`` at the low budget (labels pooled to
                      the low-resolution grid);
5. ``gate_labels``    stage 3: ``qzoom gate-labels`` along a resolution trajectory on train questions, and
                      held-out trajectories on the val split;
6. ``gate_train``     stage 3: ``swift sft recipes/toy/stage3_gate.yaml --adapters <stage-1 checkpoint>``;
7. ``calibrate``      stage 3: ``calibrate_gate`` on the held-out trajectories writes ``tau_gate``;
8. ``evaluate``       the test split answered by the base model at the low budget, 4x and 16x, and by Q-Zoom
                      (gated) and its ``always`` ablation at the low budget (``never`` is the low baseline);
                      accuracy, throughput, visual tokens, zoom rate, box and gate quality against GT.

With ``--set vllm_bin=DIR`` (the ``bin/`` of a vLLM environment, e.g. ``.venv-vllm/bin``) a tenth stage follows:

10. ``vllm``          the evaluated split answered again on vLLM (``bench/vllm_rows.py``, a subprocess in that
                      environment): Q-Zoom through ``QZoomVLLM`` and plain vLLM at the low and high budgets, each
                      beside its transformers row (accuracy difference, flagged above 1 point; same answers).

With ``--set trainer=llamafactory`` stages 4 and 6 train through ``llamafactory-cli train``
(``recipes/llamafactory/toy/``) in the LLaMA-Factory environment instead (``bench/lf_train.py``), and return the
converted branch checkpoint: every other stage is the same, and a run folder holding the swift run's stages 1-3
and 5 reuses them.

Then ``report.md``, ``summary.json`` and the figures (``pareto.png``, ``overlays.png``,
``gate_calibration.png``) are written. ``--preset hires`` is the same bench at 1120 px, where visual tokens
dominate the cost (100 against 1,600). ``--preset quick`` is a reduced configuration (minutes; the test
suite runs it): every stage runs, numbers are not meaningful. Stage 2 (Post-SFT) is not part of the demo: the
toy base is already trained on the zoomed layout it would adapt to.

Only the standard library is imported at module level (``qzoom --help`` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.bench.lf_train import LF_STAGE1_RECIPE, LF_STAGE3_RECIPE
from qzoom_swift.bench.report import RUN_LABELS, acceptance, render_report, throughput_ceiling
from qzoom_swift.bench.settings import NUMERICS_ENV, PRESETS, TRAINERS, DemoConfig, demo_config
from qzoom_swift.fileio import write_json_atomic, write_jsonl_atomic, write_text_atomic
from qzoom_swift.recipes_command import RECIPES_DIR

RECIPES = RECIPES_DIR / "toy"  # shipped in the package, so an installed wheel has them too
STAGE1_RECIPE = RECIPES / "stage1_sdrpn.yaml"
STAGE3_RECIPE = RECIPES / "stage3_gate.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="output dir: every stage's files, report.md, summary.json, figures (default: runs/demo)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="full",
                   help="full (default: the measured miniature, ~25-30 min on 2 cores the first time), hires (1120 px "
                        "scenes, 100-token first pass vs a 1,600-token baseline: the regime where visual tokens "
                        "dominate the cost; reuses the full preset's toy base) or quick (every stage on a few "
                        "samples, a few minutes; numbers are not meaningful)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig field, e.g. --set toy_steps=1500 (repeatable; see qzoom_swift/bench/settings.py)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache of trained toy models (default: $QZOOM_CACHE, else ~/.cache/qzoom_swift)")
    p.add_argument("--sft", choices=("in-process", "subprocess"), default="in-process",
                   help="run swift sft inside this process (default; no second start-up) or as `swift sft` "
                        "subprocesses")
    p.add_argument("--force", action="store_true",
                   help="redo every stage (a cached toy model is reused: delete $QZOOM_CACHE/toy to retrain it)")


# ------------------------------------------------------------------------------------------------ plumbing


@dataclass
class Stage:
    name: str
    title: str
    deps: tuple[str, ...]
    settings: tuple[str, ...]
    """DemoConfig fields that change this stage's output."""
    run: Callable[[Context], StageResult]
    own_cache: bool = False
    """The stage keeps its own cache (keyed by everything that makes its output, code versions included):
    always call it, it returns at once when its output exists."""
    recipe: Path | None = None
    """The swift sft recipe it runs: an edited recipe invalidates the stage."""
    lf_recipe: Path | None = None
    """The llamafactory-cli recipe it runs with ``trainer=llamafactory``: the trainer and this recipe join the key
    (``recipe`` stays in it: its ENV block is the model folder's Q-Zoom settings)."""

    def title_for(self, cfg: DemoConfig) -> str:
        return self.title.format(trainer=TRAINERS[cfg.trainer])


@dataclass
class StageResult:
    line: str
    """One line for the progress output and the report."""
    outputs: dict[str, Any]
    artefacts: list[str]
    """Files or directories that must exist for the stage to count as done."""
    run_id: str | None = None
    """Identity of the outputs (default: unique per run); deterministic outputs pass a content hash."""
    notes: list[str] = field(default_factory=list)
    reused: bool = False
    """The stage found its output already there (its own cache) and did no work."""


@dataclass
class Context:
    args: argparse.Namespace
    cfg: DemoConfig
    out: Path
    records: dict[str, dict] = field(default_factory=dict)
    fresh: bool = False
    """True when the running stage must start from scratch (--force, or its earlier outputs are stale);
    False when it never finished, so a resumable job continues where it stopped."""

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def outputs(self, stage: str) -> dict[str, Any]:
        return self.records[stage]["outputs"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _label_job(job: Callable[[Any], dict], make_opts: Callable[[], Any], out: Path, fresh: bool) -> dict:
    """Run a resumable labelling job: from scratch when ``fresh``, else resume an interrupted one (restarting
    when that one had other settings)."""
    from qzoom_swift.labels.jobs import JobError

    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    try:
        return job(make_opts())
    except JobError as exc:
        if fresh:
            raise
        print(f"qzoom demo: not resuming {out} ({exc}); starting again")
        shutil.rmtree(out, ignore_errors=True)
        return job(make_opts())


def _train_outputs(out_dir: Path, steps: int, loss_key: str, log: Path) -> tuple[dict[str, Any], Path]:
    ckpt = out_dir / f"checkpoint-{steps}"
    if not (ckpt / "qzoom_branch.safetensors").is_file():
        raise RuntimeError(f"swift sft left no {ckpt}/qzoom_branch.safetensors; see {log}")
    logs = _rows(out_dir / "logging.jsonl")
    losses = [row[loss_key] for row in logs if loss_key in row]
    runtime = next((row["train_runtime"] for row in logs if "train_runtime" in row), None)
    return _checkpoint_outputs(ckpt, steps, loss_key, log, losses, runtime), ckpt


def _checkpoint_outputs(ckpt: Path, steps: int, loss_key: str, log: Path, losses: list[float],
                        runtime: float | None) -> dict[str, Any]:
    """A training stage's outputs, whichever trainer wrote the branch checkpoint ``ckpt``."""
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    return {"checkpoint": str(ckpt), "steps": steps, "log": str(log), "loss_key": loss_key,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": [round(x, 6) for x in losses], "train_runtime_s": runtime,
            "trained_branches": config.get("extra", {}).get("trained_branches"),
            "branch_layer": config.get("branch_layer"), "branch_depth": config.get("branch_depth")}


def _train_lf(ctx: Context, stage_dir: str, **kwargs: Any) -> tuple[dict[str, Any], Path]:
    """``lf_train.train_branch`` in ``stage_dir/lf``, with the outputs the swift path returns plus its own."""
    from qzoom_swift.bench.lf_train import lf_environment, train_branch

    res = train_branch(lf_environment(ctx.cfg.lf_bin), base=_model_dir(ctx), workdir=ctx.path(stage_dir, "lf"),
                       seed=ctx.cfg.seed, **kwargs)
    ckpt = res.pop("checkpoint")
    outputs = _checkpoint_outputs(ckpt, kwargs["steps"], "loss", res.pop("log"), res.pop("losses"),
                                  res.pop("train_runtime"))
    return {**outputs, **res, "recipe": _recipe_rel(kwargs["recipe"])}, ckpt


def _sft(ctx: Context, recipe: Path, overrides: list[str], workdir: Path, env: dict[str, str] | None = None) -> Path:
    from qzoom_swift.bench.sft import swift_sft

    return swift_sft(recipe, overrides, workdir, env, in_process=ctx.args.sft == "in-process")


def _recipe_rel(recipe: Path) -> str:
    """``recipes/...`` of a recipe path, also of one that a cached stage recorded in another checkout."""
    if recipe.is_relative_to(RECIPES.parents[1]):
        return str(recipe.relative_to(RECIPES.parents[1]))
    parts = recipe.parts
    return str(Path(*parts[parts.index(RECIPES.parent.name):])) if RECIPES.parent.name in parts else str(recipe)


def _model_dir(ctx: Context) -> str:
    return ctx.outputs("toy_base")["model_dir"]


# ---------------------------------------------------------------------------------------------------- stages


def _stage_bench(ctx: Context) -> StageResult:
    from qzoom_swift.bench.dataset import write_bench, write_evalscope_split
    from qzoom_swift.bench.render import BenchSpec

    c = ctx.cfg
    spec = BenchSpec.for_canvas(c.canvas, free_placement=c.free_placement, distractors=c.distractors)
    marker = write_bench(ctx.path("bench"), {"train": c.train_images, "val": c.val_images, "test": c.test_images},
                         seed=c.seed, spec=spec, progress=True)
    meta = json.loads(marker.read_text())
    q = meta["questions"]
    evalscope_root = write_evalscope_split(marker.parent, "test")
    outputs = {"root": str(marker.parent), "meta": meta, "evalscope_data_root": str(evalscope_root)}
    line = (f"{c.train_images}/{c.val_images}/{c.test_images} images (train/val/test), "
            f"{meta['spec']['canvas']} px; test questions {q['test']['fine']} fine + {q['test']['coarse']} coarse "
            f"-> {marker.parent}")
    return StageResult(line, outputs, [str(marker), str(evalscope_root)], run_id=_sha(marker))


def _toy_bench_root(ctx: Context) -> tuple[str, DemoConfig]:
    """The bench the toy base learns from and the settings it is trained with: this preset's, or (``toy_preset``)
    another preset's bench, written under ``toy_bench/`` exactly as that preset writes it, so its cached toy
    base is found again."""
    from qzoom_swift.bench.dataset import write_bench
    from qzoom_swift.bench.render import BenchSpec

    if not ctx.cfg.toy_preset:
        return ctx.outputs("bench")["root"], ctx.cfg
    t = PRESETS[ctx.cfg.toy_preset]
    spec = BenchSpec.for_canvas(t.canvas, free_placement=t.free_placement, distractors=t.distractors)
    marker = write_bench(ctx.path("toy_bench"), {"train": t.train_images, "val": t.val_images,
                                                 "test": t.test_images}, seed=t.seed, spec=spec, progress=True)
    return str(marker.parent), t


def _stage_toy_base(ctx: Context) -> StageResult:
    from qzoom_swift.bench.toy_model import serving_copy, train_toy_base
    from qzoom_swift.synthetic.models import cache_root

    c = ctx.cfg
    cache = Path(ctx.args.cache_dir) if ctx.args.cache_dir is not None else cache_root()
    bench_root, t = _toy_bench_root(ctx)
    rec = train_toy_base(bench_root, cache, seed=t.seed, warmup_steps=t.warmup_steps, steps=t.toy_steps,
                         batch=t.toy_batch, curriculum=t.curriculum, low_tokens=t.low_tokens,
                         high_tokens=t.high_tokens, freeze_vision=t.toy_freeze_vision, numerics=c.numerics,
                         in_process=ctx.args.sft == "in-process")
    model_dir, key = rec["model_dir"], rec["key"]
    served = ""
    if c.high_tokens > t.high_tokens:  # the toy's processor caps images at the budget it was trained up to
        model_dir = str(serving_copy(model_dir, c.high_tokens))
        key = f"{key}-max{c.high_tokens}"
        served = f"; served with a {c.high_tokens}-token image cap -> {model_dir}"
    w = rec["warmup"]
    outputs = {"model_dir": model_dir, "trained_model_dir": rec["model_dir"], "toy_preset": c.toy_preset or None,
               "trained_on": json.loads((Path(bench_root) / "bench.json").read_text())["spec"]["canvas"],
               "params": w["params"],
               "params_without_embedding": w["params_without_embedding"], "warmup_accuracy": w["ema_accuracy"],
               "warmup_seconds": w["seconds"], "sft_seconds": rec["sft_seconds"], "steps": rec["steps"],
               "batch": rec["batch"], "loss_first": rec["losses"][0][1] if rec["losses"] else None,
               "loss_last": rec["losses"][-1][1] if rec["losses"] else None, "recipe": _recipe_rel(Path(rec["recipe"])),
               "cache_key": rec["key"]}
    origin = f"the {c.toy_preset} preset's, " if c.toy_preset else ""
    line = (f"Qwen2.5-VL toy ({origin}trained on {outputs['trained_on']} px scenes), "
            f"{w['params_without_embedding'] / 1e6:.1f} M params + embedding; warm-up {w['seconds']:.0f} s (digit acc "
            f"{w['ema_accuracy']:.2f}), swift sft {rec['steps']} x {rec['batch']} in {rec['sft_seconds']:.0f} s"
            f"{' (cached)' if rec['reused'] else ''} -> {rec['model_dir']}{served}")
    return StageResult(line, outputs, [model_dir], run_id=key, reused=rec["reused"])


def _stage_pseudo_labels(ctx: Context) -> StageResult:
    from qzoom_swift.bench.dataset import questions_path
    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels

    c = ctx.cfg
    rows = _rows(questions_path(ctx.outputs("bench")["root"], "train"))[: 2 * c.label_images]
    dataset = write_jsonl_atomic(ctx.path("stage1", "label_input.jsonl"), rows)
    out = ctx.path("stage1", "labels")
    summary = _label_job(run_pseudo_labels, lambda: PseudoLabelOptions(
        model=_model_dir(ctx), dataset=str(dataset), out=str(out), batch_size=8, max_new_tokens=c.label_new_tokens,
        heads=c.label_heads, queries=c.label_queries, sink=c.label_sink, tau_fg=c.label_tau_fg,
        max_tokens=c.high_tokens, progress=True),
        out, ctx.fresh)
    shards = [str(out / s) for s in summary["shards"]]
    if not shards:
        raise RuntimeError(f"pseudo-labels wrote no shard under {out}")
    counts = summary["outcomes"]
    outputs = {"dir": str(out), "shards": shards, "outcomes": counts, "ignored": summary["ignored"],
               "head_selection": summary["head_selection"], "label_tokens": c.high_tokens,
               "queries": c.label_queries, "sink_filter": summary["sink_filter"],
               "samples_per_s": summary["this_run"]["samples_per_s"]}
    line = (f"{len(rows)} questions at {c.high_tokens} tokens: {counts['labelled']} labelled, {summary['ignored']} "
            f"ignored, {counts['rejected']} rejected -> {out}")
    return StageResult(line, outputs, shards)


def _stage_rpn_train(ctx: Context) -> StageResult:
    from qzoom_swift.bench.toy_model import budget_kwargs

    c = ctx.cfg
    rows, grids = [], []
    for shard in ctx.outputs("pseudo_labels")["shards"]:
        for row in _rows(Path(shard)):
            rows.append({"messages": row["messages"], "images": row["images"],
                         "qzoom_rpn_labels": row.get("qzoom_rpn_labels"),
                         "chat_template_kwargs": budget_kwargs(c.low_tokens)})
            grids.append(row.get("qzoom_attn_grid"))
    train = write_jsonl_atomic(ctx.path("stage1", "rpn_train.jsonl"), rows)
    env = {"QZOOM_TAU_ROI": str(c.tau_roi), "QZOOM_LOW_MIN_TOKENS": str(c.low_tokens),
           "QZOOM_LOW_MAX_TOKENS": str(c.low_tokens)}  # saved into the checkpoint: the budget the RPN learns at
    if c.trainer == "llamafactory":
        from qzoom_swift.bench.lf_train import recipe_qzoom_settings

        # LLaMA-Factory's label column has one length: a row ignored at labelling names its grid (all cells ignored)
        lf_rows = [r if r["qzoom_rpn_labels"] is not None else {**r, "qzoom_attn_grid": g} for r, g in zip(rows, grids)]
        outputs, ckpt = _train_lf(ctx, "stage1", train="rpn", job=Path(ctx.outputs("pseudo_labels")["dir"]),
                                  rows=lf_rows, recipe=LF_STAGE1_RECIPE, steps=c.rpn_steps,
                                  qzoom_overrides=recipe_qzoom_settings(STAGE1_RECIPE, env))
    else:
        out = ctx.path("stage1", "train")
        shutil.rmtree(out, ignore_errors=True)
        overrides = ["--model", _model_dir(ctx), "--dataset", str(train), "--output_dir", str(out),
                     "--max_steps", str(c.rpn_steps), "--save_steps", str(c.rpn_steps), "--seed", str(c.seed)]
        log = _sft(ctx, STAGE1_RECIPE, overrides, ctx.path("stage1"), env=env)
        outputs, ckpt = _train_outputs(out, c.rpn_steps, "qzoom_rpn_loss", log)
        outputs.update(recipe=_recipe_rel(STAGE1_RECIPE))
    outputs.update(rows=len(rows), labelled_rows=sum(r["qzoom_rpn_labels"] is not None for r in rows),
                   trainer=c.trainer)
    line = (f"{TRAINERS[c.trainer]} {outputs['recipe']} on {len(rows)} rows at {c.low_tokens} tokens: {c.rpn_steps} "
            f"steps, rpn loss {outputs['loss_first']:.4f} -> {outputs['loss_last']:.4f} -> {ckpt}")
    return StageResult(line, outputs, [str(ckpt / "qzoom_branch.safetensors")])


def _stage_gate_labels(ctx: Context) -> StageResult:
    from qzoom_swift.bench.dataset import questions_path
    from qzoom_swift.labels.gate_job import GateLabelOptions, run_gate_labels

    c = ctx.cfg
    root = ctx.outputs("bench")["root"]
    train_rows = _rows(questions_path(root, "train"))
    rows = train_rows[2 * c.label_images: 2 * (c.label_images + c.gate_images)]
    if not rows:
        raise RuntimeError(f"no train images left for stage 3: train_images={c.train_images} <= label_images="
                           f"{c.label_images}; raise train_images or lower label_images")
    dataset = write_jsonl_atomic(ctx.path("stage3", "label_input.jsonl"), rows)

    def job(dataset_path: str, out: Path) -> dict:
        return _label_job(run_gate_labels, lambda: GateLabelOptions(
            model=_model_dir(ctx), dataset=dataset_path, out=str(out), budgets=c.budgets, max_new_tokens=4,
            batch_size=8, stable_top=c.gate_stable_top, seed=c.seed, progress=True,
            # the toy answers one word to its own prompts: no suffix it never saw, exact match on that word
            matcher="exact", short_answer=False), out, ctx.fresh)

    train = job(str(dataset), ctx.path("stage3", "labels"))
    heldout = job(str(questions_path(root, "val")), ctx.path("stage3", "heldout"))
    outputs = {"budgets": list(c.budgets), "stable_top": c.gate_stable_top, "answered": train["answered"],
               "kinds": train["kinds"], "kept": train["kept"], "labels": train["labels"],
               "gate_train": train["gate_train"], "heldout_dir": str(ctx.path("stage3", "heldout")),
               "heldout_answered": heldout["answered"], "heldout_kinds": heldout["kinds"]}
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(train["kinds"].items()))
    line = (f"budgets {c.gate_budgets}: {train['answered']} answered ({kinds}), {train['kept']} kept "
            f"({train['labels']}); {heldout['answered']} held-out trajectories")
    return StageResult(line, outputs, [train["gate_train"], str(ctx.path("stage3", "heldout", "summary.json"))])


def _gate_rows_from_ground_truth(ctx: Context, path: Path) -> Path:
    """Fallback gate labels when the consistency filter keeps none (an undertrained toy, e.g. --preset quick):
    the bench's own question kinds, fine = 1 (zoom) and coarse = 0, at the low budget."""
    from qzoom_swift.bench.dataset import read_split
    from qzoom_swift.bench.toy_model import budget_kwargs

    kinds = {(r.image, r.question): r.kind for r in read_split(ctx.outputs("bench")["root"], "train")}
    rows = []
    for row in _rows(ctx.path("stage3", "label_input.jsonl")):
        question = row["messages"][0]["content"].replace("<image>", "").strip()
        rows.append({**row, "qzoom_gate": int(kinds[(row["images"][0], question)] == "fine"),
                     "chat_template_kwargs": budget_kwargs(ctx.cfg.low_tokens)})
    return write_jsonl_atomic(path, rows)


def _stage_gate_train(ctx: Context) -> StageResult:
    c = ctx.cfg
    out = ctx.path("stage3", "train")
    shutil.rmtree(out, ignore_errors=True)
    stage1 = ctx.outputs("rpn_train")["checkpoint"]
    train = Path(ctx.outputs("gate_labels")["gate_train"])
    notes, source = [], "consistency labels (qzoom gate-labels)"
    if not _rows(train):
        train = _gate_rows_from_ground_truth(ctx, ctx.path("stage3", "gate_train_ground_truth.jsonl"))
        source = "bench ground truth (fallback)"
        notes.append("the consistency filter kept no gate label (the toy base cannot yet read the digit at the top "
                     "budget), so the gate trained on the bench's question kinds instead: fine = zoom, coarse = not")
    if c.trainer == "llamafactory":
        from qzoom_swift.bench.lf_train import recipe_qzoom_settings

        outputs, ckpt = _train_lf(ctx, "stage3", train="gate", job=Path(ctx.outputs("gate_labels")["gate_train"]).parent,
                                  rows=_rows(train), recipe=LF_STAGE3_RECIPE, steps=c.gate_steps, checkpoint=stage1,
                                  qzoom_overrides=recipe_qzoom_settings(STAGE3_RECIPE))
        start = "--checkpoint <stage 1>"
    else:
        overrides = ["--model", _model_dir(ctx), "--adapters", stage1, "--dataset", str(train), "--output_dir",
                     str(out), "--max_steps", str(c.gate_steps), "--save_steps", str(c.gate_steps), "--seed", str(c.seed)]
        log = _sft(ctx, STAGE3_RECIPE, overrides, ctx.path("stage3"))
        outputs, ckpt = _train_outputs(out, c.gate_steps, "qzoom_gate_loss", log)
        outputs.update(recipe=_recipe_rel(STAGE3_RECIPE))
        start = "--adapters <stage 1>"
    outputs.update(adapters=stage1, labels=source, dataset=str(train), trainer=c.trainer)
    line = (f"{TRAINERS[c.trainer]} {outputs['recipe']} {start} on {source}: {c.gate_steps} steps, gate loss "
            f"{outputs['loss_first']:.4f} -> {outputs['loss_last']:.4f} -> {ckpt}")
    return StageResult(line, outputs, [str(ckpt / "qzoom_branch.safetensors")], notes=notes)


def _stage_calibrate(ctx: Context) -> StageResult:
    from qzoom_swift.labels.gate_job import calibrate_gate

    ckpt = ctx.outputs("gate_train")["checkpoint"]
    res = calibrate_gate(_model_dir(ctx), ckpt, ctx.outputs("gate_labels")["heldout_dir"],
                         max_accuracy_drop=ctx.cfg.max_accuracy_drop, rule=ctx.cfg.threshold_rule)
    outputs = {"checkpoint": ckpt, "tau_gate": res.tau_gate, "accuracy": res.accuracy, "skip_ratio": res.skip_ratio,
               "samples": res.samples, "curve_png": res.curve_png, "config": res.config,
               "max_accuracy_drop": ctx.cfg.max_accuracy_drop, "rule": res.rule, "plateau": list(res.plateau)}
    line = (f"tau_gate {res.tau_gate:.4g} ({res.rule} of the plateau {res.plateau[0]:.3g} < tau <= "
            f"{res.plateau[1]:.3g}) on {res.samples} held-out trajectories (estimated accuracy "
            f"{res.accuracy:.3f}, no-RoI ratio {res.skip_ratio:.2f}) -> {res.config}")
    return StageResult(line, outputs, [res.config, res.curve_png])


def eval_runs(cfg: DemoConfig):
    from qzoom_swift.bench.evaluate import EvalRun

    low, fallback, roi_max = cfg.low_tokens, cfg.roi_fallback, cfg.roi_max_tokens
    return [EvalRun(f"baseline@{low}", "never", low), EvalRun(f"baseline@{4 * low}", "never", 4 * low),
            EvalRun(f"baseline@{cfg.high_tokens}", "never", cfg.high_tokens),
            EvalRun("qzoom", "zoom", low, fallback, roi_max), EvalRun("always", "always", low, fallback, roi_max)]


def _overlay_items(qz, records, rows: list[dict], n: int) -> list[dict]:
    """RPN heatmaps (low-resolution pass) of the first ``n`` fine and a few coarse test questions."""
    import torch
    from PIL import Image

    from qzoom_swift.inputs import chat_inputs

    cfg = qz.config
    zoom_rows = {r["id"]: r for r in rows if r["run"] == "qzoom"}
    fine = [r for r in records if r.kind == "fine"]
    coarse = [r for r in records if r.kind == "coarse"]
    chosen = fine[: max(1, n - n // 3)] + coarse[: n // 3]
    items = []
    for rec in chosen:
        with Image.open(rec.image) as im:
            image = im.convert("RGB")
        low = qz.adapter.resize_for_budget(image, cfg.low_min_tokens, cfg.low_max_tokens)
        inputs = chat_inputs(qz.processor, [[low]], [rec.question])
        state = qz.prefill(branches=("rpn",), **inputs)
        heat = torch.sigmoid(state.heatmaps()[0].float()).tolist()
        row = zoom_rows.get(rec.id, {})
        items.append({"image": rec.image, "kind": rec.kind, "answer": rec.answer, "gt_box": list(rec.box),
                      "heatmap": heat, "box": row.get("box"), "gate_prob": row.get("gate_prob") or 0.0,
                      "zoomed": row.get("zoomed"), "model_answer": row.get("answer")})
    return items


def _stage_evaluate(ctx: Context) -> StageResult:
    import torch
    from PIL import Image

    from qzoom_swift.bench.dataset import read_split
    from qzoom_swift.bench.evaluate import answer_all, pseudo_label_quality, summarise
    from qzoom_swift.config import effective_config
    from qzoom_swift.model import QZoomModel

    c = ctx.cfg
    root = ctx.outputs("bench")["root"]
    records = read_split(root, c.eval_split)
    ckpt = ctx.outputs("calibrate")["checkpoint"]
    qz = QZoomModel.from_pretrained(_model_dir(ctx), checkpoint=ckpt)
    runs = eval_runs(c)
    answers = ctx.path("evaluate", "answers.jsonl")
    if ctx.fresh:
        answers.unlink(missing_ok=True)
    for rec in records[:2]:  # warm-up: first calls pay one-off allocations
        with Image.open(rec.image) as im:
            image = im.convert("RGB")
        for run in runs:
            with torch.inference_mode():
                qz.generate([image], rec.question, config_overrides=run.overrides(), max_new_tokens=c.eval_new_tokens)
    rows = answer_all(qz, records, runs, answers, max_new_tokens=c.eval_new_tokens)
    grid = int(round(c.low_tokens ** 0.5))
    summary = summarise(rows, records, runs, f"baseline@{c.high_tokens}", grid)
    gt = {(r.image, r.question): r for r in read_split(root, "train")}
    shard_rows = [row for s in ctx.outputs("pseudo_labels")["shards"] for row in _rows(Path(s))]
    summary["pseudo_labels"] = pseudo_label_quality(shard_rows, gt)
    summary["overlays"] = _overlay_items(qz, records, rows, c.overlays)
    # the settings the gated run answered with: the checkpoint's, then the run's overrides (the report shows these)
    qzoom_run = next(run for run in runs if run.name == "qzoom")
    summary["config"] = {k: v for k, v in effective_config(qz.config, qzoom_run.overrides()).to_dict().items()
                         if k != "extra"}
    summary["threads"] = torch.get_num_threads()
    summary["cpu_kernels"] = torch.backends.cpu.get_cpu_capability()
    summary["split"] = c.eval_split
    path = write_json_atomic(ctx.path("evaluate", "metrics.json"), summary)
    r = summary["runs"]
    q = r["qzoom"]
    line = (f"{len(records)} {c.eval_split} questions x {len(runs)} runs: Q-Zoom acc {q['accuracy']:.3f} at "
            f"{q['relative_throughput']:.2f}x the {summary['reference']} throughput (baseline acc "
            f"{r[summary['reference']]['accuracy']:.3f}; ceiling baseline@{c.low_tokens} "
            f"{r[f'baseline@{c.low_tokens}']['relative_throughput']:.2f}x), zoom rate {q['zoom_rate']:.2f} -> {path}")
    return StageResult(line, {"metrics": str(path), "answers": str(answers)}, [str(path)])


def _variant_dir(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+-]", "-", name)


def _stage_variants(ctx: Context) -> StageResult:
    """The trained pipeline (no retraining) on harder test sets: every run of the evaluation, accuracy and boxes."""
    from qzoom_swift.bench.dataset import read_split, write_bench
    from qzoom_swift.bench.evaluate import answer_all, summarise
    from qzoom_swift.bench.render import BenchSpec

    c = ctx.cfg
    specs = c.variant_specs()
    if not specs:
        path = write_json_atomic(ctx.path("variants", "metrics.json"), {"variants": {}})
        return StageResult("none asked (--set variants=free_placement,distractors=2 adds them)", {"metrics": str(path)},
                           [str(path)], run_id="none")
    from qzoom_swift.model import QZoomModel

    qz = QZoomModel.from_pretrained(_model_dir(ctx), checkpoint=ctx.outputs("calibrate")["checkpoint"])
    runs, grid = eval_runs(c), int(round(c.low_tokens ** 0.5))
    results = {}
    for name, fields in specs.items():
        spec = BenchSpec.for_canvas(c.canvas, **{"free_placement": c.free_placement, "distractors": c.distractors,
                                                  **fields})
        folder = ctx.path("variants", _variant_dir(name))
        marker = write_bench(folder / "bench", {"test": c.test_images}, seed=c.seed, spec=spec, progress=True)
        records = read_split(marker.parent, "test")
        answers = folder / "answers.jsonl"
        if ctx.fresh:
            answers.unlink(missing_ok=True)
        rows = answer_all(qz, records, runs, answers, max_new_tokens=c.eval_new_tokens)
        metrics = summarise(rows, records, runs, f"baseline@{c.high_tokens}", grid)
        results[name] = {"spec": spec.to_dict(), "questions": json.loads(marker.read_text())["questions"]["test"],
                         "answers": str(answers), "runs": metrics["runs"]}
    path = write_json_atomic(ctx.path("variants", "metrics.json"), {"variants": results})
    line = "; ".join(f"{name}: Q-Zoom acc {r['runs']['qzoom']['accuracy']:.3f} (16x baseline "
                     f"{r['runs'][f'baseline@{c.high_tokens}']['accuracy']:.3f})" for name, r in results.items())
    return StageResult(f"{line} -> {path}", {"metrics": str(path)}, [str(path)])


def _stage_vllm(ctx: Context) -> StageResult:
    """The evaluated split answered again on vLLM (``bench/vllm_rows.py`` in the ``vllm_bin`` environment), each
    row beside its transformers row from the evaluation's answers."""
    from dataclasses import asdict

    from qzoom_swift.bench.vllm_rows import (
        ANSWERS_FILE,
        FLAG_POINTS,
        VLLMRowsSpec,
        compare,
        run_in_environment,
        vllm_environment,
        vllm_runs,
    )

    c = ctx.cfg
    venv = vllm_environment(c.vllm_bin)
    runs = vllm_runs(c.low_tokens, c.high_tokens, c.roi_fallback, c.roi_max_tokens)
    out = ctx.path("vllm")
    if ctx.fresh:
        (out / ANSWERS_FILE).unlink(missing_ok=True)
    spec = VLLMRowsSpec(model_dir=_model_dir(ctx), checkpoint=ctx.outputs("calibrate")["checkpoint"],
                        bench_root=ctx.outputs("bench")["root"], out=str(out), runs=[asdict(r) for r in runs],
                        reference=runs[-1].name, low_tokens=c.low_tokens, split=c.eval_split,
                        max_new_tokens=c.eval_new_tokens, batch_size=c.vllm_batch)
    metrics = run_in_environment(venv, spec, ctx.path("logs", "vllm.log"))  # the stage's log
    comparison = compare(_rows(out / ANSWERS_FILE), metrics, _rows(Path(ctx.outputs("evaluate")["answers"])))
    result = {"runs": metrics["runs"], "reference": metrics["reference"], "comparison": comparison,
              "batch": c.vllm_batch, "versions": venv.versions, "engine_start_s": metrics["engine_start_s"],
              "flag_points": FLAG_POINTS, "answers": str(out / ANSWERS_FILE)}
    path = write_json_atomic(out / "comparison.json", result)
    parts = []
    for name, cmp in comparison.items():
        flag = " FLAG" if cmp.get("flag") else ""
        parts.append(f"{name} {cmp['accuracy_vllm']:.3f} vs {cmp['accuracy_transformers']:.3f} "
                     f"({cmp['difference_points']:+.1f} points{flag})" if cmp.get("questions") else f"{name}: -")
    vllm = venv.versions.get("vllm")
    line = (f"{metrics['runs'][runs[0].name]['samples']} {c.eval_split} questions, vLLM {vllm}, batch {c.vllm_batch}; "
            f"accuracy vLLM vs transformers: {'; '.join(parts)} -> {path}")
    return StageResult(line, {"comparison": str(path), "answers": str(out / ANSWERS_FILE)}, [str(path)])


STAGES: tuple[Stage, ...] = (
    Stage("bench", "bench data", (), ("seed", "canvas", "free_placement", "distractors", "train_images",
                                      "val_images", "test_images"), _stage_bench),
    Stage("toy_base", "toy base VLM (warm-up + swift sft)", ("bench",),
          ("seed", "toy_preset", "warmup_steps", "toy_steps", "toy_batch", "curriculum", "toy_freeze_vision",
           "low_tokens", "high_tokens", "numerics"),
          _stage_toy_base, own_cache=True),
    Stage("pseudo_labels", "stage 1: pseudo labels", ("bench", "toy_base"),
          ("label_images", "label_new_tokens", "label_heads", "label_queries", "label_sink", "label_tau_fg",
           "high_tokens"),
          _stage_pseudo_labels),
    Stage("rpn_train", "stage 1: RPN training ({trainer})", ("toy_base", "pseudo_labels"),
          ("rpn_steps", "low_tokens", "tau_roi", "seed"), _stage_rpn_train, recipe=STAGE1_RECIPE,
          lf_recipe=LF_STAGE1_RECIPE),
    Stage("gate_labels", "stage 3: gate labels", ("bench", "toy_base"),
          ("label_images", "gate_images", "gate_budgets", "gate_stable_top", "seed"), _stage_gate_labels),
    Stage("gate_train", "stage 3: gate training ({trainer})", ("toy_base", "rpn_train", "gate_labels"),
          ("gate_steps", "seed"), _stage_gate_train, recipe=STAGE3_RECIPE, lf_recipe=LF_STAGE3_RECIPE),
    Stage("calibrate", "stage 3: gate calibration", ("toy_base", "gate_labels", "gate_train"),
          ("max_accuracy_drop", "threshold_rule"), _stage_calibrate),
    Stage("evaluate", "evaluation (baselines, Q-Zoom)", ("bench", "toy_base", "pseudo_labels", "calibrate"),
          ("low_tokens", "high_tokens", "eval_new_tokens", "overlays", "roi_fallback", "roi_max_tokens", "eval_split"),
          _stage_evaluate),
    Stage("variants", "evaluation on harder variants", ("bench", "toy_base", "calibrate"),
          ("variants", "test_images", "seed", "canvas", "free_placement", "distractors", "low_tokens", "high_tokens",
           "eval_new_tokens", "roi_fallback", "roi_max_tokens"), _stage_variants),
)


VLLM_STAGE = Stage("vllm", "evaluation on vLLM", ("bench", "toy_base", "calibrate", "evaluate"),
                   ("low_tokens", "high_tokens", "eval_new_tokens", "roi_fallback", "roi_max_tokens", "eval_split",
                    "vllm_batch"), _stage_vllm)
"""Runs only with ``DemoConfig.vllm_bin`` set (``stages_for``): a run without it keeps its nine stages."""


def stages_for(cfg: DemoConfig) -> tuple[Stage, ...]:
    return STAGES + ((VLLM_STAGE,) if cfg.vllm_bin else ())


def _stage_key(ctx: Context, stage: Stage) -> dict[str, Any]:
    upstream = {d: ctx.records[d]["run_id"] for d in stage.deps if d in ctx.records}
    key = {"settings": {k: getattr(ctx.cfg, k) for k in stage.settings}, "upstream": upstream}
    if stage.recipe is not None:
        key["recipe"] = _sha(stage.recipe)
    if stage.lf_recipe is not None and ctx.cfg.trainer != "swift":  # a swift run keeps the key it had before
        key.update(trainer=ctx.cfg.trainer, lf_recipe=_sha(stage.lf_recipe))
    return key


def _cached(ctx: Context, stage: Stage, key: dict[str, Any]) -> dict | None:
    path = ctx.path("stages", f"{stage.name}.json")
    if ctx.args.force or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or record.get("status") != "ran":
        return None
    if not all(Path(p).exists() for p in record.get("artefacts", [])):
        return None
    return record


def _run_stage(ctx: Context, index: int, stage: Stage, total: int = len(STAGES)) -> dict:
    from qzoom_swift.bench.sft import output_to

    key = _stage_key(ctx, stage)
    record = None if stage.own_cache else _cached(ctx, stage, key)
    title = stage.title_for(ctx.cfg)
    prefix = f"[{index}/{total}] {title:<36}"
    if record is not None:
        record = {**record, "this_run": "cached"}
    else:
        log = ctx.path("logs", f"{stage.name}.log")
        ctx.fresh = ctx.args.force or ctx.path("stages", f"{stage.name}.json").exists()
        ctx.path("stages", f"{stage.name}.json").unlink(missing_ok=True)  # not done until it finishes again
        log.unlink(missing_ok=True)
        print(f"{prefix} running... (progress: tail -f {log})", flush=True)
        t0 = time.perf_counter()
        try:
            with output_to(log):
                result = stage.run(ctx)
        except Exception:
            print(f"[{index}/{total}] {title}: FAILED; log {log}:", file=sys.stderr)
            print(log.read_text(errors="replace")[-3000:] if log.exists() else "", file=sys.stderr)
            raise
        seconds = time.perf_counter() - t0
        record = {"name": stage.name, "title": title, "key": key, "status": "ran",
                  "seconds": round(seconds, 3), "line": result.line, "outputs": result.outputs,
                  "artefacts": result.artefacts, "notes": result.notes, "log": str(log),
                  "run_id": result.run_id or f"{time.time():.6f}", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(ctx.path("stages", f"{stage.name}.json"), record)
        record = {**record, "this_run": "cached" if result.reused else "ran"}
    ctx.records[stage.name] = record
    status = {"ran": "", "cached": " (cached)"}[record["this_run"]]
    print(f"{prefix} {record['seconds']:7.1f} s{status}  {record['line']}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------------- run


def library_versions() -> dict[str, str]:
    """The libraries whose behaviour the numbers depend on (the report states them)."""
    from qzoom_swift.bench.side_env import installed_versions

    return installed_versions({"torch": ("torch",), "transformers": ("transformers",), "ms-swift": ("ms_swift",),
                               "evalscope": ("evalscope",)}, missing="not installed")


def demo_seeds(cfg: DemoConfig) -> dict[str, Any]:
    """Every seed the demo sets, all derived from ``DemoConfig.seed`` (the report states them)."""
    from qzoom_swift.bench.dataset import SPLITS, split_seed

    return {"demo": cfg.seed, "bench_splits": {s: split_seed(cfg.seed, s) for s in SPLITS},
            "toy_warmup_and_sft_rows": cfg.seed, "swift_sft": cfg.seed, "gate_label_draw": cfg.seed,
            "variant_test_sets": split_seed(cfg.seed, "test")}


def _vllm_summary(ctx: Context) -> dict[str, Any] | None:
    """The vLLM rows beside the transformers rows (``vllm/comparison.json``), when the stage ran."""
    if "vllm" not in ctx.records:
        return None
    return json.loads(Path(ctx.outputs("vllm")["comparison"]).read_text())


def _summary(ctx: Context, metrics: dict[str, Any], figures: dict[str, str], total: float) -> dict[str, Any]:
    args, cfg = ctx.args, ctx.cfg
    this_run = Counter(r["this_run"] for r in ctx.records.values())
    variants = json.loads(Path(ctx.outputs("variants")["metrics"]).read_text())["variants"]
    return {
        "command": " ".join(["qzoom", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else "qzoom demo",
        "preset": args.preset, "demo_config": dataclasses.asdict(cfg), "config": metrics["config"],
        "sft": args.sft, "versions": library_versions(), "seeds": demo_seeds(cfg),
        "trainer": {"name": cfg.trainer, "command": TRAINERS[cfg.trainer],
                    "versions": ctx.outputs("rpn_train").get("lf_versions")},
        "bench": ctx.outputs("bench")["meta"], "metrics": {k: v for k, v in metrics.items() if k != "overlays"},
        "variants": variants, "vllm": _vllm_summary(ctx),
        "calibration": {k: ctx.outputs("calibrate").get(k) for k in ("rule", "plateau", "tau_gate")},
        "model_dir": _model_dir(ctx), "checkpoint": ctx.outputs("calibrate")["checkpoint"],
        "evalscope_data_root": ctx.outputs("bench")["evalscope_data_root"],
        "acceptance": acceptance(metrics, cfg), "ceiling": throughput_ceiling(metrics, cfg), "figures": figures,
        "stages_ran": this_run.get("ran", 0), "stages_cached": this_run.get("cached", 0),
        "stages": ctx.records, "total_s": round(total, 3),
    }


def _pin_numerics(numerics: str) -> None:
    """Set ``NUMERICS_ENV[numerics]`` for this process and its ``swift`` children; torch reads it once at import, so
    a torch imported earlier (the demo run inside another Python program) cannot be pinned: say so."""
    env = NUMERICS_ENV[numerics]
    if env and "torch" in sys.modules:
        print(f"qzoom demo: torch was imported before the demo started, so numerics={numerics} cannot pin its "
              "threads and kernels; the figures may differ from another machine's (run `qzoom demo` as a command)",
              file=sys.stderr)
    os.environ.update(env)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    cfg = demo_config(args.preset, args.overrides)
    from qzoom_swift.extras import require_extra

    require_extra("swift", "qzoom demo (it trains the toy and the branches with swift sft)")
    if cfg.trainer == "llamafactory":  # before any stage runs: a missing environment is a start-up error
        from qzoom_swift.bench.lf_train import lf_environment

        try:
            lf_environment(cfg.lf_bin)
        except (OSError, RuntimeError) as exc:
            raise SystemExit(f"qzoom demo: {exc}") from exc
    if cfg.vllm_bin:  # likewise the vLLM environment
        from qzoom_swift.bench.vllm_rows import vllm_environment

        try:
            vllm_environment(cfg.vllm_bin)
        except (OSError, RuntimeError) as exc:
            raise SystemExit(f"qzoom demo: {exc}") from exc
    # On a shared CPU, OpenMP threads spinning at barriers while another process holds a core make every
    # torch op several times slower. Passive waiting must be chosen before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _pin_numerics(cfg.numerics)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MODELSCOPE_CACHE", str(out / ".modelscope"))  # swift's dataset caches, not ~/.cache
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = Context(args, cfg, out)
    print(f"qzoom demo ({args.preset}): Q-Zoom on the zoom bench - a toy Qwen2.5-VL trained here, stage 1, "
          f"stage 3, evaluation against baselines -> {out}", flush=True)
    from qzoom_swift.fileio import quiet_transformers

    quiet_transformers()
    stages = stages_for(cfg)
    for i, stage in enumerate(stages, 1):
        _run_stage(ctx, i, stage, len(stages))

    from qzoom_swift.bench.plots import plot_overlays, plot_pareto

    metrics = json.loads(Path(ctx.outputs("evaluate")["metrics"]).read_text())
    figures = {"pareto": str(plot_pareto(metrics, out / "pareto.png", RUN_LABELS)),
               "overlays": str(plot_overlays(metrics["overlays"], out / "overlays.png"))}
    figures["gate_calibration"] = str(shutil.copyfile(ctx.outputs("calibrate")["curve_png"],
                                                      out / "gate_calibration.png"))
    total = time.perf_counter() - t_start
    summary = _summary(ctx, metrics, figures, total)
    summary["metrics"]["threads"] = metrics["threads"]
    summary["metrics"]["cpu_kernels"] = metrics.get("cpu_kernels")
    report = write_text_atomic(out / "report.md", render_report(summary))
    summary["report"] = str(report)
    path = write_json_atomic(out / "summary.json", summary)
    print()
    print(f"{'run':<16} {'tokens':>7} {'acc':>6} {'fine':>6} {'coarse':>6} {'vs 16x':>7} {'zoom f/c':>11}")
    for name, r in metrics["runs"].items():
        zr = "-" if r["mode"] == "never" else f"{r['zoom_rate_fine']:.2f}/{r['zoom_rate_coarse']:.2f}"
        print(f"{name:<16} {r['mean_visual_tokens']:>7.1f} {r['accuracy']:>6.3f} {r['accuracy_fine']:>6.3f} "
              f"{r['accuracy_coarse']:>6.3f} {r['relative_throughput']:>6.2f}x {zr:>11}")
    for name, cmp in (summary["vllm"] or {}).get("comparison", {}).items():
        if cmp.get("questions"):
            print(f"{name:<20} acc {cmp['accuracy_vllm']:.3f} vs transformers {cmp['accuracy_transformers']:.3f} "
                  f"({cmp['difference_points']:+.1f} points{', FLAG: over 1 point' if cmp['flag'] else ''}), same "
                  f"answer {100 * cmp['same_answer']:.1f}%")
    ceiling = summary["ceiling"]
    print(f"\nattainable ceiling (baseline@{cfg.low_tokens} vs 16x): {ceiling['end_to_end']:.2f}x end to end, "
          f"{ceiling['prefill']:.2f}x prefill; Q-Zoom {ceiling['qzoom']:.2f}x = {100 * ceiling['qzoom_fraction']:.0f}% "
          f"of it")
    met = sum(a["met"] for a in summary["acceptance"])
    print(f"\nacceptance targets met: {met}/{len(summary['acceptance'])} (see report)")
    print(f"total {total:.1f} s; wrote {report} and {path}")
    return 0
