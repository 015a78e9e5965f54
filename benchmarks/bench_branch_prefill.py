#!/usr/bin/env python
"""What does a Q-Zoom decision cost? Q-Zoom's branch prefill against the stock prefill, on CPU.

For each model family this loads a locally built model (``qzoom_swift.synthetic.models``, ``bench`` size by
default: width 512, 12 decoder layers), attaches fresh gate/RPN branches with the default ``QZoomConfig``,
builds one synthetic image question through the processor's chat template and times, interleaved in one
process under ``torch.inference_mode()`` (the order is shuffled every repeat):

- (a) ``stock``:   ``model(**inputs, logits_to_keep=1)`` — vision tower, all L layers, LM head on the last
  position only (what a generation prefill needs);
- (b) ``qzoom``:   ``prefill(model, branches=("gate", "rpn"))`` + ``continue_prefill(model, state, last_only=True)``
  — vision, layers [0, B) with a KV cache, the gate (R-1 layers + its last layer for the query token) and the RPN (R-1 layers + q.k head), then
  layers [B, L) and the LM head on the last position: the direct-answer path. Both (a) and (b) compute the
  LM head for exactly one position, so the comparison is like for like;
- (c) ``trunk``:   ``prefill(model, branches=())`` — vision + layers [0, B) only;
- the parts alone: ``vision`` (embedding + vision tower + scatter), ``gate`` and ``rpn`` on a fixed layer-B
  state, and ``continue`` (layers [B, L) + LM head; taken from inside (b));
- ``train_fwd``:   the trunk of a branch training step, ``prefill(..., use_cache=False)`` with both branches
  (vision + [0, B) + 2R-2 branch layers + two one-token heads; never layers [B, L) nor the LM head);
- ``train_step``:  ``branch_training_step`` forward + backward with synthetic labels (outside inference mode).

Expected ratios count decoder-layer passes over the same tokens: (b)/(a) = 1 + (2R-2)/L, (c)/(a) = B/L,
train_fwd/(a) = (B + 2R - 2)/L (the gate's last layer and the RPN head, which compute keys for every
token but everything else for the query token only, are not counted). The vision tower, embedding, masks and the one-position LM head are
outside that count, so the script also reports "text-only" ratios with the median vision time subtracted
from both sides. Once per family it checks that (b)'s logits equal (a)'s (last position, and all positions).

Run ``python benchmarks/bench_branch_prefill.py --help``. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import run_per_family

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES

QUESTION = "What is written on the small sign in the lower right corner?"

# Timed variants, in table order, with the expected ratio to (a) as a function of (B, R, L).
VARIANTS = ("stock", "qzoom", "qzoom_branches", "continue", "trunk", "vision", "gate", "rpn", "train_fwd",
            "train_step")
LABELS = {
    "stock": "(a) stock model(**inputs, logits_to_keep=1)",
    "qzoom": "(b) qzoom prefill(gate,rpn)+continue(last_only)",
    "qzoom_branches": "    part of (b): prefill(gate,rpn)",
    "continue": "    part of (b): continue_prefill [B,L)+head",
    "trunk": "(c) prefill(branches=()) = vision+[0,B)",
    "vision": "    vision alone (embed+tower+scatter)",
    "gate": "    gate alone (R-1 layers + query-token layer + linear)",
    "rpn": "    rpn alone (R-1 layers + q.k head)",
    "train_fwd": "branch-train trunk fwd (no cache)",
    "train_step": "branch-train step fwd+bwd (grad)",
}


def expected_layers(name: str, b: int, r: int, num_layers: int) -> float | None:
    """Decoder-layer passes of a variant, in units of one layer over the prompt (None: not a layer count)."""
    return {
        "stock": num_layers,
        "qzoom": num_layers + 2 * r - 2,
        "qzoom_branches": b + 2 * r - 2,
        "continue": num_layers - b,
        "trunk": b,
        "gate": r - 1,
        "rpn": r - 1,
        "train_fwd": b + 2 * r - 2,
    }.get(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/bench_branch_prefill.py --family all --repeats 10")
    p.add_argument("--family", default="all", choices=(*FAMILIES, "all"), help="model family (default: all)")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"),
                   help="locally built model size (default: bench = width 512, 12 layers)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per variant (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--image-size", default="448x448", help="synthetic image WIDTHxHEIGHT in pixels (default: 448x448)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation (default: sdpa)")
    p.add_argument("--branch-layer", type=int, default=None, help="B (default: QZoomConfig's pick for the model)")
    p.add_argument("--branch-depth", type=int, default=3, help="R (default: 3)")
    p.add_argument("--no-train-step", action="store_true", help="skip the fwd+bwd branch training step timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the variant order shuffle (default: 0)")
    p.add_argument("--out", default=None, help="optional JSON results path (written atomically)")
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image-size {args.image_size!r}: expected WIDTHxHEIGHT, e.g. 448x448")
    args.image_wh = (w, h)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def synthetic_image(size: tuple[int, int]):
    """A deterministic RGB test card: background gradient, a few shapes and a small text sign."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(img)
    for y in range(0, h, 8):
        shade = 200 + (55 * y) // max(h, 1)
        draw.rectangle((0, y, w, y + 8), fill=(shade, shade, 240))
    draw.ellipse((w // 10, h // 8, w // 2, h // 2), fill=(220, 40, 40))
    draw.rectangle((w // 2, h // 5, 9 * w // 10, h // 2), fill=(40, 160, 60))
    draw.rectangle((3 * w // 4, 3 * h // 4, 3 * w // 4 + w // 8, 3 * h // 4 + h // 12), fill=(255, 255, 255),
                   outline=(0, 0, 0))
    draw.text((3 * w // 4 + 3, 3 * h // 4 + 2), "Q7", fill=(0, 0, 0))
    return img


def chat_inputs(processor, image, question: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[prompt], images=[image], return_tensors="pt")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    q25, q50, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q25), float(q50), float(q75)


def bench_family(family: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.families import get_adapter
    from qzoom_swift.prefill import continue_prefill, gate_logits, prefill, rpn_token_logits
    from qzoom_swift.synthetic.models import build_model_dir
    from qzoom_swift.training import branch_training_step

    t0 = time.perf_counter()
    model_dir = build_model_dir(family, args.size)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation=args.attn).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    branches = attach_branches(model, QZoomConfig(branch_layer=args.branch_layer, branch_depth=args.branch_depth))
    cfg = branches.qzoom_config
    b, r, num_layers = int(cfg.branch_layer), int(cfg.branch_depth), int(cfg.num_hidden_layers)
    adapter = get_adapter(model)
    load_s = time.perf_counter() - t0

    inputs = dict(chat_inputs(processor, synthetic_image(args.image_wh), QUESTION))
    seq_len = int(inputs["input_ids"].shape[1])

    # ---- like-for-like check, once: (b)'s logits against (a)'s ----
    with torch.inference_mode():
        ref_last = model(**inputs, logits_to_keep=1).logits
        state = prefill(model, branches=("gate", "rpn"), **inputs)
        got_last = continue_prefill(model, state, last_only=True)
        ref_all = model(**inputs).logits
        got_all = continue_prefill(model, prefill(model, branches=("gate", "rpn"), **inputs), last_only=False)
        grids = list(state.embedded.grids)
        n_visual = int(state.embedded.visual_mask.sum())
    parity = {
        "stock_logits_shape": list(ref_last.shape),
        "qzoom_logits_shape": list(got_last.shape),
        "last_max_abs_diff": float((ref_last - got_last).abs().max()),
        "all_positions_max_abs_diff": float((ref_all - got_all).abs().max()),
        "same_argmax": bool((ref_last.argmax(-1) == got_last.argmax(-1)).all()),
        "logit_scale_max_abs": float(ref_last.abs().max()),
    }
    del ref_all, got_all

    # ---- the variants ----
    with torch.inference_mode():
        fixed_state = prefill(model, branches=(), **inputs)  # layer-B state the branch-alone timings read

    label_maps = []
    for rows, cols in grids:
        lab = torch.zeros(rows, cols, dtype=torch.long)
        lab[rows // 2:, cols // 2:] = 1
        lab[: rows // 4, :] = -100
        label_maps.append(lab)
    branch_params = [p for p in branches.parameters() if p.requires_grad]

    def run_qzoom() -> dict[str, float]:
        t = time.perf_counter()
        st = prefill(model, branches=("gate", "rpn"), **inputs)
        t_mid = time.perf_counter()
        continue_prefill(model, st, last_only=True)
        t_end = time.perf_counter()
        return {"qzoom": t_end - t, "qzoom_branches": t_mid - t, "continue": t_end - t_mid}

    def timed(fn, name):
        def go() -> dict[str, float]:
            t = time.perf_counter()
            fn()
            return {name: time.perf_counter() - t}
        return go

    def train_step() -> None:
        with torch.enable_grad():
            out = branch_training_step(model, ("gate", "rpn"), qzoom_gate=[1], qzoom_rpn_labels=label_maps, **inputs)
            out.loss.backward()
        for p in branch_params:
            p.grad = None

    runs = {
        "stock": timed(lambda: model(**inputs, logits_to_keep=1), "stock"),
        "qzoom": run_qzoom,
        "trunk": timed(lambda: prefill(model, branches=(), **inputs), "trunk"),
        "vision": timed(lambda: adapter.embed(model, inputs["input_ids"], inputs.get("pixel_values"),
                                              inputs.get("image_grid_thw")), "vision"),
        "gate": timed(lambda: gate_logits(model, fixed_state), "gate"),
        "rpn": timed(lambda: rpn_token_logits(model, fixed_state), "rpn"),
        "train_fwd": timed(lambda: prefill(model, branches=("gate", "rpn"), use_cache=False, **inputs), "train_fwd"),
    }
    if not args.no_train_step:
        runs["train_step"] = timed(train_step, "train_step")

    samples: dict[str, list[float]] = {}
    rng = random.Random(args.seed)
    order = list(runs)
    t_bench = time.perf_counter()
    for rnd in range(args.warmup + args.repeats):
        rng.shuffle(order)
        for name in order:
            if name == "train_step":
                res = runs[name]()  # needs autograd: outside inference mode
            else:
                with torch.inference_mode():
                    res = runs[name]()
            if rnd >= args.warmup:
                for key, value in res.items():
                    samples.setdefault(key, []).append(value)
    bench_s = time.perf_counter() - t_bench
    load_avg = os.getloadavg()  # other processes on the machine make the numbers noisy: say so

    stats = {}
    for name, values in samples.items():
        q25, med, q75 = quartiles(values)
        stats[name] = {"median_s": med, "q25_s": q25, "q75_s": q75, "iqr_s": q75 - q25, "min_s": min(values),
                       "n": len(values), "samples_s": values}
    a = stats["stock"]["median_s"]
    vis = stats["vision"]["median_s"]
    includes_vision = {"stock", "qzoom", "qzoom_branches", "trunk", "vision", "train_fwd", "train_step"}
    for name, st in stats.items():
        layers = expected_layers(name, b, r, num_layers)
        st["ratio_to_stock"] = st["median_s"] / a
        # Other load on the machine only ever adds time: the ratio of minimums is the least disturbed one.
        st["min_ratio_to_stock"] = st["min_s"] / stats["stock"]["min_s"]
        own = st["median_s"] - (vis if name in includes_vision else 0.0)
        st["text_only_ratio"] = None if name == "vision" else own / (a - vis)
        st["expected_ratio"] = None if layers is None else layers / num_layers
    # Per-round ratio (b)/(a): the two ran in the same round, so slow drifts cancel.
    paired = [q / s for q, s in zip(samples["qzoom"], samples["stock"])]
    p25, pmed, p75 = quartiles(paired)
    return {
        "family": family, "model_dir": str(model_dir), "model_class": type(model).__name__,
        "attn_implementation": args.attn, "B": b, "R": r, "L": num_layers,
        "hidden_size": int(cfg.hidden_size), "seq_len": seq_len, "visual_tokens": n_visual, "grids": grids,
        "pixel_values_shape": list(inputs["pixel_values"].shape), "load_s": load_s, "bench_s": bench_s,
        "loadavg_after": list(load_avg),
        "parity": parity, "stats": stats,
        "paired_ratio_b_over_a": {"median": pmed, "q25": p25, "q75": p75},
        "expected_ratio_b_over_a": 1 + (2 * r - 2) / num_layers,
        "expected_ratio_train_trunk": (b + 2 * r - 2) / num_layers,
    }


def fmt_ms(s: float) -> str:
    return f"{1000 * s:8.1f}"


def fmt_ratio(x: float | None) -> str:
    return "     -" if x is None else f"{x:6.3f}"


def print_family(res: dict) -> None:
    b, r, num_layers = res["B"], res["R"], res["L"]
    print(f"\n=== {res['family']} ({res['model_class']}, {res['attn_implementation']}): "
          f"B={b} R={r} L={num_layers} d={res['hidden_size']}  seq_len={res['seq_len']} "
          f"visual_tokens={res['visual_tokens']} grids={res['grids']}  "
          f"pixel_values={tuple(res['pixel_values_shape'])}")
    par = res["parity"]
    print(f"like-for-like: stock logits {tuple(par['stock_logits_shape'])} vs qzoom {tuple(par['qzoom_logits_shape'])}; "
          f"max|diff| last={par['last_max_abs_diff']:.2e} all positions={par['all_positions_max_abs_diff']:.2e} "
          f"(|logit| max {par['logit_scale_max_abs']:.2f}), same argmax={par['same_argmax']}")
    head = (f"{'variant':<48} {'median ms':>9} {'IQR ms':>8} {'min ms':>8} {'/(a)':>6} {'min/(a)':>7} "
            f"{'text/(a)':>8} {'expect':>6}")
    print(head)
    print("-" * len(head))
    for name in VARIANTS:
        st = res["stats"].get(name)
        if st is None:
            continue
        print(f"{LABELS[name]:<48} {fmt_ms(st['median_s']):>9} {fmt_ms(st['iqr_s']):>8} {fmt_ms(st['min_s']):>8} "
              f"{fmt_ratio(st['ratio_to_stock']):>6} {fmt_ratio(st['min_ratio_to_stock']):>7} "
              f"{fmt_ratio(st['text_only_ratio']):>8} "
              f"{fmt_ratio(st['expected_ratio']):>6}")
    pr = res["paired_ratio_b_over_a"]
    print(f"(b)/(a): medians {res['stats']['qzoom']['ratio_to_stock']:.3f}; per-round paired median {pr['median']:.3f} "
          f"[IQR {pr['q25']:.3f}-{pr['q75']:.3f}]; of minimums {res['stats']['qzoom']['min_ratio_to_stock']:.3f}; "
          f"text-only {res['stats']['qzoom']['text_only_ratio']:.3f}; "
          f"expected 1+(2R-2)/L = 1+{2 * r - 2}/{num_layers} = {res['expected_ratio_b_over_a']:.3f}")
    print(f"branch-train trunk fwd / (a): {res['stats']['train_fwd']['ratio_to_stock']:.3f} "
          f"(text-only {res['stats']['train_fwd']['text_only_ratio']:.3f}); "
          f"expected (B+2R-2)/L = {b + 2 * r - 2}/{num_layers} = {res['expected_ratio_train_trunk']:.3f}")
    la = res["loadavg_after"]
    print(f"(load {res['load_s']:.1f} s, timing loop {res['bench_s']:.1f} s, "
          f"system load average after it {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f})")


def print_summary(results: list[dict]) -> None:
    head = (f"{'family':<11} {'B':>2} {'R':>2} {'L':>3} {'(a) ms':>8} {'(b) ms':>8} {'(b)/(a)':>7} {'paired':>6} "
            f"{'min':>6} {'text':>6} {'expect':>6} {'(c)/(a)':>7} {'B/L':>5} {'train/(a)':>9} {'expect':>6} {'max|diff|':>9}")
    print("\n=== summary (medians; 'paired' = median of per-round (b)/(a); 'min' = ratio of minimums; "
          "'text' = median vision time subtracted from both sides)")
    print(head)
    print("-" * len(head))
    for res in results:
        s = res["stats"]
        print(f"{res['family']:<11} {res['B']:>2} {res['R']:>2} {res['L']:>3} {fmt_ms(s['stock']['median_s']):>8} "
              f"{fmt_ms(s['qzoom']['median_s']):>8} {s['qzoom']['ratio_to_stock']:>7.3f} "
              f"{res['paired_ratio_b_over_a']['median']:>6.3f} {s['qzoom']['min_ratio_to_stock']:>6.3f} "
              f"{s['qzoom']['text_only_ratio']:>6.3f} "
              f"{res['expected_ratio_b_over_a']:>6.3f} {s['trunk']['ratio_to_stock']:>7.3f} "
              f"{res['B'] / res['L']:>5.3f} {s['train_fwd']['ratio_to_stock']:>9.3f} "
              f"{res['expected_ratio_train_trunk']:>6.3f} {res['parity']['last_max_abs_diff']:>9.2e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (f"size={args.size}, image={args.image_wh[0]}x{args.image_wh[1]}, repeats={args.repeats}, "
                f"warmup={args.warmup}, variant order shuffled per round (seed {args.seed})")
    families = FAMILIES if args.family == "all" else (args.family,)
    return run_per_family("bench_branch_prefill.py", argv, args, families, settings, bench_family, print_family,
                          print_summary, notes=("(a) passes logits_to_keep=1 and (b) uses continue_prefill("
                                                "last_only=True): both run the LM head on the last position only.",))


if __name__ == "__main__":
    sys.exit(main())
