//! What a column reader returns: the requested columns of one reader's rows, and which rows
//! a reader takes when several ranks share a file.

use std::path::Path;

/// Requested columns as read from a file, before validation.
pub struct Table {
    /// Number of rows.
    pub rows: usize,
    /// One vector per requested column, in request order.
    pub columns: Vec<Vec<f64>>,
    /// The id column if requested and present.
    pub source_id: Option<Vec<i64>>,
    /// Text line of each row (CSV only), for error messages.
    pub lines: Option<Vec<u64>>,
    /// File row (0-based) of each row read, when only part of the rows was read.
    pub row_index: Option<Vec<u64>>,
}

impl Table {
    /// "row N" (1-based data row), with the text line where known.
    pub fn row_label(&self, i: usize) -> String {
        let row = self.row_index.as_ref().map_or(i as u64, |r| r[i]) + 1;
        match &self.lines {
            Some(l) => format!("row {row} (line {})", l[i]),
            None => format!("row {row}"),
        }
    }
}

/// Which rows of a file one reader takes: part `rank` of `size` (contiguous blocks for
/// FITS and netCDF, every `size`-th row for CSV, which cannot be entered mid-file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowPart {
    /// This reader.
    pub rank: usize,
    /// Number of readers.
    pub size: usize,
}

impl RowPart {
    /// All rows.
    pub const ALL: RowPart = RowPart { rank: 0, size: 1 };

    /// The contiguous block of `rows` rows this part reads.
    pub(super) fn block(&self, rows: usize) -> std::ops::Range<usize> {
        rows * self.rank / self.size..rows * (self.rank + 1) / self.size
    }
}

/// The error for a column `name` absent from `path`, listing the columns present.
pub(super) fn missing(path: &Path, name: &str, present: &[String]) -> anyhow::Error {
    super::CatalogError::MissingColumn {
        file: path.display().to_string(),
        column: name.to_string(),
        present: present.to_vec(),
    }
    .into()
}

/// Positions of the requested columns among those `present` in `path` (an error naming the
/// first one absent), and of the id column when it is there.
pub(super) fn positions(
    path: &Path,
    present: &[String],
    names: &[&str],
    id_name: Option<&str>,
) -> anyhow::Result<(Vec<usize>, Option<usize>)> {
    let index = |n: &str| present.iter().position(|p| p == n);
    let wanted = names
        .iter()
        .map(|n| index(n).ok_or_else(|| missing(path, n, present)))
        .collect::<anyhow::Result<_>>()?;
    Ok((wanted, id_name.and_then(index)))
}
