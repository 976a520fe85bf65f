#!/bin/bash
# Multi-node rm_scale training under Slurm: one `accelerate launch` per node, DeepSpeed ZeRO-3 across all of them.
#
#   sbatch slurm/train.sh                                   # recipes/demo.yaml on 2 nodes
#   RECIPE=recipes/my.yaml sbatch --nodes=4 slurm/train.sh  # any recipe, any node count
#   sbatch slurm/train.sh --max_steps 100 --lora.r 16       # trailing arguments = recipe overrides
#
# Submit from the repository root (relative paths below are resolved against it). See slurm/README.md.
#
# ---- Slurm defaults: edit once for your cluster (command-line sbatch options override these lines) ----------------
#SBATCH --job-name=rm_scale
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#   One task per node: each task runs the per-node launcher, which starts one worker per GPU.
#SBATCH --cpus-per-task=16
##SBATCH --gpus-per-node=8
#   GPU clusters: uncomment (or `sbatch --gpus-per-node=N`); GPUS_PER_NODE below follows what Slurm grants.
##SBATCH --partition=gpu
##SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#   Slurm may requeue the job (node failure); this script requeues it after a preemption, rank 0 after USR1 (see below).
#SBATCH --signal=B:USR1@120
#   USR1 to this batch shell ~120 s (Slurm: up to 60 s more) before the time limit: forwarded to the ranks, which
#   finish their step, save a checkpoint, requeue the job and exit. Raise 120 when a step + a save take longer.
#SBATCH --open-mode=append
#   A requeued run appends to the same log instead of truncating it.
#SBATCH --output=%x-%j.out

set -eo pipefail

# ---- Settings: every one can be overridden from the environment (`VAR=... sbatch slurm/train.sh`) -----------------
RECIPE=${RECIPE:-recipes/demo.yaml}                     # rm_scale recipe (model, data, train sections)
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/multinode_zero3.yaml}  # accelerate config: distributed_type DEEPSPEED
DS_CONFIG=${DS_CONFIG:-}                                # optional DeepSpeed JSON replacing the accelerate config's
VENV=${VENV:-.venv}                                     # virtualenv to use when PYTHON is not given
PYTHON=${PYTHON:-}                                      # python with rm_scale installed (default: $VENV/bin/python)
GPUS_PER_NODE=${GPUS_PER_NODE:-}                        # workers per node (default: GPUs Slurm granted, else 1)
MASTER_PORT=${MASTER_PORT:-}                            # rendezvous port on the head node (default: from job id)
MASTER_ADDR=${MASTER_ADDR:-}                            # head node address (default: resolved from the node list)
EXTRA_ARGS=${EXTRA_ARGS:-}                              # recipe overrides, e.g. "--max_steps 100 --lora.r 16"
RESUME=${RESUME:-auto}                                  # auto: resume from output_dir's latest complete checkpoint
                                                        #   (else start fresh); never: leave it to the recipe
REQUEUE_ON_USR1=${REQUEUE_ON_USR1:-1}                   # 1: after the USR1 checkpoint, requeue this job
REQUEUE_ON_PREEMPT=${REQUEUE_ON_PREEMPT:-1}             # 1: after a preemption (SIGTERM + GraceTime), requeue this job
MAX_RESTARTS=${MAX_RESTARTS:-20}                        # stop requeueing after this many restarts

die() { echo "rm_scale slurm: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch slurm/train.sh'"
# Slurm runs a copy of this script from its spool folder: relative paths must be anchored to the submit directory.
cd "${SLURM_SUBMIT_DIR:?}"

# ---- Python -------------------------------------------------------------------------------------------------------
if [ -z "$PYTHON" ]; then
    if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; else PYTHON=$(command -v python3 || true); fi
fi
[ -n "$PYTHON" ] && [ -x "$PYTHON" ] || die "no python: set PYTHON=/path/to/python or VENV=/path/to/venv"
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")   # absolute: the same path on every node

# ---- Inputs: fail here with a clear message, not minutes later on every node -------------------------------------
[ -f "$RECIPE" ] || die "RECIPE=$RECIPE not found (cwd $PWD); set RECIPE=path/to/recipe.yaml"
[ -f "$ACCEL_CONFIG" ] || die "ACCEL_CONFIG=$ACCEL_CONFIG not found (cwd $PWD)"
[ -z "$DS_CONFIG" ] || [ -f "$DS_CONFIG" ] || die "DS_CONFIG=$DS_CONFIG not found (cwd $PWD)"

# ---- Workers per node ---------------------------------------------------------------------------------------------
# What Slurm granted on this (the first) node; every node gets the same with --gpus-per-node. CPU nodes: one worker
# (rm_scale then uses gloo by itself; the accelerate config keeps use_cpu: false, which would switch DeepSpeed off).
count_gpus() {
    local cvd=${CUDA_VISIBLE_DEVICES-unset}
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [ "$cvd" != unset ] && [ "$cvd" != NoDevFiles ]; then
        if [ -z "$cvd" ]; then echo 0; else echo "$cvd" | tr ',' '\n' | grep -c .; fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
if [ -z "$GPUS_PER_NODE" ]; then
    GPUS_PER_NODE=$(count_gpus)
    [ "${GPUS_PER_NODE:-0}" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
else
    [ "$GPUS_PER_NODE" -ge 1 ] 2>/dev/null || die "GPUS_PER_NODE=$GPUS_PER_NODE: give a whole number >= 1"
    GRANTED=$(count_gpus)
    if [ "${GRANTED:-0}" -ge 1 ] && [ "$GPUS_PER_NODE" -gt "$GRANTED" ]; then
        die "GPUS_PER_NODE=$GPUS_PER_NODE but this job has $GRANTED GPU(s) per node: ask for more" \
            "(sbatch --gpus-per-node=$GPUS_PER_NODE) or lower GPUS_PER_NODE"
    fi
fi
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?}}
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

# Threads per worker: the node task's CPUs split over its workers (unset, torchrun forces 1 with >1 worker per node).
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$((CPUS_PER_NODE / GPUS_PER_NODE))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# ---- Rendezvous -----------------------------------------------------------------------------------------------------
# Head = first node of the allocation (this batch shell runs there). Resolve it to an IPv4 address once, here, so
# every node dials the same thing. Debian-style /etc/hosts maps a machine's own name to 127.0.1.1, unreachable from
# the other nodes: then take the head's first interface address instead. (A loopback address is fine when the "nodes"
# really are on one host, as in tests/slurm_cluster.py where n1 -> 127.0.0.2.)
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if [ -z "$MASTER_ADDR" ]; then
    MASTER_ADDR=$(getent ahostsv4 "$HEAD_NODE" | awk 'NR == 1 { print $1 }')
    if [ "$NNODES" -gt 1 ] && [[ "$MASTER_ADDR" == 127.* ]] && [ "$HEAD_NODE" = "$(hostname -s)" ]; then
        MASTER_ADDR=$(hostname -I | awk '{ print $1 }')
    fi
    [ -n "$MASTER_ADDR" ] || MASTER_ADDR=$HEAD_NODE
fi
# A port per job (29500..30499, below Linux's ephemeral range) so two jobs sharing a head node do not collide.
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

# ---- Resume ---------------------------------------------------------------------------------------------------------
# RESUME=auto passes `--resume_from_checkpoint auto`: rm_scale resumes from the latest COMPLETE checkpoint of the
# recipe's output_dir (one whose every rank finished writing it: rm_scale_complete.json), or starts fresh when there is
# none. So a requeued or resubmitted job continues the run. Checkpoints come from the recipe's save_steps and from the
# signal-triggered save (USR1/SIGTERM). Trailing overrides come after it and win.
OVERRIDES=()
read -r -a OVERRIDES <<<"$EXTRA_ARGS"
OVERRIDES+=("$@")
RESUME_ARGS=()
[ "$RESUME" != auto ] || RESUME_ARGS=(--resume_from_checkpoint auto)
# The ranks requeue the job after a USR1 checkpoint (rank 0 runs `scontrol requeue`) unless told not to.
if [ "$REQUEUE_ON_USR1" != 1 ] || [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
    RESUME_ARGS+=(--requeue_on_signal false)
fi

# ---- Command --------------------------------------------------------------------------------------------------------
# One launcher per node. --deepspeed_multinode_launcher standard: accelerate runs torchrun (torch.distributed.run) on
#   this node only; its default (pdsh) would ssh into the others from a hostfile -- Slurm already starts one launcher
#   per node. Given here too so that a single-node DeepSpeed config (launch/zero3.yaml) works as ACCEL_CONFIG.
# --rdzv_backend static + --same_network: node rank = --machine_rank (c10d would order nodes by arrival and ignore it),
#   and only machine rank 0 binds the store on MASTER_ADDR:MASTER_PORT. Given explicitly because accelerate 1.x takes
#   these two from the command line only: its CLI defaults (static, False) shadow the YAML's rdzv_backend/same_network.
# --machine_rank is NOT here: it is added per task below from $SLURM_NODEID.
LAUNCH=(--config_file "$ACCEL_CONFIG"
        --num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
        --rdzv_backend static --same_network --deepspeed_multinode_launcher standard)
[ -z "$DS_CONFIG" ] || LAUNCH+=(--deepspeed_config_file "$DS_CONFIG")
TRAIN=(-m rm_scale train --config "$RECIPE" "${RESUME_ARGS[@]}" "${OVERRIDES[@]}")

echo "rm_scale slurm: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NODELIST ($NNODES)" \
     "head $HEAD_NODE=$MASTER_ADDR:$MASTER_PORT workers/node $GPUS_PER_NODE world $NUM_PROCESSES" \
     "OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "rm_scale slurm: per node (machine rank = that node's \$SLURM_NODEID):" \
     "$(printf '%q ' "$PYTHON" -m accelerate.commands.launch --machine_rank)\$SLURM_NODEID" \
     "$(printf '%q ' "${LAUNCH[@]}" "${TRAIN[@]}")"

# ---- Time limit / preemption ------------------------------------------------------------------------------------------
# USR1 (--signal=B:USR1@120, or `scancel --batch --signal=USR1`) reaches this shell only: forward it to srun, which
# signals every process of the step on every node. The ranks finish the current optimizer step, agree (one all-reduce
# per step), save a complete checkpoint, rank 0 requeues the job (scontrol requeue), and they exit 75. The restart
# resumes (RESUME=auto).
# Preemption (a partition with GraceTime): Slurm sends SIGTERM to every process of the job's steps -- not to this shell
# nor to srun -- and SIGKILL GraceTime seconds later. The ranks save the same checkpoint and exit; the job would then
# end FAILED (Slurm requeues a preempted job only when it is still running at the end of GraceTime), so this shell
# requeues it when `scontrol show job` says it was preempted (PreemptTime set); a plain scancel is not requeued.
# The per-node launchers (torchrun's agent) ignore USR1 and SIGTERM (trap '' below; PET_SIGNALS_TO_HANDLE leaves SIGTERM
# out of torchrun's handlers): the agent would die of USR1, and on SIGTERM it would SIGKILL the ranks 30 s later, in
# the middle of a checkpoint of a large model. rm_scale restores SIGTERM's default action in the ranks at start.
# srun runs in the background so that the traps run at once (bash defers traps while a foreground child runs).
# shellcheck disable=SC2329  # invoked by the traps
on_usr1() {
    echo "rm_scale slurm: USR1 at $(date '+%F %T'): time limit or preemption is near; forwarding to the ranks"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
# shellcheck disable=SC2329
on_term() {
    echo "rm_scale slurm: TERM at $(date '+%F %T'): the ranks checkpoint and stop"
}
# The time Slurm preempted this job, or nothing.
preempted_at() {
    scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^PreemptTime=//p' | grep -v '^None$' || true
}
trap on_usr1 USR1
trap on_term TERM

# ---- Launch: one task per node ----------------------------------------------------------------------------------------
# The task body is single-quoted: $SLURM_NODEID and $SLURMD_NODENAME are expanded by each task on its own node.
# Expanded here, in the batch shell, they would be 0 / the head on every node (accelerate#2816 -> rendezvous hang).
# --kill-on-bad-exit: one node failing ends the others instead of leaving them blocked in a collective.
# --cpus-per-task is repeated because srun in Slurm 22.05-23.02 does not inherit it from sbatch (the step would get
#   1 CPU per task, and be pinned to it where task affinity is on).
export RM_SCALE_PYTHON=$PYTHON
SRUN=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# shellcheck disable=SC2016  # single quotes on purpose: expanded by each task
"${SRUN[@]}" bash -c '
    echo "rm_scale node $SLURMD_NODENAME machine_rank $SLURM_NODEID pid $$"
    trap "" USR1 TERM  # the launcher (torchrun agent) ignores both; the ranks install their own handlers
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # torchrun: no SIGTERM handler (it would SIGKILL the ranks)
    exec "$RM_SCALE_PYTHON" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"
' rm_scale_node "${LAUNCH[@]}" "${TRAIN[@]}" &
SRUN_PID=$!
# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for srun itself.
while true; do
    set +e
    wait "$SRUN_PID"
    rc=$?
    set -e
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
echo "rm_scale slurm: srun exited $rc"
PREEMPTED_AT=$(preempted_at)
if [ -n "$PREEMPTED_AT" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
        echo "rm_scale slurm: preempted at $PREEMPTED_AT; not requeueing: $MAX_RESTARTS restarts reached (MAX_RESTARTS)"
    elif [ "$REQUEUE_ON_PREEMPT" = 1 ]; then
        echo "rm_scale slurm: preempted at $PREEMPTED_AT; requeueing job $SLURM_JOB_ID" \
             "(restart $((${SLURM_RESTART_COUNT:-0} + 1))): it resumes from the latest complete checkpoint"
        scontrol requeue "$SLURM_JOB_ID" || echo "rm_scale slurm: scontrol requeue $SLURM_JOB_ID failed" >&2
    fi
fi
exit "$rc"
