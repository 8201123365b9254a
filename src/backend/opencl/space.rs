//! Vectors on the OpenCL device for the generic CG of [`crate::num::cg::solve_in`]: dot
//! products in the CPU's patch order (so device CG equals host CG over the device
//! operator), axpy-type updates as kernels. Only scalars and chunk sums cross the bus.

use anyhow::Result;
use ocl::Buffer;

use super::buffers::Real;
use super::model::{zeros_q, Inner, DOT_CHUNK};

/// Device vectors for [`crate::num::cg::solve_in`]; the first error is kept (and the CG then
/// finishes on garbage that the caller discards).
pub(super) struct DeviceSpace<'a, T: Real> {
    inner: &'a Inner<T>,
    n: usize,
    err: Option<anyhow::Error>,
    /// Whether the solve starts from zero on every rank (the one vector CG asks about).
    zero_start: bool,
}

impl<'a, T: Real> DeviceSpace<'a, T> {
    /// Vectors of length `n` on `inner`'s queue.
    pub(super) fn new(inner: &'a Inner<T>, n: usize) -> Self {
        Self {
            inner,
            n,
            err: None,
            zero_start: false,
        }
    }

    /// Tells CG that its start vector is zero on every rank (known on the host before the
    /// upload), so that it skips the product with it.
    pub(super) fn with_zero_start(self, zero_start: bool) -> Self {
        Self { zero_start, ..self }
    }

    /// The first error met, if any.
    pub(super) fn into_error(self) -> Option<anyhow::Error> {
        self.err
    }

    fn run(&mut self, r: Result<()>) {
        if let (Err(e), None) = (r, &self.err) {
            self.err = Some(e);
        }
    }
}

impl<T: Real> crate::num::cg::CgSpace for DeviceSpace<'_, T> {
    type V = Buffer<T>;
    fn clone_of(&mut self, x: &Buffer<T>) -> Buffer<T> {
        match zeros_q::<T>(&self.inner.queue, self.n) {
            Ok(y) => {
                let r = x.copy(&y, None, None).enq().map_err(Into::into);
                self.run(r);
                y
            }
            Err(e) => {
                // the error ends the solve; the CG finishes on an alias that is discarded
                self.run(Err(e));
                x.clone()
            }
        }
    }
    fn is_zero(&mut self, _start: &Buffer<T>) -> bool {
        self.zero_start
    }
    fn dot(&mut self, x: &Buffer<T>, y: &Buffer<T>) -> f64 {
        let nc = self.n.div_ceil(DOT_CHUNK);
        let inner = self.inner;
        if let Some((_, seg, off, nparts)) = inner.dot_layouts.iter().find(|l| l.0 == self.n) {
            let r = (|| -> Result<f64> {
                Inner::<T>::enq(
                    inner
                        .vkernel("dot_segments", *nparts)
                        .arg(*nparts as u64)
                        .arg(seg)
                        .arg(off)
                        .arg(x)
                        .arg(y)
                        .arg(&inner.chunk),
                )?;
                let mut h = vec![T::default(); *nparts];
                inner.chunk.read(&mut h).enq()?;
                // the replicated part, then the patches in order (as VecLayout::sum)
                let parts: Vec<[f64; 1]> = h[1..].iter().map(|v| [v.to_f64()]).collect();
                Ok(inner.global_sum([h[0].to_f64()], &parts)?[0])
            })();
            return r.unwrap_or_else(|e| {
                self.run(Err(e));
                f64::NAN
            });
        }
        let r = (|| -> Result<f64> {
            anyhow::ensure!(
                inner.decomp.size() == 1,
                "no patch layout for device vectors of length {} under MPI",
                self.n
            );
            Inner::<T>::enq(
                inner
                    .vkernel("dot_partials", nc)
                    .arg(self.n as u64)
                    .arg(x)
                    .arg(y)
                    .arg(&inner.chunk),
            )?;
            let mut h = vec![T::default(); nc];
            inner.chunk.read(&mut h).enq()?;
            Ok(h.iter().fold(0.0, |a, v| a + v.to_f64()))
        })();
        match r {
            Ok(v) => v,
            Err(e) => {
                self.run(Err(e));
                f64::NAN
            }
        }
    }
    fn axpy(&mut self, a: f64, x: &Buffer<T>, y: &mut Buffer<T>) {
        let r = Inner::<T>::enq(
            self.inner
                .vkernel("axpy", self.n)
                .arg(self.n as u64)
                .arg(T::from_f64(a))
                .arg(x)
                .arg(&*y),
        );
        self.run(r);
    }
    fn xpay(&mut self, x: &Buffer<T>, b: f64, y: &mut Buffer<T>) {
        let r = Inner::<T>::enq(
            self.inner
                .vkernel("xpay", self.n)
                .arg(self.n as u64)
                .arg(x)
                .arg(T::from_f64(b))
                .arg(&*y),
        );
        self.run(r);
    }
    fn sub(&mut self, b: &Buffer<T>, ap: &Buffer<T>, r: &mut Buffer<T>) {
        let res = Inner::<T>::enq(
            self.inner
                .vkernel("sub", self.n)
                .arg(self.n as u64)
                .arg(b)
                .arg(ap)
                .arg(&*r),
        );
        self.run(res);
    }
    fn zero(&mut self, x: &mut Buffer<T>) {
        let r = x.cmd().fill(T::default(), None).enq().map_err(Into::into);
        self.run(r);
    }
}
