#!/usr/bin/env bash
# GLA's chunk walks with the state in tensor-core registers (crates/fla-cubecl-kernels/src/gated/
# frag.rs, opt-in FLA_GLA_FRAG: 1 the forward, 2 dk/dv, 4 dq, 7 all) and the attention register
# kernels' second round (FLA_ATTN_FRAG_FAST=1: fetching ahead, mask-free whole blocks, fast
# exponentials): their CUDA tests, then timings beside the defaults, FLA and SDPA, then ncu.
# After `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here (.gpu
# trimmed to test-kernels, test-ops, test-table); carry [".gpu", ".whl"]. Steps that would start
# after DEADLINE seconds (default 330) are skipped, so a call with little device time left still
# returns the tests.
D=${DEADLINE:-330}
go() { [ $SECONDS -lt $D ] || { echo "skipped (t=$SECONDS): $*"; return 1; }; }
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
nvidia-smi --query-gpu=name --format=csv,noheader
t() { # name, test filter, env...
  local name=$1 filter=$2; shift 2
  env FLA_TEST_RUNTIME=cuda "$@" timeout ${TS:-90} $R/test-kernels $filter --test-threads 16 > $OUT/t-$name.log 2>&1
  echo "$name (t=$SECONDS): $(grep -c '\.\.\. ok' $OUT/t-$name.log) ok, $(grep -c 'FAILED\|panicked' $OUT/t-$name.log) failed/panicked"
  grep -E 'test result|panicked|FAILED' $OUT/t-$name.log | head -8
}
tab() { # label, ops, env...
  local label=$1 ops=$2; shift 2
  echo "== $label $* (t=$SECONDS)"
  env "$@" timeout 60 $R/test-table --backend cuda --dtype bf16 --seq 4096,8192 --ops $ops \
    --warmup 3 --iters 10 2>&1 | grep -E "^\| (${ops//,/|})|panicked|rror" | head -6
}
# The split (small grids) would bypass the register walks: force the fused walk.
TS=100 t gla-frag "chunk_gla_half_sizes chunk_half_precision chunk_kernel_choice" FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0
# The tiled kernels as they run by default (the dq walk without the in-chunk terms, which
# vector_grads_kernel sums for every chunk in parallel since 8e7f3fd).
TS=120 t gated-chunk gated::chunk
tab gla-tiled chunk_gla FLA_GLA_FRAG=0
tab gla-frag-fwd chunk_gla FLA_GLA_FRAG=1
tab gla-frag-fwd-dkv chunk_gla FLA_GLA_FRAG=3
tab gla-frag-all chunk_gla FLA_GLA_FRAG=7
# The delta rule's WY kernel with its inverse blocked (eb3f970): its tests (chunk 64, the
# default here, and the merges at 32/48/64) and its timings.
go delta && TS=90 t delta delta::
go tab && tab delta chunk_delta_rule,chunk_gated_delta_rule
go attn && t attn-fast attn:: FLA_TEST_DTYPE=bf16 FLA_ATTN_FRAG_FAST=1
go tab && tab attn parallel_attn FLA_ATTN_FRAG_FAST=0
go tab && tab attn-fast parallel_attn FLA_ATTN_FRAG_FAST=1
go tab && tab attn-fast-bwd8 parallel_attn FLA_ATTN_FRAG_FAST=1 FLA_ATTN_FRAG_BWD_PLANES=8
if go ref; then
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
  PYTHONPATH=/tmp/site timeout 150 python3 benches/fla_gated.py --seq 4096,8192 --ops ${REF_OPS:-chunk_gla,sdpa,parallel_attn,chunk_delta_rule,chunk_gated_delta_rule} --out $OUT 2>&1 | grep -v Warning | tail -10
fi
if go ncu; then
  FLA_GLA_FRAG=7 FLA_ATTN_FRAG_FAST=1 timeout 60 ncu --clock-control none -k regex:"frag" --launch-count 7 --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats $R/test-table --backend cuda --dtype bf16 --seq 4096 --ops chunk_gla,parallel_attn --warmup 0 --iters 1 > $OUT/ncu.txt 2>&1
  echo "ncu rc $?"; grep -E "frag_kernel|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" $OUT/ncu.txt | head -40
fi
go more && TS=40 t gla-frag-p8 chunk_gla_half_sizes FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0 FLA_GLA_FRAG_PLANES=8
go more && TS=40 t gla-frag-c64 chunk_gla_half_sizes FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0 FLA_TILED_VCHUNK=64
go more && t attn-fast-f16-bwd8 attn:: FLA_TEST_DTYPE=f16 FLA_ATTN_FRAG_FAST=1 FLA_ATTN_FRAG_BWD_PLANES=8
echo "done t=$SECONDS"
