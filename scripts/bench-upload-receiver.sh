#!/usr/bin/env bash
# Benchmarks upload-receiver against the fastest thing an upload can go to:
# curl uploads the same SIZE MiB of random data over TLS on loopback to
# upload-receiver (sha256 checked, written and flushed) and to an nginx that
# reads and discards the body (the reference). Each case runs BENCH_RUNS
# times, interleaved; the source file is read into the page cache first, so
# both sides start from the same place. Prints a markdown table of median
# upload time (curl's time_total: until the final answer, which for
# upload-receiver comes after the data is verified and flushed), MiB/s, the
# throughput ratio against nginx and upload-receiver's peak RSS, and writes
# it to bench-out/upload-receiver.md.
#
# Cases:
#   nginx (reference):  curl -T F https://127.0.0.1:P/discard     (return 204)
#   directory target:   upload-receiver --checksum sha256:… --target DIR
#   block device:       upload-receiver --checksum sha256:… --target /dev/loopN (root)
#   tmpfs directory:    upload-receiver --checksum sha256:… --target /dev/shm/DIR
#                       (the receiver's own cost, without the disk)
#   disk speed:         dd if=F of=DIR/F bs=4M conv=fdatasync (no network:
#                       what the disk allows; the receiver flushes too)
#
# usage: scripts/bench-upload-receiver.sh BIN_DIR   (make bench-upload-receiver)
#   BENCH_SIZE_MIB=2048   size of the upload
#   BENCH_RUNS=3          runs per case
#   BENCH_TMPDIR=/var/tmp where the data, outputs and loop file live (not tmpfs)
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 BIN_DIR" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$1" && pwd)/upload-receiver
size_mib=${BENCH_SIZE_MIB:-2048}
runs=${BENCH_RUNS:-3}
[ -x "$bin" ] || { echo "no $bin (run make static)" >&2; exit 1; }
[ "$size_mib" -ge 1 ] || { echo "BENCH_SIZE_MIB must be positive" >&2; exit 2; }
[ "$runs" -ge 1 ] && [ "$runs" -le 50 ] || { echo "BENCH_RUNS must be 1..50" >&2; exit 2; }
for tool in nginx curl openssl sha256sum python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
is_root=false
[ "$(id -u)" -eq 0 ] && is_root=true
$is_root || echo "warning: not root: the block-device case is skipped" >&2

work=$(mktemp -d -p "${BENCH_TMPDIR:-/var/tmp}" populator-bench-upload.XXXXXX)
chmod 755 "$work"
nginx_pid=
receiver_pid=
loopdev=
cleanup() {
  if [ -n "$receiver_pid" ]; then kill "$receiver_pid" 2>/dev/null || true; wait "$receiver_pid" 2>/dev/null || true; fi
  if [ -n "$nginx_pid" ]; then kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; fi
  if [ -n "$loopdev" ]; then losetup -d "$loopdev" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${load_start%% *}" 'BEGIN { exit !(l > 0.5) }'; then
  log "warning: load average $load_start before the benchmark: other work will skew the numbers"
fi

# A private copy of the binary: a rebuild during the benchmark must not swap it.
cp "$bin" "$work/upload-receiver"
bin=$work/upload-receiver
revision=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)

# --- data and TLS ---------------------------------------------------------
size=$((size_mib * 1024 * 1024))
log "making $size_mib MiB of random data"
head -c "$size" /dev/urandom > "$work/data.bin"
sum=$(sha256sum < "$work/data.bin" | cut -d' ' -f1)
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
printf 'bench-token-%s\n' "$RANDOM$RANDOM" > "$work/token"
token=$(head -n 1 "$work/token")

# --- nginx that reads and discards bodies ----------------------------------
nginx_port=$(free_port)
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1;
error_log $work/nginx/logs/error.log warn;
pid $work/nginx/nginx.pid;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $work/nginx/tmp/body;
    proxy_temp_path $work/nginx/tmp/proxy;
    fastcgi_temp_path $work/nginx/tmp/fastcgi;
    uwsgi_temp_path $work/nginx/tmp/uwsgi;
    scgi_temp_path $work/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$nginx_port ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        client_max_body_size 0;
        location / { return 204; }
    }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>"$work/nginx/logs/stderr.log" &
nginx_pid=$!
for ((i = 0; i < 50; i++)); do
  curl -sk -o /dev/null "https://127.0.0.1:$nginx_port/" 2>/dev/null && break
  sleep 0.1
done

if $is_root; then
  truncate -s "$((size_mib + size_mib / 20 + 8))M" "$work/loop.img"
  loopdev=$(losetup -f --show --direct-io=on "$work/loop.img")
  log "loop device $loopdev (direct I/O)"
fi
mkdir -p "$work/out"

# One upload with curl: prints "http_code time_total size_upload". No
# Expect: 100-continue, the same for both servers.
upload() {
  curl -sk -H 'Expect:' -H "Authorization: Bearer $token" -X POST -T "$work/data.bin" \
    -o /dev/null -w '%{http_code} %{time_total} %{size_upload}\n' "$1"
}

run_nginx() {
  upload "https://127.0.0.1:$nginx_port/discard"
}

# Starts upload-receiver on TARGET, uploads, waits for it to exit; prints
# "http_code time_total size_upload peak_rss_kib exit_code".
run_receiver() {
  local target=$1 port answer rc
  port=$(free_port)
  /usr/bin/time -f '%M' -o "$work/rss.txt" "$bin" --listen "127.0.0.1:$port" \
    --token-file "$work/token" --tls-cert-file "$work/cert.pem" --tls-key-file "$work/key.pem" \
    --target "$target" --checksum "sha256:$sum" --progress none --linger 0 \
    --termination-log "$work/result.json" 2> "$work/receiver.log" &
  receiver_pid=$!
  for ((i = 0; i < 100; i++)); do
    curl -sk -o /dev/null "https://127.0.0.1:$port/healthz" 2>/dev/null && break
    sleep 0.05
  done
  answer=$(upload "https://127.0.0.1:$port/v1beta1/upload" || true)
  rc=0
  wait "$receiver_pid" || rc=$?
  receiver_pid=
  echo "$answer $(tail -n 1 "$work/rss.txt") $rc"
}

verify() {
  local got
  case $1 in
    dir) got=$(sha256sum < "$work/out/disk.img" | cut -d' ' -f1) ;;
    block) got=$(head -c "$size" "$loopdev" | sha256sum | cut -d' ' -f1) ;;
    *) return 0 ;;
  esac
  [ "$got" = "$sum" ] || { echo "wrong output for $1: sha256 $got" >&2; return 1; }
}

shm=
if [ -d /dev/shm ] && [ "$(df -k --output=avail /dev/shm | tail -n 1)" -gt $((size / 1024 * 2)) ]; then
  shm=$(mktemp -d -p /dev/shm populator-bench-upload.XXXXXX)
  trap 'cleanup; rm -rf "$shm"' EXIT
fi
cases=(nginx dir)
[ -n "$loopdev" ] && cases+=(block)
[ -n "$shm" ] && cases+=(tmpfs)
cases+=(disk)
results=$work/results.tsv
: > "$results"
for ((run = 1; run <= runs; run++)); do
  for c in "${cases[@]}"; do
    rm -rf "$work/out" "$work/result.json"
    mkdir "$work/out"
    cat "$work/data.bin" > /dev/null   # the source in the page cache
    sync
    case $c in
      nginx) read -r code secs sent < <(run_nginx); rss=0; rc=0 ;;
      dir) read -r code secs sent rss rc < <(run_receiver "$work/out") ;;
      block) read -r code secs sent rss rc < <(run_receiver "$loopdev") ;;
      tmpfs) rm -rf "${shm:?}"/*; read -r code secs sent rss rc < <(run_receiver "$shm"); rm -rf "${shm:?}"/* ;;
      disk)
        start=$(date +%s.%N)
        dd if="$work/data.bin" of="$work/out/dd.bin" bs=4M conv=fdatasync status=none
        secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
        code=200 sent=$size rss=0 rc=0 ;;
    esac
    status=ok
    if [ "$code" != 200 ] && [ "$code" != 204 ]; then status="http $code"; fi
    [ "$sent" = "$size" ] || status="sent $sent of $size bytes"
    [ "$rc" = 0 ] || { status="exit $rc"; sed 's/^/    /' "$work/receiver.log" >&2; }
    [ "$status" = ok ] && { verify "$c" || status="wrong output"; }
    printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$run" "$secs" "$rss" "$status" >> "$results"
    log "run $run $c: $secs s, $((rss / 1024)) MiB peak RSS, $status"
  done
done

report=$root/bench-out/upload-receiver.md
mkdir -p "$(dirname "$report")"
{
  echo "# upload-receiver benchmark"
  echo
  echo "- $(date -u +%Y-%m-%dT%H:%MZ), $("$bin" --version) (source $revision), $(curl --version | head -n 1 | cut -d' ' -f1-2), $(nginx -v 2>&1 | cut -d' ' -f3)"
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r)"
  echo "- $size_mib MiB of random data over TLS on loopback, $runs runs per case, interleaved, medians shown"
  echo "- load average before: $load_start; after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  python3 - "$results" "$size_mib" <<'PY'
import statistics, sys
from collections import defaultdict
results, size_mib = sys.argv[1], int(sys.argv[2])
secs, rss, failed, everything = (defaultdict(list) for _ in range(4))
for line in open(results):
    case, _run, s, r, status = line.rstrip("\n").split("\t")
    everything[case].append(s if status == "ok" else f"{s} ({status})")
    if status == "ok":
        secs[case].append(float(s))
        rss[case].append(int(r) / 1024)
    else:
        failed[case].append(status)
labels = {
    "nginx": "curl -T F → nginx, body discarded (reference)",
    "dir": "curl -T F → upload-receiver --checksum sha256 --target DIR",
    "block": "curl -T F → upload-receiver --checksum sha256 --target /dev/loopN",
    "tmpfs": "curl -T F → upload-receiver --checksum sha256 --target /dev/shm/DIR",
    "disk": "dd if=F of=DIR/F bs=4M conv=fdatasync (disk speed, no network)",
}
med = {c: statistics.median(v) for c, v in secs.items()}
print("| case | median s | MiB/s | throughput vs nginx | median peak RSS MiB | runs (s) |")
print("|---|---:|---:|---:|---:|---|")
for case in ["nginx", "dir", "block", "tmpfs", "disk"]:
    if case not in everything:
        continue
    if case not in med:
        print(f"| `{labels[case]}` | — | — | — | — | {', '.join(everything[case])} |")
        continue
    ratio = "1.00" if case == "nginx" else (f"{med['nginx'] / med[case]:.2f}×" if "nginx" in med else "—")
    r = "—" if case in ("nginx", "disk") else f"{statistics.median(rss[case]):.1f}"
    print(f"| `{labels[case]}` | {med[case]:.2f} | {size_mib / med[case]:.0f} | {ratio} | {r} | {', '.join(everything[case])} |")
print()
print("Goals: throughput ≥ 0.8× nginx's, peak RSS ≤ 64 MiB.")
for case in ["dir", "block", "tmpfs"]:
    if case in med and "nginx" in med:
        ratio = med["nginx"] / med[case]
        peak = statistics.median(rss[case])
        ok = "met" if ratio >= 0.8 and peak <= 64 and not failed[case] else "MISSED"
        print(f"- {case}: {ratio:.2f}×, {peak:.1f} MiB: {ok}")
if "disk" in med and "nginx" in med:
    print(f"- the disk alone (dd conv=fdatasync) reaches {med['nginx'] / med['disk']:.2f}× of nginx's discard: "
          "no receiver that flushes before answering can beat that on the disk targets")
PY
} > "$report"
cat "$report"
log "written to $report"
