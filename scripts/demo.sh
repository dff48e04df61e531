#!/usr/bin/env bash
# The main job end to end on synthetic HAM10000-format data (a few minutes on 2 CPU cores).
set -euo pipefail
MP=${1:-medpipe}
OUT=${2:-demo_out}
mkdir -p "$OUT"
echo "== 1/6 synthesise a HAM10000-format dataset (600x450 JPEGs, 7 classes, lesions with several images)"
"$MP" synth "$OUT/ham" --count 600 --seed 0
echo "== 2/6 ingest: hash and fully decode every image, write the record table"
"$MP" ingest "$OUT/ham" --out "$OUT/data"
echo "== 3/6 split by lesion, stratified by class"
"$MP" split --data "$OUT/data" --seed 0
echo "== 4/6 train a MONAI DenseNet121 at 64x64 on CPU (best checkpoint on val macro AUC)"
rm -rf "$OUT/run"
"$MP" train --data "$OUT/data" --out "$OUT/run" --epochs 6 --image-size 64 --batch-size 32 --bootstrap 500
echo "== 5/6 evaluate the packaged model on the test split (with flip TTA)"
"$MP" evaluate --model "$OUT/run/model" --data "$OUT/data" --split test --tta --out "$OUT/run/report_tta"
echo "== 6/6 predict one image"
IMG=$(ls "$OUT"/ham/HAM10000_images_part_1/*.jpg | head -1)
"$MP" predict --model "$OUT/run/model" "$IMG"
echo
echo "report:  $OUT/run/report/report.md  (plots: roc.png, confusion_matrix.png, reliability.png)"
echo "model:   $OUT/run/model/ (weights.safetensors, model.json, model.tar.gz for SageMaker)"
