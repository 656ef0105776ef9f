#!/usr/bin/env bash
# Benchmarks `http-import --content disk` against CDI's path: a qcow2 of
# BENCH_VIRTUAL_GIB GiB virtual size with about 3/8 of it allocated (3 MiB of
# random data in every 8 MiB), served by a loopback nginx, written to a loop
# device (direct I/O) as raw:
#
#   http-import --content disk --target /dev/loopN           (ours, no scratch)
#   curl -o t.qcow2 URL && qemu-img convert -O raw t.qcow2 /dev/loopN
#                                                             (CDI's path: reference)
#   qemu-img convert -O raw local.qcow2 /dev/loopN            (the floor: no network)
#   http-import --target /dev/loopN, the qcow2 file as it is  (the download floor:
#                                     the same bytes fetched, hashed and written,
#                                     no conversion)
#
# Each case runs BENCH_RUNS times, interleaved, page cache dropped before each
# run, the device discarded between runs; every output is compared with the
# raw source. Prints a markdown table (median wall, ratio to CDI's path, peak
# RSS, scratch bytes) and writes it to bench-out/disk.md.
#
# usage: scripts/bench-disk.sh BIN_DIR   (make bench-disk; root)
#   BENCH_VIRTUAL_GIB=4   virtual size of the image
#   BENCH_RUNS=3          runs per case
#   BENCH_TMPDIR=/var/tmp where the data and the loop file live (not tmpfs)
#   BENCH_SOURCE=remote   remote: the served image is read into the page cache
#                         after the caches are dropped, as a server on another
#                         machine reads from its own disk; local: nginx reads
#                         it from the disk the target is on (both cases then
#                         read and write the same virtual disk)
set -euo pipefail
# shellcheck source=scripts/lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"

bench_args http-import "$@"
virtual_gib=${BENCH_VIRTUAL_GIB:-4}
runs=${BENCH_RUNS:-3}
source_mode=${BENCH_SOURCE:-remote}
case $source_mode in remote | local) ;; *) echo "BENCH_SOURCE must be remote or local" >&2; exit 2 ;; esac
[ "$virtual_gib" -ge 1 ] && [ "$virtual_gib" -le 64 ] || { echo "BENCH_VIRTUAL_GIB must be 1..64" >&2; exit 2; }
bench_check_runs "$runs" 20
$is_root || { echo "root is needed (loop device, drop_caches)" >&2; exit 1; }
bench_need nginx curl qemu-img losetup blkdiscard cmp python3 /usr/bin/time

bench_workdir populator-bench-disk
bench_load
bench_private_copy

# --- data -----------------------------------------------------------------
virtual=$((virtual_gib << 30))
mkdir -p "$work/www" "$work/scratch"
log "making a $virtual_gib GiB raw disk, 3 MiB random in every 8 MiB"
truncate -s "$virtual" "$work/source.raw"
for ((mib = 0; mib < virtual_gib * 1024; mib += 8)); do
  echo "$mib"
done | while read -r mib; do
  head -c 3M /dev/urandom | dd of="$work/source.raw" bs=1M seek="$mib" conv=notrunc status=none
done
qemu-img convert -f raw -O qcow2 "$work/source.raw" "$work/www/t.qcow2"
chmod 644 "$work/www/t.qcow2"
qcow2_bytes=$(stat -c %s "$work/www/t.qcow2")
log "qcow2: $((qcow2_bytes >> 20)) MiB"

# --- nginx and the loop device ---------------------------------------------
bench_serve_static "$work/www" t.qcow2
url=$base/t.qcow2
truncate -s "$((virtual + (64 << 20)))" "$work/loop.img"
bench_loop "$work/loop.img"
log "nginx on $url, loop device $loopdev"

# --- cases ----------------------------------------------------------------
declare -A label cmd
order=(ours cdi floor download)
label[ours]="http-import --content disk --target /dev/loopN"
cmd[ours]="$bin --progress none --retries 0 --content disk --url $url --target $loopdev --termination-log $work/result.json"
label[cdi]="curl -o t.qcow2 URL && qemu-img convert -O raw t.qcow2 /dev/loopN"
cmd[cdi]="curl -s -o $work/scratch/t.qcow2 $url && qemu-img convert -f qcow2 -O raw $work/scratch/t.qcow2 $loopdev"
label[floor]="qemu-img convert -O raw local.qcow2 /dev/loopN (no network)"
cmd[floor]="qemu-img convert -f qcow2 -O raw $work/www/t.qcow2 $loopdev"
label[download]="http-import of the qcow2 file as it is (no conversion)"
cmd[download]="$bin --progress none --retries 0 --url $url --target $loopdev --termination-log $work/result.json"
declare -A scratch=([ours]=0 [cdi]=$qcow2_bytes [floor]=0 [download]=0)

results=$work/results.tsv
: > "$results"
for ((run = 1; run <= runs; run++)); do
  for id in "${order[@]}"; do
    rm -f "$work/scratch/t.qcow2" "$work/result.json"
    blkdiscard "$loopdev" 2>/dev/null || true
    bench_drop_caches
    if [ "$source_mode" = remote ]; then cat "$work/www/t.qcow2" > /dev/null; fi
    bench_argv "${cmd[$id]}"
    status=ok
    if ! bench_timed 1200 "${argv[@]}"; then
      status=failed
      sed 's/^/    /' "$work/run.log" >&2
    elif [ "$id" = download ]; then
      cmp -s -n "$qcow2_bytes" "$work/www/t.qcow2" "$loopdev" || status="wrong output"
    elif ! cmp -s -n "$virtual" "$work/source.raw" "$loopdev"; then
      status="wrong output"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$run" "$wall" "$rss_kib" "$cpu" "$status" >> "$results"
    log "run $run $id: $wall s, $((rss_kib / 1024)) MiB peak RSS, $cpu s CPU, $status"
  done
done

# --- report ---------------------------------------------------------------
report=$root/bench-out/disk.md
mkdir -p "$(dirname "$report")"
{
  echo "# disk image benchmark (http-import --content disk)"
  echo
  echo "- $(date -u +%Y-%m-%dT%H:%MZ), $("$bin" --version) (source $revision), $(qemu-img --version | head -n 1)"
  echo "- machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM; load average before: $load_start, after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- image: qcow2, $virtual_gib GiB virtual, $((qcow2_bytes >> 20)) MiB file; target: loop device (direct I/O); served image read by nginx from: $source_mode (see BENCH_SOURCE); $runs runs per case, medians"
  echo
  python3 - "$results" "${scratch[ours]}" "${scratch[cdi]}" "${scratch[floor]}" "${scratch[download]}" \
    "${label[ours]}" "${label[cdi]}" "${label[floor]}" "${label[download]}" <<'PY'
import statistics, sys
from collections import defaultdict
results = sys.argv[1]
ids = ["ours", "cdi", "floor", "download"]
scratch = dict(zip(ids, map(int, sys.argv[2:6])))
labels = dict(zip(ids, sys.argv[6:10]))
wall, rss, cpu, failed = (defaultdict(list) for _ in range(4))
for line in open(results):
    id_, _run, w, r, c, status = line.rstrip("\n").split("\t")
    if status == "ok":
        wall[id_].append(float(w)); rss[id_].append(int(r) / 1024); cpu[id_].append(float(c))
    else:
        failed[id_].append(status)
med = {k: statistics.median(v) for k, v in wall.items()}
print("| case | median wall s | ratio vs CDI's path | peak RSS MiB | CPU s | scratch bytes | failed runs |")
print("|---|---:|---:|---:|---:|---:|---|")
for id_ in ids:
    if id_ not in med:
        print(f"| `{labels[id_]}` | — | — | — | — | {scratch[id_]} | {len(failed[id_])} |")
        continue
    ratio = f"{med[id_] / med['cdi']:.2f}" if "cdi" in med else "—"
    print(f"| `{labels[id_]}` | {med[id_]:.2f} | {ratio} | {statistics.median(rss[id_]):.1f} | {statistics.median(cpu[id_]):.2f} | {scratch[id_]} | {len(failed[id_])} |")
print()
if "ours" in med and "cdi" in med:
    r = med["ours"] / med["cdi"]
    print(f"Goal: ours ÷ CDI's path ≤ 0.5×: {r:.2f}× ({'met' if r <= 0.5 else 'MISSED'}); "
          f"peak RSS ≤ 64 MiB: {statistics.median(rss['ours']):.1f} MiB "
          f"({'met' if statistics.median(rss['ours']) <= 64 else 'MISSED'}); scratch: 0 bytes.")
if "ours" in med and "floor" in med:
    print(f"Against the local floor (qemu-img convert of a local file): {med['ours'] / med['floor']:.2f}×.")
if "download" in med and "cdi" in med:
    print(f"The download floor (the same bytes fetched, hashed and written, no conversion): {med['download']:.2f} s, {med['download'] / med['cdi']:.2f}× CDI's path.")
PY
} > "$report"
cat "$report"
log "written to $report"
