#!/usr/bin/env bash
# run.sh is `make test-vm`: it tests an iSCSI target with the real Linux kernel initiator
# (open-iscsi + dm-multipath) running in a QEMU guest under TCG. See README.md.
#
#   TARGET=hasan|tgt   target under test (default hasan: built from ./cmd/hasan)
#   HASAN_VM_CACHE     guest cache directory (default /var/cache/hasan-test-vm)
#   HASAN_VM_TIMEOUT   seconds before the guest is killed (default 600)
#   HASAN_VM_KEEP=1    keep the work directory (logs, LUN image) even on success
#
# Exit status 0 only when every step passed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${TARGET:-hasan}
vm_timeout=${HASAN_VM_TIMEOUT:-600}

iqn=iqn.2025-01.io.hasan:vm-test
initiator=iqn.2025-01.io.hasan:vm-initiator
other_initiator=iqn.2025-01.io.hasan:not-allowed
chap_user=vmtest
chap_secret=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-16)
chap_wrong=${chap_secret%?}X
[[ $chap_wrong != "$chap_secret" ]] || chap_wrong=${chap_secret%?}Y
mutual_user=vmtarget
mutual_secret=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-16)
mutual_wrong=${mutual_secret%?}X
[[ $mutual_wrong != "$mutual_secret" ]] || mutual_wrong=${mutual_secret%?}Y
lun_bytes=$((1024 * 1024 * 1024))
data_mib=32

t_start=$(date +%s.%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "test-vm: $*"; }

case $target in
  hasan | tgt) ;;
  *) say "TARGET must be hasan or tgt, not '$target'"; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
  say "must run as root (guest image build, tgtd)"
  exit 2
fi

# Host tools, installed on a fresh Debian machine when missing.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v socat >/dev/null || need+=(socat)
command -v cpio >/dev/null || need+=(cpio)
command -v ss >/dev/null || need+=(iproute2)
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v ps >/dev/null || need+=(procps)
[[ $target != tgt ]] || command -v tgtd >/dev/null || need+=(tgt)
if ((${#need[@]})); then
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

work=$(mktemp -d /tmp/hasan-vm.XXXXXX)
pids=()
ok=0
stop_target=:
cleanup() {
  local pid
  # tgtd ignores SIGTERM while it has targets; it is shut down through its control port.
  $stop_target
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  local i alive
  for i in $(seq 50); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      say "pid $pid did not stop on SIGTERM in 5 s; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  # QEMU's forwarders outlive it only while their target connection lingers.
  for pid in $(ps -eo pid=,args= | awk -v w="$work/socat-" '$2 == "socat" && $3 == "-lf" && index($4, w) == 1 { print $1 }'); do
    kill "$pid" 2>/dev/null || true
  done
  if [[ $ok == 1 && -z ${HASAN_VM_KEEP:-} ]]; then
    rm -rf "$work"
  else
    rm -f "$work/initrd"
    say "logs kept in $work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- guest --------------------------------------------------------------------------
t=$(date +%s)
guest=$("$here/build-guest.sh")
say "guest $guest ($(($(date +%s) - t)) s)"

# --- target -------------------------------------------------------------------------
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}
port1=$(free_port)
port2=$(free_port)
while [[ $port2 == "$port1" ]]; do port2=$(free_port); done
truncate -s "$lun_bytes" "$work/lun0.img"

wait_listen() { # port pid
  local i
  for i in $(seq 100); do
    ss -Htln "sport = :$1" | grep -q . && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

start_hasan() {
  command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
  say "building ./cmd/hasan"
  (cd "$repo" && go build -o "$work/hasan" ./cmd/hasan)
  "$work/hasan" target run \
    --listen "127.0.0.1:$port1" --listen "127.0.0.1:$port2" \
    --iqn "$iqn" --lun "0=$work/lun0.img,size=1G" \
    --chap "$chap_user:$chap_secret" --mutual-chap "$mutual_user:$mutual_secret" --allow "$initiator" \
    >"$work/target.log" 2>&1 &
  pids+=($!)
  target_pid=$!
}

start_tgt() {
  local cport
  # tgtd's control socket is per port; never reuse one another tgtd owns.
  cport=$((1000 + RANDOM % 30000))
  while [[ -e /var/run/tgtd/socket.$cport ]]; do cport=$((1000 + RANDOM % 30000)); done
  tgtd -f -C "$cport" --iscsi "portal=127.0.0.1:$port1" >"$work/target.log" 2>&1 &
  pids+=($!)
  target_pid=$!
  local i
  for i in $(seq 100); do
    [[ -S /var/run/tgtd/socket.$cport ]] && break
    sleep 0.1
  done
  tgtadm() { command tgtadm -C "$cport" --lld iscsi "$@"; }
  tgtadm --op new --mode portal --param "portal=127.0.0.1:$port2"
  tgtadm --op new --mode target --tid 1 -T "$iqn"
  tgtadm --op new --mode logicalunit --tid 1 --lun 1 -b "$work/lun0.img"
  # tgt 1.0.85 files --initiator-name with the address rules, so with "ALL" any name
  # logs in (checked with iscsi-inq -i): the ACL step is skipped for tgt.
  tgtadm --op bind --mode target --tid 1 -I ALL
  tgtadm --op new --mode account --user "$chap_user" --password "$chap_secret"
  tgtadm --op bind --mode account --tid 1 --user "$chap_user"
  tgtadm --op new --mode account --user "$mutual_user" --password "$mutual_secret"
  tgtadm --op bind --mode account --tid 1 --user "$mutual_user" --outgoing
  unset -f tgtadm
  stop_target="stop_tgt $cport $target_pid"
}

stop_tgt() { # control-port pid
  local i
  tgtadm -C "$1" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
  tgtadm -C "$1" --lld iscsi --op delete --mode system >/dev/null 2>&1 || true
  for i in $(seq 30); do
    kill -0 "$2" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$2" 2>/dev/null || true
}

acl_check=1
acl_skip_why=
if [[ $target == tgt ]]; then
  acl_check=0
  acl_skip_why="tgt 1.0.85 does not enforce initiator-name ACLs"
fi
"start_$target"
if ! wait_listen "$port1" "$target_pid" || ! wait_listen "$port2" "$target_pid"; then
  say "FAIL target did not listen on 127.0.0.1:$port1 and :$port2"
  tail -n 40 "$work/target.log"
  exit 1
fi
say "target $target listening on 127.0.0.1:$port1 and 127.0.0.1:$port2 (pid $target_pid)"

# --- per-run initramfs part: the test script and its parameters ----------------------
mkdir -p "$work/run/hasan-vm"
install -m 755 "$here/guest/test.sh" "$work/run/hasan-vm/test.sh"
cat >"$work/run/hasan-vm/test.env" <<EOF
IQN='$iqn'
INITIATOR='$initiator'
OTHER_INITIATOR='$other_initiator'
CHAP_USER='$chap_user'
CHAP_SECRET='$chap_secret'
CHAP_WRONG='$chap_wrong'
MUTUAL_USER='$mutual_user'
MUTUAL_SECRET='$mutual_secret'
MUTUAL_WRONG='$mutual_wrong'
PORTAL1='10.0.2.100:3260'
PORTAL2='10.0.2.101:3260'
GUEST_ADDR='10.0.2.15/24'
LUN_BYTES='$lun_bytes'
DATA_MIB='$data_mib'
ACL_CHECK='$acl_check'
ACL_SKIP_WHY='$acl_skip_why'
EOF
(cd "$work/run" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$work/run.cpio.gz"
cat "$guest/initrd.cpio.gz" "$work/run.cpio.gz" >"$work/initrd"

# --- guest run ----------------------------------------------------------------------
# User networking with restrict=on: the guest reaches nothing but the two forwarded
# portals, each piped by socat (one per connection) to the target on loopback.
# cut_portal N: the guest asks (B.path_cut) for its connection to portal N to be cut.
# libslirp double-forks the guestfwd commands, so their socat processes are children of
# init; ours are the ones logging to this run's socat-PORT.log.
cut_portal() {
  local port=$port1 pid
  [[ $1 == 2 ]] && port=$port2
  for pid in $(ps -eo pid=,args= | awk -v lf="$work/socat-$port.log" '$2 == "socat" && $3 == "-lf" && $4 == lf { print $1 }'); do
    kill "$pid" 2>/dev/null && echo "  (host: killed forwarder $pid of portal $1, 127.0.0.1:$port)"
  done
  return 0
}
fwd() { echo "guestfwd=tcp:$1-cmd:socat -lf $work/socat-$2.log - TCP:127.0.0.1:$2"; }
: >"$work/results.log"
: >"$work/console.log"
t_boot=$(date +%s.%N)
timeout --kill-after=10 "$vm_timeout" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp 2 -m 1024 \
  -nodefaults -display none -no-reboot \
  -kernel "$guest/vmlinuz" -initrd "$work/initrd" \
  -append "console=ttyS0 net.ifnames=0 panic=1 loglevel=4" \
  -drive "file=$guest/rootfs.img,if=virtio,format=raw,snapshot=on" \
  -netdev "user,id=n0,restrict=on,$(fwd 10.0.2.100:3260 "$port1"),$(fwd 10.0.2.101:3260 "$port2")" \
  -device virtio-net-pci,netdev=n0 \
  -serial "file:$work/console.log" -serial "file:$work/results.log" &
qemu_pid=$!
pids+=($qemu_pid)
tail -n +1 -F --pid="$qemu_pid" "$work/results.log" 2>/dev/null | while read -r line; do
  line=${line%$'\r'}
  up=$(awk -v a="$t_boot" -v b="$(date +%s.%N)" 'BEGIN { printf "%6.1f", b - a }')
  echo "$up $line" >>"$work/timeline.txt"
  [[ $line != "HOST cut "* ]] || cut_portal "${line#HOST cut }"
  [[ $line == RUN* || $line == SUM* ]] || echo "  [$up s] $line"
done || true
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
# The serial line adds \r to every line.
tr -d '\r' <"$work/results.log" >"$work/results.txt"

# --- verdict ------------------------------------------------------------------------
required=(setup discovery discovery_chap A.login_wrong_chap A.login_no_auth A.acl_other_initiator
  A.mutual_chap A.mutual_chap_wrong_target_secret A.login_chap
  A.mkfs_write A.logout A.relogin A.verify A.logout_again
  B.multipathd B.login_portal1 B.login_portal2 B.same_wwid B.one_map B.io B.path_cut B.path_loss B.teardown)
fails=0
for s in "${required[@]}"; do
  [[ $s == A.acl_other_initiator && $acl_check == 0 ]] && continue
  if ! grep -q "^PASS $s " "$work/results.txt"; then
    grep -q "^FAIL $s " "$work/results.txt" || say "FAIL $s: never reported"
    fails=$((fails + 1))
  fi
done
if ! grep -q '^DONE' "$work/results.txt"; then
  why="qemu exit $qemu_rc"
  ((qemu_rc != 124)) || why="killed after ${vm_timeout} s"
  say "FAIL guest did not finish ($why); last step started: $(grep '^RUN ' "$work/results.txt" | tail -n 1 | cut -d' ' -f2)"
  fails=$((fails + 1))
fi
if ! kill -0 "$target_pid" 2>/dev/null; then
  say "FAIL target process exited during the test"
  fails=$((fails + 1))
fi

# The guest's files must be in the LUN's backing file, read here without the target.
nsums=0
while read -r _ sum name; do
  nsums=$((nsums + 1))
  got=$(debugfs -R "cat /$name" "$work/lun0.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [[ $got != "$sum" ]]; then
    say "FAIL host.backing_file: /$name in lun0.img has sha256 $got, the guest wrote $sum"
    fails=$((fails + 1))
  fi
done < <(grep '^SUM ' "$work/results.txt")
if ((nsums == 0)); then
  say "FAIL host.backing_file: the guest reported no checksums"
  fails=$((fails + 1))
else
  say "backing file: $nsums file(s) checked against the guest's sha256"
fi

bootdisk=$(awk '$1 == "TIME" && $2 == "disk_present" { print $3 }' "$work/results.txt")
userspace=$(awk '$1 == "TIME" && $2 == "userspace" { print $3 }' "$work/results.txt")
hostdisk=$(awk '$2 == "TIME" && $3 == "disk_present" { print $1 }' "$work/timeline.txt" 2>/dev/null)
say "timings: kernel->userspace ${userspace:-?} s, kernel->iSCSI disk present ${bootdisk:-?} s (guest clock)," \
  "qemu start->disk present ${hostdisk:-?} s;" \
  "guest run $(awk -v a="$t_boot" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s, total $(elapsed) s"
if ((fails)); then
  say "---- guest console (tail) ----"
  tail -n 60 "$work/console.log" | tr -d '\r'
  say "---- target log (tail) ----"
  tail -n 60 "$work/target.log"
  say "FAIL: $fails step(s) failed against TARGET=$target"
  exit 1
fi
ok=1
npass=$(grep -c '^PASS ' "$work/results.txt")
nskip=$(grep -c '^SKIP ' "$work/results.txt" || true)
say "PASS: $npass steps passed ($nskip skipped) + backing-file check, against TARGET=$target"
