#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, from Debian's packages, for the workflow's Slurm tests.
#
#   tests/slurm/cluster.sh run CMD...    start a cluster, run CMD with SLURM_CONF set, stop the cluster (CI)
#   tests/slurm/cluster.sh start DIR     start a cluster whose state lives in DIR (the pytest fixture)
#   tests/slurm/cluster.sh stop DIR      stop the daemons started in DIR, by their PIDs
#
# Needs root. Installs slurmctld, slurmd, slurm-client and munge with apt-get where missing, and the
# snakemake Slurm executor plugin into $PYTHON's environment where missing. No cgroups, no systemd:
# proctrack/linuxproc, task/none, cons_tres, no accounting daemon. Jobs are polled with squeue, so
# finished jobs must stay visible to slurmctld (MinJobAge=600) for the plugin to read their state.
# The node has four fake `gpu` GRES (a character device, so Slurm sets CUDA_VISIBLE_DEVICES), because
# the Slurm profile asks for `gpu=1` in the training rules and Slurm refuses GPU requests otherwise.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

log() { echo "[slurm-cluster] $*" >&2; }

install_missing() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! "$PYTHON" -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
        log "installing snakemake-executor-plugin-slurm"
        "$PYTHON" -m pip install --quiet snakemake-executor-plugin-slurm
    fi
}

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_conf() {  # $1: state dir
    local state="$1" cpus mem_mb munge_dir
    cpus="$(nproc)"
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"  # slurmd drains a node claiming more
    mkdir -p "$state"/{ctld,slurmd,log,dev}
    # munged runs as the munge user: its folder sits outside $state, whose parents may be root-only (pytest's tmp)
    munge_dir="$(mktemp -d /tmp/ctgen-munge.XXXXXX)"
    chmod 755 "$munge_dir" && chown munge:munge "$munge_dir"
    ln -sfn "$munge_dir" "$state/munge"
    # the fake GPU: any character device will do (here /dev/null's numbers); a plain file gives no CUDA_VISIBLE_DEVICES
    # (4 of them, so that independent training jobs need not queue for one)
    for i in 0 1 2 3; do mknod "$state/dev/gpu$i" c 1 3 2>/dev/null || ln -sf /dev/null "$state/dev/gpu$i"; done
    cat >"$state/slurm.conf" <<EOF
# written by tests/slurm/cluster.sh: one node on localhost, state under $state
ClusterName=ctgen-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_dir/munge.socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
SchedulerParameters=batch_sched_delay=0
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:4 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
    echo "NodeName=localhost Name=gpu File=$state/dev/gpu[0-3]" >"$state/gres.conf"
}

# A link left by a run of this script that was killed before its EXIT trap (a session or a CI job
# ended mid-run): it points at a slurm.conf we wrote, and that cluster's slurmctld no longer runs.
# Anything else at that path belongs to someone else and is never touched.
stale_link() {  # $1: the link
    local target pid
    [[ -L "$1" ]] || return 1
    target="$(readlink "$1")"
    [[ -f "$target" ]] || return 0
    head -n1 "$target" | grep -q '^# written by tests/slurm/cluster.sh' || return 1
    pid="$(cat "$(dirname "$target")/slurmctld.pid" 2>/dev/null || true)"
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmctld ]] && return 1
    return 0
}

start() {  # $1: state dir; returns once the node is idle
    local state
    state="$(mkdir -p "$1" && cd "$1" && pwd -P)"
    [[ $EUID -eq 0 ]] || { log "needs root"; return 2; }
    install_missing
    write_conf "$state"
    export SLURM_CONF="$state/slurm.conf"
    # The plugin's job step drops SLURM_CONF (all SLURM_* but the job's identity) before its inner srun,
    # so the clients inside jobs read Debian's default path: link it to this cluster's file.
    if [[ -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]] && [[ "$(readlink /etc/slurm/slurm.conf)" != "$state/slurm.conf" ]]; then
        if stale_link /etc/slurm/slurm.conf; then
            log "replacing /etc/slurm/slurm.conf -> $(readlink /etc/slurm/slurm.conf): a cluster of ours whose slurmctld is gone"
        else
            log "/etc/slurm/slurm.conf exists (another cluster?); jobs' srun would read it, not $SLURM_CONF"
            return 1
        fi
    fi
    mkdir -p /etc/slurm && ln -sfn "$state/slurm.conf" /etc/slurm/slurm.conf
    # The daemons, and so the jobs (which take slurmd's nice value), run at niceness 0 whatever ours is: `make
    # test` runs pytest at nice 5, so that the tiny demo's chain of short Slurm jobs, which waits on each one, is
    # not slowed by the other workers' long tests (CI 2026-12-06: on 2 cores beside them the chain took over 15 min,
    # 5 min 16 s alone). Where the kernel shares the CPU by session first (autogroup), a job, which runs in a
    # session of its own, has its own share either way. Lowering a niceness needs CAP_SYS_NICE (root in most
    # containers; Docker's default drops it): without it the daemons keep ours, and we say so below.
    local nice0=(nice -n "$((-$(nice)))")
    local munge_dir
    munge_dir="$(readlink "$state/munge")"  # the real path: the munge user cannot resolve the link inside $state
    "${nice0[@]}" runuser -u munge -- munged --foreground --force --socket="$munge_dir/munge.socket" \
        --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" \
        </dev/null >>"$state/log/munged.out" 2>&1 &  # no inherited pipes: a caller reading our output must see EOF
    echo $! >"$state/munged.pids"
    for _ in $(seq 50); do [[ -S "$munge_dir/munge.socket" ]] && break; sleep 0.1; done
    cat "$munge_dir/munged.pid" >>"$state/munged.pids" 2>/dev/null || true  # munged's own PID, beside runuser's
    "${nice0[@]}" slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$state/log/slurmctld.out" 2>&1 &
    echo $! >"$state/slurmctld.pids"
    "${nice0[@]}" slurmd -D -N localhost -f "$SLURM_CONF" </dev/null >>"$state/log/slurmd.out" 2>&1 &
    echo $! >"$state/slurmd.pids"
    local ni
    ni="$(ps -o ni= -p "$(cat "$state/slurmd.pids")" | tr -d ' ')"
    [[ "$ni" == 0 ]] || log "slurmd runs at niceness $ni, not 0 (no CAP_SYS_NICE?): jobs compete with the tests as equals"
    local deadline=$((SECONDS + 90))
    while ((SECONDS < deadline)); do
        if [[ "$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -n1)" == idle ]]; then
            log "node idle; SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    log "node never became idle:"; timeout 5 sinfo -N -l >&2 || true; tail -n 20 "$state"/log/*.log >&2 || true
    return 1
}

stop() {  # $1: state dir; kills only the PIDs this script started there
    local state="$1" name pid
    for name in slurmd slurmctld munged; do
        [[ -f "$state/$name.pids" ]] || continue
        for pid in $(cat "$state/$name.pids"); do
            kill "$pid" 2>/dev/null || continue
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        done
        rm -f "$state/$name.pids"
    done
    if [[ "$(readlink /etc/slurm/slurm.conf)" == "$state/slurm.conf" ]]; then rm -f /etc/slurm/slurm.conf; fi
    if [[ -L "$state/munge" ]]; then rm -rf "$(readlink "$state/munge")" "$state/munge"; fi
}

case "${1:-}" in
    start) start "$2" ;;
    stop) stop "$2" ;;
    run)
        shift
        STATE="$(mktemp -d /tmp/ctgen-slurm.XXXXXX)"
        rc=1
        # daemons stop however we leave; the state (Slurm's logs) stays only when something failed
        trap 'stop "$STATE"; if ((rc == 0)); then rm -rf "$STATE"; else log "logs kept in $STATE/log"; fi' EXIT
        trap 'exit 130' INT TERM
        start "$STATE"
        export SLURM_CONF="$STATE/slurm.conf" CTGEN_SLURM_STATE="$STATE" CTGEN_REQUIRE_SLURM=1
        rc=0
        "$@" || rc=$?
        exit "$rc"
        ;;
    *) sed -n '2,7p' "$0" >&2; exit 2 ;;
esac
