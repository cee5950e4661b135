#!/bin/sh
# Runs each fuzz target for $SECS seconds (default 600), one after another, from fuzz/seeds plus
# whatever fuzz/corpus/<target> holds. Logs go to fuzz/logs/<target>.log (ignored by git).
# Usage (from the repository root): sh fuzz/run-all.sh [target...]
set -u
SECS=${SECS:-600}
TARGETS=${*:-"recipe csv_ingest gguf safetensors chat_template"}
ROOT=$(pwd)
mkdir -p fuzz/logs
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t"
    dict=""
    [ -f "fuzz/dicts/$t.dict" ] && dict="-dict=$ROOT/fuzz/dicts/$t.dict"
    nice -n 10 cargo +nightly fuzz run -O -a -s none "$t" "$ROOT/fuzz/corpus/$t" "$ROOT/fuzz/seeds/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 $dict \
        > "fuzz/logs/$t.log" 2>&1
    echo "$t: exit $? $(grep -E '^#[0-9]+' "fuzz/logs/$t.log" | tail -1)"
done
