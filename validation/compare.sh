#!/usr/bin/env bash
# Compare a dust3d map with the published map (paper Fig. 10 style) and draw both.
#
# usage: validation/compare.sh MAP REFERENCE_DIR OUT_DIR
#   MAP            a dust3d map (.nc) or a FITS file in the release layout
#   REFERENCE_DIR  holds mean_and_std_healpix.fits (validation/fetch.py downloads it)
#   OUT_DIR        receives compare/ (histogram, quantiles, summary), sky maps of both and
#                  a slab projection of the reference
# DUST3D (default: target/release/dust3d) is the binary; NSIDE (64) and STEP (1 pc) set the
# test points as in the paper (nside-64 pixel centres, 1 pc steps from the inner radius).
set -euo pipefail
[ $# -eq 3 ] || { sed -n 2,11p "$0"; exit 2; }
MAP=$1 REF=$2/mean_and_std_healpix.fits OUT=$3
BIN=${DUST3D:-target/release/dust3d}
[ -f "$REF" ] || { echo "$REF: no such file (fetch it with validation/fetch.py $2)" >&2; exit 1; }
if [ -f "$2/SHA256SUMS" ]; then (cd "$2" && sha256sum --quiet -c SHA256SUMS); fi
mkdir -p "$OUT"
"$BIN" compare --map "$MAP" --reference "$REF" --out "$OUT/compare" \
  --nside "${NSIDE:-64}" --step "${STEP:-1}"
"$BIN" plot --map "$REF" --kind sky --out "$OUT/reference_sky.png"
"$BIN" plot --map "$MAP" --kind sky --out "$OUT/map_sky.png"
"$BIN" plot --map "$REF" --kind xyz --out "$OUT/reference_xyz.png"
echo "validation outputs in $OUT: compare/compare_hist.png, compare/compare_quantiles.csv,"
echo "  compare/compare_summary.json, reference_sky.png, map_sky.png, reference_xyz.png"
