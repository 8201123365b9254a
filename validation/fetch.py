#!/usr/bin/env python3
"""Fetch the published Edenhofer et al. (2024) map from Zenodo and verify it.

usage: fetch.py DIR [--samples] [--record ID]
       fetch.py --verify DIR

Downloads mean_and_std_healpix.fits (and, with --samples, samples_healpix.fits, about 19.5 GB) of
Zenodo record ID (default 8187943, the version dustmaps uses; concept DOI
10.5281/zenodo.8187942) into DIR, resuming partial downloads. Each file is checked against
the MD5 checksum Zenodo publishes for it in the record's metadata; the SHA-256 of every
verified file is then written to DIR/SHA256SUMS, and `--verify DIR` re-checks those later
(e.g. on a cluster's scratch disk after a copy). Standard library only.
"""
import hashlib
import json
import os
import sys
import urllib.request

FILES = ["mean_and_std_healpix.fits"]
SAMPLES = "samples_healpix.fits"


def digest(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(d):
    sums = os.path.join(d, "SHA256SUMS")
    if not os.path.exists(sums):
        sys.exit(f"{sums}: no such file (run fetch.py {d} first)")
    bad = 0
    for line in open(sums):
        want, name = line.split()
        path = os.path.join(d, name)
        got = digest(path, "sha256") if os.path.exists(path) else "missing"
        ok = got == want
        bad += not ok
        print(f"{'OK' if ok else 'FAILED'}  {name}")
    sys.exit(1 if bad else 0)


def download(url, path, size):
    have = os.path.getsize(path) if os.path.exists(path) else 0
    if have == size:
        return
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(req) as r, open(path, "ab" if have else "wb") as out:
        done = have
        while True:
            block = r.read(1 << 22)
            if not block:
                break
            out.write(block)
            done += len(block)
            print(f"\r{os.path.basename(path)}: {done / 1e9:.2f} / {size / 1e9:.2f} GB", end="",
                  file=sys.stderr)
    print(file=sys.stderr)


def main(argv):
    if len(argv) >= 2 and argv[0] == "--verify":
        verify(argv[1])
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    d = argv[0]
    record = argv[argv.index("--record") + 1] if "--record" in argv else "8187943"
    want = FILES + ([SAMPLES] if "--samples" in argv else [])
    os.makedirs(d, exist_ok=True)
    with urllib.request.urlopen(f"https://zenodo.org/api/records/{record}") as r:
        meta = json.load(r)
    entries = {f["key"]: f for f in meta["files"]}
    lines = []
    for name in want:
        if name not in entries:
            sys.exit(f"record {record} has no file {name} (files: {', '.join(entries)})")
        e = entries[name]
        path = os.path.join(d, name)
        download(e["links"]["self"], path, e["size"])
        algo, want_sum = e["checksum"].split(":", 1)
        got = digest(path, algo)
        if got != want_sum:
            sys.exit(f"{path}: {algo} {got} does not match Zenodo's {want_sum}; delete and retry")
        lines.append(f"{digest(path, 'sha256')}  {name}\n")
        print(f"verified {name} ({algo} {got})")
    with open(os.path.join(d, "SHA256SUMS"), "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
