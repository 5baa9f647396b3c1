#!/bin/bash
# test.sh runs as PID 1 inside the test guest (see ../run.sh). It drives the real Linux
# open-iscsi initiator against the target under test, reachable at $PORTAL1 and $PORTAL2,
# and reports one line per step on the second serial port (/dev/ttyS1):
#
#   RUN  <step>                      a step starts (the last RUN line names a hang)
#   PASS <step> <seconds> [detail]
#   FAIL <step> <seconds> <detail>
#   SKIP <step> 0 <why>
#   TIME <event> <seconds since kernel start>
#   DONE
#
# Step output goes to the console (ttyS0), which the host prints on failure.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /dev/pts /dev/shm /mnt
mount -t devpts devpts /dev/pts

# shellcheck source=/dev/null
. /hasan-vm/test.env

exec 3>/dev/ttyS1

report() { echo "$*" >&3; echo "=== $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

failures=0
# step NAME FUNC [ARGS...]: runs FUNC in this shell (so it may set variables), reports
# PASS or FAIL with its duration. A FUNC's last line of output is the detail on success
# and the tail of its output on failure.
step() {
	local name=$1 start rc d
	shift
	report "RUN $name"
	start=$(now)
	"$@" >/tmp/step.out 2>&1
	rc=$?
	d=$(since "$start")
	cat /tmp/step.out
	if [ $rc -eq 0 ]; then
		report "PASS $name $d $(tail -n 1 /tmp/step.out | tr -d '\r' | cut -c1-160)"
	else
		failures=$((failures + 1))
		report "FAIL $name $d $(tail -n 4 /tmp/step.out | tr '\n' '|' | tr -d '\r' | cut -c1-400)"
	fi
	return $rc
}
skip() { report "SKIP $1 0 $2"; }

finish() {
	report "DONE failures=$failures"
	sync
	echo o >/proc/sysrq-trigger
	sleep 60
}

# --- guest environment ----------------------------------------------------------------

setup() {
	ip link set lo up
	modprobe -a virtio_net iscsi_tcp sd_mod dm_multipath dm_round_robin || return 1
	echo "modules loaded at $(now)"
	/lib/systemd/systemd-udevd --daemon || return 1
	udevadm trigger --action=add --type=subsystems
	udevadm trigger --action=add --type=devices
	udevadm settle --timeout=30
	echo "udev settled at $(now)"
	ip link set eth0 up || return 1
	ip addr add "$GUEST_ADDR" dev eth0 || return 1

	echo "InitiatorName=$INITIATOR" >/etc/iscsi/initiatorname.iscsi
	# Short timeouts: a failing login or a lost path must fail in seconds, not minutes.
	cat >/etc/iscsi/iscsid.conf <<-EOF
		iscsid.startup = /usr/sbin/iscsid
		node.startup = manual
		node.session.timeo.replacement_timeout = 5
		node.conn[0].timeo.login_timeout = 5
		node.conn[0].timeo.logout_timeout = 5
		node.conn[0].timeo.noop_out_interval = 2
		node.conn[0].timeo.noop_out_timeout = 2
		node.session.initial_login_retry_max = 1
		node.session.err_timeo.abort_timeout = 5
		node.session.err_timeo.lu_reset_timeout = 10
		node.session.iscsi.InitialR2T = No
		node.session.iscsi.ImmediateData = Yes
		node.session.iscsi.FirstBurstLength = 262144
		node.session.iscsi.MaxBurstLength = 16776192
		node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
		discovery.sendtargets.iscsi.MaxRecvDataSegmentLength = 32768
	EOF
	iscsid || return 1
	for _ in $(seq 50); do
		pidof iscsid >/dev/null && break
		sleep 0.1
	done
	pidof iscsid >/dev/null || { echo "iscsid is not running"; return 1; }
	echo "kernel $(uname -r), $(iscsiadm --version)"
}

# iscsiadm wrappers for one node record (the target at portal $1).
node() { local p=$1; shift; iscsiadm -m node -T "$IQN" -p "$p" "$@"; }
set_auth() { # portal method user secret
	node "$1" >/dev/null 2>&1 || iscsiadm -m node -o new -T "$IQN" -p "$1" >/dev/null || return 1
	node "$1" -o update -n node.session.auth.authmethod -v "$2" || return 1
	[ -n "$3" ] || return 0
	node "$1" -o update -n node.session.auth.username -v "$3" &&
		node "$1" -o update -n node.session.auth.password -v "$4"
}
has_session() { iscsiadm -m session 2>/dev/null | grep -q " $1,[0-9-]* $IQN\$"; }
# disk_of PORTAL prints the sd device the session to PORTAL exposes (empty until scanned).
disk_of() {
	iscsiadm -m session -P 3 2>/dev/null | awk -v p="$1" '
		/Persistent Portal:/ { cur = $3 }
		/Attached scsi disk/ && index(cur, p ",") == 1 { print $4; exit }'
}
# wait_disk PORTAL: sets $disk once /dev/sdX of the session at PORTAL exists.
wait_disk() {
	disk=
	for _ in $(seq 300); do
		disk=$(disk_of "$1")
		[ -n "$disk" ] && [ -b "/dev/$disk" ] && return 0
		sleep 0.1
	done
	echo "no disk appeared for the session to $1"
	iscsiadm -m session -P 3
	return 1
}
login() { # portal; sets $disk
	node "$1" --login || return 1
	wait_disk "$1" || return 1
	local size
	size=$(blockdev --getsize64 "/dev/$disk")
	if [ "$size" != "$LUN_BYTES" ]; then
		echo "/dev/$disk has $size bytes, want $LUN_BYTES"
		return 1
	fi
	echo "/dev/$disk via $1, $size bytes"
}
logout() { # portal
	node "$1" --logout || return 1
	if has_session "$1"; then
		echo "session to $1 still present after logout"
		return 1
	fi
	echo "logged out of $1"
}

# --- run A: discovery, CHAP, filesystem, data survives a re-login ---------------------

discover() {
	local out
	out=$(iscsiadm -m discovery -t sendtargets -p "$PORTAL1") || { echo "$out"; return 1; }
	echo "$out"
	if ! grep -q " $IQN\$" <<<"$out"; then
		echo "SendTargets did not return $IQN"
		return 1
	fi
	# Behind QEMU's NAT the target reports its own (host) address, which the guest
	# cannot reach: keep only node records for the forwarded portals.
	iscsiadm -m node -o delete >/dev/null 2>&1
	for p in "$PORTAL1" "$PORTAL2"; do
		iscsiadm -m node -o new -T "$IQN" -p "$p" >/dev/null || return 1
	done
	echo "found $IQN ($(grep -c . <<<"$out") record(s))"
}

discover_chap() {
	# The same discovery with CHAP credentials configured: the target may run CHAP or
	# settle on None (discovery CHAP is not required), but it must answer.
	local p=$PORTAL1 out
	iscsiadm -m discoverydb -t sendtargets -p "$p" -o new >/dev/null || return 1
	for kv in "authmethod CHAP" "username $CHAP_USER" "password $CHAP_SECRET"; do
		set -- $kv
		iscsiadm -m discoverydb -t sendtargets -p "$p" -o update -n "discovery.sendtargets.auth.$1" -v "$2" || return 1
	done
	out=$(iscsiadm -m discoverydb -t sendtargets -p "$p" --discover -o nonpersistent) || { echo "$out"; return 1; }
	echo "$out"
	iscsiadm -m discoverydb -t sendtargets -p "$p" -o delete
	grep -q " $IQN\$" <<<"$out" || { echo "SendTargets with CHAP did not return $IQN"; return 1; }
	echo "found $IQN with discovery CHAP credentials set"
}

expect_login_refused() { # portal method user secret what
	# open-iscsi answers a CHAP challenge whenever a username is set, whatever
	# authmethod says: start from a fresh record so "no authentication" is real.
	node "$1" -o delete >/dev/null 2>&1
	iscsiadm -m node -o new -T "$IQN" -p "$1" >/dev/null || return 1
	set_auth "$1" "$2" "$3" "$4" || return 1
	if node "$1" --login; then
		echo "login with $5 succeeded; it must be refused"
		node "$1" --logout
		return 1
	fi
	if has_session "$1"; then
		echo "a session exists after a refused login with $5"
		return 1
	fi
	echo "login with $5 refused"
}

mutual_chap() { # portal expected-target-secret want(ok|refused)
	set_auth "$1" CHAP "$CHAP_USER" "$CHAP_SECRET" || return 1
	node "$1" -o update -n node.session.auth.username_in -v "$MUTUAL_USER" || return 1
	node "$1" -o update -n node.session.auth.password_in -v "$2" || return 1
	local got=refused
	if node "$1" --login; then
		got=ok
		# Let the disk's scan finish, so the logout does not race the partition reads.
		wait_disk "$1"
		udevadm settle --timeout=10
		node "$1" --logout
	fi
	# Back to one-way CHAP for the steps that follow.
	node "$1" -o delete
	set_auth "$1" CHAP "$CHAP_USER" "$CHAP_SECRET" || return 1
	if [ "$got" != "$3" ]; then
		echo "mutual CHAP login was $got, want $3"
		return 1
	fi
	echo "mutual CHAP login $got as expected"
}

acl_refused() {
	# A second iface record with another initiator name: the target's ACL must refuse it.
	iscsiadm -m iface -I other -o new >/dev/null || return 1
	iscsiadm -m iface -I other -o update -n iface.initiatorname -v "$OTHER_INITIATOR" >/dev/null || return 1
	iscsiadm -m node -o new -T "$IQN" -p "$PORTAL1" -I other >/dev/null || return 1
	local ok=0
	for k in "authmethod CHAP" "username $CHAP_USER" "password $CHAP_SECRET"; do
		set -- $k
		iscsiadm -m node -T "$IQN" -p "$PORTAL1" -I other -o update -n "node.session.auth.$1" -v "$2" || return 1
	done
	iscsiadm -m node -T "$IQN" -p "$PORTAL1" -I other | grep -i initiatorname
	if iscsiadm -m node -T "$IQN" -p "$PORTAL1" -I other --login; then
		ok=1
		iscsiadm -m session -P 1 | grep -i initiatorname
		iscsiadm -m node -T "$IQN" -p "$PORTAL1" -I other --logout
	fi
	iscsiadm -m node -T "$IQN" -p "$PORTAL1" -I other -o delete
	iscsiadm -m iface -I other -o delete
	if [ $ok = 1 ]; then
		echo "login as $OTHER_INITIATOR succeeded; the ACL must refuse it"
		return 1
	fi
	echo "login as $OTHER_INITIATOR refused"
}

mkfs_write() {
	mkfs.ext4 -q -F "/dev/$disk" || return 1
	mount "/dev/$disk" /mnt || return 1
	local n=$((DATA_MIB / 8)) i
	[ $n -ge 1 ] || n=1
	for i in $(seq $n); do
		dd if=/dev/urandom of="/mnt/f$i" bs=1M count=8 status=none || return 1
	done
	# An odd size, so the last block is partial.
	head -c 1234567 /dev/urandom >/mnt/odd || return 1
	(cd /mnt && sha256sum f* odd) >/tmp/sums || return 1
	umount /mnt || return 1
	echo "wrote $((n * 8)) MiB + 1234567 bytes, $(wc -l </tmp/sums) files"
}

mount_verify() { # device
	mount "$1" /mnt || return 1
	(cd /mnt && sha256sum -c --quiet /tmp/sums) || { umount /mnt; return 1; }
	umount /mnt || return 1
	echo "$(wc -l </tmp/sums) checksums match on $1"
}

# --- run B: two portals, one dm-multipath device --------------------------------------

multipath_setup() {
	cat >/etc/multipath.conf <<-EOF
		defaults {
			user_friendly_names no
			find_multipaths off
			polling_interval 2
			path_grouping_policy multibus
			path_selector "round-robin 0"
			rr_min_io_rq 1
			no_path_retry 5
		}
		blacklist {
			devnode "^vd[a-z]"
		}
	EOF
	multipathd || return 1
	for _ in $(seq 50); do
		multipathd show daemon 2>/dev/null | grep -qE 'running|idle' && break
		sleep 0.2
	done
	multipathd show daemon
}

same_wwid() {
	local a b
	a=$(/lib/udev/scsi_id -g -u -d "/dev/$disk1")
	b=$(/lib/udev/scsi_id -g -u -d "/dev/$disk2")
	echo "$disk1: '$a', $disk2: '$b'"
	[ -n "$a" ] || { echo "no WWID on $disk1"; return 1; }
	[ "$a" = "$b" ] || { echo "the two paths report different WWIDs"; return 1; }
	wwid=$a
	echo "both paths WWID $wwid"
}

# paths_of MAP prints the sd devices dm-multipath holds under MAP.
paths_of() { ls "/sys/block/$(basename "$(readlink -f "/dev/mapper/$1")")/slaves" 2>/dev/null | sort | tr '\n' ' '; }

one_map() {
	local maps want
	want=$(printf '%s\n' "$disk1" "$disk2" | sort | tr '\n' ' ')
	for i in $(seq 100); do
		[ "$i" = 50 ] && { echo "multipathd made no map in 10 s; running multipath"; multipath -v2; }
		maps=$(dmsetup ls --target multipath 2>/dev/null | grep -v '^No devices' | awk '{print $1}')
		if [ "$maps" = "$wwid" ] && [ "$(paths_of "$wwid")" = "$want" ]; then
			break
		fi
		sleep 0.2
	done
	multipath -ll
	if [ "$maps" != "$wwid" ]; then
		echo "want exactly one multipath map named $wwid, have: $(echo $maps)"
		return 1
	fi
	if [ "$(paths_of "$wwid")" != "$want" ]; then
		echo "map $wwid holds '$(paths_of "$wwid")', want '$want'"
		return 1
	fi
	local active
	active=$(multipath -ll "$wwid" | grep -cE '[0-9]+:[0-9]+:[0-9]+:[0-9]+ sd[a-z]+ .*active ready')
	[ "$active" = 2 ] || { echo "want 2 active ready paths, have $active"; return 1; }
	echo "one map /dev/mapper/$wwid with 2 active paths: $want"
}

writes_of() { awk '{print $5}' "/sys/block/$1/stat"; }

multipath_io() {
	local m=/dev/mapper/$wwid w1 w2
	w1=$(writes_of "$disk1")
	w2=$(writes_of "$disk2")
	echo "t=$(now) start"
	if [ "$A_OK" = 1 ]; then
		mount "$m" /mnt || return 1
		(cd /mnt && sha256sum -c --quiet /tmp/sums) || { umount /mnt; echo "run A data differs through multipath"; return 1; }
		echo "run A's files verified through $m"
	else
		mkfs.ext4 -q -F "$m" || return 1
		mount "$m" /mnt || return 1
	fi
	echo "t=$(now) writing"
	dd if=/dev/urandom of=/mnt/mp bs=1M count=16 oflag=direct status=none || { umount /mnt; return 1; }
	(cd /mnt && sha256sum mp) >/tmp/mpsum
	echo "t=$(now) umount"
	umount /mnt || return 1
	echo 3 >/proc/sys/vm/drop_caches
	echo "t=$(now) mount"
	mount "$m" /mnt || return 1
	echo "t=$(now) verify"
	(cd /mnt && sha256sum -c --quiet /tmp/mpsum) || { umount /mnt; return 1; }
	umount /mnt || return 1
	echo "t=$(now) done"
	w1=$(($(writes_of "$disk1") - w1))
	w2=$(($(writes_of "$disk2") - w2))
	echo "writes per path: $disk1 +$w1, $disk2 +$w2"
	[ "$w1" -gt 0 ] && [ "$w2" -gt 0 ] || { echo "round-robin I/O did not reach both paths"; return 1; }
	echo "16 MiB written and verified through $m; writes on both paths ($disk1 +$w1, $disk2 +$w2)"
}

active_paths() { multipath -ll "$wwid" 2>/dev/null | grep -cE '[0-9]+:[0-9]+:[0-9]+:[0-9]+ sd[a-z]+ .*active ready running'; }
conn_errors() { dmesg | grep -c 'detected conn error'; }

path_cut() {
	# The host kills the forwarder of portal 1's connection while a write runs: the
	# initiator must reconnect (same ISID/TSIH, so the target sees a reinstatement),
	# no I/O may fail, and both paths must come back.
	local m=/dev/mapper/$wwid errs t0 i rc
	mount "$m" /mnt || return 1
	errs=$(conn_errors)
	dd if=/dev/urandom of=/mnt/cut bs=1M count=24 oflag=direct status=none &
	local dd_pid=$!
	sleep 0.5
	t0=$(now)
	report "HOST cut 1"
	for i in $(seq 100); do
		[ "$(conn_errors)" -gt "$errs" ] && break
		sleep 0.1
	done
	if [ "$(conn_errors)" -le "$errs" ]; then
		wait $dd_pid
		umount /mnt
		echo "the initiator saw no connection error after the host cut portal 1"
		return 1
	fi
	echo "connection error seen $(since "$t0") s after the cut request"
	wait $dd_pid
	rc=$?
	[ $rc -eq 0 ] || { umount /mnt; echo "write during the cut failed (dd exit $rc)"; dmesg | tail -n 20; return 1; }
	echo "write during the cut finished $(since "$t0") s after the cut request"
	(cd /mnt && sha256sum cut) >/tmp/cutsum
	umount /mnt || return 1
	echo 3 >/proc/sys/vm/drop_caches
	mount "$m" /mnt || return 1
	(cd /mnt && sha256sum -c --quiet /tmp/cutsum) || { umount /mnt; echo "data written across the cut differs"; return 1; }
	umount /mnt || return 1
	for i in $(seq 150); do
		[ "$(active_paths)" = 2 ] && break
		sleep 0.2
	done
	dmesg | grep -E 'connection|session' | tail -n 6
	multipath -ll "$wwid"
	[ "$(active_paths)" = 2 ] || { echo "both paths are not active again 30 s after the cut"; return 1; }
	echo "portal 1 cut under a 24 MiB write: no I/O error, data verified, 2 paths active again $(since "$t0") s after the cut"
}

path_loss() {
	# Log out of the first portal while the map is in use; reads must carry on over the other.
	local m=/dev/mapper/$wwid
	mount "$m" /mnt || return 1
	node "$PORTAL1" --logout || { umount /mnt; return 1; }
	echo 3 >/proc/sys/vm/drop_caches
	(cd /mnt && sha256sum -c --quiet /tmp/mpsum) || { umount /mnt; return 1; }
	dd if=/dev/urandom of=/mnt/after bs=1M count=4 oflag=direct status=none || { umount /mnt; return 1; }
	(cd /mnt && sha256sum f* odd mp cut after 2>/dev/null) | while read -r sum name; do
		report "SUM $sum $name"
	done
	umount /mnt || return 1
	multipath -ll "$wwid"
	echo "I/O continued on $disk2 after logging out of $PORTAL1"
}

teardown() {
	multipath -f "$wwid" || { multipath -ll; return 1; }
	iscsiadm -m node -T "$IQN" --logout >/dev/null 2>&1
	if iscsiadm -m session >/dev/null 2>&1; then
		iscsiadm -m session
		echo "sessions left after logout"
		return 1
	fi
	echo "map flushed, all sessions logged out"
}

# --- main -----------------------------------------------------------------------------

report "TIME userspace $(now)"
step setup setup || finish
step discovery discover || finish
step discovery_chap discover_chap

A_OK=0
step A.login_wrong_chap expect_login_refused "$PORTAL1" CHAP "$CHAP_USER" "$CHAP_WRONG" "a wrong CHAP secret"
step A.login_no_auth expect_login_refused "$PORTAL1" None "" "" "no authentication"
if [ "$ACL_CHECK" = 1 ]; then
	step A.acl_other_initiator acl_refused
else
	skip A.acl_other_initiator "$ACL_SKIP_WHY"
fi
step A.mutual_chap mutual_chap "$PORTAL1" "$MUTUAL_SECRET" ok
step A.mutual_chap_wrong_target_secret mutual_chap "$PORTAL1" "$MUTUAL_WRONG" refused
set_auth "$PORTAL1" CHAP "$CHAP_USER" "$CHAP_SECRET" >/dev/null
if step A.login_chap login "$PORTAL1"; then
	report "TIME disk_present $(now)"
	step A.mkfs_write mkfs_write &&
		step A.logout logout "$PORTAL1" &&
		step A.relogin login "$PORTAL1" &&
		step A.verify mount_verify "/dev/$disk" &&
		step A.logout_again logout "$PORTAL1" &&
		A_OK=1
fi
[ "$A_OK" = 1 ] || iscsiadm -m node -T "$IQN" --logout >/dev/null 2>&1

set_auth "$PORTAL1" CHAP "$CHAP_USER" "$CHAP_SECRET" >/dev/null
set_auth "$PORTAL2" CHAP "$CHAP_USER" "$CHAP_SECRET" >/dev/null
if step B.multipathd multipath_setup &&
	step B.login_portal1 login "$PORTAL1" && disk1=$disk &&
	step B.login_portal2 login "$PORTAL2" && disk2=$disk &&
	step B.same_wwid same_wwid &&
	step B.one_map one_map; then
	step B.io multipath_io && step B.path_cut path_cut && step B.path_loss path_loss
	step B.teardown teardown
fi
finish
