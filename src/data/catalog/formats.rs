//! Column readers and writers for the catalog formats: CSV (plain or gzipped), FITS
//! binary tables (cfitsio), netCDF-4/HDF5 files with one 1-D variable per column (or a
//! component of a 2-D one) and, read only, Parquet tables (`super::parquet`).

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use super::columns::{missing, positions, RowPart, Table};
use super::Catalog;
use crate::base::atomic::write_atomically;

/// Catalog file formats, chosen by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated text with a header line.
    Csv,
    /// Gzipped CSV.
    CsvGz,
    /// FITS binary table.
    Fits,
    /// netCDF-4 (an HDF5 file) with 1-D variables.
    NetCdf,
    /// Apache Parquet table (read only; cargo feature `parquet`, on by default).
    Parquet,
}

impl Format {
    /// Format of `path` from its extension.
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        Ok(if name.ends_with(".csv.gz") || name.ends_with(".gz") {
            Format::CsvGz
        } else if name.ends_with(".csv") || name.ends_with(".txt") {
            Format::Csv
        } else if name.ends_with(".fits") || name.ends_with(".fit") || name.ends_with(".fits.fz") {
            Format::Fits
        } else if [".nc", ".nc4", ".h5", ".hdf5"]
            .iter()
            .any(|e| name.ends_with(e))
        {
            Format::NetCdf
        } else if name.ends_with(".parquet") || name.ends_with(".pq") {
            Format::Parquet
        } else {
            bail!(
                "{}: unknown catalog format (use .csv, .csv.gz, .fits, .nc, .h5, .hdf5 or \
                 .parquet)",
                path.display()
            )
        })
    }
}

/// Read the named numeric columns (and optionally an integer id column) from a catalog file.
pub fn read_columns(
    path: &Path,
    names: &[&str],
    id_name: Option<&str>,
    hdu: Option<&str>,
) -> Result<Table> {
    read_columns_part(path, names, id_name, hdu, RowPart::ALL)
}

/// [`read_columns`] for the rows of `part` only.
pub fn read_columns_part(
    path: &Path,
    names: &[&str],
    id_name: Option<&str>,
    hdu: Option<&str>,
    part: RowPart,
) -> Result<Table> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let format = Format::of(path)?;
    for n in names {
        if array_column(n)?.1.is_some() && format != Format::NetCdf {
            bail!(
                "{}: column '{n}' names one component of a 2-D dataset, which only HDF5 and \
                 netCDF files have",
                path.display()
            );
        }
    }
    match format {
        Format::Csv => {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            read_csv(BufReader::new(f), path, names, id_name, part)
        }
        Format::CsvGz => {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let dec = flate2::read::MultiGzDecoder::new(BufReader::new(f));
            read_csv(BufReader::new(dec), path, names, id_name, part)
        }
        Format::Fits => read_fits(path, names, id_name, hdu, part),
        Format::NetCdf => read_netcdf(path, names, id_name, part),
        #[cfg(feature = "parquet")]
        // the Parquet decoder panics on some damaged files: an error naming the file instead
        Format::Parquet => crate::data::guard::reading(path, "Parquet catalog", || {
            super::parquet::read_parquet(path, names, id_name, part)
        }),
        #[cfg(not(feature = "parquet"))]
        Format::Parquet => bail!(
            "{}: this dust3d was built without Parquet support (cargo feature \"parquet\", on \
             by default; rebuild without --no-default-features)",
            path.display()
        ),
    }
}

/// A column name and, for one component of a 2-D dataset written `name[:, k]` (as ZGR23's
/// `stellar_params_est[:, 4]`), the index `k` of the component.
///
/// ```
/// use dust3d::data::catalog::array_column;
/// assert_eq!(array_column("stellar_params_est[:, 4]").unwrap(), ("stellar_params_est", Some(4)));
/// assert_eq!(array_column("parallax").unwrap(), ("parallax", None));
/// assert!(array_column("x[4]").is_err());
/// ```
pub fn array_column(spec: &str) -> Result<(&str, Option<usize>)> {
    let Some(open) = spec.find('[') else {
        return Ok((spec, None));
    };
    let inner = spec[open + 1..]
        .strip_suffix(']')
        .and_then(|i| i.trim().strip_prefix(':'))
        .and_then(|i| i.trim().strip_prefix(','))
        .map(str::trim);
    match inner.and_then(|k| k.parse::<usize>().ok()) {
        Some(k) => Ok((spec[..open].trim(), Some(k))),
        None => bail!(
            "column '{spec}': write one component of a 2-D dataset as 'name[:, k]' with k a \
             non-negative integer"
        ),
    }
}

/// A CSV field that does not parse as `expected` ("a number", "an integer").
fn unparsable(
    file: &impl std::fmt::Display,
    row: usize,
    line: u64,
    column: &str,
    field: &str,
    expected: &'static str,
) -> anyhow::Error {
    super::CatalogError::Unparsable {
        file: file.to_string(),
        row: format!("row {} (line {line})", row + 1),
        column: column.to_string(),
        field: field.to_string(),
        expected,
    }
    .into()
}

fn read_csv<R: BufRead>(
    reader: R,
    path: &Path,
    names: &[&str],
    id_name: Option<&str>,
    part: RowPart,
) -> Result<Table> {
    let file = path.display();
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers: Vec<String> = rdr
        .headers()
        .with_context(|| format!("{file}: cannot read the CSV header"))?
        .iter()
        .map(str::to_owned)
        .collect();
    let (idx, id_idx) = positions(path, &headers, names, id_name)?;
    let mut columns = vec![Vec::new(); names.len()];
    let mut ids = id_idx.map(|_| Vec::new());
    let mut lines = Vec::new();
    let mut row_index = Vec::new();
    let mut rec = csv::StringRecord::new();
    for row in 0.. {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => bail!("{file}: row {}: malformed CSV: {e}", row + 1),
        }
        if row % part.size != part.rank {
            continue;
        }
        let line = rec.position().map_or(0, |p| p.line());
        lines.push(line);
        row_index.push(row as u64);
        for (k, &j) in idx.iter().enumerate() {
            let field = rec.get(j).unwrap_or("");
            let v: f64 = field
                .parse()
                .map_err(|_| unparsable(&file, row, line, names[k], field, "a number"))?;
            columns[k].push(v);
        }
        if let (Some(j), Some(ids)) = (id_idx, ids.as_mut()) {
            let field = rec.get(j).unwrap_or("");
            let column = id_name.unwrap_or_default();
            ids.push(
                field
                    .parse()
                    .map_err(|_| unparsable(&file, row, line, column, field, "an integer"))?,
            );
        }
    }
    Ok(Table {
        rows: lines.len(),
        columns,
        source_id: ids,
        lines: Some(lines),
        row_index: (part.size > 1).then_some(row_index),
    })
}

fn read_fits(
    path: &Path,
    names: &[&str],
    id_name: Option<&str>,
    hdu: Option<&str>,
    part: RowPart,
) -> Result<Table> {
    use fitsio::hdu::HduInfo;
    let file = path.display();
    let mut f =
        fitsio::FitsFile::open(path).with_context(|| format!("{file}: cannot open as FITS"))?;
    let table_hdu = match hdu {
        Some(name) => f
            .hdu(name)
            .with_context(|| format!("{file}: no HDU named '{name}'"))?,
        None => {
            let mut found = None;
            for i in 1..1000usize {
                match f.hdu(i) {
                    Ok(h) if matches!(h.info, HduInfo::TableInfo { .. }) => {
                        found = Some(h);
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
            found.ok_or_else(|| anyhow!("{file}: no binary table HDU found"))?
        }
    };
    let (present, rows) = match &table_hdu.info {
        HduInfo::TableInfo {
            column_descriptions,
            num_rows,
        } => (
            column_descriptions
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>(),
            *num_rows,
        ),
        _ => bail!("{file}: HDU {hdu:?} is not a table"),
    };
    let block = part.block(rows);
    let mut columns = Vec::with_capacity(names.len());
    for n in names {
        if !present.iter().any(|p| p == n) {
            return Err(missing(path, n, &present));
        }
        let col: Vec<f64> = if block.is_empty() {
            Vec::new()
        } else {
            table_hdu
                .read_col_range(&mut f, n, &block)
                .with_context(|| format!("{file}: column '{n}' is not numeric"))?
        };
        columns.push(col);
    }
    let source_id = match id_name.filter(|n| present.iter().any(|p| p == n)) {
        Some(_) if block.is_empty() => Some(Vec::new()),
        Some(n) => Some(
            table_hdu
                .read_col_range::<i64>(&mut f, n, &block)
                .with_context(|| format!("{file}: column '{n}' is not an integer column"))?,
        ),
        None => None,
    };
    Ok(Table {
        rows: block.len(),
        columns,
        source_id,
        lines: None,
        row_index: (part.size > 1).then(|| block.map(|r| r as u64).collect()),
    })
}

fn read_netcdf(path: &Path, names: &[&str], id_name: Option<&str>, part: RowPart) -> Result<Table> {
    crate::data::guard::reading(path, "netCDF/HDF5 catalog", || {
        read_netcdf_unguarded(path, names, id_name, part)
    })
}

fn read_netcdf_unguarded(
    path: &Path,
    names: &[&str],
    id_name: Option<&str>,
    part: RowPart,
) -> Result<Table> {
    let file = path.display();
    let nc = netcdf::open(path).with_context(|| format!("{file}: cannot open as netCDF/HDF5"))?;
    let present: Vec<String> = nc.variables().map(|v| v.name()).collect();
    // a 1-D variable, or a 2-D one and the component `[:, k]` of it
    let column = |n: &str| -> Result<(netcdf::Variable<'_>, Option<usize>)> {
        let (name, k) = array_column(n)?;
        let v = nc
            .variable(name)
            .ok_or_else(|| missing(path, name, &present))?;
        let dims = v.dimensions();
        match k {
            None if dims.len() != 1 => bail!(
                "{file}: column '{n}' must be one-dimensional, has {} dimensions (pick one \
                 component with '{n}[:, k]')",
                dims.len()
            ),
            Some(k) if dims.len() != 2 || k >= dims[1].len() => bail!(
                "{file}: column '{n}': '{name}' has shape {:?}, not (rows, > {k})",
                dims.iter().map(|d| d.len()).collect::<Vec<_>>()
            ),
            _ => Ok((v, k)),
        }
    };
    let read_1d = |n: &str| -> Result<netcdf::Variable<'_>> { Ok(column(n)?.0) };
    let len = |n: &str| -> Result<usize> { Ok(column(n)?.0.dimensions()[0].len()) };
    let all_rows = len(names.first().copied().unwrap_or_default())?;
    for n in names {
        let l = len(n)?;
        if l != all_rows {
            bail!(
                "{file}: column '{n}' has {l} rows, column '{}' has {all_rows}",
                names[0]
            );
        }
    }
    let block = part.block(all_rows);
    let mut columns: Vec<Vec<f64>> = Vec::with_capacity(names.len());
    for n in names {
        let vals: Vec<f64> = match column(n)? {
            (v, None) => v.get_values::<f64, _>(block.clone()),
            (v, Some(k)) => v.get_values::<f64, _>((block.clone(), k)),
        }
        .with_context(|| format!("{file}: column '{n}' is not numeric"))?;
        columns.push(vals);
    }
    let source_id = match id_name.filter(|n| present.iter().any(|p| p == n)) {
        Some(n) => Some(
            read_1d(n)?
                .get_values::<i64, _>(block.clone())
                .with_context(|| format!("{file}: column '{n}' is not an integer column"))?,
        ),
        None => None,
    };
    Ok(Table {
        rows: block.len(),
        columns,
        source_id,
        lines: None,
        row_index: (part.size > 1).then(|| block.map(|r| r as u64).collect()),
    })
}

/// All columns of a catalog in file order: core quantities, then extras.
fn named_columns(cat: &Catalog) -> Vec<(&str, &[f64])> {
    let core: [&[f64]; 6] = [
        &cat.l_deg,
        &cat.b_deg,
        &cat.parallax_mas,
        &cat.parallax_error_mas,
        &cat.extinction,
        &cat.extinction_error,
    ];
    let mut out: Vec<(&str, &[f64])> = super::CORE_COLUMNS.iter().copied().zip(core).collect();
    out.extend(cat.extra.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
    out
}

/// Write a catalog atomically in the format given by the extension of `path`.
pub fn write_catalog(cat: &Catalog, path: &Path) -> Result<()> {
    let format = Format::of(path)?;
    if format == Format::Parquet {
        bail!(
            "{}: dust3d reads Parquet catalogs but writes CSV, FITS or netCDF (.csv, .csv.gz, \
             .fits, .nc)",
            path.display()
        );
    }
    write_atomically(path, |tmp| match format {
        Format::Csv => {
            let f = std::fs::File::create(tmp)?;
            write_csv(cat, std::io::BufWriter::new(f))
        }
        Format::CsvGz => {
            let f = std::fs::File::create(tmp)?;
            let enc = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            let mut buf = std::io::BufWriter::new(enc);
            write_csv(cat, &mut buf)?;
            // finish() writes the gzip trailer; a drop would swallow its error
            buf.into_inner().map_err(|e| e.into_error())?.finish()?;
            Ok(())
        }
        Format::Fits => write_fits(cat, tmp),
        Format::NetCdf => write_netcdf(cat, tmp),
        Format::Parquet => bail!("Parquet is read only"),
    })
    .with_context(|| format!("cannot write catalog {}", path.display()))
}

fn write_csv<W: Write>(cat: &Catalog, w: W) -> Result<()> {
    let mut wtr = csv::Writer::from_writer(w);
    let cols = named_columns(cat);
    let mut header = vec!["source_id"];
    header.extend(cols.iter().map(|(n, _)| *n));
    wtr.write_record(&header)?;
    let mut fields: Vec<String> = Vec::with_capacity(header.len());
    for i in 0..cat.len() {
        fields.clear();
        fields.push(cat.source_id[i].to_string());
        // `{}` prints the shortest string that parses back to the same f64
        fields.extend(cols.iter().map(|(_, v)| format!("{}", v[i])));
        wtr.write_record(&fields)?;
    }
    wtr.into_inner().map_err(|e| e.into_error())?.flush()?;
    Ok(())
}

fn write_fits(cat: &Catalog, tmp: &Path) -> Result<()> {
    use fitsio::tables::{ColumnDataType, ColumnDescription};
    let mut f = fitsio::FitsFile::create(tmp).open()?;
    let cols = named_columns(cat);
    let mut descs = vec![ColumnDescription::new("source_id")
        .with_type(ColumnDataType::LongLong)
        .create()?];
    for (n, _) in &cols {
        descs.push(
            ColumnDescription::new(*n)
                .with_type(ColumnDataType::Double)
                .create()?,
        );
    }
    let hdu = f.create_table("CATALOG", &descs)?;
    hdu.write_col(&mut f, "source_id", &cat.source_id)?;
    for (n, v) in &cols {
        hdu.write_col(&mut f, *n, v)?;
    }
    crate::data::table::close_fits(f)
}

fn write_netcdf(cat: &Catalog, tmp: &Path) -> Result<()> {
    let mut nc = netcdf::create(tmp)?;
    nc.add_dimension("star", cat.len())?;
    nc.add_attribute("title", "dust3d star catalog")?;
    let mut id = nc.add_variable::<i64>("source_id", &["star"])?;
    id.put_values(&cat.source_id, ..)?;
    for (n, v) in named_columns(cat) {
        let mut var = nc.add_variable::<f64>(n, &["star"])?;
        var.put_values(v, ..)?;
    }
    Ok(nc.close()?)
}
