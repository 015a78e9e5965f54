#!/usr/bin/env python
"""Do the Q-Zoom paths run at the real widths? A CPU check of the full-size shapes at reduced depth.

For each shape (Qwen2.5-VL-7B, Qwen2.5-VL-3B, Qwen3-VL-4B, LLaVA-1.5-7B; ``qzoom_swift.synthetic.models``
``FULL_SIZE_CONFIGS``: real hidden sizes, heads, KV heads, head_dim, rotary/MRoPE sections, vision widths and
the real vocabulary, so the LM head costs what it costs) this builds a random bfloat16 model on the CPU with
the text and vision depths cut (``cut_full_size_config``: ``--text-layers`` >= B + R, B from
``QZoomConfig``'s rule for the cut depth, R = 3; a Qwen2.5-VL full-attention vision block and a Qwen3-VL
DeepStack tap are kept), attaches fresh branches (``QZoomModel``) and runs:

1. ``zoom``: ``QZoomModel.generate`` on one synthetic test card at ``--low-tokens`` visual tokens with mode
   ``always`` and tau_roi at the 0.9 quantile of the blurred heatmap, so a real sub-region is cropped,
   re-encoded and spliced (the RoI path runs); ok = zoomed, RoI tokens > 0, all new tokens decoded;
2. ``s1`` / ``s3``: one stage-1 (RPN, selective BCE on a tri-state map) and one stage-3 (gate, BCE) step:
   ``training.branch_training_step`` forward + backward, grad-norm clip 1.0, AdamW (0.9, 0.98) step on the
   trained branch only; ok = finite loss and changed branch tensors (bf16 weights, no fp32 master copy, hence
   ``--lr`` 1e-3 by default: 1e-4 steps are below bf16 resolution for many weights);
3. ``ckpt``: the branch checkpoint (``save_branch_checkpoint``, bf16 safetensors); branch widths do not depend
   on depth, so its size is the full-size checkpoint's;
4. ``onnx``: ``onnx.export_onnx`` of both heads (fp32 graphs) and its ``parity_report`` (``--onnx-parity
   quick``: two random cases; ``full``: every case plus real prompts, ~15 min per shape here). The report
   compares onnxruntime with the model's torch branches, here in bfloat16 (``vs bf16``: max abs diff of the
   gate probability and the token logits); the exported graph's own parity is onnxruntime against the same
   export wrapper (``branch_graph``) run in torch fp32 (``vs fp32``; ok when <= 1e-3).

Parameter counts come from the FULL-depth model built on the meta device (nothing allocated), with the
branches at the real B (family registry). GPU memory per stage at full depth is an estimate, in bytes,
with P_all the model's parameters, P_br the branches', P_tr the trained ones, b the recipe's per-device batch,
S = visual tokens of the stage + 64 text tokens, d hidden, d_kv = KV heads x head_dim, f intermediate, V vocab,
L layers, R branch depth, P = 4 x visual tokens vision patches (LLaVA 577), d_v / f_v vision width / MLP:

    act_layer(b, S) = 2 b S (6 d + 3 d_kv + 4 f)     one decoder layer's tensors kept for backward (bf16, sdpa:
                                                    no S^2 term): norm/projection inputs, q/k/v + rotary, attention
                                                    output, SwiGLU gate/up/act/product
    act_vis         = 2 b P (6 d_v + 4 f_v)          one vision block, transient (frozen, no grad)
    optimizer       = 12 P_tr                       AdamW fp32 master + m + v (DeepSpeed bf16; ZeRO-2 on one GPU
                                                    shards nothing), plus 2 P_tr bf16 gradients
    stage 1 (RPN)   = 2 (P_all + P_br) + 14 P_tr + (R-1) 2 b S d + act_layer + max(act_layer, act_vis)
    stage 3 (gate)  = 2 (P_all + P_br) + 14 P_tr + R 2 b S d + act_layer + max(act_layer, act_vis)
                      (gradient checkpointing keeps each branch layer's input; the frozen trunk [0, B) runs
                      without grad; layers [B, L) and the LM head never run)
    stage 2 (Post-SFT, LLM layers + LM head train, branches not attached)
                    = 2 P_all + 14 P_tr + L 2 b S d + act_layer + max(act_layer, act_vis) + 10 b S V
                      (bf16 logits, fp32 upcast and its gradient)
    inference (b=1, low 576 + RoI 576 tokens + 64 text + 64 new)
                    = 2 (P_all + P_br) + 4 L S d_kv (K and V cache) + act_layer(1, S)

Stage budgets and batches are read from ``qzoom_swift/recipes/<shape>/*.yaml`` (stage 1: IMAGE_MAX_TOKEN_NUM;
stage 2: a 576-token image + the QZOOM_ROI_MAX_TOKENS crop; stage 3: the largest ``--budgets`` value below the
top two, which are never training inputs). Not counted: the CUDA context (~0.5-1 GiB), allocator
fragmentation, DeepSpeed buffers, dataloader pinned memory. Shapes without a recipe for a stage show "-".

Each shape runs in its own subprocess, one after the other (memory is freed between shapes; peak RSS is per
shape). Run ``python benchmarks/full_width_check.py --help``. Not part of CI: a check, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line, setup_torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_branch_prefill import synthetic_image  # noqa: E402

from qzoom_swift.fileio import write_json_atomic  # noqa: E402
from qzoom_swift.synthetic.models import FULL_SIZE_SHORT_NAMES  # noqa: E402

if TYPE_CHECKING:
    import torch

QUESTION = "What is written on the small sign in the lower right corner?"
TEXT_TOKENS = 64
"""Text tokens (system prompt, question, answer) added to the visual tokens of a stage in the memory estimate."""
GIB = 2.0 ** 30
RECIPE_FILES = {"s1": "stage1_sdrpn.yaml", "s2": "stage2_post_sft.yaml", "s3": "stage3_gate.yaml"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/full_width_check.py --shapes qwen2_5_vl_7b "
                                       "--json /tmp/full_width.json")
    names = ",".join(FULL_SIZE_SHORT_NAMES)
    p.add_argument("--shapes", default=names, help=f"comma-separated shapes from {names} (default: all)")
    p.add_argument("--text-layers", type=int, default=4,
                   help="decoder layers of the cut model; >= R + 1 (default: 4, so B = 1, R = 3)")
    p.add_argument("--vision-layers", type=int, default=8,
                   help="vision blocks of the cut model (default: 8: keeps Qwen2.5-VL's full-attention block 7 "
                        "and Qwen3-VL's DeepStack tap 5)")
    p.add_argument("--low-tokens", type=int, default=64, help="visual tokens of pass 1 and of the RoI (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="tokens decoded by the zoom step (default: 4)")
    p.add_argument("--image-size", default="672x504", help="synthetic image WIDTHxHEIGHT (default: 672x504)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the training steps (default: 1e-3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--skip-onnx", action="store_true", help="skip the ONNX export (the slowest step)")
    p.add_argument("--onnx-parity", default="quick", choices=("quick", "full"),
                   help="parity cases of the export's report: quick = 2 random cases (default), full = all of "
                        "export.PARITY_CASES + a real two-image batch (~15 min per 3B-width shape on 2 busy cores)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON (atomically)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shape_list if s not in FULL_SIZE_SHORT_NAMES]
    if bad or not args.shape_list:
        p.error(f"--shapes {args.shapes!r}: choose from {names}")
    try:
        args.image_wh = tuple(int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image-size {args.image_size!r}: expected WIDTHxHEIGHT")
    if args.text_layers < 4 or args.vision_layers < 2 or min(args.low_tokens, args.max_new_tokens) < 1:
        p.error("--text-layers must be >= 4 (B >= 1, R = 3), --vision-layers >= 2, the token counts >= 1")
    return args


# ---------------------------------------------------------------------------------------- full-depth numbers


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def full_depth_counts(short: str) -> dict:
    """Parameter counts of the full-depth model and its branches at the real B, built on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.families import get_adapter
    from qzoom_swift.synthetic.models import full_size_config

    _, config = full_size_config(FULL_SIZE_SHORT_NAMES[short])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        branches = attach_branches(model)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    trunk = _count(model) - _count(branches)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embed
    vision_names = ("visual", "vision_tower", "multi_modal_projector")
    vision = sum(p.numel() for n, p in model.named_parameters() if any(f".{v}." in f".{n}" for v in vision_names))
    cfg = branches.qzoom_config
    return {"params_full": trunk, "params_branch": _count(branches), "params_gate": _count(branches.gate),
            "params_rpn": _count(branches.rpn), "params_layer": _count(layers[0]), "params_vision": vision,
            "params_embed": embed.numel(), "params_lm_head": 0 if tied else head.numel(), "tied": tied,
            "layers": len(layers), "branch_layer": int(cfg.branch_layer), "branch_depth": int(cfg.branch_depth)}


def recipe_settings(short: str) -> dict:
    """Per stage: per-device batch, visual tokens, GPUs (NPROC_PER_NODE) and any GPU type the header names."""
    import yaml

    import qzoom_swift

    root = Path(qzoom_swift.__file__).resolve().parent / "recipes" / short
    out: dict = {}
    for stage, name in RECIPE_FILES.items():
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        env = data.get("ENV") or {}
        header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        gpu_type = sorted(set(re.findall(r"\b(?:A100|H100|H800|H200|A800|H20|L40S?|A6000|4090|[0-9]+ ?GB)\b", header)))
        if stage == "s1":
            visual = int(env.get("IMAGE_MAX_TOKEN_NUM", 576))
        elif stage == "s2":
            visual = 576 + int(env.get("QZOOM_ROI_MAX_TOKENS", 576))
        else:
            found = re.search(r"--budgets ([0-9,]+)", text)
            budgets = sorted(int(v) for v in found.group(1).split(",")) if found else [576]
            visual = budgets[-3] if len(budgets) > 2 else budgets[0]
        out[stage] = {"file": str(path.relative_to(root.parents[1])), "batch": int(data.get("per_device_train_batch_size", 1)),
                      "gpus": int(env.get("NPROC_PER_NODE", 1)), "gpu_type": ",".join(gpu_type) or "not stated",
                      "visual_tokens": visual, "deepspeed": str(data.get("deepspeed", "")),
                      "gradient_checkpointing": bool(data.get("gradient_checkpointing", False))}
    return out


def _shape_dims(config) -> dict:
    text, vision = config.text_config, config.vision_config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    vision_ff = int(vision.intermediate_size)
    return {"d": int(text.hidden_size), "f": int(text.intermediate_size), "V": int(text.vocab_size),
            "d_kv": int(text.num_key_value_heads) * head_dim, "d_v": int(vision.hidden_size), "f_v": vision_ff}


def estimate_memory(short: str, counts: dict, recipes: dict) -> dict:
    """GiB per stage at full depth (the formula of the module docstring); None where no recipe exists."""
    from qzoom_swift.synthetic.models import full_size_config

    _, config = full_size_config(FULL_SIZE_SHORT_NAMES[short])
    k = _shape_dims(config)
    fixed_patches = 577 if getattr(config, "image_seq_length", None) else None  # CLIP-L/336: 24x24 + CLS

    def act_layer(b: int, s: int) -> float:
        return 2 * b * s * (6 * k["d"] + 3 * k["d_kv"] + 4 * k["f"])

    def act_vis(b: int, visual: int) -> float:
        return 2 * b * (fixed_patches or 4 * visual) * (6 * k["d_v"] + 4 * k["f_v"])

    p_all, p_br, r, L = counts["params_full"], counts["params_branch"], counts["branch_depth"], counts["layers"]
    out: dict = {}
    for stage, rec in recipes.items():
        b, visual = rec["batch"], rec["visual_tokens"]
        s = visual + TEXT_TOKENS
        trunk = max(act_layer(b, s), act_vis(b, visual))
        if stage == "s2":
            p_tr = L * counts["params_layer"] + (counts["params_lm_head"] or counts["params_embed"])
            total = 2 * p_all + 14 * p_tr + L * 2 * b * s * k["d"] + act_layer(b, s) + trunk + 10 * b * s * k["V"]
        else:
            p_tr = counts["params_rpn"] if stage == "s1" else counts["params_gate"]
            kept = (r - 1) if stage == "s1" else r
            total = 2 * (p_all + p_br) + 14 * p_tr + kept * 2 * b * s * k["d"] + act_layer(b, s) + trunk
        out[stage] = {"gib": total / GIB, "weights_gib": 2 * (p_all + (0 if stage == "s2" else p_br)) / GIB,
                      "trained_params": p_tr, "batch": b, "seq": s}
    s = 576 + 576 + 2 * TEXT_TOKENS
    total = 2 * (p_all + p_br) + 4 * L * s * k["d_kv"] + act_layer(1, s)
    out["infer"] = {"gib": total / GIB, "weights_gib": 2 * (p_all + p_br) / GIB, "batch": 1, "seq": s}
    return out


# ------------------------------------------------------------------------------------------ the cut model


def build_cut_model(short: str, args: argparse.Namespace):
    """(QZoomModel, CutShape) of the cut shape: random bf16 weights (seeded), fresh branches at the cut B."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from qzoom_swift import QZoomModel
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.synthetic.models import cut_full_size_config, full_size_processor

    processor, generation = full_size_processor(short)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    cut = cut_full_size_config(short, args.text_layers, args.vision_layers, image_token_id=image_token_id)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cut.config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    model.generation_config = GenerationConfig(**generation)
    low = args.low_tokens
    cfg = QZoomConfig(branch_depth=cut.branch_depth, low_min_tokens=low, low_max_tokens=low, roi_min_tokens=low,
                      roi_max_tokens=low)
    qm = QZoomModel(model, processor, cfg)
    if qm.config.branch_layer != cut.branch_layer:
        raise RuntimeError(f"B={qm.config.branch_layer} attached, the cut expected {cut.branch_layer}")
    return qm, cut


def low_inputs(qm, image, tokens: int) -> dict:
    """Processor inputs at the low budget, exactly as ``QZoomModel.generate`` builds pass 1."""
    from qzoom_swift.inputs import chat_inputs

    resized = qm.adapter.resize_for_budget(image.convert("RGB"), tokens, tokens)
    return dict(chat_inputs(qm.processor, [resized], QUESTION))


def zoom_step(qm, image, args: argparse.Namespace) -> dict:
    """Forced zoom (mode always) with tau_roi at the 0.9 quantile of the blurred heatmap: a real sub-region."""
    from qzoom_swift.roi import heatmap_probabilities

    cfg = qm.config
    heat = qm.prefill(**low_inputs(qm, image, args.low_tokens)).heatmaps()[-1].detach().float()
    probs = heatmap_probabilities(heat, cfg.blur_kernel, cfg.blur_sigma).flatten()
    tau = float(probs.kthvalue(max(1, int(probs.numel() * 0.9))).values)
    n = args.max_new_tokens
    answer = qm.generate([image], QUESTION, config_overrides={"mode": "always", "tau_roi": tau},
                         max_new_tokens=n, min_new_tokens=n)[0]
    st = answer.stats
    ok = bool(st.zoomed and st.reason == "forced" and st.visual_tokens_roi > 0 and len(answer.token_ids or []) == n)
    return {"ok": ok, "reason": st.reason, "box": st.box, "grid": st.grid, "visual_tokens_low": st.visual_tokens_low,
            "visual_tokens_roi": st.visual_tokens_roi, "new_tokens": len(answer.token_ids or []), "tau_roi": tau}


def _rpn_label_map() -> torch.Tensor:
    """A tri-state 8x8 map: foreground square, an ignored ring around it, background elsewhere."""
    import torch

    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[1:6, 4:8] = -100
    labels[2:5, 5:7] = 1
    return labels


def train_step(qm, image, which: str, args: argparse.Namespace) -> dict:
    """One branch step: forward + backward of the branch loss, grad clip 1.0, AdamW step on that branch only."""
    import torch

    from qzoom_swift.branches import branch_parameters
    from qzoom_swift.training import branch_training_step

    model = qm.model
    model.requires_grad_(False)
    params = [p for _, p in branch_parameters(model, which)]
    for p in params:
        p.requires_grad_(True)
    before = [p.detach().reshape(-1)[:4096].clone() for p in params]
    targets = {"qzoom_gate": torch.tensor([1])} if which == "gate" else {"qzoom_rpn_labels": [_rpn_label_map()]}
    inputs = low_inputs(qm, image, args.low_tokens)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0, foreach=False)
    model.train()
    try:
        out = branch_training_step(model, (which,), **targets, **inputs)
        loss = float(out.loss.detach())
        out.loss.backward()
        with_grad = sum(1 for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        model.requires_grad_(False)
    changed = sum(1 for p, b in zip(params, before) if not torch.equal(p.detach().reshape(-1)[:4096], b))
    ok = math.isfinite(loss) and math.isfinite(grad_norm) and changed > 0
    return {"ok": ok, "loss": loss, "grad_norm": grad_norm, "tensors": len(params), "with_grad": with_grad,
            "changed": changed, "trained_params": sum(p.numel() for p in params)}


def checkpoint_step(qm, out_dir: Path) -> dict:
    """Save the branches (bf16 safetensors) and load them back into the same model (layout check)."""
    from qzoom_swift.checkpoint import load_branch_checkpoint, save_branch_checkpoint
    from qzoom_swift.config import BRANCH_WEIGHTS_NAME

    save_branch_checkpoint(qm.model, out_dir)
    size = (out_dir / BRANCH_WEIGHTS_NAME).stat().st_size
    load_branch_checkpoint(qm.model, out_dir)
    return {"ok": size > 0, "bytes": size}


def _fp32_graph_parity(model, files: dict) -> dict:
    """onnxruntime vs the export wrapper run in torch fp32, branch by branch (one fp32 copy alive at a time)."""
    import copy

    import numpy as np
    import onnxruntime as ort
    import torch

    from qzoom_swift.onnx.export import branch_graph, router_inputs
    from qzoom_swift.onnx.graphs import INPUT_NAMES

    out = {}
    inputs = router_inputs(model, 2, 29, left_pad=[0, 4], seed=7)
    for branch in ("gate", "rpn"):
        graph = copy.deepcopy(branch_graph(model, branch)).float()
        with torch.no_grad():
            ref = graph(*(inputs[name] for name in INPUT_NAMES))
        del graph
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(files[(branch, "fp32")]), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        del session
        valid = inputs["attention_mask"].bool()
        diffs = []
        for r, g in zip(ref, got):
            d = (r.float() - torch.from_numpy(np.asarray(g)).float()).abs()
            diffs.append(float(d[valid].max() if d.shape == valid.shape else d.max()))
        out[branch] = max(diffs)
    return out


def _drop_trunk(model) -> None:
    """Move the embeddings, LM head and decoder layers to the meta device (frees ~4 GB at 7B width).

    The quick export and parity need only the branches (own copies), the rotary tables and the vision config;
    the ONNX step runs last, so nothing needs the trunk afterwards. Without this the 7B shape peaked at 16.6 GB
    RSS (two fp32 onnxruntime sessions next to the bf16 model).
    """
    import gc

    from qzoom_swift.families import get_adapter

    for module in (model.get_input_embeddings(), model.get_output_embeddings(), *get_adapter(model).decoder_layers(model)):
        module.to("meta")
    gc.collect()


QUICK_PARITY_CASES = ((1, 37, None), (2, 29, [0, 4]))
"""``--onnx-parity quick``: two of ``export.PARITY_CASES`` (one of them left-padded), no real prompts."""


def onnx_step(qm, out_dir: Path, parity: str) -> dict:
    """``export_onnx`` (fp32 graphs) and its ``parity_report`` (all cases + real prompts, or the quick cases),
    plus the fp32 graph parity."""
    from qzoom_swift.onnx.export import export_onnx, parity_report

    full = parity == "full"
    if not full:
        _drop_trunk(qm.model)
    t0 = time.perf_counter()
    result = export_onnx(qm.model, out_dir, precisions=("fp32",), processor=qm.processor, parity=full)
    export_s = time.perf_counter() - t0
    report = result.report if full else parity_report(qm.model, result.files, None, QUICK_PARITY_CASES)
    fp32 = _fp32_graph_parity(qm.model, result.files)
    worst = report["precisions"]["fp32"]["max_abs_diff"]
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file() and ".onnx" in f.name)
    return {"ok": max(fp32.values()) <= 1e-3, "vs_fp32": max(fp32.values()), "vs_fp32_branch": fp32,
            "vs_bf16": max(worst.get("gate_prob", 0.0), worst.get("token_logits", 0.0)), "vs_bf16_report": worst,
            "report_passed": report["precisions"]["fp32"]["passed"], "onnx_bytes": size, "parity": parity,
            "export_s": export_s}


def _timed(seconds: dict, name: str, fn, *a):
    t0 = time.perf_counter()
    try:
        return fn(*a)
    finally:
        seconds[name] = time.perf_counter() - t0


def run_shape(short: str, args: argparse.Namespace) -> dict:
    """Every step on one cut shape, in this process; a failing step is recorded and the others still run."""
    import gc

    counts = full_depth_counts(short)
    recipes = recipe_settings(short)
    res: dict = {"shape": short, "name": FULL_SIZE_SHORT_NAMES[short], "counts": counts, "recipes": recipes,
                 "estimate": estimate_memory(short, counts, recipes), "seconds": {}, "steps": {}, "errors": {}}
    seconds = res["seconds"]
    qm, cut = _timed(seconds, "build", build_cut_model, short, args)
    res["cut"] = {"text_layers": args.text_layers, "vision_layers": args.vision_layers, "B": cut.branch_layer,
                  "R": cut.branch_depth, "full_attention_blocks": list(cut.full_attention_blocks),
                  "deepstack_taps": list(cut.deepstack_taps), "params": _count(qm.model)}
    print(f"[{short}] built: {res['cut']['params'] / 1e9:.2f} B params in bf16 (incl. branches) at "
          f"{args.text_layers} text / {args.vision_layers} vision layers, B={cut.branch_layer} R={cut.branch_depth} "
          f"in {seconds['build']:.1f} s", flush=True)
    image = synthetic_image(args.image_wh)
    with tempfile.TemporaryDirectory(prefix=f"qzoom_full_{short}_") as tmp:
        steps = [("zoom", zoom_step, (qm, image, args)), ("s1", train_step, (qm, image, "rpn", args)),
                 ("s3", train_step, (qm, image, "gate", args)), ("ckpt", checkpoint_step, (qm, Path(tmp) / "ckpt"))]
        if not args.skip_onnx:
            steps.append(("onnx", onnx_step, (qm, Path(tmp) / "onnx", args.onnx_parity)))
        for name, fn, fargs in steps:
            try:
                res["steps"][name] = _timed(seconds, name, fn, *fargs)
            except Exception as exc:  # noqa: BLE001 - a check reports every failing step, not only the first
                res["errors"][name] = f"{type(exc).__name__}: {exc}"
                res["steps"][name] = {"ok": False}
            print(f"[{short}] {name}: {res['steps'][name]} ({seconds[name]:.1f} s)", flush=True)
            gc.collect()
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return res


def run_worker(args: argparse.Namespace) -> int:
    import torch

    from qzoom_swift.fileio import quiet_transformers

    quiet_transformers()
    setup_torch(args.threads)
    logging.basicConfig(format="[%(name)s] %(message)s")
    logging.getLogger("qzoom_swift.onnx.export").setLevel(logging.INFO)  # per-graph export seconds
    with torch.inference_mode(False):
        res = run_shape(args.shape_list[0], args)
    write_json_atomic(args.worker, res)
    return 0


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _gib(est: dict, stage: str) -> str:
    return f"{est[stage]['gib']:.0f}" if stage in est else "-"


def print_table(results: list[dict]) -> None:
    """The main table (one row per shape) and the per-step seconds."""
    head = (f"{'shape':<15}{'cut L/Lv':>9}{'B,R':>6}{'steps':>7}{'zoom':>6}{'loss s1':>9}{'loss s3':>9}"
            f"{'onnx vs fp32':>13}{'vs bf16':>9}{'params full':>12}{'branch':>8}{'(full B)':>9}{'ckpt MB':>9}"
            f"{'est GiB s1/s2/s3/inf':>22}{'recipe GPUs':>22}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "steps" not in r:
            print(f"{r['shape']:<15} FAILED: {r.get('error', '?')}")
            continue
        st, c, cut, est = r["steps"], r["counts"], r["cut"], r["estimate"]
        ok = sum(1 for s in st.values() if s.get("ok"))
        onnx = st.get("onnx", {})
        gpus = {f"{rec['gpus']}x {rec['gpu_type']}" for rec in r["recipes"].values()}
        loss = {k: (f"{st[k]['loss']:.3f}" if "loss" in st.get(k, {}) else "fail") for k in ("s1", "s3")}
        ests = "/".join(_gib(est, s) for s in ("s1", "s2", "s3", "infer"))
        ckpt = st.get("ckpt", {}).get("bytes")
        print(f"{r['shape']:<15}{cut['text_layers']:>5}/{cut['vision_layers']:<3}{cut['B']:>3},{cut['R']:<2}"
              f"{ok:>4}/{len(st):<2}{'ok' if st.get('zoom', {}).get('ok') else 'FAIL':>6}{loss['s1']:>9}{loss['s3']:>9}"
              f"{onnx.get('vs_fp32', float('nan')):>13.1e}{onnx.get('vs_bf16', float('nan')):>9.1e}"
              f"{_fmt_params(c['params_full']):>12}{_fmt_params(c['params_branch']):>8}{c['branch_layer']:>5},"
              f"{c['branch_depth']:<3}{(ckpt or 0) / 1e6:>9.0f}{ests:>22}{', '.join(sorted(gpus)) or '-':>22}")
    names = ("build", "zoom", "s1", "s3", "ckpt", "onnx")
    head = f"{'seconds':<15}" + "".join(f"{n:>9}" for n in names) + f"{'peak RSS GiB':>14}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "seconds" in r:
            print(f"{r['shape']:<15}" + "".join(f"{r['seconds'].get(n, float('nan')):>9.1f}" for n in names)
                  + f"{r.get('peak_rss_gib', float('nan')):>14.1f}")
    for r in results:
        for step, err in r.get("errors", {}).items():
            print(f"error {r['shape']} {step}: {err}")


def worker_argv(args: argparse.Namespace, shape: str, out: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--shapes", shape, "--worker", out,
            "--text-layers", str(args.text_layers), "--vision-layers", str(args.vision_layers),
            "--low-tokens", str(args.low_tokens), "--max-new-tokens", str(args.max_new_tokens),
            "--image-size", args.image_size, "--lr", str(args.lr), "--threads", str(args.threads),
            "--onnx-parity", args.onnx_parity]
    return argv + (["--skip-onnx"] if args.skip_onnx else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    import torch
    import transformers

    command = command_line("full_width_check.py", argv)
    print(f"command: {command}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"cpus={os.cpu_count()}, threads={args.threads}; text layers {args.text_layers}, vision layers "
          f"{args.vision_layers}, low/RoI tokens {args.low_tokens}, image {args.image_size}, bfloat16 random init")
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="qzoom_full_width_") as tmp:
        for shape in args.shape_list:
            out = Path(tmp) / f"{shape}.json"
            proc = subprocess.run(worker_argv(args, shape, str(out)), check=False)
            if proc.returncode != 0 or not out.is_file():
                results.append({"shape": shape, "error": f"worker exited with {proc.returncode}"})
                continue
            results.append(json.loads(out.read_text()))
    print_table(results)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s")
    if args.json:
        write_json_atomic(args.json, {"command": command, "torch": torch.__version__,
                                      "transformers": transformers.__version__, "wall_s": wall,
                                      "args": {k: v for k, v in vars(args).items() if k != "worker"},
                                      "results": results})
        print(f"wrote {args.json}")
    ok = all("steps" in r and not r["errors"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
