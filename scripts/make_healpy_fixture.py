#!/usr/bin/env python3
"""Generate tests/fixtures/healpy_nested.json once with healpy (run inside build/venv).

For nside 1, 2, 4, 16 and 64 (NESTED): centres (l, b in deg) of a deterministic subset of
pixels, their 8 neighbours in healpy's get_all_neighbours order (SW, W, NW, N, NE, E, SE, S;
-1 where missing), and ang2pix of fixed pseudo-random directions.
"""
import json
import sys

import healpy as hp
import numpy as np

out = {"healpy_version": hp.__version__, "cases": []}
rng = np.random.default_rng(12345)
for nside in [1, 2, 4, 16, 64]:
    npix = hp.nside2npix(nside)
    pix = np.unique(np.concatenate([np.arange(min(npix, 48)), rng.integers(0, npix, 40)]))
    theta, phi = hp.pix2ang(nside, pix, nest=True)
    nb = hp.get_all_neighbours(nside, pix, nest=True).T
    l = rng.uniform(0, 360, 200)
    b = np.degrees(np.arcsin(rng.uniform(-1, 1, 200)))
    a2p = hp.ang2pix(nside, l, b, nest=True, lonlat=True)
    out["cases"].append({
        "nside": nside,
        "pix": pix.tolist(),
        "l_deg": np.degrees(phi).tolist(),
        "b_deg": (90 - np.degrees(theta)).tolist(),
        "neighbours": nb.tolist(),
        "query_l_deg": l.tolist(),
        "query_b_deg": b.tolist(),
        "ang2pix": a2p.tolist(),
    })
path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/healpy_nested.json"
with open(path, "w") as f:
    json.dump(out, f)
print(f"wrote {path}")
