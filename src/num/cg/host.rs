//! CG's vectors on the host: this rank's part of each, the caller's right-hand side and
//! solution borrowed, inner products from a [`Space`], and the fused passes (an update and an
//! inner product in one pass over the vectors, with the inner product's bits).

use super::CgSpace;
use crate::base::util::{lane_dot, par_zero, DisjointMut, PAR_MIN_LEN};
use crate::sphere::decomp::Space;
use rayon::prelude::*;
use std::ops::Range;

/// Host vectors (this rank's part), with inner products from a [`Space`].
pub struct Host<'a, 'v>(pub &'a dyn Space, pub std::marker::PhantomData<&'v ()>);

/// A host vector of [`Host`]: one CG allocated, or the caller's right-hand side and
/// solution, borrowed rather than copied (each is parameter-sized: 133 MB on W2).
pub enum HostVec<'v> {
    /// A vector CG allocated.
    Owned(Vec<f64>),
    /// The caller's right-hand side, which CG only reads.
    Ref(&'v [f64]),
    /// The caller's solution vector.
    Mut(&'v mut [f64]),
}

impl std::ops::Deref for HostVec<'_> {
    type Target = [f64];
    fn deref(&self) -> &[f64] {
        match self {
            HostVec::Owned(v) => v,
            HostVec::Ref(v) => v,
            HostVec::Mut(v) => v,
        }
    }
}

impl std::ops::DerefMut for HostVec<'_> {
    fn deref_mut(&mut self) -> &mut [f64] {
        match self {
            HostVec::Owned(v) => v,
            HostVec::Mut(v) => v,
            // `solve_in` takes the right-hand side by shared reference
            HostVec::Ref(_) => unreachable!("CG never writes its right-hand side"),
        }
    }
}

impl Host<'_, '_> {
    /// Σ `pass(y[r], r)` over the ranges `r` of [`Space::range_sum`], `pass` updating its
    /// range of `y` as it sums: an update and an inner product in one pass, with the inner
    /// product's bits. `None`, `y` untouched, where those ranges do not cover `y`.
    fn fused(
        &self,
        y: &mut [f64],
        pass: impl Fn(&mut [f64], Range<usize>) -> f64 + Sync,
    ) -> Option<f64> {
        let n = y.len();
        let out = DisjointMut::new(y);
        self.0.range_sum(n, &|r| {
            // SAFETY: `range_sum` visits each range once, and its ranges are disjoint
            let ys = unsafe { out.chunk(r.start, r.len()) };
            pass(ys, r)
        })
    }
}

impl<'v> CgSpace for Host<'_, 'v> {
    type V = HostVec<'v>;
    fn clone_of(&mut self, x: &HostVec<'v>) -> HostVec<'v> {
        // copied on the pool: a parameter-sized copy (and its pages' first touch) on one
        // thread would be the serial part of every solve
        let mut v = Vec::with_capacity(x.len());
        v.par_extend(x.par_iter().with_min_len(PAR_MIN_LEN).copied());
        HostVec::Owned(v)
    }
    fn dot(&mut self, x: &HostVec<'v>, y: &HostVec<'v>) -> f64 {
        self.0.dot(x, y)
    }
    fn axpy(&mut self, a: f64, x: &HostVec<'v>, y: &mut HostVec<'v>) {
        y.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(&**x)
            .for_each(|(yi, xi)| *yi += a * xi);
    }
    fn xpay(&mut self, x: &HostVec<'v>, b: f64, y: &mut HostVec<'v>) {
        y.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(&**x)
            .for_each(|(yi, xi)| *yi = xi + b * *yi);
    }
    fn sub(&mut self, b: &HostVec<'v>, ap: &HostVec<'v>, r: &mut HostVec<'v>) {
        r.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(b.par_iter().zip(&**ap))
            .for_each(|(ri, (bi, ai))| *ri = bi - ai);
    }
    fn zero(&mut self, x: &mut HostVec<'v>) {
        par_zero(x);
    }
    fn axpy_norm(&mut self, a: f64, x: &HostVec<'v>, y: &mut HostVec<'v>) -> f64 {
        let xs = &**x;
        let fused = self.fused(y, |ys, r| {
            ys.iter_mut().zip(&xs[r]).for_each(|(yi, xi)| *yi += a * xi);
            lane_dot(ys, ys)
        });
        fused.unwrap_or_else(|| {
            self.axpy(a, x, y);
            self.dot(y, y)
        })
    }
    fn add_dot(&mut self, x: &HostVec<'v>, y: &mut HostVec<'v>) -> f64 {
        let xs = &**x;
        let fused = self.fused(y, |ys, r| {
            let xs = &xs[r];
            ys.iter_mut().zip(xs).for_each(|(yi, xi)| *yi += xi);
            lane_dot(xs, ys)
        });
        fused.unwrap_or_else(|| {
            self.axpy(1.0, x, y);
            self.dot(x, y)
        })
    }
    fn step_and_turn(
        &mut self,
        a: f64,
        p: &mut HostVec<'v>,
        x: &mut HostVec<'v>,
        r: &HostVec<'v>,
        b: f64,
    ) {
        x.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(p.par_iter_mut())
            .zip(&**r)
            .for_each(|((xi, pi), ri)| {
                *xi += a * *pi;
                *pi = ri + b * *pi;
            });
    }
    fn is_zero(&mut self, x: &HostVec<'v>) -> bool {
        let here = x.par_iter().with_min_len(PAR_MIN_LEN).all(|v| *v == 0.0);
        self.0.all(here)
    }
}
