"""Shared set-up of the CPU benchmark scripts (imported before torch; scripts run from ``benchmarks/``).

Offline hub, CPU DeepSpeed, the repo's model cache, and OpenMP threads that sleep instead of spinning:
on a shared 2-core machine busy-waiting threads made timings 5-8x slower and erratic (bench_zoom.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("OMP_WAIT_POLICY", "PASSIVE"),
                     ("QZOOM_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "qzoom"))):
    os.environ.setdefault(_key, _value)


def setup_torch(threads: int) -> None:
    """``threads`` intra-op threads, one inter-op thread (if not already fixed by an earlier call)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def qzoom_at_budget(family: str, size: str, attn: str, mode: str, tokens: int):
    """A locally built model (``qzoom build-tiny --size SIZE``) as a float32 ``QZoomModel`` whose first pass
    and RoI are both encoded at ``tokens`` visual tokens: the per-sample cost stays fixed across images."""
    import torch

    from qzoom_swift.model import QZoomModel
    from qzoom_swift.synthetic.models import build_model_dir

    return QZoomModel.from_pretrained(str(build_model_dir(family, size)), dtype=torch.float32,
                                      attn_implementation=attn,
                                      config_overrides={"mode": mode, "low_min_tokens": tokens, "low_max_tokens": tokens,
                                                        "roi_min_tokens": tokens, "roi_max_tokens": tokens})


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, for the printed report."""
    args = [sys.executable, *sys.argv] if argv is None else [script, *argv]
    return " ".join(shlex.quote(a) for a in args)


def run_per_family(script: str, argv: list[str] | None, args, families, settings: str, bench_family,
                   print_family, print_summary, notes: tuple[str, ...] = ()) -> int:
    """The shared body of the per-family benchmarks: header, one run per family, summary, optional JSON.

    ``settings`` is the script's own part of the header line; ``args.out`` (if set) gets the JSON results.
    """
    import os
    import platform
    import time

    import torch
    import transformers

    from qzoom_swift.fileio import write_json_atomic

    setup_torch(args.threads)
    command = command_line(script, argv)
    print(f"command: {command}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}, {platform.machine()} cpus={os.cpu_count()}; {settings}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"load average at start {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    for note in notes:
        print(note)
    t0 = time.perf_counter()
    results = []
    for family in families:
        res = bench_family(family, args)
        print_family(res)
        results.append(res)
    print_summary(results)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s")
    if args.out:
        write_json_atomic(args.out, {"command": command, "torch": torch.__version__,
                                     "transformers": transformers.__version__, "threads": args.threads,
                                     "args": {k: v for k, v in vars(args).items() if k != "image_wh"},
                                     "wall_s": wall, "results": results})
        print(f"wrote {args.out}")
    return 0
