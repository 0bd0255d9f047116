#!/usr/bin/env bash
# On the GPU machine, from the repository root, after
# `VULKAN=1 bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here; carry
# [".gpu", ".whl"] (.whl: `pip download --no-deps -d .whl fla-core==0.6.0 einops`).
# `norm_gpu.sh tests`: the fused RMSNorm's, SwiGLU's, AdamW's and cross-entropy's kernel and op tests on CUDA
# (f32, f16, bf16), then their kernel tests on Vulkan (FILTER: other test-name filters).
# `norm_gpu.sh bench`: ours (rms_norm, rms_norm_gated, swiglu), Burn's (burn_rms_norm: its
# RmsNorm; burn_swiglu: silu(g) * u) and FLA 0.6.0's (RMSNorm, FusedRMSNormGated, swiglu) over
# [B, T, H, D] in one call (the table's runs: SEQ, BATCH, HEADS, DIM as there; B=8, H=16, D=128,
# T=4096 and 16384 unless set). The cross-entropy: `SEQ=2048 OPS=cross_entropy,burn_cross_entropy,torch_cross_entropy
# norm_gpu.sh bench` (ours, Burn's CrossEntropyLoss, FLA's FusedCrossEntropyLoss and torch's F.cross_entropy over
# [B·T, 32000] logits, the 340M recipe's loss).
set -x
case "$1" in
tests)
  bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
  export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
  R=/tmp/gpu-run
  F=${FILTER:-norm:: swiglu:: adamw:: cross_entropy::}
  FLA_TEST_RUNTIME=cuda timeout 200 $R/test-kernels $F --test-threads 8 > $OUT/cuda-norm.log 2>&1
  grep -E "test result|FAILED|panicked|RMSE" $OUT/cuda-norm.log | head -30
  FLA_TEST_RUNTIME=cuda timeout 200 $R/test-ops $F --test-threads 8 > $OUT/cuda-norm-ops.log 2>&1
  grep -E "test result|FAILED|panicked|RMSE" $OUT/cuda-norm-ops.log | head -20
  VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json timeout 200 $R/test-kernels $F --test-threads 8 > $OUT/vk-norm.log 2>&1
  grep -E "test result|FAILED|panicked" $OUT/vk-norm.log | head -20
  ;;
bench)
  SEQ=${SEQ:-4096,16384} OPS=${OPS:-rms_norm,rms_norm_gated,burn_rms_norm,swiglu,burn_swiglu} FLA_S=${FLA_S:-200} \
    exec bash benches/gpu/delta_gpu.sh bench
  ;;
esac
