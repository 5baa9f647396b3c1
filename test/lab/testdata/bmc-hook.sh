#!/bin/bash
# chassis_control hook for OpenIPMI ipmi_sim, one BMC per lab storage node.
# ipmi_sim runs it through popen as:  bmc-hook.sh DIR NETNS get power
#                                     bmc-hook.sh DIR NETNS set power 0|1
# DIR is the node's state directory shared with the Go lab:
#   power    "on" or "off" (what chassis status reports)
#   pgid     process group of every process the lab started on the node
#   cutting  exists while a power cut is in progress (the lab refuses to
#            start processes then)
#   links    "IFNAME ADDR/BITS" per line: the node's NICs and their boot-time
#            addresses
#   isolated "SWITCH-NETNS PORT" while the node is isolated: the port is
#            disabled again when the node's carrier returns at power on
# Power off SIGKILLs the node's process group and then any process left in
# the node's network namespace (a daemon that called setsid), and only then
# reports "off": a status read of "off" means the node is really dead.
# A powered-off machine's NICs go dark first: the links go down before any
# process dies, so no FIN or RST escapes, and the namespace's kernel stops
# answering ARP for addresses (a floating IP) the dead node held. Power on
# is a boot: the links come back with their configured addresses only (an
# address added at run time, such as a VIP, is gone) and nothing is started;
# the test decides what to restart.
# Fault files in DIR: fault-stuck (acknowledge off, never switch),
# fault-status (status read fails), fault-late (switch off 0.5 s late).
dir=$1 ns=$2 op=$3 what=$4 val=${5//\"/}
if [ "$what" != power ]; then
  [ "$op" = get ] && echo "$what:0"
  exit 0
fi
echo "$(date +%s.%N) $op $what $val" >>"$dir/hook.log"
# ipmi_sim's UDP socket and the popen pipe are inherited and not
# close-on-exec; a background child must not keep them open.
closefds() {
  local fd
  for fd in $(ls /proc/$BASHPID/fd); do
    [ "$fd" -gt 2 ] && eval "exec $fd>&-"
  done 2>/dev/null
}
# One `ip -batch` per transition keeps the cut short.
linksdown() {
  [ -r "$dir/links" ] || return 0
  while read -r ifname addr; do
    echo "link set dev $ifname down"
  done <"$dir/links" | ip -n "$ns" -force -batch - >/dev/null 2>&1
}
linksboot() {
  [ -r "$dir/links" ] || return 0
  while read -r ifname addr; do
    echo "link set dev $ifname down"
    echo "addr flush dev $ifname"
    echo "addr add $addr dev $ifname"
    echo "link set dev $ifname up"
  done <"$dir/links" | ip -n "$ns" -force -batch - >/dev/null 2>&1
  if [ -r "$dir/isolated" ]; then
    read -r swns port <"$dir/isolated"
    # The port refuses the change until the carrier is back.
    for i in $(seq 100); do
      bridge -n "$swns" link set dev "$port" state 0 >/dev/null 2>&1 && break
      sleep 0.01
    done
  fi
}
setpower() {
  echo "$1" >"$dir/power.tmp" && mv -f "$dir/power.tmp" "$dir/power"
}
powercut() {
  : >"$dir/cutting"
  local pg p i
  linksdown
  pg=$(cat "$dir/pgid" 2>/dev/null)
  [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null
  for i in 1 2 3; do
    p=$(ip netns pids "$ns" 2>/dev/null)
    [ -z "$p" ] && break
    kill -9 $p 2>/dev/null
    sleep 0.01
  done
  setpower off
  rm -f "$dir/cutting"
}
case $op in
get)
  [ -e "$dir/fault-status" ] && exit 1
  if [ "$(cat "$dir/power" 2>/dev/null)" = on ]; then echo power:1; else echo power:0; fi
  ;;
set)
  if [ "$val" = 1 ]; then
    rm -f "$dir/cutting"
    was=$(cat "$dir/power" 2>/dev/null)
    setpower on
    [ "$was" = on ] || linksboot
  else
    [ -e "$dir/fault-stuck" ] && exit 0
    if [ -e "$dir/fault-late" ]; then
      (closefds; sleep 0.5; powercut) </dev/null >/dev/null 2>&1 &
    else
      powercut
    fi
  fi
  ;;
esac
exit 0
