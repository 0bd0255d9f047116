#!/usr/bin/env bash
# The next GPU call (written 2026-12-08), most important first, so a call cut short still
# returns it:
#   1. CUDA tests of GLA's chunk defaults that no CUDA run has reached (the 2026-12-08 calls
#      passed 27 of the 46 cases they aim at, none failed, before their limits): chunk_sizes
#      T = 1500, 2048 (simple GLA, GLA) and K = 256, varlen, vector gates in other chunks,
#      without states, kept scores.
#   2. Vulkan through NVIDIA's driver with the tiled kernels' tensor cores
#      (`gated_gpu.sh vulkan-cmma`: FLA_VULKAN_CMMA=1 tests, then f16 timings against the plain
#      Vulkan path and CUDA; issue 3's Vulkan/CUDA bar is 1.5x, last measured 2.08x without).
#   3. The split against the walk at B = 1, the side of split_forward's rule where the split is
#      taken (at B = 8 the walk measured faster, as chosen).
# Pack: `VULKAN=1 bash /tmp/mypack.sh`-style (-p fla -p fla-cubecl-kernels --features cuda:
# tests kernels and ops, bench table, the Vulkan loader); carry [".gpu"]:
# `bash benches/gpu/pending.sh`.
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
nvidia-smi --query-gpu=name --format=csv,noheader
FLA_TEST_RUNTIME=cuda timeout 200 $R/test-kernels gated::chunk_sizes::case_08 gated::chunk_sizes::case_09 \
  gated::chunk_sizes::case_10 gated::chunk_varlen gated::chunk_vector_gates_in_other \
  gated::chunk_without_states gated::chunk_kept --test-threads 16 > $OUT/t-left.log 2>&1
echo "left (t=$SECONDS): $(grep -c '\.\.\. ok' $OUT/t-left.log) ok, $(grep -c 'FAILED\|panicked' $OUT/t-left.log) failed"
grep -E 'test result|panicked|FAILED' $OUT/t-left.log | head -6
[ $SECONDS -lt 300 ] && FILTER=gated::chunk_sizes timeout $((560 - SECONDS)) bash benches/gpu/gated_gpu.sh vulkan-cmma 2>&1 | grep -v '^+'
if [ $SECONDS -lt 500 ]; then
  for s in 1 0; do
    echo "FLA_TILED_SPLIT=$s, B = 1 (t=$SECONDS)"
    FLA_TILED_SPLIT=$s timeout 40 $R/test-table --backend cuda --dtype bf16 --batch 1 --seq 4096,16384 \
      --ops chunk_simple_gla,chunk_gla --warmup 2 --iters 5 2>&1 | grep "^| chunk"
  done
fi
echo "pending.sh done t=$SECONDS"
