//! Small shared helpers.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Wall-clock time accumulated over timed sections (seconds), from any thread: the
/// per-phase timings of an iteration.
#[derive(Debug, Default)]
pub struct Stopwatch(AtomicU64);

impl Stopwatch {
    /// Runs `f`, adding its wall-clock time.
    pub fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(ns, Ordering::Relaxed);
        r
    }

    /// The time accumulated so far, seconds.
    pub fn seconds(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// Elements per rayon task of element-wise vector updates (axpy, masks, sums of gradients):
/// each element is computed alone, so the split changes no result, and at this length a
/// task's work outweighs its scheduling.
pub(crate) const PAR_MIN_LEN: usize = 1 << 14;

/// `dst ← src` on the rayon pool, `dst` resized to `src` (its allocation reused): the copies
/// of parameter-sized vectors (133 MB on W2) would otherwise run on one thread.
pub(crate) fn par_copy(dst: &mut Vec<f64>, src: &[f64]) {
    use rayon::prelude::*;
    dst.resize(src.len(), 0.0);
    dst.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(src)
        .for_each(|(d, s)| *d = *s);
}

/// `v ← 0` on the rayon pool.
pub(crate) fn par_zero(v: &mut [f64]) {
    use rayon::prelude::*;
    v.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .for_each(|x| *x = 0.0);
}

/// `out ← out + v` on the rayon pool (a metric's identity part added to its likelihood part).
pub(crate) fn par_add(out: &mut [f64], v: &[f64]) {
    use rayon::prelude::*;
    out.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(v)
        .for_each(|(o, x)| *o += x);
}

/// Whether `a == b` element by element (the same length, no NaN), compared on the rayon pool.
pub(crate) fn par_equal(a: &[f64], b: &[f64]) -> bool {
    use rayon::prelude::*;
    a.len() == b.len()
        && a.par_iter()
            .with_min_len(PAR_MIN_LEN)
            .zip(b)
            .all(|(x, y)| x == y)
}

/// A mutable slice handed to parallel workers that write provably disjoint chunks of it.
pub(crate) struct DisjointMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: workers only access disjoint chunks (see `chunk`), so sharing the pointer is sound.
unsafe impl<T: Send> Sync for DisjointMut<T> {}
unsafe impl<T: Send> Send for DisjointMut<T> {}

impl<T> DisjointMut<T> {
    pub(crate) fn new(s: &mut [T]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// No two live chunks may overlap.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn chunk(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "chunk out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

/// Σ of `g` over fixed consecutive ranges covering 0..n, in parallel, the ranges' sums added
/// in order: a result that does not depend on the number of threads.
pub(crate) fn det_sum_ranges(n: usize, g: impl Fn(Range<usize>) -> f64 + Sync) -> f64 {
    use rayon::prelude::*;
    const CHUNK: usize = 8192;
    let parts: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| g(c * CHUNK..((c + 1) * CHUNK).min(n)))
        .collect();
    parts.iter().sum()
}

/// Σ f(i) over `range` in [`SUM_LANES`] interleaved partial sums (i ≡ k mod 8 relative to
/// the start in sum k, the leftover tail in a ninth) added in a fixed tree: a fixed order,
/// like a plain sum, but eight additions in flight instead of one, so a long sum runs at
/// the speed of its loads rather than of the adder's latency.
#[inline]
pub(crate) fn lane_sum(range: Range<usize>, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0; SUM_LANES];
    let full = range.start + range.len() / SUM_LANES * SUM_LANES;
    for i in (range.start..full).step_by(SUM_LANES) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(i + k);
        }
    }
    let tail: f64 = (full..range.end).map(f).sum();
    lanes_total(acc, tail)
}

/// Σ a_i b_i, bit for bit [`lane_sum`] of the products, over slices (no index checks, so
/// the compiler vectorises it).
#[inline]
pub(crate) fn lane_dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let mut acc = [0.0; SUM_LANES];
    let (ca, cb) = (a.chunks_exact(SUM_LANES), b.chunks_exact(SUM_LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..SUM_LANES {
            acc[k] += x[k] * y[k];
        }
    }
    lanes_total(acc, tail)
}

/// [`lane_sum`]'s partial sums and tail added in its fixed tree.
#[inline(always)]
fn lanes_total(acc: [f64; SUM_LANES], tail: f64) -> f64 {
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    (((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))) + tail
}

/// Partial sums of [`lane_sum`].
const SUM_LANES: usize = 8;

/// Element-wise mean and standard deviation (1/N) over samples.
pub(crate) fn mean_std(samples: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let n = samples.len() as f64;
    let len = samples.first().map_or(0, Vec::len);
    let mut mean = vec![0.0; len];
    let mut var = vec![0.0; len];
    for s in samples {
        for (m, v) in mean.iter_mut().zip(s) {
            *m += v / n;
        }
    }
    for s in samples {
        for ((q, v), m) in var.iter_mut().zip(s).zip(&mean) {
            *q += (v - m).powi(2) / n;
        }
    }
    (mean, var.into_iter().map(f64::sqrt).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copies_compare_and_zero_element_by_element() {
        let src: Vec<f64> = (0..100_000).map(|i| (i as f64).sin()).collect();
        let mut dst = Vec::with_capacity(src.len());
        let at = dst.as_ptr();
        par_copy(&mut dst, &src);
        assert!(
            par_equal(&dst, &src) && dst.as_ptr() == at,
            "copied in place"
        );
        dst[77_777] = f64::NAN;
        assert!(!par_equal(&dst, &src) && !par_equal(&src[1..], &src[..src.len() - 1]));
        assert!(!par_equal(&dst, &dst), "NaN equals nothing");
        par_zero(&mut dst);
        assert!(dst.iter().all(|v| *v == 0.0) && dst.len() == src.len());
    }

    #[test]
    fn lane_sums_are_one_fixed_order_and_close_to_the_exact_sum() {
        // integers times a power of two: every partial sum is exact, so each order gives
        // the exact total; the random values then compare the two forms bit for bit
        let ints: Vec<f64> = (0..1003).map(|i| ((i * 37) % 101) as f64 * 0.25).collect();
        let exact: f64 = (0..1003).map(|i| ((i * 37) % 101) as f64).sum::<f64>() * 0.25;
        assert_eq!(lane_sum(0..ints.len(), |i| ints[i]), exact);
        let a: Vec<f64> = (0..1003).map(|i| (i as f64 * 0.7).sin()).collect();
        let b: Vec<f64> = (0..1003).map(|i| (i as f64 * 1.3).cos()).collect();
        for r in [0..0, 0..5, 3..11, 0..1003, 17..1000] {
            let by_index = lane_sum(r.clone(), |i| a[i] * b[i]);
            let by_slice = lane_dot(&a[r.clone()], &b[r.clone()]);
            assert_eq!(by_index.to_bits(), by_slice.to_bits(), "{r:?}");
            let plain: f64 = r.clone().map(|i| a[i] * b[i]).sum();
            assert!((by_index - plain).abs() <= 1e-13, "{r:?}");
        }
        let n = 3 * 8192 + 5;
        let c: Vec<f64> = (0..n).map(|i| (i as f64).sqrt()).collect();
        let by_ranges = det_sum_ranges(n, |r| lane_dot(&c[r.clone()], &c[r]));
        let by_index = det_sum_ranges(n, |r| lane_sum(r, |i| c[i] * c[i]));
        assert_eq!(by_ranges.to_bits(), by_index.to_bits());
    }

    #[test]
    fn a_stopwatch_adds_up_its_sections_from_several_threads() {
        let w = Stopwatch::default();
        let pause = std::time::Duration::from_millis(20);
        assert_eq!(w.time(|| 2 + 2), 4);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| w.time(|| std::thread::sleep(pause)));
            }
        });
        // two sleeps of 20 ms, each at least that long; a loaded machine may add more
        assert!(w.seconds() >= 0.040, "{}", w.seconds());
        assert!(w.seconds() < 10.0, "{}", w.seconds());
    }
}
