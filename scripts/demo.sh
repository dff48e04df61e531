#!/usr/bin/env bash
# The main job end to end on synthetic HAM10000-format data.
set -euo pipefail
MP=${1:-medpipe}
OUT=${2:-demo_out}
mkdir -p "$OUT"
echo "== 1/3 synthesise a HAM10000-format dataset (600x450 JPEGs)"
"$MP" synth "$OUT/ham" --count 600 --seed 0
echo "== 2/3 ingest: validate every image, write the record table"
"$MP" ingest "$OUT/ham" --out "$OUT/data"
echo "== 3/3 split by lesion, stratified by class"
"$MP" split --data "$OUT/data" --seed 0
echo
echo "record table: $OUT/data/records.csv   report: $OUT/data/ingest_report.json   splits: $OUT/data/splits.csv"
