#!/usr/bin/env bash
# Export the gate and the RPN of a checkpoint to ONNX (dynamic batch and sequence axes, parity report against
# torch), then let `swift infer` route with onnxruntime instead of the torch branches (QZOOM_ROUTER=onnx).
# Reads the stage-3 checkpoint; writes $OUT/onnx/{gate,rpn}.onnx (+ fp16), parity_report.json, $OUT/result.jsonl.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
MODEL_TYPE=${MODEL_TYPE:-qzoom_qwen2_5_vl}
CKPT=${CKPT:-runs/stage3/qwen2_5_vl_7b/train/last-checkpoint}   # written by stage3_gate.sh
DATA=${DATA:-data/test.jsonl}
OUT=${OUT:-runs/onnx/qwen2_5_vl_7b}
EXPORT_ARGS=${EXPORT_ARGS:-}                   # e.g. --precision fp32 (default: fp32 and fp16)
# the router: QZOOM_ONNX_PROVIDER auto = CUDA when onnxruntime and torch see a GPU, else the CPU
MODEL_KWARGS=${MODEL_KWARGS:-"{\"QZOOM_ROUTER\": \"onnx\", \"QZOOM_ONNX_DIR\": \"$OUT/onnx\", \"QZOOM_ONNX_PROVIDER\": \"auto\"}"}
INFER_ARGS=${INFER_ARGS:-}

# 1. the graphs (the base model is loaded on the CPU in float32 for the export)
qzoom export-onnx --checkpoint "$CKPT" --model "$MODEL" --out "$OUT/onnx" $EXPORT_ARGS

# 2. the same zoom inference, with the decisions made by onnxruntime
swift infer \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --model_type "$MODEL_TYPE" \
    --adapters "$CKPT" \
    --infer_backend transformers \
    --val_dataset "$DATA" \
    --max_new_tokens 64 \
    --temperature 0 \
    --model_kwargs "$MODEL_KWARGS" \
    --result_path "$OUT/result.jsonl" \
    $INFER_ARGS

echo "answers: $OUT/result.jsonl"
