#!/usr/bin/env bash
# The full CPU check behind `make test` (docs/testing.md#ci). Run from the repository root.
set -euo pipefail
BIN=.venv/bin
export PYTHONSAFEPATH=1 TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ -x proto/generate.sh ]; then
  echo "== gRPC stubs are fresh"
  proto/generate.sh --check
fi
echo "== lint (ruff)"
$BIN/ruff check .
if [ -f .importlinter ]; then
  echo "== import contracts"
  $BIN/lint-imports
fi
if [ -d charts/longserve ]; then
  echo "== helm chart"
  bash tools/helm_check.sh
fi
# The image (docs/image.md#image-ci): build the CPU variant with buildah and ask the demo in it the README's
# question. Before pytest so that pytest's summary stays the last line; a failure fails the run after pytest.
set +e
PYTHON=$BIN/python bash tools/image_check.sh
image_rc=$?
set -e
echo "== pytest"
set +e
$BIN/pytest -q -m "not gpu and not cluster" tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 1; fi
if [ "$image_rc" -ne 0 ]; then echo "image check FAILED (exit $image_rc)"; exit "$image_rc"; fi
exit "$rc"
