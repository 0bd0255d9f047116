#!/usr/bin/env bash
# The call that waits for a GPU (written 2026-12-07, when none was lent): what the last sessions
# built opt-in or changed without a CUDA run, tested on CUDA, then timed beside FLA in the same
# call. Most important first, so a call cut short still returns it:
#   1. CUDA tests: GLA's chunk cases with the defaults (round_tile now walks tile_entry /
#      regs_for; last run on CUDA before that change), the cases no CUDA run reached (f32 sizes
#      from T = 129, varlen, other chunks, without states), the register diagonal
#      (FLA_GLA_DIAG_REGS=1), simple GLA through GLA's walks (FLA_SIMPLE_SCORES=3).
#   2. Timings at T = 4096 / 8192 (B = 8, H = 16, K = V = 128, bf16): chunk_gla's defaults and
#      knobs, chunk_simple_gla's default and routes, FLA 0.6.0 in the same call (its Triton
#      kernels compile in the background during step 1).
#   3. The per-kernel profile of chunk_simple_gla through the route.
# After /tmp/mypack.sh-style packing (-p fla -p fla-cubecl-kernels --features cuda: tests kernels
# and ops, bench table), carry [".gpu", ".whl"]: `bash benches/gpu/pending.sh`.
WARM_TRAIN=0 bash benches/gpu/fla_warm.sh > $OUT/warm.txt 2>&1 &
W=$!
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
nvidia-smi --query-gpu=name --format=csv,noheader
k() { # name, seconds, filters... (environment before the call)
  local n=$1 s=$2
  shift 2
  env FLA_TEST_RUNTIME=cuda timeout $s $R/test-kernels "$@" --test-threads 16 > $OUT/t-$n.log 2>&1
  echo "$n (t=$SECONDS): $(grep -c '\.\.\. ok' $OUT/t-$n.log) ok, $(grep -c 'FAILED\|panicked' $OUT/t-$n.log) failed"
  grep -E 'test result|panicked|FAILED' $OUT/t-$n.log | head -6
}
k left 90 gated::chunk_sizes gated::chunk_varlen gated::chunk_vector_gates_in_other gated::chunk_without_states gated::chunk_factored gated::chunk_kept
k simple 60 gated::chunk_simple_gla_through_scores
FLA_GLA_DIAG_REGS=1 k diag 90 gated::chunk_factored gated::chunk_gla_half_sizes gated::chunk_half_precision gated::chunk_kept
wait $W
tail -3 $OUT/warm.txt
echo "FLA warm-up done (t=$SECONDS)"
# Ours, then FLA (REF_S bounds it), then the GLA knobs while time is left (DEADLINE counts from
# each script's start).
DEADLINE=60 ONLY=simple,simple-scores PART=times bash benches/gpu/gla_frag.sh
ONLY=ref REF_OPS=chunk_gla,chunk_simple_gla REF_S=150 PART=times bash benches/gpu/gla_frag.sh
DEADLINE=$((540 - SECONDS)) SWEEP=";FLA_GLA_DIAG_REGS=1;FLA_GLA_SCORES_PLANES=8" ONLY=sweep \
  PART=times bash benches/gpu/gla_frag.sh
[ $SECONDS -lt 540 ] && FLA_SIMPLE_SCORES=3 ONLY=prof PROF_OPS=chunk_simple_gla PART=times bash benches/gpu/gla_frag.sh
echo "pending.sh done t=$SECONDS"
