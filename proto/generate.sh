#!/usr/bin/env bash
# Regenerate the committed gRPC stubs in server/api/grpc/pb/ from proto/longserve/v1/generation.proto.
#   proto/generate.sh           rewrite the stubs
#   proto/generate.sh --check   regenerate into a temporary folder and fail on any difference (CI)
# protoc derives the stub's `import ..._pb2` from the proto's path relative to -I, so the proto is staged
# at longserve/server/api/grpc/pb/ in a temporary tree: the stub then imports
# `from longserve.server.api.grpc.pb import generation_pb2` (docs/testing.md#grpc-stubs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SRC="$ROOT/proto/longserve/v1/generation.proto"
DEST="$ROOT/server/api/grpc/pb"
PKG="longserve/server/api/grpc/pb"
FILES=(generation_pb2.py generation_pb2_grpc.py generation_pb2.pyi)

mode="write"
case "${1:-}" in
  "") ;;
  --check) mode="check" ;;
  *) echo "usage: proto/generate.sh [--check]" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in/$PKG" "$work/out"
cp "$SRC" "$work/in/$PKG/generation.proto"
(cd "$work/in" && "$PYTHON" -m grpc_tools.protoc -I . \
  --python_out="$work/out" --grpc_python_out="$work/out" --pyi_out="$work/out" \
  "$PKG/generation.proto")

if [ "$mode" = "check" ]; then
  status=0
  for f in "${FILES[@]}"; do
    if ! diff -u "$DEST/$f" "$work/out/$PKG/$f"; then
      status=1
    fi
  done
  if [ "$status" -ne 0 ]; then
    echo "gRPC stubs in server/api/grpc/pb/ are stale: run proto/generate.sh and commit" >&2
    exit 1
  fi
  echo "gRPC stubs are fresh"
else
  for f in "${FILES[@]}"; do
    cp "$work/out/$PKG/$f" "$DEST/$f"
  done
  echo "wrote ${FILES[*]} to server/api/grpc/pb/"
fi
