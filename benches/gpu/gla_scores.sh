#!/usr/bin/env bash
# GLA's in-chunk work done once (2026-12-06): the vector-gated scores by a kernel of their own,
# read by the forward and dk/dv walks, and dk's in-chunk term by the dq walk, against the build
# before them, in one call. After `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels -p
# fla-models -p training --features cuda` here (.gpu, trimmed to test-kernels, test-ops,
# test-table, bin-fla-train) and the baseline's bin-fla-train and test-table packed the same way
# into .gpu-base/payload.tar.xz; carry [".gpu", ".gpu-base"].
# 1. the gated and AdamW kernel and op tests on CUDA (SKIP_TESTS skips them);
# 2. chunk_gla at FLA's benchmark shape (B=8, H=16, K=V=128, T=4096), baseline then new;
# 3. FLA's 340M recipe cut to 4 layers (benches/gpu/split_rule.sh), baseline then new, and the
#    new build with VARIANTS (default: vector gates in chunks of 32).
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
mkdir -p /tmp/base && xz -dc .gpu-base/payload.tar.xz | tar -C /tmp/base -xf -
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
if [ -z "$SKIP_TESTS" ]; then
  FLA_TEST_RUNTIME=cuda timeout 200 $R/test-kernels gated:: adamw --test-threads 8 > $OUT/cuda-kernels.log 2>&1
  grep -E 'test result|FAILED|panicked' $OUT/cuda-kernels.log | head -20
  [ -x $R/test-ops ] && FLA_TEST_RUNTIME=cuda timeout 150 $R/test-ops gated adamw --test-threads 8 > $OUT/cuda-ops.log 2>&1
  grep -E 'test result|FAILED|panicked' $OUT/cuda-ops.log | head -20
fi
for who in base new; do
  exe=$R/test-table; [ $who = base ] && exe=/tmp/base/test-table
  echo "== $who"
  timeout 120 $exe --backend cuda --dtype bf16 --seq ${SEQ:-4096} --ops chunk_gla --warmup 3 --iters 10 2>&1 | tail -4
done
TAG=base- BIN_DIR=/tmp/base VARIANTS="FLA_BUILD=base" STEPS=${STEPS:-8} bash benches/gpu/split_rule.sh 2>&1 | grep '^\['
TAG=new- VARIANTS="FLA_BUILD=new;${VARIANTS:-FLA_TILED_VCHUNK=32}" STEPS=${STEPS:-8} bash benches/gpu/split_rule.sh 2>&1 | grep '^\['
rm -f $OUT/*.png $OUT/*.svg
