//! Helpers shared by the integration tests: running the `dust3d` binary and comparing
//! vectors. Each test crate uses a subset of them.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Run the `dust3d` binary of this build with `args`, quiet logging, no HDF5 file locks.
pub fn dust3d(args: &[&str]) -> Output {
    // Tests write netCDF maps in-process while others spawn dust3d: a child can inherit the
    // descriptor, and with it HDF5's exclusive file lock, of a map another thread is
    // writing, and then a reading child of that map's test is refused ("HDF error"). The
    // children read files nobody writes any more, so they need no lock.
    Command::new(env!("CARGO_BIN_EXE_dust3d"))
        .args(args)
        .env("DUST3D_LOG", "warn")
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .expect("run dust3d")
}

/// The standard error of a finished process, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Relative L2 difference |a − b| / |b|.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Euclidean inner product.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
