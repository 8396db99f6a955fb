#!/usr/bin/env bash
# .ci/slurm.sh — a real Slurm 22.05 (Debian's packages) on localhost for the Slurm launcher's tests:
# a controller and SLURM_NODES node daemons ("nodes" n1..nN on this one host).
# Adapted from the project's shared recipe (shared/tools/slurm-local.sh), whose pitfalls list applies.
# Differences: CRED_EXPIRE (default 5 s) shortens the delay before a requeued job may start again
# (Slurm holds a requeued job for cred_expire seconds, 120 by default: AuthInfo in slurm.conf(5)),
# SLURM_NODES defaults to 2, and `smoke` runs without a second torch venv.
#
#   bash .ci/slurm.sh install; bash .ci/slurm.sh up; export SLURM_CONF=/tmp/slurm/slurm.conf
#   ... tests (pytest -m slurm) ...; bash .ci/slurm.sh down
#
#   bash .ci/slurm.sh install   # apt-get the packages (idempotent)
#   bash .ci/slurm.sh up        # write config, start munged + slurmctld + slurmd, wait until node idle
#   bash .ci/slurm.sh smoke     # sinfo, srun -n2 hostname, sbatch python, sbatch torchrun x2 (gloo)
#   bash .ci/slurm.sh down      # stop only the daemons this script started (by pid file)
#   bash .ci/slurm.sh all       # install + up + smoke + down
#
# Env knobs: SLURM_DIR (/tmp/slurm), SLURM_AUTH (munge|none), CTLD_PORT (6817), SLURMD_PORT (6818),
#            FAKE_GPUS (0; N>0: gres gpu:N backed by symlinks to /dev/null, so --gpus-per-node=N is
#                       accepted and jobs get CUDA_VISIBLE_DEVICES=0..N-1),
#            VENV (the repository's .venv: the smoke test's torch), SKIP_TORCH (0),
#            SLURM_NODES (1: one slurmd named after `hostname -s`; N>1: N slurmd daemons n1..nN on this
#                         host, ports SLURMD_PORT.., so `sbatch -N N` multi-node scripts can be tested)
# After `up`, clients need:  export SLURM_CONF=$SLURM_DIR/slurm.conf   (or: source $SLURM_DIR/env.sh)
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/slurm}
SLURM_AUTH=${SLURM_AUTH:-munge}
CTLD_PORT=${CTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
FAKE_GPUS=${FAKE_GPUS:-0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
SKIP_TORCH=${SKIP_TORCH:-0}
SLURM_NODES=${SLURM_NODES:-2}
CRED_EXPIRE=${CRED_EXPIRE:-5}
export SLURM_CONF="$SLURM_DIR/slurm.conf"
NODE=$(hostname -s)

node_names() { if [ "$SLURM_NODES" = 1 ]; then echo "$NODE"; else echo "n[1-$SLURM_NODES]"; fi; }
log() { printf '[ci-slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

do_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    log "slurm already installed: $(slurmd -V)"; return
  fi
  # Keep postinst scripts from starting system munge/slurm services (matters on hosts with systemd).
  local tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; tmp_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed: $(slurmd -V)"
}

write_conf() {
  mkdir -p "$SLURM_DIR"/{state,log,run,jobs}
  local nodeline gres_line="" gres_types="" files nodelines="" extra="" i cpus mem
  # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  nodeline=$(slurmd -C | head -n1)
  if [ "$FAKE_GPUS" -gt 0 ]; then
    # gres/gpu drops File-less entries ("Removing file-less GPU") and wants a char device:
    # symlinks to /dev/null pass the check; jobs then get CUDA_VISIBLE_DEVICES=0..N-1.
    for i in $(seq 0 $((FAKE_GPUS - 1))); do ln -sfn /dev/null "$SLURM_DIR/fakegpu$i"; done
    gres_types="GresTypes=gpu"; gres_line="Gres=gpu:$FAKE_GPUS"
    if [ "$FAKE_GPUS" = 1 ]; then files="$SLURM_DIR/fakegpu0"; else files="$SLURM_DIR/fakegpu[0-$((FAKE_GPUS - 1))]"; fi
    echo "NodeName=$(node_names) Name=gpu File=$files" > "$SLURM_DIR/gres.conf"
  else
    rm -f "$SLURM_DIR/gres.conf"
  fi
  if [ "$SLURM_NODES" = 1 ]; then
    mkdir -p "$SLURM_DIR/spool/$NODE"
    nodelines="$nodeline NodeAddr=127.0.0.1 Port=$SLURMD_PORT $gres_line State=UNKNOWN"
  else
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$nodeline")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$nodeline")
    extra="SlurmdParameters=config_overrides"
    for i in $(seq 1 "$SLURM_NODES"); do
      mkdir -p "$SLURM_DIR/spool/n$i"
      nodelines+="NodeName=n$i NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i - 1)) CPUs=$cpus RealMemory=$((mem / SLURM_NODES)) $gres_line State=UNKNOWN"$'\n'
    done
  fi
  local auth_lines
  if [ "$SLURM_AUTH" = munge ]; then
    auth_lines="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SLURM_DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE"
  else
    auth_lines="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=$CRED_EXPIRE"
  fi
  cat > "$SLURM_CONF" <<EOF
ClusterName=localci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
$auth_lines
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/%n
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=3600
$extra
$gres_types
$nodelines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "export SLURM_CONF=$SLURM_CONF" > "$SLURM_DIR/env.sh"
}

start_munge() {
  local M="$SLURM_DIR/munge"
  mkdir -p "$M"; chmod 711 "$M"          # munged demands execute-for-all on the socket dir
  [ -s "$M/munge.key" ] || { dd if=/dev/urandom of="$M/munge.key" bs=1024 count=1 status=none; }
  chmod 400 "$M/munge.key"
  munged --key-file="$M/munge.key" --socket="$M/munge.socket" --pid-file="$M/munged.pid" \
         --log-file="$M/munged.log" --seed-file="$M/munged.seed"
  munge -S "$M/munge.socket" -n | unmunge -S "$M/munge.socket" >/dev/null
  log "munged pid $(cat "$M/munged.pid")"
}

do_up() {
  if [ -s "$SLURM_DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$SLURM_DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "already up"; return
  fi
  rm -rf "$SLURM_DIR/state"   # no stale jobs/ids from an earlier run
  write_conf
  [ "$SLURM_AUTH" = munge ] && start_munge
  slurmctld -f "$SLURM_CONF"
  local n i st=""
  if [ "$SLURM_NODES" = 1 ]; then slurmd -f "$SLURM_CONF"
  else for n in $(seq 1 "$SLURM_NODES"); do slurmd -f "$SLURM_CONF" -N "n$n"; done; fi
  for i in $(seq 1 60); do
    st=$(sinfo -h -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
    [ "$st" = "idle " ] && [ "$(sinfo -h -t idle -o %D)" = "$SLURM_NODES" ] && break
    sleep 0.5
  done
  [ "$st" = "idle " ] || { log "nodes not idle (state '$st')"; tail -n 30 "$SLURM_DIR"/log/*.log; return 1; }
  log "slurmctld pid $(cat "$SLURM_DIR/run/slurmctld.pid"), slurmd pids $(cat "$SLURM_DIR"/run/slurmd-*.pid | tr '\n' ' '); nodes $(node_names) idle"
}

# Poll without sacct: scontrol keeps finished jobs for MinJobAge seconds.
wait_job() {
  local jid=$1 st
  while :; do
    st=$(scontrol show job -o "$jid" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case "$st" in PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUED|RESIZING) sleep 0.5 ;; *) break ;; esac
  done
  echo "$st $(scontrol show job -o "$jid" | sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p')"
}

ensure_torch() {
  [ -x "$VENV/bin/torchrun" ] || { log "no torchrun in $VENV (set VENV or SKIP_TORCH=1)"; return 1; }
}

do_smoke() {
  local J="$SLURM_DIR/jobs" jid res
  sinfo
  srun -N1 -n2 hostname
  [ "$SLURM_NODES" -gt 1 ] && srun -N"$SLURM_NODES" --ntasks-per-node=1 bash -c 'echo "task $SLURM_PROCID on node $SLURMD_NODENAME"'
  cat > "$J/py.sbatch" <<'EOF'
#!/bin/bash
#SBATCH -J py1
#SBATCH -N 1
#SBATCH -n 1
#SBATCH -t 00:02:00
python3 -c "import os,socket; print('hello from', socket.gethostname(), 'job', os.environ['SLURM_JOB_ID'])"
EOF
  jid=$(sbatch --parsable -o "$J/%x-%j.out" "$J/py.sbatch")
  res=$(wait_job "$jid"); log "python job $jid: $res"; cat "$J/py1-$jid.out"
  [ "${res%% *}" = COMPLETED ]

  if [ "$FAKE_GPUS" -gt 0 ]; then
    jid=$(sbatch --parsable --gpus-per-node="$FAKE_GPUS" -o "$J/gpu-%j.out" \
          --wrap 'srun bash -c "echo step CUDA_VISIBLE_DEVICES=\$CUDA_VISIBLE_DEVICES"')
    res=$(wait_job "$jid"); log "fake-gpu job $jid: $res"; cat "$J/gpu-$jid.out"
    [ "${res%% *}" = COMPLETED ]
  fi

  [ "$SKIP_TORCH" = 1 ] && return
  ensure_torch
  cat > "$J/allreduce.py" <<'EOF'
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(r + 1)])
dist.all_reduce(t, op=dist.ReduceOp.SUM)
# one write() per line: with PYTHONUNBUFFERED=1 print() emits text and "\n" separately and ranks interleave
sys.stdout.write(f"rank {r}/{w} local_rank {os.environ['LOCAL_RANK']} job {os.environ.get('SLURM_JOB_ID')} sum={t.item()}\n")
sys.stdout.flush()
assert t.item() == w * (w + 1) / 2
dist.barrier()
dist.destroy_process_group()
EOF
  cat > "$J/torchrun.sbatch" <<EOF
#!/bin/bash
#SBATCH -J torchrun2
#SBATCH -N $SLURM_NODES
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH -t 00:05:00
set -euo pipefail
export OMP_NUM_THREADS=1
# NodeAddr of the first node: resolvable even when node names (n1, n2 on one host) are not.
FIRST=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=\$(scontrol show node -o "\$FIRST" | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
MASTER_PORT=\$((31000 + SLURM_JOB_ID % 1000))
srun --ntasks-per-node=1 $VENV/bin/torchrun --nnodes="\$SLURM_NNODES" --nproc_per_node=2 \\
  --rdzv_backend=c10d --rdzv_endpoint="\$MASTER_ADDR:\$MASTER_PORT" --rdzv_id="\$SLURM_JOB_ID" \\
  $J/allreduce.py
EOF
  jid=$(sbatch --parsable -o "$J/%x-%j.out" "$J/torchrun.sbatch")
  res=$(wait_job "$jid"); log "torchrun job $jid: $res"; grep -E 'sum=' "$J/torchrun2-$jid.out"
  [ "${res%% *}" = COMPLETED ]
  [ "$(grep -o 'sum=' "$J/torchrun2-$jid.out" | wc -l)" = $((2 * SLURM_NODES)) ]
}

stop_pidfile() {
  local f=$1 pid i
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { log "pid $pid ignored SIGTERM, sending SIGKILL"; kill -9 "$pid"; }
  fi
  rm -f "$f"
}

do_down() {
  # Cancel leftovers first so slurmd cleans up job processes itself.
  if [ -s "$SLURM_DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$SLURM_DIR/run/slurmctld.pid")" 2>/dev/null; then
    scancel --user="$(id -un)" 2>/dev/null || true; sleep 1
  fi
  local f
  for f in "$SLURM_DIR"/run/slurmd-*.pid; do stop_pidfile "$f"; done
  stop_pidfile "$SLURM_DIR/run/slurmctld.pid"   # its child slurmscriptd exits with it
  stop_pidfile "$SLURM_DIR/munge/munged.pid"
  log "down"
}

case "${1:-all}" in
  install) do_install ;;
  up)      do_up ;;
  smoke)   do_smoke ;;
  down)    do_down ;;
  all)     do_install; do_up; trap do_down EXIT; do_smoke; log "ALL OK" ;;
  *) echo "usage: $0 {install|up|smoke|down|all}" >&2; exit 2 ;;
esac
