"""``qzoom eval``: benchmarks x runs through evalscope, one process per run, then one summary and a Pareto plot.

The parent process (``run``) validates everything cheaply first (run specs, dataset folders, model dir),
then starts ``python -m qzoom_swift.eval.command worker SPEC.json`` for each run that has no stored result,
with the hub offline variables set. The worker loads the model once and runs one evalscope task per
benchmark (``qzoom_swift.eval.model_api``), storing ``<out>/runs/<run>/bench/<benchmark>.json`` after each,
so an interrupted run resumes at the next benchmark. A benchmark result is reused only while its settings
fingerprint (model, checkpoint, dataset path, Q-Zoom config, limit, generation) is unchanged;
``--overwrite`` redoes everything. With ``--devices`` each pending (run, benchmark) pair is a worker of its
own, up to one per listed device at a time (``qzoom_swift.eval.devices``), storing the same per-benchmark
results; the summary is written once, at the end, atomically. Standard library only at import (``qzoom
--help`` stays fast).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qzoom_swift.eval.devices import Job, cpu_threads, device_kind, parse_devices, run_on_devices
from qzoom_swift.eval.local_data import folder_fingerprint
from qzoom_swift.eval.progress import progress_path, progress_printer, track_evalscope_progress
from qzoom_swift.eval.suite import (
    BENCHMARKS,
    DEFAULT_BENCHMARKS,
    PRESET_CHOICES,
    PRESETS,
    DatasetMissingError,
    RunSpec,
    check_datasets,
    dataset_paths,
    layout_help,
    model_family,
    parse_run,
    preset_for,
    resolve_run,
)
from qzoom_swift.eval.vllm_backend import BACKENDS, VLLM_INSTALL_HINT, engine_args
from qzoom_swift.loading import add_model_args
from qzoom_swift.procs import die_with_parent, run_child

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BENCH_GROUPS = {"doc": ("docvqa", "infovqa", "chartqa", "ocr_bench", "textvqa"),
                "hr": ("vstar_bench", "hr_bench_4k", "hr_bench_8k", "mme_realworld_lite"),
                "all": tuple(BENCHMARKS)}
# A direct-answer V* prompt (the paper's lmms-eval style); evalscope's own asks to "think step by step",
# which needs ~1k new tokens and makes decoding dominate the latency.
SHORT_PROMPTS = {
    "vstar_bench": "{question}\nAnswer with the option's letter from the given choices directly. The last line "
                   "of your response should be of the form 'ANSWER: [LETTER]' (without quotes) where [LETTER] is "
                   "one of A, B, C, D.",
}

DESCRIPTION = """\
Evaluate Q-Zoom against the plain model on image benchmarks with evalscope, one process per run, and write
<out>/summary.md, summary.csv, summary.json and pareto.png (accuracy vs relative throughput, per group).

Runs (--run, repeatable) are MODE:BUDGET[:key=value...]:
  baseline:576     the base model alone (no checkpoint) at max 576 visual tokens (min 256)
  zoom:576         Q-Zoom: low-res pass at max 576, gate, crop re-encoded at the same budget
  always:576       zoom every sample;   never:576   checkpoint loaded, never zoom
  zoom:paper       each task's budget from the official scripts (576 Doc/OCR, 4096 high-res)
  zoom:4096:tau_roi=0.04:tau_gate=0.02:name=qz-hr    explicit knobs and a run name
Thresholds and min tokens come from --preset (the official eval scripts' per-task table for the model's
family) unless a run sets them. Throughput is relative to --reference (default: the first baseline run).

Datasets are never downloaded: --data-root DIR must hold one folder per benchmark (or name a folder with
--dataset NAME=DIR), each a local copy of the hub dataset in Hugging Face layout, as evalscope reads it:
{layout}

With --devices cuda:0,cuda:1,... the (run x benchmark) jobs run in parallel, one worker process per device
(cpu,cpu: two CPU workers); --eval-batch-size N answers N samples per model call.

--backend vllm answers with QZoomVLLM (the router decides each sample, vLLM generates): one engine per run's
worker, shared by its benchmarks, stopped when the worker ends; --eval-batch-size N sends N samples to vLLM at
once. It needs vLLM (pip install 'qzoom_swift[vllm]'; in this checkout: .venv-vllm/bin/qzoom eval ..., the
environment `make venv-vllm` builds, since vLLM pins its own torch). Engine settings: --vllm-arg KEY=VALUE, e.g.
--vllm-arg max_model_len=8192 --vllm-arg gpu_memory_utilization=0.85 (on the CPU build kv_cache_space_gb=4,
enforce_eager=true). Verified on CPU with tiny models only.

Results are stored per run and benchmark under <out>/runs/<run>/ (evalscope's predictions with per-sample
qzoom metadata: gate_prob, zoomed, box, visual_tokens, latency); a finished run is not redone on restart.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = DESCRIPTION.format(layout=layout_help())
    p.add_argument("--model", required=True, help="base model: a local Hugging Face model dir (or hub id with --online)")
    p.add_argument("--checkpoint", default=None,
                   help="Q-Zoom branch checkpoint dir for zoom/always/never runs (without it those runs use "
                        "fresh, untrained branches; baseline runs never load it)")
    p.add_argument("--run", dest="runs", action="append", required=True, metavar="MODE:BUDGET[:k=v...]",
                   help="a run (repeatable), e.g. --run baseline:576 --run baseline:2304 --run zoom:576")
    p.add_argument("--benchmarks", default=",".join(DEFAULT_BENCHMARKS),
                   help=f"comma-separated benchmarks, or doc / hr / all (default: {','.join(DEFAULT_BENCHMARKS)}); "
                        f"known: {', '.join(BENCHMARKS)}")
    p.add_argument("--data-root", type=Path, default=None, help="folder with one sub-folder per benchmark (see above)")
    p.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="NAME=DIR",
                   help="this benchmark's folder (repeatable; overrides --data-root/NAME)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output dir (default: runs/eval)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="samples per subset (evalscope's limit; a fraction < 1 takes that share); default: all")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default: 128, as lmms-eval)")
    p.add_argument("--preset", choices=PRESET_CHOICES, default="auto",
                   help="per-task tau_roi/tau_gate/min tokens: auto = the official table of the model's family "
                        "(Qwen2.5-VL, Qwen3-VL), none = the checkpoint's own config (default: auto)")
    p.add_argument("--prompts", choices=("short", "evalscope"), default="short",
                   help="short: direct-answer V* prompt (as the paper); evalscope: its chain-of-thought prompt "
                        "(needs --max-new-tokens ~1024). Other benchmarks always use evalscope's prompts")
    p.add_argument("--reference", default=None, help="run name throughput is relative to (default: first baseline)")
    add_model_args(p)
    p.add_argument("--devices", default=None, metavar="DEV,DEV,...",
                   help="run (run x benchmark) jobs in parallel, one worker process per listed device, e.g. "
                        "cuda:0,cuda:1,cuda:2,cuda:3 (cpu,cpu: two CPU workers sharing the cores); results are "
                        "stored and resumed per benchmark as without it (default: one worker at a time on --device)")
    p.add_argument("--eval-batch-size", type=_positive_int, default=1, metavar="N",
                   help="samples answered together: evalscope sends N concurrent requests and the model API "
                        "groups them into one QZoomModel.generate batch (default: 1, per-sample latency)")
    p.add_argument("--backend", choices=BACKENDS, default="transformers",
                   help="what answers: transformers (QZoomModel.generate, default) or vllm (QZoomVLLM: vLLM "
                        "engine behind the Q-Zoom router; needs vLLM, in this checkout the .venv-vllm environment "
                        "built by `make venv-vllm`: .venv-vllm/bin/qzoom eval --backend vllm ...)")
    p.add_argument("--vllm-arg", dest="vllm_args", action="append", default=[], metavar="KEY=VALUE",
                   help="a QZoomVLLM / vllm.LLM argument for --backend vllm (repeatable; VALUE read as JSON when it "
                        "parses), e.g. max_model_len=8192, gpu_memory_utilization=0.85, tensor_parallel_size=2, "
                        "kv_cache_space_gb=4 (CPU build), enforce_eager=true")
    p.add_argument("--progress-interval", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="while a run's worker runs, print its progress (benchmark, samples done/total, elapsed, "
                        "ETA, log path) at most this often (default: 30)")
    p.add_argument("--overwrite", action="store_true", help="redo runs and benchmarks that have stored results")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary from stored results")
    p.add_argument("--online", action="store_true",
                   help="do not force the Hugging Face offline variables in the run processes")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0 seconds")
    return value


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit {text}: must be > 0")
    return int(value) if value >= 1 and value.is_integer() else value


def _benchmarks(text: str) -> list[str]:
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        for name in BENCH_GROUPS.get(item, (item,)):
            if name not in BENCHMARKS:
                raise ValueError(f"--benchmarks: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--benchmarks is empty")
    return names


def _explicit_datasets(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in BENCHMARKS:
            raise ValueError(f"--dataset {item!r}: expected NAME=DIR with NAME one of {', '.join(BENCHMARKS)}")
        out[name] = Path(path)
    return out


def _fingerprint(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_run_specs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """One worker spec per ``--run`` (with each benchmark's settings and fingerprint), and the benchmarks."""
    runs = [parse_run(r) for r in args.runs]
    seen = set()
    for r in runs:
        if r.name in seen:
            raise ValueError(f"two runs are named {r.name!r}: add :name=LABEL to one of them")
        seen.add(r.name)
    names = _benchmarks(args.benchmarks)
    paths = dataset_paths(names, args.data_root, _explicit_datasets(args.datasets))
    table = preset_for(args.preset, model_family(args.model))
    out = Path(args.out).resolve()
    device = args.device
    if getattr(args, "devices", None):
        if args.device != "auto":
            raise ValueError("give --device (one worker at a time) or --devices (parallel workers), not both")
        device = device_kind(parse_devices(args.devices))  # the worker's own device is not part of a result's key
    backend = getattr(args, "backend", "transformers")
    vllm_args = engine_args(getattr(args, "vllm_args", None) or [])
    if vllm_args and backend != "vllm":
        raise ValueError("--vllm-arg goes with --backend vllm")
    specs = []
    for run in runs:
        checkpoint = run.checkpoint or (args.checkpoint if run.uses_checkpoint else None)
        common = {"model": str(args.model), "checkpoint": str(checkpoint) if checkpoint else None,
                  "limit": args.limit, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                  "device": device,  # auto attention = sdpa; stored as None, as results stored before the loader
                  "attn_implementation": None if args.attn_implementation == "auto" else args.attn_implementation,
                  "eval_batch_size": args.eval_batch_size, "prompts": args.prompts}
        if backend != "transformers":  # absent for transformers: results stored before --backend stay current
            common.update(backend=backend, engine_args=vllm_args)
        benches = {}
        for name in names:
            settings = {"overrides": resolve_run(run, name, table), "dataset": str(Path(paths[name]).resolve()),
                        "prompt_template": SHORT_PROMPTS.get(name) if args.prompts == "short" else None}
            data = folder_fingerprint(paths[name]) if Path(paths[name]).exists() else None  # None: --summary-only
            benches[name] = {**settings, "data_fingerprint": data,
                             "fingerprint": _fingerprint({**common, **settings, "benchmark": name})}
        specs.append({**common, "run": run.to_dict(), "run_dir": str(out / "runs" / run.name), "benchmarks": benches})
    return specs, names


def _stored(run_dir: Path, name: str, bench: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of ``bench`` when its settings and its data files are unchanged.

    A folder whose files changed (or another folder at the same path) never reuses a result; without the
    folder (``--summary-only`` elsewhere) the settings alone decide.
    """
    path = run_dir / "bench" / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("fingerprint") != bench["fingerprint"]:
        return None
    data_now = bench.get("data_fingerprint")
    return data if data_now is None or data.get("settings", {}).get("data_fingerprint") == data_now else None


def _pending(spec: dict[str, Any]) -> list[str]:
    run_dir = Path(spec["run_dir"])
    return [n for n, b in spec["benchmarks"].items() if _stored(run_dir, n, b) is None]


def _dataset_record(specs: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each benchmark's resolved folder and the samples each run evaluated there (what the numbers come from)."""
    out: dict[str, dict[str, Any]] = {}
    for name, bench in specs[0]["benchmarks"].items():
        samples = {r["name"]: r["benchmarks"][name].get("samples") for r in results if name in r["benchmarks"]}
        out[name] = {"path": str(Path(bench["dataset"]).resolve()), "samples": samples}
    return out


def _child_env(online: bool) -> dict[str, str]:
    from qzoom_swift.config import subprocess_env

    env = subprocess_env(**({} if online else OFFLINE_ENV))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _run_workers(specs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """One worker process per run with pending benchmarks, printing its progress; returns the failed runs."""
    failures = []
    for spec in specs:
        name, run_dir = spec["run"]["name"], Path(spec["run_dir"])
        pending = _prepare_run(spec, args)
        if not pending:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        log = run_dir / "log.txt"
        print(f"[qzoom eval] {name}: {', '.join(pending)} (log: {log})", flush=True)
        progress_path(run_dir).unlink(missing_ok=True)  # an earlier worker's record is not this one's progress
        t0 = time.perf_counter()
        with open(log, "a", encoding="utf-8") as f:  # stopping qzoom eval stops the worker (procs.run_child)
            returncode = run_child([sys.executable, "-m", "qzoom_swift.eval.command", "worker", str(spec_path),
                                    str(os.getpid())], stdout=f, stderr=subprocess.STDOUT,
                                   env=_child_env(args.online), poll_s=args.progress_interval,
                                   on_poll=progress_printer(name, run_dir, log))
        dt = time.perf_counter() - t0
        if returncode != 0:
            failures.append(name)
            print(f"[qzoom eval] {name}: FAILED (exit {returncode}) after {dt:.0f} s; last lines of {log}:\n"
                  f"{_tail(log)}", file=sys.stderr)
        else:
            print(f"[qzoom eval] {name}: done in {dt:.0f} s", flush=True)
    return failures


def _prepare_run(spec: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The run's pending benchmarks (after ``--overwrite`` cleared it), with the skip/warning lines printed."""
    name, run_dir = spec["run"]["name"], Path(spec["run_dir"])
    if args.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    pending = _pending(spec)
    if not pending:
        print(f"[qzoom eval] {name}: stored results are current, skipped (--overwrite to redo)")
    elif spec["run"]["mode"] != "baseline" and not spec["checkpoint"]:
        print(f"[qzoom eval] {name}: warning: no --checkpoint, the branches are fresh (untrained) copies",
              file=sys.stderr)
    return pending


def _run_on_devices(specs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """``--devices``: every pending (run, benchmark) in its own worker, one per device at a time; the failed jobs."""
    devices = parse_devices(args.devices)
    by_run = {spec["run"]["name"]: spec for spec in specs}
    jobs = [Job(spec["run"]["name"], bench, Path(spec["run_dir"])) for spec in specs
            for bench in _prepare_run(spec, args)]
    if not jobs:
        return []
    print(f"[qzoom eval] {len(jobs)} job(s) (run x benchmark) on {len(devices)} worker(s): {', '.join(devices)}",
          flush=True)
    env = _child_env(args.online)
    threads = cpu_threads(devices)
    printers: dict[int, Any] = {}

    def launch(job: Job, device: str, slot: int) -> subprocess.Popen:
        spec = {**by_run[job.run], "device": device, "benchmarks": {job.benchmark: by_run[job.run]["benchmarks"][
            job.benchmark]}, "progress_file": str(job.progress), "worker": {"slot": slot, "device": device}}
        job.dir.mkdir(parents=True, exist_ok=True)
        job.spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        job.progress.unlink(missing_ok=True)
        child_env = dict(env)
        if device == "cpu" and threads is not None:
            child_env.setdefault("OMP_NUM_THREADS", str(threads))
        with open(job.log, "a", encoding="utf-8") as f:  # the child keeps its own handle
            proc = subprocess.Popen([sys.executable, "-m", "qzoom_swift.eval.command", "worker", str(job.spec_path),
                                     str(os.getpid())], stdout=f, stderr=subprocess.STDOUT, env=child_env)
        tag = f"{job.run} on {device}#{slot}"
        printers[id(job)] = progress_printer(tag, job.run_dir, job.log, path=job.progress)
        print(f"[qzoom eval] {job.label}: started on {device} (worker {slot}, pid {proc.pid}; log: {job.log})",
              flush=True)
        return proc

    def on_exit(job: Job) -> None:
        if job.returncode == 0:
            print(f"[qzoom eval] {job.label}: done in {job.elapsed_s:.0f} s on {job.device}", flush=True)
        else:
            print(f"[qzoom eval] {job.label}: FAILED (exit {job.returncode}) after {job.elapsed_s:.0f} s on "
                  f"{job.device}; last lines of {job.log}:\n{_tail(job.log)}", file=sys.stderr)

    failed = run_on_devices(jobs, devices, launch, poll_s=args.progress_interval,
                            on_poll=lambda job: printers[id(job)](), on_exit=on_exit)
    return [job.label for job in failed]


def run(args: argparse.Namespace) -> int:
    from qzoom_swift.extras import require_extra

    require_extra("eval", "qzoom eval")  # here, not in a worker's log
    if getattr(args, "backend", "transformers") == "vllm":
        _require_vllm()
    try:
        if getattr(args, "backend", "transformers") == "vllm" and args.devices:
            raise ValueError("--devices runs transformers workers only; with --backend vllm use one worker (vLLM "
                             "spreads a model over GPUs with --vllm-arg tensor_parallel_size=N)")
        specs, names = build_run_specs(args)
        if not args.summary_only:
            check_datasets({n: Path(b["dataset"]) for n, b in specs[0]["benchmarks"].items()})
            model = Path(args.model)
            if not args.online and not model.is_dir():
                raise FileNotFoundError(f"qzoom eval: --model {args.model} is not a local model dir (offline; pass "
                                        "--online to let transformers download a hub id)")
            for spec in specs:
                ck = spec["checkpoint"]
                if ck and not Path(ck).is_dir():
                    raise FileNotFoundError(f"qzoom eval: run {spec['run']['name']}: checkpoint {ck} does not exist")
    except (ValueError, FileNotFoundError) as exc:
        print(f"{exc}" if str(exc).startswith("qzoom eval") else f"qzoom eval: {exc}", file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    family = model_family(args.model)
    preset = (family if family in PRESETS else "none") if args.preset == "auto" else args.preset
    print(f"[qzoom eval] {len(specs)} run(s) x {len(names)} benchmark(s); thresholds: "
          + ("the checkpoint's own (no preset)" if preset == "none" else f"official {preset} table"), flush=True)
    if args.summary_only:
        failures = []
    elif args.devices:
        failures = _run_on_devices(specs, args)
    else:
        failures = _run_workers(specs, args)

    results = []
    for spec in specs:
        run_dir = Path(spec["run_dir"])
        per = {}
        for n, b in spec["benchmarks"].items():
            stored = _stored(run_dir, n, b)
            if stored is not None:
                per[n] = stored["result"]
        if per:
            results.append({**spec["run"], "benchmarks": per})
    if not results:
        print("qzoom eval: no results to summarise", file=sys.stderr)
        return 1
    from qzoom_swift.eval.report import summarize, write_summary

    reference = args.reference
    if reference is not None and reference not in {r["name"] for r in results}:
        print(f"qzoom eval: --reference {reference!r} is not a run with results", file=sys.stderr)
        return 2
    summary = summarize(results, names, reference)
    summary["settings"] = {"model": str(args.model), "checkpoint": args.checkpoint, "limit": args.limit,
                           "max_new_tokens": args.max_new_tokens, "preset": preset, "prompts": args.prompts}
    summary["datasets"] = _dataset_record(specs, results)
    paths = write_summary(summary, out)
    print(paths["markdown"].read_text())
    print(f"[qzoom eval] wrote {', '.join(str(p) for p in paths.values())}")
    return 1 if failures else 0


def _require_vllm() -> None:
    """vLLM is an extra with a torch of its own: say what to install, and where this checkout has it."""
    from qzoom_swift.extras import MissingExtraError, require_extra

    try:
        require_extra("vllm", "qzoom eval --backend vllm")
    except MissingExtraError as exc:
        raise MissingExtraError(f"{exc}; {VLLM_INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------------ worker


def worker(spec_path: str | Path, parent_pid: int | None = None) -> int:
    """Run the pending benchmarks of one run spec (in this process: the model is loaded once).

    With ``parent_pid`` (``qzoom eval`` passes its own) the worker exits when that parent dies, even by SIGKILL.
    """
    if parent_pid is not None:
        die_with_parent(signal.SIGTERM, parent_pid)

    spec = json.loads(Path(spec_path).read_text())
    import qzoom_swift.eval.model_api  # noqa: F401  (registers the model API and the plugin benchmarks)
    from qzoom_swift.eval.vllm_backend import shutdown_engines, stop_engines_on_signal

    if spec.get("backend") == "vllm":
        stop_engines_on_signal()  # a stopped run stops its engine's processes too
    try:
        return _run_pending(spec)
    finally:
        shutdown_engines()  # the vLLM engines this run started (none with transformers)


def _run_pending(spec: dict[str, Any]) -> int:
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model_id = spec["run"]["name"]
    print(f"[worker {model_id}] pid {os.getpid()} on {spec['device']}", flush=True)
    pending = _pending(spec)
    for index, name in enumerate(pending, 1):
        result = _run_benchmark(spec, name, index, len(pending))
        rate = "-" if result["zoom_rate"] is None else f"{result['zoom_rate']:.2f}"
        print(f"[worker {model_id}] {name}: score {result['score']:.4f}, {result['samples']} samples, "
              f"zoom rate {rate}", flush=True)
        for bad in result.get("failed_samples", []):  # scored as failed; the run went on
            print(f"[worker {model_id}] {name}: sample {bad['subset']}#{bad['index']} failed ({bad['failure']}: "
                  f"{bad['error'][:200]})", flush=True)
    return 0


def _run_benchmark(spec: dict[str, Any], name: str, index: int, count: int) -> dict[str, Any]:
    """One evalscope task of the worker's run; stores ``<run_dir>/bench/<name>.json`` atomically; its numbers."""
    from evalscope import TaskConfig, run_task

    from qzoom_swift.eval.local_data import HF_CACHE_DIR, local_datasets_cache
    from qzoom_swift.eval.report import collect_benchmark
    from qzoom_swift.fileio import write_json_atomic

    run_dir, model_id, bench = Path(spec["run_dir"]), spec["run"]["name"], spec["benchmarks"][name]
    work = run_dir / "evalscope" / name
    if work.exists():
        shutil.rmtree(work)  # a half-finished task: redo it whole (latency of cached samples is lost)
    model_args = {"checkpoint": spec["checkpoint"], "max_new_tokens": spec["max_new_tokens"],
                  "dtype": spec["dtype"], "device": spec["device"],
                  "attn_implementation": spec["attn_implementation"],
                  "max_batch_size": spec["eval_batch_size"], **bench["overrides"]}
    if spec.get("backend", "transformers") != "transformers":
        model_args.update(backend=spec["backend"], engine_args=spec.get("engine_args") or {})
    dataset_args: dict[str, Any] = {"dataset_id": bench["dataset"]}
    if bench.get("prompt_template"):
        dataset_args["prompt_template"] = bench["prompt_template"]
    print(f"[worker {model_id}] {name}: {json.dumps(bench['overrides'])}", flush=True)
    started, t0 = time.time(), time.perf_counter()
    datasets_dir = run_dir / "evalscope" / ".datasets" / name  # one per benchmark: parallel workers never share it
    task = TaskConfig(eval_type="qzoom", model=spec["model"], model_id=model_id, model_args=model_args,
                      datasets=[name], dataset_args={name: dataset_args},
                      generation_config={"max_tokens": spec["max_new_tokens"], "do_sample": False},
                      limit=spec["limit"], eval_batch_size=spec["eval_batch_size"], work_dir=str(work),
                      no_timestamp=True, dataset_dir=str(datasets_dir))
    with (local_datasets_cache(bench["dataset"], datasets_dir / HF_CACHE_DIR),
          track_evalscope_progress(run_dir, name, index, count, path=spec.get("progress_file"))):
        run_task(task)  # the folder as it is now, never a cache entry of another folder of the same name
    result = collect_benchmark(work, model_id, name)
    worker_info = {"pid": os.getpid(), "device": spec["device"], "started": started, "finished": time.time(),
                   **(spec.get("worker") or {})}
    record = {"benchmark": name, "run": spec["run"], "fingerprint": bench["fingerprint"], "settings": bench,
              "elapsed_s": time.perf_counter() - t0, "worker": worker_info, "result": result}
    write_json_atomic(run_dir / "bench" / f"{name}.json", record)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) in (2, 3) and argv[0] == "worker":
        return worker(argv[1], int(argv[2]) if len(argv) == 3 else None)
    print("usage: python -m qzoom_swift.eval.command worker SPEC.json (use `qzoom eval` instead)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DatasetMissingError", "RunSpec", "add_arguments", "build_run_specs", "run", "worker"]
