#!/usr/bin/env bash
# GLA's in-chunk work done once (2026-12-06): the vector-gated scores and the gates cumulated
# per chunk by a kernel of their own, read by the walks, and dk's in-chunk term by the dq walk.
# After `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels -p fla-models -p training
# --features cuda` here (.gpu, trimmed to test-kernels, test-ops, test-table, bin-fla-train) and,
# optionally, a baseline's bin-fla-train and test-table packed the same way into
# .gpu-base/payload.tar.xz; carry [".gpu"] or [".gpu", ".gpu-base"].
# 1. the gated and AdamW kernel and op tests on CUDA (SKIP_TESTS skips them);
# 2. chunk_gla at FLA's benchmark shape (B=8, H=16, K=V=128, T=4096): the baseline if packed,
#    then this build under each of VARIANTS (`;`-separated environment settings);
# 3. FLA's 340M recipe cut to 4 layers (benches/gpu/split_rule.sh), the same way.
VARIANTS=${VARIANTS:-FLA_BUILD=new;FLA_TILED_VCHUNK=32}
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
if [ -f .gpu-base/payload.tar.xz ]; then
  mkdir -p /tmp/base && xz -dc .gpu-base/payload.tar.xz | tar -C /tmp/base -xf -
fi
if [ -z "$SKIP_TESTS" ]; then
  FLA_TEST_RUNTIME=cuda timeout ${TEST_S:-300} $R/test-kernels ${TEST_FILTER:-gated:: adamw} --test-threads 16 > $OUT/cuda-kernels.log 2>&1
  grep -E 'test result|FAILED|panicked' $OUT/cuda-kernels.log | head -20
  echo "kernels: $(grep -c '\.\.\. ok' $OUT/cuda-kernels.log) ok"
  if [ -x $R/test-ops ] && [ -z "$SKIP_OPS" ]; then
    FLA_TEST_RUNTIME=cuda timeout 150 $R/test-ops gated adamw --test-threads 16 > $OUT/cuda-ops.log 2>&1
    grep -E 'test result|FAILED|panicked' $OUT/cuda-ops.log | head -20
  fi
fi
IFS=';' read -ra VS <<< "$VARIANTS"
if [ -d /tmp/base ]; then
  echo "== base"
  timeout 120 /tmp/base/test-table --backend cuda --dtype bf16 --seq ${SEQ:-4096} --ops chunk_gla --warmup 3 --iters 10 2>&1 | tail -1
fi
for v in "${VS[@]}"; do
  echo "== $v"
  env $v timeout 120 $R/test-table --backend cuda --dtype bf16 --seq ${SEQ:-4096} --ops chunk_gla --warmup 3 --iters 10 2>&1 | tail -1
done
[ -d /tmp/base ] && TAG=base- BIN_DIR=/tmp/base VARIANTS="FLA_BUILD=base" STEPS=${STEPS:-8} bash benches/gpu/split_rule.sh 2>&1 | grep '^\['
TAG=new- VARIANTS="$VARIANTS" STEPS=${STEPS:-8} bash benches/gpu/split_rule.sh 2>&1 | grep '^\['
rm -f $OUT/*.png $OUT/*.svg
