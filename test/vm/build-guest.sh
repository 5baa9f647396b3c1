#!/usr/bin/env bash
# build-guest.sh builds (or finds in the cache) the Debian bookworm guest that runs the
# real Linux open-iscsi initiator for test/vm/run.sh, and prints the cache directory.
#
# The cache entry is keyed by a hash of everything that shapes the image (this script,
# the package list and the initramfs /init), so editing the guest test script never
# triggers a rebuild, and an unchanged recipe is never rebuilt on a rerun.
#
# Output (in $HASAN_VM_CACHE/<hash>/):
#   vmlinuz          the guest kernel, booted directly by QEMU
#   initrd.cpio.gz   busybox + virtio/ext4 modules + /init that mounts /dev/vda
#   rootfs.img       sparse ext4 image of the root fs, opened with snapshot=on
#
# Needs root (mmdebstrap in root mode and file ownership inside the image).
# `build-guest.sh --check` prints the directory only if it is already built (exit 3 if not).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${HASAN_VM_CACHE:-/var/cache/hasan-test-vm}
mirror=${HASAN_VM_MIRROR:-http://deb.debian.org/debian}
suite=bookworm

# Packages in the guest. Changing this list changes the cache key.
packages=(
  linux-image-amd64 open-iscsi multipath-tools e2fsprogs udev kmod iproute2
  busybox-static procps sg3-utils coreutils util-linux
  fio
)
# Modules the initramfs needs to mount the root disk; the rest load from the root fs.
initrd_modules=(virtio_pci virtio_blk ext4)

log() { echo "build-guest: $*" >&2; }

key=$( { cat "${BASH_SOURCE[0]}" "$here/guest/initramfs-init"; } | sha256sum | cut -c1-16)
out="$cache_root/$key"
if [[ -f $out/ok ]]; then
  echo "$out"
  exit 0
fi
# --check only looks: exit 3 when this recipe's guest is not built yet (a test that
# must not spend a minute and a half building it skips instead).
if [[ ${1:-} == --check ]]; then
  log "no guest built for this recipe in $out (run $0 as root)"
  exit 3
fi

if [[ $(id -u) -ne 0 ]]; then
  log "building the guest needs root (mmdebstrap, image file ownership)"
  exit 1
fi

# Host tools; installed on a fresh Debian machine when missing.
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

mkdir -p "$cache_root"
# One builder at a time per cache; a second caller waits and then reuses the result.
exec 9>"$cache_root/.lock"
flock 9
if [[ -f $out/ok ]]; then
  echo "$out"
  exit 0
fi

start=$(date +%s)
tmp=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root

log "mmdebstrap $suite from $mirror into $root"
comma_packages=$(IFS=,; echo "${packages[*]}")
mmdebstrap --variant=minbase --mode=root --include="$comma_packages" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  "$suite" "$root" "deb $mirror $suite main" >&2

kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
[[ -n $kver && -f $root/boot/vmlinuz-$kver ]] || { log "no kernel in the guest root"; exit 1; }
log "kernel $kver"

# Initramfs: static busybox from the guest itself, the root-disk modules in load order.
ird=$tmp/initrd
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,modules}
cp "$root/bin/busybox" "$ird/bin/busybox"
cp "$here/guest/initramfs-init" "$ird/init"
chmod 755 "$ird/init"
: >"$ird/modules/order"
while read -r verb path _; do
  [[ $verb == insmod ]] || continue
  path=${path#"$root"}
  name=$(basename "$path")
  case $name in
    *.ko.xz) xz -dc "$root$path" >"$ird/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$root$path" >"$ird/modules/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$root$path" "$ird/modules/$name" ;;
  esac
  grep -qx "$name" "$ird/modules/order" || echo "$name" >>"$ird/modules/order"
done < <(for m in "${initrd_modules[@]}"; do chroot "$root" modprobe -S "$kver" --show-depends "$m"; done)
[[ -s $ird/modules/order ]] || log "no modules for ${initrd_modules[*]}: assuming they are built in"
log "initramfs modules: $(tr '\n' ' ' <"$ird/modules/order")"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$tmp/initrd.cpio.gz"

cp "$root/boot/vmlinuz-$kver" "$tmp/vmlinuz"
# The guest boots its own init script, not Debian's initrd.
rm -f "$root"/boot/initrd.img* "$root"/initrd.img*
mkfs.ext4 -q -F -L hasanvm -E lazy_itable_init=0 -d "$root" "$tmp/rootfs.img" 2G
rm -rf "$root" "$ird"

mv "$tmp" "$out"
trap - EXIT
touch "$out/ok"
log "built $out in $(($(date +%s) - start)) s"
echo "$out"
