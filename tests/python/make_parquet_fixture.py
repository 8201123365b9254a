#!/usr/bin/env python3
"""Write tests/fixtures/pyarrow_catalog.parquet (the seed of the Parquet fuzz target).

usage: make_parquet_fixture.py CATALOG_CSV OUT.parquet

Copies a dust3d catalog CSV (source_id, l, b, parallax, ... as `dust3d simulate` writes it)
into a Parquet table as pyarrow writes it by default (snappy), in two row groups, with
source_id as int64, l/b/parallax as double and the other columns as float32. With
--null-row K, extinction_error of data row K (1-based) is null.
"""
import csv
import sys

import pyarrow as pa
import pyarrow.parquet as pq

src, out = sys.argv[1], sys.argv[2]
null_row = int(sys.argv[4]) if sys.argv[3:4] == ["--null-row"] else None
with open(src) as f:
    rows = list(csv.DictReader(f))
doubles = {"l", "b", "parallax"}
cols = {"source_id": pa.array([int(r["source_id"]) for r in rows], pa.int64())}
for k in rows[0]:
    if k == "source_id":
        continue
    vals = [float(r[k]) for r in rows]
    if k == "extinction_error" and null_row is not None:
        vals[null_row - 1] = None
    cols[k] = pa.array(vals, pa.float64() if k in doubles else pa.float32())
pq.write_table(pa.table(cols), out, row_group_size=len(rows) // 2 + 1)
print(f"wrote {len(rows)} rows to {out}")
