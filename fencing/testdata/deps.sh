#!/usr/bin/env bash
# Installs the Debian packages the fencing real-peer tests drive (ipmi_sim,
# ipmitool, snmpd, net-snmp clients, fence-agents), only when something is
# missing. Needs root on Debian. hack/deps.sh may call this script.
set -euo pipefail

# command or file -> package
declare -A need=(
  [ipmi_sim]=openipmi
  [ipmitool]=ipmitool
  [snmpd]=snmpd
  [snmpget]=snmp
  [fence_ipmilan]=fence-agents
  [fence_apc_snmp]=fence-agents
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "fencing/testdata/deps.sh: missing packages: ${missing[*]}; run as root or install them with apt-get" >&2
  exit 1
fi
echo "fencing/testdata/deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# snmpd's package enables a system daemon on :161; our tests start their own.
systemctl disable --now snmpd >/dev/null 2>&1 || true
if [ -x /etc/init.d/snmpd ]; then /etc/init.d/snmpd stop >/dev/null 2>&1 || true; fi
