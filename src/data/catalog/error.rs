//! Errors of catalog reading that a caller may want to branch on: which file, which row
//! and which column went wrong.

/// A catalog that cannot be used, with the place of the problem.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A column the configuration names is not in the file.
    #[error(
        "{file}: missing column '{column}' (columns present: {}); map names in [catalog.columns]",
        present.join(", ")
    )]
    MissingColumn {
        /// The file.
        file: String,
        /// The column asked for.
        column: String,
        /// The columns the file has.
        present: Vec<String>,
    },
    /// A field that does not parse as a number.
    #[error("{file}: {row}, column '{column}': cannot parse {field:?} as {expected}")]
    Unparsable {
        /// The file.
        file: String,
        /// The row, as the file's readers label it (e.g. `row 3001 (line 3002)`).
        row: String,
        /// The column.
        column: String,
        /// The text found.
        field: String,
        /// "a number" or "an integer".
        expected: &'static str,
    },
    /// A value that parses but is not allowed (not finite, an error ≤ 0, |b| > 90°).
    #[error("{file}: {row}, column '{column}': value {value} {problem}")]
    BadValue {
        /// The file.
        file: String,
        /// The row, as the file's readers label it (e.g. `row 17`).
        row: String,
        /// The column.
        column: String,
        /// The value found.
        value: f64,
        /// What is wrong with it.
        problem: &'static str,
    },
}
