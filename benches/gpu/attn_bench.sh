#!/usr/bin/env bash
# On the GPU machine, from the repository root, after `VULKAN=1 bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels --features cuda`
# here; carry [".gpu", ".whl"] (.whl: `pip download --no-deps fla-core==0.6.0 einops`). Not yet run: no GPU was lent to the session that wrote it.
# Attention benchmark: ours (parallel_attn, Burn's attention) and FLA/SDPA in the same call,
# then T = 65536 forward+backward with the GPU's peak memory.
set -x
SEQ=${SEQ:-2048,4096,8192,16384}
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
T=/tmp/gpu-run/test-table
$T --backend cuda --dtype bf16 --seq $SEQ --ops parallel_attn,attention --out $OUT/ours 2>&1 | tail -12
pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/site timeout 400 python3 benches/fla_gated.py --warm --seq $SEQ --ops sdpa,sdpa_cudnn,parallel_attn --ours $OUT/ours/ours.csv --out $OUT 2>&1 | grep -v Warning | tail -30
(while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) > /tmp/mem.txt &
MP=$!
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits
$T --backend cuda --dtype bf16 --batch 1 --seq 65536 --ops parallel_attn --warmup 1 --iters 3 2>&1 | tail -3
kill $MP; echo "peak MiB during T=65536: $(sort -n /tmp/mem.txt | tail -1) (idle before: $(head -1 /tmp/mem.txt))"
rm -f $OUT/ours/ours.md
