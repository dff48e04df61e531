#!/usr/bin/env bash
# From your HAM10000 download to a served model: the commands of "Train on your HAM10000 download".
#   bash ham10000.sh SOURCE [WORK] [medpipe train options...]
# SOURCE: dataverse_files.zip as downloaded, or a folder with HAM10000_metadata(.csv) and the images.
# Without train options: the CPU settings, --image-size 64 --budget 25m.
set -euo pipefail
SOURCE=${1:?give the Dataverse zip or the HAM10000 folder}
WORK=${2:-ham}
shift $(( $# < 2 ? $# : 2 ))
OPTS=("$@")
[ ${#OPTS[@]} -gt 0 ] || OPTS=(--image-size 64 --budget 25m)
PORT=${PORT:-8080}
trap '[ -z "${SERVER:-}" ] || kill $SERVER 2>/dev/null || true' EXIT  # stop the server on any exit

# --8<-- [start:commands]
# 1. check every image, write the record table
medpipe ingest "$SOURCE" --out "$WORK/data"

# 2. split by lesion, cache, train, calibrate, package, report on the test split
medpipe train --data "$WORK/data" --out "$WORK/run" "${OPTS[@]}"

# 3. read the report (plots beside it in $WORK/run/report/)
head -n 25 "$WORK/run/report/report.md"

# 4. predict one image (here the first of the record table)
IMAGE=$(sed -n 2p "$WORK/data/records.csv" | cut -d, -f2)
medpipe predict --model "$WORK/run/model" "$IMAGE"

# 5. serve it (web page: http://127.0.0.1:$PORT/) and ask it over HTTP
medpipe serve --model "$WORK/run/model" --port "$PORT" > "$WORK/serve.log" 2>&1 &
SERVER=$!
until curl -fs "http://127.0.0.1:$PORT/ping" > /dev/null; do
  kill -0 $SERVER; sleep 1   # (stop if the server exited)
done
curl -fs -H "Content-Type: image/jpeg" --data-binary @"$IMAGE" \
     "http://127.0.0.1:$PORT/invocations"
# --8<-- [end:commands]
echo
kill -TERM $SERVER && wait $SERVER && SERVER=
