"""``qzoom export-onnx``: the gate and the RPN of a branch checkpoint as ONNX graphs (standard library at import)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qzoom_swift.loading import add_model_args

EXPORT_ONNX_HELP = "export a checkpoint's gate and RPN as ONNX graphs (fp32/fp16) with a parity report"
EXPORT_ONNX_DESCRIPTION = (
    "Load BASE_MODEL (by default on the CPU in float32) with the Q-Zoom branch checkpoint --checkpoint CKPT, export the gate and the RPN with the "
    "torch dynamo exporter (dynamic batch and sequence axes), check them with onnx.checker and write to OUT: "
    "gate.onnx, rpn.onnx (and gate.fp16.onnx, rpn.fp16.onnx), qzoom_config.json and parity_report.json "
    "(onnxruntime vs torch on random and real inputs). Inputs of both graphs: hidden_states [B,S,d] after layer B, "
    "attention_mask [B,S] (1 = token, 0 = padding), cos/sin [B,S,rope_dim] from the model's rotary embedding, "
    "query_index [B]. Outputs: gate_logit, gate_prob [B]; token_logits [B,S]. Serve them with "
    "`swift infer ... --model_kwargs '{\"QZOOM_ROUTER\": \"onnx\", \"QZOOM_ONNX_DIR\": \"OUT\"}'` or "
    "qzoom_swift.onnx.OnnxRouter(OUT). See export/README.md."
)


def export_onnx_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT", type=Path, default=None,
                   help="Q-Zoom branch checkpoint dir (qzoom_branch.safetensors + qzoom_config.json)")
    p.add_argument("positional_checkpoint", nargs="?", metavar="CKPT_DEPRECATED", type=Path, default=None,
                   help="deprecated: the checkpoint as a positional argument (use --checkpoint, as every command does)")
    p.add_argument("--model", required=True, metavar="BASE_MODEL",
                   help="the base model the checkpoint was trained on (local dir or hub id)")
    p.add_argument("--out", required=True, type=Path, help="output dir for the graphs and the report")
    p.add_argument("--precision", dest="precisions", action="append", choices=("fp32", "fp16"), default=None,
                   help="graph precision (repeatable; default: fp32 and fp16)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 18; the dynamo exporter needs >= 18, onnxruntime bounds it above)")
    p.add_argument("--no-parity", action="store_true", help="skip the onnxruntime-vs-torch parity report")
    add_model_args(p, fixed_defaults=("cpu", "float32", "the graphs and their parity reference come from float32 "
                                                        "weights"))


def export_onnx_run(args: argparse.Namespace) -> int:
    from qzoom_swift.extras import require_extra

    require_extra("onnx", "qzoom export-onnx")  # before the exporter's own imports
    from qzoom_swift.fileio import quiet_transformers
    from qzoom_swift.loading import LoadSettings, ModelLoadError
    from qzoom_swift.onnx.export import DEFAULT_OPSET, REPORT_NAME, export_checkpoint

    if (args.checkpoint is None) == (args.positional_checkpoint is None):
        print("qzoom export-onnx: error: pass the branch checkpoint once, as --checkpoint CKPT", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        print("qzoom export-onnx: warning: a positional CKPT is deprecated; pass --checkpoint CKPT", file=sys.stderr)
        args.checkpoint = args.positional_checkpoint
    quiet_transformers()
    precisions = tuple(dict.fromkeys(args.precisions or ("fp32", "fp16")))
    try:
        result = export_checkpoint(args.checkpoint, args.model, args.out, precisions=precisions,
                                   opset=args.opset or DEFAULT_OPSET, parity=not args.no_parity,
                                   load=LoadSettings.from_args(args))
    except (ModelLoadError, FileNotFoundError) as exc:
        print(f"qzoom export-onnx: error: {exc}", file=sys.stderr)
        return 1
    for (branch, precision), path in result.files.items():
        print(f"{branch:<5} {precision:<5} {path}")
    ok = True
    if result.report is not None:
        print(f"\nparity vs torch (max abs diff; {REPORT_NAME}):")
        print(f"{'precision':<10} {'gate_prob':>10} {'gate_logit':>10} {'tokens':>10} {'tokens rel':>10} "
              f"{'heatmap':>10}  passed")
        for precision, entry in result.report["precisions"].items():
            d = entry["max_abs_diff"]
            print(f"{precision:<10} {d['gate_prob']:>10.2e} {d['gate_logit']:>10.2e} {d['token_logits']:>10.2e} "
                  f"{d['token_logits_rel']:>10.2e} {d.get('heatmap', float('nan')):>10.2e}  {entry['passed']}")
            if not entry["passed"]:
                level = "error" if precision == "fp32" else "warning"
                print(f"qzoom export-onnx: {level}: {precision} graphs exceed the parity tolerance "
                      f"{entry['tolerance']}", file=sys.stderr)
                ok = ok and precision != "fp32"
    print(f"\nwrote {result.out_dir} in {result.seconds:.1f} s")
    return 0 if ok else 1
