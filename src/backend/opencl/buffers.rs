//! Device scalars and buffers: the host ↔ device conversion of the two precisions and the
//! allocation of device buffers, shared by the ICR, the likelihood stages and the exchanges.

use anyhow::{Context, Result};
use ocl::{Buffer, OclPrm};

use super::Gpu;

/// Host ↔ device scalar conversion.
pub trait Real: OclPrm {
    /// From f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// To f64.
    fn to_f64(self) -> f64;
}

impl Real for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl Real for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

/// A device buffer holding a copy of `data` (one zero when `data` is empty).
pub(crate) fn buffer<T: Real>(gpu: &Gpu, data: &[T]) -> Result<Buffer<T>> {
    let one = [T::default()];
    let data = if data.is_empty() { &one[..] } else { data };
    Buffer::builder()
        .queue(gpu.queue.clone())
        .len(data.len())
        .copy_host_slice(data)
        .build()
        .context("cannot allocate an OpenCL buffer")
}

/// A device buffer of `len` zeros (at least one).
pub(crate) fn zeros<T: Real>(gpu: &Gpu, len: usize) -> Result<Buffer<T>> {
    Buffer::builder()
        .queue(gpu.queue.clone())
        .len(len.max(1))
        .fill_val(T::default())
        .build()
        .context("cannot allocate an OpenCL buffer")
}
