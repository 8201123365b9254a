#!/usr/bin/env python3
"""Cross-check of `dust3d export` + `dust3d query` against dustmaps (run by tests/dustmaps.rs).

usage: dustmaps_roundtrip.py EXPORT_DIR QUERY_DIR

EXPORT_DIR holds mean_and_std_healpix.fits and samples_healpix.fits written by
`dust3d export`; QUERY_DIR holds the CSV tables `dust3d query --convention dustmaps` wrote
for the same points (columns l, b, d and the result columns). Every value dustmaps defines
must match dust3d's to float32 precision, and both must agree on where no value exists.
Prints one line per comparison; exits 1 on any disagreement.
"""
import csv
import os
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")
import astropy.units as u  # noqa: E402
from astropy.coordinates import SkyCoord  # noqa: E402
from dustmaps.edenhofer2023 import Edenhofer2023Query  # noqa: E402

exp_dir, q_dir = sys.argv[1], sys.argv[2]


def table(name):
    with open(os.path.join(q_dir, name)) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


failures = 0


def check(label, ours, theirs, rtol):
    global failures
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    both = np.isfinite(ours) & np.isfinite(theirs)
    nan_mismatch = int(np.sum(np.isfinite(ours) != np.isfinite(theirs)))
    rel = np.abs(ours[both] - theirs[both]) / np.maximum(np.abs(theirs[both]), 1e-30)
    worst = float(rel.max()) if rel.size else 0.0
    ok = nan_mismatch == 0 and worst <= rtol and both.sum() >= 1000
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {int(both.sum())} values, max rel diff {worst:.2e} "
          f"(tol {rtol:.0e}), {nan_mismatch} NaN mismatches")


mean_file = os.path.join(exp_dir, "mean_and_std_healpix.fits")
samples_file = os.path.join(exp_dir, "samples_healpix.fits")

t = table("differential.csv")
coords = SkyCoord(l=t["l"] * u.deg, b=t["b"] * u.deg, distance=t["d"] * u.pc, frame="galactic")
q = Edenhofer2023Query(map_fname=mean_file, integrated=False)
check("differential mean", t["differential_mean"], q.query(coords, mode="mean"), 1e-6)
check("differential std", t["differential_std"], q.query(coords, mode="std"), 1e-6)
tf = table("differential_from_fits.csv")
check("differential mean, dust3d reading the exported FITS", tf["differential_mean"],
      q.query(coords, mode="mean"), 1e-6)

q = Edenhofer2023Query(map_fname=mean_file, integrated=True)
ti = table("integrated.csv")
check("integrated mean", ti["integrated_mean"], q.query(coords, mode="mean"), 1e-6)

q = Edenhofer2023Query(map_fname=samples_file, load_samples=True, integrated=False)
ts = table("differential_samples.csv")
theirs = q.query(coords, mode="samples")  # shape (n_points, n_samples)
for s in range(theirs.shape[1]):
    check(f"differential sample {s}", ts[f"differential_sample_{s}"], theirs[:, s], 1e-6)

q = Edenhofer2023Query(map_fname=samples_file, load_samples=True, integrated=True)
theirs = q.query(coords, mode="samples")
for s in range(theirs.shape[1]):
    check(f"integrated sample {s}", ti[f"integrated_sample_{s}"], theirs[:, s], 1e-6)
# std of integrated extinction: dustmaps needs the samples file for it
check("integrated std", ti["integrated_std"], q.query(coords, mode="std"), 2e-5)

sys.exit(1 if failures else 0)
