#!/usr/bin/env bash
# LongServe GPU kernel check: one run, under 8 minutes on one H200 (docs/testing.md#gpu-check).
#
# Exact commands (from the repository root):
#   here, before the lease:   .venv/bin/pip wheel --no-deps --no-build-isolation -w dist .   # ~180 kB, offline
#   on the GPU machine:       pip install --no-deps dist/longserve-*.whl      # over the image's torch/triton
#                             (or: pip install --no-deps --no-build-isolation -e .)
#   dist/ is git-ignored: a device tool that copies the working tree must be told to carry it.
#                             bash bench/gpu/kernels.sh [OUT_DIR]     # default bench/results/gpu-<UTC time>
# The script installs nothing. It runs `PYTHONSAFEPATH=1 python bench/gpu/check.py --out OUT_DIR` by path
# (never `python -m` from the root: the repository's operator/ folder would shadow the stdlib module), with a hard
# timeout. Sections (env, correctness, timing) are time-boxed inside check.py and report.json is rewritten after
# each one, so a timeout still leaves data. The ratio table lands in OUT_DIR/table.md for bench/RESULTS.md.
# Optional first step without a GPU: `PYTHONSAFEPATH=1 python bench/gpu/compile_check.py` compiles every kernel
# for sm_90 on the CPU machine.
OUT="${1:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
source "$(dirname "$0")/_common.sh"
status=0
timeout --signal=TERM --kill-after=10 470 "$PY" bench/gpu/check.py --out "$OUT" 2>&1 | tee "$OUT/log.txt" \
    || status=$?
echo "report: $OUT/report.json  table: $OUT/table.md  exit: $status"
exit "$status"
