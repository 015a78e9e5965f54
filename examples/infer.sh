#!/usr/bin/env bash
# Zoom inference with `swift infer`: low-resolution prefill -> gate -> (RPN box -> crop -> re-encode, prefix
# KV reused) -> answer. Each batch logs its decisions (`qzoom: zoom(gate) p=0.41 visual=576+552; ...`).
# Reads the stage-3 checkpoint (both branches + the calibrated tau_gate); writes $OUT/result.jsonl.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}    # the model the branches were trained on (after stage 2: its output)
MODEL_TYPE=${MODEL_TYPE:-qzoom_qwen2_5_vl}     # qzoom_qwen2_5_vl | qzoom_qwen3_vl | qzoom_llava1_5_hf
CKPT=${CKPT:-runs/stage3/qwen2_5_vl_7b/train/last-checkpoint}   # written by stage3_gate.sh
DATA=${DATA:-data/test.jsonl}                  # ms-swift jsonl: messages + images
OUT=${OUT:-runs/infer/qwen2_5_vl_7b}
MODEL_KWARGS=${MODEL_KWARGS:-'{}'}             # Q-Zoom knobs, e.g. '{"QZOOM_TAU_GATE": 0.05, "QZOOM_MODE": "always"}'
INFER_ARGS=${INFER_ARGS:---max_batch_size 8}

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
