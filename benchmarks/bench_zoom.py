#!/usr/bin/env python
"""What does a Q-Zoom answer cost? Prefix reuse in the second prefill, and zoom against higher-resolution baselines.

For each model family this loads a locally built model (``qzoom_swift.synthetic.models``, ``bench`` size by
default: width 512, 12 decoder layers) as a ``QZoomModel`` with fresh gate/RPN branches, draws one synthetic
test card (``--image-size``, default 1344x1344) and one question, and times, interleaved in one process under
``torch.inference_mode()`` (the order of all variants is shuffled every round):

(a) the second prefill of one sample forced to zoom. Pass 1 is encoded at the low budget (min = max =
    ``--low-tokens`` visual tokens); ``tau_roi`` is the ``--roi-percentile`` (default 0.9) of the blurred
    heatmap, so the box is a real sub-region; the crop is re-encoded at the same budget. Box, crop and the
    crop's processor outputs are fixed once; then:

    - ``reuse_llm``:  ``zoom._zoom_prefix_pass`` + ``zoom._upper_layers``: clone the cached prefix (layers
      [0, B) of P tokens), layers [0, B) on the N new tokens, layers [B, L) on all P+N. The crop's embedding
      (vision tower + scatter) is computed once beforehand and handed back by a wrapper adapter, so the timed
      code is zoom.py's own, minus vision;
    - ``full_llm``:   the same P+N input embeddings (same positions, DeepStack rows, a fresh KV cache)
      through all L layers: a full re-prefill of the RoI-augmented sequence, vision excluded;
    - ``reuse_vis``:  ``reuse_llm`` with the crop's vision tower and embedding included;
    - ``stock_full``: ``model(input_ids, pixel_values=cat, image_grid_thw=cat, position_ids, logits_to_keep=1)``:
      the stock forward of the final sequence: both images' vision towers, all L layers, LM head on one
      position.

    None of them include the crop, resize or image processor (the same for both). The token-layer count
    predicts reuse_llm / full_llm = (B*N + (L-B)*(P+N)) / (L*(P+N)).

(b) an end-to-end answer (image resize + processor + prefill + ``--max-new-tokens`` greedy tokens, forced
    with min_new_tokens so every variant decodes the same number; batch_decode):

    - ``qzoom``:      ``QZoomModel.generate`` with mode ``always`` at the low budget (low pass + RoI at the
      same budget, same tau_roi as (a));
    - ``never@k``:    ``QZoomModel.generate`` with mode ``never`` and the image resized to k visual tokens,
      k = 1, 4, 16 (``--scales``) times the low budget (1x is the floor: no zoom at all);
    - ``stock@k``:    (with ``--stock-baselines``) the plain model: the same resize + processor, then
      ``model.generate``; it checks that mode ``never`` is the stock path (same tokens, same cost).

    Ratios are baseline time / Q-Zoom time and baseline visual tokens / Q-Zoom visual tokens (low + RoI).
    Q-Zoom's own ``ZoomStats`` split its time into pass 1, pass 2 (crop encoding + second prefill) and decode.

Every timing is recorded twice: wall time and the process's CPU time (``time.process_time``, both threads).
On a shared machine the CPU-time ratios are the steadier ones (other processes delay us but do not add to our
CPU time). Reported: medians, IQR, minimums, and per-round paired ratios (variants of one round ran within
seconds of each other, so slow drifts cancel).

LLaVA-1.5's CLIP encoder has a fixed 256-token budget: the low budget and the k-times baselines do not
apply, so for LLaVA (b) reports only the native 256-token variants.

Run ``python benchmarks/bench_zoom.py --help``. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import qzoom_at_budget, run_per_family

# On a shared 2-core machine, OpenMP threads that spin at barriers while another process holds the other core
# make 2-thread runs several times slower and very noisy; passive waiting avoids that (export
# OMP_WAIT_POLICY=ACTIVE to override). Must be set before torch is imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_branch_prefill import quartiles, synthetic_image  # noqa: E402 (sets env defaults)

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES

DEFAULT_FAMILIES = "qwen2_5_vl,qwen3_vl"
QUESTION = "What is written on the small sign in the lower right corner?"

REUSE_VARIANTS = ("reuse_llm", "full_llm", "reuse_vis", "stock_full")
REUSE_LABELS = {
    "reuse_llm": "reuse: [0,B) on N + [B,L) on P+N (LLM only)",
    "full_llm": "full re-prefill: [0,L) on P+N (LLM only)",
    "reuse_vis": "reuse + crop vision tower (LLM + RoI vision)",
    "stock_full": "stock forward, both images, logits_to_keep=1",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/bench_zoom.py --family qwen2_5_vl --repeats 5 "
                                       "--out /tmp/bench_zoom.json")
    p.add_argument("--family", default=DEFAULT_FAMILIES,
                   help=f"comma-separated families from {', '.join(FAMILIES)}, or all (default: {DEFAULT_FAMILIES})")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"),
                   help="locally built model size (default: bench = width 512, 12 layers)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--low-tokens", type=int, default=64,
                   help="low budget: pass-1 visual tokens (min = max) and the RoI budget (default: 64)")
    p.add_argument("--scales", default="1,4,16",
                   help="baseline budgets as multiples of the low budget, comma-separated (default: 1,4,16)")
    p.add_argument("--reuse-tokens", default="",
                   help="extra budgets (comma-separated visual tokens) at which to time part (a) as well; "
                        "the low budget is always timed (default: none)")
    p.add_argument("--image-size", default="1344x1344",
                   help="synthetic image WIDTHxHEIGHT in pixels; large enough that 16x the low budget is "
                        "reachable (default: 1344x1344)")
    p.add_argument("--roi-percentile", type=float, default=0.9,
                   help="tau_roi = this quantile of the blurred heatmap (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="greedy tokens decoded in (b) (default: 4)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation (default: sdpa)")
    p.add_argument("--reuse-inner", type=int, default=3,
                   help="part-(a) runs per variant per round (cheap and noisy: more samples; default: 3)")
    p.add_argument("--stock-baselines", action="store_true",
                   help="also time the plain model.generate at each baseline budget (default: mode never only)")
    p.add_argument("--skip-e2e", action="store_true", help="time part (a) only")
    p.add_argument("--seed", type=int, default=0, help="seed of the variant order shuffle (default: 0)")
    p.add_argument("--out", default=None, help="optional JSON results path (written atomically)")
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image-size {args.image_size!r}: expected WIDTHxHEIGHT, e.g. 1344x1344")
    args.image_wh = (w, h)
    families = FAMILIES if args.family == "all" else tuple(f.strip() for f in args.family.split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        p.error(f"--family {args.family!r}: choose from {', '.join(FAMILIES)} or all")
    args.families = families
    try:
        args.scale_list = [int(s) for s in args.scales.split(",") if s.strip()]
        args.reuse_list = [int(s) for s in args.reuse_tokens.split(",") if s.strip()]
    except ValueError:
        p.error("--scales and --reuse-tokens take comma-separated integers")
    if min(args.repeats, args.low_tokens, args.max_new_tokens, args.reuse_inner) < 1 or args.warmup < 0:
        p.error("--repeats, --reuse-inner, --low-tokens and --max-new-tokens must be >= 1, --warmup >= 0")
    if not 0.0 < args.roi_percentile < 1.0:
        p.error("--roi-percentile must be in (0, 1)")
    return args


class _PrecomputedEmbedAdapter:
    """The family adapter, except that ``embed`` returns the embedding it computed on its first call.

    ``_zoom_prefix_pass`` embeds the crop (vision tower + scatter) through ``adapter.embed``; handing it this
    wrapper times zoom.py's own code with vision excluded. Every other attribute is the real adapter's.
    """

    def __init__(self, adapter):
        self._adapter = adapter
        self.embedded = None

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def embed(self, model, input_ids, pixel_values, image_grid_thw=None):
        if self.embedded is None:
            self.embedded = self._adapter.embed(model, input_ids, pixel_values, image_grid_thw)
        return self.embedded


def fixed_budget(adapter) -> bool:
    """True when the family's encoder has a fixed number of visual tokens (LLaVA), from the family registry."""
    return adapter.spec.fixed_resolution


def low_inputs(qm, image, tokens: int):
    """Processor inputs at a visual-token budget, exactly as ``QZoomModel.generate`` builds pass 1."""
    from qzoom_swift.inputs import chat_inputs

    resized = qm.adapter.resize_for_budget(image.convert("RGB"), tokens, tokens)
    return dict(chat_inputs(qm.processor, [resized], QUESTION))


def roi_tau(qm, inputs: dict, percentile: float) -> tuple[float, tuple[int, int], tuple[int, int, int, int] | None]:
    """tau_roi at a quantile of the blurred heatmap (as tests/test_zoom.py does), the grid and the box it gives."""
    from qzoom_swift.roi import heatmap_probabilities, roi_box_from_heatmap

    cfg = qm.config
    state = qm.prefill(**inputs)
    heat = state.heatmaps()[-1].detach()
    probs = heatmap_probabilities(heat, cfg.blur_kernel, cfg.blur_sigma).flatten()
    tau = float(probs.kthvalue(max(1, int(probs.numel() * percentile))).values)
    box = roi_box_from_heatmap(heat, tau, cfg.blur_kernel, cfg.blur_sigma)
    grid = tuple(state.embedded.grids[-1])
    return tau, grid, None if box is None else (box.x0, box.y0, box.x1, box.y1)


def setup_reuse(qm, image, tokens: int, percentile: float) -> dict:
    """Pass 1, box and crop of the forced-zoom sample at ``tokens``; the four part-(a) callables and their sizes."""
    import torch
    from transformers import DynamicCache

    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.families import Embedded
    from qzoom_swift.prefill import prefill_to_branch, rpn_token_logits
    from qzoom_swift.zoom import _plan_zoom, _upper_layers, _zoom_prefix_pass

    model, adapter = qm.model, qm.adapter
    inputs = low_inputs(qm, image, tokens)
    tau, grid, box = roi_tau(qm, inputs, percentile)
    cfg = QZoomConfig.from_dict({**qm.config.to_dict(), "mode": "always", "tau_roi": tau, "low_min_tokens": tokens,
                                 "low_max_tokens": tokens, "roi_min_tokens": tokens, "roi_max_tokens": tokens})
    b_layer, num_layers = int(cfg.branch_layer), int(cfg.num_hidden_layers)
    state = prefill_to_branch(model, **{k: v for k, v in inputs.items() if k != "attention_mask"},
                              attention_mask=inputs["attention_mask"], use_cache=True)
    rpn_token_logits(model, state)
    plan = _plan_zoom(qm.processor, cfg, state, 0, image)
    if plan is None:
        raise RuntimeError(f"no RoI survived tau_roi={tau} at {tokens} tokens")
    frozen = _PrecomputedEmbedAdapter(adapter)
    frozen_state = dataclasses.replace(state, adapter=frozen)
    seq = _zoom_prefix_pass(model, frozen_state, plan)
    out_reuse = _upper_layers(model, frozen_state, seq)
    positions, embedded, full_ids = seq.positions, seq.embedded, seq.input_ids
    prefix = adapter.prefix_end(model, state.input_ids[0], int(plan.visual_index[-1]))
    total = int(full_ids.numel())
    new = total - prefix

    # the full re-prefill's input: the same embeddings, visual mask, DeepStack rows and positions
    full_embeds = torch.cat([state.embedded.inputs_embeds[:, :prefix], frozen.embedded.inputs_embeds], dim=1)
    full_embedded = Embedded(full_embeds, embedded.visual_mask, list(state.embedded.grids) + list(frozen.embedded.grids),
                             embedded.deepstack)
    layers = adapter.decoder_layers(model)
    text_config = adapter.text_config(model)
    ones = torch.ones(1, total, dtype=torch.long)

    def reuse_llm():
        return _upper_layers(model, frozen_state, _zoom_prefix_pass(model, frozen_state, plan))

    def reuse_vis():
        return _upper_layers(model, state, _zoom_prefix_pass(model, state, plan))

    def full_llm():
        c = DynamicCache(config=text_config)
        mask = adapter.causal_mask(model, full_embeds, ones, c)
        rope = adapter.rotary(model, full_embeds, positions)
        return adapter.run_layers(model, layers, 0, full_embeds, rope, mask, c, full_embedded)

    encoded = plan.encoded
    stock_kwargs = dict(input_ids=full_ids[None], position_ids=positions, attention_mask=ones,
                        pixel_values=torch.cat([inputs["pixel_values"], encoded["pixel_values"]]))
    if "image_grid_thw" in inputs:
        stock_kwargs["image_grid_thw"] = torch.cat([inputs["image_grid_thw"], encoded["image_grid_thw"]])

    def stock_full():
        return model(**stock_kwargs, logits_to_keep=1).logits

    out_full = full_llm()
    out_vis = reuse_vis()
    stock_last = stock_full()
    parity = {
        "full_llm_vs_reuse_all_positions": float((out_full - out_reuse).abs().max()),
        "reuse_vis_vs_reuse_llm": float((out_vis - out_reuse).abs().max()),
        "stock_vs_reuse_last_logits": float((stock_last - adapter.final_logits(model, out_reuse[:, -1:])).abs().max()),
        "hidden_scale_max_abs": float(out_reuse.abs().max()),
    }
    rows, cols = plan.grid
    x0, y0, x1, y1 = plan.grid_box
    return {
        "tokens": tokens, "tau_roi": tau, "grid": list(grid), "grid_box": list(plan.grid_box),
        "box_area_fraction": (x1 - x0) * (y1 - y0) / (rows * cols), "box_norm": list(plan.box_norm),
        "roi_grid": list(frozen.embedded.grids[0]), "visual_low": int(state.embedded.visual_mask.sum()),
        "visual_roi": int(seq.num_roi), "S": int(state.input_ids.shape[1]), "P": prefix, "N": new,
        "P_plus_N": total, "B": b_layer, "L": num_layers,
        "predicted_ratio": (b_layer * new + (num_layers - b_layer) * total) / (num_layers * total),
        "parity": parity,
        "fns": {"reuse_llm": reuse_llm, "full_llm": full_llm, "reuse_vis": reuse_vis, "stock_full": stock_full},
    }


def e2e_callables(qm, image, low: int, scales: list[int], tau: float, max_new: int,
                  stock: bool) -> tuple[dict, dict]:
    """The part-(b) callables (each returns (token ids, ZoomStats | None, visual tokens)) and their budgets."""
    from qzoom_swift.inputs import chat_inputs

    model, processor, adapter = qm.model, qm.processor, qm.adapter
    gen = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
    image_token = adapter.image_token_id(model)

    def qzoom_with(overrides):
        def go():
            answer = qm.generate([image], QUESTION, config_overrides=overrides, **gen)[0]
            return answer.text, answer.stats, answer.stats.visual_tokens
        return go

    def stock_at(tokens):
        def go():
            resized = adapter.resize_for_budget(image.convert("RGB"), tokens, tokens)
            inputs = chat_inputs(processor, [resized], QUESTION)
            n = inputs["input_ids"].shape[1]
            out = model.generate(**inputs, **gen)
            text = processor.batch_decode(out[:, n:].tolist(), skip_special_tokens=True)[0]
            return text, None, int((inputs["input_ids"] == image_token).sum())
        return go

    fns = {"qzoom": qzoom_with({"mode": "always", "tau_roi": tau})}
    fixed = fixed_budget(adapter)
    budgets = {"qzoom": None if fixed else low}
    for k in ([1] if fixed else scales):
        tokens = k * low
        fns[f"never@{k}x"] = qzoom_with({"mode": "never", "low_min_tokens": tokens, "low_max_tokens": tokens})
        budgets[f"never@{k}x"] = None if fixed else tokens
        if stock:
            fns[f"stock@{k}x"] = stock_at(tokens)
            budgets[f"stock@{k}x"] = budgets[f"never@{k}x"]
    return fns, budgets


def summarize(values: list[float], cpu: list[float]) -> dict:
    q25, med, q75 = quartiles(values)
    c25, cmed, c75 = quartiles(cpu)
    return {"median_s": med, "q25_s": q25, "q75_s": q75, "iqr_s": q75 - q25, "min_s": min(values), "n": len(values),
            "cpu_median_s": cmed, "cpu_iqr_s": c75 - c25, "samples_s": values, "cpu_samples_s": cpu}


def ratio_summary(num: list[float], den: list[float], num_cpu: list[float], den_cpu: list[float]) -> dict:
    """num/den from medians, per-round pairs (same round: slow drifts cancel), minimums, and process CPU time."""
    p25, pmed, p75 = quartiles([a / b for a, b in zip(num, den)])
    c25, cmed, c75 = quartiles([a / b for a, b in zip(num_cpu, den_cpu)])
    return {"medians": quartiles(num)[1] / quartiles(den)[1], "paired": {"median": pmed, "q25": p25, "q75": p75},
            "minimums": min(num) / min(den), "cpu_medians": quartiles(num_cpu)[1] / quartiles(den_cpu)[1],
            "cpu_paired": {"median": cmed, "q25": c25, "q75": c75}}


def bench_family(family: str, args: argparse.Namespace) -> dict:
    import torch

    t0 = time.perf_counter()
    low = args.low_tokens
    qm = qzoom_at_budget(family, args.size, args.attn, "always", low)
    cfg = qm.config
    image = synthetic_image(args.image_wh)
    fixed = fixed_budget(qm.adapter)
    load_s = time.perf_counter() - t0

    runs: dict = {}
    with torch.inference_mode():
        reuse = []
        # a fixed-size encoder (LLaVA) gives the same sequence at every budget: time it once
        for tokens in [low] if fixed else dict.fromkeys([low, *args.reuse_list]):
            setup = setup_reuse(qm, image, tokens, args.roi_percentile)
            reuse.append(setup)
            for name, fn in setup["fns"].items():
                runs[f"{name}@{tokens}"] = ("reuse", fn)
        e2e_budgets: dict = {}
        if not args.skip_e2e:
            e2e_fns, e2e_budgets = e2e_callables(qm, image, low, args.scale_list, reuse[0]["tau_roi"],
                                                 args.max_new_tokens, args.stock_baselines)
            for name, fn in e2e_fns.items():
                runs[name] = ("e2e", fn)

    samples: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    zstats: dict[str, list] = {}
    outputs: dict[str, tuple] = {}
    rng = random.Random(args.seed)
    order = [name for name, (kind, _) in runs.items() for _ in range(args.reuse_inner if kind == "reuse" else 1)]
    t_bench = time.perf_counter()
    for rnd in range(args.warmup + args.repeats):
        rng.shuffle(order)
        for name in order:
            kind, fn = runs[name]
            with torch.inference_mode():
                c, t = time.process_time(), time.perf_counter()
                res = fn()
                dt, dc = time.perf_counter() - t, time.process_time() - c
            if kind == "e2e":
                outputs.setdefault(name, res)
            if rnd >= args.warmup:
                samples.setdefault(name, []).append(dt)
                cpu.setdefault(name, []).append(dc)
                if kind == "e2e" and res[1] is not None:
                    zstats.setdefault(name, []).append(res[1].to_dict())
    bench_s = time.perf_counter() - t_bench
    load_avg = os.getloadavg()

    stats = {name: summarize(values, cpu[name]) for name, values in samples.items()}
    reuse_out = []
    for setup in reuse:
        tok = setup["tokens"]
        if f"reuse_llm@{tok}" not in stats:
            continue
        r, f = f"reuse_llm@{tok}", f"full_llm@{tok}"
        entry = {k: v for k, v in setup.items() if k != "fns"}
        entry.update({"stats": {name: stats[f"{name}@{tok}"] for name in REUSE_VARIANTS},
                      "ratio": ratio_summary(samples[r], samples[f], cpu[r], cpu[f])})
        reuse_out.append(entry)

    e2e = {}
    if not args.skip_e2e:
        q = samples["qzoom"]
        q_visual = outputs["qzoom"][2]
        for name in e2e_budgets:
            st = stats[name]
            visual = outputs[name][2]
            entry = {"budget_tokens": e2e_budgets[name], "visual_tokens": visual, "text": outputs[name][0],
                     "stats": st, "time_ratio_vs_qzoom": ratio_summary(samples[name], q, cpu[name], cpu["qzoom"]),
                     "visual_ratio_vs_qzoom": visual / q_visual}
            if name in zstats:
                parts = {}
                for key in ("time_pass1_s", "time_pass2_s", "time_decode_s"):
                    parts[key] = quartiles([z[key] for z in zstats[name]])[1]
                # per run: wall time minus the three stats (image resize, processor, box, cache copy, text decode)
                parts["unaccounted_s"] = quartiles([
                    wall - z["time_pass1_s"] - z["time_pass2_s"] - z["time_decode_s"]
                    for wall, z in zip(samples[name], zstats[name])])[1]
                first = zstats[name][0]
                entry["zoom_stats_medians"] = parts
                entry["zoom_stats_first"] = {k: v for k, v in first.items() if not k.startswith("time_")}
            e2e[name] = entry
        # mode never should be the plain model: same greedy tokens at the same budget
        for name in e2e_budgets:
            if name.startswith("never@") and "stock@" + name.split("@")[1] in outputs:
                e2e[name]["same_text_as_stock"] = outputs[name][0] == outputs["stock@" + name.split("@")[1]][0]
    return {
        "family": family, "model_dir": qm.model.name_or_path, "model_class": type(qm.model).__name__,
        "attn_implementation": args.attn, "B": int(cfg.branch_layer), "R": int(cfg.branch_depth),
        "L": int(cfg.num_hidden_layers), "hidden_size": int(cfg.hidden_size), "fixed_budget": fixed,
        "low_tokens": low, "load_s": load_s, "bench_s": bench_s, "loadavg_after": list(load_avg),
        "reuse": reuse_out, "e2e": e2e,
    }


def fmt_ms(s: float) -> str:
    return f"{1000 * s:8.1f}"


def fmt_ratio(r: dict) -> str:
    """One ratio line: wall-time medians, paired, minimums, and the same from process CPU time."""
    p, c = r["paired"], r["cpu_paired"]
    return (f"wall: medians {r['medians']:.3f}, paired {p['median']:.3f} [IQR {p['q25']:.3f}-{p['q75']:.3f}], "
            f"minimums {r['minimums']:.3f}; CPU time: medians {r['cpu_medians']:.3f}, "
            f"paired {c['median']:.3f} [IQR {c['q25']:.3f}-{c['q75']:.3f}]")


def print_family(res: dict, args: argparse.Namespace) -> None:
    print(f"\n=== {res['family']} ({res['model_class']}, {res['attn_implementation']}): B={res['B']} R={res['R']} "
          f"L={res['L']} d={res['hidden_size']}  low budget={res['low_tokens']} visual tokens"
          + ("  [fixed 256-token encoder: budgets do not apply]" if res["fixed_budget"] else ""))
    head = (f"    {'variant':<46} {'median ms':>9} {'IQR ms':>8} {'min ms':>8} {'cpu ms':>8} {'cpu IQR':>8}")
    for rr in res["reuse"]:
        budget = "fixed budget" if res["fixed_budget"] else f"budget {rr['tokens']}"
        print(f"\n(a) second prefill ({budget}): tau_roi={rr['tau_roi']:.4f} (p{100 * args.roi_percentile:g} of the "
              f"blurred heatmap); source grid={tuple(rr['grid'])}, box (x0,y0,x1,y1)={tuple(rr['grid_box'])} = "
              f"{100 * rr['box_area_fraction']:.0f}% of it; RoI grid={tuple(rr['roi_grid'])}")
        print(f"    pass 1 S={rr['S']} tokens ({rr['visual_low']} visual); reused prefix P={rr['P']}; new N={rr['N']} "
              f"({rr['visual_roi']} RoI visual + 2 markup + question tail); final P+N={rr['P_plus_N']}")
        par = rr["parity"]
        print(f"    parity (max|diff|): full_llm vs reuse_llm, all positions {par['full_llm_vs_reuse_all_positions']:.2e} "
              f"(|h| max {par['hidden_scale_max_abs']:.1f}); reuse_vis vs reuse_llm {par['reuse_vis_vs_reuse_llm']:.2e}; "
              f"stock vs reuse, last logits {par['stock_vs_reuse_last_logits']:.2e}")
        print(head)
        print("    " + "-" * (len(head) - 4))
        for name in REUSE_VARIANTS:
            st = rr["stats"][name]
            print(f"    {REUSE_LABELS[name]:<46} {fmt_ms(st['median_s']):>9} {fmt_ms(st['iqr_s']):>8} "
                  f"{fmt_ms(st['min_s']):>8} {fmt_ms(st['cpu_median_s']):>8} {fmt_ms(st['cpu_iqr_s']):>8}")
        b, n, total, num_layers = rr["B"], rr["N"], rr["P_plus_N"], rr["L"]
        print(f"    reuse_llm / full_llm = {fmt_ratio(rr['ratio'])}")
        print(f"    predicted (B*N + (L-B)*(P+N)) / (L*(P+N)) = ({b}*{n} + {num_layers - b}*{total}) / "
              f"({num_layers}*{total}) = {rr['predicted_ratio']:.3f}")
    if res["e2e"]:
        print(f"\n(b) end-to-end answer (resize + processor + prefill + {args.max_new_tokens} greedy tokens + text):")
        head = (f"    {'variant':<10} {'budget':>6} {'visual':>6} {'median ms':>9} {'IQR ms':>8} {'min ms':>8} "
                f"{'cpu ms':>8} {'t/qzoom':>7} {'paired':>6} {'cpu t/q':>7} {'vis/qzoom':>9}  notes")
        print(head)
        print("    " + "-" * (len(head) - 4))
        for name, e in res["e2e"].items():
            st, r = e["stats"], e["time_ratio_vs_qzoom"]
            notes = []
            if "zoom_stats_medians" in e:
                zs = e["zoom_stats_medians"]
                notes.append(f"pass1 {1000 * zs['time_pass1_s']:.0f} + pass2 {1000 * zs['time_pass2_s']:.0f} + decode "
                             f"{1000 * zs['time_decode_s']:.0f} + other {1000 * zs['unaccounted_s']:.0f} ms")
                first = e["zoom_stats_first"]
                if first.get("zoomed"):
                    notes.append(f"RoI {first['visual_tokens_roi']} tok, box {tuple(first['grid_box'])}, "
                                 f"prompt {first['prompt_tokens']}")
            if "same_text_as_stock" in e:
                notes.append("same tokens as stock" if e["same_text_as_stock"] else "DIFFERENT tokens from stock")
            budget = "fixed" if e["budget_tokens"] is None else e["budget_tokens"]
            print(f"    {name:<10} {budget:>6} {e['visual_tokens']:>6} {fmt_ms(st['median_s']):>9} "
                  f"{fmt_ms(st['iqr_s']):>8} {fmt_ms(st['min_s']):>8} {fmt_ms(st['cpu_median_s']):>8} "
                  f"{r['medians']:>7.2f} {r['paired']['median']:>6.2f} {r['cpu_medians']:>7.2f} "
                  f"{e['visual_ratio_vs_qzoom']:>9.2f}  {'; '.join(notes)}")
        print("    t/qzoom = baseline median / Q-Zoom median (>1: Q-Zoom is cheaper); paired = median of per-round "
              "ratios; cpu t/q = the same from process CPU time; vis/qzoom = visual tokens / Q-Zoom's (low + RoI); "
              "ZoomStats parts are medians, other = wall - parts (resize, processor, box, cache copy, text)")
    la = res["loadavg_after"]
    print(f"(load {res['load_s']:.1f} s, timing loop {res['bench_s']:.1f} s, "
          f"system load average after it {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f})")


def print_summary(results: list[dict]) -> None:
    print("\n=== summary: (a) reuse_llm / full_llm (wall medians, paired wall, CPU-time medians) vs the token-layer count")
    head = (f"{'family':<11} {'vis':>4} {'P':>4} {'N':>4} {'reuse ms':>8} {'full ms':>8} {'wall':>6} {'paired':>6} "
            f"{'cpu':>6} {'pred':>6}")
    print(head)
    print("-" * len(head))
    for res in results:
        for rr in res["reuse"]:
            r = rr["ratio"]
            print(f"{res['family']:<11} {rr['visual_low']:>4} {rr['P']:>4} {rr['N']:>4} "
                  f"{fmt_ms(rr['stats']['reuse_llm']['median_s']):>8} {fmt_ms(rr['stats']['full_llm']['median_s']):>8} "
                  f"{r['medians']:>6.3f} {r['paired']['median']:>6.3f} {r['cpu_medians']:>6.3f} "
                  f"{rr['predicted_ratio']:>6.3f}")
    rows = [(res, name, e) for res in results for name, e in res["e2e"].items() if name != "qzoom"]
    if not rows:
        return
    print("\n=== summary: (b) baseline / Q-Zoom (mode always at the low budget)")
    head = (f"{'family':<11} {'baseline':<10} {'vis':>5} {'qzoom vis':>9} {'ms':>8} {'qzoom ms':>8} {'t ratio':>7} "
            f"{'paired':>6} {'cpu':>6} {'vis ratio':>9}")
    print(head)
    print("-" * len(head))
    for res, name, e in rows:
        q, r = res["e2e"]["qzoom"], e["time_ratio_vs_qzoom"]
        print(f"{res['family']:<11} {name:<10} {e['visual_tokens']:>5} {q['visual_tokens']:>9} "
              f"{fmt_ms(e['stats']['median_s']):>8} {fmt_ms(q['stats']['median_s']):>8} "
              f"{r['medians']:>7.2f} {r['paired']['median']:>6.2f} {r['cpu_medians']:>6.2f} "
              f"{e['visual_ratio_vs_qzoom']:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (f"size={args.size}, image={args.image_wh[0]}x{args.image_wh[1]}, low={args.low_tokens} tokens, "
                f"scales={args.scale_list}, repeats={args.repeats}, warmup={args.warmup}, order shuffled per round "
                f"(seed {args.seed})")
    return run_per_family("bench_zoom.py", argv, args, args.families, settings, bench_family,
                          lambda res: print_family(res, args), print_summary)


if __name__ == "__main__":
    sys.exit(main())
