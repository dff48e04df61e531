#!/usr/bin/env bash
# From your HAM10000 download to a served model (the commands of "Train on your HAM10000 download").
#   bash ham10000.sh SOURCE [WORK] [medpipe train options...]
# SOURCE: dataverse_files.zip as downloaded, or a folder holding HAM10000_metadata(.csv) and the images.
# Without train options it uses the CPU settings: --image-size 64 --budget 25m.
set -euo pipefail
SOURCE=${1:?give the Dataverse zip or the HAM10000 folder}
WORK=${2:-ham}
shift $(( $# < 2 ? $# : 2 ))
OPTS=("$@")
[ ${#OPTS[@]} -gt 0 ] || OPTS=(--image-size 64 --budget 25m)
PORT=${PORT:-8080}

# 1. check every image (hash, full decode) and write the record table: DATA/records.csv + ingest_report.json
medpipe ingest "$SOURCE" --out "$WORK/data"
# 2. split by lesion, cache the pixels, train, calibrate, package, evaluate on the test split
medpipe train --data "$WORK/data" --out "$WORK/run" "${OPTS[@]}"
# 3. the test-split report (macro AUC with 95% CI, balanced accuracy, per class; plots beside it)
head -n 25 "$WORK/run/report/report.md"
# 4. predict one image from the command line
IMAGE=$(python3 -c "import csv,sys; print(next(csv.DictReader(open(sys.argv[1])))['path'])" "$WORK/data/records.csv")
medpipe predict --model "$WORK/run/model" "$IMAGE"
# 5. serve it (web page at http://127.0.0.1:$PORT/) and ask it over HTTP
medpipe serve --model "$WORK/run/model" --port "$PORT" > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -fs "http://127.0.0.1:$PORT/ping" > /dev/null; do
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
  sleep 1
done
curl -fs -H "Content-Type: image/jpeg" --data-binary @"$IMAGE" "http://127.0.0.1:$PORT/invocations"
echo
kill -TERM $SERVER && wait $SERVER
