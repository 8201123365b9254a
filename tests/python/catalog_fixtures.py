#!/usr/bin/env python3
"""Catalog fixtures as the field's tools write them (run by tests/formats.rs).

usage: catalog_fixtures.py GALACTIC_CSV OUT_DIR [--zgr23-only]

Reads a dust3d catalog in Galactic coordinates (columns source_id, l, b, parallax,
parallax_error, extinction, extinction_error) and writes into OUT_DIR, from the same stars:

- zgr23.h5   the Zhang, Green & Rix (2023) layout, by h5py: gdr3_source_id (int64), ra, dec
             (ICRS deg, from astropy), stellar_params_est / stellar_params_err (N x 5
             float32: Teff, [Fe/H], log g, E, parallax) and quality_flags (uint8);
- icrs.csv   the same stars with ra, dec instead of l, b (astropy);
- galactic.csv  the reference: l, b as given, the other quantities rounded to float32 as
             in zgr23.h5, and quality_flags;
- gaia.parquet  the ICRS stars as a Gaia-archive-style Parquet table, by pyarrow (snappy,
             several row groups; source_id int64, ra/dec/parallax double, the rest float32,
             quality_flags uint8);
- frames.csv 2,000 random ICRS positions (poles and ra = 0/360 included) with astropy's
             Galactic l, b, to check dust3d's rotation point by point.

With --zgr23-only only zgr23.h5 is written (scripts/rehearsal's mock catalog).
"""
import csv
import os
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")
import astropy.units as u  # noqa: E402
import h5py  # noqa: E402
from astropy.coordinates import SkyCoord  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
only_zgr23 = "--zgr23-only" in sys.argv[3:]
with open(src) as f:
    rows = list(csv.DictReader(f))
col = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k != "source_id"}
sid = np.array([int(r["source_id"]) for r in rows], dtype=np.int64)
n = len(sid)
rng = np.random.default_rng(7)

icrs = SkyCoord(l=col["l"] * u.deg, b=col["b"] * u.deg, frame="galactic").icrs
ra, dec = icrs.ra.deg, icrs.dec.deg

est = np.zeros((n, 5), dtype=np.float32)
err = np.zeros((n, 5), dtype=np.float32)
est[:, 0] = rng.uniform(4000, 7000, n)
est[:, 1] = rng.normal(-0.2, 0.3, n)
est[:, 2] = rng.uniform(1, 5, n)
est[:, 3] = col["extinction"]
est[:, 4] = col["parallax"]
err[:, :3] = 0.1
err[:, 3] = col["extinction_error"]
err[:, 4] = col["parallax_error"]
quality = rng.integers(0, 12, n).astype(np.uint8)

with h5py.File(os.path.join(out, "zgr23.h5"), "w") as h:
    h["gdr3_source_id"] = sid
    h["ra"] = ra
    h["dec"] = dec
    h["stellar_params_est"] = est
    h["stellar_params_err"] = err
    h["quality_flags"] = quality

if only_zgr23:
    print(f"wrote {n} stars in the ZGR23 layout")
    sys.exit(0)

f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
common = {
    "parallax": f32(col["parallax"]),
    "parallax_error": f32(col["parallax_error"]),
    "extinction": f32(col["extinction"]),
    "extinction_error": f32(col["extinction_error"]),
    "quality_flags": quality.astype(np.float64),
}


def write(name, pos):
    cols = {**pos, **common}
    with open(os.path.join(out, name), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_id", *cols])
        for i in range(n):
            w.writerow([sid[i], *(repr(float(cols[k][i])) for k in cols)])


write("galactic.csv", {"l": col["l"], "b": col["b"]})
write("icrs.csv", {"ra": ra, "dec": dec})

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

table = pa.table(
    {
        "source_id": pa.array(sid, pa.int64()),
        "ra": pa.array(ra, pa.float64()),
        "dec": pa.array(dec, pa.float64()),
        "parallax": pa.array(common["parallax"], pa.float64()),
        "parallax_error": pa.array(common["parallax_error"].astype(np.float32)),
        "extinction": pa.array(common["extinction"].astype(np.float32)),
        "extinction_error": pa.array(common["extinction_error"].astype(np.float32)),
        "quality_flags": pa.array(quality, pa.uint8()),
    }
)
pq.write_table(table, os.path.join(out, "gaia.parquet"), row_group_size=max(1, n // 3 + 7))

ra_r = np.concatenate([rng.uniform(0, 360, 1990), [0, 360 - 1e-9, 0, 180, 45, 266.4049882865447, 192.8594812065348, 10, 20, 30]])
dec_r = np.concatenate([np.degrees(np.arcsin(rng.uniform(-1, 1, 1990))), [0, 0, 90, -90, 89.9999999, -28.936177761791473, 27.12825118085622, -89.9999999, 1e-12, -1e-12]])
g = SkyCoord(ra=ra_r * u.deg, dec=dec_r * u.deg, frame="icrs").galactic
with open(os.path.join(out, "frames.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ra", "dec", "l", "b"])
    for row in zip(ra_r, dec_r, g.l.deg, g.b.deg):
        w.writerow([repr(float(x)) for x in row])
print(f"wrote {n} stars in the ZGR23, ICRS, Galactic and Parquet layouts and 2000 frame checks")
