#!/usr/bin/env bash
# Benchmarks http-import against curl-based equivalents on one machine: a
# loopback nginx (sendfile on) serves SIZE MiB of random data and a gzip -1
# image that is half zeros; each case runs BENCH_RUNS times, interleaved, with
# the page cache dropped before every run and the output removed after it.
# Prints a markdown table of median wall time, ratio against the group's
# reference and median peak RSS, and writes it to bench-out/http-import.md.
#
# Cases:
#   file target (a directory on the work filesystem), uncompressed source:
#     http-import --checksum, http-import --connections 4 --checksum,
#     curl -o F && sha256sum F (reference), curl -o F, curl -o F && sync F
#   block device (loop device on a sparse file, root only):
#     http-import --checksum, curl | dd oflag=direct conv=fsync (reference)
#   gzip source into the file target:
#     http-import --checksum, curl | tee >(sha256sum) | gunzip > F (reference)
#
# usage: scripts/bench-http-import.sh BIN_DIR   (make bench-http-import; root)
#   BENCH_SIZE_MIB=2048   size of the uncompressed data (a multiple of 8)
#   BENCH_RUNS=5          runs per case
#   BENCH_TMPDIR=/var/tmp where the data, outputs and loop file live (not tmpfs)
set -euo pipefail
# shellcheck source=scripts/lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"

bench_args http-import "$@"
size_mib=${BENCH_SIZE_MIB:-2048}
runs=${BENCH_RUNS:-5}
[ $((size_mib % 8)) -eq 0 ] && [ "$size_mib" -ge 8 ] || { echo "BENCH_SIZE_MIB must be a multiple of 8" >&2; exit 2; }
bench_check_runs "$runs" 50
bench_need nginx curl gzip sha256sum python3 /usr/bin/time
$is_root || echo "warning: not root: the page cache is not dropped between runs and the block-device case is skipped" >&2

bench_workdir populator-bench
bench_load
bench_private_copy

# --- data ---------------------------------------------------------------
size=$((size_mib * 1024 * 1024))
mkdir -p "$work/www" "$work/out"
log "making $size_mib MiB of random data"
head -c "$size" /dev/urandom > "$work/www/random.bin"
log "making $size_mib MiB of 4 MiB random / 4 MiB zeros, then gzip -1"
for ((i = 0; i < size_mib / 8; i++)); do
  head -c 4M /dev/urandom
  head -c 4M /dev/zero
done > "$work/mixed.bin"
gzip -1 -c "$work/mixed.bin" > "$work/www/mixed.bin.gz"
sum_random=$(sha256sum < "$work/www/random.bin" | cut -d' ' -f1)
sum_mixed=$(sha256sum < "$work/mixed.bin" | cut -d' ' -f1)
sum_gz=$(sha256sum < "$work/www/mixed.bin.gz" | cut -d' ' -f1)
gz_mib=$(( $(stat -c %s "$work/www/mixed.bin.gz") / 1024 / 1024 ))
rm "$work/mixed.bin"
chmod 644 "$work/www/"*
log "gzip source: $gz_mib MiB compressed"

# --- nginx on loopback --------------------------------------------------
bench_serve_static "$work/www" random.bin "    tcp_nopush on;"
log "nginx serving $work/www on $base"

# --- loop device ----------------------------------------------------------
if $is_root; then
  loop_mib=$((size_mib + size_mib / 20))   # 5 % larger than the data
  truncate -s "${loop_mib}M" "$work/loop.img"
  bench_loop "$work/loop.img"
  log "loop device $loopdev on a $loop_mib MiB sparse file (direct I/O)"
fi

# --- cases ----------------------------------------------------------------
# Each case: id, group, label shown in the table, and the command (bash).
# "F" in the labels is $work/out/<name>.
out=$work/out
hi=(--progress none --retries 0)
declare -A label cmd group check
add() { group[$1]=$2; label[$1]=$3; cmd[$1]=$4; check[$1]=$5; order+=("$1"); }
order=()
add hi_file file "http-import --checksum sha256:… --target DIR" \
  "$bin ${hi[*]} --url $base/random.bin --checksum sha256:$sum_random --target $out --termination-log $work/result.json" \
  "file $out/random.bin $sum_random"
add hi_file_c4 file "http-import --connections 4 --checksum sha256:… --target DIR" \
  "$bin ${hi[*]} --connections 4 --url $base/random.bin --checksum sha256:$sum_random --target $out --termination-log $work/result.json" \
  "file $out/random.bin $sum_random"
add curl_sha file "curl -s -o F URL && sha256sum F" \
  "curl -s -o $out/random.bin $base/random.bin && sha256sum $out/random.bin > $work/sum.txt" \
  "file $out/random.bin $sum_random"
add curl file "curl -s -o F URL" \
  "curl -s -o $out/random.bin $base/random.bin" \
  "file $out/random.bin $sum_random"
add curl_sync file "curl -s -o F URL && sync F (as durable as http-import)" \
  "curl -s -o $out/random.bin $base/random.bin && sync $out/random.bin" \
  "file $out/random.bin $sum_random"
if [ -n "$loopdev" ]; then
  add hi_block block "http-import --checksum sha256:… --target /dev/loopN" \
    "$bin ${hi[*]} --url $base/random.bin --checksum sha256:$sum_random --target $loopdev --termination-log $work/result.json" \
    "block $loopdev $sum_random"
  add curl_dd block "curl -s URL | dd of=/dev/loopN bs=4M iflag=fullblock oflag=direct conv=fsync" \
    "set -o pipefail; curl -s $base/random.bin | dd of=$loopdev bs=4M iflag=fullblock oflag=direct conv=fsync status=none" \
    "block $loopdev $sum_random"
fi
add hi_gz gzip "http-import --checksum sha256:… --target DIR (gzip source)" \
  "$bin ${hi[*]} --url $base/mixed.bin.gz --checksum sha256:$sum_gz --target $out --termination-log $work/result.json" \
  "file $out/mixed.bin $sum_mixed"
add curl_gunzip_sha gzip "curl -s URL | tee >(sha256sum) | gunzip > F" \
  "set -o pipefail; mkfifo $work/fifo; sha256sum < $work/fifo > $work/sum.txt & curl -s $base/mixed.bin.gz | tee $work/fifo | gunzip > $out/mixed.bin; wait; grep -q $sum_gz $work/sum.txt" \
  "file $out/mixed.bin $sum_mixed"
declare -A ref=([file]=curl_sha [block]=curl_dd [gzip]=curl_gunzip_sha)
declare -A group_title=(
  [file]="File target, uncompressed source ($size_mib MiB random)"
  [block]="Block device target (loop device, direct I/O), uncompressed source ($size_mib MiB random)"
  [gzip]="gzip -1 source ($gz_mib MiB; $size_mib MiB uncompressed, half zeros) into a file target"
)

# Each run goes into a fresh memory cgroup (root only), whose peak usage counts
# the page cache the run's writes leave behind, as a pod's memory limit would.
cg_root=
if $is_root && [ -w /sys/fs/cgroup/memory/cgroup.procs ]; then
  cg_root=/sys/fs/cgroup/memory   # cgroup v1
  cg_peak=memory.max_usage_in_bytes
elif $is_root && grep -qw memory /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
  cg_root=/sys/fs/cgroup          # cgroup v2
  cg_peak=memory.peak
fi
cg=
# bench_wrap: a command prefix that moves the command into $cg/run
if [ -n "$cg_root" ]; then
  cg=$cg_root/populator-bench-$$
  mkdir "$cg"
  bench_at_exit+=('rmdir "$cg/run" "$cg" 2>/dev/null')
  # shellcheck disable=SC2016
  bench_wrap=(bash -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg/run")
fi

# Removes what a run produced: files in out/, data on the loop device.
reset_outputs() {
  rm -rf "$out" "$work/result.json" "$work/sum.txt" "$work/fifo"
  mkdir "$out"
  if [ -n "$loopdev" ]; then blkdiscard "$loopdev" 2>/dev/null || dd if=/dev/zero of="$loopdev" bs=4M count=1 status=none; fi
}

# The output must hold exactly the source bytes.
verify() {
  local kind=$1 path=$2 want=$3 got
  case $kind in
    file) got=$(sha256sum < "$path" | cut -d' ' -f1) ;;
    block) got=$(head -c "$size" "$path" | sha256sum | cut -d' ' -f1) ;;
  esac
  [ "$got" = "$want" ] || { echo "wrong output in $path: sha256 $got, expected $want" >&2; return 1; }
}

# Why a run failed: the result's reason when http-import wrote one.
failure() {
  local rc=$1 reason=
  if [ -s "$work/result.json" ]; then
    reason=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("reason", ""))' "$work/result.json" 2>/dev/null || true)
  fi
  echo "exit $rc${reason:+ $reason}"
}

results=$work/results.tsv
: > "$results"
total=$((runs * ${#order[@]}))
n=0
for ((run = 1; run <= runs; run++)); do
  for id in "${order[@]}"; do
    n=$((n + 1))
    reset_outputs
    bench_drop_caches
    # GNU time reports the largest single process of a pipeline.
    bench_argv "${cmd[$id]}"
    # A failed run or a wrong output is recorded, reported and left out of
    # the medians; the benchmark goes on with the other cases.
    status=ok
    if [ -n "$cg" ]; then mkdir "$cg/run"; fi
    if bench_timed 600 "${argv[@]}"; then
      # shellcheck disable=SC2086
      verify ${check[$id]} || status="wrong output"
    else
      status=$(failure $?)
      sed 's/^/    /' "$work/run.log" >&2
    fi
    cg_mib=NA
    if [ -n "$cg" ]; then
      cg_mib=$(( $(cat "$cg/run/$cg_peak") / 1024 / 1024 ))
      rmdir "$cg/run"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$run" "$wall" "$rss_kib" "$cpu" "$cg_mib" "$status" >> "$results"
    log "[$n/$total] run $run $id: ${wall} s, $((rss_kib / 1024)) MiB peak RSS, $cg_mib MiB cgroup peak, $cpu s CPU, $status"
  done
done
reset_outputs

# --- report ---------------------------------------------------------------
report=$root/bench-out/http-import.md
mkdir -p "$(dirname "$report")"
{
  echo "# http-import benchmark"
  echo
  echo "- $(date -u +%Y-%m-%dT%H:%MZ), $("$bin" --version) (source $revision, binary sha256 $bin_sha…), $(curl --version | head -n 1 | cut -d' ' -f1-2), $(nginx -v 2>&1 | cut -d' ' -f3)"
  echo "- machine: $(bench_machine)"
  echo "- disk: $(df -h --output=source,fstype,size "$work" | tail -n 1 | tr -s ' ')"
  echo "- $runs runs per case, interleaved; page cache dropped before each run: $is_root; medians shown"
  echo "- load average (1, 5, 15 min) before the data was made: $load_start; after the last run: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- peak RSS: GNU time's maximum resident set size of the largest single process (for a pipeline, not the sum);"
  echo "  cgroup peak: the peak memory usage of a memory cgroup holding only the run (RSS plus the page cache its writes leave, as a pod's limit counts it): ${cg_root:-not measured}"
  echo "  CPU: user + system seconds of the command and all its processes (nginx not counted); MiB/s: uncompressed MiB per wall second"
  echo
  for g in file block gzip; do
    for id in "${order[@]}"; do
      if [ "${group[$id]}" = "$g" ]; then
        printf '%s\t%s\t%s\t%s\n' "$g" "$id" "${ref[$g]}" "${label[$id]}"
      fi
    done
  done > "$work/cases.tsv"
  python3 - "$results" "$work/cases.tsv" "$size_mib" \
    "${group_title[file]}" "${group_title[block]}" "${group_title[gzip]}" <<'PY'
import statistics, sys
from collections import defaultdict

results, cases, size_mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
titles = dict(zip(["file", "block", "gzip"], sys.argv[4:7]))
wall, rss, cpu, cgmem, failed, all_runs = (defaultdict(list) for _ in range(6))
for line in open(results):
    id_, _run, w, r, c, m, status = line.rstrip("\n").split("\t")
    all_runs[id_].append(w if status == "ok" else f"{w} ({status}, {int(r) // 1024} MiB)")
    if status == "ok":
        wall[id_].append(float(w))
        rss[id_].append(int(r) / 1024)
        cpu[id_].append(float(c))
        if m != "NA":
            cgmem[id_].append(int(m))
    else:
        failed[id_].append(status)
# Medians over the successful runs only.
med = {k: statistics.median(v) for k, v in wall.items()}
med_rss = {k: statistics.median(v) for k, v in rss.items()}
med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
med_cg = {k: f"{statistics.median(v):.0f}" for k, v in cgmem.items()}

groups = defaultdict(list)
for line in open(cases):
    g, id_, ref, label = line.rstrip("\n").split("\t")
    groups[g].append((id_, ref, label))

for g, rows in groups.items():
    print(f"### {titles[g]}\n")
    print("| tool | median wall s | MiB/s | ratio vs reference | median peak RSS MiB | median cgroup peak MiB | median CPU s | failed runs | wall s, all runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for id_, ref, label in rows:
        runs = ", ".join(all_runs[id_])
        fails = f"{len(failed[id_])} of {len(all_runs[id_])}" if failed[id_] else "0"
        if id_ not in med:
            print(f"| `{label}` | — | — | — | — | — | — | {fails} | {runs} |")
            continue
        rel = "1.00 (reference)" if id_ == ref else (f"{med[id_] / med[ref]:.2f}" if ref in med else "—")
        print(f"| `{label}` | {med[id_]:.2f} | {size_mib / med[id_]:.0f} | {rel} | {med_rss[id_]:.1f} | {med_cg.get(id_, '—')} | {med_cpu[id_]:.2f} | {fails} | {runs} |")
    print()

def goal(name, ids, value, limit, unit=""):
    fails = [f"{i}: {len(failed[i])} of {len(all_runs[i])} runs failed" for i in ids if failed[i]]
    if value is None:
        print(f"| {name} | — | ≤ {limit}{unit} | MISSED ({'; '.join(fails) or 'no data'}) |")
        return
    ok = "met" if value <= limit and not fails else "MISSED"
    note = f" ({'; '.join(fails)})" if fails else ""
    print(f"| {name} | {value:.2f}{unit} | ≤ {limit}{unit} | {ok}{note} |")

def ratio(a, b):
    return med[a] / med[b] if a in med and b in med else None

print("### Goals\n")
print("| goal | measured | target | |")
print("|---|---:|---:|---|")
goal("http-import ÷ `curl -o F && sha256sum F` (wall)", ["hi_file"], ratio("hi_file", "curl_sha"), 0.6, "×")
goal("http-import ÷ `curl -o F` (wall)", ["hi_file"], ratio("hi_file", "curl"), 1.1, "×")
goal("http-import --connections 4 ÷ `curl -o F && sha256sum F` (wall)", ["hi_file_c4"], ratio("hi_file_c4", "curl_sha"), 0.6, "×")
goal("http-import --connections 4 ÷ `curl -o F` (wall)", ["hi_file_c4"], ratio("hi_file_c4", "curl"), 1.1, "×")
for id_ in ["hi_file", "hi_file_c4", "hi_block", "hi_gz"]:
    if id_ in all_runs:
        goal(f"peak RSS of {id_} (median)", [id_], med_rss.get(id_), 64, " MiB")
print()
print("Reported without a goal: "
      + ", ".join(f"{a} ÷ {b} = {ratio(a, b):.2f}×" for a, b in
                  [("hi_block", "curl_dd"), ("hi_gz", "curl_gunzip_sha"), ("hi_file", "curl_sync")]
                  if ratio(a, b) is not None) + ".")
PY
} > "$report"
cat "$report"
log "written to $report"
