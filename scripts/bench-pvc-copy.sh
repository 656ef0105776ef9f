#!/usr/bin/env bash
# Benchmarks pvc-copy against the tools people use instead, on ext4 loop
# devices: a tree of many 4 KiB files plus a few big ones, a block device that
# is half zeros, and both over a veth pair between two network namespaces.
# Every case runs BENCH_RUNS times with the page cache dropped and a freshly
# made target; references end with `sync -f` as pvc-copy flushes before it
# reports success. Prints a markdown table (median wall time, ratio to the
# group's reference, peak RSS) and writes it to bench-out/pvc-copy.md.
#
# Cases:
#   tree, local:   pvc-copy; cp -a (reference); rsync -aHAX; tar c | tar x
#   block, local:  pvc-copy; dd bs=4M conv=sparse,fsync (reference; note that
#                  dd leaves the target's old bytes where the source is zero)
#   tree, network: pvc-copy send/receive --streams 4; rsync -aHAX over ssh
#                  (reference); tar c | ssh | tar x. Peak RSS of both sides.
#   block, network: pvc-copy send/receive; dd | ssh dd (reference)
#
# usage: scripts/bench-pvc-copy.sh BIN_DIR   (make bench-pvc-copy; root)
#   BENCH_FILES=50000     small files (4 KiB each)
#   BENCH_BIG=3           big files ...
#   BENCH_BIG_MIB=200     ... of this many MiB
#   BENCH_BLOCK_MIB=2048  block device size (a multiple of 8), half zeros
#   BENCH_RUNS=4          runs per case (local cases in reverse order in even runs)
#   BENCH_TMPDIR=/var/tmp where the loop files live (not tmpfs)
set -euo pipefail

[ "$#" -eq 1 ] || { echo "usage: $0 BIN_DIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$1" && pwd)/pvc-copy
files=${BENCH_FILES:-50000}
big=${BENCH_BIG:-3}
big_mib=${BENCH_BIG_MIB:-200}
block_mib=${BENCH_BLOCK_MIB:-2048}
runs=${BENCH_RUNS:-4}
[ -x "$bin" ] || { echo "no $bin (run make static)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "the benchmark needs root (loop devices, namespaces)" >&2; exit 1; }
[ $((block_mib % 8)) -eq 0 ] || { echo "BENCH_BLOCK_MIB must be a multiple of 8" >&2; exit 2; }
for tool in rsync tar ssh nsenter bc ssh-keygen mkfs.ext4 losetup ip python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done

work=$(mktemp -d -p "${BENCH_TMPDIR:-/var/tmp}" pvc-copy-bench.XXXXXX)
ns_a=pcbencha$$ ns_b=pcbenchb$$
mounts=() pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  # loopdev runs in command substitutions: find the devices by backing file.
  for l in $(losetup -a | grep -F "$work/" | cut -d: -f1); do losetup -d "$l" 2>/dev/null || true; done
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

cp "$bin" "$work/pvc-copy"
bin=$work/pvc-copy
revision=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)

loopdev() { # NAME MIB [LOSETUP OPTIONS] -> device
  truncate -s "${2}M" "$work/$1.loop"
  losetup --find --show "${@:3}" "$work/$1.loop"
}
fresh_fs() { # DEVICE MOUNTPOINT
  mountpoint -q "$2" && umount "$2"
  # Inode tables and journal written now: the kernel would otherwise zero
  # them in the background (ext4lazyinit) during the next timed cases.
  mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$1"; mkdir -p "$2"; mount "$1" "$2"; mounts+=("$2")
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# --- data ------------------------------------------------------------------
tree_mib=$(( files * 4 / 1024 + big * big_mib ))
fs_mib=$(( tree_mib * 13 / 10 + files / 64 + 256 ))
src_dev=$(loopdev src "$fs_mib"); dst_dev=$(loopdev dst "$fs_mib")
fresh_fs "$src_dev" "$work/src"
log "making $files files of 4 KiB and $big files of $big_mib MiB ($tree_mib MiB)"
python3 - "$work/src" "$files" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
block = os.urandom(4096)
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000), "e%02d" % (i % 1000 // 100))
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%d" % i), "wb") as f:
        f.write(block[i % 64:] + block[:i % 64])
EOF
for ((i = 0; i < big; i++)); do head -c "$((big_mib << 20))" /dev/urandom > "$work/src/big$i"; done
sync -f "$work/src"
log "making a $block_mib MiB block device: 4 MiB random, 4 MiB zeros"
# The block devices use direct I/O: without it the loop driver writes into
# the page cache of its backing file, a cache a real block volume does not
# have, and every flush of the device then writes it out (see
# docs/benchmarks.md). The filesystems of the tree cases keep the default.
bsrc=$(loopdev bsrc "$block_mib" --direct-io=on); bdst=$(loopdev bdst "$block_mib" --direct-io=on)
for ((i = 0; i < block_mib / 8; i++)); do head -c 4M /dev/urandom; head -c 4M /dev/zero; done |
  dd of="$bsrc" bs=4M iflag=fullblock oflag=direct status=none

# --- network: two namespaces, a veth pair, sshd in A -------------------------
# nsenter --net enters only the network namespace: mounts stay shared.
ip netns add "$ns_a"; ip netns add "$ns_b"
ip link add "va$$" netns "$ns_a" type veth peer name "vb$$" netns "$ns_b"
ip -n "$ns_a" addr add 10.98.0.1/30 dev "va$$"; ip -n "$ns_b" addr add 10.98.0.2/30 dev "vb$$"
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set "va$$" up; ip -n "$ns_b" link set "vb$$" up
ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey"; ssh-keygen -q -t ed25519 -N '' -f "$work/userkey"
cp "$work/userkey.pub" "$work/authorized_keys"; chmod 600 "$work/authorized_keys"
mkdir -p /run/sshd
nsenter --net=/var/run/netns/"$ns_a" /usr/sbin/sshd -D -p 22 -h "$work/hostkey" -o PermitRootLogin=yes \
  -o AuthorizedKeysFile="$work/authorized_keys" -o StrictModes=no -o PidFile=none &
pids+=($!)
ssh_cmd="ssh -i $work/userkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
echo "bench-token-$$" > "$work/token"
sleep 0.5

# --- runner ----------------------------------------------------------------
results=$work/results.tsv
: > "$results"
timed() { # GROUP NAME RSS_FILE... -- CMD: records wall seconds and peak RSS (KiB)
  local group=$1 name=$2; shift 2
  local start end
  start=$(date +%s.%N)
  /usr/bin/time -f %M -o "$work/rss" bash -c "$*" > "$work/out.log" 2>&1 || { cat "$work/out.log" >&2; echo "case $name failed" >&2; exit 1; }
  if [ -n "${recv_pid:-}" ]; then wait "$recv_pid" || { cat "$work/recv.log" >&2; exit 1; }; recv_pid=; fi
  end=$(date +%s.%N)
  local rss; rss=$(tail -1 "$work/rss")
  [ -s "$work/rss.recv" ] && rss="$rss/$(tail -1 "$work/rss.recv")" && rm -f "$work/rss.recv"
  printf '%s\t%s\t%s\t%s\n' "$group" "$name" "$(echo "$end - $start" | bc)" "$rss" >> "$results"
  log "$group / $name: $(echo "$end - $start" | bc) s"
}
receiver() { # TARGET: starts a pvc-copy receiver in A; sets FP
  rm -f "$work/recv.log" "$work/rss.recv"
  nsenter --net=/var/run/netns/"$ns_a" /usr/bin/time -f %M -o "$work/rss.recv" "$bin" receive --listen 10.98.0.1:9443 \
    --target "$1" --token-file "$work/token" --progress none 2> "$work/recv.log" &
  recv_pid=$!
  for _ in $(seq 100); do grep -q fingerprint "$work/recv.log" 2>/dev/null && break; sleep 0.05; done
  FP=$(grep -o 'fingerprint [0-9A-F:]*' "$work/recv.log" | cut -d' ' -f2)
  sleep 0.2
}
T=$work/dst
tree_case() { # NAME CMD
  fresh_fs "$dst_dev" "$T"; drop_caches; timed tree "$1" "$2"
}
block_case() { drop_caches; timed block "$1" "$2"; }
net_case() { # NAME CMD (the receiver, if any, is waited for inside CMD)
  fresh_fs "$dst_dev" "$T"; drop_caches; timed network "$1" "$2"
}
net_block_case() { drop_caches; timed netblock "$1" "$2"; }

for ((r = 1; r <= runs; r++)); do
  log "run $r of $runs"
  # Local cases in reverse order every other run, so that no tool always
  # runs first after the tree cases: the block copy that does is up to half
  # again slower (dd 3.7-4.2 s first, 2.2-2.8 s second; pvc-copy 4.0 s
  # first, 2.5-3.2 s later, when it always went first).
  local_cases=(tree_pvc tree_cp tree_rsync tree_tar block_pvc block_dd)
  if ((r % 2 == 0)); then
    local_cases=(tree_tar tree_rsync tree_cp tree_pvc block_dd block_pvc)
  fi
  for c in "${local_cases[@]}"; do
    case $c in
      tree_pvc) tree_case "pvc-copy" "$bin --source $work/src --target $T --progress none" ;;
      tree_cp) tree_case "cp -a" "cp -a $work/src/. $T/ && sync -f $T" ;;
      tree_rsync) tree_case "rsync -aHAX" "rsync -aHAX $work/src/ $T/ && sync -f $T" ;;
      tree_tar) tree_case "tar c | tar x" "tar -C $work/src --xattrs --acls -cf - . | tar -C $T --xattrs --acls -xpf - && sync -f $T" ;;
      block_pvc) block_case "pvc-copy" "$bin --source $bsrc --target $bdst --progress none" ;;
      block_dd) block_case "dd bs=4M conv=sparse" "dd if=$bsrc of=$bdst bs=4M conv=sparse,fsync status=none" ;;
    esac
  done
  fresh_fs "$dst_dev" "$T"; drop_caches
  receiver "$T"
  timed network "pvc-copy --streams 4" "nsenter --net=/var/run/netns/$ns_b $bin send --source $work/src --to 10.98.0.1:9443 --token-file $work/token --server-fingerprint $FP --progress none"
  net_case "rsync -aHAX over ssh" "nsenter --net=/var/run/netns/$ns_b rsync -aHAX -e '$ssh_cmd' $work/src/ root@10.98.0.1:$T/ && sync -f $T"
  net_case "tar | ssh | tar" "nsenter --net=/var/run/netns/$ns_b bash -c 'tar -C $work/src --xattrs --acls -cf - . | $ssh_cmd root@10.98.0.1 tar -C $T --xattrs --acls -xpf -' && sync -f $T"
  drop_caches
  receiver "$bdst"
  timed netblock "pvc-copy" "nsenter --net=/var/run/netns/$ns_b $bin send --source $bsrc --to 10.98.0.1:9443 --token-file $work/token --server-fingerprint $FP --progress none"
  net_block_case "dd | ssh dd" "nsenter --net=/var/run/netns/$ns_b bash -c 'dd if=$bsrc bs=4M status=none | $ssh_cmd root@10.98.0.1 dd of=$bdst bs=4M iflag=fullblock conv=fsync status=none'"
done

# --- report ----------------------------------------------------------------
mkdir -p "$root/bench-out"
python3 - "$results" "$root/bench-out/pvc-copy.md" "$revision" "$load_start" "$(cut -d' ' -f1-3 /proc/loadavg)" \
  "$files" "$big" "$big_mib" "$block_mib" "$runs" <<'EOF'
import statistics, sys
res, out, rev, load0, load1, files, big, big_mib, block_mib, runs = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(res) if l.strip()]
refs = {"tree": "cp -a", "block": "dd bs=4M conv=sparse", "network": "rsync -aHAX over ssh", "netblock": "dd | ssh dd"}
titles = {"tree": "tree, local", "block": "block, local", "network": "tree over the veth pair", "netblock": "block over the veth pair"}
by = {}
for g, name, secs, rss in rows:
    by.setdefault(g, {}).setdefault(name, []).append((float(secs), rss))
lines = [f"pvc-copy benchmark ({rev}): {files} files of 4 KiB + {big} × {big_mib} MiB; "
         f"block {block_mib} MiB half zeros; {runs} run(s); load {load0} → {load1}", "",
         "| group | case | median s | vs reference | peak RSS (MiB; send/receive) |", "|---|---|---|---|---|"]
for g in ["tree", "block", "network", "netblock"]:
    cases = by.get(g, {})
    ref = statistics.median(s for s, _ in cases.get(refs[g], [(float("nan"), "")]))
    for name, runs_ in cases.items():
        med = statistics.median(s for s, _ in runs_)
        rss = "/".join(str(round(int(x) / 1024)) for x in runs_[-1][1].split("/") if x)
        cell = name.replace("|", "\\|")
        lines.append(f"| {titles[g]} | {cell} | {med:.2f} | {med / ref:.2f}× | {rss} |")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
EOF
