#!/usr/bin/env bash
# The GPU measurements of the fused path (issue 10, model.gpu_kernels), one stage per device call on ONE GPU
# (nvidia-h100-x1 or nvidia-h200). Run from the repository root with FLA and zstandard importable (the caller
# installs the wheels of .whl first). Each stage ends inside 580 s: every command's timeout is cut to what is left
# of the stage. The Triton cache is kept in .cache/triton (ignored by .gitignore, so it stays on a warm machine).
#   bash bench/gpu_issue10b.sh all1    models.warm (bf16 + autocast, fused + fla kernels), bench/norm_bench.py if
#                                      present, ours-bf16 / ours-bf16-fla / HF at batch 16, the step's profile
#                                      with fused kernels (category table + top kernels)
#   bash bench/gpu_issue10b.sh b32     ours-bf16 / ours-bf16-fla / HF at batch 32
#   bash bench/gpu_issue10b.sh graphs  train.cuda_graphs: bench/graph_check.py (same numbers as eager?), then the
#                                      trainer with and without graphs vs HF at batch 16 (and 32 on a >100 GB card)
#   bash bench/gpu_issue10b.sh curve   models.warm, then 300-step loss curves on real text, batch 16: autocast-fla
#                                      twice (the noise floor) and bf16-fused, each against the first
#   bash bench/gpu_issue10b.sh c1      (2026-12-05) models.warm, then the trainer (the loop that reads each step
#                                      after queueing the next; -sync: the loop before) eager and with
#                                      train.cuda_graphs against HF at batch 16 and at batch 32 (>100 GB cards)
#   bash bench/gpu_issue10b.sh c2      models.warm, loss curves: autocast-fla, the same path from another init
#                                      (autocast-fla@1: the seed noise floor) and bf16-fused
#   bash bench/gpu_issue10b.sh c3      the step with the sweep's fastest backward launch against the default
#                                      (bench/gpu_profile.py --norm-bwd; the sweep first where c1 did not run here)
#   bash bench/gpu_issue10b.sh c5      (2026-12-06) the step's idle GPU time between kernels by gap length, each step
#                                      read at once and (--lag) after the next one's launch
#   bash bench/gpu_issue10b.sh c6      (2026-12-06) the attention projections stacked into one GEMM (cat) against
#                                      one GEMM each (split): the step's profile (--lag) and the trainer vs HF
#   bash bench/gpu_issue10b.sh c7      (2026-12-06) host time to queue a step and the kernels after the long idle
#                                      gaps, eager and with CUDA graphs; the trainer vs HF at batch 32 (>100 GB)
#   bash bench/gpu_issue10b.sh c8      (2026-12-06) the kernels on both sides of the long idle gaps, traces kept
#   bash bench/gpu_issue10b.sh c9      (2026-12-06) stacked projections under CUDA graphs vs split, and HF, batch 16
#   bash bench/gpu_issue10b.sh c10     (2026-12-06) bench/gla_check.py (our chunk_gla wrapper and one-kernel gate
#                                      against what they replace), the step's profile with the new defaults, the
#                                      trainer new vs old (-gatesplit-flachunk-mulclip) vs HF at batch 16, the old
#                                      step's profile last
#   bash bench/gpu_issue10b.sh c12     (2026-12-06) models.warm, bench/gla_check.py --sweep (gate kernel launches),
#                                      the trainer with the SwiGLU product kept, with CUDA graphs, and with graphs
#                                      and the stacked projections, vs HF at batch 16 (CASES overridable)
#   bash bench/gpu_issue10b.sh c13     (2026-12-06) models.warm, the step's profile with the final defaults, the
#                                      trainer (20 timed steps) against its -nokeepz variant, the session's starting
#                                      path (-gatesplit-flachunk-mulclip-nokeepz) and HF at batch 16
#   bash bench/gpu_issue10b.sh c14     (2026-12-06, an H200) models.warm, the trainer with the final defaults vs HF at
#                                      batch 32, then at batch 16 as far as the stage's time allows
#   bash bench/gpu_issue10b.sh c15     (2026-12-06) models.warm, bench/gla_check.py --only chunk (what chunk_gla keeps
#                                      for backward: fp32 states, bf16 states, none), models/kernels/gla_intra.py's
#                                      check and launch sweep, the trainer with each against HF at batch 16
#   bash bench/gpu_issue10b.sh c16     (2026-12-06) models.warm, models/kernels/gla_fwd_intra.py's check and sweep,
#                                      the trainer with the new chunk defaults (bf16 states, our intra kernel), with
#                                      our forward intra kernel too (-fwdintra), the FLA way (-hnone-flaintra) and HF
#                                      at batch 16, then bench/gla_check.py --only chunk with what time is left
#   bash bench/gpu_issue10b.sh c17     (2026-12-06) no models.warm: gla_fwd_intra's check, then gla_check --only chunk
#   bash bench/gpu_issue10b.sh c18     (2026-12-07) models.warm, the defaults vs HF at batch 16 and (>100 GB cards) 32,
#                                      then -fwdintra and -hnone-flaintra, gla_fwd_intra's check, gla_check --only chunk
#   bash bench/gpu_issue10b.sh c19     (2026-12-07) models.warm, the defaults vs HF at batch 16, the loss curve of the
#                                      defaults against autocast-fla (carry data/shk2048), then batch 32 on >100 GB cards
#   bash bench/gpu_issue10b.sh c20     (2026-12-07) models.warm (bf16 + autocast, fused + fla), the loss curve of the
#                                      defaults against autocast-fla, then the defaults vs HF at batch 16
#   bash bench/gpu_issue10b.sh c21     (2026-12-07) models.warm, models/kernels/mlp_gemm.py's check and sweep, the trainer
#                                      with SwiGLU in the MLP GEMMs (-mlpgemm) vs the defaults at batch 16, the profile
#   bash bench/gpu_issue10b.sh c22     (2026-12-07) models.warm, the defaults and -mlpgemm vs HF at batch 32 on >100 GB
#                                      cards (batch 16 on others), gla_check --only chunk
#   bash bench/gpu_issue10b.sh c23     (2026-12-07) models.warm, the loss curve of -mlpgemm (or RUNS) vs autocast-fla
#   bash bench/gpu_issue10b.sh c24     (2026-12-07) mlp_gemm's sweep with the persistent launches; where they beat the
#                                      unfused path, models.warm, -mlpgemm vs the defaults at batch 16, the profile
#   bash bench/gpu_issue10b.sh c25     (2026-12-07) models/kernels/cross_entropy.py's check and launch sweep against
#                                      FLA's fused cross entropy, bench/gemm_merge_bench.py, models.warm, the trainer
#                                      with the fastest launch (-ce) vs the defaults (FLA's loss), the merged
#                                      gate/up GEMM (-mlpmerged), our gated norm (-gnorm) and HF at batch 32 (>100
#                                      GB cards; 16 on others), the profile
#   bash bench/gpu_issue10b.sh c26     (2026-12-07) models.warm, bench/gla_check.py --only slab (the attention
#                                      projections' gradient as one slab: same loss bits?), the trainer -slab,
#                                      -slab-gnorm, -slab-oursdv-gnorm and -gnorm vs the defaults at batch 16 (as
#                                      run then; since, -slab-fladv is c26's -slab and -slab-gnorm its -slab-oursdv-gnorm)
#                                      (CASES16 overrides), then the profile with the slab, our gated norm and our
#                                      dv kernel (PROFILE=0 skips it)
#   bash bench/gpu_issue10b.sh c27     (2026-12-07) models.warm, the loss curve of the defaults (slab, our gated
#                                      norm) against the old (-split-flagnorm) (carry data/shk2048; ~6 min)
#   bash bench/gpu_issue10b.sh c28     (2026-12-07) models.warm (fp32 + bf16), the slab's and split's gradients
#                                      against the fp32 model's (gla_check --only slab)
#   bash bench/gpu_issue10b.sh c29     (2026-12-07) models.warm, the trainer with our dv kernel's intra product in
#                                      tf32x3 (-dvtf32x3) against the defaults at batch 16
#   bash bench/gpu_issue10b.sh c30     (2026-12-08) models.warm, the defaults vs the old step (-split-flagnorm) vs HF at
#                                      batch 32 on >100 GB cards (16 on others; CASES overrides), the profile and its
#                                      roofline (bench/roofline.py)
#   bash bench/gpu_issue10b.sh c32     (2026-12-08) models.warm, bench/path_check.py (each path's gradient against
#                                      autocast-fla's on one batch, a causality probe)
#   bash bench/gpu_issue10b.sh c33     (2026-12-08) c32 short: models.warm bf16, path_check bf16-fla vs bf16-fused, 6 layers
#                                      (~7 min cold on an H100)
#   bash bench/gpu_issue10b.sh c34     (2026-12-08) models.warm, the 300-step curve of the defaults against autocast-fla
#                                      with each run's final weights evaluated under both paths on held-out text
#                                      (bench/cross_eval.py; carry data/shk2048 and data/shk2048-val)
#   bash bench/gpu_issue10b.sh c35     (2026-12-08) models.warm, FSDP2 on one GPU with the on-device step against the
#                                      host-checked one (-hostcheck) and the one-process default, batch 16
#   bash bench/gpu_issue10b.sh c36     (2026-12-08) bench/tile_sweep.py: every config the autotuner may pick for each GLA
#                                      chunk kernel (ours and FLA's), compiled on this card, against GLA's recurrence
#                                      in float64 (no models.warm: it compiles each config itself)
#   bash bench/gpu_issue10b.sh c37     (2026-12-08) the gated output norm's backward launch: bench/norm_bench.py
#                                      --gated-bwd-sweep at GLA 340M's shapes (kept), then models.warm and the trainer
#                                      with its fastest launch (-gnbwd) between two runs of the defaults, batch 16
#                                      (a second call on the same machine where the sweep took the first)
#   bash bench/gpu_issue10b.sh c39     (2026-12-08) the untimed switches in one call: gla_check --only gate, models.warm,
#                                      then the trainer with -dvtf32x3 and with -approxlog between two runs of the
#                                      defaults, batch 16 (c29's trainer part, and the approximate log's; ~9.5 min on an H100)
#   bash bench/gpu_issue10b.sh x2a     (2026-12-07, TWO GPUs) models.warm, the trainer on 1 GPU, DDP on 2, FSDP2 on 1 and 2
#   bash bench/gpu_issue10b.sh x2b     (2026-12-07, TWO GPUs) kill + resume, DDP and FSDP2, on 2 and on 1 process
#   bash bench/gpu_issue10b.sh x2c     (2026-12-08, TWO GPUs, after x2a on the machine) FSDP2 on 2 GPUs with every
#                                      block kept gathered from forward to backward (fsdp_reshard_after_forward=false)
#   bash bench/gpu_issue10b.sh c11     (2026-12-06) each change on its own: the trainer with one of them reverted,
#                                      and with the SwiGLU product kept (-keepz), batch 16 (CASES overridable)
# all1 first on a fresh machine (it warms the kernels the other stages use); then the others within 30 s of each
# other so the machine and its Triton cache stay. b32 and curve are two calls, not one: on an H100 the three
# curve runs take ~5-6 min and the batch-32 cases ~3 min, together too close to the 10-minute call limit.
# Logs go to $OUT (default bench/out/gpu10b); each stage prints its JSON result lines last.
set -u
OUT=${OUT:-bench/out/gpu10b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.cache/triton
SHARDS=${SHARDS:-data/shk2048}   # real text: the embedded corpus at seq 2048 (see the stage curve)
M=configs/gla_340M.json
DEADLINE=$((SECONDS + ${STAGE_SECONDS:-575}))

# budget N: N seconds, or what is left of the stage less 5 s if that is less (at least 1)
budget() { local left=$((DEADLINE - SECONDS - 5)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
# the fastest launch of the sweep in a norm_bench --bwd-sweep log whose ds matched the default, as BT,WARPS,PER_SM,0|1
best_norm_bwd() {
  python3 -c "import json, sys
for line in open(sys.argv[1]):
    if line.startswith('SWEEP '):
        ok = [r['config'] for r in json.loads(line[6:])['results'] if r['same_ds']]
        c = ok[0]; print(f\"{c['bt']},{c['num_warps']},{c['per_sm']},{int(c['prefetch'])}\")" "$1"
}
# the same from a norm_bench --gated-bwd-sweep log (dx and dg equal to the default's), with its register cap
# (BT,WARPS,PER_SM,0|1,MAXNREG); empty if that is the default
best_gated_bwd() {
  python3 -c "import json, sys
for line in open(sys.argv[1]):
    if line.startswith('GATED_SWEEP '):
        ok = [r for r in json.loads(line[12:])['results'] if r['same']]
        c = ok[0]['config']  # nothing printed where the default is the fastest
        ok[0]['default'] or print(f\"{c['bt']},{c['num_warps']},{c['per_sm']},{int(c['prefetch'])},{c['maxnreg']}\")" "$1"
}
# from an mlp_gemm._gpu_check log: export MLP_GEMM_FWD / MLP_GEMM_BWD, the fastest launches whose values were right,
# and MLP_PICK, the fastest MLP path by them: "fused" (forward and backward through Triton), "bwd" (cuBLAS + the
# SwiGLU kernel forward, the backward fused) or "split" (unfused)
best_mlp_gemm() {
  local picks
  picks=$(python3 -c "import json, sys
rows = [json.loads(l[8:]) for l in open(sys.argv[1]) if l.startswith('MLPGEMM ')]
best = {}
for key, diff in (('fwd', 'z_diff'), ('bwd', 'dgate_diff')):
    ok = [r for r in rows if key + '_ms' in r and r[diff] < 2e-2]
    best[key] = min(ok, key=lambda r: r[key + '_ms']) if ok else None
    print(best[key]['text'] if ok else '')
bf, bb = best['fwd'], best['bwd']
if bf and bb:
    uf, ub = bf['fwd_ms'] * bf['fwd_vs_unfused'], bb['bwd_ms'] * bb['bwd_vs_unfused']
    paths = {'fused': bf['fwd_ms'] + bb['bwd_ms'], 'bwd': uf + bb['bwd_ms'], 'split': uf + ub}
    print(' '.join(f'{k} {v:.3f} ms' for k, v in paths.items()), file=sys.stderr)
    print(min(paths, key=paths.get))
else:
    print('split')" "$1" || printf '\n\nsplit\n')
  local fwd bwd; fwd=$(echo "$picks" | sed -n 1p); bwd=$(echo "$picks" | sed -n 2p)
  [ -n "$fwd" ] && export MLP_GEMM_FWD=$fwd; [ -n "$bwd" ] && export MLP_GEMM_BWD=$bwd
  export MLP_PICK; MLP_PICK=$(echo "$picks" | sed -n 3p)
  echo "mlp_gemm launches: forward ${MLP_GEMM_FWD:-default} backward ${MLP_GEMM_BWD:-default}; fastest path $MLP_PICK"
}
# gemm if the -mlpgemm case of a train_bench log ran more tokens/s than the defaults, else split
faster_mlp() {
  python3 -c "import json, sys
r = {}
for line in open(sys.argv[1]):
    if line.startswith('{'):
        row = json.loads(line); r[row['case']] = row['tokens_per_s']
base = next((v for k, v in r.items() if 'mlpgemm' not in k and k.startswith('ours')), 0)
gemm = max((v for k, v in r.items() if 'mlpgemm' in k), default=0)
print('gemm' if gemm > base else 'split')" "$1" 2>/dev/null || echo split
}
stamp() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" >&2; }
# the stages from c18 on are made of these
device() { python3 -c "import torch; print(torch.cuda.get_device_name())" 2>&1 | tail -1; }
big_card() { [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 100000 ]; }
need_shards() { [ -f "$SHARDS/manifest.json" ] || { echo "$1: no shards at $SHARDS (carry data/shk2048)" >&2; exit 2; }; }
warm() {  # PRECISIONS KERNELS SECONDS: models.warm at batch 16
  stamp "models.warm --precision $1 --kernels $2"
  timeout "$(budget "$3")" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision "$1" \
      --kernels "$2" > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
}
trainer_vs() {  # LOG BATCH STEPS WARMUP SECONDS CASES: bench/train_bench.py, its ratio and JSON lines
  stamp "train_bench batch $2: $6"
  timeout "$(budget "$5")" python3 bench/train_bench.py --batch "$2" --steps "$3" --warmup "$4" --cases "$6" \
      --dir bench/out/train > "$OUT/$1.log" 2>&1
  grep -h 'tokens/s:' "$OUT/$1.log"; grep -h '^{' "$OUT/$1.log" | cut -c1-330
}
kernel_checks() {  # SECONDS: gla_fwd_intra's check and sweep in SECONDS, then gla_check --only chunk (the kept states)
  stamp "gla_fwd_intra check"
  timeout "$(budget "$1")" python3 -c "from models.kernels import gla_fwd_intra; gla_fwd_intra._gpu_check()" \
      > "$OUT/fwd_intra.log" 2>&1
  grep -v Warning "$OUT/fwd_intra.log" | tail -20
  stamp "gla_check chunk"
  timeout "$(budget 200)" python3 bench/gla_check.py --only chunk --iters 10 > "$OUT/gla_check.log" 2>&1
  grep -v Warning "$OUT/gla_check.log" | tail -34
}
mlp_ab_profile() {  # the trainer -mlpgemm (or CASES) vs the defaults at batch 16, then the profile of the faster
  trainer_vs b16 16 16 4 170 "${CASES:-ours-bf16,ours-bf16-mlpgemm}"
  local mlp; mlp=$(faster_mlp "$OUT/b16.log")
  stamp "profile, mlp $mlp"
  timeout "$(budget 90)" python3 bench/gpu_profile.py --kernels fused --mlp "$mlp" --lag --timed 10 --steps 2 \
      --warmup 3 --top 30 --trace "$OUT/trace.json" > "$OUT/profile.log" 2>&1
  gzip -f "$OUT/trace.json" 2>/dev/null
  grep -h -A 16 'category' "$OUT/profile.log" | head -20; grep -h 'timed:\|host:' "$OUT/profile.log"
}
best_ce() {  # from a cross_entropy._gpu_check log: export CE_LAUNCH, the fastest launch whose values were right
  local pick
  pick=$(python3 -c "import json, sys
rows = [json.loads(l[3:]) for l in open(sys.argv[1]) if l.startswith('CE ')]
ok = [r for r in rows if 'ms' in r and r['grad_diff'] < 2e-2 and r['loss_diff'] < 1e-2]
print(min(ok, key=lambda r: r['ms'])['launch'] if ok else '')" "$1")
  [ -n "$pick" ] && export CE_LAUNCH=$pick
  echo "cross_entropy launch: ${CE_LAUNCH:-default}"
}
profile() {  # SECONDS: the step's profile with the defaults (batch 16, lagged loop), category table
  stamp "profile"
  timeout "$(budget "$1")" python3 bench/gpu_profile.py --kernels fused --lag --timed 10 --steps 2 --warmup 3 \
      --top 30 --trace "$OUT/trace.json" > "$OUT/profile.log" 2>&1
  gzip -f "$OUT/trace.json" 2>/dev/null
  grep -h -A 16 'category' "$OUT/profile.log" | head -20; grep -h 'timed:\|host:' "$OUT/profile.log"
  timeout "$(budget 60)" python3 bench/roofline.py --from-trace "$OUT/trace.json.gz" --steps 2 2>&1 | grep -v -i warn
}
curve() {  # SECONDS [RUNS]: 300-step loss curves, the defaults (bf16-fused; or RUNS) against autocast-fla
  stamp "precision_curve"
  timeout "$(budget "$1")" python3 bench/precision_curve.py --shards "$SHARDS" --steps 300 --batch 16 \
      --runs "autocast-fla,${2:-bf16-fused}" --dir bench/out/precision > "$OUT/curve.log" 2>&1
  cp bench/out/precision/curves.json "$OUT/" 2>/dev/null
  sed -n '/^vs /,$p' "$OUT/curve.log"; grep -h '^{' "$OUT/curve.log"; tail -2 "$OUT/curve.log"
}

case "${1:-}" in
all1)
  python3 -c "import torch, triton, fla; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, \
'fla', fla.__version__)" 2>&1 | tail -1
  stamp "models.warm"
  timeout "$(budget 240)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16,autocast \
      --kernels fused,fla > "$OUT/warm.log" 2>&1
  tail -2 "$OUT/warm.log"
  if [ -f bench/norm_bench.py ]; then
    stamp "norm_bench"
    timeout "$(budget 45)" python3 bench/norm_bench.py > "$OUT/norm.log" 2>&1 || echo "norm_bench: exit $?"
  else
    echo "norm_bench: bench/norm_bench.py not in this checkout, skipped" > "$OUT/norm.log"
  fi
  stamp "train_bench batch 16"
  timeout "$(budget 200)" python3 bench/train_bench.py --batch 16 --steps 15 --warmup 5 \
      --cases ours-bf16,ours-bf16-fla,hf --dir bench/out/train > "$OUT/b16.log" 2>&1
  stamp "gpu_profile fused"
  timeout "$(budget 95)" python3 bench/gpu_profile.py --kernels fused --precision bf16 --steps 3 --warmup 3 \
      --trace "$OUT/trace-fused.json" > "$OUT/profile.log" 2>&1
  gzip -f "$OUT"/trace-*.json 2>/dev/null
  stamp "done"
  tail -30 "$OUT/norm.log"
  grep -v -e '^warm-up' -e Warning -e warn "$OUT/profile.log" | tail -50
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log"
  ;;
ab)
  # the second round (2026-12-02): our SwiGLU/gate kernels against FLA's inside the fused step, then the trainer at
  # batch 16 and 32 against HF, all after one warm-up
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16,autocast \
      --kernels fused,fla > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "elementwise_bench"
  timeout "$(budget 40)" python3 bench/elementwise_bench.py > "$OUT/elementwise.log" 2>&1 || echo "elementwise_bench: exit $?"
  for sw in fla ours; do
    stamp "gpu_profile fused, swiglu $sw"
    timeout "$(budget 60)" python3 bench/gpu_profile.py --kernels fused --swiglu $sw --timed 15 --steps 2 --warmup 3 \
        --top 12 --trace "$OUT/trace-$sw.json" > "$OUT/profile-$sw.log" 2>&1
  done
  rm -f "$OUT"/trace-*.json
  stamp "train_bench batch 16"
  timeout "$(budget 150)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ours-bf16,ours-bf16-fla,hf --dir bench/out/train > "$OUT/b16.log" 2>&1
  stamp "train_bench batch 32"
  timeout "$(budget 170)" python3 bench/train_bench.py --batch 32 --steps 8 --warmup 3 \
      --cases ours-bf16,hf --dir bench/out/train > "$OUT/b32.log" 2>&1
  stamp "done"
  grep -E "RESULT|ours|fla|torch" "$OUT/elementwise.log" | tail -12
  for sw in fla ours; do grep -E "^timed|^[A-Za-z].* [0-9.]+ +[0-9.]+%|outside" "$OUT/profile-$sw.log"; done
  grep -h 'tokens/s:' "$OUT/b16.log" "$OUT/b32.log"; grep -h '^{' "$OUT/b16.log" "$OUT/b32.log" | cut -c1-400
  ;;
graphs)
  # train.cuda_graphs (2026-12-05): the same numbers as the eager step (graph_check: eager twice for the noise
  # floor, graphs, 2 micro-batches, activation checkpointing), then the trainer with and without graphs against HF
  # at batch 16, and at batch 32 where the card holds it (HF's autocast path took 79 GiB there)
  stamp "models.warm"
  timeout "$(budget 150)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "graph_check"
  timeout "$(budget 170)" python3 bench/graph_check.py --steps 8 --warmup 3 \
      --runs eager,eager,graphs,eager-mb2,graphs-mb2,eager-ac,graphs-ac > "$OUT/graph_check.log" 2>&1 \
      || echo "graph_check: exit $?"
  stamp "train_bench batch 16"
  timeout "$(budget 170)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ours-bf16,ours-bf16-graphs,hf --dir bench/out/train > "$OUT/b16.log" 2>&1
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  if [ "${mem:-0}" -gt 100000 ]; then
    stamp "train_bench batch 32"
    timeout "$(budget 200)" python3 bench/train_bench.py --batch 32 --steps 8 --warmup 3 \
        --cases ours-bf16-graphs,ours-bf16,hf --dir bench/out/train > "$OUT/b32.log" 2>&1
  else
    echo "batch 32 skipped: ${mem} MiB on this card" > "$OUT/b32.log"
  fi
  stamp "done"
  grep -v -i -e warn "$OUT/graph_check.log" | tail -14
  grep -h 'tokens/s:' "$OUT/b16.log" "$OUT/b32.log"; grep -h '^{' "$OUT/b16.log" "$OUT/b32.log" | cut -c1-420
  tail -3 "$OUT/b32.log"
  ;;
b32)
  stamp "train_bench batch 32"
  timeout "$(budget 330)" python3 bench/train_bench.py --batch 32 --steps 10 --warmup 4 \
      --cases ours-bf16,ours-bf16-fla,hf --dir bench/out/train > "$OUT/b32.log" 2>&1
  stamp "done"
  grep -h 'tokens/s:' "$OUT/b32.log"; grep -h '^{' "$OUT/b32.log"
  ;;
curve)
  if [ ! -f "$SHARDS/manifest.json" ]; then
    echo "curve: no shards at $SHARDS: build them here with" \
         "python -m shardgen train-tokenizer data/shakespeare --output data/tokenizer && python -m shardgen" \
         "data/shakespeare --output data/shk2048 --tokenizer data/tokenizer --seq-len 2048, then carry data/shk2048" >&2
    exit 2
  fi
  stamp "models.warm"   # a cold machine autotunes in the first run otherwise (minutes, inside its timing)
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16,autocast \
      --kernels fused,fla > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "precision_curve"
  timeout "$(budget 570)" python3 bench/precision_curve.py --shards "$SHARDS" --steps 300 --batch 16 \
      --runs autocast-fla,autocast-fla,bf16-fused --dir bench/out/precision > "$OUT/curve.log" 2>&1
  stamp "done"
  sed -n '/^vs /,$p' "$OUT/curve.log"; grep -h '^{' "$OUT/curve.log"
  ;;
c1)
  # 2026-12-05: the loop reads step N's loss after queueing step N+1 (PendingStep); -sync is the loop before that,
  # as the same-call baseline, eager and with train.cuda_graphs, against HF at batch 16 and 32 (>100 GB cards)
  python3 -c "import torch, triton, fla; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, \
'fla', fla.__version__)" 2>&1 | tail -1
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16,autocast \
      --kernels fused,fla > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "train_bench batch 16"
  timeout "$(budget 170)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ours-bf16-sync,ours-bf16,ours-bf16-graphs,hf --dir bench/out/train > "$OUT/b16.log" 2>&1
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  if [ "${mem:-0}" -gt 100000 ]; then
    stamp "train_bench batch 32"
    timeout "$(budget 230)" python3 bench/train_bench.py --batch 32 --steps 8 --warmup 3 \
        --cases ours-bf16-sync,ours-bf16,ours-bf16-graphs,hf --dir bench/out/train > "$OUT/b32.log" 2>&1
  else
    echo "batch 32 skipped: ${mem} MiB on this card" > "$OUT/b32.log"
  fi
  stamp "done"
  grep -h 'tokens/s:' "$OUT/b16.log" "$OUT/b32.log"; grep -h '^{' "$OUT/b16.log" "$OUT/b32.log" | cut -c1-420
  tail -2 "$OUT/b32.log"
  ;;
c2)
  # the seed noise floor of the loss curve: two autocast runs are bitwise equal on one machine, so the spread of the
  # training itself is measured from another init (autocast-fla@1), against which bf16-fused's gap is read
  if [ ! -f "$SHARDS/manifest.json" ]; then echo "c2: no shards at $SHARDS (carry data/shk2048)" >&2; exit 2; fi
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16,autocast \
      --kernels fused,fla > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "precision_curve"
  timeout "$(budget 570)" python3 bench/precision_curve.py --shards "$SHARDS" --steps 300 --batch 16 \
      --runs autocast-fla,autocast-fla@1,bf16-fused --dir bench/out/precision > "$OUT/curve.log" 2>&1
  cp bench/out/precision/curves.json "$OUT/" 2>/dev/null
  stamp "done"
  sed -n '/^vs /,$p' "$OUT/curve.log"; grep -h '^{' "$OUT/curve.log"; tail -2 "$OUT/curve.log"
  ;;
c3)
  # the step with the sweep's fastest RMSNorm backward launch against the default (c1's sweep where this machine
  # ran c1, else the sweep runs here first)
  if [ ! -s bench/out/gpu10c/norm_bwd_best ]; then
    stamp "models.warm"
    timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
        --kernels fused > "$OUT/warm.log" 2>&1
    tail -1 "$OUT/warm.log"
    stamp "norm_bench --bwd-sweep"
    mkdir -p bench/out/gpu10c
    timeout "$(budget 100)" python3 bench/norm_bench.py --bwd-sweep --iters 15 > "$OUT/sweep.log" 2>&1
    best_norm_bwd "$OUT/sweep.log" > bench/out/gpu10c/norm_bwd_best
    grep -E "^backward|^  bt" "$OUT/sweep.log" | head -12; grep -E "default|DIFFERENT|failed" "$OUT/sweep.log" | head -5
  fi
  best=$(cat bench/out/gpu10c/norm_bwd_best)
  for cfg in default "$best"; do
    stamp "gpu_profile, RMSNorm backward $cfg"
    extra=(); [ "$cfg" != default ] && extra=(--norm-bwd "$cfg")
    timeout "$(budget 70)" python3 bench/gpu_profile.py --kernels fused --timed 15 --steps 2 --warmup 3 --top 20 \
        "${extra[@]}" --trace "$OUT/trace.json" > "$OUT/profile-${cfg//,/_}.log" 2>&1
  done
  rm -f "$OUT"/trace.json
  stamp "done"
  for f in "$OUT"/profile-*.log; do echo "== $f"; grep -E "RMSNorm backward|^timed|^[A-Za-z].* [0-9.]+ +[0-9.]+%|outside" "$f"; done
  grep -A22 "^top 20" "$OUT/profile-default.log"
  ;;
c5)
  # 2026-12-06: where the GPU idles between kernels (gpu_profile's gap table), each step read at once and read after
  # the next step's launch (--lag, as the trainer's loop): ~9 ms a step separate the step from its kernel time
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  for mode in sync lag; do
    stamp "gpu_profile $mode"
    extra=(); [ "$mode" = lag ] && extra=(--lag)
    timeout "$(budget 80)" python3 bench/gpu_profile.py --kernels fused --timed 15 --steps 3 --warmup 3 --top 0 \
        "${extra[@]}" --trace "$OUT/trace.json" > "$OUT/profile-$mode.log" 2>&1
  done
  rm -f "$OUT"/trace.json
  stamp "done"
  for f in "$OUT"/profile-*.log; do echo "== $f"; grep -v -i -e warn -e '^warm-up' "$f" | tail -22; done
  ;;
c6)
  # 2026-12-06: the attention's five input projections as one GEMM over the stacked weights (cat) against one GEMM
  # each (split), in the profile of the step as the loop runs it (--lag; with c5's idle-gap table) and in the
  # trainer against HF at batch 16
  python3 -c "import torch, triton, fla; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, \
'fla', fla.__version__)" 2>&1 | tail -1
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  for proj in split cat; do
    stamp "gpu_profile --lag, projections $proj"
    timeout "$(budget 75)" python3 bench/gpu_profile.py --kernels fused --projections $proj --lag --timed 15 \
        --steps 3 --warmup 3 --top 24 --trace "$OUT/trace.json" > "$OUT/profile-$proj.log" 2>&1
  done
  rm -f "$OUT"/trace.json
  stamp "train_bench batch 16"
  timeout "$(budget 200)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ours-bf16-split,ours-bf16-cat,hf --dir bench/out/train > "$OUT/b16.log" 2>&1
  stamp "done"
  for f in "$OUT"/profile-*.log; do echo "== $f"; grep -v -i -e warn -e '^warm-up' -e '^  _warn' "$f" | head -32; done
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-420
  tail -3 "$OUT/b16.log"
  ;;
c7)
  # 2026-12-06: c6 found the stacked projections' GPU time 2.6 ms lower and the step 3.4 ms slower: is the host
  # pacing the GPU? The step as the loop runs it (--lag), eager, with CUDA graphs, and eager with the stacked
  # projections: the host's time to queue a step, the idle gaps and the kernels that end them; then the trainer
  # against HF at batch 32 (>100 GB cards)
  python3 -c "import torch, triton, fla; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, \
'fla', fla.__version__)" 2>&1 | tail -1
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  for mode in eager graphs eager-cat; do
    stamp "gpu_profile --lag $mode"
    extra=(); [ "$mode" = graphs ] && extra=(--graphs); [ "$mode" = eager-cat ] && extra=(--projections cat)
    timeout "$(budget 70)" python3 bench/gpu_profile.py --kernels fused --lag --timed 15 --steps 3 --warmup 3 \
        --top 0 "${extra[@]}" --trace "$OUT/trace.json" > "$OUT/profile-$mode.log" 2>&1
  done
  rm -f "$OUT"/trace.json
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  b=16; [ "${mem:-0}" -gt 100000 ] && b=32
  stamp "train_bench batch $b"
  timeout "$(budget 260)" python3 bench/train_bench.py --batch $b --steps 8 --warmup 3 \
      --cases ours-bf16,ours-bf16-graphs,hf --dir bench/out/train > "$OUT/b$b.log" 2>&1
  stamp "done"
  for f in "$OUT"/profile-*.log; do echo "== $f"; grep -v -i -e warn -e '^warm-up' -e '^  _warn' "$f" | head -40; done
  grep -h 'tokens/s:' "$OUT/b$b.log"; grep -h '^{' "$OUT/b$b.log" | cut -c1-420
  tail -3 "$OUT/b$b.log"
  ;;
c8)
  # 2026-12-06: c7 found ~80 us idle before each _logsig_bwd_kernel and before memsets, under CUDA graphs too (so not
  # the host): which kernel ends before those gaps
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  for mode in eager graphs; do
    stamp "gpu_profile --lag $mode"
    extra=(); [ "$mode" = graphs ] && extra=(--graphs)
    timeout "$(budget 70)" python3 bench/gpu_profile.py --kernels fused --lag --timed 8 --steps 2 --warmup 3 \
        --top 0 "${extra[@]}" --trace "$OUT/trace-$mode.json" > "$OUT/profile-$mode.log" 2>&1
  done
  gzip -f "$OUT"/trace-*.json 2>/dev/null
  stamp "done"
  for f in "$OUT"/profile-*.log; do echo "== $f"; grep -v -i -e warn -e '^warm-up' -e '^  _warn' "$f" | tail -22; done
  ls -la "$OUT"
  ;;
c9)
  # 2026-12-06: c8 showed the eager step GPU-bound (graphs leave 3 ms idle of ~183); the stacked projections cut
  # ~6.6 ms of kernels but paced the eager step by the host. Under CUDA graphs the host is out of the way
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "train_bench batch 16"
  timeout "$(budget 230)" python3 bench/train_bench.py --batch 16 --steps 10 --warmup 3 \
      --cases ${CASES:-ours-bf16-graphs,ours-bf16-cat-graphs,hf} --dir bench/out/train > "$OUT/b16.log" 2>&1
  stamp "done"
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-420
  tail -3 "$OUT/b16.log"
  ;;
c10)
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "gla_check"
  timeout "$(budget 90)" python3 bench/gla_check.py > "$OUT/gla_check.log" 2>&1
  cat "$OUT/gla_check.log" | tail -25
  stamp "profile, new defaults"
  timeout "$(budget 90)" python3 bench/gpu_profile.py --kernels fused --lag --timed 15 --steps 2 --warmup 3 --top 30 \
      --trace "$OUT/trace-new.json" > "$OUT/profile-new.log" 2>&1
  gzip -f "$OUT/trace-new.json" 2>/dev/null
  grep -h -A 16 'category' "$OUT/profile-new.log" | head -40; grep -h 'timed:\|host:' "$OUT/profile-new.log"
  stamp "train_bench batch 16"
  timeout "$(budget 240)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ${CASES:-ours-bf16,ours-bf16-gatesplit-flachunk-mulclip,hf} --dir bench/out/train > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-420
  tail -3 "$OUT/b16.log"
  stamp "profile, old path"
  timeout "$(budget 80)" python3 bench/gpu_profile.py --kernels fused --gate split --chunk fla --mulclip --lag \
      --timed 15 --steps 2 --warmup 3 --top 0 --trace "$OUT/trace-old.json" > "$OUT/profile-old.log" 2>&1
  rm -f "$OUT/trace-old.json"
  grep -h -A 16 'category' "$OUT/profile-old.log" | head -40; grep -h 'timed:\|host:' "$OUT/profile-old.log"
  stamp "done"
  ;;
c12)
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "gla_check --sweep"
  timeout "$(budget 150)" python3 bench/gla_check.py --sweep > "$OUT/gla_check.log" 2>&1
  grep -v Warning "$OUT/gla_check.log" | tail -45
  stamp "train_bench batch 16"
  timeout "$(budget 330)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ${CASES:-ours-bf16,ours-bf16-keepz,ours-bf16-graphs,ours-bf16-cat-graphs,hf} --dir bench/out/train \
      > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-420
  tail -3 "$OUT/b16.log"
  stamp "done"
  ;;
c13)
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "profile, final defaults"
  timeout "$(budget 90)" python3 bench/gpu_profile.py --kernels fused --lag --timed 15 --steps 2 --warmup 3 --top 30 \
      --trace "$OUT/trace.json" > "$OUT/profile.log" 2>&1
  gzip -f "$OUT/trace.json" 2>/dev/null
  grep -h -A 16 'category' "$OUT/profile.log" | head -20; grep -h 'timed:\|host:' "$OUT/profile.log"
  stamp "train_bench batch 16"
  timeout "$(budget 330)" python3 bench/train_bench.py --batch 16 --steps 20 --warmup 4 \
      --cases ${CASES:-ours-bf16,ours-bf16-nokeepz,ours-bf16-gatesplit-flachunk-mulclip-nokeepz,hf} \
      --dir bench/out/train > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-600
  stamp "done"
  ;;
c14)
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 32 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "train_bench batch 32"
  timeout "$(budget 200)" python3 bench/train_bench.py --batch 32 --steps 8 --warmup 3 --cases ours-bf16,hf \
      --dir bench/out/train > "$OUT/b32.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b32.log"; grep -h '^{' "$OUT/b32.log" | cut -c1-600
  stamp "train_bench batch 16"
  timeout "$(budget 200)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 --cases ours-bf16,hf \
      --dir bench/out/train > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-600
  stamp "done"
  ;;
c15)
  python3 -c "import torch; print(torch.cuda.get_device_name())" 2>&1 | tail -1
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "gla_check chunk"
  timeout "$(budget 90)" python3 bench/gla_check.py --only chunk --iters 20 > "$OUT/gla_check.log" 2>&1
  grep -v Warning "$OUT/gla_check.log" | tail -24
  stamp "gla_intra check"
  timeout "$(budget 100)" python3 -c "from models.kernels import gla_intra; gla_intra._gpu_check()" \
      > "$OUT/intra.log" 2>&1
  grep -v Warning "$OUT/intra.log" | tail -22
  stamp "train_bench batch 16"
  timeout "$(budget 400)" python3 bench/train_bench.py --batch 16 --steps 16 --warmup 4 \
      --cases ${CASES:-ours-bf16-hnone,ours-bf16,ours-bf16-hbf16,ours-bf16-hbf16-intra,hf} --dir bench/out/train \
      > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-600
  stamp "done"
  ;;
c16)
  python3 -c "import torch; print(torch.cuda.get_device_name())" 2>&1 | tail -1
  stamp "models.warm"
  timeout "$(budget 200)" python3 -m models.warm --model $M --seq-len 2048 --batch 16 --precision bf16 \
      --kernels fused > "$OUT/warm.log" 2>&1
  tail -1 "$OUT/warm.log"
  stamp "gla_fwd_intra check"
  timeout "$(budget 60)" python3 -c "from models.kernels import gla_fwd_intra; gla_fwd_intra._gpu_check()" \
      > "$OUT/fwd_intra.log" 2>&1
  grep -v Warning "$OUT/fwd_intra.log" | tail -20
  stamp "train_bench batch 16"
  timeout "$(budget 330)" python3 bench/train_bench.py --batch 16 --steps 16 --warmup 4 \
      --cases ${CASES:-ours-bf16,hf,ours-bf16-hnone-flaintra,ours-bf16-fwdintra} --dir bench/out/train \
      > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-330
  stamp "gla_check chunk"
  timeout "$(budget 200)" python3 bench/gla_check.py --only chunk --iters 20 > "$OUT/gla_check.log" 2>&1
  grep -v Warning "$OUT/gla_check.log" | tail -34
  stamp "done"
  ;;
c17)
  # kernels only, no models.warm (for a call with little device time): gla_fwd_intra's check and sweep, then the
  # chunk's bit-for-bit check of the kept states with what time is left
  python3 -c "import torch; print(torch.cuda.get_device_name())" 2>&1 | tail -1
  kernel_checks 80
  stamp "done"
  ;;
c18)
  # (2026-12-07) the defaults against HF at batch 16, at batch 32 where the card holds HF's 82.7 GiB, then our forward
  # intra kernel and the FLA way in the step, then the kernel checks with what is left (warms both paths: c19 did not)
  device
  warm bf16,autocast fused,fla 200
  trainer_vs b16 16 16 4 150 ours-bf16,hf
  if big_card; then trainer_vs b32 32 8 3 170 ours-bf16,hf; else echo "batch 32 skipped: HF needs > 80 GB"; fi
  trainer_vs b16v 16 16 4 150 "${CASES:-ours-bf16-fwdintra,ours-bf16-hnone-flaintra}"
  kernel_checks 60
  stamp "done"
  ;;
c19)
  # (2026-12-07, as run) one call for what matters most if it is the only one: the defaults against HF at batch 16,
  # the loss curve of the defaults against the fp32-weights autocast path, then batch 32 against HF where the card
  # holds HF's 82.7 GiB. It warms bf16 only: HF's and the reference's FLA kernels under autocast then autotune inside
  # the timed stages (c20 is the fix)
  need_shards c19
  device
  warm bf16 fused 200
  trainer_vs b16 16 16 4 150 ours-bf16,hf
  curve 260
  if big_card; then trainer_vs b32 32 8 3 170 ours-bf16,hf; else echo "batch 32 skipped: HF needs > 80 GB"; fi
  stamp "done"
  ;;
c20)
  # (2026-12-07) models.warm for both paths, the loss curve of the defaults against autocast-fla, then HF at batch 16
  need_shards c20
  device
  warm bf16,autocast fused,fla 170
  curve 240
  trainer_vs b16 16 12 3 170 ours-bf16,hf
  stamp "done"
  ;;
c21)
  # (2026-12-07) models.warm (bf16), models/kernels/mlp_gemm.py's check and launch sweep (SwiGLU in the MLP GEMMs'
  # epilogues against cuBLAS + the SwiGLU kernels), the trainer with its fastest launches (-mlpgemm) against the
  # defaults at batch 16, then the step's profile with whichever was faster (HF: c22)
  device
  warm bf16 fused 170
  stamp "mlp_gemm check"
  timeout "$(budget 110)" python3 -m models.kernels.mlp_gemm > "$OUT/mlp_gemm.log" 2>&1
  grep -v Warning "$OUT/mlp_gemm.log" | tail -16
  best_mlp_gemm "$OUT/mlp_gemm.log"
  mlp_ab_profile
  stamp "done"
  ;;
c22)
  # (2026-12-07) models.warm (both paths), the defaults and -mlpgemm against HF at batch 32 on >100 GB cards (batch 16
  # on others), then gla_check --only chunk; set MLP_GEMM_FWD / MLP_GEMM_BWD to c21's pick
  device
  warm bf16,autocast fused,fla 170
  if big_card; then trainer_vs b32 32 8 3 250 "${CASES32:-ours-bf16,ours-bf16-mlpgemm,hf}"
  else trainer_vs b16 16 16 4 200 "${CASES16:-ours-bf16,ours-bf16-mlpgemm,hf}"; fi
  stamp "gla_check chunk"
  timeout "$(budget 120)" python3 bench/gla_check.py --only chunk --iters 10 > "$OUT/gla_check.log" 2>&1
  grep -v Warning "$OUT/gla_check.log" | tail -34
  stamp "done"
  ;;
c24)
  # (2026-12-07) the persistent launches of models/kernels/mlp_gemm.py (one program per SM, TMA stores, the next
  # tile's loads under this one's epilogue) in its sweep; where the fastest correct ones beat cuBLAS + the SwiGLU
  # kernels (both ways, or backward only: MLP_GEMM_FORWARD=cublas), the trainer with them (-mlpgemm) against the
  # defaults at batch 16 and the profile of the faster
  device
  stamp "mlp_gemm check"
  timeout "$(budget 150)" python3 -m models.kernels.mlp_gemm > "$OUT/mlp_gemm.log" 2>&1
  grep -v Warning "$OUT/mlp_gemm.log" | grep -v '^MLPGEMM' | tail -4
  grep '^MLPGEMM' "$OUT/mlp_gemm.log" | python3 -c "import json, sys
for l in sys.stdin:
    r = json.loads(l[8:]); print(r['text'], {k: v for k, v in r.items() if k not in ('config', 'text')})"
  best_mlp_gemm "$OUT/mlp_gemm.log"
  if [ "$MLP_PICK" != split ]; then
    [ "$MLP_PICK" = bwd ] && export MLP_GEMM_FORWARD=cublas
    warm bf16 fused 170
    mlp_ab_profile
  fi
  stamp "done"
  ;;
c25)
  # (2026-12-07) the LM head and its loss as one function, the logits' gradient written in forward
  # (models/kernels/cross_entropy.py): its check and launch sweep against FLA's fused cross entropy, then with the
  # fastest right launch (CE_LAUNCH) the trainer with it (-ce) against the defaults (FLA's head and loss), the MLP's
  # gate and up as one GEMM (-mlpmerged; bench/gemm_merge_bench.py times the GEMMs alone first), GLA's gated output
  # norm by models/kernels/gated_norm.py (-gnorm) and HF, batch 32 on >100 GB cards (16 on others), then the profile
  # (CASES16 / CASES32 override the cases, without hf only bf16 is warmed; PROFILE=0 skips the profile)
  device
  stamp "cross_entropy check"
  timeout "$(budget 100)" python3 -m models.kernels.cross_entropy > "$OUT/ce.log" 2>&1
  grep -v Warning "$OUT/ce.log" | tail -16
  best_ce "$OUT/ce.log"
  stamp "gemm_merge_bench"
  timeout "$(budget 40)" python3 bench/gemm_merge_bench.py > "$OUT/gemm_merge.log" 2>&1
  grep -v Warning "$OUT/gemm_merge.log" | tail -3
  local_cases=${CASES16:-ours-bf16,ours-bf16-ce,ours-bf16-mlpmerged,ours-bf16-gnorm,hf}
  big_card && local_cases=${CASES32:-ours-bf16,ours-bf16-ce,ours-bf16-mlpmerged,ours-bf16-gnorm,hf}
  case ",$local_cases," in *,hf,*) warm bf16,autocast fused,fla 170 ;; *) warm bf16 fused 130 ;; esac
  if big_card; then trainer_vs b32 32 8 3 290 "$local_cases"
  else trainer_vs b16 16 12 3 230 "$local_cases"; fi
  [ "${PROFILE:-1}" = 1 ] && profile 90
  stamp "done"
  ;;
c26)
  # (2026-12-07) fused.install(projections="slab"): the attention's five projections keep one GEMM each forward;
  # backward, the chunk kernels and our gated norm write dq, dk, dv, dg into the column blocks of one gradient and
  # dx and the stacked dW are one GEMM each (bench/gemm_merge_bench.py: 0.256 ms a layer less GEMM time)
  device
  warm bf16 fused 150
  stamp "gla_check --only slab"
  timeout "$(budget 100)" python3 bench/gla_check.py --only slab > "$OUT/slab_check.log" 2>&1
  grep -v Warning "$OUT/slab_check.log" | tail -5
  trainer_vs b16 16 20 3 270 "${CASES16:-ours-bf16,ours-bf16-slab-fladv,ours-bf16-slab-fladv-gnorm,ours-bf16-slab-gnorm,ours-bf16-gnorm}"
  if [ "${PROFILE:-1}" = 1 ]; then
    stamp "profile, slab + our gated norm"
    timeout "$(budget 90)" python3 bench/gpu_profile.py --kernels fused --projections slab --gated-norm ours --dv ours --lag \
        --timed 10 --steps 2 --warmup 3 --top 30 --trace "$OUT/trace.json" > "$OUT/profile.log" 2>&1
    gzip -f "$OUT/trace.json" 2>/dev/null
    grep -h -A 16 'category' "$OUT/profile.log" | head -20; grep -h 'timed:\|host:' "$OUT/profile.log"
  fi
  stamp "done"
  ;;
c27)
  # (2026-12-07) the loss curve of the new defaults (projections="slab", our gated norm, our dv kernel) against the
  # old (-split-flagnorm), 300 steps on real text, batch 16 (RUNS overrides). On an H100 each run takes ~2.5 min
  # with its start: the whole stage needs ~6 min (the first try, inside 400 s with the check below, ran out)
  need_shards c27
  device
  warm bf16 fused 120
  stamp "precision_curve"
  timeout "$(budget 480)" python3 bench/precision_curve.py --shards "$SHARDS" --steps 300 --batch 16 \
      --runs "${RUNS:-bf16-fused-split-flagnorm,bf16-fused}" --dir bench/out/precision > "$OUT/curve.log" 2>&1
  cp bench/out/precision/curves.json "$OUT/" 2>/dev/null
  sed -n '/^vs /,$p' "$OUT/curve.log" | head -30; grep -h '^{' "$OUT/curve.log"; tail -2 "$OUT/curve.log"
  stamp "done"
  ;;
c28)
  # (2026-12-07) the slab's and split's bf16 gradients each against the fp32 model's (bench/gla_check.py --only
  # slab, batch 8). fp32 runs other kernel variants than bf16: warmed first (cold, their autotuning took the first
  # try's whole 170 s)
  device
  warm fp32,bf16 fused 200
  stamp "gla_check --only slab"
  timeout "$(budget 300)" python3 bench/gla_check.py --only slab --batch 8 --slab-cases "${SLAB_CASES:-ours:fla,ours:ours}" \
      > "$OUT/slab_check.log" 2>&1
  grep -v Warning "$OUT/slab_check.log" | tail -4
  stamp "done"
  ;;
c29)
  # (2026-12-07) our dv kernel's intra-chunk product A^T do in tf32x3 (three tensor-core products, ~fp32 accuracy)
  # instead of fp32 FMAs: the profile put the kernel at 0.31 ms a layer on an H100 (c26), and that product is most
  # of its math. The trainer -dvtf32x3 against the defaults at batch 16, 20 timed steps
  device
  warm bf16 fused 150
  trainer_vs b16 16 20 3 200 "${CASES16:-ours-bf16,ours-bf16-dvtf32x3}"
  stamp "done"
  ;;
c30)
  # (2026-12-08) the defaults (slab, our gated norm, our dv kernel, vector stores) against the old step
  # (-split-flagnorm) and HF at batch 32 on >100 GB cards (16 on others), then the profile and its roofline
  # (bench/roofline.py: each memory-bound kernel against the card's bandwidth, the floor of the outside share)
  device
  local_cases=${CASES:-ours-bf16,ours-bf16-split-flagnorm,hf}
  case ",$local_cases," in *,hf,*) warm bf16,autocast fused,fla 170 ;; *) warm bf16 fused 130 ;; esac
  if big_card; then trainer_vs b32 32 8 3 290 "$local_cases"
  else trainer_vs b16 16 16 3 230 "$local_cases"; fi
  [ "${PROFILE:-1}" = 1 ] && profile 90
  stamp "done"
  ;;
c32)
  # (2026-12-08) bench/path_check.py: one forward + backward of autocast-fla, bf16-fla, the defaults and the old
  # defaults on the same weights and tokens, each parameter's gradient against autocast-fla's, and a causality probe
  # (the 300-step curve of c31 ended 2.2% below autocast-fla; 60-step curves put the old defaults below it too)
  device
  warm bf16,autocast fused,fla 200
  stamp "path_check"
  timeout "$(budget 300)" python3 bench/path_check.py --runs "${RUNS:-autocast-fla,bf16-fla,bf16-fused,bf16-fused-split-flagnorm}" \
      --dir bench/out/path_check > "$OUT/path_check.log" 2>&1
  grep -v -i warn "$OUT/path_check.log" | tail -24
  stamp "done"
  ;;
c33)
  # (2026-12-08) the short form of c32: our fused blocks against FLA's modules, both on bf16 weights, GLA 340M's
  # shapes with 6 layers (the same kernels and autotune keys, a quarter of the gradients). ~7 min on a fresh H100:
  # its models.warm did not finish in 150 s there (2026-12-07: 8 processes fit its memory, not 16)
  device
  warm bf16 fused,fla 230
  python3 -c "import json; c = json.load(open('$M')); c['num_hidden_layers'] = 6; json.dump(c, open('/tmp/gla6.json', 'w'))"
  stamp "path_check"
  timeout "$(budget 200)" python3 bench/path_check.py --runs "${RUNS:-bf16-fla,bf16-fused}" --model /tmp/gla6.json \
      --dir bench/out/path_check > "$OUT/path_check.log" 2>&1
  grep -v -i warn "$OUT/path_check.log" | tail -16
  stamp "done"
  ;;
c34)
  # (2026-12-08) the curve question by one yardstick: autocast-fla and the defaults trained 300 steps as in c31, then
  # every run's final weights scored under both forwards on the held-out shards (make shards' -val output). Better
  # weights score lower under autocast-fla's forward too; weights from a forward that leaks later tokens score well only
  # under their own. RUNS and STEPS (300) override
  need_shards c34
  [ -f "$SHARDS-val/manifest.json" ] || { echo "c34: no held-out shards at $SHARDS-val (carry them)" >&2; exit 2; }
  device
  warm bf16,autocast fused,fla 170
  stamp "precision_curve + cross_eval"
  timeout "$(budget 560)" python3 bench/precision_curve.py --shards "$SHARDS" --steps "${STEPS:-300}" --batch 16 \
      --runs "${RUNS:-autocast-fla,bf16-fused}" --dir bench/out/precision --eval-shards "$SHARDS-val" \
      --eval-sequences 16 > "$OUT/curve.log" 2>&1
  cp bench/out/precision/curves.json "$OUT/" 2>/dev/null
  grep -h '^{' "$OUT/curve.log" | cut -c1-400; sed -n '/^weights \/ path/,$p' "$OUT/curve.log" | head -40
  tail -2 "$OUT/curve.log"
  stamp "done"
  ;;
c35)
  # (2026-12-08) FSDP2 on one GPU with the on-device step (the fused AdamW skips a non-finite step on the device, the
  # gradient norm all-reduced there: the loop queues step N+1 before reading step N) against the host-checked step it
  # ran before (-hostcheck) and the one-process default (no FSDP2), batch 16 (CASES, STEPS, WARMUP override)
  device
  warm bf16 fused 170
  trainer_vs fsdp 16 "${STEPS:-16}" "${WARMUP:-4}" 330 "${CASES:-ours-bf16-fsdp-hostcheck,ours-bf16-fsdp,ours-bf16}"
  tail -3 "$OUT/fsdp.log"
  stamp "done"
  ;;
c36)
  # (2026-12-08) the curve question from the kernels' side: the autotuner may pick another config of a chunk kernel on
  # an H100 than on an H200, and triton 3.4-3.7.0 miscompiles some tiles on Hopper (fla#640). Each config of each
  # autotuned kernel that our chunk_gla and FLA's launch, at GLA 340M's head shapes (bf16, 2 x 2048 tokens), against
  # the float64 recurrence; a cut by the budget is reported (STAGE_SECONDS, PATHS override)
  device
  stamp "tile_sweep"
  timeout "$(budget 570)" python3 bench/tile_sweep.py --device cuda --paths "${PATHS:-ours,fla}" \
      --budget-s "$(( $(budget 570) - 40 ))" --json "$OUT/tile_sweep.json" > "$OUT/tile_sweep.log" 2>&1
  grep -v -i warn "$OUT/tile_sweep.log" | tail -40
  stamp "done"
  ;;
c37)
  # (2026-12-08) our gated output norm's backward ran at 67% of the bandwidth in the c26 profile (2.26 TB/s, 3.56 ms a
  # step for 2.40 at the roof): an issue-bound kernel (~250 registers a thread, 2 programs of 4 warps per SM; SASS
  # counts in BENCHMARKS.md) launched as the RMSNorm's default for its head dimension, a launch tuned at D = 1024 while
  # GLA 340M's heads are 256 wide. The sweep at the step's shapes (dg into the slab; 190 launches, 60 of them under
  # a register cap that lets more programs share an SM), its fastest launch with the default's dx and dg kept in
  # bench/out/gpu10c; then, in this call if time is left or in the next one on the same machine, the step with that
  # launch between two runs of the defaults (CASES, STEPS override)
  device
  mkdir -p bench/out/gpu10c
  if [ ! -f bench/out/gpu10c/gated_bwd_best ]; then
    stamp "norm_bench --gated-bwd-sweep"
    timeout "$(budget 300)" python3 bench/norm_bench.py --gated-bwd-sweep --iters 15 > "$OUT/gated_sweep.log" 2>&1
    grep -E "^gated|^  bt" "$OUT/gated_sweep.log" | head -16; grep -E "default|DIFFERENT|failed" "$OUT/gated_sweep.log" | head -4
    grep -q '^GATED_SWEEP ' "$OUT/gated_sweep.log" && best_gated_bwd "$OUT/gated_sweep.log" > bench/out/gpu10c/gated_bwd_best
  fi
  best=$(cat bench/out/gpu10c/gated_bwd_best 2>/dev/null)
  echo "fastest launch with the default's dx and dg: ${best:-the default (or no sweep)}"
  if [ -n "$best" ] && [ "$(budget 480)" -ge 430 ]; then  # models.warm and three trainer runs
    warm bf16 fused 150
    stamp "train_bench -gnbwd $best"
    timeout "$(budget 330)" python3 bench/train_bench.py --batch 16 --steps "${STEPS:-12}" --warmup 4 \
        --cases "${CASES:-ours-bf16,ours-bf16-gnbwd,ours-bf16}" --gated-norm-bwd "$best" --dir bench/out/train \
        > "$OUT/gnbwd.log" 2>&1
    grep -h 'tokens/s:' "$OUT/gnbwd.log"; grep -h '^{' "$OUT/gnbwd.log" | cut -c1-300; tail -3 "$OUT/gnbwd.log"
  elif [ -n "$best" ]; then
    echo "too little of the stage left for the trainer: call c37 again on this machine (the sweep is kept)"
  fi
  stamp "done"
  ;;
c39)
  # (2026-12-08) device time is scarce: the switches built but not timed, in one call. Our dv kernel's product in
  # tf32x3 (c29: the fp32 FMA product is 7.4 ms of an H100 step; a third fewer instructions), the gate's approximate
  # log (the forward kernel instruction-bound, 2.4x fewer instructions), each against the defaults run first and
  # last (CASES, STEPS override; the tf32x3 case autotunes its dv kernel in its untimed warm-up steps). Before either
  # becomes a default: c36 with PATHS=ours-dvtf32x3 (every dv config compiled here against float64) and this
  # gla_check's gate rows (the approximate log against float64)
  device
  stamp "gla_check --only gate"
  timeout "$(budget 90)" python3 bench/gla_check.py --only gate --iters 20 > "$OUT/gate.log" 2>&1
  grep -v -i warn "$OUT/gate.log" | tail -6
  warm bf16 fused 150
  stamp "train_bench: the untimed switches"
  timeout "$(budget 330)" python3 bench/train_bench.py --batch 16 --steps "${STEPS:-12}" --warmup 4 \
      --cases "${CASES:-ours-bf16,ours-bf16-dvtf32x3,ours-bf16-approxlog,ours-bf16}" \
      --dir bench/out/train > "$OUT/switches.log" 2>&1
  grep -h 'tokens/s:' "$OUT/switches.log"; grep -h '^{' "$OUT/switches.log" | cut -c1-300; tail -3 "$OUT/switches.log"
  stamp "done"
  ;;
x2a)
  # (2026-12-07, for nvidia-h200-x2 or nvidia-h100-x2: two GPUs of one host) the issue's scaling goal with the new
  # defaults (bf16 over fp32 masters, fused blocks): GLA 340M, 16 sequences per GPU, one process, DDP on 2, FSDP2 on
  # 1 and on 2, one call; goals DDP >= 1.9x, FSDP2 >= 1.85x its 1-process run
  device
  warm bf16 fused 170
  stamp "gpu_scaling"
  timeout "$(budget 380)" python3 bench/gpu_scaling.py --runs none:1,ddp:2,fsdp:1,fsdp:2 --per-gpu-batch 16 \
      --steps 20 --skip 5 --dir bench/out/scaling > "$OUT/scaling.log" 2>&1
  grep -h '^{' "$OUT/scaling.log"; tail -3 "$OUT/scaling.log"
  stamp "done"
  ;;
x2b)
  # (2026-12-07, two GPUs) kill + resume with the new defaults, DDP and FSDP2, on 2 and (from a copy) on 1 process;
  # run x2a first on the machine (it warms the kernels)
  device
  for mode in ddp fsdp; do
    stamp "train_resume_check $mode"
    timeout "$(budget 270)" python3 bench/train_resume_check.py --mode $mode --batch 32 --steps 14 --every 5 \
        --kill-after 8 --dir bench/out/resume-$mode > "$OUT/resume-$mode.log" 2>&1
    grep -h '^{' "$OUT/resume-$mode.log"; tail -2 "$OUT/resume-$mode.log"
  done
  stamp "done"
  ;;
x2c)
  # (2026-12-08, two GPUs; run x2a first on the machine: it warms the kernels) the FSDP2 goal (>= 1.85x) by its
  # traffic: with parallel.fsdp_reshard_after_forward=false no block is gathered again for its backward (ZeRO-2's
  # traffic; GLA 340M's bf16 parameters, 0.7 GB, stay whole on each GPU between forward and backward), against the
  # 1-GPU FSDP2 run with the same setting
  device
  stamp "gpu_scaling fsdp, no reshard after forward"
  timeout "$(budget 400)" python3 bench/gpu_scaling.py --runs fsdp:1,fsdp:2 --per-gpu-batch 16 --steps 20 --skip 5 \
      --extra parallel.fsdp_reshard_after_forward=false --dir bench/out/scaling-noreshard > "$OUT/scaling-noreshard.log" 2>&1
  grep -h '^{' "$OUT/scaling-noreshard.log"; tail -3 "$OUT/scaling-noreshard.log"
  stamp "done"
  ;;
c23)
  # (2026-12-07) the loss curve of the defaults with SwiGLU in the MLP GEMMs (and RUNS) against autocast-fla
  need_shards c23
  device
  warm bf16,autocast fused,fla 170
  curve 400 "${RUNS:-bf16-fused-mlpgemm}"
  stamp "done"
  ;;
c11)
  stamp "train_bench batch 16"
  timeout "$(budget 560)" python3 bench/train_bench.py --batch 16 --steps 12 --warmup 4 \
      --cases ${CASES:-ours-bf16,ours-bf16-gatesplit,ours-bf16-flachunk,ours-bf16-mulclip,ours-bf16-keepz,hf} \
      --dir bench/out/train > "$OUT/b16.log" 2>&1
  grep -h 'tokens/s:' "$OUT/b16.log"; grep -h '^{' "$OUT/b16.log" | cut -c1-420
  tail -3 "$OUT/b16.log"
  stamp "done"
  ;;
*) echo "usage: bash bench/gpu_issue10b.sh all1|ab|graphs|b32|curve|c1|c2|c3|c5|c6|c7|c8|c9|c10|c11|c12|c13|c14|c15|c16|c17|c18|c19|c20|c21|c22|c23|c24|c25|c26|c27|c28|c29|c30|c32|c33|c34|c35|c36|c37|c39|x2a|x2b|x2c" >&2; exit 2 ;;
esac
