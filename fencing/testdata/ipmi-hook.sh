#!/bin/bash
# chassis_control hook for OpenIPMI ipmi_sim, used by the fencing tests.
# ipmi_sim runs it through popen as:  ipmi-hook.sh DIR get power
#                                     ipmi-hook.sh DIR set power 0|1
# "Power" is a real process (the node): power on starts it, power off
# SIGKILLs it, and status reads whether it is still alive.
# Fault files in DIR: fault-stuck (acknowledge off, never switch),
# fault-status (status read fails), fault-late (switch off 0.5s late).
dir=$1 op=$2 what=$3 val=${4//\"/}
if [ "$what" != power ]; then
  [ "$op" = get ] && echo "$what:0"
  exit 0
fi
alive() {
  [ -f "$dir/node.pid" ] || return 1
  local st
  st=$(sed -e 's/^.*) //' "/proc/$(cat "$dir/node.pid")/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
# ipmi_sim's UDP socket and the popen pipe are inherited; anything left
# running must not hold them.
closefds() {
  local fd
  for fd in $(ls /proc/$$/fd); do
    [ "$fd" -gt 2 ] && eval "exec $fd>&-"
  done 2>/dev/null
}
echo "$(date +%s.%N) $op $what $val" >>"$dir/hook.log"
case $op in
get)
  [ -e "$dir/fault-status" ] && exit 1
  if alive; then echo power:1; else echo power:0; fi
  ;;
set)
  if [ "$val" = 1 ]; then
    alive && exit 0
    (closefds; exec sleep 86400 </dev/null >/dev/null 2>&1) &
    echo $! >"$dir/node.pid"
  else
    [ -e "$dir/fault-stuck" ] && exit 0
    alive || exit 0
    pid=$(cat "$dir/node.pid")
    if [ -e "$dir/fault-late" ]; then
      (closefds; sleep 0.5; kill -9 "$pid") </dev/null >/dev/null 2>&1 &
    else
      kill -9 "$pid"
    fi
  fi
  ;;
esac
exit 0
