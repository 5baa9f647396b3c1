#!/bin/bash
# chassis_control hook for OpenIPMI ipmi_sim, one BMC per lab storage node.
# ipmi_sim runs it through popen as:  bmc-hook.sh DIR NETNS get power
#                                     bmc-hook.sh DIR NETNS set power 0|1
# DIR is the node's state directory shared with the Go lab:
#   power    "on" or "off" (what chassis status reports)
#   pgid     process group of every process the lab started on the node
#   cutting  exists while a power cut is in progress (the lab refuses to
#            start processes then)
# Power off SIGKILLs the node's process group and then any process left in
# the node's network namespace (a daemon that called setsid), and only then
# reports "off": a status read of "off" means the node is really dead.
# Power on only marks the node powered; the test decides what to restart.
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
setpower() {
  echo "$1" >"$dir/power.tmp" && mv -f "$dir/power.tmp" "$dir/power"
}
powercut() {
  : >"$dir/cutting"
  local pg p i
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
    setpower on
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
