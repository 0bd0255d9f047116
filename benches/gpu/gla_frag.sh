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
# Measured 2026-12-07 on an H100 (benches/results/h100-bf16-frag-20261207.md): each test step
# stopped at its limit before its set was done (12, 46, 40 and 46 cases, none failed), so the
# limits below are longer and the steps the next call owes come first: the register walks' whole
# set (now with the dq walk, bit 4), the default attention kernels' set, then the timings.
# The split (small grids) would bypass the register walks: force the fused walk.
TS=${TS_FRAG:-240} t gla-frag "chunk_gla_half_sizes chunk_half_precision chunk_kernel_choice" FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0
go attn && TS=200 t attn attn:: FLA_TEST_DTYPE=bf16
go tab && tab gla-tiled chunk_gla FLA_GLA_FRAG=0
go tab && tab gla-frag-fwd-dkv chunk_gla FLA_GLA_FRAG=3
go tab && tab gla-frag-all chunk_gla FLA_GLA_FRAG=7
go delta && TS=150 t delta "delta::tiled delta::half delta::sizes"
go tab && tab delta chunk_delta_rule,chunk_gated_delta_rule
if go ref; then
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
  PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site timeout 240 python3 benches/fla_gated.py --seq 4096,8192 --ops ${REF_OPS:-chunk_gla,sdpa,chunk_gated_delta_rule,parallel_attn,chunk_delta_rule} --out $OUT 2>&1 | grep -v Warning | tail -10
fi
if go ncu; then
  FLA_GLA_FRAG=7 FLA_ATTN_FRAG_FAST=1 timeout 60 ncu --clock-control none -k regex:"frag" --launch-count 7 --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats $R/test-table --backend cuda --dtype bf16 --seq 4096 --ops chunk_gla,parallel_attn --warmup 0 --iters 1 > $OUT/ncu.txt 2>&1
  echo "ncu rc $?"; grep -E "frag_kernel|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" $OUT/ncu.txt | head -40
fi
go more && TS=40 t gla-frag-p8 chunk_gla_half_sizes FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0 FLA_GLA_FRAG_PLANES=8
go more && TS=40 t gla-frag-c64 chunk_gla_half_sizes FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0 FLA_TILED_VCHUNK=64
go more && TS=150 t attn-f16 attn:: FLA_TEST_DTYPE=f16
echo "done t=$SECONDS"
