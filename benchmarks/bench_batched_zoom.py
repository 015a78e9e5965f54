#!/usr/bin/env python
"""Does the batched continuation pay? Throughput of Q-Zoom answers at batch 8 vs batch 1 and vs per-sample continuation.

For each model family this loads a locally built model (``qzoom_swift.synthetic.models``, ``bench`` size by
default: width 512, 12 decoder layers) as a ``QZoomModel`` with fresh gate/RPN branches, draws 8 synthetic
test cards of different sizes with 8 different questions, and times, interleaved in one process under
``torch.inference_mode()`` (the order of all variants is shuffled every round), end-to-end answers
(resize + processor + pass 1 + continuation + ``--max-new-tokens`` greedy tokens, forced with
``min_new_tokens`` so every variant decodes the same number; batch_decode):

- ``batched@8``:    ``QZoomModel.generate`` on the 8 questions at once, ``continuation="batched"`` (one
  [B, L) pass and one ``generate`` for the batch; the zoomed samples' RoI passes run first);
- ``per_sample@8``: the same batch with ``continuation="per_sample"`` (pass 1 batched, then every sample runs
  layers [B, L) and ``generate`` on its own: the earlier path);
- ``batched@1``:    the 8 questions one after the other, each a batch of one.

for three gate mixes, all with mode ``zoom`` (the gate and, when someone zooms, the RPN run in every variant):

- ``all``:  tau_gate = 0 (every sample zooms);
- ``none``: tau_gate = 2 (no sample zooms; the RPN is skipped);
- ``half``: tau_gate halfway between the 4th and 5th gate probabilities of the batch (4 of 8 zoom).

tau_roi is the lowest of the 8 images' ``--roi-percentile`` quantiles of the blurred heatmap, so every zooming
sample has a region. The zoom counts each variant actually got are printed (from ``ZoomStats``), and whether
its answers equal ``batched@1``'s (the contract of the batched continuation).

Throughput is answers per second of wall time (median over rounds); ratios are throughput ratios, so > 1 means
the first variant is faster. Run ``python benchmarks/bench_batched_zoom.py --help``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import qzoom_at_budget, run_per_family

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_branch_prefill import quartiles, synthetic_image  # noqa: E402

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES  # noqa: E402

BATCH = 8
SIZES = [(1344, 1344), (1344, 1008), (1008, 1344), (1200, 900), (900, 1200), (1120, 1120), (1400, 1050),
         (1050, 1400)]
QUESTIONS = ["What is written on the small sign in the lower right corner?", "What colour is the ellipse?",
             "How many rectangles are there?", "Is the green box above the sign?", "Read the text on the sign.",
             "Which shape is red?", "What is in the top left corner of the picture?", "Describe the image."]
MIXES = ("all", "none", "half")
VARIANTS = ("batched@8", "per_sample@8", "batched@1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/bench_batched_zoom.py --family qwen2_5_vl --repeats 3")
    p.add_argument("--family", default="all",
                   help=f"comma-separated families from {', '.join(FAMILIES)}, or all (default: all)")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"),
                   help="locally built model size (default: bench = width 512, 12 layers)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--low-tokens", type=int, default=64,
                   help="pass-1 visual tokens (min = max) and the RoI budget (default: 64)")
    p.add_argument("--roi-percentile", type=float, default=0.9,
                   help="tau_roi = the lowest of the images' quantiles at this level (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per answer (default: 8)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation (default: sdpa)")
    p.add_argument("--seed", type=int, default=0, help="seed of the variant order shuffle (default: 0)")
    p.add_argument("--out", default=None, help="optional JSON results path (written atomically)")
    args = p.parse_args(argv)
    families = FAMILIES if args.family == "all" else tuple(f.strip() for f in args.family.split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        p.error(f"--family {args.family!r}: choose from {', '.join(FAMILIES)} or all")
    args.families = families
    if min(args.repeats, args.low_tokens, args.max_new_tokens) < 1 or args.warmup < 0:
        p.error("--repeats, --low-tokens and --max-new-tokens must be >= 1, --warmup >= 0")
    if not 0.0 < args.roi_percentile < 1.0:
        p.error("--roi-percentile must be in (0, 1)")
    return args


def mix_thresholds(qm, images: list, percentile: float) -> tuple[float, dict[str, float], list[float]]:
    """tau_roi (every image keeps a region) and tau_gate per mix, from one batched prefill of the 8 questions."""
    import torch

    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.roi import heatmap_probabilities

    cfg = qm.config
    low = [[qm.adapter.resize_for_budget(img, cfg.low_min_tokens, cfg.low_max_tokens)] for img in images]
    state = qm.prefill(**chat_inputs(qm.processor, low, QUESTIONS))
    taus = []
    for heat in state.heatmaps():
        probs = heatmap_probabilities(heat.detach(), cfg.blur_kernel, cfg.blur_sigma).flatten()
        taus.append(float(probs.kthvalue(max(1, int(probs.numel() * percentile))).values))
    gate = sorted(torch.sigmoid(state.gate_logit.detach()).tolist())
    half = (gate[BATCH // 2 - 1] + gate[BATCH // 2]) / 2
    return min(taus), {"all": 0.0, "none": 2.0, "half": half}, gate


def variant_fn(qm, images: list, variant: str, overrides: dict, max_new: int):
    """A callable answering the 8 questions as ``variant`` does; returns (token ids per answer, zoomed count)."""
    gen = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, config_overrides=overrides)

    def go():
        if variant == "batched@1":
            answers = [qm.generate([img], q, continuation="batched", **gen)[0] for img, q in zip(images, QUESTIONS)]
        else:
            answers = qm.generate([[img] for img in images], QUESTIONS, continuation=variant.split("@")[0], **gen)
        return [a.token_ids for a in answers], sum(a.stats.zoomed for a in answers)
    return go


def bench_family(family: str, args: argparse.Namespace) -> dict:
    import torch

    t0 = time.perf_counter()
    low = args.low_tokens
    qm = qzoom_at_budget(family, args.size, args.attn, "zoom", low)
    images = [synthetic_image(size) for size in SIZES]
    with torch.inference_mode():
        tau_roi, tau_gates, gate_probs = mix_thresholds(qm, images, args.roi_percentile)
    runs = {(mix, v): variant_fn(qm, images, v, {"mode": "zoom", "tau_gate": tau_gates[mix], "tau_roi": tau_roi},
                                 args.max_new_tokens) for mix in MIXES for v in VARIANTS}
    load_s = time.perf_counter() - t0

    samples: dict = {key: [] for key in runs}
    outputs: dict = {}
    rng = random.Random(args.seed)
    order = list(runs)
    t_bench = time.perf_counter()
    for rnd in range(args.warmup + args.repeats):
        rng.shuffle(order)
        for key in order:
            with torch.inference_mode():
                t = time.perf_counter()
                res = runs[key]()
                dt = time.perf_counter() - t
            outputs.setdefault(key, res)
            if rnd >= args.warmup:
                samples[key].append(dt)
    bench_s = time.perf_counter() - t_bench

    table = {}
    for mix in MIXES:
        rows = {}
        for v in VARIANTS:
            q25, med, q75 = quartiles(samples[(mix, v)])
            tokens, zoomed = outputs[(mix, v)]
            rows[v] = {"median_s": med, "q25_s": q25, "q75_s": q75, "answers_per_s": BATCH / med, "zoomed": zoomed,
                       "same_answers_as_batch1": tokens == outputs[(mix, "batched@1")][0],
                       "samples_s": samples[(mix, v)]}
        paired = [p / b for b, p in zip(samples[(mix, "batched@8")], samples[(mix, "per_sample@8")])]
        table[mix] = {"tau_gate": tau_gates[mix], "variants": rows,
                      "batched8_vs_per_sample8": rows["batched@8"]["answers_per_s"] / rows["per_sample@8"]["answers_per_s"],
                      "batched8_vs_per_sample8_paired": quartiles(paired)[1],
                      "batched8_vs_batch1": rows["batched@8"]["answers_per_s"] / rows["batched@1"]["answers_per_s"],
                      "per_sample8_vs_batch1": rows["per_sample@8"]["answers_per_s"] / rows["batched@1"]["answers_per_s"]}
    cfg = qm.config
    return {"family": family, "model_class": type(qm.model).__name__, "attn_implementation": args.attn,
            "B": int(cfg.branch_layer), "R": int(cfg.branch_depth), "L": int(cfg.num_hidden_layers),
            "hidden_size": int(cfg.hidden_size), "tau_roi": tau_roi, "gate_probs_sorted": gate_probs,
            "load_s": load_s, "bench_s": bench_s, "loadavg_after": list(os.getloadavg()), "mixes": table}


def print_family(res: dict, args: argparse.Namespace) -> None:
    print(f"\n=== {res['family']} ({res['model_class']}, {res['attn_implementation']}): B={res['B']} R={res['R']} "
          f"L={res['L']} d={res['hidden_size']}; tau_roi={res['tau_roi']:.4f}; {BATCH} questions, "
          f"{args.max_new_tokens} new tokens each")
    head = (f"    {'mix':<5} {'variant':<13} {'zoomed':>6} {'median s':>8} {'IQR s':>6} {'answers/s':>9} "
            f"{'same as b1':>10}")
    print(head)
    print("    " + "-" * (len(head) - 4))
    for mix, m in res["mixes"].items():
        for v, row in m["variants"].items():
            print(f"    {mix:<5} {v:<13} {row['zoomed']:>4}/{BATCH} {row['median_s']:>8.3f} "
                  f"{row['q75_s'] - row['q25_s']:>6.3f} {row['answers_per_s']:>9.2f} "
                  f"{'yes' if row['same_answers_as_batch1'] else 'NO':>10}")
    la = res["loadavg_after"]
    print(f"    (load {res['load_s']:.1f} s, timing loop {res['bench_s']:.1f} s, load average after it "
          f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f})")


def print_summary(results: list[dict]) -> None:
    print("\n=== summary: throughput ratios (answers/s; > 1: the first is faster)")
    head = (f"{'family':<11} {'mix':<5} {'tau_gate':>8} {'batched8/per_sample8':>20} {'paired':>6} "
            f"{'batched8/batch1':>15} {'per_sample8/batch1':>18}")
    print(head)
    print("-" * len(head))
    for res in results:
        for mix, m in res["mixes"].items():
            print(f"{res['family']:<11} {mix:<5} {m['tau_gate']:>8.4f} {m['batched8_vs_per_sample8']:>20.2f} "
                  f"{m['batched8_vs_per_sample8_paired']:>6.2f} {m['batched8_vs_batch1']:>15.2f} "
                  f"{m['per_sample8_vs_batch1']:>18.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (f"size={args.size}, low={args.low_tokens} tokens, repeats={args.repeats}, warmup={args.warmup}, "
                f"order shuffled per round (seed {args.seed})")
    return run_per_family("bench_batched_zoom.py", argv, args, args.families, settings, bench_family,
                          lambda res: print_family(res, args), print_summary)


if __name__ == "__main__":
    sys.exit(main())
