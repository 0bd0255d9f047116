#!/usr/bin/env bash
# GLA's chunk walks with the state in tensor-core registers (crates/fla-cubecl-kernels/src/gated/
# frag.rs, FLA_GLA_FRAG: 1 the forward, 2 dk/dv, 4 dq; 3 by default since 2026-12-07, 0 none), the
# delta rule's dq/dk-/dW kernel in registers (default since 2026-12-07; FLA_DELTA_FRAG=0 takes
# the tiled kernel) and the attention register
# kernels' second round (FLA_ATTN_FRAG_FAST=1: fetching ahead, mask-free whole blocks, fast
# exponentials): their CUDA tests (PART=tests), then timings beside the defaults, FLA and SDPA,
# per-kernel profiles and memory (PART=times).
# After `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here (.gpu
# trimmed to test-kernels, test-ops, test-table); carry [".gpu", ".whl"]. Steps that would start
# after DEADLINE seconds (default 330) are skipped, so a call with little device time left still
# returns the tests.
D=${DEADLINE:-330}
# ONLY=a,b: only the steps of those names (the names `go` is given below); all by default.
go() {
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$1,"* ]]; then return 1; fi
  [ $SECONDS -lt $D ] || { echo "skipped (t=$SECONDS): $*"; return 1; }
}
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
nvidia-smi --query-gpu=name --format=csv,noheader
t() { # name, test filter, env...
  local name=$1 filter=$2; shift 2
  env FLA_TEST_RUNTIME=cuda "$@" timeout ${TS:-90} $R/${BIN:-test-kernels} $filter --test-threads 16 > $OUT/t-$name.log 2>&1
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
# tests and the timings are now two calls: `PART=tests` (the register walks' whole set with the
# dq walk, bit 4; the default attention set; the delta rule's tiled and half-precision cases)
# and `PART=times` (the tables, FLA and SDPA in the same call, per-kernel profiles, Burn's own
# attention and T = 65536 memory).
case ${PART:-tests} in
tests)
  # FIXTURES=transformer: fla-models' parity fixtures of those families made by FLA here
  # (make_fixtures.py, into the tree the parity tests below read, and copied to $OUT/fixtures).
  if [ -n "${FIXTURES:-}" ] && go fixtures; then
    pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
    (cd crates/fla-models/tests/fixtures && PYTHONPATH=/tmp/site timeout 150 python3 make_fixtures.py --out . --families $FIXTURES 2>&1 | grep -v Warning | tail -8)
    for f in ${FIXTURES//,/ }; do mkdir -p $OUT/fixtures/$f && cp crates/fla-models/tests/fixtures/$f/* $OUT/fixtures/$f/; done
  fi
  # The split (small grids) would bypass the register walks: force the fused walk.
  go gla-frag && TS=${TS_FRAG:-200} t gla-frag "chunk_gla_half_sizes chunk_half_precision chunk_kernel_choice" FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0
  # GLA's forward keeping its scores for the backward (the default since 2026-12-07): the chunk
  # kernel tests with it on, and the Burn op's (its Autodiff and Fusion plumbing).
  go gla-keep && TS=${TS_KEEP:-150} t gla-keep "gated::chunk" FLA_GLA_KEEP_SCORES=1
  # GLA's scores with their off-diagonal blocks on tensor cores (FLA_GLA_SCORES_TC; the default
  # in half precision on CUDA since 2026-12-07, with FLA_GLA_GRADS_TC: 75 of 105 chunk cases
  # reached on an H100 with both forced on, the whole half-precision set among them, none failed).
  go gla-tc && TS=${TS_KEEP:-150} t gla-tc "gated::chunk" FLA_GLA_SCORES_TC=1 FLA_GLA_KEEP_SCORES=1
  # Both in-chunk gradient terms of the `dq` walk with their off-diagonal blocks on tensor cores
  # too (FLA_GLA_GRADS_TC=1), at the default chunk (32) and at FLA's (64).
  go gla-fact && TS=${TS_KEEP:-150} t gla-fact "gated::chunk" FLA_GLA_SCORES_TC=1 FLA_GLA_GRADS_TC=1 FLA_GLA_KEEP_SCORES=1
  go gla-fact64 && TS=${TS_KEEP:-150} t gla-fact64 "gated::chunk" FLA_GLA_SCORES_TC=1 FLA_GLA_GRADS_TC=1 FLA_GLA_KEEP_SCORES=1 FLA_TILED_VCHUNK=64
  # The defaults (both factorings and kept scores on CUDA in f16/bf16, since 2026-12-07), the
  # cases the gla-fact step's limit left (f32 sizes, varlen, without states, the kept-scores and
  # factored-terms tests), then the Burn op's gated chunk tests.
  go gla-default && TS=${TS_DEF:-170} t gla-default "gated::chunk --skip chunk_gla_half_sizes --skip chunk_half_precision"
  go gla-ops && BIN=test-ops TS=${TS_OPS:-150} t gla-ops "gated::chunk"
  go gla-keep-ops && BIN=test-ops TS=${TS_KEEP:-150} t gla-keep-ops "gated::chunk" FLA_GLA_KEEP_SCORES=1
  # Simple GLA through the vector-gate walks (FLA_SIMPLE_SCORES: 1 the forward, 2 the dk/dv
  # walk; opt-in since 2026-12-07, lavapipe-tested only): the kernels' cases (their own process
  # sets FLA_SIMPLE_SCORES=3; f16 there takes the register walks), then the Burn op's gated chunk
  # tests with both on.
  go simple-scores && TS=${TS_SIMPLE:-120} t simple-scores "gated::chunk_simple_gla_through_scores"
  go simple-scores-ops && BIN=test-ops TS=${TS_SIMPLE:-120} t simple-scores-ops "gated::chunk" FLA_SIMPLE_SCORES=3 FLA_TILED_SPLIT=0
  go attn && TS=${TS_ATTN:-170} t attn attn:: FLA_TEST_DTYPE=bf16
  # fla-models' parity with FLA's fixtures on CUDA (issue 6; 31 of 51 reached in an earlier call).
  [ -x $R/test-models ] && go models && BIN=test-models TS=${TS_MODELS:-170} t models parity::
  # Issue 6's round trip: our exports of the families in RT (all by default), loaded by FLA here
  # and compared with our logits (make_fixtures.py --check-ours), RT_S seconds for FLA's side.
  if [ -x $R/test-models ] && go roundtrip; then
    BIN=test-models TS=90 t export export_for_fla
    pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
    rm -rf /tmp/rt && mkdir -p /tmp/rt
    for f in $(ls /work/main/target/fla-export); do
      if [ -z "${RT:-}" ] || [[ ",$RT," == *",$f,"* ]]; then ln -s /work/main/target/fla-export/$f /tmp/rt/$f; fi
    done
    (cd crates/fla-models/tests/fixtures && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site timeout ${RT_S:-150} python3 make_fixtures.py --check-ours /tmp/rt 2>&1 | grep -v Warning | tail -10)
  fi
  # The delta rule's half-precision chunk cases and the kernel-choice test, through the dq/dk⁻/dW
  # kernel in registers (the default; 22 of 22 passed on an H100, 2026-12-07), then the tiled
  # kernel's set (FLA_DELTA_FRAG=0).
  go delta-frag && TS=${TS_DELTA:-150} t delta-frag "delta::half delta::chunk_half_sizes delta::dqk_register"
  go delta && TS=${TS_DELTA:-130} t delta "delta::tiled delta::half delta::sizes" FLA_DELTA_FRAG=0
  ;;
times)
  go gla-tiled && tab gla-tiled chunk_gla FLA_GLA_FRAG=0
  # SWEEP="A=1 B=2;C=3;...": chunk_gla under each setting (`;` between settings, an empty one
  # the defaults), e.g. the planes of the scores kernel, the register walks and the tiled walks
  # (FLA_GLA_SCORES_PLANES, FLA_GLA_FRAG_PLANES, FLA_TILED_PLANES) and the chunk (FLA_TILED_VCHUNK).
  if [ -n "${SWEEP:-}" ] && go sweep; then
    IFS=';' read -ra cfgs <<< "$SWEEP"
    for c in "${cfgs[@]}"; do [ $SECONDS -lt $D ] && tab sweep ${SWEEP_OPS:-chunk_gla} $c; done
  fi
  go gla-default && tab gla-default chunk_gla
  go simple && tab simple-gla chunk_simple_gla
  go simple-scores && tab simple-gla-scores-fwd chunk_simple_gla FLA_SIMPLE_SCORES=1
  go simple-scores && tab simple-gla-scores-both chunk_simple_gla FLA_SIMPLE_SCORES=3
  go simple-scores && tab simple-gla-scores-c32 chunk_simple_gla FLA_SIMPLE_SCORES=3 FLA_SIMPLE_CHUNK=32
  go simple-scores && tab simple-gla-scores-bv32 chunk_simple_gla FLA_SIMPLE_SCORES=3 FLA_GLA_FRAG_BV=32
  go gla && tab gla-frag-fwd-dkv chunk_gla FLA_GLA_FRAG=3
  go gla-all && tab gla-frag-all chunk_gla FLA_GLA_FRAG=7
  go gla-keep && tab gla-keep-scores chunk_gla FLA_GLA_KEEP_SCORES=1
  go gla-tc && tab gla-scores-tc chunk_gla FLA_GLA_SCORES_TC=1
  go gla-tc && tab gla-scores-tc-kept chunk_gla FLA_GLA_SCORES_TC=1 FLA_GLA_KEEP_SCORES=1
  go gla-fact && tab gla-factored chunk_gla FLA_GLA_SCORES_TC=1 FLA_GLA_GRADS_TC=1 FLA_GLA_KEEP_SCORES=1
  go gla-fact-all && tab gla-factored-frag-all chunk_gla FLA_GLA_FRAG=7 FLA_GLA_SCORES_TC=1 FLA_GLA_GRADS_TC=1 FLA_GLA_KEEP_SCORES=1
  go gla-fact64 && tab gla-factored-c64 chunk_gla FLA_GLA_SCORES_TC=1 FLA_GLA_GRADS_TC=1 FLA_GLA_KEEP_SCORES=1 FLA_TILED_VCHUNK=64
  go delta-tiled && tab delta-tiled chunk_delta_rule,chunk_gated_delta_rule FLA_DELTA_FRAG=0
  go delta && tab delta-frag chunk_delta_rule,chunk_gated_delta_rule
  go attn && tab attn parallel_attn
  if go burn-attn; then
    echo "== Burn's own attention under Autodiff, T = 4096 (t=$SECONDS)"
    timeout 100 $R/test-table --backend cuda --dtype bf16 --seq 4096 --ops attention --warmup 1 --iters 3 2>&1 | grep -E "^\| attention|panicked|rror" | head -3
  fi
  if go ref; then
    pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -1
    PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site timeout ${REF_S:-200} python3 benches/fla_gated.py --seq 4096,8192 --ops ${REF_OPS:-chunk_gla,chunk_delta_rule,chunk_gated_delta_rule,sdpa,parallel_attn} --out $OUT 2>&1 | grep -v Warning | tail -12
  fi
  if go prof; then
    # Per-kernel times of one forward+backward at T = 4096 (CubeCL's profiler), PROF_OPS.
    printf '[profiling]\nlogger = { level = "basic", stderr = true }\n' > cubecl.toml
    timeout 80 $R/test-table --backend cuda --dtype bf16 --seq 4096 --ops ${PROF_OPS:-chunk_delta_rule,parallel_attn,chunk_gla} --warmup 2 --iters 1 > $OUT/profile.log 2>&1
    rm -f cubecl.toml
    python3 - $OUT/profile.log <<'PY'
import re, sys, collections
U = {"ns": 1e-3, "µs": 1.0, "ms": 1e3, "s": 1e6}
tot = collections.Counter(); n = collections.Counter()
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"^\| ([\d.]+)(ns|µs|ms|s)\s+\| (.*)", line)
    if m:
        k = m.group(3).split("|")[0].strip()[:70]; tot[k] += float(m.group(1)) * U[m.group(2)]; n[k] += 1
for k, v in tot.most_common(30): print(f"{v/1e3:9.3f} ms {n[k]:5d}x {k}")
PY
  fi
  if go mem; then
    (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) > /tmp/mem.txt &
    MP=$!
    timeout 90 $R/test-table --backend cuda --dtype bf16 --batch 1 --seq 65536 --ops parallel_attn --warmup 1 --iters 2 2>&1 | grep -E "^\| parallel_attn|panicked|rror" | head -3
    kill $MP; echo "peak MiB during T=65536 attention: $(sort -n /tmp/mem.txt | tail -1) (before: $(head -1 /tmp/mem.txt))"
  fi
  ;;
esac
echo "done t=$SECONDS"
