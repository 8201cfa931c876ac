#!/usr/bin/env bash
# The full CPU check behind `make test` (testing.md §7). Run from the repository root.
set -euo pipefail
BIN=.venv/bin
export PYTHONSAFEPATH=1 TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ -x proto/generate.sh ]; then
  echo "== gRPC stubs are fresh"
  proto/generate.sh --check
fi
if [ -f .importlinter ]; then
  echo "== import contracts"
  $BIN/lint-imports
fi
if [ -d charts/longserve ]; then
  echo "== helm chart"
  bash tools/helm_check.sh
fi
echo "== pytest"
set +e
$BIN/pytest -q -m "not gpu and not cluster" tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 1; fi
exit "$rc"
