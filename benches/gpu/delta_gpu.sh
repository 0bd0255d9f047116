#!/usr/bin/env bash
# On the GPU machine, from the repository root, after
# `VULKAN=1 bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here; carry
# [".gpu", ".whl"] (.whl: `pip download --no-deps -d .whl fla-core==0.6.0 einops`).
# `delta_gpu.sh tests`: the delta-rule kernel and op tests on CUDA, the kernel tests on Vulkan
# (`FILTER="delta::sizes"` for a part: the kernel tests are one binary, `test-kernels`, whose test
# names start with their file's module, `delta::`, `gated::`, `attn::`, `tile::`).
# `delta_gpu.sh profile`: per-kernel times of our delta-rule kernels (CubeCL's profiler).
# `delta_gpu.sh bench`: ours and FLA's delta-rule kernels on the same shapes in one call.
# `delta_gpu.sh models`: fla-models' parity tests on CUDA (pack with `-p fla-models` too), and FLA
# loading the checkpoints our models export (carry `target/fla-export`, written by the
# `export_for_fla` tests on this machine).
set -x
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
# BATCH, HEADS, DIM: the shape of `profile` and `bench` (B=8, H=16, K=V=128 unless set).
SHAPE="--batch ${BATCH:-8} --heads ${HEADS:-16} --dim ${DIM:-128}"
case "$1" in
tests)
  FLA_TEST_RUNTIME=cuda $R/test-kernels ${FILTER:-delta::} > $OUT/cuda-delta.log 2>&1
  grep -E "test result|FAILED|panicked|RMSE" $OUT/cuda-delta.log | head -30
  FLA_TEST_RUNTIME=cuda $R/test-ops delta:: > $OUT/cuda-delta-ops.log 2>&1
  grep -E "test result|FAILED|panicked" $OUT/cuda-delta-ops.log | head -20
  VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json $R/test-kernels delta:: --skip Recurrent > $OUT/vk-delta.log 2>&1
  grep -E "test result|FAILED|panicked" $OUT/vk-delta.log | head -20
  ;;
models)
  FLA_TEST_RUNTIME=cuda $R/test-models parity:: > $OUT/cuda-parity.log 2>&1
  grep -E "test result|FAILED|panicked" $OUT/cuda-parity.log | head -20
  grep -E "RMSE" $OUT/cuda-parity.log | sort | uniq -c | sort -rn | head -5
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
  (cd crates/fla-models/tests/fixtures && PYTHONPATH=/tmp/site timeout 240 python3 make_fixtures.py --check-ours ../../../../target/fla-export 2>&1 | grep -E "round trip|Error|error" | head -20)
  ;;
profile)
  # Per-kernel times of one forward+backward (CubeCL's profiling summary, printed at each sync).
  printf '[profiling]\nlogger = { level = "basic", stderr = true }\n' > cubecl.toml
  $R/test-table --backend cuda --dtype bf16 $SHAPE --seq ${SEQ:-4096} --ops ${OPS:-chunk_delta_rule,chunk_gated_delta_rule} \
    --warmup 1 --iters 1 --out $OUT/prof > $OUT/profile.log 2>&1
  rm cubecl.toml
  tail -c 6000 $OUT/profile.log
  ;;
bench)
  SEQ=${SEQ:-4096,8192,16384}
  OPS=${OPS:-chunk_delta_rule,chunk_gated_delta_rule,fused_recurrent_delta_rule,fused_recurrent_gated_delta_rule}
  $R/test-table --backend cuda --dtype bf16 $SHAPE --seq $SEQ --ops $OPS --warmup 2 --iters 5 --out $OUT/ours 2>&1 | tail -16
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
  # FLA_S: FLA's time limit (its first calls compile and autotune every op and shape).
  PYTHONPATH=/tmp/site timeout ${FLA_S:-300} python3 benches/fla_gated.py --warm $SHAPE --seq $SEQ --ops $OPS --ours $OUT/ours/ours.csv --out $OUT 2>&1 | grep -v Warning | tail -30
  ;;
esac
