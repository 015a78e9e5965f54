#!/usr/bin/env python
"""The gate's cheaper tail (issue #18.4): its last layer for the query token only, against the full layer.

For each model family this loads a locally built model (``bench`` size by default: width 512, 12 decoder
layers), attaches fresh branches (R = 3 by default), builds one synthetic image question, runs layers [0, B)
once and times, interleaved in one process (order shuffled every round):

- ``full``: ``gate_logits(model, state, full_last_layer=True)`` — R gate layers over the whole sequence, then
  the Linear on the query token (the old gate);
- ``tail``: ``gate_logits(model, state)`` — R-1 layers over the sequence, then the last layer for the query
  token only (keys and values of every token), then the Linear;
- with ``--train`` also both as a gate training step (forward + backward of the gate BCE, autograd on).

It prints the medians, tail/full, the per-round paired ratio and the largest gate-probability difference.
Expected: the last layer keeps only its input norm and k/v projections over the sequence, so the gate costs
about (R - 1)/R of the full one plus that. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line, setup_torch
from bench_branch_prefill import QUESTION, chat_inputs, quartiles, synthetic_image

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Example: python benchmarks/bench_gate_tail.py --family all --repeats 20")
    p.add_argument("--family", default="all", choices=(*FAMILIES, "all"), help="model family (default: all)")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"), help="model size (default: bench)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation (default: sdpa)")
    p.add_argument("--branch-depth", type=int, default=3, help="R (default: 3)")
    p.add_argument("--image-size", type=int, default=448, help="square synthetic image side in pixels (default: 448)")
    p.add_argument("--train", action="store_true", help="also time gate forward+backward (autograd)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order shuffle (default: 0)")
    return p.parse_args(argv)


def bench_family(family: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.losses import gate_bce_loss
    from qzoom_swift.prefill import gate_logits, prefill
    from qzoom_swift.synthetic.models import build_model_dir

    model_dir = build_model_dir(family, args.size)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation=args.attn).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    torch.manual_seed(args.seed)  # the gate head's random init: the same probabilities every run
    branches = attach_branches(model, QZoomConfig(branch_depth=args.branch_depth))
    cfg = branches.qzoom_config
    inputs = dict(chat_inputs(processor, synthetic_image((args.image_size, args.image_size)), QUESTION))
    with torch.inference_mode():
        state = prefill(model, branches=(), **inputs)
        full = gate_logits(model, state, full_last_layer=True).clone()
        tail = gate_logits(model, state).clone()
    gate_params = list(branches.gate.parameters())
    with torch.no_grad():
        train_state = prefill(model, branches=(), use_cache=False, **inputs)  # not inference tensors: autograd reads it

    def step(full_last_layer: bool) -> None:
        with torch.enable_grad():
            logits = gate_logits(model, train_state, full_last_layer=full_last_layer)
            loss = gate_bce_loss(logits, torch.tensor([1]))
            loss.backward()
        for p in gate_params:
            p.grad = None

    runs = {"full": lambda: gate_logits(model, state, full_last_layer=True), "tail": lambda: gate_logits(model, state)}
    if args.train:
        runs.update({"train_full": lambda: step(True), "train_tail": lambda: step(False)})
    samples: dict[str, list[float]] = {name: [] for name in runs}
    rng, order = random.Random(args.seed), list(runs)
    for rnd in range(args.warmup + args.repeats):
        rng.shuffle(order)
        for name in order:
            train = name.startswith("train")
            with torch.inference_mode(mode=not train):
                t = time.perf_counter()
                runs[name]()
                elapsed = time.perf_counter() - t
            if rnd >= args.warmup:
                samples[name].append(elapsed)
    return {"family": family, "B": int(cfg.branch_layer), "R": int(cfg.branch_depth), "L": int(cfg.num_hidden_layers),
            "d": int(cfg.hidden_size), "seq_len": int(inputs["input_ids"].shape[1]), "samples": samples,
            "max_prob_diff": float((torch.sigmoid(full) - torch.sigmoid(tail)).abs().max()),
            "max_logit_diff": float((full - tail).abs().max()), "prob": float(torch.sigmoid(full).flatten()[0])}


def report(res: dict) -> list[str]:
    s = res["samples"]
    lines = [f"{res['family']:<11} B={res['B']} R={res['R']} L={res['L']} d={res['d']} seq_len={res['seq_len']}  "
             f"max|prob diff|={res['max_prob_diff']:.2e} max|logit diff|={res['max_logit_diff']:.2e} (prob {res['prob']:.4f})"]
    for old, new in (("full", "tail"), ("train_full", "train_tail")):
        if old not in s:
            continue
        med_old, med_new = quartiles(s[old])[1], quartiles(s[new])[1]
        paired = quartiles([n / o for n, o in zip(s[new], s[old])])[1]
        what = "gate fwd" if old == "full" else "gate fwd+bwd"
        lines.append(f"  {what:<13} full last layer {1000 * med_old:7.2f} ms  tail {1000 * med_new:7.2f} ms  "
                     f"tail/full {med_new / med_old:.3f} (paired {paired:.3f}, min {min(s[new]) / min(s[old]):.3f})  "
                     f"=> {100 * (1 - med_new / med_old):.1f}% less gate time")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    setup_torch(args.threads)
    print(f"command: {command_line('bench_gate_tail.py', argv)}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} python {platform.python_version()} "
          f"cpus={os.cpu_count()} size={args.size} attn={args.attn} image={args.image_size}px repeats={args.repeats} "
          f"warmup={args.warmup}; load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    for family in FAMILIES if args.family == "all" else (args.family,):
        for line in report(bench_family(family, args)):
            print(line, flush=True)
    print(f"load average after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
