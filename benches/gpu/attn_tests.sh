#!/usr/bin/env bash
# On the GPU machine, from the repository root, after `VULKAN=1 bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda`
# here; carry [".gpu", ".whl"] (.whl: `pip download --no-deps fla-core==0.6.0 einops`). Not yet run: no GPU was lent to the session that wrote it.
# Attention tests on CUDA and on Vulkan (NVIDIA driver), and the tiled chunk tests on CUDA.
set -x
export FLA_TEST_RUNTIME=cuda
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
(/tmp/gpu-run/test-kernels attn::; /tmp/gpu-run/test-ops attn::) > $OUT/cuda-attn.log 2>&1
grep -E "test result|FAILED|panicked" $OUT/cuda-attn.log | head -20
/tmp/gpu-run/test-kernels tile:: 2>&1 | grep -E "test result|FAILED" 
/tmp/gpu-run/test-kernels gated::chunk_ 2>&1 | grep -E "test result|FAILED" 
/tmp/gpu-run/test-ops gated:: 2>&1 | grep -E "test result|FAILED"
unset FLA_TEST_RUNTIME
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
/tmp/gpu-run/test-kernels attn:: > $OUT/vk-attn.log 2>&1; grep -E "test result|FAILED|panicked" $OUT/vk-attn.log | head
/tmp/gpu-run/test-ops attn:: > $OUT/vk-attn-ops.log 2>&1; grep -E "test result|FAILED|panicked" $OUT/vk-attn-ops.log | head
