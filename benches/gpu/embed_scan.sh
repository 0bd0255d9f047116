#!/usr/bin/env bash
# The embedding's fused backward (fla_cubecl_kernels::embedding) and the gate gradient's cumulative
# sum in segments (gated::recurrent_bwd), after `bash ../shared/gpu/pack.sh -p fla -p
# fla-cubecl-kernels -p fla-models -p training --features cuda` here; carry [".gpu", ".whl"]:
# 1. their kernel and op tests on CUDA, the gated family's whole (the cumulative sum is part of
#    every gated backward) and the models' (every model's lookup goes through the op);
# 2. FLA's 340M recipe cut to 4 layers under CubeCL's profiler (train_gpu.sh profile);
# 3. the 24-layer recipe, ours then FLA's in the same call (train_gpu.sh 340m).
# SKIP_TESTS, SKIP_PROFILE, SKIP_TRAIN leave a part out; OURS_S, FLA_S, STEPS as train_gpu.sh.
set -x
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
summary() { grep -E "test result|FAILED|panicked" "$1" | head -20; echo "ok: $(grep -c '\.\.\. ok' "$1")"; }
if [ -z "$SKIP_TESTS" ]; then
  FLA_TEST_RUNTIME=cuda timeout ${KT_S:-150} $R/test-kernels embedding:: gated:: --test-threads 8 > $OUT/cuda-kernels.log 2>&1
  summary $OUT/cuda-kernels.log
  FLA_TEST_RUNTIME=cuda timeout ${OT_S:-200} $R/test-ops embedding:: gated:: cross_entropy:: --test-threads 8 > $OUT/cuda-ops.log 2>&1
  summary $OUT/cuda-ops.log
  FLA_TEST_RUNTIME=cuda timeout ${MT_S:-120} $R/test-models --test-threads 8 > $OUT/cuda-models.log 2>&1
  summary $OUT/cuda-models.log
fi
if [ -z "$SKIP_PROFILE" ]; then
  LAYERS=4 STEPS=4 WARM_S=${WARM_S:-120} PROF_S=${PROF_S:-120} bash benches/gpu/train_gpu.sh profile 2>&1 | grep -v "^+" | tail -4
  python3 benches/profile_summary.py $OUT/cubecl-profile.log --csv $OUT/profile-4layers.csv | tail -30
  xz -T0 $OUT/cubecl-profile.log
fi
[ -n "$SKIP_TRAIN" ] || STEPS=${STEPS:-8} OURS_S=${OURS_S:-150} FLA_S=${FLA_S:-400} bash benches/gpu/train_gpu.sh 340m 2>&1 | grep -v "^+" | tail -14
rm -f $OUT/*.png $OUT/*.svg $OUT/cubecl-cache.tar.xz $OUT/mem-ours.log
