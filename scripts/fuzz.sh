#!/usr/bin/env bash
# Runs each disk image fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS,
# seeded with small images made by qemu-img, and prints the executions and
# findings of each. Needs nightly Rust and cargo-fuzz
# (cargo install cargo-fuzz). Findings land in fuzz/artifacts/TARGET/.
#
# usage: scripts/fuzz.sh [TARGET...]   (make fuzz; default: every target)
#   FUZZ_SECONDS=600   time per target
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${FUZZ_SECONDS:-600}
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(qcow2 vmdk vhd vhdx)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img is missing (for the seed corpus)" >&2; exit 1; }
cd "$root/fuzz"
unset RUSTFLAGS   # the project's static-linking flags do not mix with sanitizers

# Seeds: a tiny raw disk with data, text and zeros, in each format's variants.
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
truncate -s 2M "$seeds/raw"
head -c 64K /dev/urandom | dd of="$seeds/raw" conv=notrunc status=none
head -c 128K < <(yes 'some text for compression') | dd of="$seeds/raw" bs=64K seek=8 conv=notrunc status=none
seed() { # target name qemu-format options...
  local target=$1 name=$2 format=$3
  shift 3
  mkdir -p "corpus/$target"
  [ -e "corpus/$target/$name" ] && return   # kept from an earlier run
  qemu-img convert -q -f raw -O "$format" "$@" "$seeds/raw" "corpus/$target/$name"
}
seed qcow2 v3 qcow2 -o cluster_size=4096
seed qcow2 v2 qcow2 -o compat=0.10,cluster_size=4096
seed qcow2 zlib qcow2 -c -o cluster_size=4096
seed qcow2 zstd qcow2 -c -o cluster_size=4096,compression_type=zstd
seed qcow2 extl2 qcow2 -o cluster_size=16384,extended_l2=on
seed vmdk sparse vmdk -o subformat=monolithicSparse
seed vmdk stream vmdk -o subformat=streamOptimized
seed vhd dynamic vpc -o subformat=dynamic
seed vhdx dynamic vhdx -o subformat=dynamic,block_size=1M

for target in "${targets[@]}"; do
  echo "== $target: $seconds s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -max_len=4194304 \
    -rss_limit_mb=512 -timeout=10 2>&1 | tee "$seeds/$target.log" | grep -E '^(#[0-9]+.*(DONE|pulse)|==|SUMMARY|Done)' || true
  runs=$(grep -oE 'Done [0-9]+ runs' "$seeds/$target.log" | tail -n 1 || true)
  found=$(ls "artifacts/$target" 2>/dev/null | wc -l)
  echo "== $target: ${runs:-no summary (see above)}; artifacts: $found"
done
