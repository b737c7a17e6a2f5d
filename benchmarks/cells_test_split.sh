#!/usr/bin/env bash
# Score the shipped cell model and the Otsu + watershed baseline with the same
# `xlstm-unet evaluate` command on the DSB2018 test split and on GBM40 (data
# the model never saw). Usage, from the repository root with the venv active:
#
#     bash benchmarks/cells_test_split.sh [SHARED_DATA_DIR] [OUT_DIR] [MODEL]
#
# Defaults: ../shared/data, runs/benchmark_cells, the shipped model "cells".
# Per-image CSVs land in OUT_DIR/*.csv; the last line of each printed table is
# the mean over images.
set -euo pipefail
data="${1:-../shared/data}"
out="${2:-runs/benchmark_cells}"
model="${3:-cells}"

python benchmarks/split_folders.py --split training/splits/dsb2018.csv \
    --data-root "$data" --which test --out "$out/dsb2018_test"
python benchmarks/split_folders.py --data-root "$data" --gbm40 --out "$out/gbm40"

for set in dsb2018_test gbm40; do
    xlstm-unet segment "$out/$set/images" --out "$out/$set/pred_model" --model "$model" --overwrite >/dev/null
    python benchmarks/otsu_baseline.py "$out/$set/images" --out "$out/$set/pred_otsu"
    for method in model otsu; do
        echo "== $set, $method"
        xlstm-unet evaluate "$out/$set/pred_$method" "$out/$set/masks" \
            --csv "$out/${set}_${method}.csv" | tail -n 2 | head -n 1
    done
done
