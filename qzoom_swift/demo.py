"""``qzoom demo``: the whole Q-Zoom pipeline on a tiny local model and a synthetic dataset, on CPU.

Stages, in order (each writes its outputs under ``--out`` and a record ``stages/<name>.json``; a rerun
skips a stage whose record matches the current settings and whose files still exist, ``--force`` redoes
them all):

1. ``model``          build (once, cached under ``$QZOOM_CACHE``) a tiny random-weight model directory;
2. ``data``           a synthetic ms-swift dataset (one coloured shape per image; answer = its colour) and a
                      held-out set of the same kind;
3. ``pseudo_labels``  stage 1: self-distilled tri-state RPN labels from the model's own attention
                      (:func:`qzoom_swift.labels.pseudo.run_pseudo_labels`, raised thresholds: a random model
                      attends almost uniformly);
4. ``rpn_train``      stage 1: ``swift sft recipes/tiny/stage1_sdrpn.yaml`` on those shards (only the RPN trains);
5. ``gate_labels``    stage 3: answers along a resolution trajectory, consistency-filtered
                      (:func:`qzoom_swift.labels.gate_job.run_gate_labels`); a random model answers noise, so
                      every trajectory is ``always_wrong`` and no label survives;
6. ``gate_train``     stage 3: ``swift sft recipes/tiny/stage3_gate.yaml --adapters <stage-1 checkpoint>`` on a
                      small *synthetic* labelled set (the gate-label job above leaves none);
7. ``calibrate``      stage 3: ``calibrate_gate`` on synthetic held-out trajectories writes ``tau_gate`` into the
                      gate checkpoint;
8. ``zoom``           ``QZoomModel.from_pretrained(model, checkpoint=...)`` answers every record in modes
                      never / always / zoom (interleaved per record); per-sample ``ZoomStats`` and latency.

Then ``report.md`` and ``summary.json`` are written. LLaVA-1.5 encodes every image at one fixed resolution,
so it has no resolution trajectory: with ``--family llava`` the stage-3 steps are marked n/a and zoom
inference uses the stage-1 checkpoint (uncalibrated gate).

The weights are random: answers, gate decisions and boxes are noise. The demo checks the plumbing of
every stage end to end, not accuracy.

Only the standard library is imported at module level (``qzoom --help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
STAGE1_RECIPE = REPO_RECIPES / "stage1_sdrpn.yaml"
STAGE3_RECIPE = REPO_RECIPES / "stage3_gate.yaml"
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")
MODEL_TYPES = {"qwen2_5_vl": "qzoom_qwen2_5_vl", "qwen3_vl": "qzoom_qwen3_vl", "llava": "qzoom_llava1_5_hf"}
MODES = ("never", "always", "zoom")
IMAGE_SIZE = (392, 280)

# Tiny random models attend almost uniformly: raised thresholds give non-ignored labels (as in the tests).
FIT_THRESHOLDS = dict(tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9, min_peak=1e-3)
# Synthetic stage-3 data: (budget, label) per training row, alternating; 1 = still wrong here, zoom.
SYNTHETIC_GATE_ROWS = ((16, 1), (64, 0))
# Synthetic held-out trajectories for calibration: right/wrong per budget (cycled over the held-out records).
HELDOUT_BUDGETS = (144, 256, 576, 1024)
HELDOUT_PATTERNS = ((False, False, True, True), (False, True, True, True), (True, True, True, True),
                    (False, False, False, True), (False, False, False, False), (True, False, True, True),
                    (False, True, False, True), (True, True, True, True))
CALIBRATION_TARGET_SKIP = 0.5

NOTE = ("The model's weights are random, so its answers, gate decisions and boxes are noise and accuracy "
        "is meaningless. This demo checks the plumbing of the whole pipeline (labels, swift sft, "
        "calibration, zoom inference), stage by stage, on CPU. A measurable miniature (a trained toy VLM "
        "and a zoom benchmark) is a separate, later piece of work.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="output dir: every stage's files, report.md and summary.json (default: runs/demo)")
    p.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                   help="model family (default: qwen2_5_vl); llava has no resolution trajectory, so the stage-3 "
                        "steps do not apply to it")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny",
                   help="locally built model size (default: tiny; bench is slower)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="model cache (default: $QZOOM_CACHE, else ~/.cache/qzoom_swift)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and of the synthetic data")
    p.add_argument("--records", type=int, default=8, help="synthetic records (and held-out records) (default: 8)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of both swift sft runs (default: the tiny recipes' max_steps, 12 and 10)")
    p.add_argument("--budgets", default="16,36",
                   help="stage-3 resolution trajectory in visual tokens, ascending (default: 16,36)")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="tokens generated per answer in zoom inference, forced in every mode (default: 8)")
    p.add_argument("--sft", choices=("in-process", "subprocess"), default="in-process",
                   help="run swift sft inside this process (default; no second start-up) or as `swift sft` "
                        "subprocesses")
    p.add_argument("--force", action="store_true",
                   help="redo every stage (the cached model dir is kept: use `qzoom build-tiny --force`)")


# ------------------------------------------------------------------------------------------------ plumbing


@dataclass
class Stage:
    name: str
    title: str
    deps: tuple[str, ...]
    settings: tuple[str, ...]
    """Demo settings that change this stage's output."""
    run: Callable[[Context], StageResult]
    applies: Callable[[Context], bool] = lambda ctx: True


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
    out: Path
    settings: dict[str, Any]
    records: dict[str, dict] = field(default_factory=dict)
    fresh: bool = False
    """True when the running stage must start from scratch (--force, or its earlier outputs are stale);
    False when it never finished, so a resumable job continues where it stopped."""

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def outputs(self, stage: str) -> dict[str, Any]:
        return self.records[stage]["outputs"]


def _write_text_atomic(path: Path, text: str) -> Path:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_json(path: Path, data: Any) -> Path:
    return _write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (Python, C libraries, tqdm) to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _recipe_steps(recipe: Path) -> int:
    import yaml

    return int(yaml.safe_load(recipe.read_text())["max_steps"])


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


def _is_qwen(ctx: Context) -> bool:
    return ctx.args.family != "llava"


# ------------------------------------------------------------------------------------------------- swift sft


def swift_sft(recipe: Path, overrides: list[str], workdir: Path, train_branch: str, in_process: bool) -> Path:
    """``swift sft <recipe> <overrides>`` with QZOOM_TRAIN=train_branch; returns its log file.

    In-process: the YAML is expanded by ms-swift's own ``parse_yaml_args`` and ``sft_main`` runs here, with
    the environment restored afterwards and all output sent to the log. Subprocess: the real ``swift`` CLI.
    """
    from qzoom_swift.swift_plugin import plugin_path
    from qzoom_swift.testing.swift_cli import CPU_TRAIN_FLAGS, run_swift_concurrently

    argv = [str(recipe), *overrides, "--external_plugins", str(plugin_path()), *CPU_TRAIN_FLAGS]
    log = workdir / "sft.log"
    if log.exists():
        log.unlink()
    if not in_process:
        run = run_swift_concurrently({"sft": ["sft", *argv]}, workdir, env={"QZOOM_TRAIN": train_branch})["sft"]
        if run.returncode != 0:
            raise RuntimeError(f"swift sft failed (exit {run.returncode}); log {run.log}:\n{run.tail(2000)}")
        return run.log
    saved = dict(os.environ)
    try:
        os.environ["QZOOM_TRAIN"] = train_branch  # before the recipe's ENV block, which only fills unset keys
        with _output_to(log):
            from swift import sft_main
            from swift.cli.main import parse_yaml_args

            parse_yaml_args(argv)
            sft_main(argv)
    except BaseException as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"swift sft failed ({type(exc).__name__}: {exc}); log {log}:\n{tail}") from exc
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return log


def _train_outputs(out_dir: Path, steps: int, loss_key: str, log: Path) -> tuple[dict[str, Any], Path]:
    ckpt = out_dir / f"checkpoint-{steps}"
    if not (ckpt / "qzoom_branch.safetensors").is_file():
        raise RuntimeError(f"swift sft left no {ckpt}/qzoom_branch.safetensors; see {log}")
    logs = _rows(out_dir / "logging.jsonl")
    losses = [row[loss_key] for row in logs if loss_key in row]
    runtime = next((row["train_runtime"] for row in logs if "train_runtime" in row), None)
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    return {"checkpoint": str(ckpt), "steps": steps, "log": str(log), "loss_key": loss_key,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": [round(x, 6) for x in losses], "train_runtime_s": runtime,
            "trained_branches": config.get("extra", {}).get("trained_branches"),
            "branch_layer": config.get("branch_layer"), "branch_depth": config.get("branch_depth")}, ckpt


# ---------------------------------------------------------------------------------------------------- stages


def _stage_model(ctx: Context) -> StageResult:
    from qzoom_swift.testing.tiny import BUILDER_VERSION, build_model_dir, cache_root

    a = ctx.args
    root = Path(a.cache_dir) if a.cache_dir is not None else cache_root()
    existed = (root / "models" / f"{a.family}-{a.size}-s{a.seed}-v{BUILDER_VERSION}").exists()  # for the line
    model_dir = build_model_dir(a.family, a.size, cache_dir=a.cache_dir, seed=a.seed)
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    params = sum(os.path.getsize(p) for p in model_dir.glob("*.safetensors")) // 4  # float32 weights
    outputs = {"model_dir": str(model_dir), "architecture": (config.get("architectures") or ["?"])[0],
               "layers": text.get("num_hidden_layers"), "hidden_size": text.get("hidden_size"),
               "params_approx": params}
    line = (f"{outputs['architecture']}, {outputs['layers']} layers x {outputs['hidden_size']}, "
            f"~{params / 1e6:.1f} M params (random weights){'' if existed else ', built'} -> {model_dir}")
    return StageResult(line, outputs, [str(model_dir / "config.json")], run_id=model_dir.name, reused=existed)


def _stage_data(ctx: Context) -> StageResult:
    from qzoom_swift.testing.data import write_shape_dataset

    a = ctx.args
    data = write_shape_dataset(ctx.path("data"), n=a.records, size=IMAGE_SIZE, seed=a.seed)
    heldout = write_shape_dataset(ctx.path("heldout"), n=a.records, size=IMAGE_SIZE, seed=a.seed + 1000)
    outputs = {"dataset": str(data), "heldout": str(heldout), "records": a.records,
               "image_size": list(IMAGE_SIZE), "question": _rows(data)[0]["messages"][0]["content"]}
    line = f"{a.records} records + {a.records} held-out, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNGs -> {data}"
    return StageResult(line, outputs, [str(data), str(heldout)], run_id=_sha(data) + _sha(heldout))


def _stage_pseudo_labels(ctx: Context) -> StageResult:
    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels

    out = ctx.path("stage1", "labels")
    summary = _label_job(run_pseudo_labels, lambda: PseudoLabelOptions(
        model=ctx.outputs("model")["model_dir"], dataset=ctx.outputs("data")["dataset"], out=str(out),
        batch_size=4, max_new_tokens=4, calibration=min(4, ctx.args.records), progress=False, **FIT_THRESHOLDS),
        out, ctx.fresh)
    shards = [str(out / s) for s in summary["shards"]]
    counts = summary["outcomes"]
    outputs = {"dir": str(out), "shards": shards, "outcomes": counts, "ignored": summary["ignored"],
               "head_selection": summary["head_selection"], "thresholds": FIT_THRESHOLDS,
               "samples_per_s": summary["this_run"]["samples_per_s"]}
    line = (f"{counts['labelled']} labelled, {summary['ignored']} ignored, {counts['rejected']} rejected "
            f"(raised thresholds tau_fg 0.9 / tau_bg 0.8) -> {shards[0] if shards else out}")
    notes = [] if counts["labelled"] else ["no sample was labelled: the RPN trains on all-ignored maps (zero loss)"]
    if not shards:
        raise RuntimeError(f"pseudo-labels wrote no shard under {out}")
    return StageResult(line, outputs, shards, notes=notes)


def _stage_rpn_train(ctx: Context) -> StageResult:
    a = ctx.args
    out = ctx.path("stage1", "train")
    shutil.rmtree(out, ignore_errors=True)
    steps = a.steps or _recipe_steps(STAGE1_RECIPE)
    overrides = ["--model", ctx.outputs("model")["model_dir"], "--model_type", MODEL_TYPES[a.family],
                 "--dataset", *ctx.outputs("pseudo_labels")["shards"], "--output_dir", str(out),
                 "--max_steps", str(steps), "--save_steps", str(steps)]
    log = swift_sft(STAGE1_RECIPE, overrides, ctx.path("stage1"), "rpn", a.sft == "in-process")
    outputs, ckpt = _train_outputs(out, steps, "qzoom_rpn_loss", log)
    outputs["recipe"] = str(STAGE1_RECIPE.relative_to(REPO_RECIPES.parents[1]))
    line = (f"swift sft {outputs['recipe']} ({a.sft}): {steps} steps, rpn loss {outputs['loss_first']:.4f} -> "
            f"{outputs['loss_last']:.4f} -> {ckpt}")
    return StageResult(line, outputs, [str(ckpt / "qzoom_branch.safetensors")])


def _stage_gate_labels(ctx: Context) -> StageResult:
    from qzoom_swift.labels.gate_job import GateLabelOptions, run_gate_labels

    out = ctx.path("stage3", "labels")
    budgets = tuple(int(b) for b in str(ctx.args.budgets).split(","))
    summary = _label_job(run_gate_labels, lambda: GateLabelOptions(
        model=ctx.outputs("model")["model_dir"], dataset=ctx.outputs("data")["dataset"], out=str(out),
        budgets=budgets, max_new_tokens=2, batch_size=4, progress=False), out, ctx.fresh)
    kinds = summary["kinds"]
    outputs = {"dir": str(out), "budgets": list(budgets), "answered": summary["answered"], "kinds": kinds,
               "kept": summary["kept"], "labels": summary["labels"], "gate_train": summary["gate_train"]}
    kinds_text = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "none"
    line = f"budgets {','.join(map(str, budgets))}: {summary['answered']} answered ({kinds_text}), {summary['kept']} kept"
    notes = []
    if summary["kept"] == 0:
        line += " - random weights answer noise, no label survives"
        notes.append("every trajectory is wrong at every budget (always_wrong): a random model answers noise, so "
                     "the consistency filter keeps no gate label; the gate trains on synthetic labels instead")
    return StageResult(line, outputs, [str(out / "summary.json")], notes=notes)


def _patch_unit(model_dir: str) -> int:
    proc = json.loads((Path(model_dir) / "processor_config.json").read_text())["image_processor"]
    return int(proc["patch_size"]) * int(proc["merge_size"])


def _stage_gate_train(ctx: Context) -> StageResult:
    a = ctx.args
    model_dir = ctx.outputs("model")["model_dir"]
    unit = _patch_unit(model_dir)
    train = ctx.path("stage3", "gate_train_synthetic.jsonl")
    lines = []
    for i, row in enumerate(_rows(Path(ctx.outputs("data")["dataset"]))):
        budget, label = SYNTHETIC_GATE_ROWS[i % len(SYNTHETIC_GATE_ROWS)]
        lines.append(json.dumps({**row, "qzoom_gate": label, "chat_template_kwargs": {
            "min_pixels": budget * unit * unit, "max_pixels": budget * unit * unit}}))
    _write_text_atomic(train, "".join(line + "\n" for line in lines))

    out = ctx.path("stage3", "train")
    shutil.rmtree(out, ignore_errors=True)
    steps = a.steps or _recipe_steps(STAGE3_RECIPE)
    stage1 = ctx.outputs("rpn_train")["checkpoint"]
    overrides = ["--model", model_dir, "--model_type", MODEL_TYPES[a.family], "--adapters", stage1,
                 "--dataset", str(train), "--output_dir", str(out), "--max_steps", str(steps),
                 "--save_steps", str(steps)]
    log = swift_sft(STAGE3_RECIPE, overrides, ctx.path("stage3"), "gate", a.sft == "in-process")
    outputs, ckpt = _train_outputs(out, steps, "qzoom_gate_loss", log)
    outputs.update(recipe=str(STAGE3_RECIPE.relative_to(REPO_RECIPES.parents[1])), adapters=stage1,
                   synthetic_labels=str(train), label_counts=dict(Counter(
                       f"budget {b}: label {lab}" for b, lab in (SYNTHETIC_GATE_ROWS[i % len(SYNTHETIC_GATE_ROWS)]
                                                                  for i in range(len(lines))))))
    line = (f"swift sft {outputs['recipe']} --adapters <stage 1> ({a.sft}) on {len(lines)} synthetic gate labels: "
            f"{steps} steps, gate loss {outputs['loss_first']:.4f} -> {outputs['loss_last']:.4f} -> {ckpt}")
    notes = ["synthetic gate labels: label 1 (zoom) at budget 16, label 0 at budget 64, alternating over the "
             "records (the gate-label job keeps none on a random model)"]
    return StageResult(line, outputs, [str(ckpt / "qzoom_branch.safetensors")], notes=notes)


def _stage_calibrate(ctx: Context) -> StageResult:
    from qzoom_swift.labels.gate_job import calibrate_gate

    traj = ctx.path("stage3", "heldout_trajectories")
    shutil.rmtree(traj, ignore_errors=True)
    traj.mkdir(parents=True)
    rows = _rows(Path(ctx.outputs("data")["heldout"]))
    lines = []
    for i, row in enumerate(rows):
        correct = list(HELDOUT_PATTERNS[i % len(HELDOUT_PATTERNS)])
        lines.append(json.dumps({"qzoom_id": f"{i}-synthetic", "qzoom_status": "ok", **row,
                                 "qzoom_budgets": list(HELDOUT_BUDGETS), "qzoom_answers": ["-"] * len(correct),
                                 "qzoom_scores": [float(c) for c in correct], "qzoom_correct": correct}))
    _write_text_atomic(traj / "shard-00000.jsonl", "".join(line + "\n" for line in lines))
    ckpt = ctx.outputs("gate_train")["checkpoint"]
    res = calibrate_gate(ctx.outputs("model")["model_dir"], ckpt, str(traj),
                         target_skip_ratio=CALIBRATION_TARGET_SKIP)
    outputs = {"checkpoint": ckpt, "tau_gate": res.tau_gate, "accuracy": res.accuracy,
               "skip_ratio": res.skip_ratio, "samples": res.samples, "curve_png": res.curve_png,
               "config": res.config, "trajectories": str(traj), "target_skip_ratio": CALIBRATION_TARGET_SKIP}
    line = (f"tau_gate {res.tau_gate:.4g} on {res.samples} synthetic held-out trajectories "
            f"(no-RoI ratio {res.skip_ratio:.2f}, target {CALIBRATION_TARGET_SKIP}) -> {res.config}")
    notes = [f"held-out trajectories are synthetic right/wrong patterns over budgets {list(HELDOUT_BUDGETS)}; "
             "the gate probabilities are the trained gate's on the held-out images at the low budget"]
    return StageResult(line, outputs, [res.config, res.curve_png], notes=notes)


def _final_checkpoint(ctx: Context) -> str:
    return ctx.outputs("calibrate")["checkpoint"] if _is_qwen(ctx) else ctx.outputs("rpn_train")["checkpoint"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _stage_zoom(ctx: Context) -> StageResult:
    import torch
    from PIL import Image

    from qzoom_swift.model import QZoomModel

    a = ctx.args
    ckpt = _final_checkpoint(ctx)
    qz = QZoomModel.from_pretrained(ctx.outputs("model")["model_dir"], checkpoint=ckpt)
    rows = _rows(Path(ctx.outputs("data")["dataset"]))
    samples = []
    for row in rows:
        question = row["messages"][0]["content"].replace("<image>", "").strip()
        with Image.open(row["images"][0]) as im:
            samples.append((im.convert("RGB"), question))
    n = a.max_new_tokens

    def answer(image, question, mode):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = qz.generate([image], question, config_overrides={"mode": mode}, max_new_tokens=n,
                              min_new_tokens=n)[0]
        return out, time.perf_counter() - t0

    for mode in MODES:  # warm-up: first calls pay one-off allocations
        answer(*samples[0], mode)
    per_mode: dict[str, list[dict]] = {m: [] for m in MODES}
    for i, (image, question) in enumerate(samples):
        order = MODES[i % len(MODES):] + MODES[: i % len(MODES)]  # rotate: no mode always runs first
        for mode in order:
            out, seconds = answer(image, question, mode)
            per_mode[mode].append({"record": i, "answer": out.text, "latency_s": round(seconds, 4),
                                   **out.stats.to_dict()})
    table = {}
    for mode in MODES:
        stats = per_mode[mode]
        table[mode] = {
            "samples": len(stats),
            "zoom_rate": _mean([float(s["zoomed"]) for s in stats]),
            "mean_visual_tokens": _mean([s["visual_tokens"] for s in stats]),
            "mean_visual_tokens_low": _mean([s["visual_tokens_low"] for s in stats]),
            "mean_visual_tokens_roi": _mean([s["visual_tokens_roi"] for s in stats]),
            "mean_latency_s": _mean([s["latency_s"] for s in stats]),
            "mean_pass1_s": _mean([s["time_pass1_s"] for s in stats]),
            "mean_pass2_s": _mean([s["time_pass2_s"] for s in stats]),
            "mean_decode_s": _mean([s["time_decode_s"] for s in stats]),
            "reasons": dict(Counter(s["reason"] for s in stats)),
            "gate_prob_range": _range([s["gate_prob"] for s in stats if s["gate_prob"] is not None]),
        }
    never = table["never"]["mean_latency_s"]
    for mode in MODES:
        lat = table[mode]["mean_latency_s"]
        table[mode]["relative_throughput"] = never / lat if lat > 0 else None
    stats_path = _write_json(ctx.path("zoom", "stats.json"), {"checkpoint": ckpt, "config": qz.config.to_dict(),
                                                              "max_new_tokens": n, "modes": table,
                                                              "per_sample": per_mode})
    outputs = {"checkpoint": ckpt, "tau_gate": qz.config.tau_gate, "tau_roi": qz.config.tau_roi,
               "low_tokens": [qz.config.low_min_tokens, qz.config.low_max_tokens],
               "roi_tokens": [qz.config.roi_min_tokens, qz.config.roi_max_tokens], "max_new_tokens": n,
               "modes": table, "stats": str(stats_path), "threads": torch.get_num_threads()}
    z = table["zoom"]
    line = (f"{len(samples)} records x {len(MODES)} modes; zoom mode: zoom rate {z['zoom_rate']:.2f}, "
            f"{z['mean_visual_tokens']:.0f} visual tokens, {z['mean_latency_s'] * 1000:.0f} ms/sample -> {stats_path}")
    notes = [] if _is_qwen(ctx) else ["stage 3 does not apply to LLaVA: the gate is the untrained copy-initialised "
                                      f"one and tau_gate is the default {qz.config.tau_gate}"]
    return StageResult(line, outputs, [str(stats_path)], notes=notes)


QWEN_ONLY = "LLaVA-1.5 encodes every image at one fixed resolution: no resolution trajectory, no stage 3"

STAGES: tuple[Stage, ...] = (
    Stage("model", "tiny model", (), ("family", "size", "seed"), _stage_model),
    Stage("data", "synthetic data", (), ("records", "seed"), _stage_data),
    Stage("pseudo_labels", "stage 1: pseudo labels", ("model", "data"), (), _stage_pseudo_labels),
    Stage("rpn_train", "stage 1: RPN training (swift sft)", ("model", "pseudo_labels"), ("steps",),
          _stage_rpn_train),
    Stage("gate_labels", "stage 3: gate labels", ("model", "data"), ("budgets",), _stage_gate_labels, _is_qwen),
    Stage("gate_train", "stage 3: gate training (swift sft)", ("model", "data", "rpn_train"), ("steps",),
          _stage_gate_train, _is_qwen),
    Stage("calibrate", "stage 3: gate calibration", ("model", "data", "gate_train"), (), _stage_calibrate,
          _is_qwen),
    Stage("zoom", "zoom inference (never/always/zoom)", ("model", "data", "rpn_train", "calibrate"),
          ("max_new_tokens",), _stage_zoom),
)


def _stage_key(ctx: Context, stage: Stage) -> dict[str, Any]:
    upstream = {d: ctx.records[d]["run_id"] for d in stage.deps if d in ctx.records}
    return {"settings": {k: ctx.settings[k] for k in stage.settings}, "upstream": upstream}


def _cached(ctx: Context, stage: Stage, key: dict[str, Any]) -> dict | None:
    path = ctx.path("stages", f"{stage.name}.json")
    if ctx.args.force or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or record.get("status") not in ("ran", "n/a"):
        return None
    if not all(Path(p).exists() for p in record.get("artefacts", [])):
        return None
    return record


def _run_stage(ctx: Context, index: int, stage: Stage) -> dict:
    key = _stage_key(ctx, stage)
    record = None if stage.name == "model" else _cached(ctx, stage, key)  # the model step is its own cache
    if record is not None:
        record = {**record, "this_run": "cached"}
    elif not stage.applies(ctx):
        record = {"name": stage.name, "title": stage.title, "key": key, "status": "n/a", "seconds": 0.0,
                  "line": QWEN_ONLY, "outputs": {}, "artefacts": [], "run_id": "n/a", "notes": [QWEN_ONLY],
                  "this_run": "n/a"}
    else:
        log = ctx.path("logs", f"{stage.name}.log")
        ctx.fresh = ctx.args.force or ctx.path("stages", f"{stage.name}.json").exists()
        ctx.path("stages", f"{stage.name}.json").unlink(missing_ok=True)  # not done until it finishes again
        log.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            with _output_to(log):
                result = stage.run(ctx)
        except Exception:
            print(f"[{index}/{len(STAGES)}] {stage.title}: FAILED; log {log}:", file=sys.stderr)
            print(log.read_text(errors="replace")[-3000:] if log.exists() else "", file=sys.stderr)
            raise
        seconds = time.perf_counter() - t0
        record = {"name": stage.name, "title": stage.title, "key": key, "status": "ran",
                  "seconds": round(seconds, 3), "line": result.line, "outputs": result.outputs,
                  "artefacts": result.artefacts, "notes": result.notes, "log": str(log),
                  "run_id": result.run_id or f"{time.time():.6f}", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(ctx.path("stages", f"{stage.name}.json"), record)
        record = {**record, "this_run": "cached" if result.reused else "ran"}
    ctx.records[stage.name] = record
    status = {"ran": "", "cached": " (cached)", "n/a": " (n/a)"}[record["this_run"]]
    print(f"[{index}/{len(STAGES)}] {stage.title:<36} {record['seconds']:7.1f} s{status}  {record['line']}",
          flush=True)
    return record


# ---------------------------------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_report(summary: dict[str, Any]) -> str:
    lines = [f"# Q-Zoom demo: {summary['family']} ({summary['size']}, random weights)", "",
             f"> {NOTE}", "",
             f"Command: `{summary['command']}` - total {summary['total_s']:.1f} s this run "
             f"(stages run now: {summary['stages_ran']}, cached: {summary['stages_cached']}), "
             f"CPU threads {summary['threads']}, torch {summary['versions']['torch']}, "
             f"transformers {summary['versions']['transformers']}, ms-swift {summary['versions']['ms-swift']}.", "",
             "## Stages", "",
             "Status: ran (this run), cached (outputs of an earlier run reused; the time is that run's), n/a.", "",
             "| # | stage | status | time (s) | output |", "|---|---|---|---:|---|"]
    for i, st in enumerate(summary["stages"].values(), 1):
        lines.append(f"| {i} | {st['title']} | {st['this_run']} | {st['seconds']:.1f} | {st['line'].replace('|', '/')} |")
    lines.append("")
    for st in summary["stages"].values():
        if st["status"] == "n/a":
            continue
        lines += [f"### {st['title']}", "", "| output | value |", "|---|---|",
                  f"| time | {st['seconds']:.1f} s ({st['this_run']}) |"]
        for key, value in st["outputs"].items():
            if key in ("modes", "losses"):
                continue
            text = json.dumps(value) if isinstance(value, dict | list) else _fmt(value)
            lines.append(f"| {key} | {text.replace('|', '/')} |")
        lines += [f"| note | {note} |" for note in st.get("notes", [])]
        lines.append("")
    zoom = summary["stages"]["zoom"]["outputs"]
    lines += ["## Zoom modes", "",
              f"Checkpoint `{zoom['checkpoint']}` (tau_gate {_fmt(zoom['tau_gate'])}, tau_roi {_fmt(zoom['tau_roi'])}, "
              f"low budget {zoom['low_tokens'][0]}-{zoom['low_tokens'][1]} tokens, RoI budget "
              f"{zoom['roi_tokens'][0]}-{zoom['roi_tokens'][1]}); every answer is forced to "
              f"{zoom['max_new_tokens']} new tokens, so the modes decode the same amount; one sample at a time, "
              "modes interleaved per record.", "",
              "| mode | zoom rate | mean visual tokens (low + RoI) | mean latency (ms) | relative throughput vs never "
              "| pass 1 / pass 2 / decode (ms) | decisions |",
              "|---|---:|---:|---:|---:|---|---|"]
    for mode, m in zoom["modes"].items():
        rel = "-" if m["relative_throughput"] is None else f"{m['relative_throughput']:.2f}x"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["reasons"].items()))
        lines.append(f"| {mode} | {m['zoom_rate']:.2f} | {m['mean_visual_tokens']:.1f} "
                     f"({m['mean_visual_tokens_low']:.1f} + {m['mean_visual_tokens_roi']:.1f}) | "
                     f"{m['mean_latency_s'] * 1000:.0f} | {rel} | {m['mean_pass1_s'] * 1000:.0f} / "
                     f"{m['mean_pass2_s'] * 1000:.0f} / {m['mean_decode_s'] * 1000:.0f} | {reasons} |")
    gate = zoom["modes"]["zoom"].get("gate_prob_range")
    if gate:
        lines += ["", f"Gate probabilities in mode zoom: {gate[0]:.3g} to {gate[1]:.3g} (zoom when >= tau_gate "
                      f"{_fmt(zoom['tau_gate'])}); `decisions` counts ZoomStats.reason (no_roi: no heatmap cell passed "
                      "tau_roi, answered from the low-resolution pass)."]
    lines += ["", "Zoom rate, visual tokens and latency are real measurements of the pipeline's mechanics; which "
              "samples zoom, and every answer, come from random weights. The shared CPU makes latency noisy.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.records < 1:
        raise SystemExit("qzoom demo: --records must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise SystemExit("qzoom demo: --steps must be >= 1")
    # On a shared CPU, OpenMP threads spinning at barriers while another process holds a core make every
    # torch op several times slower (measured: zoom inference 4.1 s vs 0.6 s per sample on 2 busy cores).
    # Passive waiting must be chosen before torch is imported; export OMP_WAIT_POLICY=ACTIVE to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MODELSCOPE_CACHE", str(out / ".modelscope"))  # swift's dataset caches, not ~/.cache
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budgets = ",".join(str(int(b)) for b in str(args.budgets).split(","))
    settings = {"family": args.family, "size": args.size, "seed": args.seed, "records": args.records,
                "steps": args.steps, "budgets": budgets, "max_new_tokens": args.max_new_tokens}
    ctx = Context(args, out, settings)
    print(f"qzoom demo: the Q-Zoom pipeline on a tiny {args.family} with random weights, on CPU "
          f"({args.records} synthetic records) -> {out}")
    print("random weights: answers are noise and accuracy is meaningless; this checks every stage's plumbing",
          flush=True)
    from qzoom_swift.cli import _quiet_transformers

    _quiet_transformers()
    for i, stage in enumerate(STAGES, 1):
        _run_stage(ctx, i, stage)

    from importlib.metadata import version

    import torch
    import transformers

    total = time.perf_counter() - t_start
    this_run = Counter(r["this_run"] for r in ctx.records.values())
    summary = {
        "command": " ".join(["qzoom", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else "qzoom demo",
        "note": NOTE, "family": args.family, "size": args.size, "settings": settings, "sft": args.sft,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "ms-swift": version("ms_swift")},
        "device": "cpu", "threads": torch.get_num_threads(),
        "stages_ran": this_run.get("ran", 0), "stages_cached": this_run.get("cached", 0),
        "stages": ctx.records, "zoom": ctx.records["zoom"]["outputs"]["modes"],
        "total_s": round(total, 3),
    }
    report = _write_text_atomic(out / "report.md", render_report(summary))
    summary["report"] = str(report)
    path = _write_json(out / "summary.json", summary)
    print()
    header = f"{'mode':<7} {'zoom rate':>9} {'visual tok':>10} {'ms/sample':>9} {'vs never':>8}"
    print(header)
    for mode, m in summary["zoom"].items():
        rel = "-" if m["relative_throughput"] is None else f"{m['relative_throughput']:.2f}x"
        print(f"{mode:<7} {m['zoom_rate']:>9.2f} {m['mean_visual_tokens']:>10.1f} "
              f"{m['mean_latency_s'] * 1000:>9.0f} {rel:>8}")
    print(f"\ntotal {total:.1f} s; wrote {report} and {path}")
    return 0
