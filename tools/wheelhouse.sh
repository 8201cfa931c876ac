#!/usr/bin/env bash
# Prepare the wheelhouse the image is built from: every wheel `longserve[server]` needs, pinned by
# constraints.txt, plus our own wheel and a pip wheel to install with. The image build then installs with
# `--no-index` from this folder alone, so it needs no network.
#
#   tools/wheelhouse.sh cpu|gpu [DIR]     (default DIR: build/wheelhouse-VARIANT)
#
# The variant picks the torch build: `gpu` takes the package index's CUDA build (exactly 2.13.0, no local
# version label, with the triton 3.7.1 it requires); `cpu` takes 2.13.0+cpu (and CI's triton 3.6.0), which must be reachable through pip's configuration
# (PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL pointing at CPU builds) — without it pip would fall back to the
# CUDA build and its several GB of CUDA libraries. The dependency wheels are reused while the key (the
# variant, constraints.txt, pyproject.toml, the Python version) is unchanged; our own wheel is always rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:?usage: tools/wheelhouse.sh cpu|gpu [DIR]}
DIR=${2:-build/wheelhouse-$VARIANT}
PY=${PYTHON:-.venv/bin/python}
case "$VARIANT" in
  cpu) TORCH_PIN='torch==2.13.0+cpu' ;;
  gpu) TORCH_PIN='torch===2.13.0' ;;    # '===' is exact string equality: excludes 2.13.0+cpu
  *) echo "wheelhouse: VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 2 ;;
esac

key=$( { echo "$VARIANT $TORCH_PIN"; $PY -c 'import sys; print(sys.version_info[:2])'; cat constraints.txt pyproject.toml; } \
      | sha256sum | cut -c1-16)
mkdir -p "$DIR" build
if [ "$(cat "$DIR/.key" 2>/dev/null)" != "$key" ]; then
  echo "== wheelhouse ($VARIANT): dependencies into $DIR"
  rm -rf "$DIR"; mkdir -p "$DIR"
  # constraints.txt with the variant's torch (and, for the CUDA build, the triton it requires) in place of CI's
  grep -v -E '^(torch|triton)\b' constraints.txt > "build/constraints-$VARIANT.txt"
  case "$VARIANT" in
    cpu) grep -E '^triton\b' constraints.txt ;;
    gpu) echo 'triton==3.7.1' ;;
  esac >> "build/constraints-$VARIANT.txt"
  echo "$TORCH_PIN" >> "build/constraints-$VARIANT.txt"
  if ! $PY -m pip wheel --quiet --wheel-dir "$DIR" -c "build/constraints-$VARIANT.txt" ".[server]" pip \
      > build/wheel.log 2>&1; then
    cat build/wheel.log >&2; exit 1
  fi
  echo "$key" > "$DIR/.key"
else
  echo "== wheelhouse ($VARIANT): dependencies cached in $DIR (key $key)"
fi
# Our own wheel, always fresh: drop the previous one (and setuptools' build/lib, which would keep modules
# deleted since) so the folder holds exactly one, built from the working tree as it is.
rm -rf "$DIR"/longserve-*.whl build/lib build/bdist.*
if ! $PY -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DIR" . > build/wheel.log 2>&1; then
  cat build/wheel.log >&2; exit 1
fi
rm -rf build/lib build/bdist.*

if [ "$VARIANT" = cpu ] && ls "$DIR" | grep -q '^nvidia_'; then
  echo "wheelhouse: the cpu variant resolved CUDA libraries (nvidia_*): point pip at CPU torch builds" >&2; exit 1
fi
echo "== wheelhouse ($VARIANT): $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
