#!/usr/bin/env bash
# Several GPUs or nodes: `swift sft` starts torchrun when NPROC_PER_NODE (or NNODES) is set, and the recipe's
# DeepSpeed ZeRO-2 shards optimizer states and gradients across the ranks. Here: the stage-1 training step of
# stage1_sdrpn.sh on 8 GPUs, with the accumulation chosen so the global batch stays the paper's 128
# (= NNODES x NPROC_PER_NODE x PER_DEVICE x accumulation). Post-SFT and the gate launch the same way.
# Two nodes: run it on both with NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0's address> MASTER_PORT=29500.
# Writes $OUT/train/last-checkpoint, like stage1_sdrpn.sh.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
RECIPE=${RECIPE:-qwen2_5_vl_7b}
OUT=${OUT:-runs/stage1/qwen2_5_vl_7b}
LABELS=${LABELS:-$OUT/labels}                  # the shards stage1_sdrpn.sh wrote
export NPROC_PER_NODE=${NPROC_PER_NODE:-8}     # GPUs per node (one process each)
export NNODES=${NNODES:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE=${PER_DEVICE:-16}
SFT_ARGS=${SFT_ARGS:-}

ACCUMULATION=$(( GLOBAL_BATCH / (NNODES * NPROC_PER_NODE * PER_DEVICE) ))
if [ "$ACCUMULATION" -lt 1 ] || [ $(( ACCUMULATION * NNODES * NPROC_PER_NODE * PER_DEVICE )) -ne "$GLOBAL_BATCH" ]; then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of NNODES x NPROC_PER_NODE x PER_DEVICE" >&2
    exit 1
fi
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt "$NPROC_PER_NODE" ]; then
    if [ "$NPROC_PER_NODE" -gt 1 ]; then
        echo "NPROC_PER_NODE=$NPROC_PER_NODE but this machine has $GPUS GPU(s): set NPROC_PER_NODE to the GPU count" >&2
        exit 1
    fi
    echo "no GPU: running the single-process launch (torchrun, 1 rank) on the CPU"
fi
echo "global batch $GLOBAL_BATCH = $NNODES node(s) x $NPROC_PER_NODE process(es) x $PER_DEVICE x $ACCUMULATION accumulation"

swift sft "$(qzoom recipes "$RECIPE/stage1_sdrpn.yaml")" \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --dataset "$LABELS"/shard-*.jsonl \
    --output_dir "$OUT/train" \
    --per_device_train_batch_size "$PER_DEVICE" \
    --gradient_accumulation_steps "$ACCUMULATION" \
    $SFT_ARGS

echo "stage-1 checkpoint: $OUT/train/last-checkpoint"
