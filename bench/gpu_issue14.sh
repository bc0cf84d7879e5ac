#!/usr/bin/env bash
# GLA 1B and 7B with FSDP2 on a 4-GPU host (nvidia-h200-x4), issue 14. Each stage fits one 10-minute device call
# on a warm machine; run `warm` first on a fresh one. From the repository root, with FLA and zstandard importable
# and TRITON_CACHE_DIR set to a folder that outlives the call (see bench/gpu_issue10.sh):
#   bash bench/gpu_issue14.sh warm      models.warm for GLA 1B (micro-batch 16) and 7B (micro-batch 4), bf16
#   bash bench/gpu_issue14.sh 1b        GLA 1B FSDP2 on 1, 2, 4 GPUs (16 sequences per GPU): tokens/s per GPU, MFU,
#                                       peak memory, scaling; then 4 GPUs at 32 per GPU (the larger micro-batch)
#   bash bench/gpu_issue14.sh 7b        GLA 7B FSDP2 on 4 GPUs: 4 per GPU without activation checkpointing, then
#                                       16 per GPU with it
#   bash bench/gpu_issue14.sh resume    GLA 1B: kill + resume on 4 and on 2 GPUs (loss gap to the uninterrupted
#                                       run), checkpoint save and load times from the trainer's log lines
# The memory estimate for each run: python bench/memory_estimate.py --model configs/gla_1B.json --gpus 1,2,4 ...
set -u
OUT=${OUT:-bench/out/gpu14}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
B1=configs/gla_1B.json
B7=configs/gla_7B.json

case "${1:-}" in
warm)
  timeout 280 python3 -m models.warm --model $B1 --seq-len 2048 --batch 16 --precision bf16 2>&1 | tail -1
  timeout 280 python3 -m models.warm --model $B7 --seq-len 2048 --batch 4 --precision bf16 2>&1 | tail -1
  ;;
1b)
  timeout 420 python3 bench/gpu_scaling.py --model $B1 --runs fsdp:1,fsdp:2,fsdp:4 --per-gpu-batch 16 --steps 20 \
      --skip 5 --dir bench/out/s1b > "$OUT/1b.log" 2>&1
  timeout 150 python3 bench/gpu_scaling.py --model $B1 --runs fsdp:4 --per-gpu-batch 32 --steps 15 --skip 5 \
      --dir bench/out/s1b32 >> "$OUT/1b.log" 2>&1
  grep -h '^{' "$OUT/1b.log"
  ;;
7b)
  timeout 270 python3 bench/gpu_scaling.py --model $B7 --runs fsdp:4 --per-gpu-batch 4 --steps 12 --skip 4 \
      --dir bench/out/s7b > "$OUT/7b.log" 2>&1
  timeout 270 python3 bench/gpu_scaling.py --model $B7 --runs fsdp:4 --per-gpu-batch 16 --micro-batch 16 --steps 10 \
      --skip 4 --extra train.activation_checkpointing=true --dir bench/out/s7bac >> "$OUT/7b.log" 2>&1
  grep -h '^{' "$OUT/7b.log"
  ;;
resume)
  timeout 290 python3 bench/train_resume_check.py --mode fsdp --model $B1 --nproc 4 --resume-nproc 2 --batch 32 \
      --steps 10 --every 3 --kill-after 5 --dir bench/out/r1b > "$OUT/resume.log" 2>&1
  grep -h '^{' "$OUT/resume.log"
  grep -h -o 'checkpoint [^ ]* ([0-9.]*s)\|resumed from .*loaded in [0-9.]*s' "$OUT/resume.log"
  ;;
*) echo "usage: bash bench/gpu_issue14.sh warm|1b|7b|resume" >&2; exit 2 ;;
esac
