#!/usr/bin/env bash
# CI's image check (run by tools/check.sh, hence by `make test`): build the CPU variant of the Dockerfile with
# buildah on a Debian base made here with mmdebstrap, serve the demo model inside it, send the README's passkey
# request and require the README's answer. No docker daemon: buildah with the vfs storage driver and chroot
# isolation, the build run in a network namespace of its own (no network: the Dockerfile must be hermetic).
#
# Needs root (apt-get, mmdebstrap, buildah). Developers without root: LONGSERVE_SKIP_IMAGE=1 skips it (CI never
# sets it). Caches under build/image-cache (the base tarball, keyed by release, packages and mmdebstrap version)
# and build/wheelhouse-cpu (tools/wheelhouse.sh); buildah's storage is a temporary folder under build/, removed
# on exit whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${LONGSERVE_SKIP_IMAGE:-0}" = 1 ]; then
  echo "== image check SKIPPED (LONGSERVE_SKIP_IMAGE=1)"; exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "image check: needs root (apt-get, mmdebstrap, buildah); set LONGSERVE_SKIP_IMAGE=1 to skip it" >&2; exit 1
fi
PY=${PYTHON:-.venv/bin/python}
t0=$SECONDS
step() { echo "== image: $* [+$((SECONDS - t0)) s]"; }

# 1. The tools, from Debian's packages.
if ! command -v mmdebstrap > /dev/null || ! command -v buildah > /dev/null; then
  step "installing mmdebstrap and buildah"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap buildah > /dev/null
fi

# 2. The base: a minimal Debian root filesystem of this machine's release with python3 (the wheelhouse's 3.11).
RELEASE=$(. /etc/os-release && echo "$VERSION_CODENAME")
PKGS=python3,ca-certificates
key=$(echo "$RELEASE $PKGS minbase nodoc $(dpkg-query -W -f='${Version}' mmdebstrap)" | sha256sum | cut -c1-16)
BASE_TAR=build/image-cache/debian-$RELEASE-$key.tar
mkdir -p build/image-cache
if [ ! -s "$BASE_TAR" ]; then
  step "mmdebstrap $RELEASE (minbase + $PKGS) -> $BASE_TAR"
  rm -f build/image-cache/debian-*.tar
  mmdebstrap --quiet --mode=root --format=tar --variant=minbase --include="$PKGS" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    "$RELEASE" "$BASE_TAR.part"
  mv "$BASE_TAR.part" "$BASE_TAR"
else
  step "base tarball cached: $BASE_TAR"
fi

# 3. The wheelhouse (CPU torch).
PYTHON=$PY bash tools/wheelhouse.sh cpu

# 4. buildah in a private storage folder, removed on exit along with the server if one runs. vfs keeps a full
# copy of the root filesystem per layer and container (about 8 GB at the peak here), so the folder is a tmpfs
# when the memory allows: no disk traffic, and removal is an unmount.
ST=$(mkdir -p build && mktemp -d build/image-check.XXXXXX)
B=(buildah --root "$PWD/$ST/root" --runroot "$PWD/$ST/run" --storage-driver vfs)
SERVER_PID=
ON_TMPFS=0
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    # the server runs in the session setsid made for it (buildah and timeout regroup their children): end it all
    pkill -TERM -s "$SERVER_PID" 2> /dev/null || true
    for _ in $(seq 30); do pgrep -s "$SERVER_PID" > /dev/null || break; sleep 1; done
    pkill -KILL -s "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
  fi
  # vfs keeps plain copies and no mounts outlive `buildah run`: removing the folder removes every layer
  if [ "$ON_TMPFS" = 1 ]; then umount "$ST" || umount -l "$ST"; fi
  rm -rf "$ST"
}
trap cleanup EXIT
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if [ "${avail_kb:-0}" -gt $((14 * 1024 * 1024)) ] && mount -t tmpfs -o size=11g,mode=0700 longserve-image "$ST"; then
  ON_TMPFS=1
fi
mkdir -p "$ST/tmp"
export TMPDIR="$PWD/$ST/tmp"      # buildah's temporary blobs go beside its storage

step "buildah storage in $ST ($([ "$ON_TMPFS" = 1 ] && echo tmpfs || echo disk))"
step "importing the base as localhost/longserve-base:$RELEASE"
ctr=$("${B[@]}" from scratch)
"${B[@]}" add --quiet "$ctr" "$BASE_TAR" / > /dev/null
"${B[@]}" commit --quiet --rm "$ctr" "localhost/longserve-base:$RELEASE" > /dev/null

step "building the cpu variant (no network)"
VERSION=$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
REVISION=$(git rev-parse HEAD 2> /dev/null || echo unknown)
IMAGE=localhost/longserve:check
unshare --net "${B[@]}" bud --quiet --isolation chroot --layers=false -f Dockerfile \
  --build-arg "BASE_IMAGE=localhost/longserve-base:$RELEASE" --build-arg VARIANT=cpu \
  --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" -t "$IMAGE" . > /dev/null
user=$("${B[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
label=$("${B[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.revision"}}' "$IMAGE")
size=$("${B[@]}" images --format '{{.Size}}' "$IMAGE")
step "built $IMAGE: $size, user $user, revision label $label"
[ "$user" = 10001:10001 ] || { echo "image check: the image runs as '$user', not 10001:10001" >&2; exit 1; }
[ "$label" = "$REVISION" ] || { echo "image check: revision label '$label' != $REVISION" >&2; exit 1; }

# 5. Serve the demo model inside the image (the Makefile's DEMO_ARGS, as user 10001) and ask the README's question.
read -r -a DEMO_ARGS <<< "$(sed -n 's/^DEMO_ARGS := //p' Makefile)"
read -r HTTP_PORT GRPC_PORT < <($PY -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')
ctr=$("${B[@]}" from --name longserve-smoke "$IMAGE")
step "serving the demo model in the image on 127.0.0.1:$HTTP_PORT"
setsid "${B[@]}" run --isolation chroot --user 10001:10001 --workingdir /work \
  -v "$PWD/models/demo-passkey:/work/models/demo-passkey:ro" "$ctr" -- \
  timeout 900 longserve serve "${DEMO_ARGS[@]}" --port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  > "$ST/serve.log" 2>&1 &
SERVER_PID=$!
if ! $PY tools/image_smoke.py "$HTTP_PORT" --wait 240; then
  echo "image check: the demo in the image did not answer as the README says; server log:" >&2
  tail -n 40 "$ST/serve.log" >&2
  exit 1
fi
# The weights Job's command is in the image too (its behaviour is tested in tests/server/test_download.py).
"${B[@]}" run --isolation chroot --user 10001:10001 "$ctr" -- longserve download --help | grep -c -- '--dest DIR' > /dev/null
step "passed"
