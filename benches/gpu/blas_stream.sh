#!/usr/bin/env bash
# cuBLASLt on CubeCL's stream (no host waits; vendor/README.md, fla_cubecl_kernels::blas), after
# `bash ../shared/gpu/pack.sh -p fla -p training --features cuda` here; carry [".gpu", ".whl"]:
# 1. the product's and the linear op's tests on CUDA (`blas::`, `linear::`);
# 2. the product alone on the 340M recipe's shapes beside torch (matmul_gpu.sh, MODES=cublaslt);
# 3. FLA's 340M GLA recipe trained by ours at T = 2048 (train_gpu.sh 340m; FLA_S=1 skips FLA's
#    side, whose first step alone compiles for minutes; FLA_CUBLASLT=0 runs Burn's matmul instead).
set -x
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
summary() { grep -E "test result|FAILED|panicked" "$1" | head -20; echo "ok: $(grep -c '\.\.\. ok' "$1")"; }
FLA_TEST_RUNTIME=cuda timeout ${TEST_S:-150} $R/test-ops blas:: linear:: --test-threads 8 > $OUT/cuda-ops.log 2>&1
summary $OUT/cuda-ops.log
[ -n "$SKIP_MM" ] || MODES=cublaslt OURS_S=${MM_S:-60} bash benches/gpu/matmul_gpu.sh 2>&1 | grep -v "^+" | tail -30
[ -n "$SKIP_TRAIN" ] || STEPS=${STEPS:-6} OURS_S=${OURS_S:-300} FLA_S=${FLA_S:-1} bash benches/gpu/train_gpu.sh 340m 2>&1 | grep -v "^+" | tail -12
