#!/usr/bin/env bash
# On the GPU machine, from the repository root, after
# `VULKAN=1 bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here; carry
# [".gpu", ".whl"] (.whl: `pip download --no-deps -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0 einops`).
# `gated_gpu.sh tests`: the gated family's chunk-form kernel tests (FILTER, default `gated::chunk`,
# plus the long-sequence cases) and op tests on CUDA, then the kernel tests on Vulkan.
# `gated_gpu.sh split`: the tiled kernels split against their fused walk (ours only).
# `gated_gpu.sh vulkan-cmma`: the tiled kernels' tensor-core path on Vulkan (FLA_VULKAN_CMMA=1),
# tested and timed against the plain Vulkan path and CUDA.
# `gated_gpu.sh bench`: ours and FLA 0.6.0's gated kernels on the same shapes in one call
# (SEQ, OPS, BATCH, HEADS, DIM override the defaults); `gated_gpu.sh profile`: per-kernel times
# of one forward+backward (CubeCL's profiler). Both are delta_gpu.sh's runs with gated defaults.
set -x
case "$1" in
tests)
  bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
  export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
  R=/tmp/gpu-run
  FLA_TEST_RUNTIME=cuda timeout 300 $R/test-kernels ${FILTER:-gated::chunk} --test-threads 8 > $OUT/cuda-gated.log 2>&1
  grep -E "test result|FAILED|panicked|RMSE" $OUT/cuda-gated.log | head -30
  FLA_TEST_RUNTIME=cuda timeout 200 $R/test-kernels gated::t65536 gated::long --test-threads 4 > $OUT/cuda-gated-long.log 2>&1
  grep -E "test result|FAILED|panicked|^test " $OUT/cuda-gated-long.log | head -20
  FLA_TEST_RUNTIME=cuda timeout 200 $R/test-ops gated --test-threads 8 > $OUT/cuda-gated-ops.log 2>&1
  grep -E "test result|FAILED|panicked" $OUT/cuda-gated-ops.log | head -20
  VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json timeout 200 $R/test-kernels ${FILTER:-gated::chunk} --test-threads 8 > $OUT/vk-gated.log 2>&1
  grep -E "test result|FAILED|panicked" $OUT/vk-gated.log | head -20
  ;;
vulkan-cmma)
  # The tiled kernels' tensor-core path on Vulkan (cooperative matrices), opted in with
  # FLA_VULKAN_CMMA=1 (has_cmma: CUDA only by default): the chunk-form kernel tests in f16
  # (FLA_TEST_DTYPE sends every case through cmma), then the chunk forms in f16 on Vulkan with and
  # without it, beside CUDA's, at T = 4096 (issue 3's Vulkan/CUDA bar: 1.5x).
  bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
  export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
  R=/tmp/gpu-run
  VK=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  FLA_VULKAN_CMMA=1 FLA_TEST_DTYPE=f16 VK_DRIVER_FILES=$VK timeout 300 $R/test-kernels ${FILTER:-gated::chunk} --test-threads 8 > $OUT/vk-cmma.log 2>&1
  grep -E "test result|FAILED|panicked|RMSE" $OUT/vk-cmma.log | head -30
  for cm in 1 0; do
    FLA_VULKAN_CMMA=$cm VK_DRIVER_FILES=$VK timeout 120 $R/test-table --backend wgpu --dtype f16 \
      --seq ${SEQ:-4096} --ops chunk_simple_gla,chunk_gla --warmup 2 --iters 5 --out $OUT/vk-cmma$cm 2>&1 | tail -4
  done
  timeout 120 $R/test-table --backend cuda --dtype f16 --seq ${SEQ:-4096} --ops chunk_simple_gla,chunk_gla \
    --warmup 2 --iters 5 --out $OUT/cuda-f16 2>&1 | tail -4
  ;;
split)
  # The tiled kernels' split against their fused walk (FLA_TILED_SPLIT=1 / 0), at FLA's shape
  # (B=8, where the walk is the default on an H200) and at B=1 (where the split is): the
  # measurement the rule in gated/tiled_launch.rs (split_forward) still waits for.
  bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
  export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
  R=/tmp/gpu-run
  for b in 8 1; do
    for s in 1 0; do
      FLA_TILED_SPLIT=$s timeout 120 $R/test-table --backend cuda --dtype bf16 --batch $b --heads 16 --dim 128 \
        --seq ${SEQ:-4096,16384} --ops chunk_simple_gla,chunk_gla --warmup 2 --iters 5 --out $OUT/split$s-b$b 2>&1 | tail -6
    done
  done
  ;;
profile|bench)
  # The same runs as the delta rule's, on the gated family's ops. FLA's compiles of three GLA ops
  # at three lengths did not end within 300 s on an H200: 400 s here.
  FLA_S=${FLA_S:-400} \
  SEQ=${SEQ:-$([ "$1" = profile ] && echo 4096 || echo 4096,8192,16384)} \
    OPS=${OPS:-$([ "$1" = profile ] && echo chunk_gla || echo chunk_simple_gla,chunk_gla,fused_recurrent_gla)} \
    exec bash benches/gpu/delta_gpu.sh "$1"
  ;;
esac
