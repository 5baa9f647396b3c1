#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive (real iSCSI
# clients and peers), only when something is missing. Needs root on Debian.
set -euo pipefail

# command -> package
declare -A need=(
  [iscsi-test-cu]=libiscsi-bin
  [iscsi-perf]=libiscsi-bin
  [tgtd]=tgt
  [qemu-img]=qemu-utils
  [qemu-system-x86_64]=qemu-system-x86
  [socat]=socat
  [mmdebstrap]=mmdebstrap
  [cpio]=cpio
  [mkfs.ext4]=e2fsprogs
  [sg_inq]=sg3-utils
  [ip]=iproute2
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# Files rather than commands.
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || missing+=(qemu-block-extra)
[ -e /bin/busybox ] || [ -e /usr/bin/busybox ] || missing+=(busybox-static)

# The fencing tests' real peers (ipmi_sim, snmpd, fence-agents).
"$(dirname "$0")/../fencing/testdata/deps.sh"

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "hack/deps.sh: missing packages: ${missing[*]}; run as root or install them with apt-get" >&2
  exit 1
fi
echo "hack/deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# tgt's package enables a systemd unit; our tests start their own tgtd.
systemctl disable --now tgt >/dev/null 2>&1 || true
