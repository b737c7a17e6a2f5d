#!/usr/bin/env bash
# Score an endoscopy model and the simple baselines with the same
# `xlstm-unet evaluate --task endoscopy` command on a fixed test split, at the
# frames' full resolution. Usage, from the repository root with the venv active:
#
#     bash benchmarks/endoscopy_test_split.sh [SPLIT] [MODEL] [SHARED_DATA_DIR] [OUT_DIR]
#
# Defaults: training/splits/polyps.csv, the shipped model "polyps",
# ../shared/data, runs/benchmark_polyps. The baselines (centred ellipse, Otsu
# on saturation) are fitted on the split's training rows only. Per-image CSVs
# land in OUT_DIR/*.csv; the last line of each printed table is the mean.
set -euo pipefail
split="${1:-training/splits/polyps.csv}"
model="${2:-polyps}"
data="${3:-../shared/data}"
out="${4:-runs/benchmark_polyps}"

python benchmarks/split_folders.py --split "$split" --data-root "$data" --which test --out "$out/test"
xlstm-unet segment "$out/test/images" --task endoscopy --model "$model" --out "$out/pred_model" --overwrite >/dev/null
python benchmarks/endoscopy_baselines.py --split "$split" --data-root "$data" --out "$out/baselines"
for method in model ellipse otsu; do
    folder="$out/pred_$method"
    [ "$method" = model ] || folder="$out/baselines/$method"
    echo "== $method"
    xlstm-unet evaluate --task endoscopy "$folder" "$out/test/masks" --csv "$out/${method}.csv" | tail -n 2 | head -n 1
done
