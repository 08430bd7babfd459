#!/bin/bash
# Train a model through `accelerate launch` on every GPU of the job's node(s).
#
#   sbatch run.sh unet --data-dir data/kaggle_3m            # one node, its GPUs
#   sbatch --nodes=2 --gres=gpu:4 run.sh fcn --epochs 30     # two nodes: srun + c10d rendezvous
#   sbatch --partition=gpu --account=me --time=4:00:00 run.sh segnet
#   bash run.sh unet --synthetic                             # no Slurm: the GPUs here, or the CPU
#   sbatch --array=0-2 run.sh unet,fcn,segnet --data-dir data/kaggle_3m   # a job array: task i, model i
#   sbatch --array=0-2 run.sh unet,fcn,segnet --output-dir runs/cmp --val-frac 0.1 --test-frac 0.2 ...
#                                  # the comparison: task i into runs/cmp/<model i>; then, once all ended,
#                                  # python -m tools.compare --table --output-dir runs/cmp
#   sbatch run.sh sweep unet --processes 1 2 4 --workers 0 1 8 -- --data-dir data/kaggle_3m
#                                                            # the speed study's grid on one node
#
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

model=${1:-}
array=0
if [[ "$model" == *,* ]]; then  # a job array over models: task i trains the i-th
  IFS=, read -ra models <<< "$model"
  model=${models[${SLURM_ARRAY_TASK_ID:-0}]:-}
  array=1
fi
# sbatch runs a copy of this script from a spool folder: the repository is where the job was submitted
cd "${SLURM_SUBMIT_DIR:-$(dirname "$(readlink -f "$0")")}"
if [ "$model" = sweep ]; then shift; exec python -m tools.sweep "$@"; fi  # it launches each run itself
if [ -z "$model" ] || [ ! -f "$model/train.py" ] || [ ! -f "$model/model.py" ]; then
  models_here=$(for f in */train.py; do [ -f "${f%/train.py}/model.py" ] && printf '%s ' "${f%/train.py}"; done)
  echo "error: first argument must be a model (a folder with model.py and train.py: ${models_here% }) or sweep (got '${model}')" >&2
  exit 2
fi
shift

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
  if [ "$nodes" -gt 1 ]; then echo "error: several nodes need GPUs; none found on $(hostname)" >&2; exit 2; fi
fi
echo "run.sh: $model on $nodes node(s) x $procs process(es) ($gpus GPU(s) per node)"

# under Slurm, the run folder is named after the job, so that a requeued job finds it and resumes
run_dir=""
if [ "$array" = 1 ] && printf '%s\n' "$@" | grep -qE '^--output-dir(=|$)'; then
  # an array with --output-dir D (a comparison, tools.compare): task i writes D/<model i>
  args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --output-dir) run_dir="${2:?--output-dir needs a folder}/$model"; args+=(--output-dir "$run_dir"); shift 2 ;;
      --output-dir=*) run_dir="${1#*=}/$model"; args+=(--output-dir "$run_dir"); shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  set -- "${args[@]}"
  if [ -d "$run_dir/last" ]; then set -- "$@" --resume "$run_dir"; fi
elif [ -n "${SLURM_JOB_ID:-}" ] && ! printf '%s\n' "$@" | grep -qE '^--(output-dir|resume)(=|$)'; then
  run_dir="runs/$model-$SLURM_JOB_ID"
  if [ -f "$run_dir/args.json" ]; then set -- "$@" --resume "$run_dir"; else set -- "$@" --output-dir "$run_dir"; fi
fi

if [ "$nodes" -gt 1 ]; then
  # one launcher per node; all meet at the first node of the job (c10d rendezvous)
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  port=${MASTER_PORT:-29500}
  export model procs nodes head port
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec accelerate launch --multi_gpu --mixed_precision no --num_machines "$nodes" \
      --num_processes $((nodes * procs)) --machine_rank "$SLURM_NODEID" \
      --main_process_ip "$head" --main_process_port "$port" --rdzv_backend c10d --same_network \
      "$model/train.py" "$@"' bash "$@" &
else
  accelerate launch "${device_flags[@]}" --num_machines 1 --num_processes "$procs" \
    --dynamo_backend no "$model/train.py" "$@" &
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
if [ "$status" -eq 0 ] && [ -n "$run_dir" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ ! -f "$run_dir/summary.json" ]; then
  echo "run.sh: stopped before the end: requeueing job $SLURM_JOB_ID to resume from $run_dir"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
