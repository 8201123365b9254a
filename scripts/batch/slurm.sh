#!/usr/bin/env bash
# SLURM job template for a distributed dust3d fit. Submit with
#
#   sbatch --nodes=8 --ntasks-per-node=8 --cpus-per-task=16 --time=24:00:00 \
#       scripts/batch/slurm.sh configs/paper.toml stars.fits out/map.nc [/scratch/$USER/ckpt]
#
# nodes x ranks per node x threads per rank come from sbatch (--nodes, --ntasks-per-node,
# --cpus-per-task). Ten minutes before the time limit SLURM sends SIGUSR1: the script then
# submits its own successor with --resume (same geometry, afterany dependency on this job's
# end) and sends SIGTERM to the step, whose ranks stop together at the next safe point (exit
# code 75) with their newest checkpoint on disk. The successor continues from it bit for bit.
# Set DUST3D_MAX_RESUBMITS (default 20) to bound the chain.
#
# GPU nodes: one OpenCL device per rank. Ask for as many ranks per node as GPUs and set
# DUST3D_BACKEND=opencl, e.g.
#
#   DUST3D_BACKEND=opencl sbatch --nodes=16 --ntasks-per-node=4 --gpus-per-node=4 \
#       --cpus-per-task=16 --time=24:00:00 scripts/batch/slurm.sh configs/zgr23.toml ...
#
# By default every rank sees all GPUs of its node (srun --gpu-bind=none) and takes device
# (SLURM_LOCALID mod GPUs). DUST3D_GPU_BIND=closest (or any srun --gpu-bind value) lets SLURM
# give each rank its own GPU instead; dust3d then opens the one device it sees. An explicit
# list in DUST3D_OPENCL_DEVICE (e.g. "0,1,2,3") overrides both. Each rank logs its device
# and checks its memory before the fit.
#SBATCH --job-name=dust3d
#SBATCH --signal=B:USR1@600
#SBATCH --output=dust3d-%j.out
set -euo pipefail
CONFIG=${1:?config}; CATALOG=${2:?catalog}; OUT=${3:?output map}; CKPT=${4:-}
RESUME=${DUST3D_RESUME:-0}
COUNT=${DUST3D_RESUBMIT_COUNT:-0}
MAX=${DUST3D_MAX_RESUBMITS:-20}
DUST3D=${DUST3D:-$(pwd)/target/release/dust3d}
export RAYON_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [ "$RESUME" = 1 ] && [ -e "$OUT" ]; then
  # the previous job finished the fit after queueing us: nothing left to do
  echo "dust3d: $OUT exists: the fit is complete" >&2
  exit 0
fi

resubmit() {
  if [ "$COUNT" -ge "$MAX" ]; then
    echo "dust3d: not resubmitting: $COUNT resubmissions reached" >&2
    return 0
  fi
  echo "dust3d: time limit near: queueing the continuation" >&2
  DUST3D_RESUME=1 DUST3D_RESUBMIT_COUNT=$((COUNT + 1)) \
    sbatch --dependency=afterany:"$SLURM_JOB_ID" --nodes="$SLURM_JOB_NUM_NODES" \
      --ntasks-per-node="${SLURM_NTASKS_PER_NODE%%(*}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
      --time="${DUST3D_TIME:-24:00:00}" --export=ALL "$0" "$@"
}
stop_step() {
  # srun passes SIGTERM to every task: dust3d stops at its next safe point
  [ -n "${step:-}" ] && kill -TERM "$step" 2>/dev/null || true
}
trap 'resubmit "$CONFIG" "$CATALOG" "$OUT" "$CKPT"; stop_step' USR1

ARGS=(--threads "$RAYON_NUM_THREADS" fit --config "$CONFIG" --catalog "$CATALOG" --out "$OUT")
SRUN_ARGS=(--cpu-bind=none)
case "${DUST3D_BACKEND:-cpu}" in
  cpu) ;;
  opencl) ARGS+=(--backend opencl); SRUN_ARGS+=(--gpu-bind="${DUST3D_GPU_BIND:-none}") ;;
  *) echo "dust3d: DUST3D_BACKEND must be cpu or opencl, got '$DUST3D_BACKEND'" >&2; exit 2 ;;
esac
[ -n "$CKPT" ] && { mkdir -p "$CKPT"; ARGS+=(--checkpoint-dir "$CKPT"); }
[ "$RESUME" = 1 ] && ARGS+=(--resume)
# srun in the background so the trap can run while the step is alive; a trapped signal
# interrupts `wait`, so wait again until the step itself has ended
srun "${SRUN_ARGS[@]}" "$DUST3D" "${ARGS[@]}" &
step=$!
while :; do
  status=0
  wait "$step" || status=$?
  kill -0 "$step" 2>/dev/null || break
done
exit "$status"
