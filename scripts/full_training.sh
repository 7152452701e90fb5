#!/bin/bash
# SAFE Stage A full-scale sweep on SLURM: trains the retention variants one after another with
# `srun torchrun` (one torchrun per node, one training process per GPU), checkpoints and requeues
# itself shortly before the time limit, and the requeued job resumes where it stopped.
#
#   MODEL_CONFIG=llava-1.5-7b DATA_ROOT=/data/safe sbatch scripts/full_training.sh   # from the repository root
#   sbatch scripts/full_training.sh                                  # the default model, full = llava-1.5-13b
#   VARIANT_ORDER=soft_retention sbatch --nodes=1 --gpus-per-node=8 scripts/full_training.sh
#
# Before submitting: fetch the model where there is network access (`safe models download --preset llava-1.5-7b`,
# then HF_HUB_OFFLINE=1 for the jobs), and preflight it on the login node (no GPU needed):
#   python experiments/full_training/run_full_training.py --model-config llava-1.5-7b --data-root DIR --dry-run
#
# What to edit (here, or override on the sbatch command line):
#   --nodes, --gpus-per-node   the size of the job (GPUS_PER_NODE is read from the allocation)
#   --cpus-per-task            CPU cores per node, for the data-loading workers (NUM_WORKERS)
#   --time                     wall-clock limit of one attempt; at 300 s before it the job saves a
#                              checkpoint and requeues itself (--signal), so 24 h is a fine default
#   add lines such as `#SBATCH --partition=...`, `#SBATCH --account=...`, `#SBATCH --mem=...`,
#   `#SBATCH --mail-user=... --mail-type=END,FAIL` if your cluster wants them.
#
# Settings are environment variables (export them before sbatch, which passes the environment on);
# an empty one means the trainer's default (`safe train --help`):
#   DATA_ROOT        data folder (default experiments/full_training/data)
#   OUTPUT_ROOT      runs go to $OUTPUT_ROOT/<job id>/<YYYYmmdd_HHMMSS>_<variant>/
#                    (default experiments/full_training/runs)
#   VARIANT_ORDER    variants, in order (default "no_retention soft_retention")
#   MODEL_CONFIG     llava-1.5-7b, llava-1.5-13b, full (= 13b), tiny, demo (= tiny) (default full)
#   NUM_EPOCHS MAX_STEPS TRAIN_BS VAL_BS NUM_WORKERS SEED LR_PROJECTOR LR_ADAPTER
#   GRADIENT_ACCUMULATION_STEPS  (TRAIN_BS is per GPU: global batch = TRAIN_BS x GPUs x accumulation)
#   USE_WAVCAPS=1 WAVCAPS_RATIO=0.5   add (a seeded fraction of) WavCaps
#   EXTRA_ARGS       more trainer flags, e.g. "--eval-every 500 --save-every 250"
#   PYTHON           interpreter of the environment with `safe` installed (default python);
#                    activate that environment before sbatch so `torchrun` is on PATH too
#   GPUS_PER_NODE    processes per node (default: the GPUs SLURM allocated per node, else 1)
#   SWEEP_ID         sweep folder name (default the job id); set it to an earlier job id to
#                    finish that sweep from a fresh submission
#   STOP_GRACE       seconds to wait for the checkpoint after the signal (default 240, < 300)
#   MASTER_PORT      rendezvous port (default derived from the job id)
#
#SBATCH --job-name=safe_full_training
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x_%j.out

set -euo pipefail

ENTRY=experiments/full_training/run_full_training.py

log() { echo "[full_training $(date '+%F %T')] $*"; }
die() { log "error: $*" >&2; exit 2; }

# --- where we are: sbatch runs a copy of this script from a spool folder, so the repository is
# --- REPO_DIR, else this script's parent folder, else the folder sbatch was called from.
find_repo() {
    local here candidate
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd) || here=""
    if [[ -n "${REPO_DIR:-}" ]]; then
        [[ -f "$REPO_DIR/$ENTRY" ]] || die "REPO_DIR=$REPO_DIR does not hold $ENTRY."
        echo "$REPO_DIR"
        return
    fi
    for candidate in "$here" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
        if [[ -n "$candidate" && -f "$candidate/$ENTRY" ]]; then
            echo "$candidate"
            return
        fi
    done
    die "cannot find $ENTRY; submit from the repository root or set REPO_DIR."
}

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit with 'sbatch scripts/full_training.sh' (one variant on this machine: python $ENTRY --variant soft_retention)."
REPO=$(find_repo)
cd "$REPO"

PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not a command; activate the environment where safe is installed, or set PYTHON."
OUTPUT_ROOT=${OUTPUT_ROOT:-experiments/full_training/runs}
VARIANT_ORDER=${VARIANT_ORDER:-"no_retention soft_retention"}
MODEL_CONFIG=${MODEL_CONFIG:-full}
SWEEP_ID=${SWEEP_ID:-$SLURM_JOB_ID}
RUN_ROOT="$OUTPUT_ROOT/$SWEEP_ID"
STOP_GRACE=${STOP_GRACE:-240}
[[ "$STOP_GRACE" =~ ^[0-9]+$ ]] || die "STOP_GRACE must be a number of seconds, not '$STOP_GRACE'."
read -r -a VARIANTS <<< "$VARIANT_ORDER"
(( ${#VARIANTS[@]} > 0 )) || die "VARIANT_ORDER is empty; name at least one variant."

# --- the allocation: nodes, processes per node, rendezvous host and port.
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "a100:4" -> "4"
    GPUS_PER_NODE=${GPUS_PER_NODE%%(*}  # "4(x2)" -> "4"
fi
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive number, not '$GPUS_PER_NODE'."
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
else
    MASTER_ADDR=$(hostname)
fi
if [[ -z "${MASTER_PORT:-}" ]]; then
    # one port per job, so jobs sharing a node do not collide
    if [[ "$SLURM_JOB_ID" =~ ^[0-9]+$ ]]; then
        MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    else
        MASTER_PORT=29500
    fi
fi
export MASTER_ADDR MASTER_PORT

# torchrun >= 2.9 forwards SIGUSR1 to its workers and waits STOP_GRACE s for them (older torchrun
# ignores these variables; the guard below keeps it alive while its workers checkpoint).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$STOP_GRACE}

# --- trainer flags: only the settings that were given, so the rest keep the trainer's defaults.
TRAIN_ARGS=(--output-root "$RUN_ROOT" --model-config "$MODEL_CONFIG")
add_flag() {
    if [[ -n "$2" ]]; then
        TRAIN_ARGS+=("$1" "$2")
    fi
}
add_flag --data-root "${DATA_ROOT:-}"
add_flag --num-epochs "${NUM_EPOCHS:-}"
add_flag --max-steps "${MAX_STEPS:-}"
add_flag --train-batch-size "${TRAIN_BS:-}"
add_flag --val-batch-size "${VAL_BS:-}"
add_flag --num-workers "${NUM_WORKERS:-}"
add_flag --seed "${SEED:-}"
add_flag --lr-projector "${LR_PROJECTOR:-}"
add_flag --lr-adapter "${LR_ADAPTER:-}"
add_flag --gradient-accumulation-steps "${GRADIENT_ACCUMULATION_STEPS:-}"
case "${USE_WAVCAPS:-0}" in
    1 | true | yes) TRAIN_ARGS+=(--use-wavcaps) ;;
    0 | false | no | "") ;;
    *) die "USE_WAVCAPS must be 0 or 1, not '$USE_WAVCAPS'." ;;
esac
add_flag --wavcaps-ratio "${WAVCAPS_RATIO:-}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# A variant is done when one of its run folders in this sweep says "completed" (run_state.json,
# written by the trainer); that is what lets a requeued job skip finished variants.
variant_completed() {
    "$PYTHON" - "$RUN_ROOT" "$1" <<'PY'
import json, sys
from pathlib import Path

def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

root, variant = Path(sys.argv[1]), sys.argv[2]
for run in sorted(root.glob("*")):
    train = load(run / "config.json").get("config", {}).get("train", {})
    if train.get("variant") == variant and load(run / "run_state.json").get("state") == "completed":
        sys.exit(0)
sys.exit(1)
PY
}

# --- pre-timeout signal: SLURM sends USR1 to this shell (--signal=B:USR1@300). Pass it on to the
# --- trainer, which saves a checkpoint at the next step boundary and exits; then requeue.
CHILD=""
on_usr1() {
    trap '' USR1
    log "USR1: asking the trainer to checkpoint, then requeueing job $SLURM_JOB_ID"
    if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then
        # srun runs in its own process group (setsid): signal the group; srun forwards USR1 to
        # the tasks on every node.
        kill -USR1 -- "-$CHILD" 2>/dev/null || kill -USR1 "$CHILD" 2>/dev/null || true
        local waited=0
        while kill -0 "$CHILD" 2>/dev/null && (( waited < STOP_GRACE )); do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$CHILD" 2>/dev/null; then
            log "the trainer is still running after ${STOP_GRACE}s; requeueing anyway (it resumes from its last checkpoint)"
        else
            wait "$CHILD" 2>/dev/null || true
            log "the trainer stopped after ${waited}s"
        fi
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        log "requeued job $SLURM_JOB_ID; it will resume the unfinished variant in $RUN_ROOT"
        exit 0
    fi
    log "error: 'scontrol requeue $SLURM_JOB_ID' failed; resubmit with SWEEP_ID=$SWEEP_ID to resume" >&2
    exit 1
}
trap on_usr1 USR1

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"
case "$RUN_ROOT" in
    /*) RUNS_SHOWN=$RUN_ROOT ;;
    *) RUNS_SHOWN=$REPO/$RUN_ROOT ;;
esac
log "variants: ${VARIANTS[*]}; runs in $RUNS_SHOWN"

for variant in "${VARIANTS[@]}"; do
    if variant_completed "$variant"; then
        log "$variant: already completed in $RUN_ROOT, skipping"
        continue
    fi
    SRUN_ARGS=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # not inherited by srun on some Slurm versions
    fi
    # The bash guard makes the torchrun agent ignore USR1 (older torchrun would die of it and take
    # its workers down mid-checkpoint); the trainer installs its own USR1 handler.
    CMD=(srun "${SRUN_ARGS[@]}"
         bash -c 'trap "" USR1; exec "$@"' usr1-guard
         torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
         --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
         "$ENTRY" --variant "$variant" "${TRAIN_ARGS[@]}" --resume auto ${EXTRA[@]+"${EXTRA[@]}"})
    log "$variant: $(printf '%q ' "${CMD[@]}")"
    # in the background and in its own process group, so this shell can run the USR1 trap
    setsid "${CMD[@]}" &
    CHILD=$!
    status=0
    wait "$CHILD" || status=$?
    CHILD=""
    if (( status != 0 )); then
        log "$variant failed with exit code $status; stopping the sweep" >&2
        exit "$status"
    fi
    if ! variant_completed "$variant"; then
        log "$variant stopped before completing (see run_state.json in $RUN_ROOT); requeue or resubmit with SWEEP_ID=$SWEEP_ID to resume" >&2
        exit 1
    fi
    log "$variant: completed"
done
log "sweep done: $RUN_ROOT"
