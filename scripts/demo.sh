#!/usr/bin/env bash
# The main job end to end on synthetic HAM10000-format data (a few minutes on 2 CPU cores).
set -euo pipefail
MP=${1:-medpipe}
OUT=${2:-demo_out}
PORT=${DEMO_PORT:-8765}
# Step 9 serves on this port: refuse now (not after minutes of work) if something already listens there,
# or the served answer could come from that other program.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "demo: port $PORT on 127.0.0.1 is already in use; stop that program or set DEMO_PORT" >&2
  exit 1
fi
mkdir -p "$OUT"
echo "== 1/9 synthesise a HAM10000-format dataset (600x450 JPEGs, 7 classes, lesions with several images)"
"$MP" synth "$OUT/ham" --count 600 --seed 0
echo "== 2/9 ingest: hash and fully decode every image, write the record table"
"$MP" ingest "$OUT/ham" --out "$OUT/data"
echo "== 3/9 split by lesion, stratified by class"
"$MP" split --data "$OUT/data" --split-seed 0
echo "== 4/9 train a MONAI DenseNet121 at 64x64 on CPU (best checkpoint on val macro AUC)"
rm -rf "$OUT/run"
"$MP" train --data "$OUT/data" --out "$OUT/run" --epochs 6 --image-size 64 --batch-size 32 --bootstrap 500
echo "== 5/9 evaluate the packaged model on the test split (with flip TTA)"
"$MP" evaluate --model "$OUT/run/model" --data "$OUT/data" --split test --tta --out "$OUT/run/report_tta"
echo "== 6/9 predict one image"
IMAGES=("$OUT"/ham/HAM10000_images_part_1/*.jpg)  # (not `ls | head`: that can die of SIGPIPE under pipefail)
IMG=${IMAGES[0]}
"$MP" predict --model "$OUT/run/model" "$IMG"
echo "== 7/9 batch inference over the image folder (resumable shards, CSV + JSONL + per-file .out)"
rm -rf "$OUT/batch"
"$MP" batch --model "$OUT/run/model" --input "$OUT/ham/HAM10000_images_part_1" --output "$OUT/batch" --per-file
echo "== 8/9 export to ONNX and a MONAI bundle (each checked against the eager model)"
"$MP" export --model "$OUT/run/model" --format onnx --out "$OUT/export/model.onnx" --force
"$MP" export --model "$OUT/run/model" --format bundle --out "$OUT/export/bundle" --force
echo "== 9/9 serve it on 127.0.0.1 and send the image over HTTP, as a client would"
"$MP" serve --model "$OUT/run/model" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
SERVED=0
for _ in $(seq 1 120); do
  if ! kill -0 $SERVER 2>/dev/null; then
    echo "demo: the server stopped; its log:" >&2; cat "$OUT/serve.log" >&2; exit 1
  fi
  if grep -q "serving on" "$OUT/serve.log" && \
     "$MP" predict --url "http://127.0.0.1:$PORT" "$IMG" > "$OUT/served.txt" 2>/dev/null; then SERVED=1; break; fi
  sleep 1
done
if [ "$SERVED" != 1 ]; then echo "demo: no answer from the server on port $PORT" >&2; exit 1; fi
cat "$OUT/served.txt"
kill -TERM $SERVER && wait $SERVER || true
echo
echo "report:  $OUT/run/report/report.md  (plots: roc.png, confusion_matrix.png, reliability.png)"
echo "model:   $OUT/run/model/ (weights.safetensors, model.json; SageMaker: medpipe package --model $OUT/run/model --out model.tar.gz)"
echo "batch:   $OUT/batch/predictions.csv   exports: $OUT/export/"
echo "serve:   $MP serve --model $OUT/run/model   then open http://127.0.0.1:8080/"
