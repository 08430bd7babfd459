#!/bin/bash
# A one-node Slurm cluster on this machine, for the tests: munged, slurmctld and slurmd as root,
# their state and logs under $1. Prints `ready` when a job can run; exits non-zero with the reason.
set -u
dir=${1:?usage: cluster.sh STATE_DIR}
mkdir -p "$dir"/{spool,state,log}
for tool in munged slurmctld slurmd sbatch sinfo; do
  command -v "$tool" >/dev/null || { echo "not installed: $tool (apt-get install slurmctld slurmd slurm-client munge)"; exit 1; }
done
# two test modules (run side by side under pytest-xdist) may start clusters at once: one at a time
# here, so that one munged serves both; each cluster then has its own ports, state and spool. The
# daemons must not inherit the lock's descriptor (9>&-), or it is held until they stop.
exec 9>"${TMPDIR:-/tmp}/lgg-seg-cluster.lock"
flock 9
if ! pgrep -x munged >/dev/null; then
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  chown -R munge:munge /etc/munge 2>/dev/null; mkdir -p /run/munge; chown munge:munge /run/munge 2>/dev/null
  munged --force >"$dir/log/munged.out" 2>&1 9>&- || { echo "munged did not start: $(tail -1 "$dir/log/munged.out")"; exit 1; }
fi
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=lggtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$((20000 + RANDOM % 10000))
SlurmdPort=$((30000 + RANDOM % 10000))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 9>&- || { echo "slurmctld did not start: $(tail -2 "$dir/log/slurmctld.log" "$dir/log/slurmctld.out" 2>/dev/null | tr '\n' ' ')"; exit 1; }
slurmd -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 9>&- || { echo "slurmd did not start: $(tail -2 "$dir/log/slurmd.log" "$dir/log/slurmd.out" 2>/dev/null | tr '\n' ' ')"; exit 1; }
exec 9>&-   # the next cluster may start while this one's node comes up
for _ in $(seq 60); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
  case "$state" in idle*|mix*|alloc*) echo ready; exit 0 ;; esac
  sleep 1
done
echo "the node did not come up (sinfo: '${state:-nothing}'; $(tail -1 "$dir/log/slurmd.log" 2>/dev/null))"
exit 1
