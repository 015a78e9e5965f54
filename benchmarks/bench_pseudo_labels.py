#!/usr/bin/env python
"""Throughput of stage-1 pseudo-label generation (``qzoom pseudo-labels``) on CPU, and where the time goes.

For each family this builds (once, cached) the ``bench`` model (width 512, 12 decoder layers, random
weights), writes N synthetic shape records (392x280 PNGs, ms-swift jsonl) and measures:

1. ``job``: the real job, ``run_pseudo_labels`` end to end (records read, processor, eager ``generate``
   with the attention hooks, tri-state labels, fsynced shard writes): samples/s, excluding model load;
2. a profiled pass over the same batches with timers on the pieces of one ``generate``:
   ``vision`` (the vision tower's forward), ``prefill`` (the first LLM forward minus vision), ``decode``
   (every later forward: one new token each), ``hooks`` (time inside the attention/norm recording hooks:
   slicing the visual columns and accumulating), plus ``preprocess`` (chat template + processor) and
   ``labels`` (head averaging, sink mask, tri-state rule);
3. ``sdpa_generate``: the same generate with the stock sdpa attention and no hooks, i.e. what the answer
   alone would cost; ``eager + hooks`` over it is the price of reading attention.

The profile is timed in process CPU seconds (``time.process_time``), so with one thread it measures the
work and not the other processes sharing the machine; ``cpu rec/s`` = records / CPU seconds of the
profiled pass. The job's own samples/s (``job rec/s``) is wall clock and suffers from any contention.

Random weights never emit EOS, so every answer is exactly ``--max-new-tokens`` long (the official job caps
at 128); a real model's answers are usually shorter. Nothing is asserted: it is a benchmark.

Example: OMP_NUM_THREADS=1 python benchmarks/bench_pseudo_labels.py --family all --records 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="all", choices=(*FAMILIES, "all"))
    p.add_argument("--size", default="bench", choices=("tiny", "bench"))
    p.add_argument("--records", type=int, default=8, help="records per family (default 8)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default=None, help="optional JSON results path")
    return p.parse_args(argv)


class Timers:
    """Wall-clock timers attached to a model with forward hooks (nested calls are attributed once)."""

    def __init__(self, model, vision_module):
        self.t = defaultdict(float)
        self.n = defaultdict(int)
        self._start = {}
        self.handles = [
            model.register_forward_pre_hook(self._pre("model"), with_kwargs=True),
            model.register_forward_hook(self._post("model"), with_kwargs=True),
            vision_module.register_forward_pre_hook(self._pre("vision"), with_kwargs=True),
            vision_module.register_forward_hook(self._post("vision"), with_kwargs=True),
        ]
        self._phase = None

    def _pre(self, name):
        def hook(module, args, kwargs):
            if name == "model":
                ids = kwargs.get("input_ids", args[0] if args else None)
                self._phase = "prefill" if ids is not None and ids.shape[1] > 1 else "decode"
            self._start[name] = time.process_time()

        return hook

    def _post(self, name):
        def hook(module, args, kwargs, output):
            dt = time.process_time() - self._start.pop(name)
            key = self._phase if name == "model" else "vision"
            self.t[key] += dt
            self.n[key] += 1

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def vision_module(model):
    inner = model.model
    return getattr(inner, "visual", None) or inner.vision_tower


def profile_family(family: str, args, data: Path, work: Path) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import qzoom_swift.labels.attention as attention
    from qzoom_swift.labels.pseudo import (
        Prepared,
        PseudoLabelOptions,
        load_labelling_model,
        prepare_record,
        read_dataset,
        run_pseudo_labels,
        set_max_visual_tokens,
    )
    from qzoom_swift.labels.tristate import combine_sink_masks, tristate_labels
    from qzoom_swift.synthetic.models import build_model_dir

    model_dir = build_model_dir(family, args.size)
    # 1. the real job
    opts = PseudoLabelOptions(model=str(model_dir), dataset=str(data), out=str(work / f"job-{family}"),
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False,
                              calibration=args.records, overwrite=True)
    summary = run_pseudo_labels(opts)
    job = json.loads((work / f"job-{family}" / "job.json").read_text())
    layers = [int(k) for k in job["head_selection"]["grounding"]]

    # 2. profiled pass: same batches, the chosen layers
    model, processor, _ = load_labelling_model(str(model_dir))
    set_max_visual_tokens(processor, 576)
    eos = attention.eos_token_ids(model, processor.tokenizer)
    records = read_dataset(data)
    prepared = [prepare_record(rec, data.parent, False) for _, _, rec in records]
    prepared = [p for p in prepared if isinstance(p, Prepared)]
    hook_time = {"attention": 0.0, "norm": 0.0}
    orig_att, orig_norm = attention.AttentionRecorder._make_attention_hook, attention.AttentionRecorder._make_norm_hook

    def timed(maker, kind):
        def make(self, layer):
            inner = maker(self, layer)

            def hook(*a):
                t0 = time.process_time()
                out = inner(*a)
                hook_time[kind] += time.process_time() - t0
                return out

            return hook

        return make

    attention.AttentionRecorder._make_attention_hook = timed(orig_att, "attention")
    attention.AttentionRecorder._make_norm_hook = timed(orig_norm, "norm")
    timers = Timers(model, vision_module(model))
    t = defaultdict(float)
    visual_tokens = []
    try:
        for start in range(0, len(prepared), args.batch_size):
            batch = prepared[start:start + args.batch_size]
            t0 = time.process_time()
            texts = [processor.apply_chat_template(p.messages, add_generation_prompt=True) for p in batch]
            inputs = processor(text=texts, images=[p.image for p in batch], return_tensors="pt", padding=True)
            t["preprocess"] += time.process_time() - t0
            visual_tokens.append(int((inputs["input_ids"] == model.config.image_token_id).sum()) // len(batch))
            t0 = time.process_time()
            _, samples = attention.generate_with_attention(model, inputs, layers, [min(layers)], eos,
                                                           args.max_new_tokens)
            t["generate_eager_hooks"] += time.process_time() - t0
            t0 = time.process_time()
            grids = attention.image_grids(model, inputs)
            for s, grid in zip(samples, grids):
                att = s.head_mean({layer: None for layer in layers}).view(grid)
                mask = combine_sink_masks("norm", grid, norms=s.norms[min(layers)].view(grid))
                tristate_labels(att, mask)
            t["labels"] += time.process_time() - t0
    finally:
        timers.remove()
        attention.AttentionRecorder._make_attention_hook = orig_att
        attention.AttentionRecorder._make_norm_hook = orig_norm

    # 3. sdpa generate, no hooks
    sdpa = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    proc2 = AutoProcessor.from_pretrained(model_dir)
    proc2.tokenizer.padding_side = "left"
    set_max_visual_tokens(proc2, 576)
    t_sdpa = 0.0
    for start in range(0, len(prepared), args.batch_size):
        batch = prepared[start:start + args.batch_size]
        texts = [proc2.apply_chat_template(p.messages, add_generation_prompt=True) for p in batch]
        inputs = proc2(text=texts, images=[p.image for p in batch], return_tensors="pt", padding=True)
        t0 = time.process_time()
        with torch.no_grad():
            sdpa.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None,
                          top_p=None, top_k=None)
        t_sdpa += time.process_time() - t0

    n = len(prepared)
    # the hooks run inside the model's forward: take them out of prefill (norms) and decode (attention rows)
    vision = timers.t["vision"]
    prefill_llm = timers.t["prefill"] - vision - hook_time["norm"]
    decode = timers.t["decode"] - hook_time["attention"]
    gen = t["generate_eager_hooks"]
    cpu_total = t["preprocess"] + gen + t["labels"]
    parts = {
        "preprocess_s": t["preprocess"], "vision_s": vision, "prefill_llm_s": prefill_llm, "decode_s": decode,
        "hooks_s": hook_time["attention"] + hook_time["norm"],
        "generate_other_s": gen - timers.t["prefill"] - timers.t["decode"],
        "labels_s": t["labels"],
    }
    total = sum(parts.values())
    return {
        "family": family,
        "model_dir": str(model_dir),
        "records": n,
        "visual_tokens_per_image": visual_tokens[0] if visual_tokens else None,
        "layers_recorded": layers,
        "job_samples_per_s": summary["this_run"]["samples_per_s"],
        "cpu_samples_per_s": round(n / cpu_total, 4),
        "job_timing_s": summary["this_run"]["timing_s"],
        "profile_s": {k: round(v, 4) for k, v in parts.items()},
        "profile_share": {k: round(v / total, 3) for k, v in parts.items()},
        "per_record_ms": {k: round(1000 * v / n, 1) for k, v in parts.items()},
        "decode_steps": timers.n["decode"],
        "ms_per_decode_step": round(1000 * decode / max(timers.n["decode"], 1), 2),
        "generate_eager_hooks_s": round(gen, 4),
        "generate_sdpa_no_hooks_s": round(t_sdpa, 4),
        "attention_reading_overhead": round(gen / t_sdpa - 1.0, 3) if t_sdpa > 0 else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    from qzoom_swift.synthetic.images import write_shape_dataset

    families = FAMILIES if args.family == "all" else (args.family,)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_pl_") as tmp:
        work = Path(tmp)
        data = write_shape_dataset(work / "data", n=args.records, seed=0)
        for family in families:
            results.append(profile_family(family, args, data, work))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\npseudo-label throughput, {args.size} models, CPU threads {args.threads}, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens per answer, {args.records} records (load average {load})")
    cols = ("preprocess_s", "vision_s", "prefill_llm_s", "decode_s", "hooks_s", "generate_other_s", "labels_s")
    print(f"{'family':<11} {'job rec/s':>9} {'cpu rec/s':>9} {'vis tok':>7} " + " ".join(f"{c[:-2]:>10}" for c in cols)
          + f" {'ms/step':>8} {'eager+hooks/sdpa':>16}")
    for r in results:
        shares = " ".join(f"{100 * r['profile_share'][c]:>9.1f}%" for c in cols)
        print(f"{r['family']:<11} {r['job_samples_per_s']:>9.3f} {r['cpu_samples_per_s']:>9.3f} "
              f"{r['visual_tokens_per_image']:>7} {shares} "
              f"{r['ms_per_decode_step']:>8.1f} {1 + r['attention_reading_overhead']:>16.2f}x")
    record = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
              "platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
              "load_average": load, "args": vars(args), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
