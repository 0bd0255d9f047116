#!/usr/bin/env bash
# Tile choices of the tiled chunk kernels at FLA's 340M recipe shape (4 heads, K = 128, V = 256
# per head, batch 8, T = 2048), after `bash ../shared/gpu/pack.sh -p fla -p fla-cubecl-kernels -p
# fla-models -p training --features cuda` here; carry [".gpu"] (GPU_DIR names another folder).
# `split_forward` takes the split (a states pass, then every span in parallel) where the walk's
# cubes fill less than half of the SMs; at this shape the walk has V/64 · H · B = 128 cubes,
# about one per SM, so it walks (each of a head's four value blocks summed the vector-gated
# scores again until 2026-12-06; vector_scores_kernel now sums them once). Each VARIANT
# (environment settings, `;`-separated) trains the recipe cut to LAYERS (default 4) layers for
# STEPS steps: median tokens/s of steps 3 on. BIN_DIR: another extracted payload's folder (a
# baseline build) in place of .gpu's.
set -x
bash ${GPU_DIR:-.gpu}/run.sh zzz-extract-only >/dev/null 2>&1
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
R=${BIN_DIR:-/tmp/gpu-run}
L=${LAYERS:-4}
python3 -c "import json; c = json.load(open('training/configs/gla-340M.json')); c['num_hidden_layers'] = $L; json.dump(c, open('/tmp/gla-$L.json', 'w'))"
IFS=';' read -ra VS <<< "${VARIANTS:-FLA_TILED_SPLIT=0;FLA_TILED_SPLIT=1}"
i=0
for v in "${VS[@]}"; do
  i=$((i+1))
  (cd /tmp && env $v timeout -k 30 ${TRAIN_S:-150} $R/bin-fla-train --backend cuda --precision bf16 \
     --config /tmp/gla-$L.json --seq-len 2048 --batch 8 --steps ${STEPS:-10} --warmup 1 \
     --eval-every 1000 --checkpoint-every 0 --metrics $OUT/layers-$L-${TAG}v$i.csv $EXTRA 2>&1 | tail -1)
  python3 - $OUT/layers-$L-${TAG}v$i.csv "$v" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
vals = [float(r['tokens_per_s']) for r in rows if r['tokens_per_s'] and int(r['step']) >= 3]
print(f"[{sys.argv[2]}] median tokens/s of steps 3 on: {statistics.median(vals):.0f} ({len(vals)} steps)")
PY
done
