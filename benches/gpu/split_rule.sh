#!/usr/bin/env bash
# Where the tiled chunk kernels' split (a states pass, then every span in parallel) should start to
# be taken, after `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels -p fla-models -p training
# --features cuda` here; carry [".gpu"]. `split_forward` takes it where the walk's cubes fill less
# than half of the SMs; FLA's 340M recipe (4 heads, V = 256, batch 8) has 128 walk cubes, about
# one per SM of an H100, so it walks. Measured here, walk (FLA_TILED_SPLIT=0) against split (=1):
# 1. the ops alone at the same cube count: B = 8, H = 8, K = V = 128, T = 2048 (V/64 · H · B = 128);
# 2. the recipe cut to LAYERS (default 4) layers, tokens/s of steps 3 on.
set -x
bash .gpu/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=/tmp/gpu-run
for s in 0 1; do
  FLA_TILED_SPLIT=$s timeout 150 $R/test-table --backend cuda --dtype bf16 --batch ${BATCH:-8} \
    --heads ${HEADS:-8} --dim 128 --seq ${SEQ:-2048} --ops ${OPS:-chunk_gla,chunk_simple_gla} \
    --out $OUT/split$s 2>&1 | tail -4
done
L=${LAYERS:-4}
python3 -c "import json; c = json.load(open('training/configs/gla-340M.json')); c['num_hidden_layers'] = $L; json.dump(c, open('/tmp/gla-$L.json', 'w'))"
for s in 0 1 0 1; do
  (cd /tmp && FLA_TILED_SPLIT=$s timeout -k 30 ${TRAIN_S:-150} $R/bin-fla-train --backend cuda --precision bf16 \
     --config /tmp/gla-$L.json --seq-len 2048 --batch 8 --steps ${STEPS:-10} --warmup 1 \
     --eval-every 1000 --checkpoint-every 0 --metrics $OUT/layers-$L-split$s.csv 2>&1 | tail -2)
  python3 - $OUT/layers-$L-split$s.csv $s <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
vals = [float(r['tokens_per_s']) for r in rows if r['tokens_per_s'] and int(r['step']) >= 3]
print(f"split={sys.argv[2]}: median tokens/s of steps 3 on: {statistics.median(vals):.0f} ({len(vals)} steps)")
PY
done
