#!/usr/bin/env bash
# The GPU measurements of the precision work (issue 10), one stage per device call, on a machine with 2 GPUs
# (nvidia-h200-x2). Run from the repository root, with FLA (and zstandard) importable and TRITON_CACHE_DIR
# set to a folder that outlives the call:
#   bash bench/gpu_issue10.sh warm-b16      models.warm (bf16 + autocast), then GPU 0: ours-bf16 / ours-autocast / HF
#                                           at batch 16; GPU 1: 300-step loss curves, autocast vs bf16 (real text)
#   bash bench/gpu_issue10.sh b32-profile   GPU 0: the three cases at batch 32; GPU 1: the step's profile per precision
#   bash bench/gpu_issue10.sh scaling       1 vs 2 GPUs (none/ddp, fsdp), then kill + resume on 2 and 1 GPUs (ddp, fsdp)
# Logs go to $OUT (default bench/out/gpu); each stage prints its JSON result lines last.
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SHARDS=${SHARDS:-shk2048}   # real text: `make shards INPUT=data/shakespeare SEQ_LEN=2048` output
M=configs/gla_340M.json

case "${1:-}" in
warm-b16)
  timeout 270 python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16,autocast 2>&1 | tail -4 | tee "$OUT/warm.log"
  (CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/train_bench.py --batch 16 --steps 15 --warmup 5 \
      --cases ours-bf16,ours-autocast,hf > "$OUT/b16.log" 2>&1) &
  (CUDA_VISIBLE_DEVICES=1 timeout 300 python3 bench/precision_curve.py --shards "$SHARDS" --steps 300 --batch 16 \
      > "$OUT/curve.log" 2>&1) &
  wait
  grep -h '^{' "$OUT/b16.log"; grep -h 'tokens/s:' "$OUT/b16.log"; grep -h -A20 '^{' "$OUT/curve.log"
  ;;
b32-profile)
  (CUDA_VISIBLE_DEVICES=0 timeout 330 python3 bench/train_bench.py --batch 32 --steps 10 --warmup 4 \
      --cases ours-bf16,ours-autocast,hf > "$OUT/b32.log" 2>&1) &
  (for p in bf16 autocast; do CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/gpu_profile.py --precision $p \
      --steps 3 --warmup 3 --trace "$OUT/trace-$p.json" 2>&1 | grep -v '^warm-up'; done > "$OUT/profile.log" 2>&1;
   gzip -f "$OUT"/trace-*.json) &
  wait
  grep -h '^{' "$OUT/b32.log"; grep -h 'tokens/s:' "$OUT/b32.log"; cat "$OUT/profile.log" | grep -v Warning
  ;;
scaling)
  timeout 200 python3 bench/gpu_scaling.py --runs none:1,ddp:2,fsdp:1,fsdp:2 --per-gpu-batch 16 --steps 25 --skip 5 \
      > "$OUT/scaling.log" 2>&1
  for m in ddp fsdp; do timeout 160 python3 bench/train_resume_check.py --mode $m --nproc 2 --batch 16 --steps 12 \
      --every 4 --kill-after 7 > "$OUT/resume-$m.log" 2>&1; done
  grep -h '^{' "$OUT/scaling.log" "$OUT"/resume-*.log
  ;;
*) echo "usage: bash bench/gpu_issue10.sh warm-b16|b32-profile|scaling" >&2; exit 2 ;;
esac
