//! The exponential of many f64 at once, in a form the compiler vectorises.
//!
//! glibc's `exp` is a call per value: the per-voxel densities ρ = exp(s) of a whole map cost
//! a tenth of a value-and-gradient evaluation through it. [`exp`] reduces x = n ln 2 + r
//! (|r| ≤ ln 2 / 2, Cody–Waite with a two-part ln 2), sums the Taylor series of e^r to the
//! 13th power (truncation below 2⁻⁵⁸ relative) by Estrin's scheme and scales by 2ⁿ through
//! the exponent bits. It has no branches and no table, so [`exp_in_place`] runs it on four
//! values per instruction with AVX2 and FMA, two with NEON; measured against glibc it is
//! within 1 ulp (unit test). An x86-64 CPU without FMA (before 2013) takes the portable path,
//! where each fused multiply-add is a library call: slower than glibc, the same bits.
//!
//! The arithmetic is IEEE multiplies, adds and fused multiply-adds (each rounded once, by
//! the standard) in a fixed order, so every instruction set, and the scalar [`exp`], give
//! the same bits.
//! Outside [−708, 709], where 2ⁿ leaves the normal range, the value is glibc's.

use super::simd::{self, WithSimd};

/// Inputs in [`LO`, `HI`] take the polynomial; the rest (subnormal results, overflow,
/// NaN) take glibc's `exp`.
const LO: f64 = -708.0;
/// See [`LO`].
const HI: f64 = 709.0;
/// 1.5 · 2⁵²: adding it rounds x log₂e to an integer, which then sits in the low bits.
const SHIFT: f64 = 6_755_399_441_055_744.0;
/// ln 2 to 32 bits, so that n · `LN2_HI` is exact for |n| < 2²¹.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// ln 2 − `LN2_HI`.
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// 1/k! for k = 13 down to 2 (entry 13 − k is 1/k!).
const INV_FACT: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];
/// Values per block of [`exp_in_place`]: two AVX2 vectors.
const BLOCK: usize = 8;

/// e^x for x in [`LO`, `HI`] by the reduction and series of the module doc.
#[inline(always)]
fn exp_core(x: f64) -> f64 {
    let x = x.clamp(LO, HI);
    let kd = x * std::f64::consts::LOG2_E + SHIFT;
    let n = kd - SHIFT;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    // Estrin's scheme: the terms 1/k! r^(k-2), k = 2..=13, in a tree of depth 4
    let c = |k: usize| INV_FACT[13 - k];
    let (r2, q) = (r * r, |k: usize| c(k + 1).mul_add(r, c(k)));
    let r4 = r2 * r2;
    let s0 = q(4).mul_add(r2, q(2));
    let s1 = q(8).mul_add(r2, q(6));
    let s2 = q(12).mul_add(r2, q(10));
    let p = s2.mul_add(r4 * r4, s1.mul_add(r4, s0));
    let e = p.mul_add(r, 1.0).mul_add(r, 1.0);
    // kd's low bits hold n (two's complement under the shift's leading bits, which the shift
    // by 52 pushes out), so these bits are 2ⁿ for −1022 ≤ n ≤ 1023
    e * f64::from_bits(kd.to_bits().wrapping_add(1023) << 52)
}

/// Whether `x` takes the polynomial (NaN does not).
#[inline(always)]
fn inside(x: f64) -> bool {
    (LO..=HI).contains(&x)
}

/// e^x (see the module doc: the same bits as [`exp_in_place`], within 1 ulp of glibc).
///
/// One value per call through the run-time dispatch: for many values, [`exp_in_place`].
///
/// ```
/// use dust3d::base::vexp::exp;
/// assert_eq!(exp(0.0), 1.0);
/// assert!((exp(1.0) - std::f64::consts::E).abs() <= f64::EPSILON * 3.0);
/// assert_eq!(exp(-1000.0), 0.0);
/// ```
pub fn exp(x: f64) -> f64 {
    struct One(f64);
    impl WithSimd for One {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
            exp_one(self.0)
        }
    }
    simd::dispatch(One(x))
}

/// [`exp`] inside a dispatched body (there the fused multiply-adds are instructions; in a
/// baseline x86-64 build they would be library calls).
#[inline(always)]
fn exp_one(x: f64) -> f64 {
    if inside(x) {
        exp_core(x)
    } else {
        x.exp()
    }
}

/// Replaces every value of `xs` by its exponential, bit for bit as [`exp`] would.
///
/// ```
/// use dust3d::base::vexp::{exp, exp_in_place};
/// let mut xs: Vec<f64> = (0..21).map(|k| k as f64 * 0.37 - 4.0).collect();
/// let want: Vec<f64> = xs.iter().map(|&x| exp(x)).collect();
/// exp_in_place(&mut xs);
/// assert_eq!(xs, want);
/// ```
pub fn exp_in_place(xs: &mut [f64]) {
    simd::dispatch(ExpInPlace(xs))
}

/// [`exp_in_place`]'s body, compiled once per instruction set.
struct ExpInPlace<'a>(&'a mut [f64]);

impl WithSimd for ExpInPlace<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let mut blocks = self.0.chunks_exact_mut(BLOCK);
        for b in &mut blocks {
            let x: [f64; BLOCK] = b.try_into().expect("BLOCK values");
            let mut all = true;
            for (y, &v) in b.iter_mut().zip(&x) {
                all &= inside(v);
                *y = exp_core(v);
            }
            if !all {
                // rare: the block again value by value, as the scalar path takes it
                for (y, &v) in b.iter_mut().zip(&x) {
                    *y = exp_one(v);
                }
            }
        }
        for y in blocks.into_remainder() {
            *y = exp_one(*y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Distance in units in the last place between two finite positive values.
    fn ulps(a: f64, b: f64) -> u64 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn within_one_ulp_of_glibc_over_the_whole_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut worst = 0;
        for k in 0..2_000_000 {
            // half the draws where densities live, half over the whole normal range
            let x = if k % 2 == 0 {
                rng.random_range(-40.0..10.0)
            } else {
                rng.random_range(LO..HI)
            };
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 1, "worst {worst} ulp");
    }

    #[test]
    fn edges_and_specials_match_glibc() {
        for x in [
            LO,
            HI,
            LO - 1e-9,
            HI + 1e-9,
            -745.2,
            -740.0,
            709.7,
            710.0,
            0.0,
            -0.0,
            1e-300,
            -1e-300,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert!(ulps(exp(x), x.exp()) <= 1, "x = {x}");
        }
        assert!(exp(f64::NAN).is_nan());
    }

    #[test]
    fn slices_give_the_scalar_bits_at_every_position() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for len in [0, 1, 7, 8, 9, 31, 64] {
            let mut xs: Vec<f64> = (0..len).map(|_| rng.random_range(-30.0..5.0)).collect();
            if len > 3 {
                // an out-of-range value inside a block takes glibc's path alone
                xs[2] = -800.0;
                xs[3] = f64::NAN;
            }
            let want: Vec<u64> = xs.iter().map(|&x| exp(x).to_bits()).collect();
            exp_in_place(&mut xs);
            let got: Vec<u64> = xs.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "len {len}");
        }
    }
}
