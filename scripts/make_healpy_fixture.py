#!/usr/bin/env python3
"""Generate tests/fixtures/healpy_nested.json once with healpy (run inside build/venv).

For nside 1, 2, 4, 16 and 64 (NESTED): centres (l, b in deg) of a deterministic subset of
pixels, their 8 neighbours in healpy's get_all_neighbours order (SW, W, NW, N, NE, E, SE, S;
-1 where missing), ang2pix of fixed pseudo-random directions, and the bilinear interpolation
pixels and weights of get_interp_weights at random directions, near both poles and at
pixel centres (the scheme dustmaps uses).
"""
import json
import sys

import healpy as hp
import numpy as np

out = {"healpy_version": hp.__version__, "cases": []}
rng = np.random.default_rng(12345)
rng_interp = np.random.default_rng(777)
for nside in [1, 2, 4, 16, 64]:
    npix = hp.nside2npix(nside)
    pix = np.unique(np.concatenate([np.arange(min(npix, 48)), rng.integers(0, npix, 40)]))
    theta, phi = hp.pix2ang(nside, pix, nest=True)
    nb = hp.get_all_neighbours(nside, pix, nest=True).T
    l = rng.uniform(0, 360, 200)
    b = np.degrees(np.arcsin(rng.uniform(-1, 1, 200)))
    a2p = hp.ang2pix(nside, l, b, nest=True, lonlat=True)
    il = np.concatenate([rng_interp.uniform(0, 360, 300), rng_interp.uniform(-720, 720, 20),
                         np.degrees(phi[:20])])
    ib = np.concatenate([np.degrees(np.arcsin(rng_interp.uniform(-1, 1, 300))),
                         rng_interp.uniform(-90, -88, 10), rng_interp.uniform(88, 90, 10),
                         90 - np.degrees(theta[:20])])
    ip, iw = hp.get_interp_weights(nside, il, ib, nest=True, lonlat=True)
    out["cases"].append({
        "interp_l_deg": il.tolist(),
        "interp_b_deg": ib.tolist(),
        "interp_pix": ip.T.tolist(),
        "interp_w": iw.T.tolist(),
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
