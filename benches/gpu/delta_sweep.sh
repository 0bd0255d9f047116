#!/usr/bin/env bash
# Per-kernel times of the delta chunk fwd+bwd under tuning variables, one line per setting.
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
printf '[profiling]\nlogger = { level = "basic", stderr = true }\n' > cubecl.toml
for setting in "$@"; do
  env $setting $R/test-table --backend cuda --dtype bf16 --seq ${SEQ:-4096} --ops ${OPS:-chunk_gated_delta_rule} \
    --warmup 1 --iters 1 --out /tmp/prof > /tmp/p.log 2>&1
  echo "== $setting"
  # the last summary: the warm iteration
  tac /tmp/p.log | awk '/Total/{n++} n==1' | tac | grep -E "Delta|Tiled|Total" | grep "%" | sed 's/| CudaRuntime *//; s/  */ /g' | cut -d'|' -f2,3 | tr '\n' ' '; echo
done
rm cubecl.toml
