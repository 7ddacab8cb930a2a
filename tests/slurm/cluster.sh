#!/usr/bin/env bash
# A real single-node SLURM for the tests: Debian's slurmctld + slurmd + munge on this machine.
#   tests/slurm/cluster.sh install   apt-get the packages when missing (what `make test` runs)
#   tests/slurm/cluster.sh start     write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   tests/slurm/cluster.sh stop      stop the daemons
# The node advertises one GPU (gres.conf points it at /dev/null), so jobs asking for gpu=1 are scheduled one at
# a time, as on a one-GPU workstation. No slurmdbd: job status comes from squeue (MinJobAge keeps finished jobs
# visible for an hour) and every finished job is logged by jobcomp/filetxt, SLURM's own record of what ran.
set -euo pipefail
STATE=${BATCHSCOPE_SLURM_STATE:-/var/lib/batchscope-slurm}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
NODE=$(hostname -s)
MARK="# written by batchscope tests/slurm/cluster.sh"

install() {
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge
    fi
}

start() {
    install
    if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARK" /etc/slurm/slurm.conf; then
        echo "/etc/slurm/slurm.conf exists and was not written by this script: not touching a real SLURM" >&2
        exit 1
    fi
    stop >/dev/null 2>&1 || true
    $SUDO mkdir -p /etc/slurm "$STATE"/{ctld,d,log} /run/munge /var/log/munge /var/lib/munge
    # munged refuses a key it does not own exclusively; its socket directory must be world-executable
    if [ ! -s /etc/munge/munge.key ]; then
        $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    $SUDO chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    $SUDO chmod 400 /etc/munge/munge.key
    $SUDO chmod 755 /run/munge
    $SUDO chown -R slurm:slurm "$STATE"
    # the plugin's job steps clear every SLURM_* variable (SLURM_CONF too): the config must be at the default path
    $SUDO tee /etc/slurm/slurm.conf >/dev/null <<CONF
$MARK
ClusterName=batchscope
SlurmctldHost=$NODE
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
GresTypes=gpu
MpiDefault=none
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    printf '%s\nNodeName=%s Name=gpu File=/dev/null\n' "$MARK" "$NODE" | $SUDO tee /etc/slurm/gres.conf >/dev/null
    $SUDO touch "$STATE/log/jobcomp.log" && $SUDO chown slurm:slurm "$STATE/log/jobcomp.log"
    $SUDO -u munge /usr/sbin/munged --force 2>/dev/null || $SUDO /usr/sbin/munged --force
    $SUDO /usr/sbin/slurmctld -i
    $SUDO /usr/sbin/slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix)'; then
            echo "slurm up: $(sinfo -h -o '%P %D %t %G')"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm did not come up; last lines of the logs:" >&2
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
}

stop() {
    $SUDO pkill -x slurmd || true
    $SUDO pkill -x slurmctld || true
    $SUDO pkill -x munged || true
    sleep 0.5
    # remove our config: with it and no controller, every `scontrol` (which the SLURM executor plugin runs when
    # any snakemake starts) waits 9 s for a controller; without it, it fails at once
    for file in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
        if [ -e "$file" ] && grep -qF "$MARK" "$file"; then $SUDO rm -f "$file"; fi
    done
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
