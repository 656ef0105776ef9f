#!/usr/bin/env bash
# Benchmarks backup-restore against the tools a user would run instead, on
# one tree of BENCH_SMALL_FILES random files (1–32 KiB) plus BENCH_BIG_FILES
# random files of 96 MiB (defaults: 20 000 small + 8 big, about 1.1 GiB):
#   - a local restic repository (version 2) of the tree:
#     backup-restore --repository vs `restic restore latest` (reference);
#   - a tar.zst of the tree: backup-restore --archive vs
#     `zstd -dc | tar -x` (reference).
# Each case runs BENCH_RUNS times, interleaved, into a fresh ext4 volume (a
# direct-I/O loop device, as root) with the page cache dropped. Prints a
# markdown table of median wall time, ratio against the reference and median
# peak RSS (GNU time), and writes it to bench-out/backup-restore.md.
#
# backup-restore does more than the references: it flushes (syncfs), reads
# every file back to verify it against the repository's hashes, and keeps
# the SHA-256 of the archive.
#
# usage: scripts/bench-backup-restore.sh BIN_DIR   (make bench-backup-restore)
#   BENCH_SMALL_FILES=20000 BENCH_BIG_FILES=8 BENCH_RUNS=3
#   BENCH_TMPDIR=/var/tmp   where the tree, repository and outputs live (not tmpfs)
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 BIN_DIR" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
# Only its helpers (bench_volume, bench_fresh_volume); this script keeps its
# own work directory and cleanup.
# shellcheck source=scripts/lib/bench.sh
source "$root/scripts/lib/bench.sh"
bin=$(cd "$1" && pwd)/backup-restore
small=${BENCH_SMALL_FILES:-20000}
big=${BENCH_BIG_FILES:-8}
runs=${BENCH_RUNS:-3}
[ -x "$bin" ] || { echo "no $bin (run make static)" >&2; exit 1; }
[ "$runs" -ge 1 ] && [ "$runs" -le 20 ] || { echo "BENCH_RUNS must be 1..20" >&2; exit 2; }
[ "$small" -ge 1 ] && [ "$small" -le 1000000 ] || { echo "BENCH_SMALL_FILES must be 1..1000000" >&2; exit 2; }
[ "$big" -ge 0 ] && [ "$big" -le 100 ] || { echo "BENCH_BIG_FILES must be 0..100" >&2; exit 2; }
for tool in restic zstd tar python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
is_root=false
[ "$(id -u)" -eq 0 ] && is_root=true
$is_root || echo "warning: not root: the page cache is not dropped between runs" >&2

work=$(mktemp -d -p "${BENCH_TMPDIR:-/var/tmp}" populator-bench-br.XXXXXX)
loopdev=
cleanup() {
  if [ -n "$loopdev" ]; then
    umount "$work/vol" 2>/dev/null || true
    losetup -d "$loopdev" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

cp "$bin" "$work/backup-restore"
bin=$work/backup-restore
revision=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)

# --- data -------------------------------------------------------------------
tree=$work/tree
log "making $small small files and $big files of 96 MiB in $tree"
python3 - "$tree" "$small" "$big" <<'PY'
import os, random, sys
tree, small, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42)
for i in range(small):
    d = os.path.join(tree, f"d{i // 200:04d}")
    if i % 200 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(os.urandom(rng.randint(1024, 32 * 1024)))
os.makedirs(os.path.join(tree, "big"), exist_ok=True)
for i in range(big):
    with open(os.path.join(tree, "big", f"b{i:02d}.bin"), "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
PY
tree_bytes=$(du -sb "$tree" | cut -f1)
tree_files=$(find "$tree" -type f | wc -l)
log "tree: $tree_files files, $((tree_bytes / 1024 / 1024)) MiB"
export RESTIC_PASSWORD=bench-password RESTIC_CACHE_DIR=$work/restic-cache
repo=$work/repo
restic -q -r "$repo" init --repository-version 2
(cd "$work" && restic -q -r "$repo" backup --host bench tree)
log "restic repository: $(du -sh "$repo" | cut -f1)"
tar -C "$tree" -cf - . | zstd -q -T0 -3 > "$work/tree.tar.zst"
log "tree.tar.zst: $(du -sh "$work/tree.tar.zst" | cut -f1)"
printf '%s' "$RESTIC_PASSWORD" > "$work/password"
# One file to check in every restored tree (no head in a pipe: pipefail).
(cd "$tree" && find . -type f | sort) > "$work/files.txt"
first_rel=$(sed -n 1p "$work/files.txt")
sum_first=$(sha256sum < "$tree/$first_rel" | cut -d' ' -f1)

# Every run restores into a fresh volume, as a populator does: a new ext4 on
# a direct-I/O loop device (as root; otherwise a directory of the work
# filesystem). Restoring into the work filesystem, whose earlier outputs had
# just been removed, measured that filesystem's state more than the tools
# (see scripts/lib/bench.sh, bench_volume).
bench_volume $(( (tree_bytes >> 20) * 2 + 1024 ))
target_desc="a directory of the work filesystem"
[ -n "$loopdev" ] && target_desc="a fresh ext4 on a direct-I/O loop device each run"
out=$work/vol/out
declare -A label cmd group
order=()
add() { group[$1]=$2; label[$1]=$3; cmd[$1]=$4; order+=("$1"); }
add br_restic restic "backup-restore --repository REPO --target DIR" \
  "$bin --progress none --repository $repo --password-file $work/password --target $out --termination-log $work/result.json"
add restic_restore restic "restic restore latest --target DIR" \
  "restic -q --no-cache -r $repo restore latest --target $out"
add br_tar tar "backup-restore --archive tree.tar.zst --target DIR" \
  "$bin --progress none --archive $work/tree.tar.zst --target $out --termination-log $work/result.json"
add zstd_tar tar "zstd -dc tree.tar.zst | tar -x -C DIR" \
  "zstd -dc $work/tree.tar.zst | tar -x -C $out"
# The same with the flush backup-restore does before reporting success
# (tar leaves the data dirty in the page cache).
add zstd_tar_sync tar "zstd -dc tree.tar.zst | tar -x -C DIR && sync -f DIR" \
  "zstd -dc $work/tree.tar.zst | tar -x -C $out && sync -f $out"
declare -A ref=([restic]=restic_restore [tar]=zstd_tar)

# The restored tree must hold the files: count them, check the first one.
verify() {
  local n first
  n=$(find "$out" -type f | wc -l)
  first=$(find "$out" -type f -path "*${first_rel#.}" -print -quit)
  [ "$n" -eq "$tree_files" ] || { echo "restored $n files, expected $tree_files" >&2; return 1; }
  [ -n "$first" ] && [ "$(sha256sum < "$first" | cut -d' ' -f1)" = "$sum_first" ] || { echo "wrong content in ${first:-<missing>}" >&2; return 1; }
}

results=$work/results.tsv
: > "$results"
for ((run = 1; run <= runs; run++)); do
  for id in "${order[@]}"; do
    rm -f "$work/result.json"
    bench_fresh_volume
    mkdir "$out"
    sync
    if $is_root; then echo 3 > /proc/sys/vm/drop_caches; fi
    status=ok
    if [[ ${cmd[$id]} == "$bin "* ]]; then read -r -a argv <<< "${cmd[$id]}"; else argv=(bash -c "set -o pipefail; ${cmd[$id]}"); fi
    if timeout 1800 /usr/bin/time -f '%e %M %U %S' -o "$work/time.txt" "${argv[@]}" > "$work/run.log" 2>&1; then
      verify || status="wrong output"
    else
      status="exit $?"
      sed 's/^/    /' "$work/run.log" >&2
    fi
    read -r wall rss_kib user sys < <(tail -n 1 "$work/time.txt") || true
    [[ $wall =~ ^[0-9.]+$ && $rss_kib =~ ^[0-9]+$ ]] || { wall=NA; rss_kib=0; user=0; sys=0; }
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$run" "$wall" "$rss_kib" "$cpu" "$status" >> "$results"
    log "run $run $id: $wall s, $((rss_kib / 1024)) MiB peak RSS, $cpu s CPU, $status"
  done
done

report=$root/bench-out/backup-restore.md
mkdir -p "$(dirname "$report")"
{
  echo "# backup-restore benchmark"
  echo
  echo "- $(date -u +%Y-%m-%dT%H:%MZ), $("$bin" --version) (source $revision), $(restic version | cut -d' ' -f1-2), $(zstd --version | head -n1)"
  echo "- machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM; disk: $(df -h --output=source,fstype "$work" | tail -n 1 | tr -s ' '); target: $target_desc"
  echo "- tree: $tree_files files, $((tree_bytes / 1024 / 1024)) MiB; $runs runs per case, interleaved, page cache dropped: $is_root; medians"
  echo "- load average before: $load_start; after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  python3 - "$results" <<'PY'
import statistics, sys
from collections import defaultdict
wall, rss, cpu, status = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
for line in open(sys.argv[1]):
    id_, _run, w, r, c, s = line.rstrip("\n").split("\t")
    status[id_].append(s)
    if s == "ok":
        wall[id_].append(float(w)); rss[id_].append(int(r) / 1024); cpu[id_].append(float(c))
med = {k: statistics.median(v) for k, v in wall.items()}
labels = {
    "br_restic": ("backup-restore --repository (flush + read-back verify)", "restic_restore", 0.7, 256),
    "restic_restore": ("restic restore latest", None, None, None),
    "br_tar": ("backup-restore --archive tree.tar.zst (flush + sha256)", "zstd_tar", 1.0, 64),
    "zstd_tar": ("zstd -dc | tar -x", None, None, None),
    "zstd_tar_sync": ("zstd -dc | tar -x && sync -f (same flush as ours)", "zstd_tar", None, None),
}
print("| case | median wall s | ratio vs reference | goal | median peak RSS MiB | RSS goal | median CPU s | wall s, all runs |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for id_, (label, ref, goal, rss_goal) in labels.items():
    runs = ", ".join(w for w in (str(x) for x in wall[id_])) or "; ".join(status[id_])
    if id_ not in med:
        print(f"| {label} | — | — | — | — | — | — | {runs} |"); continue
    ratio = f"{med[id_] / med[ref]:.2f}×" if ref and ref in med else "reference"
    g = f"≤ {goal}×" if goal else ""
    rg = f"≤ {rss_goal}" if rss_goal else ""
    print(f"| {label} | {med[id_]:.2f} | {ratio} | {g} | {statistics.median(rss[id_]):.0f} | {rg} | {statistics.median(cpu[id_]):.2f} | {runs} |")
PY
} > "$report"
cat "$report"
log "written to $report"
