#!/usr/bin/env python
"""What does ``qzoom eval --eval-batch-size N`` buy? The evalscope runner at eval batch N against 1.

The ``qzoom`` evalscope ModelAPI used to serialise evalscope's concurrent calls behind a lock; it now
groups them into one ``QZoomModel.generate`` batch (``qzoom_swift.eval.batcher``). This script runs the
real evalscope runner (``evalscope.run_task`` with ``eval_type="qzoom"``, as a ``qzoom eval`` worker does)
in this process on a local copy of the synthetic zoom bench (``qzoom_swift.bench.dataset``: 448x448 cards,
``--samples`` questions, benchmark ``qzoom_bench``) with a locally built model (``qzoom_swift.synthetic``,
``--size tiny`` or ``bench``) and fresh branches, at ``eval_batch_size`` 1 and ``--batch`` (model_args
``max_batch_size`` the same), ``--rounds`` times each, interleaved (the order alternates per round).
The model is loaded once (the API shares it per process) and a warm-up task runs first.

Reported per eval batch size: the wall time of ``run_task`` (data loading, scoring and reports included)
and the model time (the per-sample latencies evalscope stores, which add up to the time inside
``QZoomModel.generate``), as samples/s, their medians over rounds and the ratio batch N / batch 1; the
batch sizes the batcher formed; and whether every sample got the same answer at both sizes (greedy
decoding: it must). A benchmark, not a test: nothing is asserted; answer mismatches are printed.

Run ``python benchmarks/bench_eval_batch.py --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line, setup_torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", default="qwen2_5_vl", help="model family of the locally built model")
    p.add_argument("--size", default="tiny", choices=("tiny", "bench"), help="locally built model size")
    p.add_argument("--samples", type=int, default=16, help="zoom-bench questions per task")
    p.add_argument("--batch", type=int, default=4, help="eval batch size compared with 1")
    p.add_argument("--rounds", type=int, default=3, help="timed tasks per batch size (interleaved)")
    p.add_argument("--mode", default="always", choices=("always", "never", "zoom"),
                   help="Q-Zoom mode (always: every sample takes the crop path)")
    p.add_argument("--tokens", type=int, default=64, help="low and RoI max visual tokens (min = half)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length (greedy, may stop early)")
    p.add_argument("--window", type=float, default=0.05, help="batcher collection window, seconds")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The model dir and the local evalscope data folder of the zoom bench's test split."""
    from qzoom_swift.bench.dataset import EVALSCOPE_NAME, write_bench, write_evalscope_split
    from qzoom_swift.synthetic.models import build_model_dir

    model = build_model_dir(args.family, args.size)
    write_bench(work / "bench", {"test": args.samples}, seed=3)  # one question per card
    return model, write_evalscope_split(work / "bench", "test") / EVALSCOPE_NAME


def run_once(args: argparse.Namespace, model: Path, data: Path, work: Path, batch: int, tag: str,
             limit: int) -> dict:
    """One evalscope task at eval batch ``batch``; wall time, per-sample answers, model time, batch sizes."""
    from evalscope import TaskConfig, run_task

    import qzoom_swift.eval.model_api  # noqa: F401  (registers the ModelAPI and qzoom_bench)
    from qzoom_swift.eval.local_data import HF_CACHE_DIR, local_datasets_cache

    model_args = {"device": "cpu", "dtype": "float32", "mode": args.mode, "tau_gate": 0.0,
                  "low_max_tokens": args.tokens, "low_min_tokens": args.tokens // 2,
                  "roi_max_tokens": args.tokens, "roi_min_tokens": args.tokens // 2,
                  "max_new_tokens": args.max_new_tokens, "max_batch_size": batch, "batch_window_s": args.window}
    out = work / "tasks" / tag
    task = TaskConfig(eval_type="qzoom", model=str(model), model_id=tag, model_args=model_args,
                      datasets=["qzoom_bench"], dataset_args={"qzoom_bench": {"dataset_id": str(data)}},
                      generation_config={"max_tokens": args.max_new_tokens, "do_sample": False}, limit=limit,
                      eval_batch_size=batch, work_dir=str(out), no_timestamp=True,
                      dataset_dir=str(work / "datasets"))
    with local_datasets_cache(data, work / "datasets" / HF_CACHE_DIR):
        t0 = time.perf_counter()
        run_task(task)
        wall = time.perf_counter() - t0
    answers, latency, sizes = {}, 0.0, Counter()
    for f in sorted((out / "predictions" / tag).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            meta = row["model_output"]["metadata"]["qzoom"]
            answers[(f.name, row["index"])] = row["model_output"]["choices"][0]["message"]["content"]
            latency += meta["latency_s"]
            sizes[meta["batch_size"]] += 1
    return {"wall_s": wall, "model_s": latency, "answers": answers, "samples": len(answers),
            "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}


def measure(args: argparse.Namespace, model: Path, data: Path, work: Path) -> dict:
    """Interleaved rounds at batch 1 and ``args.batch`` after a warm-up; every result kept."""
    run_once(args, model, data, work, args.batch, "warmup", min(args.samples, args.batch * 2))
    results: dict[int, list[dict]] = {1: [], args.batch: []}
    for r in range(args.rounds):
        order = (1, args.batch) if r % 2 == 0 else (args.batch, 1)
        for batch in order:
            res = run_once(args, model, data, work, batch, f"b{batch}-r{r}", args.samples)
            results[batch].append(res)
            print(f"  round {r} batch {batch}: {res['samples']} samples, wall {res['wall_s']:.2f} s, model "
                  f"{res['model_s']:.2f} s, batches {res['batch_sizes']}", flush=True)
    return results


def report(args: argparse.Namespace, results: dict[int, list[dict]]) -> dict:
    ref = results[1][0]["answers"]
    mismatches = [(b, k, ref[k], res["answers"].get(k)) for b, runs in results.items() for res in runs
                  for k in ref if res["answers"].get(k) != ref[k]]
    summary = {}
    for batch, runs in results.items():
        n = runs[0]["samples"]
        summary[batch] = {"samples": n, "wall_sps": statistics.median(n / r["wall_s"] for r in runs),
                          "model_sps": statistics.median(n / r["model_s"] for r in runs),
                          "wall_s": [round(r["wall_s"], 3) for r in runs],
                          "model_s": [round(r["model_s"], 3) for r in runs], "batch_sizes": runs[-1]["batch_sizes"]}
    b = args.batch
    print(f"\n{'eval batch':>10} | {'samples':>7} | {'wall samples/s':>14} | {'model samples/s':>15} | batches formed")
    for batch in (1, b):
        s = summary[batch]
        print(f"{batch:>10} | {s['samples']:>7} | {s['wall_sps']:>14.2f} | {s['model_sps']:>15.2f} | "
              f"{s['batch_sizes']}")
    ratio_wall = summary[b]["wall_sps"] / summary[1]["wall_sps"]
    ratio_model = summary[b]["model_sps"] / summary[1]["model_sps"]
    print(f"\nthroughput ratio batch {b} / batch 1 (medians): wall {ratio_wall:.2f}x, model time {ratio_model:.2f}x")
    print(f"same per-sample answers at batch {b} and 1: {not mismatches} "
          f"({len(ref)} samples x {sum(len(r) for r in results.values())} tasks compared)")
    for batch, key, want, got in mismatches[:10]:
        print(f"  MISMATCH batch {batch} {key}: {want!r} vs {got!r}")
    return {"per_batch": summary, "ratio_wall": ratio_wall, "ratio_model": ratio_model,
            "same_answers": not mismatches, "mismatches": len(mismatches)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    import torch

    from qzoom_swift.fileio import quiet_transformers, write_json_atomic

    quiet_transformers()
    print(f"# bench_eval_batch: {command_line('benchmarks/bench_eval_batch.py', argv)}")
    print(f"# python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; model {args.family}/{args.size}, mode {args.mode}, {args.tokens} visual tokens, "
          f"{args.max_new_tokens} new tokens, window {args.window} s")
    with tempfile.TemporaryDirectory(prefix="bench_eval_batch.") as tmp:
        work = (args.work or Path(tmp)).resolve()
        model, data = prepare(args, work)
        results = measure(args, model, data, work)
    out = report(args, results)
    if args.json:
        write_json_atomic(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
