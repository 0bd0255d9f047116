#!/usr/bin/env bash
# The attention forward that holds its accumulators in registers (CUDA's mma.sync through
# CubeCL's manual MMA; crates/fla-cubecl-kernels/src/attn/frag.rs), after
# `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here (.gpu trimmed
# to test-kernels, test-ops, test-table); carry [".gpu", ".whl"].
# 1. The attention kernel tests on CUDA with every case in bf16 and in f16 (FLA_TEST_DTYPE; the
#    register forward wherever the head dims allow), then in f32 (the shared-memory forward).
# 2. The gated and AdamW kernel tests (SKIP_GATED skips them), the gated, AdamW and attention op
#    tests (SKIP_OPS; OPS_FILTER). DTYPES picks the attention dtypes of step 1.
# 3. parallel_attn forward and forward+backward, bf16, B = 8, H = 16, D = 128, causal: the
#    register forward, then the shared-memory one (FLA_ATTN_FRAG=0), then torch SDPA and FLA's
#    parallel_attn, all in this call. VARIANTS (`;`-separated settings) adds runs of ours.
set -x
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
SEQ=${SEQ:-4096,8192}
if [ -z "$SKIP_TESTS" ]; then
  export FLA_TEST_RUNTIME=cuda
  for dt in ${DTYPES:-bf16 f16 f32}; do
    FLA_TEST_DTYPE=$dt timeout ${ATTN_S:-90} $R/test-kernels attn:: --test-threads 16 > $OUT/attn-$dt.log 2>&1
    echo "$dt: $(grep -c '\.\.\. ok' $OUT/attn-$dt.log) ok"
    grep -E 'test result|FAILED|panicked' $OUT/attn-$dt.log | head -12
  done
  if [ -z "$SKIP_GATED" ]; then
    timeout ${TEST_S:-200} $R/test-kernels gated:: adamw --test-threads 16 > $OUT/cuda-kernels.log 2>&1
    echo "kernels gated/adamw: $(grep -c '\.\.\. ok' $OUT/cuda-kernels.log) ok"
    grep -E 'test result|FAILED|panicked' $OUT/cuda-kernels.log | head -12
  fi
  if [ -z "$SKIP_OPS" ]; then
    timeout ${OPS_S:-150} $R/test-ops ${OPS_FILTER:-gated adamw attn} --test-threads 16 > $OUT/cuda-ops.log 2>&1
    echo "ops: $(grep -c '\.\.\. ok' $OUT/cuda-ops.log) ok"
    grep -E 'test result|FAILED|panicked' $OUT/cuda-ops.log | head -12
  fi
  unset FLA_TEST_RUNTIME
fi
VARIANTS=${VARIANTS:-FLA_ATTN_FRAG=1;FLA_ATTN_FRAG=0}
IFS=';' read -ra VS <<< "$VARIANTS"
for v in "${VS[@]}"; do
  echo "== $v"
  env $v timeout 150 $R/test-table --backend cuda --dtype bf16 --seq $SEQ --ops parallel_attn \
    --warmup 3 --iters 10 2>&1 | grep -E '^\| parallel_attn|panicked|rror'
done
if [ -z "$SKIP_REF" ]; then
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
  PYTHONPATH=/tmp/site timeout ${REF_S:-200} python3 benches/fla_gated.py --seq $SEQ \
    --ops sdpa,parallel_attn --out $OUT 2>&1 | grep -v Warning | tail -8
fi
