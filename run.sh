#!/bin/bash
# Train a model through `accelerate launch` on every GPU of the job's node(s).
#
#   sbatch run.sh unet --data-dir data/kaggle_3m            # one node, its GPUs
#   sbatch --nodes=2 --gres=gpu:4 run.sh fcn --epochs 30     # two nodes: srun + c10d rendezvous
#   bash run.sh unet --synthetic                             # no Slurm: the GPUs here, or the CPU
#   sbatch --array=0-14 run.sh unet,fcn,segnet --folds 5 --output-dir runs/cmp-cv5 ...  # task i: model
#                      # i // 5 on fold i % 5 (common/jobs.py); then tools.compare --table --folds 5
#   sbatch run.sh sweep unet --processes 1 2 4 --workers 0 1 8 -- --data-dir data/kaggle_3m
# Job arrays over models, folds or both, and several nodes: docs/slurm.md. Relative paths are where
# the command was typed (the submit folder under sbatch, unless --chdir).
# Any #SBATCH line below is a default that the sbatch command line overrides.
#SBATCH --job-name=lgg-seg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
# --requeue and --signal: 2 minutes before the time limit (and on pre-emption) the job gets SIGTERM;
# the run saves where it is and stops, and the job goes back in the queue, where it resumes.
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: the job's record names the one submitted
repository() {
  local here cmd=""
  here=$(dirname "$(readlink -f "$0")")
  if [ -f "$here/run.sh" ] || [ -z "${SLURM_JOB_ID:-}" ]; then echo "$here"; return; fi
  cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
  [ -z "$cmd" ] || cmd=$(cd "${SLURM_SUBMIT_DIR:-.}" && readlink -f "$cmd") || cmd=""
  if [ -f "$cmd" ]; then dirname "$cmd"; else echo "${SLURM_SUBMIT_DIR:-$PWD}"; fi
}

repo=$(repository)
# a batch job does not inherit an activated environment's PATH when submitted without it: the
# checkout's own .venv (the README's set-up) if there is one
if ! command -v accelerate >/dev/null 2>&1; then
  if [ -f "$repo/.venv/bin/activate" ]; then
    . "$repo/.venv/bin/activate"
  else
    echo "error: accelerate not found: activate the environment before sbatch, or set it up in $repo/.venv (README: Set up)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
spec=${1:-}
[ $# -gt 0 ] && shift
if [ "$spec" = sweep ]; then exec python -m tools.sweep "$@"; fi  # it launches each run itself
# which run this is (a job array's task: its model, fold and folder; under Slurm a folder named after
# the job, which a requeued job resumes): common/jobs.py owns that layout, bash parses no flag
plan=$(python -m common.jobs "$spec" "$@") || exit $?
eval "$plan"  # model, run_dir, what and args, quoted by Python's shlex
set -- "${args[@]}"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
nodes=${SLURM_NNODES:-1}
if [ "$gpus" -gt 0 ]; then
  procs=$gpus
  device_flags=(--mixed_precision no)
  [ $((nodes * gpus)) -gt 1 ] && device_flags+=(--multi_gpu)
else
  procs=1  # CPU: one process using every core (several CPU processes just split the same cores)
  device_flags=(--cpu --mixed_precision no)
fi
echo "run.sh: $what on $nodes node(s) x $procs process(es) ($gpus GPU(s) per node)"

# The launchers end a failed run with their own report (accelerate's traceback, torchrun's summary):
# the script writes its one `error:` line to this file instead, and it is printed after that report.
LGG_ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/run.sh-error.XXXXXX")
export LGG_ERROR_FILE
trap 'rm -f "$LGG_ERROR_FILE"' EXIT

if [ "$nodes" -gt 1 ]; then
  # one launcher per node, all meeting at the job's first node (c10d, at its NodeAddr). Not with
  # --same_network: c10d ignores the master_addr it sets, and each node meets itself at localhost:29400
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  head_addr=$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
  port=${MASTER_PORT:-29500}
  export repo model procs nodes port head_addr=${head_addr:-$head}
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec accelerate launch --multi_gpu --mixed_precision no --dynamo_backend no --num_machines "$nodes" \
      --num_processes $((nodes * procs)) --machine_rank "$SLURM_NODEID" \
      --main_process_ip "$head_addr" --main_process_port "$port" --rdzv_backend c10d \
      "$repo/$model/train.py" "$@"' bash "$@" &
else
  # a free port unless MASTER_PORT says: two jobs sharing a node do not collide
  accelerate launch "${device_flags[@]}" --num_machines 1 --num_processes "$procs" \
    --main_process_port "${MASTER_PORT:-0}" --dynamo_backend no "$repo/$model/train.py" "$@" &
fi
child=$!
# SIGTERM to this script (Slurm's warning, or a plain kill): pass it to the training processes, which
# save and stop. On one node they are the launcher's children (`accelerate launch` passes no signal
# to a single process); across nodes srun passes it to every node's launcher.
forward() {
  echo "run.sh: SIGTERM, the run saves and stops"
  if [ "$nodes" -gt 1 ]; then kill -TERM "$child" 2>/dev/null || true; else pkill -TERM -P "$child" || true; fi
}
trap forward TERM
status=0
wait "$child" || status=$?
if [ "$status" -gt 128 ]; then status=0; wait "$child" || status=$?; fi  # wait was cut short by the trap
if [ "$status" -ne 0 ] && [ -s "$LGG_ERROR_FILE" ]; then
  read -r status line < "$LGG_ERROR_FILE"  # the script's exit code and line, not the launcher's
  echo "$line" >&2
  exit "$status"
fi
if [ "$status" -eq 0 ] && [ -n "$run_dir" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ ! -f "$run_dir/summary.json" ]
then
  echo "run.sh: stopped before the end: requeueing job $SLURM_JOB_ID to resume from $run_dir"
  scontrol requeue "$SLURM_JOB_ID"
elif [ "$status" -eq 0 ]; then
  # the last fold of an array over one model's folds to finish prints their table
  after=$(python -m common.jobs --after "$model" "$@") || after=""
  if [ -n "$after" ]; then eval "python $after" || true; fi
fi
exit "$status"
