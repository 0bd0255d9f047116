#!/usr/bin/env bash
# Training on the GPU machine (issue 7), after
# `bash ../shared/gpu/pack.sh -p training --features cuda` here; carry [".gpu", ".whl"]
# (.whl: `pip download --no-deps -d .whl fla-core==0.6.0 einops`).
# `train_gpu.sh tiny`: a short run of the tiny GLA preset in $PRECISION (the loss must fall).
# `train_gpu.sh 340m`: FLA's 340M GLA recipe (training/configs/gla-340M.json) at T = 2048,
# ours (`fla-train --precision $PRECISION`) then FLA's (benches/fla_train.py: the same architecture from
# fla-core's modules and chunk_gla) in the same call: ms per step, tokens/s, peak memory.
# `train_gpu.sh fla`: FLA's side of `340m` alone, given the whole call, saving Triton's cache.
# `train_gpu.sh warm`: one step of the 340M run, to compile its kernels and autotune its matmuls
# (the first step did not end within 200 s on an H200; fla-train ends at a step's end on SIGTERM,
# so the timeout's SIGKILL, 30 s later, is what stops a step that has not; measured again on an
# H200: no step within 300 s, step-0 validation loss 10.52 by then), then
# $OUT/cubecl-cache.tar.xz holds
# CubeCL's caches (autotune results, compiled PTX): copy it to .cubecl-cache.tar.xz here and carry
# it with the next call, which starts from it.
# Measured 2026-12-04 on an H200, `340m` in one call (OURS_S=280 FLA_S=230), started from the
# CubeCL cache a 280 s `warm` left and the Triton cache an `fla` call left (FLA's first step on a
# fresh machine: 277 s): ours 23,900 tokens/s (0.69 s/step, median of steps 2-6; first step
# 232 s), validation loss 10.52 -> 4.48 in 6 steps, 49.1 GiB in use (nvidia-smi); FLA 110,600
# tokens/s (148 ms/step), 20.2 GiB allocated, 22.6 GiB reserved. Ours is 0.22x FLA's rate.
# Measured again 2026-12-04 (eleventh session), on Burn's fused CUDA backend (vendor/README.md),
# `OURS_S=510 FLA_S=1 STEPS=6 ... 340m` from the cache of the tiny runs: 39,000 tokens/s (median
# of steps 3-6), first step 61 s, validation loss 10.52 -> 4.47, 51.9 GiB; FLA not rerun (0.35x
# its earlier figure).
# Measured 2026-12-05 on an H100, `PRECISION=bf16-mixed ... tiny`, no CubeCL cache: 325 s for the
# whole call (compiling most of it), validation loss 5.59 -> 2.59 in 40 steps, 40,500-46,000
# tokens/s once compiled.
# PRECISION (default bf16, parameters in bf16 on both sides): ours `--precision $PRECISION` in
# `tiny`, `warm`, `340m` and `profile`. With bf16-mixed (f32 parameters and AdamW state, the whole model on a
# bf16 copy) FLA runs with `--amp` (f32 parameters under torch's per-op autocast, which keeps the
# residual stream and norms in f32): the nearest FLA mode, not the same arithmetic. Other values
# run FLA with bf16 parameters.
set -x
# GPU_DIR: the packed folder (.gpu unless another pack was moved aside while .gpu is rebuilt).
bash ${GPU_DIR:-.gpu}/run.sh zzz-extract-only >/dev/null 2>&1
# fla-train caches under ~/.cache/cubecl when run outside a Cargo project (as from /tmp here).
[ -f .cubecl-cache.tar.xz ] && mkdir -p ~/.cache && tar -C ~/.cache -xJf .cubecl-cache.tar.xz
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
BATCH=${BATCH:-8} STEPS=${STEPS:-6} PRECISION=${PRECISION:-bf16}
AMP=; [ "$PRECISION" = bf16-mixed ] && AMP=--amp
# Triton's cache from an earlier `fla` call, if carried (FLA's first steps are its compiles).
[ -f .triton-cache.tar.xz ] && mkdir -p ~/.triton && tar -C ~/.triton -xJf .triton-cache.tar.xz
case "$1" in
fla)
  # FLA's side alone, with the whole call (its first step did not end within 285 s of a fresh
  # machine), leaving $OUT/triton-cache.tar.xz: copy it to .triton-cache.tar.xz here and carry
  # it with the `340m` call, whose FLA side then starts from it.
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
  # One layer first: the same kernels at the same shapes as 24 layers, so Triton's compiles (on
  # disk, reused below) cost a one-layer model's steps, and the time they take is on record.
  PYTHONPATH=/tmp/site timeout ${FLA_WARM_S:-300} python3 -u benches/fla_train.py --hidden 1024 --layers 1 \
    --heads 4 --seq 2048 --batch $BATCH --steps 1 --warmup 1 $AMP 2>&1 | grep -v Warning | tail -4
  PYTHONPATH=/tmp/site timeout ${FLA_S:-520} python3 -u benches/fla_train.py --hidden 1024 --layers 24 \
    --heads 4 --seq 2048 --batch $BATCH --steps $STEPS $AMP 2>&1 | grep -v Warning | tail -12
  tar -C ~/.triton -cf - cache | xz -T0 -6 > $OUT/triton-cache.tar.xz
  ls -la $OUT/triton-cache.tar.xz
  ;;
tiny)
  (cd /tmp && $R/bin-fla-train --backend cuda --precision $PRECISION --steps 40 --eval-every 10 --checkpoint-every 0 2>&1 | tail -8)
  ;;
warm)
  (cd /tmp && timeout -k 30 ${WARM_S:-450} $R/bin-fla-train --backend cuda --precision $PRECISION \
     --config $OLDPWD/training/configs/gla-340M.json --seq-len 2048 --batch $BATCH \
     --steps 1 --warmup 1 --eval-every 1000 --checkpoint-every 0 2>&1 | tail -4)
  tar -C ~/.cache -cf - cubecl | xz -T0 -6 > $OUT/cubecl-cache.tar.xz
  ls -la $OUT/cubecl-cache.tar.xz
  ;;
340m)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $OUT/mem-ours.log &
  SMI=$!
  (cd /tmp && timeout -k 30 ${OURS_S:-300} $R/bin-fla-train --backend cuda --precision $PRECISION \
     --config $OLDPWD/training/configs/gla-340M.json --seq-len 2048 --batch $BATCH \
     --steps $STEPS --warmup 1 --eval-every 1000 --checkpoint-every 0 --metrics $OUT/ours-340m.csv 2>&1 | tail -6)
  kill $SMI
  echo "ours: peak GPU memory $(sort -n $OUT/mem-ours.log | tail -1) MiB (nvidia-smi: the whole GPU, CUDA context and CubeCL's pool included)"
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
  PYTHONPATH=/tmp/site timeout ${FLA_S:-300} python3 benches/fla_train.py --hidden 1024 --layers 24 --heads 4 \
    --seq 2048 --batch $BATCH --steps $STEPS $AMP 2>&1 | grep -v Warning | tail -5
  ;;
profile)
  # Where a step's time goes: FLA's 340M recipe cut to LAYERS (default 4) layers, as every layer
  # has the same shapes (per-layer costs scale to 24). Unprofiled first: it compiles and
  # autotunes, and $OUT/layers-N.csv has each step's tokens/s. Then CubeCL's kernel profiler
  # (cubecl.toml in the working folder: each kernel timed alone, the device synchronised after
  # it, so the step is slower than unprofiled; one table per device sync, i.e. per step) writes
  # $OUT/cubecl-profile.log. The kernels' sum against the unprofiled step is the host's share.
  L=${LAYERS:-4}
  python3 -c "import json; c = json.load(open('training/configs/gla-340M.json')); c['num_hidden_layers'] = $L; json.dump(c, open('/tmp/gla-$L.json', 'w'))"
  (cd /tmp && timeout -k 30 ${WARM_S:-400} $R/bin-fla-train --backend cuda --precision $PRECISION \
     --config /tmp/gla-$L.json --seq-len 2048 --batch $BATCH --steps $STEPS --warmup 1 \
     --eval-every 1000 --checkpoint-every 0 --metrics $OUT/layers-$L.csv 2>&1 | tail -3)
  mkdir -p /tmp/prof
  printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' $OUT/cubecl-profile.log > /tmp/prof/cubecl.toml
  (cd /tmp/prof && timeout -k 30 ${PROF_S:-200} $R/bin-fla-train --backend cuda --precision $PRECISION \
     --config /tmp/gla-$L.json --seq-len 2048 --batch $BATCH --steps 3 --warmup 1 \
     --eval-every 1000 --checkpoint-every 0 --metrics $OUT/profiled-$L.csv 2>&1 | tail -3)
  tar -C ~/.cache -cf - cubecl | xz -T0 -6 > $OUT/cubecl-cache.tar.xz
  ls -la $OUT/cubecl-cache.tar.xz
  ;;
esac
