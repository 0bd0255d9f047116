#!/usr/bin/env bash
# Clipping by the global norm of all gradients (fla-train --clip-grad-norm since 2026-12-06,
# FusedAdamWOptimizer) against per tensor (--clip-per-tensor), and AdamW's results written to
# fresh buffers in its own pass, after `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels
# -p fla-models -p training --features cuda` here; carry [".gpu"]:
# 1. the AdamW kernel and op tests on CUDA;
# 2. FLA's 340M recipe cut to 4 layers under each clipping (benches/gpu/split_rule.sh);
# 3. the 24-layer recipe, ours alone (FLA's side needs a call of its own on a fresh machine:
#    its first step compiles for minutes), unless SKIP_FULL is set.
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
FLA_TEST_RUNTIME=cuda timeout 100 $R/test-kernels adamw --test-threads 8 2>&1 | grep -E 'test result|FAILED|panicked' | head
FLA_TEST_RUNTIME=cuda timeout 150 $R/test-ops adamw --test-threads 8 2>&1 | grep -E 'test result|FAILED|panicked' | head
TAG=global- VARIANTS="FLA_CLIP=global" STEPS=${STEPS:-8} bash benches/gpu/split_rule.sh 2>&1 | grep '^\['
TAG=per-tensor- VARIANTS="FLA_CLIP=per-tensor" EXTRA=--clip-per-tensor STEPS=${STEPS:-8} bash benches/gpu/split_rule.sh 2>&1 | grep '^\['
[ -n "$SKIP_FULL" ] || OURS_S=${OURS_S:-150} FLA_S=1 STEPS=${STEPS:-8} bash benches/gpu/train_gpu.sh 340m 2>&1 | grep -v '^+' | grep -v pip | tail -8
rm -f $OUT/*.png $OUT/*.svg $OUT/mem-ours.log
