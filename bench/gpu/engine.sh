#!/usr/bin/env bash
# LongServe end-to-end engine run on one lent GPU: Qwen2.5-7B-Instruct-1M shapes with random weights, TTFT dense vs
# sparse at 128K / 512K / 1M tokens, peak memory against the planner's terms, decode ms/token at 1M. Stops by itself
# (420 s budget inside the script, a hard timeout of 470 s here). See bench/gpu/README.md for packaging.
#   bash bench/gpu/engine.sh [OUT_DIR]        # default bench/results/engine-<UTC time>
OUT="${1:-bench/results/engine-$(date -u +%Y%m%dT%H%M%SZ)}"
source "$(dirname "$0")/_common.sh"
status=0
timeout --signal=TERM --kill-after=10 470 "$PY" bench/gpu/engine_e2e.py --out "$OUT/engine.json" "${@:2}" 2>&1 \
    | tee "$OUT/log.txt" || status=$?
echo "report: $OUT/engine.json  exit: $status"
exit "$status"
