#!/usr/bin/env python
"""Q-Zoom on vLLM against plain vLLM and against Q-Zoom on transformers, on a finished zoom-bench run.

Where does vLLM win, and what does the front router's extra pass cost? ``QZoomVLLM`` decides every sample before
its request (the router: vision, layers [0, B), gate and RPN on the low-resolution prompt, in this process), then
sends one vLLM request per sample (``qzoom_swift/vllm_plugin/engine.py``). This script answers the first
``--limit`` test questions of a ``qzoom demo`` run (its toy base and calibrated branch checkpoint, from the run's
``summary.json``) with, at batch 1 and batch 8 (``--batches``), in one process:

- ``Q-Zoom, vLLM``:        ``QZoomVLLM`` with the gated settings of the demo's ``qzoom`` row; its router time
                           (``QZoomVLLM.plan``) is timed apart from the engine's (prompts sent, generate, decoding);
- ``plain@HIGH, vLLM``:    no router, the chat prompt as text and the image resized to the high budget (256
                           tokens on the full preset): what Q-Zoom must beat; ``plain@LOW, vLLM`` at the low
                           budget: Q-Zoom's ceiling (its first pass alone, nothing zoomed);
- the same three through transformers (``QZoomModel.generate``, fp32, the same base and checkpoint loaded once
  more in this process: modes ``zoom`` and ``never`` at each budget).

Rows take turns per block of 40 questions (rotating order), vLLM's prefix cache is emptied before each turn (a
zoomed request must not reuse the blocks another row cached for the same image), and every row is warmed up
first. Plain rows run on the same engine as Q-Zoom: the registered Q-Zoom model class adds only a per-image box
field, absent from a plain request. Accuracy uses the bench's answer matching (``bench.evaluate``), and the demo
run's own transformers rows (its ``evaluate/answers.jsonl``, batch 1, the demo's environment) are printed for the
same questions. Throughput is answers per second of wall time, image loading excluded; on a shared machine the
ratios of rows measured side by side are the figures to read, not the absolute rates.

Run in the vLLM environment (``.venv-vllm``; fp32, ``enforce_eager``)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py --run runs/demo --limit 200

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line, setup_torch

BLOCK = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"),
                   help="a finished `qzoom demo --out` folder (default: runs/demo): its summary.json names the model, "
                        "checkpoint, bench and settings")
    p.add_argument("--model", default=None, help="base model folder (default: the run's model_dir)")
    p.add_argument("--checkpoint", default=None, help="branch checkpoint (default: the run's calibrated one)")
    p.add_argument("--limit", type=int, default=200, help="first N questions of the split (default: 200)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default: 1,8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, this process and the engine's (default: 2)")
    p.add_argument("--kv-cache-gb", type=int, default=1, help="vLLM CPU KV cache in GiB (default: 1)")
    p.add_argument("--no-transformers", action="store_true", help="vLLM rows only")
    p.add_argument("--embeds", action="store_true",
                   help="add Q-Zoom on vLLM with the router's image features passed to vLLM instead of the images "
                        "(QZoomVLLM(pass_embeddings=True); Qwen2.5-VL): vLLM skips its vision tower")
    p.add_argument("--out", default=None, help="optional JSON results path (written atomically)")
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    return args


def _rate(rows: list[dict]) -> float:
    seconds = sum(r["latency_s"] for r in rows)
    return len(rows) / seconds if seconds else float("nan")


def _acc(rows: list[dict], kind: str | None = None) -> float:
    sel = [r for r in rows if kind is None or r["kind"] == kind]
    return sum(r["correct"] for r in sel) / len(sel) if sel else float("nan")


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    demo = summary["demo_config"]
    from qzoom_swift.bench.settings import NUMERICS_ENV

    os.environ.update(NUMERICS_ENV[demo.get("numerics", "native")])  # the run's kernels, before torch loads
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the engine's process reads it at start
    setup_torch(args.threads)
    import platform

    import torch

    from qzoom_swift.bench.dataset import read_split
    from qzoom_swift.bench.vllm_rows import (
        VLLMRowsSpec,
        answer_rows,
        start_engine,
        transformers_name,
        transformers_rows,
        vllm_runs,
    )

    low, high = demo["low_tokens"], demo["high_tokens"]
    bench_root = summary["stages"]["bench"]["outputs"]["root"]
    records = read_split(bench_root, demo["eval_split"])[: args.limit]
    vruns = vllm_runs(low, high, demo["roi_fallback"], demo["roi_max_tokens"])
    qz_run, low_run, high_run = vruns
    spec = VLLMRowsSpec(args.model or summary["model_dir"], args.checkpoint or summary["checkpoint"], bench_root,
                        out="", runs=[asdict(r) for r in vruns], reference=high_run.name, low_tokens=low,
                        kv_cache_space_gb=args.kv_cache_gb, max_new_tokens=demo["eval_new_tokens"],
                        engine_kwargs={"enable_mm_embeds": True} if args.embeds else {})
    new_tokens = demo["eval_new_tokens"]
    import vllm

    print(f"command: {command_line('bench_vllm.py', argv)}")
    print(f"vllm {vllm.__version__}, torch {torch.__version__} threads={torch.get_num_threads()} (engine: "
          f"OMP_NUM_THREADS={args.threads}), python {platform.python_version()}, cpus={os.cpu_count()}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()} (numerics={demo.get('numerics')}); "
          f"load average at start {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"run {args.run}: model {spec.model_dir}, checkpoint {spec.checkpoint}; {len(records)} {demo['eval_split']} "
          f"questions ({sum(r.kind == 'fine' for r in records)} fine), budgets {low}/{high} tokens, "
          f"{new_tokens} new tokens, batches {args.batch_list}, fp32, enforce_eager")
    t0 = time.perf_counter()
    engine = start_engine(spec)
    start_s = time.perf_counter() - t0
    print(f"engine start (router load + vLLM engine) {start_s:.1f} s", flush=True)
    from qzoom_swift.model import QZoomModel

    # the transformers rows' own model: the engine's router may hold only what pass 1 runs
    qz = QZoomModel.from_pretrained(spec.model_dir, checkpoint=spec.checkpoint, dtype=torch.float32, device="cpu")
    trows = [(transformers_name(r.name), replace(r, name=transformers_name(r.name))) for r in vruns]
    # (label, backend, run, batch)
    rows_spec = []
    for b in args.batch_list:
        for (tname, trun), vrun in zip(trows, vruns):
            rows_spec.append((f"{vrun.name} b{b}", "vllm", vrun, b))
            if args.embeds and vrun is qz_run:
                rows_spec.append((f"{vrun.name} embeds b{b}", "vllm-embeds", vrun, b))
            if not args.no_transformers:
                rows_spec.append((f"{tname} (transformers) b{b}", "transformers", trun, b))

    def answer(backend: str, run, batch: int, recs) -> list[dict]:
        if backend == "vllm-embeds":  # the same engine and router, the router's image features sent instead
            engine.planner.pass_embeddings = True
            try:
                return answer_rows(engine, recs, [run], None, batch_size=batch, max_new_tokens=new_tokens,
                                   block=len(recs), progress=False)
            finally:
                engine.planner.pass_embeddings = False
        if backend == "vllm":
            return answer_rows(engine, recs, [run], None, batch_size=batch, max_new_tokens=new_tokens, block=len(recs),
                               progress=False)
        return transformers_rows(qz, recs, run, batch_size=batch, max_new_tokens=new_tokens)

    t0 = time.perf_counter()
    for _, backend, run, b in rows_spec:  # warm-up: first calls pay one-off allocations (vLLM: its first shapes)
        answer(backend, run, b, records[:b])
    warm_s = time.perf_counter() - t0
    results: dict[str, list[dict]] = {label: [] for label, *_ in rows_spec}
    t0 = time.perf_counter()
    blocks = [records[i:i + BLOCK] for i in range(0, len(records), BLOCK)]
    for k, chunk in enumerate(blocks):
        order = rows_spec[k % len(rows_spec):] + rows_spec[: k % len(rows_spec)]
        for label, backend, run, b in order:
            results[label] += answer(backend, run, b, chunk)
        print(f"  block {k + 1}/{len(blocks)} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    timed_s = time.perf_counter() - t0
    engine.shutdown()

    # the demo run's own transformers rows on the same questions (batch 1, its environment)
    ids = {r.id for r in records}
    demo_rows: dict[str, list[dict]] = {}
    answers_path = Path(summary["stages"]["evaluate"]["outputs"]["answers"])
    if answers_path.is_file():
        for line in answers_path.read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            if row and row["id"] in ids and row["run"] in (t for t, _ in trows):
                demo_rows.setdefault(row["run"], []).append(row)

    print(f"\nwarm-up {warm_s:.1f} s, timed {timed_s:.1f} s; load average after "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    head = (f"{'row':<36} {'answers/s':>9} {'ms/answer':>9} {'acc':>6} {'fine':>6} {'coarse':>6} {'zoom f/c':>11} "
            f"{'vis tok':>7} {'router':>7}")
    print(head)
    print("-" * len(head))
    table = {}
    for label, backend, run, b in rows_spec:
        rows = results[label]
        rate = _rate(rows)
        fine = [r for r in rows if r["kind"] == "fine"]
        coarse = [r for r in rows if r["kind"] == "coarse"]
        zr = "-" if run.mode == "never" else (f"{sum(r['zoomed'] for r in fine) / max(1, len(fine)):.2f}/"
                                              f"{sum(r['zoomed'] for r in coarse) / max(1, len(coarse)):.2f}")
        router = sum(r.get("time_router_s", 0.0) for r in rows) / sum(r["latency_s"] for r in rows)
        vis = sum(r["visual_tokens"] for r in rows) / len(rows)
        table[label] = {"backend": backend, "run": run.name, "batch": b, "answers_per_s": rate, "accuracy": _acc(rows),
                        "accuracy_fine": _acc(rows, "fine"), "accuracy_coarse": _acc(rows, "coarse"),
                        "zoom_rate": sum(r["zoomed"] for r in rows) / len(rows), "visual_tokens": vis,
                        "router_share": router if backend.startswith("vllm") and run.mode != "never" else None,
                        "router_ms": 1000 * sum(r.get("time_router_s", 0.0) for r in rows) / len(rows),
                        "engine_ms": 1000 * sum(r.get("time_engine_s", 0.0) for r in rows) / len(rows),
                        "errors": sum(r.get("error") is not None for r in rows)}
        rs = "-" if table[label]["router_share"] is None else f"{100 * router:5.1f}%"
        print(f"{label:<36} {rate:>9.2f} {1000 / rate:>9.1f} {_pct(_acc(rows))} {_pct(_acc(rows, 'fine'))} "
              f"{_pct(_acc(rows, 'coarse'))} {zr:>11} {vis:>7.1f} {rs:>7}")
    for name, rows in demo_rows.items():
        print(f"{name + ' (demo run, transformers b1)':<36} {_rate(rows):>9.2f} {1000 / _rate(rows):>9.1f} "
              f"{_pct(_acc(rows))} {_pct(_acc(rows, 'fine'))} {_pct(_acc(rows, 'coarse'))}   (timed in the demo run)")

    print("\nratios (answers/s of the first / the second, measured side by side in this run):")
    wins, losses, router_lines = [], [], []
    for b in args.batch_list:
        q, lo, hi = (table[f"{r.name} b{b}"] for r in vruns)
        lines = [(f"Q-Zoom vLLM / plain vLLM@{high}", q, hi), (f"Q-Zoom vLLM / plain vLLM@{low} (the ceiling)", q, lo)]
        if not args.no_transformers:
            tq, tlo, thi = (table[f"{t} (transformers) b{b}"] for t, _ in trows)
            lines += [("Q-Zoom vLLM / Q-Zoom transformers", q, tq), (f"plain vLLM@{high} / transformers@{high}", hi, thi),
                      (f"plain vLLM@{low} / transformers@{low}", lo, tlo),
                      (f"Q-Zoom transformers / transformers@{high}", tq, thi)]
        if args.embeds:
            lines.append(("Q-Zoom vLLM embeds / Q-Zoom vLLM images", table[f"{qz_run.name} embeds b{b}"], q))
        for text, a, c in lines:
            ratio = a["answers_per_s"] / c["answers_per_s"]
            print(f"  batch {b}: {text:<48} {ratio:6.2f}x")
            if a["backend"] == "vllm" and c["backend"] == "transformers":
                (wins if ratio > 1 else losses).append(f"{text.replace(' / ', ' vs ')} at batch {b} ({ratio:.2f}x)")
        print(f"  batch {b}: Q-Zoom vLLM: router {q['router_ms']:.1f} ms + engine {q['engine_ms']:.1f} ms an answer "
              f"(router {100 * q['router_share']:.1f}% of its time); plain vLLM@{low}, the same requests for the samples "
              f"not zoomed and no router: {lo['engine_ms']:.1f} ms")
        router_lines.append(f"batch {b}: the router's pass is {100 * q['router_share']:.0f}% of Q-Zoom-vLLM time "
                            f"({q['router_ms']:.1f} ms an answer); Q-Zoom on vLLM reaches "
                            f"{100 * q['answers_per_s'] / lo['answers_per_s']:.0f}% of plain vLLM@{low} (its ceiling) "
                            f"and {q['answers_per_s'] / hi['answers_per_s']:.2f}x plain vLLM@{high}")
    if len(args.batch_list) > 1:
        b0, b1 = args.batch_list[0], args.batch_list[-1]
        for r in vruns:
            gain = table[f"{r.name} b{b1}"]["answers_per_s"] / table[f"{r.name} b{b0}"]["answers_per_s"]
            print(f"  {r.name}: batch {b1} / batch {b0} {gain:.2f}x")
    print("\nverdict:")
    if wins:
        print(f"  vLLM wins: {'; '.join(wins)}")
    if losses:
        print(f"  vLLM loses: {'; '.join(losses)}")
    for line in router_lines:
        print(f"  {line}")
    if not args.no_transformers:
        for b in args.batch_list:
            v = {r["id"]: r for r in results[f"{qz_run.name} b{b}"]}
            t = {r["id"]: r for r in results[f"{trows[0][0]} (transformers) b{b}"]}
            same = sum(v[i]["answer"] == t[i]["answer"] for i in v) / len(v)
            dec = sum(bool(v[i]["zoomed"]) == bool(t[i]["zoomed"]) for i in v) / len(v)
            print(f"  batch {b}: Q-Zoom vLLM vs transformers: same answer {_pct(same)}, same zoom decision {_pct(dec)}")
    for b in args.batch_list if args.embeds else []:
        e = {r["id"]: r for r in results[f"{qz_run.name} embeds b{b}"]}
        v = {r["id"]: r for r in results[f"{qz_run.name} b{b}"]}
        print(f"  batch {b}: Q-Zoom vLLM embeds vs images: same answer "
              f"{_pct(sum(e[i]['answer'] == v[i]['answer'] for i in e) / len(e))}")
    if args.out:
        from qzoom_swift.fileio import write_json_atomic

        write_json_atomic(args.out, {"command": command_line("bench_vllm.py", argv), "engine_start_s": start_s,
                                     "warmup_s": warm_s, "timed_s": timed_s, "rows": table,
                                     "questions": len(records),
                                     "demo_rows": {n: {"accuracy": _acc(rs), "accuracy_fine": _acc(rs, "fine"),
                                                       "accuracy_coarse": _acc(rs, "coarse")}
                                                   for n, rs in demo_rows.items()},
                                     "args": {k: str(v) for k, v in vars(args).items()}})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # vLLM's engine process is spawned: it imports this file again
    sys.exit(main())
