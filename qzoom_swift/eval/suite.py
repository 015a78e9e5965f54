"""What ``qzoom eval`` runs: the benchmark catalogue, run specs and the per-benchmark Q-Zoom settings.

Pure Python (standard library only), so ``qzoom eval --help`` stays fast and every rule is unit-tested:

- ``BENCHMARKS``: the benchmarks ``qzoom eval`` knows (the paper's ten and the zoom bench), with the on-disk layout each expects under
  ``--data-root`` (one folder per benchmark, a local copy of the hub dataset in Hugging Face layout), the
  full split size (weights of the paper's "rectified" group throughput) and its zoom group;
- ``PRESETS``: the thresholds and token budgets of the official Q-Zoom eval scripts per backbone
  (``qzoom-reference.md`` section 5.3), looked up per benchmark;
- ``parse_run`` / ``resolve_run``: ``--run MODE:BUDGET[:key=value...]`` into the ``QZoomConfig`` overrides
  each benchmark of that run uses;
- ``check_datasets``: a clear error naming the benchmark and the expected path, instead of evalscope's
  silent fall-back to a (slow, failing when offline) hub download.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.config import ROI_FALLBACKS

RUN_MODES = ("baseline", "zoom", "always", "never")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark ``qzoom eval`` can run (evalscope name) and the local copy it reads."""

    name: str
    pretty: str
    native: bool
    """True: shipped by evalscope 1.14; False: registered by ``qzoom_swift.eval.benchmarks``."""
    hub_id: str
    """The Hugging Face dataset to copy into ``<data-root>/<name>/``."""
    layout: str
    """What the folder must hold (files and columns), as evalscope's loader reads it."""
    full_size: int
    """Samples in the full split; weights of the rectified throughput (the paper's 03_summarize_tradeoff)."""
    group: str
    """doc (Doc/OCR: 576-token regime), hr (high-resolution: 4096-token regime) or general; a Pareto panel."""
    preset_key: str
    """Row of the per-backbone threshold table (``PRESETS``)."""
    main_metric: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("docvqa", "DocVQA", True, "lmms-lab/DocVQA",
              "README.md whose `configs:` declare config `DocVQA` with split `validation` "
              "(the hub snapshot: DocVQA/validation-*.parquet); columns question, answers (list), image "
              "(HF Image), questionId, question_types, docId, ucsf_document_id, ucsf_document_page_no",
              5349, "doc", "docvqa", "anls"),
    Benchmark("infovqa", "InfoVQA", True, "lmms-lab/DocVQA",
              "README.md whose `configs:` declare config `InfographicVQA` with split `validation` (the same "
              "snapshot as docvqa; a symlink to it works); columns question, answers, image, questionId, "
              "answer_type, image_url, ocr", 2801, "doc", "infovqa", "anls"),
    Benchmark("chartqa", "ChartQA", True, "lmms-lab/ChartQA",
              "data/test-*.parquet (default config, split `test`); columns question, answer, image, type "
              "(human_test | augmented_test)", 2500, "doc", "chartqa", "relaxed_acc"),
    Benchmark("ocr_bench", "OCRBench", True, "echo840/OCRBench",
              "data/test-*.parquet (default config, split `test`); columns question, answer (list or str), "
              "image, question_type, dataset", 1000, "doc", "ocr_bench", "acc"),
    Benchmark("textvqa", "TextVQA", False, "lmms-lab/textvqa",
              "data/validation-*.parquet (default config, split `validation`); columns question, answers "
              "(10 strings), image, question_id", 5000, "doc", "textvqa", "vqa_score"),
    Benchmark("mm_star", "MMStar", True, "Lin-Chen/MMStar",
              "README.md whose `configs:` declare config `val` with split `val` (the hub snapshot: "
              "mmstar.parquet); columns question, answer, image, category, index, l2_category, meta_info",
              1500, "general", "mm_star", "acc"),
    Benchmark("vstar_bench", "V*", True, "lmms-lab/vstar-bench",
              "data/test-*.parquet (default config, split `test`); columns text (question with options), "
              "label, image, category, question_id", 191, "hr", "vstar_bench", "acc"),
    Benchmark("hr_bench_4k", "HR-Bench 4K", False, "DreamMr/HR-Bench",
              "hr_bench_4k.parquet (the hub snapshot's file, found by name, so one snapshot folder can serve "
              "4K and 8K) or test*.parquet; columns index, question, A, B, C, D, answer, category, "
              "cycle_category, image (base64 string)", 800, "hr", "hr_bench", "acc"),
    Benchmark("hr_bench_8k", "HR-Bench 8K", False, "DreamMr/HR-Bench",
              "hr_bench_8k.parquet (or test*.parquet); columns as hr_bench_4k", 800, "hr", "hr_bench", "acc"),
    Benchmark("mme_realworld_lite", "MME-RW-Lite", False, "yifanzhang114/MME-RealWorld-lite-lmms-eval",
              "data/train-*.parquet (default config, split `train`, as on the hub); columns question, "
              "multi-choice options (list of '(A) ...'), answer (letter), bytes (base64 image), category, "
              "l2-category, index, question_id", 1919, "hr", "mme_realworld_lite", "acc"),
    Benchmark("qzoom_bench", "Zoom bench", False, "none: `qzoom demo` writes it (<out>/bench/evalscope)",
              "data/test-*.parquet (default config, split `test`); columns question, answers (1 string), image, "
              "kind (fine | coarse), box, question_id", 400, "general", "qzoom_bench", "exact_match"),
)}

DEFAULT_BENCHMARKS = ("docvqa", "infovqa", "chartqa", "ocr_bench", "textvqa", "vstar_bench", "hr_bench_4k",
                      "hr_bench_8k", "mme_realworld_lite")
GROUP_TITLES = {"doc": "Doc/OCR", "hr": "High-resolution", "general": "General"}


@dataclass(frozen=True)
class TaskSetting:
    """Q-Zoom settings of the official eval scripts for one (backbone, task)."""

    tau_roi: float
    tau_gate: float
    min_tokens: int
    max_tokens: int


def _doc(tau_roi, tau_gate, min_tokens=256):
    return TaskSetting(tau_roi, tau_gate, min_tokens, 576)


def _hr(tau_roi, tau_gate):
    return TaskSetting(tau_roi, tau_gate, 512, 4096)


# qzoom-reference.md section 5.3 (examples/eval_only/*.sh). mm_star is not in the scripts: it takes the
# backbone's DocVQA row.
PRESETS: dict[str, dict[str, TaskSetting]] = {
    "qwen2_5_vl": {
        "textvqa": _doc(0.15, 0.05), "infovqa": _doc(0.15, 0.05),
        "chartqa": _doc(0.125, 0.05), "docvqa": _doc(0.125, 0.05), "mm_star": _doc(0.125, 0.05),
        "ocr_bench": _doc(0.15, 0.05, 128),
        "vstar_bench": _hr(0.03, 0.02), "mme_realworld_lite": _hr(0.04, 0.02), "hr_bench": _hr(0.04, 0.02),
    },
    "qwen3_vl": {
        "textvqa": _doc(0.15, 0.10), "infovqa": _doc(0.15, 0.10), "chartqa": _doc(0.15, 0.10),
        "docvqa": _doc(0.15, 0.10), "mm_star": _doc(0.15, 0.10), "ocr_bench": _doc(0.125, 0.10, 128),
        "vstar_bench": _hr(0.10, 0.025), "mme_realworld_lite": _hr(0.10, 0.025), "hr_bench": _hr(0.10, 0.025),
    },
}
PRESET_CHOICES = ("auto", *PRESETS, "none")
BASELINE_MIN_TOKENS = 256  # the paper's baselines keep min 256 at every max budget
# QZoomConfig fields a run spec may override (inference knobs only).
RUN_KEYS = ("tau_gate", "tau_roi", "low_min_tokens", "low_max_tokens", "roi_min_tokens", "roi_max_tokens",
            "blur_kernel", "blur_sigma", "min_box_side", "roi_fallback")
_INT_KEYS = {"low_min_tokens", "low_max_tokens", "roi_min_tokens", "roi_max_tokens", "blur_kernel", "min_box_side"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")


@dataclass(frozen=True)
class RunSpec:
    """One ``--run``: a mode, a max visual-token budget (int, or ``paper`` = the task's paper budget)."""

    name: str
    mode: str
    budget: int | str
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None

    @property
    def uses_checkpoint(self) -> bool:
        return self.mode != "baseline"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "budget": self.budget, "overrides": dict(self.overrides),
                "checkpoint": self.checkpoint}


def parse_run(text: str) -> RunSpec:
    """``MODE:BUDGET[:key=value...]``, e.g. ``baseline:576``, ``zoom:paper``, ``zoom:4096:tau_roi=0.04``.

    MODE: baseline (the base model, no checkpoint, low resolution only), zoom (gated Q-Zoom), always (zoom
    every sample), never (checkpoint loaded, never zooms). BUDGET: max visual tokens of the first pass (and
    of the crop), or ``paper`` for each task's budget in the official scripts (576 Doc/OCR, 4096 HR).
    Keys: ``name=LABEL`` (default ``MODE@BUDGET``), ``checkpoint=DIR`` (this run's Q-Zoom checkpoint), or a
    QZoomConfig knob (tau_gate, tau_roi, low_min_tokens, roi_min_tokens, blur_sigma, ...).
    """
    parts = text.strip().split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"--run {text!r}: expected MODE:BUDGET[:key=value...], e.g. baseline:576 or zoom:paper")
    mode, budget_s = parts[0].lower(), parts[1].lower()
    if mode not in RUN_MODES:
        raise ValueError(f"--run {text!r}: mode {mode!r} is not one of {', '.join(RUN_MODES)}")
    if budget_s == "paper":
        budget: int | str = "paper"
    else:
        try:
            budget = int(budget_s)
        except ValueError:
            raise ValueError(f"--run {text!r}: budget {budget_s!r} is not an integer or 'paper'") from None
        if budget < 4:
            raise ValueError(f"--run {text!r}: budget {budget} visual tokens is too small")
    overrides: dict[str, Any] = {}
    name = checkpoint = None
    for item in parts[2:]:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--run {text!r}: {item!r} is not key=value")
        if key == "name":
            name = value.strip()
        elif key == "checkpoint":
            checkpoint = value.strip()
        elif key == "roi_fallback":
            if value.strip() not in ROI_FALLBACKS:
                raise ValueError(f"--run {text!r}: roi_fallback={value!r}; choose from {', '.join(ROI_FALLBACKS)}")
            overrides[key] = value.strip()
        elif key in RUN_KEYS:
            try:
                overrides[key] = int(value) if key in _INT_KEYS else float(value)
            except ValueError:
                raise ValueError(f"--run {text!r}: {key}={value!r} is not a number") from None
        else:
            raise ValueError(f"--run {text!r}: unknown key {key!r}; known: name, checkpoint, {', '.join(RUN_KEYS)}")
    name = name or f"{mode}@{budget}"
    if not _NAME_RE.match(name):
        raise ValueError(f"--run {text!r}: run name {name!r} must be letters, digits and _.@+- only")
    return RunSpec(name, mode, budget, overrides, checkpoint)


def preset_for(preset: str, family: str | None) -> dict[str, TaskSetting]:
    """The per-task table of ``--preset`` (``auto``: the model family's, empty for a family without one)."""
    if preset == "none":
        return {}
    if preset == "auto":
        return PRESETS.get(family or "", {})
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}; choose from {', '.join(PRESET_CHOICES)}")
    return PRESETS[preset]


def resolve_run(run: RunSpec, benchmark: str, table: dict[str, TaskSetting]) -> dict[str, Any]:
    """The ``QZoomConfig`` overrides of ``run`` on ``benchmark``.

    - max tokens = the run's budget (``paper``: the task's max from the table, else 576);
    - min tokens = min(task min, max // 2): 256 Doc, 128 OCRBench, 512 HR for Q-Zoom runs, 256 for the
      baseline and ``never`` (as in the paper), so a max of 256 uses min 128; the crop uses the same budget;
    - tau_roi / tau_gate from the table (zoom and always runs), else the checkpoint's own values;
    - then the run's explicit key=value overrides.
    """
    bench = BENCHMARKS[benchmark]
    setting = table.get(bench.preset_key)
    if run.budget == "paper":
        max_tokens = setting.max_tokens if setting else (4096 if bench.group == "hr" else 576)
    else:
        max_tokens = int(run.budget)
    zooming = run.mode in ("zoom", "always")
    task_min = setting.min_tokens if (setting and zooming) else BASELINE_MIN_TOKENS
    min_tokens = max(1, min(task_min, max_tokens // 2))
    out: dict[str, Any] = {"mode": "never" if run.mode == "baseline" else run.mode,
                           "low_max_tokens": max_tokens, "low_min_tokens": min_tokens,
                           "roi_max_tokens": max_tokens, "roi_min_tokens": min_tokens}
    if setting and zooming:
        out["tau_roi"] = setting.tau_roi
        out["tau_gate"] = setting.tau_gate
    out.update(run.overrides)
    if out["low_min_tokens"] > out["low_max_tokens"] or out["roi_min_tokens"] > out["roi_max_tokens"]:
        raise ValueError(f"run {run.name} on {benchmark}: min tokens exceed max tokens in {out}")
    return out


class DatasetMissingError(FileNotFoundError):
    """A benchmark's local dataset folder is missing or holds no data files."""


def _data_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def check_datasets(paths: dict[str, Path]) -> None:
    """Raise ``DatasetMissingError`` naming each benchmark whose folder is missing or empty, and how to fill it."""
    problems = []
    for name, path in paths.items():
        bench = BENCHMARKS[name]
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
        elif not _data_files(path):
            what = f"holds no data files ({', '.join(DATA_SUFFIXES)})"
        else:
            continue
        problems.append(
            f"benchmark {name!r} ({bench.pretty}): expected its dataset at {path}, which {what}.\n"
            f"    Expected: {bench.layout}.\n"
            f"    Fetch it on a machine with network access, e.g. `huggingface-cli download --repo-type dataset "
            f"{bench.hub_id} --local-dir {path}`, or pass --dataset {name}=DIR.")
    if problems:
        raise DatasetMissingError("qzoom eval: missing local datasets (nothing is downloaded; evalscope would "
                                  "otherwise try the hub):\n  " + "\n  ".join(problems))


def dataset_paths(benchmarks: list[str], data_root: Path | None, explicit: dict[str, Path]) -> dict[str, Path]:
    """``<data-root>/<benchmark>`` for each benchmark, unless ``--dataset NAME=DIR`` names another folder."""
    out = {}
    for name in benchmarks:
        if name in explicit:
            out[name] = Path(explicit[name]).expanduser().resolve()
        elif data_root is not None:
            out[name] = (Path(data_root).expanduser() / name).resolve()
        else:
            raise DatasetMissingError(f"qzoom eval: no dataset for benchmark {name!r}: pass --data-root DIR "
                                      f"(with DIR/{name}/) or --dataset {name}=DIR")
    return out


def model_family(model_dir: str | Path) -> str | None:
    """qwen2_5_vl, qwen3_vl or llava from a local model dir's config.json (None when unknown or remote)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    from qzoom_swift.families.registry import family_for_model_type

    return family_for_model_type(json.loads(path.read_text()).get("model_type", ""))


def layout_help() -> str:
    """The ``--data-root`` layout, one line per benchmark (for ``qzoom eval --help``)."""
    import textwrap

    lines = []
    for b in BENCHMARKS.values():
        kind = "evalscope" if b.native else "plugin"
        lines.append(textwrap.fill(f"{b.name}/  ({b.pretty}, {kind}; copy of {b.hub_id}): {b.layout}.", width=108,
                                   initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)
