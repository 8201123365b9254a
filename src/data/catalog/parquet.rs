//! Parquet catalogs (the Gaia archive's format), read column by column with the Apache
//! reference implementation's column readers: only the requested columns of the row groups
//! that overlap this reader's block of rows are decoded. Nulls read as NaN, which the
//! catalog's checks then report by row.

use anyhow::{bail, Context, Result};
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::path::Path;

use super::columns::{positions, RowPart, Table};

/// Read the named numeric columns (and optionally an integer id column) of the rows of
/// `part` (a contiguous block) from a Parquet file.
pub(super) fn read_parquet(
    path: &Path,
    names: &[&str],
    id_name: Option<&str>,
    part: RowPart,
) -> Result<Table> {
    let file = path.display();
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {file}"))?;
    let reader =
        SerializedFileReader::new(f).with_context(|| format!("{file}: not a Parquet file"))?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let present: Vec<String> = (0..schema.num_columns())
        .map(|i| schema.column(i).path().string())
        .collect();
    let (wanted, id) = positions(path, &present, names, id_name)?;
    let total = usize::try_from(meta.file_metadata().num_rows())?;
    let block = part.block(total);
    let mut columns = vec![Vec::with_capacity(block.len()); names.len()];
    let mut ids = id.map(|_| Vec::with_capacity(block.len()));
    let mut start = 0usize;
    for g in 0..meta.num_row_groups() {
        let rows = usize::try_from(meta.row_group(g).num_rows())?;
        let (lo, hi) = (block.start.max(start), block.end.min(start + rows));
        if lo < hi {
            let group = reader.get_row_group(g)?;
            let keep = lo - start..hi - start;
            for ((out, &c), n) in columns.iter_mut().zip(&wanted).zip(names) {
                let max_def = schema.column(c).max_def_level();
                let v = read_column(group.get_column_reader(c)?, rows, max_def)
                    .with_context(|| format!("{file}: column '{n}', row group {g}"))?;
                out.extend(v[keep.clone()].iter().map(|x| x.as_f64()));
            }
            if let (Some(c), Some(ids)) = (id, ids.as_mut()) {
                let max_def = schema.column(c).max_def_level();
                let v = read_column(group.get_column_reader(c)?, rows, max_def)
                    .with_context(|| format!("{file}: id column, row group {g}"))?;
                for (k, x) in v[keep].iter().enumerate() {
                    ids.push(x.as_i64().with_context(|| {
                        format!(
                            "{file}: row {}: the id column is not an integer",
                            lo + k + 1
                        )
                    })?);
                }
            }
        }
        start += rows;
    }
    Ok(Table {
        rows: block.len(),
        columns,
        source_id: ids,
        lines: None,
        row_index: (part.size > 1).then(|| block.map(|r| r as u64).collect()),
    })
}

/// One value of a numeric column: integers stay exact for the id column.
#[derive(Clone, Copy)]
enum Value {
    Float(f64),
    Int(i64),
    Null,
}

impl Value {
    fn as_f64(self) -> f64 {
        match self {
            Value::Float(x) => x,
            Value::Int(i) => i as f64,
            Value::Null => f64::NAN,
        }
    }
    fn as_i64(self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }
}

/// Every value of one row group's column (`rows` records; nulls where the definition level
/// is below `max_def`).
fn read_column(reader: ColumnReader, rows: usize, max_def: i16) -> Result<Vec<Value>> {
    macro_rules! all {
        ($r:expr, $conv:expr) => {{
            let mut r = $r;
            let (mut vals, mut defs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
            let mut got = 0;
            while got < rows {
                let (records, _, _) =
                    r.read_records(rows - got, Some(&mut defs), None, &mut vals)?;
                if records == 0 {
                    bail!("{got} of {rows} rows present");
                }
                got += records;
            }
            with_nulls(vals.into_iter().map($conv), &defs, rows, max_def)
        }};
    }
    match reader {
        ColumnReader::DoubleColumnReader(r) => all!(r, Value::Float),
        ColumnReader::FloatColumnReader(r) => all!(r, |x: f32| Value::Float(x.into())),
        ColumnReader::Int64ColumnReader(r) => all!(r, Value::Int),
        ColumnReader::Int32ColumnReader(r) => all!(r, |x: i32| Value::Int(x.into())),
        ColumnReader::BoolColumnReader(r) => all!(r, |x: bool| Value::Int(x.into())),
        _ => bail!("not a numeric column (text, binary or 96-bit timestamps)"),
    }
}

/// Place the non-null `values` at the rows whose definition level is `max_def`.
fn with_nulls(
    values: impl Iterator<Item = Value>,
    defs: &[i16],
    rows: usize,
    max_def: i16,
) -> Result<Vec<Value>> {
    if max_def == 0 {
        let v: Vec<Value> = values.collect();
        anyhow::ensure!(v.len() == rows, "{} values for {rows} rows", v.len());
        return Ok(v);
    }
    anyhow::ensure!(defs.len() == rows, "{} levels for {rows} rows", defs.len());
    let mut values = values;
    defs.iter()
        .map(|&d| match d == max_def {
            true => values.next().context("fewer values than defined rows"),
            false => Ok(Value::Null),
        })
        .collect()
}
