#!/usr/bin/env bash
# Generation on the GPU machine (issue 6), after `bash ../shared/gpu/pack.sh -p training --features cuda`
# here; carry [".gpu", ".whl"] (.whl: `pip download --no-deps -d .whl fla-core==0.6.0
# flash-linear-attention==0.6.0 einops`: fla-core has no `fla.models`, the second wheel has; the
# GPU machine has torch 2.11 and transformers 5.17, which it accepts). Measured there (H200, FLA):
# the whole call took 172 s, FLA's side ~100 s of it (building and saving the 1.37B model, Triton
# compiles). Measured (2026-12-03, H200, one call): ours 25.9 ms/token (prompt 25.8 ms), FLA 62.9
# ms/token (prompt 54.7 ms; 44.6 ms/token in an earlier call); greedy ids agree on the first only.
# A 1.3B-shaped GLA (FLA's GLAConfig defaults) with random weights, bf16: FLA builds and saves it
# and times its `generate` (benches/fla_generation.py), then `fla-generate --precision bf16` loads
# the same checkpoint and generates from the same prompt ids, in the same call. Prompt 10 tokens,
# 64 new, greedy; each side warms up once, then the median of REPEAT runs.
# FAMILY=gated_deltanet: the same with GatedDeltaNetConfig's defaults (1.3B: hidden 2048, 21
# layers, 6 heads of key width 256 and value width 512).
set -x
FAMILY=${FAMILY:-gla}
bash ${GPU_DIR:-.gpu}/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
REPEAT=${REPEAT:-3} NEW=${NEW:-64}
# CubeCL's caches from an earlier call (see train_gpu.sh warm), if carried.
[ -f .cubecl-cache.tar.xz ] && mkdir -p ~/.cache && tar -C ~/.cache -xJf .cubecl-cache.tar.xz
pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/site timeout 240 python3 benches/fla_generation.py --family $FAMILY --out /tmp/$FAMILY-1.3b --new $NEW \
  --repeat $REPEAT ${LAYERS:+--layers $LAYERS} 2>&1 | grep -v Warning | tee $OUT/fla-generation.txt | tail -6
ids=$(sed -n 's/^prompt_ids=//p' $OUT/fla-generation.txt)
[ -n "$ids" ] || { echo "FLA's side failed (no prompt ids): see fla-generation.txt"; exit 1; }
(cd /tmp && timeout 300 $R/bin-fla-generate --backend cuda --precision bf16 --model /tmp/$FAMILY-1.3b \
  --prompt-ids "$ids" --max-new-tokens $NEW --repeat $((REPEAT + 1)) > $OUT/ours-ids.txt 2> $OUT/ours-generation.txt)
tail -3 $OUT/ours-generation.txt
# Greedy ids side by side. They may part for two reasons: bf16 rounding differs between the two,
# and FLA's min_new_tokens bans its EOS id (2) while ours has no EOS here.
python3 - $OUT/fla-generation.txt $OUT/ours-ids.txt <<'PY'
import sys
text = open(sys.argv[1]).read()
fla = [int(x) for x in text.split("fla_greedy_ids=")[1].split()[0].split(",")] if "fla_greedy_ids=" in text else []
ours = [int(x) for x in open(sys.argv[2]).read().strip().strip("[]").split(",") if x.strip()]
same = next((i for i, (a, b) in enumerate(zip(fla, ours)) if a != b), min(len(fla), len(ours)))
print(f"greedy ids: the first {same} of {len(fla)} agree")
PY
