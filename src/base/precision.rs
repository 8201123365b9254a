//! Floating-point precision of stored matrices and device arithmetic.

use serde::{Deserialize, Serialize};

/// Floating-point precision: of the ICR refinement matrices (`grid.matrix_precision`) and
/// of OpenCL arithmetic (`backend.precision`, `--device-precision`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 64-bit IEEE double (on OpenCL devices: needs `cl_khr_fp64`).
    #[default]
    F64,
    /// 32-bit IEEE single: relative error ~1e-7 per stored value, ~1e-6 per operation.
    F32,
}

impl Precision {
    /// Bytes of one value in this precision.
    ///
    /// ```
    /// use dust3d::base::precision::Precision;
    /// assert_eq!(Precision::F64.bytes() + Precision::F32.bytes(), 12);
    /// ```
    pub fn bytes(self) -> usize {
        match self {
            Precision::F64 => 8,
            Precision::F32 => 4,
        }
    }
}
