//! The entries of x that a global iteration holds fixed. Stages with fewer ICR levels run on
//! their own chart's model, so only single entries are ever held: the scale, while it is
//! updated in its own factor. The mask is therefore a short list of held indices, and the
//! free entries — all the excitations — are passed through without a copy (a dense mask of
//! ones cost up to three parameter-sized passes per metric product: 6–8 % of a W1 MGVI
//! iteration).

use rayon::prelude::*;

use crate::base::util::PAR_MIN_LEN;

/// The held (fixed) entries of x; every other entry is free. Held entries are multiplied
/// out of every tangent, cotangent and sample, so an iteration leaves them where they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mask {
    /// Held indices, ascending, without repeats.
    held: Vec<usize>,
}

impl Mask {
    /// Every entry free.
    ///
    /// ```
    /// use dust3d::likelihood::mask::Mask;
    /// assert!(Mask::all_free().held().is_empty());
    /// ```
    pub fn all_free() -> Self {
        Self::default()
    }

    /// The entries `indices` held, the others free.
    ///
    /// ```
    /// use dust3d::likelihood::mask::Mask;
    /// let m = Mask::holding([7, 2, 7]);
    /// assert_eq!(m.held(), &[2, 7]);
    /// assert_eq!((m.factor(2), m.factor(3)), (0.0, 1.0));
    /// ```
    pub fn holding(indices: impl IntoIterator<Item = usize>) -> Self {
        let mut held: Vec<usize> = indices.into_iter().collect();
        held.sort_unstable();
        held.dedup();
        Self { held }
    }

    /// This mask with entry `i` held as well.
    pub fn with_held(&self, i: usize) -> Self {
        Self::holding(self.held.iter().copied().chain([i]))
    }

    /// The held indices, ascending.
    pub fn held(&self) -> &[usize] {
        &self.held
    }

    /// Whether entry `i` is free.
    pub fn is_free(&self, i: usize) -> bool {
        self.held.binary_search(&i).is_err()
    }

    /// 1 for a free entry, 0 for a held one.
    pub fn factor(&self, i: usize) -> f64 {
        if self.is_free(i) {
            1.0
        } else {
            0.0
        }
    }

    /// Number of free entries among the first `n`.
    pub fn free_below(&self, n: usize) -> usize {
        n - self.held.partition_point(|&h| h < n)
    }

    /// The held indices below `n`.
    fn held_below(&self, n: usize) -> &[usize] {
        &self.held[..self.held.partition_point(|&h| h < n)]
    }

    /// `v ← v ∘ mask`: each held entry multiplied by 0 (as a dense mask of zeros and ones
    /// would, signs of zero included); the free ones untouched.
    pub fn apply(&self, v: &mut [f64]) {
        for &h in self.held_below(v.len()) {
            v[h] *= 0.0;
        }
    }

    /// A gradient's held entries set to zero (+0; NaN where the entry is not finite, as a
    /// dense mask's `0 · g + 0` gives), the free ones untouched.
    ///
    /// ```
    /// use dust3d::likelihood::mask::Mask;
    /// let mut g = [1.5, -2.0, f64::INFINITY];
    /// Mask::holding([1, 2]).zero_held(&mut g);
    /// assert_eq!(g[..2], [1.5, 0.0]);
    /// assert!(g[1].is_sign_positive() && g[2].is_nan());
    /// ```
    pub fn zero_held(&self, g: &mut [f64]) {
        for &h in self.held_below(g.len()) {
            g[h] = 0.0 * g[h] + 0.0;
        }
    }

    /// `v ∘ mask`: `v` itself when no entry of it is held, else a copy in `scratch` with the
    /// held entries multiplied by 0.
    pub fn masked<'a>(&self, v: &'a [f64], scratch: &'a mut Vec<f64>) -> &'a [f64] {
        if self.held_below(v.len()).is_empty() {
            return v;
        }
        scratch.clear();
        scratch.par_extend(v.par_iter().with_min_len(PAR_MIN_LEN).copied());
        self.apply(scratch);
        scratch
    }

    /// This mask as dense factors over `n` entries (for a device that applies it itself).
    pub fn dense(&self, n: usize) -> Vec<f64> {
        let mut d = vec![1.0; n];
        self.apply(&mut d);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dense mask each method stands for.
    fn dense_of(m: &Mask, n: usize) -> Vec<f64> {
        (0..n).map(|i| m.factor(i)).collect()
    }

    #[test]
    fn held_entries_become_zero_and_free_ones_stay() {
        let m = Mask::holding([1, 9]);
        let v = [1.5, -2.0, 3.0];
        let mut scratch = Vec::new();
        assert_eq!(m.masked(&v, &mut scratch), [1.5, -0.0, 3.0]);
        assert!(m.masked(&v, &mut scratch)[1].is_sign_negative());
        // nothing held within v: v itself, no copy
        let free = Mask::holding([3]);
        assert!(std::ptr::eq(free.masked(&v, &mut scratch), &v[..]));
        let mut w = v;
        m.apply(&mut w);
        assert_eq!(w, [1.5, 0.0, 3.0]);
        assert_eq!(m.free_below(3), 2);
        assert_eq!(m.free_below(10), 8);
        assert_eq!(m.dense(3), [1.0, 0.0, 1.0]);
        assert_eq!(m.with_held(0).held(), &[0, 1, 9]);
    }

    /// A metric's likelihood part masked, then its identity added (as CG adds it): the bits
    /// of a dense mask, `mask ∘ out + v`.
    #[test]
    fn masked_then_identity_gives_the_dense_masks_bits() {
        let m = Mask::holding([0, 3]);
        let v = [0.25, -1.0, 3.5, -0.0, 1e-300];
        let o = [2.0, -0.0, 1e300, -7.0, -1e-300];
        let mut got = o;
        m.apply(&mut got);
        got.iter_mut().zip(&v).for_each(|(g, vi)| *g += vi);
        let want: Vec<f64> = dense_of(&m, 5)
            .iter()
            .zip(o.iter().zip(&v))
            .map(|(mi, (oi, vi))| mi * oi + vi)
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.to_bits(), w.to_bits());
        }
    }
}
