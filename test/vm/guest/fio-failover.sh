#!/bin/bash
# fio-failover.sh runs as PID 1 inside the test guest for test/cluster's
# TestVMFioOwnerPowerLoss (vm_fio_test.go). The guest sits on the lab's cluster bridge
# (a tap device in the lab's switch namespace) and uses the real Linux open-iscsi
# initiator, with Debian's stock iscsid.conf, through the cluster's floating IP. While fio
# writes and verifies, it asks the host to cut the owner's power and measures, from fio's
# own per-I/O completion log, the longest time no I/O completed.
#
# Lines on the second serial port (/dev/ttyS1), read by the host test:
#
#   RUN  <step>
#   PASS <step> <seconds> [detail]
#   FAIL <step> <seconds> <detail>
#   CONF <key> <value>              the session's effective open-iscsi timeouts
#   NOTE <what> <text>              for the host's log
#   HOST poweroff <ms>              cut the owner's power now (<ms>: guest ms since fio start)
#   FIO rc=<n> err=<n> ...          fio's exit status and error counters
#   STALL max_ms=<n> from_ms=<n> to_ms=<n> poweroff_ms=<n> ios=<n>
#   KERN conn_errors=<n> io_errors=<n>
#   TIMELINE conn_error_s=<s> reconnected_s=<s>   after the power-cut request
#   DONE failures=<n>
#
# Step output and fio's report go to the console (ttyS0).
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /dev/pts /dev/shm
mount -t devpts devpts /dev/pts

# shellcheck source=/dev/null
. /hasan-vm/test.env

exec 3>/dev/ttyS1

report() { echo "$*" >&3; echo "=== $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# ms and the uptime reads below read the clocks without forking: under TCG a fork costs tens of ms,
# which would blur the timeline. fio's log_unix_epoch is in the same clock as ms.
ms() { local r=${EPOCHREALTIME/./}; echo "${r%???}"; }

failures=0
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
		report "PASS $name $d $(tail -n 1 /tmp/step.out | tr -d '\r' | cut -c1-200)"
	else
		failures=$((failures + 1))
		report "FAIL $name $d $(tail -n 6 /tmp/step.out | tr '\n' '|' | tr -d '\r' | cut -c1-600)"
	fi
	return $rc
}

finish() {
	echo "--- kernel log (iSCSI, SCSI, block) ---"
	dmesg | grep -Ei 'iscsi|connection|session|sd [0-9]|I/O error|blk_update' | tail -n 40
	report "DONE failures=$failures"
	sync
	echo o >/proc/sysrq-trigger
	sleep 60
}

setup() {
	ip link set lo up
	modprobe -a virtio_net iscsi_tcp sd_mod || return 1
	ip link set eth0 up || return 1
	# No default route: the guest reaches the cluster network and nothing else.
	ip addr add "$GUEST_ADDR" dev eth0 || return 1
	echo "InitiatorName=$INITIATOR" >/etc/iscsi/initiatorname.iscsi
	# iscsid.conf is Debian's, untouched: the point is stock NOP-Out and replacement
	# timeouts. Its iscsid.startup uses systemctl, which this guest has not, so iscsid
	# is started here, in the foreground so that its log (reconnects) gets a time on
	# each line.
	iscsid -f 2>&1 | while IFS= read -r l; do
		read -r u _ </proc/uptime
		echo "$u $l"
	done >/tmp/iscsid.log &
	for _ in $(seq 50); do
		pidof iscsid >/dev/null && break
		sleep 0.1
	done
	pidof iscsid >/dev/null || { echo "iscsid is not running"; return 1; }
	for _ in $(seq 30); do
		busybox ping -c 1 -W 1 "${PORTAL%:*}" >/dev/null 2>&1 && break
	done
	echo "kernel $(uname -r), $(iscsiadm --version), $(fio --version), iscsid.conf sha256 $(sha256sum </etc/iscsi/iscsid.conf | cut -c1-16)"
}

discover() {
	local out
	out=$(iscsiadm -m discovery -t sendtargets -p "$PORTAL") || { echo "$out"; return 1; }
	echo "$out"
	# The answer must name the target at the floating IP (hasan has been seen to write it
	# IPv4-mapped, ::ffff:A.B.C.D, which the host test reports).
	grep -qE "^(::ffff:)?$PORTAL,[0-9]+ $IQN\$" <<<"$out" || { echo "SendTargets through $PORTAL did not return $IQN at $PORTAL"; return 1; }
	report "NOTE sendtargets $(tr '\n' ';' <<<"$out")"
	# Log in through the floating IP only, whatever else the target advertised.
	iscsiadm -m node -o delete >/dev/null 2>&1
	iscsiadm -m node -o new -T "$IQN" -p "$PORTAL" >/dev/null || return 1
	# Diagnostics only (the host says so loudly): open-iscsi waits DefaultTime2Wait
	# (offered 2, result function Maximum) before reconnecting after a connection error.
	if [ -n "${TIME2WAIT:-}" ]; then
		iscsiadm -m node -T "$IQN" -p "$PORTAL" -o update -n node.session.iscsi.DefaultTime2Wait -v "$TIME2WAIT" || return 1
	fi
	# Report the effective timeouts, so the host can check they are the stock ones.
	local k v
	for k in node.session.timeo.replacement_timeout node.conn[0].timeo.noop_out_interval \
		node.conn[0].timeo.noop_out_timeout node.conn[0].timeo.login_timeout \
		node.session.iscsi.DefaultTime2Wait; do
		v=$(iscsiadm -m node -T "$IQN" -p "$PORTAL" | awk -v k="$k" '$1 == k { print $3 }')
		report "CONF $k $v"
	done
	echo "found $IQN at $PORTAL"
}

login() {
	iscsiadm -m node -T "$IQN" -p "$PORTAL" --login || return 1
	disk=
	for _ in $(seq 300); do
		disk=$(iscsiadm -m session -P 3 2>/dev/null | awk '/Attached scsi disk/ { print $4; exit }')
		[ -n "$disk" ] && [ -b "/dev/$disk" ] && break
		disk=
		sleep 0.1
	done
	[ -n "$disk" ] || { echo "no disk appeared"; iscsiadm -m session -P 3; return 1; }
	local size
	size=$(blockdev --getsize64 "/dev/$disk")
	[ "$size" = "$LUN_BYTES" ] || { echo "/dev/$disk has $size bytes, want $LUN_BYTES"; return 1; }
	echo "/dev/$disk via $PORTAL, $size bytes, SCSI command timeout $(cat /sys/block/$disk/device/timeout) s"
}

# run_fio writes and verifies through the session while the host cuts the owner's power.
# verify_backlog makes fio read back and check every block shortly after writing it, so
# reads and writes both run across the failover; every completion is logged with its time
# (write_lat_log, log_avg_msec=0), which is what the stall is measured from.
run_fio() {
	cat >/tmp/job.fio <<-EOF
		[global]
		filename=/dev/$disk
		ioengine=libaio
		direct=1
		bs=$FIO_BS
		iodepth=$FIO_IODEPTH
		rw=randwrite
		size=$FIO_SIZE
		time_based=1
		runtime=$FIO_RUNTIME
		rate_iops=$FIO_RATE_IOPS,$FIO_RATE_IOPS
		verify=crc32c
		verify_backlog=$FIO_VERIFY_BACKLOG
		verify_fatal=1
		do_verify=1
		randrepeat=0
		write_lat_log=/tmp/io
		log_avg_msec=0
		log_unix_epoch=1
		[failover]
	EOF
	cat /tmp/job.fio
	local rc
	t0=$(ms)
	fio --eta=never /tmp/job.fio >/tmp/fio.out 2>&1 &
	local fpid=$!
	sleep "$POWEROFF_AFTER"
	if kill -0 "$fpid" 2>/dev/null; then
		read -r cut_up _ </proc/uptime
		poweroff_ms=$(($(ms) - t0))
		report "HOST poweroff $poweroff_ms"
	else
		poweroff_ms=-1
		echo "fio ended before the power cut"
	fi
	wait "$fpid"
	rc=$?
	cat /tmp/fio.out
	# err= on fio's job line; fio exits non-zero on an I/O error or a verify mismatch
	# (verify_fatal) as well.
	local err verr
	err=$(awk '/groupid=.*err=/ { sub(/.*err= */, ""); if (match($0, /^[0-9]+/)) print substr($0, 1, RLENGTH); exit }' /tmp/fio.out)
	verr=$(grep -ciE 'verify.*(bad|fail|mismatch)|bad magic|crc32c.*wanted' /tmp/fio.out)
	report "FIO rc=$rc err=${err:-none} verify_errors=$verr $(grep -E '^ *(READ|WRITE):' /tmp/fio.out | tr -s ' ' | tr '\n' ';' | cut -c1-300)"
	stall
	local conn io
	conn=$(dmesg | grep -c 'detected conn error')
	io=$(dmesg | grep -cE 'I/O error|critical (target|medium) error|blk_update_request')
	report "KERN conn_errors=$conn io_errors=$io"
	timeline
	[ "$rc" = 0 ] || { echo "fio exit status $rc"; return 1; }
	echo "fio done"
}

# timeline reports, in seconds after the power-cut request (guest uptime clock), when the
# kernel saw the connection fail (the tickle's reset, or a NOP-Out timeout) and when
# iscsid had the session operational again.
timeline() {
	local err op
	[ -n "$cut_up" ] || return 0
	err=$(dmesg | awk -F'[][]' '/detected conn error/ { gsub(/ /, "", $2); print $2; exit }')
	op=$(awk '/operational after recovery/ { print $1; exit }' /tmp/iscsid.log)
	report "TIMELINE $(awk -v c="$cut_up" -v e="${err:--1}" -v o="${op:--1}" 'BEGIN {
		printf "conn_error_s=%.3f reconnected_s=%.3f", (e < 0 ? -1 : e - c), (o < 0 ? -1 : o - c) }')"
	grep -iE 'error|recovery|reopen|login' /tmp/iscsid.log | tail -n 10
}

# stall reports the longest interval without a completed I/O (reads or writes), from
# fio's per-I/O logs (log_unix_epoch: the first column is the completion's Unix time in
# ms), as ms after fio was started.
stall() {
	local logs
	logs=$(ls /tmp/io_lat.*.log 2>/dev/null)
	[ -n "$logs" ] || { report "STALL max_ms=-1 from_ms=-1 to_ms=-1 poweroff_ms=$poweroff_ms ios=0"; return; }
	# shellcheck disable=SC2086
	cat $logs | cut -d, -f1 | sort -n | awk -v p="$poweroff_ms" -v t0="$t0" '
		{ t = $1 - t0; if (n > 0 && t - last > max) { max = t - last; from = last; to = t } last = t; n++ }
		END { printf "STALL max_ms=%d from_ms=%d to_ms=%d poweroff_ms=%d ios=%d\n", max, from, to, p, n }' >/tmp/stall
	report "$(cat /tmp/stall)"
}

logout() {
	iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout || return 1
	echo "logged out"
}

poweroff_ms=-1
cut_up=
t0=0
step setup setup || finish
step discovery discover || finish
step login login || finish
step fio run_fio
step logout logout
finish
