#!/usr/bin/env python
"""Does ``swift deploy`` with Q-Zoom hold under sustained mixed load? (issue 29 item 6)

Starts ``swift deploy`` (transformers backend, the locally built tiny Qwen2.5-VL, 127.0.0.1 only,
``--max_batch_size 8``) and sends a seeded stream of zoomed, direct, text-only, corrupt-image and over-long
requests, ``--concurrency`` in flight, until ``--requests`` were sent or ``--max-seconds`` passed
(``qzoom_swift.testing.soak`` describes the kinds and the checks). A first short server measures the gate
probabilities that split the zoomed from the direct request.

Reports answered / failed as expected / failed unexpectedly, p50 and p95 latency (client side, per request),
the server's resident memory (launcher + model process) after the warm-up and after the last request, and the
server's logged decisions. Exit status 1 when anything failed unexpectedly. tests/test_soak.py runs a short
form (60 requests).

Run ``python benchmarks/soak_deploy.py --help``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=500, help="requests to send at most")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    p.add_argument("--concurrency", type=int, default=6, help="requests in flight (4-8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix and of the fresh branches")
    p.add_argument("--workdir", type=Path, default=None, help="server logs and checkpoint (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from qzoom_swift.fileio import write_json_atomic
    from qzoom_swift.synthetic.models import build_model_dir
    from qzoom_swift.testing.soak import SoakSpec, format_report, run_soak

    args = parse_args(argv)
    print(f"command: {command_line(__file__, argv)}")
    spec = SoakSpec(requests=args.requests, max_seconds=args.max_seconds, concurrency=args.concurrency,
                    seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="qzoom-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        report = run_soak(build_model_dir("qwen2_5_vl", "tiny"), workdir, spec)
    print(format_report(report))
    if args.out:
        write_json_atomic(args.out, report.to_dict())
        print(f"wrote {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
