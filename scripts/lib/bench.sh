# shellcheck shell=bash
# What every scripts/bench-*.sh does the same way, sourced after `set -euo
# pipefail`: argument and tool checks, a work directory removed on exit with
# the servers and loop devices the benchmark started, log lines, the load
# average, a private copy of the binary, a loopback nginx, dropping the page
# cache, timed runs and medians. Each benchmark keeps its own data, cases,
# checks and report.
#
# Sets: root (the repository), bin (BIN_DIR/NAME, then its private copy),
# is_root, work, load_start, revision, bin_sha, nginx_pid, loopdev, vol, and after
# bench_timed: wall, rss_kib, user, sys, cpu.

bench_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$bench_lib_dir/../.." && pwd)
is_root=false
[ "$(id -u)" -eq 0 ] && is_root=true
work=
nginx_pid=
loopdev=
bench_pids=()      # processes to stop on exit, in this order
bench_at_exit=()   # further commands run on exit, before the work directory goes

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# bench_args NAME "$@": the one argument is BIN_DIR holding the binary NAME.
bench_args() {
  local name=$1
  shift
  if [ "$#" -ne 1 ]; then
    echo "usage: $0 BIN_DIR" >&2
    exit 2
  fi
  bin=$(cd "$1" && pwd)/$name
  [ -x "$bin" ] || { echo "no $bin (run make static)" >&2; exit 1; }
}

# bench_check_runs RUNS MAX: RUNS must be 1..MAX.
bench_check_runs() {
  [ "$1" -ge 1 ] && [ "$1" -le "$2" ] || { echo "BENCH_RUNS must be 1..$2" >&2; exit 2; }
}

# bench_need TOOL...: every tool must be installed.
bench_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
  done
}

# bench_workdir PREFIX: a fresh $work under BENCH_TMPDIR (default /var/tmp),
# readable by nginx's workers, removed on exit with what the benchmark started.
bench_workdir() {
  work=$(mktemp -d -p "${BENCH_TMPDIR:-/var/tmp}" "$1.XXXXXX")
  chmod 755 "$work"   # nginx workers drop root and must read it
  if [ "$(stat -f -c %T "$work")" = tmpfs ]; then
    echo "warning: $work is on tmpfs: the numbers say nothing about disks" >&2
  fi
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  local p cmd
  for p in "${bench_pids[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ -n "$loopdev" ]; then losetup -d "$loopdev" 2>/dev/null || true; fi
  for cmd in "${bench_at_exit[@]}"; do eval "$cmd" || true; done
  if [ -n "$work" ]; then rm -rf "$work"; fi
}

# bench_load: remembers the load average in $load_start and warns when other
# work is running: it shows up in the numbers.
bench_load() {
  load_start=$(cut -d' ' -f1-3 /proc/loadavg)
  if awk -v l="${load_start%% *}" 'BEGIN { exit !(l > 0.5) }'; then
    log "warning: load average $load_start before the benchmark: other work will skew the numbers"
  fi
}

# bench_private_copy: runs use a copy of $bin in $work, so that a rebuild
# during the benchmark cannot swap it; sets bin_sha and revision.
bench_private_copy() {
  cp "$bin" "$work/$(basename "$bin")"
  bin=$work/$(basename "$bin")
  bin_sha=$(sha256sum < "$bin" | cut -c1-12)
  revision=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
}

bench_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bench_nginx TOP HTTP: starts nginx on $work/nginx/nginx.conf, with TOP as
# main-level directives and HTTP inside http {} (after the temp paths every
# config needs); its pid in $nginx_pid, stopped on exit.
bench_nginx() {
  mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
  cat > "$work/nginx/nginx.conf" <<EOF
$1
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
$2
}
EOF
  nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>"$work/nginx/logs/stderr.log" &
  nginx_pid=$!
  bench_pids+=("$nginx_pid")
}

# bench_serve_static DIR PROBE [DIRECTIVES]: nginx serving DIR on a free
# loopback port (sendfile on, plus DIRECTIVES), waited for until PROBE (a
# path under DIR) answers; its URL in $base.
bench_serve_static() {
  local dir=$1 probe=$2 extra=${3:-} port i
  port=$(bench_free_port)
  bench_nginx "" "    default_type application/octet-stream;
    sendfile on;
$extra
    server { listen 127.0.0.1:$port; root $dir; }"
  base=http://127.0.0.1:$port
  for ((i = 0; i < 50; i++)); do   # at most 5 s
    curl -sfI "$base/$probe" >/dev/null 2>&1 && break
    kill -0 "$nginx_pid" 2>/dev/null || { cat "$work/nginx/logs/"* >&2; exit 1; }
    sleep 0.1
  done
  curl -sfI "$base/$probe" >/dev/null || { echo "nginx did not come up" >&2; exit 1; }
}

# bench_loop FILE: a loop device on FILE with direct I/O in $loopdev, detached on exit.
bench_loop() {
  loopdev=$(losetup -f --show --direct-io=on "$1")
}

# bench_volume MIB: what a populator writes into, a freshly provisioned
# volume: a sparse MIB-MiB file on a direct-I/O loop device ($loopdev), given
# a new ext4 before each run by bench_fresh_volume and mounted at $vol.
# Writing into a directory of the work filesystem instead measured that
# filesystem's state more than the tools: after each run's output was
# removed, creating files spent a fifth of its time skipping recently freed
# inodes, and its writeback did not behave like a disk's.
# Without root, $vol is a plain directory (with a warning).
bench_volume() {
  vol=$work/vol
  mkdir -p "$vol"
  if $is_root; then
    bench_need mkfs.ext4 losetup
    truncate -s "${1}M" "$work/vol.img"
    bench_loop "$work/vol.img"
    bench_at_exit+=("umount '$vol' 2>/dev/null")
  else
    log "warning: not root: runs write into a directory of the work filesystem, not a fresh volume"
  fi
}

# bench_fresh_volume: a new, empty ext4 at $vol for the next run.
bench_fresh_volume() {
  if [ -n "$loopdev" ]; then
    umount "$vol" 2>/dev/null || true
    # Inode tables and journal written now, not zeroed by the kernel in the
    # background (ext4lazyinit) during the timed run.
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$loopdev"
    mount "$loopdev" "$vol"
  else
    rm -rf "$vol"
    mkdir -p "$vol"
  fi
}

# bench_drop_caches: flushes, and as root drops the page cache.
bench_drop_caches() {
  sync
  if $is_root; then echo 3 > /proc/sys/vm/drop_caches; fi
}

# bench_argv CMD: the command line CMD as the array argv: the benchmarked
# binary runs directly, so that GNU time's peak RSS is its own; anything else
# (pipelines, &&) runs under bash -c.
bench_argv() {
  if [[ $1 == "$bin "* ]]; then
    read -r -a argv <<< "$1"
  else
    argv=(bash -c "$1")
  fi
}

# bench_timed SECONDS CMD...: runs CMD under GNU time (itself under the
# command prefix in the array bench_wrap, if any) with its output in
# $work/run.log; sets wall (s), rss_kib (peak RSS), user, sys and cpu (s), or
# wall=NA when time wrote nothing. Returns the command's status.
bench_wrap=()
bench_timed() {
  local limit=$1 rc=0
  shift
  rm -f "$work/time.txt"
  timeout "$limit" "${bench_wrap[@]}" /usr/bin/time -f '%e %M %U %S' -o "$work/time.txt" "$@" > "$work/run.log" 2>&1 || rc=$?
  read -r wall rss_kib user sys < <(tail -n 1 "$work/time.txt") || true
  [[ ${wall:-} =~ ^[0-9.]+$ && ${rss_kib:-} =~ ^[0-9]+$ ]] || { wall=NA; rss_kib=0; user=0; sys=0; }
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
  return "$rc"
}

# bench_median: the median of the numbers on stdin, one a line (empty for none).
bench_median() {
  sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# bench_machine: CPUs, RAM and kernel, for the report's header.
bench_machine() {
  echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
}
