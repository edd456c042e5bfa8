#!/usr/bin/env bash
# Installs everything userdm and its tests need on a fresh Debian 12 machine (run as root):
# the third-party tools the interop tests drive, and a venv in .venv with userdm installed.
# The venv is made from Debian's python3 with system site-packages, so that Debian's
# python3-libnbd is importable next to userdm. The FUSE export speaks the kernel's protocol
# itself; fuse3 provides fusermount3 (lazy unmounts, tests).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  python3 python3-venv python3-dev python3-libnbd
  nbdkit libnbd-bin qemu-utils fio
  fuse3 bindfs                                 # bindfs: bench/fuse.py's C FUSE daemon, the reference for what FUSE costs
  e2fsprogs util-linux fdisk cryptsetup-bin   # cryptsetup: luksFormat/reencrypt oracles for crypt and LUKS
  thin-provisioning-tools                     # thin_check/thin_dump/thin_restore check thin's metadata
  dmsetup   # its report engine (splitname, help) is the oracle for userdm's; it needs no kernel dm for those
  openssl                                      # scripts/tls-certs.sh: certificates for the NBD TLS tests
  ceph-mon ceph-osd ceph-common python3-rbd python3-rados   # rbd: devices; tests start a throwaway one-node cluster
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# the manual page and bash completion (the completion calls `userdm`: put .venv/bin on PATH)
install -D -m 0644 docs/userdm.8 /usr/local/share/man/man8/userdm.8
install -D -m 0644 scripts/userdm.bash-completion /usr/share/bash-completion/completions/userdm
echo "userdm is set up: .venv/bin/userdm (man userdm; completion after a new shell)"
