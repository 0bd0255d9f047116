#!/usr/bin/env bash
# The split against the fused walk for chunk_simple_gla at B = 8, T = 4096 (FLA_TILED_SPLIT=1 /
# 0: the split is FLA's structure, a states pass then every span of 64 positions in parallel,
# with our tiled kernels), then GLA's chunk cases on CUDA with the defaults, given the time a
# fresh machine needs: each case compiles its kernels through NVRTC on first use, and a 90 s
# limit (pending.sh, 2026-12-08) ended 46 cases after 16 (all passed). After a
# /tmp/mypack.sh-style pack, carry [".gpu"]: `bash benches/gpu/defaults_cuda.sh` (LIMIT bounds
# the tests, in seconds).
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
nvidia-smi --query-gpu=name --format=csv,noheader
for s in "FLA_TILED_SPLIT=1" "FLA_TILED_SPLIT=1 FLA_TILED_SPAN_PLANES=8" "FLA_TILED_SPLIT=0"; do
  echo "$s (t=$SECONDS)"
  env $s timeout 45 $R/test-table --backend cuda --dtype bf16 --seq 4096,8192 \
    --ops chunk_simple_gla,chunk_gla --warmup 2 --iters 5 2>&1 | grep "^| chunk"
done
FLA_TEST_RUNTIME=cuda timeout ${LIMIT:-360} $R/test-kernels gated::chunk_sizes gated::chunk_varlen \
  gated::chunk_vector_gates_in_other gated::chunk_without_states gated::chunk_factored gated::chunk_kept \
  --test-threads 16 > $OUT/t-left.log 2>&1
echo "left (t=$SECONDS): $(grep -c '\.\.\. ok' $OUT/t-left.log) ok, $(grep -c 'FAILED\|panicked' $OUT/t-left.log) failed"
grep -E 'test result|panicked|FAILED' $OUT/t-left.log | head -6
echo "done t=$SECONDS"
