#!/usr/bin/env bash
# Demonstrates http-import end to end on one machine, without root, nginx or a
# cluster: makes a 200 MiB disk image (random data with zero regions), gzips
# it, serves it with python3's http.server on 127.0.0.1, imports it into an
# image file with checksum verification, then shows the JSON result, the
# sparse image file and a byte-for-byte comparison with the original.
#
# usage: scripts/demo.sh BIN_DIR          (make demo)
#   DEMO_SIZE_MIB=200   size of the uncompressed image (a multiple of 8)
#   DEMO_KEEP=1         keep the temporary directory for a closer look
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 BIN_DIR" >&2
  exit 2
fi
bin=$(cd "$1" && pwd)/http-import
[ -x "$bin" ] || { echo "no $bin (run make static)" >&2; exit 1; }
size_mib=${DEMO_SIZE_MIB:-200}

work=$(mktemp -d -t populator-demo.XXXXXX)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ "${DEMO_KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "making the source: $size_mib MiB (4 MiB random, 4 MiB zeros, repeated), gzip -1"
mkdir "$work/www"
for ((i = 0; i < size_mib / 8; i++)); do
  head -c 4M /dev/urandom
  head -c 4M /dev/zero
done > "$work/source.img"
gzip -1 -c "$work/source.img" > "$work/www/demo.img.gz"
sha256=$(sha256sum "$work/www/demo.img.gz" | awk '{print $1}')
ls -l "$work/source.img" "$work/www/demo.img.gz"
echo "sha256 of the compressed source: $sha256"

step "serving it with python3 -m http.server on 127.0.0.1"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port/demo.img.gz
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$port" >"$work/server.log" 2>&1 &
server_pid=$!
for ((i = 0; i < 50; i++)); do   # at most 5 s
  curl -sfI "$url" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -sfI "$url" >/dev/null || { echo "the server did not come up" >&2; exit 1; }
echo "$url"

step "http-import --url $url --target $work/disk.img"
set +e
(
  set -x
  "$bin" --url "$url" \
    --target "$work/disk.img" \
    --checksum "sha256:$sha256" \
    --termination-log "$work/result.json" \
    --progress auto
)
rc=$?
set -e
echo "exit code: $rc"

step "the result (--termination-log)"
python3 -m json.tool "$work/result.json"
[ "$rc" -eq 0 ] || exit "$rc"

step "the image file: apparent size vs allocated (ls -ls: first column is KiB allocated)"
ls -ls "$work/source.img" "$work/disk.img"
echo "allocated: $(du -h "$work/disk.img" | cut -f1) of $(du -h --apparent-size "$work/disk.img" | cut -f1)"

step "byte-for-byte comparison with the uncompressed source"
cmp "$work/source.img" "$work/disk.img"
echo "identical: disk.img == source.img"
