#!/usr/bin/env bash
# Compiles FLA's Triton kernels in the background while our CUDA tests run in the same call, so
# FLA's timed passes later in the call start from a filled Triton cache (on a fresh machine FLA's
# first step of the 340M recipe did not end within 400 s, and `fla_gated.py` needs over 200 s).
# Usage, on the GPU machine, carrying [".gpu", ".whl"]:
#   bash benches/gpu/fla_warm.sh & W=$!; <tests: timings are not taken meanwhile>; wait $W
#   then `ONLY=ref PART=times bash benches/gpu/gla_frag.sh` or `train_gpu.sh 340m`.
# Only the compiled kernels are reused: Triton keeps autotuning results in the process, so the
# timed runs autotune again on a quiet GPU (from cached binaries, seconds) and what they choose
# is not affected by the tests that ran beside these compiles. Our timings must not overlap
# this script either (it shares the GPU and the CPU); wait for it first.
# WARM_OPS: fla_gated.py ops to compile at WARM_SEQ (default the gated table's chunk ops at 4096
# and 8192); WARM_TRAIN=0 skips the one-layer step of the 340M recipe (same kernels and shapes
# as 24 layers). WARM_S bounds each process.
pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
L=$OUT/fla-warm.log
: > $L
pids=()
for op in ${WARM_OPS:-chunk_gla chunk_simple_gla}; do
  timeout ${WARM_S:-420} python3 benches/fla_gated.py --only-warm --ops $op --seq ${WARM_SEQ:-4096,8192} >> $L 2>&1 &
  pids+=($!)
done
if [ "${WARM_TRAIN:-1}" = 1 ]; then
  timeout ${WARM_S:-420} python3 -u benches/fla_train.py --hidden 1024 --layers 1 --heads 4 --seq 2048 \
    --batch ${BATCH:-8} --steps 1 --warmup 1 >> $L 2>&1 &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait $p; echo "fla_warm: process $p ended with $? (t=$SECONDS)" >> $L; done
grep -v Warning $L | tail -6
