//! The free-entry mask of a schedule stage: 1 for the entries of x a stage updates, 0 for
//! those it holds (ICR levels beyond the stage's). Held entries are multiplied out of every
//! tangent, cotangent and sample, so a stage moves only its free entries.

use rayon::prelude::*;

use crate::base::util::PAR_MIN_LEN;

/// `v ∘ mask` into `dst` (resized to the shorter of the two; no allocation once `dst` is
/// large enough).
pub fn masked_copy(dst: &mut Vec<f64>, v: &[f64], mask: &[f64]) {
    dst.resize(v.len().min(mask.len()), 0.0);
    dst.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(v.par_iter().zip(mask))
        .for_each(|(d, (a, m))| *d = a * m);
}

/// `v ← v ∘ mask`.
pub fn mask_in_place(v: &mut [f64], mask: &[f64]) {
    v.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(mask)
        .for_each(|(a, m)| *a *= m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_entries_become_zero_and_free_ones_stay() {
        let (v, mask) = ([1.5, -2.0, 3.0], [1.0, 0.0, 1.0]);
        let mut dst = vec![9.0; 7];
        masked_copy(&mut dst, &v, &mask);
        assert_eq!(dst, [1.5, 0.0, 3.0]);
        let mut w = v;
        mask_in_place(&mut w, &mask);
        assert_eq!(w, [1.5, 0.0, 3.0]);
    }
}
