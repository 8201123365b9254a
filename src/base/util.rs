//! Small shared helpers.

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

/// Σ f(i) for i in 0..n, in parallel over fixed chunks summed in a fixed order, so the
/// result does not depend on the number of threads.
pub(crate) fn det_sum(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    use rayon::prelude::*;
    const CHUNK: usize = 8192;
    let parts: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| (c * CHUNK..((c + 1) * CHUNK).min(n)).map(&f).sum())
        .collect();
    parts.iter().sum()
}

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
}
