#!/usr/bin/env bash
# Evaluate Q-Zoom against the base model with evalscope (`qzoom eval`): accuracy, relative throughput and
# visual tokens per benchmark, a summary table and a Pareto plot (paper Tables II/III, Fig. 8).
# Datasets are read from local copies ($DATA_ROOT/<benchmark>/, fetched once: README "Evaluation").
# Reads the stage-3 checkpoint; writes $OUT/summary.md, summary.csv, summary.json, pareto.png.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
CKPT=${CKPT:-runs/stage3/qwen2_5_vl_7b/train/last-checkpoint}   # written by stage3_gate.sh
DATA_ROOT=${DATA_ROOT:-/data/qzoom-bench}     # one folder per benchmark (`qzoom eval --help` lists the files)
BENCHMARKS=${BENCHMARKS:-docvqa,chartqa,textvqa,ocr_bench,vstar_bench,hr_bench_4k}
RUNS=${RUNS:---run baseline:paper --run zoom:paper}   # Pareto sweep: --run baseline:576 --run zoom:576 ...
OUT=${OUT:-runs/eval/qwen2_5_vl_7b}
EVAL_ARGS=${EVAL_ARGS:---dtype bfloat16 --device cuda --attn-implementation sdpa}   # CPU: --device cpu

qzoom eval --model "$MODEL" --checkpoint "$CKPT" \
    --data-root "$DATA_ROOT" --benchmarks "$BENCHMARKS" \
    $RUNS \
    --out "$OUT" \
    $EVAL_ARGS

cat "$OUT/summary.md"
