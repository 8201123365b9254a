//! Generic tables for point files (`query --coords`, overlays): every column of a CSV
//! (optionally gzipped) or FITS binary table is read and carried through, result columns are
//! appended, and the table is written back as CSV or FITS by extension (atomically).

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use crate::base::atomic::write_atomically;

/// One column of values.
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    /// Floating-point values.
    F64(Vec<f64>),
    /// Integer values.
    I64(Vec<i64>),
    /// Text values.
    Str(Vec<String>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::F64(v) => v.len(),
            Column::I64(v) => v.len(),
            Column::Str(v) => v.len(),
        }
    }
}

/// A table read from or written to a point file.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// Where it was read from (for error messages).
    pub source: String,
    /// Column names in file order.
    pub names: Vec<String>,
    /// Column values, parallel to `names`.
    pub columns: Vec<Column>,
    /// Number of rows.
    pub rows: usize,
}

/// True for file names ending in .fits/.fit (case-insensitive).
fn is_fits_name(path: &Path) -> bool {
    let n = path.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".fits") || n.ends_with(".fit")
}

impl Table {
    /// Read a CSV, CSV.gz or FITS (first binary table) file.
    pub fn read(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        if !path.exists() {
            bail!("{file}: no such file");
        }
        let name = file.to_ascii_lowercase();
        if is_fits_name(path) {
            return read_fits(path);
        }
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {file}"))?;
        if name.ends_with(".gz") {
            let dec = flate2::read::MultiGzDecoder::new(BufReader::new(f));
            read_csv(BufReader::new(dec), &file)
        } else if name.ends_with(".csv") || name.ends_with(".txt") {
            read_csv(BufReader::new(f), &file)
        } else {
            bail!("{file}: unknown table format (use .csv, .csv.gz or .fits)")
        }
    }

    /// A numeric column as f64; the error names the file, column and first bad row.
    pub fn f64_column(&self, name: &str) -> Result<Vec<f64>> {
        let j = self.names.iter().position(|n| n == name).ok_or_else(|| {
            anyhow!(
                "{}: missing column '{name}' (columns present: {})",
                self.source,
                self.names.join(", ")
            )
        })?;
        match &self.columns[j] {
            Column::F64(v) => Ok(v.clone()),
            Column::I64(v) => Ok(v.iter().map(|&x| x as f64).collect()),
            // a text column (FITS strings) is usable where every value reads as a number
            Column::Str(v) => v
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.trim().parse::<f64>().map_err(|_| {
                        anyhow!(
                            "{}: row {}, column '{name}': cannot parse {s:?} as a number",
                            self.source,
                            i + 1
                        )
                    })
                })
                .collect(),
        }
    }

    /// Append a column (replacing one of the same name).
    pub fn push(&mut self, name: &str, col: Column) {
        debug_assert!(self.names.is_empty() || col.len() == self.rows);
        self.rows = col.len();
        if let Some(j) = self.names.iter().position(|n| n == name) {
            self.columns[j] = col;
        } else {
            self.names.push(name.into());
            self.columns.push(col);
        }
    }

    /// Write as CSV (.csv, .csv.gz) or FITS (.fits) by extension, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        write_atomically(path, |tmp| {
            if is_fits_name(path) {
                self.write_fits(tmp)
            } else if name.ends_with(".gz") {
                let f = std::fs::File::create(tmp)?;
                let enc = flate2::write::GzEncoder::new(f, flate2::Compression::default());
                let mut buf = std::io::BufWriter::new(enc);
                self.write_csv(&mut buf)?;
                // finish() writes the gzip trailer; a drop would swallow its error
                buf.into_inner().map_err(|e| e.into_error())?.finish()?;
                Ok(())
            } else if name.ends_with(".csv") || name.ends_with(".txt") {
                self.write_csv(std::io::BufWriter::new(std::fs::File::create(tmp)?))
            } else {
                bail!("unknown table format (use .csv, .csv.gz or .fits)")
            }
        })
        .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Write as CSV to any writer (e.g. standard output).
    pub fn write_csv<W: Write>(&self, w: W) -> Result<()> {
        use std::fmt::Write as _;
        let mut wtr = csv::Writer::from_writer(w);
        wtr.write_record(&self.names)?;
        let mut buf = String::new();
        for i in 0..self.rows {
            for c in &self.columns {
                buf.clear();
                match c {
                    Column::F64(v) => write!(buf, "{}", v[i])?,
                    Column::I64(v) => write!(buf, "{}", v[i])?,
                    Column::Str(v) => buf.push_str(&v[i]),
                }
                wtr.write_field(&buf)?;
            }
            wtr.write_record(None::<&[u8]>)?;
        }
        wtr.into_inner().map_err(|e| e.into_error())?.flush()?;
        Ok(())
    }

    fn write_fits(&self, tmp: &Path) -> Result<()> {
        use fitsio::tables::{ColumnDataType, ColumnDescription};
        let mut f = fitsio::FitsFile::create(tmp).open()?;
        let mut descs = Vec::new();
        for (n, c) in self.names.iter().zip(&self.columns) {
            let mut d = ColumnDescription::new(n.as_str());
            descs.push(match c {
                Column::F64(_) => d.with_type(ColumnDataType::Double).create()?,
                Column::I64(_) => d.with_type(ColumnDataType::LongLong).create()?,
                Column::Str(v) => {
                    let w = v.iter().map(String::len).max().unwrap_or(1).max(1);
                    d.with_type(ColumnDataType::String)
                        .that_repeats(w)
                        .create()?
                }
            });
        }
        let hdu = f.create_table("POINTS", &descs)?;
        for (n, c) in self.names.iter().zip(&self.columns) {
            match c {
                Column::F64(v) => hdu.write_col(&mut f, n, v)?,
                Column::I64(v) => hdu.write_col(&mut f, n, v)?,
                Column::Str(v) => hdu.write_col(&mut f, n, v)?,
            };
        }
        close_fits(f)
    }
}

/// Flush and close a FITS file, returning the error a plain drop would discard (a full disk
/// surfaces here).
pub fn close_fits(mut f: fitsio::FitsFile) -> anyhow::Result<()> {
    let mut status = 0;
    // SAFETY: the pointer is the open file `f` owns; ffflus only writes its buffers
    unsafe { fitsio::sys::ffflus(f.as_raw(), &mut status) };
    if status != 0 {
        anyhow::bail!("cannot flush the FITS file (CFITSIO status {status})");
    }
    drop(f);
    Ok(())
}

/// A CSV column being read: integers until a value is not one, then floats, then text.
enum Building {
    Int(Vec<i64>),
    Float(Vec<f64>),
    Text(Vec<String>),
}

impl Building {
    fn push(&mut self, field: &[u8]) {
        let text = std::str::from_utf8(field).unwrap_or("");
        loop {
            match self {
                Building::Int(v) => match text.parse::<i64>() {
                    Ok(x) => return v.push(x),
                    Err(_) => *self = Building::Float(v.iter().map(|&x| x as f64).collect()),
                },
                Building::Float(v) => match text.parse::<f64>() {
                    Ok(x) => return v.push(x),
                    Err(_) => *self = Building::Text(v.iter().map(|x| x.to_string()).collect()),
                },
                Building::Text(v) => return v.push(text.to_owned()),
            }
        }
    }

    fn finish(self) -> Column {
        match self {
            Building::Int(v) => Column::I64(v),
            Building::Float(v) => Column::F64(v),
            Building::Text(v) => Column::Str(v),
        }
    }
}

fn read_csv<R: BufRead>(reader: R, file: &str) -> Result<Table> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let names: Vec<String> = rdr
        .headers()
        .with_context(|| format!("{file}: cannot read the CSV header"))?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut cols: Vec<Building> = names.iter().map(|_| Building::Int(Vec::new())).collect();
    let mut rec = csv::ByteRecord::new();
    let mut row = 0;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => bail!("{file}: row {}: malformed CSV: {e}", row + 1),
        }
        row += 1;
        for (c, v) in cols.iter_mut().zip(rec.iter()) {
            c.push(v);
        }
    }
    Ok(Table {
        source: file.into(),
        names,
        columns: cols.into_iter().map(Building::finish).collect(),
        rows: row,
    })
}

fn read_fits(path: &Path) -> Result<Table> {
    use fitsio::hdu::HduInfo;
    use fitsio::tables::ColumnDataType as T;
    let file = path.display().to_string();
    let mut f =
        fitsio::FitsFile::open(path).with_context(|| format!("{file}: cannot open as FITS"))?;
    for i in 1..1000usize {
        let Ok(hdu) = f.hdu(i) else { break };
        let HduInfo::TableInfo {
            column_descriptions,
            num_rows,
        } = &hdu.info
        else {
            continue;
        };
        let mut t = Table {
            source: file.clone(),
            rows: *num_rows,
            ..Default::default()
        };
        for c in column_descriptions {
            let n = c.name.as_str();
            let err = |e| anyhow!("{file}: column '{n}': {e}");
            let col = match c.data_type.typ {
                T::Float | T::Double if c.data_type.repeat == 1 => {
                    Column::F64(hdu.read_col(&mut f, n).map_err(err)?)
                }
                T::Short | T::Int | T::Long | T::LongLong | T::Byte | T::SignedByte
                    if c.data_type.repeat == 1 =>
                {
                    Column::I64(hdu.read_col(&mut f, n).map_err(err)?)
                }
                T::String | T::Text => Column::Str(hdu.read_col(&mut f, n).map_err(err)?),
                _ => {
                    tracing::warn!(file, column = n, "skipping a vector or logical FITS column");
                    continue;
                }
            };
            t.names.push(n.into());
            t.columns.push(col);
        }
        return Ok(t);
    }
    bail!("{file}: no binary table HDU found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_columns_are_numbers_where_they_read_as_numbers_and_errors_otherwise() {
        // a FITS string column holding numbers (it panicked before) and one holding words
        let t = Table {
            source: "t.fits".into(),
            names: vec!["l".into(), "name".into()],
            columns: vec![
                Column::Str(vec!["10.5".into(), " 200 ".into()]),
                Column::Str(vec!["A".into(), "B".into()]),
            ],
            rows: 2,
        };
        assert_eq!(t.f64_column("l").unwrap(), [10.5, 200.0]);
        let e = format!("{:#}", t.f64_column("name").unwrap_err());
        assert!(
            e.contains("t.fits") && e.contains("row 1") && e.contains("'name'"),
            "{e}"
        );
    }

    #[test]
    fn csv_and_fits_round_trip_with_carried_columns() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("p.csv");
        std::fs::write(
            &csv,
            "name,l,b,d,id\nA,10.5,-3,100,7\nB,200,45.25,250.5,8\n",
        )
        .unwrap();
        let mut t = Table::read(&csv).unwrap();
        assert_eq!(t.names, ["name", "l", "b", "d", "id"]);
        assert_eq!(t.f64_column("b").unwrap(), [-3.0, 45.25]);
        assert!(matches!(t.columns[0], Column::Str(_)) && matches!(t.columns[4], Column::I64(_)));
        t.push("mean", Column::F64(vec![0.125, f64::NAN]));
        for ext in ["out.csv", "out.fits", "out.csv.gz"] {
            let p = dir.path().join(ext);
            t.write(&p).unwrap();
            let back = Table::read(&p).unwrap();
            assert_eq!(back.names, t.names, "{ext}");
            assert_eq!(back.columns[..5], t.columns[..5], "{ext}");
            let m = back.f64_column("mean").unwrap();
            assert!(m[0] == 0.125 && m[1].is_nan(), "{ext}");
        }
        let e = t.f64_column("name").unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("'name'"), "{e}");
        let e = t.f64_column("x").unwrap_err().to_string();
        assert!(e.contains("missing column 'x'"), "{e}");
    }
}
