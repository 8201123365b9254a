#!/usr/bin/env bash
# dust3d fit on N MPI ranks on one machine (or under any launcher that takes -n), resuming
# from the last consistent checkpoint after a failure, up to MAX_TRIES times.
#
#   scripts/batch/mpirun.sh -n 4 -t 2 -c configs/paper.toml -s stars.fits -o out/map.nc \
#       [-k /scratch/ckpt] [-r MAX_TRIES] [-g GPUS | -d DEVICES]
#
#   -n ranks, -t threads per rank, -c config, -s catalog, -o output map,
#   -k checkpoint directory (default: next to the map), -r tries (default 3),
#   -g GPUs on this machine: every rank drives one OpenCL device (--backend opencl), rank r
#      of the node takes device r mod GPUS (DUST3D_OPENCL_DEVICE=0,1,...,GPUS-1),
#   -d an explicit device list shared out the same way, e.g. -d 0,2 or -d "A100,H100".
# Environment: MPIRUN (default mpirun), MPIRUN_ARGS (extra launcher arguments),
# DUST3D (default target/release/dust3d), DUST3D_OPENCL_PLATFORM (index or name).
set -euo pipefail
RANKS=1 THREADS=1 CONFIG="" CATALOG="" OUT="" CKPT="" TRIES=3 DEVICES=""
while getopts "n:t:c:s:o:k:r:g:d:" opt; do
  case $opt in
    n) RANKS=$OPTARG ;; t) THREADS=$OPTARG ;; c) CONFIG=$OPTARG ;; s) CATALOG=$OPTARG ;;
    o) OUT=$OPTARG ;; k) CKPT=$OPTARG ;; r) TRIES=$OPTARG ;;
    g) [[ "$OPTARG" =~ ^[1-9][0-9]*$ ]] || { echo "$0: -g takes a GPU count, got '$OPTARG'" >&2; exit 2; }
       DEVICES=$(seq -s, 0 $((OPTARG - 1))) ;;
    d) DEVICES=$OPTARG ;;
    *) echo "usage: $0 -n RANKS -t THREADS -c CONFIG -s CATALOG -o OUT [-k CKPT_DIR] [-r TRIES] [-g GPUS | -d DEVICES]" >&2; exit 2 ;;
  esac
done
[ -n "$CONFIG" ] && [ -n "$CATALOG" ] && [ -n "$OUT" ] || { echo "$0: -c, -s and -o are required" >&2; exit 2; }
DUST3D=${DUST3D:-target/release/dust3d}
MPIRUN=${MPIRUN:-mpirun}
# OpenMPI: root needs consent; more ranks than cores need oversubscription; binding would pin
# each rank (and all its threads) to one core
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
ARGS=(fit --config "$CONFIG" --catalog "$CATALOG" --out "$OUT")
if [ -n "$DEVICES" ]; then
  # one device per rank, chosen by the node-local rank from this list (forwarded below)
  export DUST3D_OPENCL_DEVICE="$DEVICES"
  ARGS+=(--backend opencl)
fi
[ -n "$CKPT" ] && { mkdir -p "$CKPT"; ARGS+=(--checkpoint-dir "$CKPT"); }
for try in $(seq 1 "$TRIES"); do
  extra=()
  [ "$try" -gt 1 ] && extra=(--resume)
  echo "dust3d batch: try $try of $TRIES on $RANKS ranks x $THREADS threads${DEVICES:+, OpenCL devices $DEVICES}" >&2
  fwd=()
  for v in $(compgen -e | grep '^DUST3D_' || true); do fwd+=(-x "$v"); done
  # shellcheck disable=SC2086
  status=0
  $MPIRUN -n "$RANKS" --bind-to none -x RAYON_NUM_THREADS="$THREADS" "${fwd[@]}" ${MPIRUN_ARGS:-} \
      "$DUST3D" --threads "$THREADS" "${ARGS[@]}" "${extra[@]}" || status=$?
  if [ "$status" -eq 0 ]; then
    echo "dust3d batch: done: $OUT" >&2
    exit 0
  fi
  if [ "$status" -eq 75 ]; then
    # stopped on request (SIGTERM/SIGINT/SIGUSR1) at a safe point: not a failure to retry
    echo "dust3d batch: stopped on request; continue with the same command" >&2
    exit 75
  fi
done
echo "dust3d batch: gave up after $TRIES tries; resume later with the same rank count" >&2
exit 1
