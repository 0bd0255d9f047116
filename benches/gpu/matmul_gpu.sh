#!/usr/bin/env bash
# Matmul throughput through Burn on the 340M GLA recipe's shapes (benches/matmul.rs: CubeBackend
# alone, the fused backend alone, and fused with an element-wise op after the product) beside
# torch's cuBLAS (benches/torch_matmul.py), in one call, on the GPU machine, after
# `VULKAN=1 bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda` here; carry [".gpu"].
# The autotune's per-candidate results (which kernels were tried, which won, which failed to launch)
# go to $OUT/autotune.log (cubecl.toml's autotune logger at "full"), the tables to $OUT.
# SHAPES, PRODUCTS, MODES, TOKENS override the bench's defaults.
set -x
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
SRC=$PWD
mkdir -p /tmp/mm && cd /tmp/mm
printf '[autotune.logger]\nlevel = "full"\nfile = "%s"\n' $OUT/autotune.log > cubecl.toml
ARGS="--tokens ${TOKENS:-16384}"
[ -n "$SHAPES" ] && ARGS="$ARGS --shapes $SHAPES"
[ -n "$PRODUCTS" ] && ARGS="$ARGS --products $PRODUCTS"
[ -n "$MODES" ] && ARGS="$ARGS --modes $MODES"
timeout ${OURS_S:-400} $R/test-matmul --backend cuda --dtype bf16 $ARGS --out $OUT 2>&1 | tail -50
cd $SRC
# Ours as far as it got (the table is rewritten after each row), joined if there is any.
OURS=; [ -f $OUT/matmul.csv ] && OURS="--ours $OUT/matmul.csv"
python3 benches/torch_matmul.py --dtype bf16 $(echo $ARGS | sed 's/--modes [^ ]*//') --out $OUT $OURS 2>&1 | tail -60
xz -T0 $OUT/autotune.log
