#!/usr/bin/env python
"""Data-parallel labelling on this machine: 2 processes x 1 thread vs 1 process x 2 threads.

``qzoom pseudo-labels`` (or ``gate-labels``) on the ``bench`` model (width 512, 12 layers, random weights)
over N synthetic records, run twice in the same invocation:

1. ``one process``: ``OMP_NUM_THREADS=2``, no shards;
2. ``two shards``: ``--num-shards 2 --shard-index 0|1`` started together, ``OMP_NUM_THREADS=1`` each (what
   ``torchrun --nproc_per_node 2`` does on a 2-GPU machine, one process per device).

It prints the wall time of each (model load included, as a user waits for it) and the labelling time
(from the jobs' own summaries, model load excluded), the ratio one / two, and checks that both runs wrote
the same records. 2x is the ceiling on 2 cores; what keeps it below is printed next to it: each process
loads its own copy of the model, small matrices do not split well over two threads either way, and the
machine's other load.

Example: python benchmarks/bench_data_parallel.py --records 16 --job pseudo-labels
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench_env

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="pseudo-labels", choices=("pseudo-labels", "gate-labels"))
    p.add_argument("--size", default="bench", choices=("tiny", "bench"))
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", default=None, help="optional JSON results path")
    return p.parse_args(argv)


def _command(job: str, model: Path, data: Path, out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "qzoom_swift.cli", job, "--model", str(model), "--dataset", str(data),
           "--out", str(out), "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--no-progress", "--device", "cpu"]
    if job == "pseudo-labels":
        cmd += ["--heads", "8:0,1;9"]  # explicit heads: shards need the layer choice up front
    else:
        cmd += ["--budgets", "16,64"]
    return cmd


def _run(commands: list[list[str]], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(proc.args[:5])} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def _records(out: Path) -> dict[str, str]:
    rows = {}
    for shard in out.glob("shard-*.jsonl"):
        for line in shard.read_text().splitlines():
            row = json.loads(line)
            rows[row["qzoom_id"]] = json.dumps({k: v for k, v in row.items()}, sort_keys=True)
    return rows


def _work_seconds(out: Path) -> float:
    """Labelling time without the model load: the single job's own figure, or the slowest shard's."""
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("parts"):
        return max(p["labelling_s"] for p in summary["parts"])
    return summary["labelling_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    from qzoom_swift.synthetic.images import write_shape_dataset
    from qzoom_swift.synthetic.models import build_model_dir

    model = build_model_dir("qwen2_5_vl", args.size)
    work = Path(tempfile.mkdtemp(prefix="qzoom-dp-"))
    data = write_shape_dataset(work / "data", n=args.records, size=(392, 280), seed=0)
    one = _run([_command(args.job, model, data, work / "one", args)], threads=2)
    two = _run([[*_command(args.job, model, data, work / "two", args), "--num-shards", "2", "--shard-index", str(i)]
                for i in range(2)], threads=1)
    same = _records(work / "one") == _records(work / "two")
    res = {"job": args.job, "size": args.size, "records": args.records, "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "one_process_2_threads_s": round(one, 2),
           "two_shards_1_thread_s": round(two, 2), "ratio_wall": round(one / two, 3),
           "one_work_s": round(_work_seconds(work / "one"), 2),
           "two_work_s": round(_work_seconds(work / "two"), 2), "same_records": same,
           "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "command": _bench_env.command_line(__file__, argv)}
    res["ratio_work"] = round(res["one_work_s"] / res["two_work_s"], 3)
    print(f"{args.job} on the {args.size} Qwen2.5-VL, {args.records} records, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'':<28}{'wall s':>10}{'labelling s':>14}")
    print(f"{'1 process x 2 threads':<28}{one:>10.2f}{res['one_work_s']:>14.2f}")
    print(f"{'2 shards x 1 thread':<28}{two:>10.2f}{res['two_work_s']:>14.2f}")
    print(f"ratio (1 process / 2 shards): wall {res['ratio_wall']:.2f}x, labelling {res['ratio_work']:.2f}x "
          f"(ceiling 2x on {res['cpus']} cores); same records: {same}; 1-min load average {res['load_avg_1m']}")
    print("below 2x: each shard loads its own model (counted in wall time), the last block of a shard "
          "finishes alone, and two threads already use both cores for the larger matrices")
    print(f"command: {res['command']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
