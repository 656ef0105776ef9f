#!/usr/bin/env bash
# Builds one container image per worker, REPO/WORKER:TAG, from
# images/WORKER/Containerfile, the static binary BIN_DIR/WORKER and the host's
# CA bundle, with buildah (or podman build when buildah is missing). Each image
# is then run once with --version to prove that the binary starts inside it.
#
# usage: scripts/build-images.sh REPO TAG BIN_DIR WORKER...
#   e.g. scripts/build-images.sh localhost/populator dev target/x86_64-unknown-linux-gnu/release http-import
set -euo pipefail

if [ "$#" -lt 4 ]; then
  echo "usage: $0 REPO TAG BIN_DIR WORKER..." >&2
  exit 2
fi
repo=$1 tag=$2 bin_dir=$3
shift 3

root=$(cd "$(dirname "$0")/.." && pwd)
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca_bundle" ] || { echo "no CA bundle at $ca_bundle (install ca-certificates)" >&2; exit 1; }

if command -v buildah >/dev/null; then
  build=(buildah bud)
elif command -v podman >/dev/null; then
  build=(podman build)
else
  echo "neither buildah nor podman is installed (run scripts/install-test-deps.sh)" >&2
  exit 1
fi
# How this machine runs containers (no systemd, tight default ulimits).
run=(podman run --rm --runtime runc --ulimit nofile=1024:20000 --ulimit nproc=1024:1024)

revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

for worker in "$@"; do
  containerfile=$root/images/$worker/Containerfile
  binary=$bin_dir/$worker
  image=$repo/$worker:$tag
  [ -f "$containerfile" ] || { echo "no $containerfile" >&2; exit 1; }
  [ -x "$binary" ] || { echo "no binary $binary (run make static)" >&2; exit 1; }
  # A dynamically linked binary would not start in a FROM scratch image.
  if file "$binary" 2>/dev/null | grep -q 'dynamically linked'; then
    echo "$binary is dynamically linked; build it with make static" >&2
    exit 1
  fi
  version=$("$binary" --version | awk '{print $2}')

  rm -rf "${context:?}"/*
  cp "$ca_bundle" "$context/ca-certificates.crt"
  cp "$binary" "$context/$worker"
  chmod 0755 "$context/$worker"
  chmod 0644 "$context/ca-certificates.crt"

  echo "building $image ($worker $version, $revision) with ${build[*]}"
  "${build[@]}" --quiet --format oci \
    --build-arg WORKER="$worker" \
    --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" \
    --build-arg CREATED="$created" \
    -f "$containerfile" -t "$image" "$context" >/dev/null

  # The image must start and report the same version as the binary.
  got=$("${run[@]}" "$image" --version)
  if [ "$got" != "$worker $version" ]; then
    echo "$image --version printed '$got', expected '$worker $version'" >&2
    exit 1
  fi
  user=$(podman image inspect --format '{{.Config.User}}' "$image")
  size=$(podman image inspect --format '{{.Size}}' "$image")
  echo "built $image: '$got', user $user, $((size / 1024 / 1024)) MiB"
done
