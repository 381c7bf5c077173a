#!/usr/bin/env bash
# Start a one-node SLURM controller + compute daemon on localhost (Debian's slurm-wlm, no systemd).
# Used by CI and by anyone who wants to run the SLURM integration test locally:  bash .ci/slurm/start.sh
set -euo pipefail
if ! command -v slurmctld >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm >/dev/null
fi
state=${RADIO_SLURM_STATE:-/var/tmp/radio-slurm}
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p "$state"/{state,spool} /etc/slurm
sed -e "s/@HOST@/$host/g" -e "s#@STATE@#$state#g" -e "s/@CPUS@/$cpus/g" -e "s/@MEM@/$mem/g" \
  "$(dirname "$0")/slurm.conf.in" > /etc/slurm/slurm.conf
# restart cleanly if daemons from an earlier run are around
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
slurmctld -i 2>>"$state/slurmctld.err" &
slurmd 2>>"$state/slurmd.err" &
for _ in $(seq 1 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm up on $host: $(sinfo -h -o '%P %D %T %c')"
    exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm did not come up; logs in $state" >&2
cat "$state"/*.log 2>/dev/null | tail -20 >&2
exit 1
