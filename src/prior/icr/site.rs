//! The arithmetic of one ICR site, in explicit vectors of the instruction set present: the
//! products of a site matrix with the inputs of several pixels (the forward) and its 35 row
//! dots with a cotangent (the adjoint). Every path sums in the same order as the scalar
//! definition, so results are bit-identical whatever the instruction set (tested below).

use super::matrices::SITE_LEN;

/// A matrix entry type: site matrices are read as f64 (an f32 site is widened first, or
/// four entries at a time where they are loaded).
pub(super) trait MatEntry: Copy + Into<f64> + Sync {
    /// Room for one widened site (nothing for f64).
    type Buf;
    /// An empty [`Self::Buf`].
    fn buf() -> Self::Buf;
    /// The site's entries as f64, widened into `buf` if need be.
    fn site_f64<'a>(site: &'a [Self], buf: &'a mut Self::Buf) -> &'a [f64];
    /// Four entries from `q[at..]` as f64 (exact: an f32 widens without rounding).
    #[inline(always)]
    fn widen4(q: &[Self], at: usize) -> [f64; 4] {
        let q: &[Self; 4] = q[at..at + 4].try_into().expect("four entries");
        q.map(Into::into)
    }
}

impl MatEntry for f64 {
    type Buf = ();
    #[inline(always)]
    fn buf() {}
    #[inline(always)]
    fn site_f64<'a>(site: &'a [f64], _: &'a mut ()) -> &'a [f64] {
        site
    }
}

impl MatEntry for f32 {
    type Buf = [f64; SITE_LEN];
    #[inline(always)]
    fn buf() -> Self::Buf {
        [0.0; SITE_LEN]
    }
    #[inline(always)]
    fn site_f64<'a>(site: &'a [f32], buf: &'a mut Self::Buf) -> &'a [f64] {
        for (b, &m) in buf.iter_mut().zip(site) {
            *b = f64::from(m);
        }
        buf
    }
}

/// Asks the cache for the lines of `s` ahead of their use (a hint, no effect on results;
/// nothing where the target has no prefetch instruction).
#[inline(always)]
pub(super) fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(s);
        let p = s.as_ptr().cast::<i8>();
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing and cannot fault; the address is within `s`
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// [`prefetch`] of the first `n` values of `s` (all of them if it is shorter).
#[inline(always)]
pub(super) fn prefetch_head<T>(s: &[T], n: usize) {
    prefetch(&s[..n.min(s.len())]);
}

/// The products of one site matrix `m` with the inputs `v` of `G` pixels, each summed over
/// its 35 rows in row order (as one pixel alone would be), as explicit vectors of the
/// dispatched instruction set: a site's 8 outputs are `8 / lanes` vectors, each row is loaded
/// once for all pixels, and the pixels' chains of additions are independent, so they overlap
/// in the pipeline where one chain alone waits on the latency of each add.
#[inline(always)]
pub(super) fn sites_shared<S: pulp::Simd, const G: usize>(
    simd: S,
    m: &[f64],
    v: &[[f64; 35]; G],
    out: &mut [[f64; 8]; G],
) {
    let nv = 8 / S::F64_LANES;
    let rows = S::as_simd_f64s(m).0;
    let zero = simd.splat_f64s(0.0);
    let mut acc = [[zero; 8]; G];
    for k in 0..35 {
        for i in 0..nv {
            let r = rows[k * nv + i];
            for s in 0..G {
                let t = simd.mul_f64s(r, simd.splat_f64s(v[s][k]));
                acc[s][i] = simd.add_f64s(acc[s][i], t);
            }
        }
    }
    for s in 0..G {
        let (o, _) = S::as_mut_simd_f64s(&mut out[s]);
        o.copy_from_slice(&acc[s][..nv]);
    }
}

/// The 35 row dots `Σ_o R[k][o] g[o]` of one site of the adjoint, each summed in the tree
/// `((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7))` of its products `p_o`, so that every
/// instruction set gives the same bits.
pub(super) trait SiteDots: Copy + Send + Sync {
    /// Runs `f` compiled for this instruction set.
    fn run<R>(self, f: impl FnOnce() -> R) -> R;
    /// Row dots of the site matrix `m` (f64, or f32 read as f64) with `g` into `r[..35]`.
    fn dots<T: MatEntry>(self, m: &[T], g: &[f64; 8], r: &mut [f64; 36]);
}

/// Row dots one row at a time, for any instruction set.
#[derive(Clone, Copy)]
pub(super) struct Portable;

impl SiteDots for Portable {
    #[inline(always)]
    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        f()
    }
    #[inline(always)]
    fn dots<T: MatEntry>(self, m: &[T], g: &[f64; 8], r: &mut [f64; 36]) {
        for (k, rk) in r.iter_mut().take(35).enumerate() {
            let p: [f64; 8] = std::array::from_fn(|o| m[k * 8 + o].into() * g[o]);
            *rk = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use core::arch::x86_64::__m256d;
    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    /// Row dots four rows at a time with AVX2: per row the products' halves are added
    /// lane-wise (p_o + p_{o+4}), then a 4×4 transpose by half-swaps and horizontal adds
    /// finishes the tree of four rows at once.
    #[derive(Clone, Copy)]
    pub(crate) struct Dots(pub(crate) V3);

    impl super::SiteDots for Dots {
        #[inline(always)]
        fn run<R>(self, f: impl FnOnce() -> R) -> R {
            self.0.vectorize(f)
        }
        #[inline(always)]
        fn dots<T: super::MatEntry>(self, m: &[T], g: &[f64; 8], r: &mut [f64; 36]) {
            let (avx, avx2) = (self.0.avx, self.0.avx2);
            let gl: __m256d = cast([g[0], g[1], g[2], g[3]]);
            let gh: __m256d = cast([g[4], g[5], g[6], g[7]]);
            // rows k and k + 1 … k + 3 (a missing row 35 reads row 34 again); an f32 row
            // widens as it is loaded, so the matrices cross the memory bus at their stored
            // size and no widened copy is written per pixel
            let half_sum = |k: usize| -> __m256d {
                let k = k.min(34);
                let lo = avx._mm256_mul_pd(cast(T::widen4(m, 8 * k)), gl);
                let hi = avx._mm256_mul_pd(cast(T::widen4(m, 8 * k + 4)), gh);
                avx._mm256_add_pd(lo, hi)
            };
            for (b, out) in r.chunks_exact_mut(4).enumerate() {
                let q: [__m256d; 4] = std::array::from_fn(|i| half_sum(4 * b + i));
                // [q0₀ + q0₂, q0₁ + q0₃, q1₀ + q1₂, q1₁ + q1₃] and the same for rows 2, 3
                let t01 = avx._mm256_add_pd(
                    avx._mm256_permute2f128_pd::<0x20>(q[0], q[1]),
                    avx._mm256_permute2f128_pd::<0x31>(q[0], q[1]),
                );
                let t23 = avx._mm256_add_pd(
                    avx._mm256_permute2f128_pd::<0x20>(q[2], q[3]),
                    avx._mm256_permute2f128_pd::<0x31>(q[2], q[3]),
                );
                // horizontal adds give rows [0, 2, 1, 3]; put them in order
                let h = avx._mm256_hadd_pd(t01, t23);
                let v: [f64; 4] = cast(avx2._mm256_permute4x64_pd::<0b11_01_10_00>(h));
                out.copy_from_slice(&v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::simd::{dispatch, WithSimd};
    use rand::Rng;
    use rand_distr::StandardNormal;

    /// Values of all magnitudes and both zeros, so that any change of summation order or
    /// fusing of a product into an add would show in the last bits.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut r = crate::base::rng::stream(seed, 7);
        (0..n)
            .map(|i| match i % 11 {
                3 => -0.0,
                7 => 0.0,
                _ => r.sample::<f64, _>(StandardNormal) * 10f64.powi(r.random_range(-8..8)),
            })
            .collect()
    }

    /// One pixel's products in the scalar definition: rows summed in order from 0.
    fn site_scalar(m: &[f64], v: &[f64; 35]) -> [f64; 8] {
        let mut acc = [0.0f64; 8];
        for k in 0..35 {
            for o in 0..8 {
                acc[o] += m[k * 8 + o] * v[k];
            }
        }
        acc
    }

    struct Shared<'a, const G: usize>(&'a [f64], &'a [[f64; 35]; G]);
    impl<const G: usize> WithSimd for Shared<'_, G> {
        type Output = [[f64; 8]; G];
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) -> Self::Output {
            let mut out = [[0.0; 8]; G];
            sites_shared(simd, self.0, self.1, &mut out);
            out
        }
    }

    fn check_shared<const G: usize>(seed: u64) {
        let m = values(SITE_LEN, seed);
        let v: [[f64; 35]; G] =
            std::array::from_fn(|s| values(35, seed + 10 + s as u64).try_into().unwrap());
        let got = dispatch(Shared(&m, &v));
        for s in 0..G {
            let want = site_scalar(&m, &v[s]);
            for o in 0..8 {
                assert_eq!(
                    got[s][o].to_bits(),
                    want[o].to_bits(),
                    "G {G} pixel {s} out {o}"
                );
            }
        }
    }

    #[test]
    fn the_scalar_fallback_of_the_shared_products_gives_the_same_bits() {
        // the build without vector units runs the same code with one lane per vector
        for seed in 0..10 {
            let m = values(SITE_LEN, 300 + seed);
            let v: [[f64; 35]; 3] =
                std::array::from_fn(|s| values(35, 400 + seed + s as u64).try_into().unwrap());
            let mut got = [[0.0; 8]; 3];
            sites_shared(pulp::Scalar::new(), &m, &v, &mut got);
            for s in 0..3 {
                let want = site_scalar(&m, &v[s]);
                assert!(got[s]
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn shared_site_products_equal_the_scalar_sums_bit_for_bit() {
        for seed in 0..20 {
            check_shared::<1>(seed);
            check_shared::<2>(seed);
            check_shared::<3>(seed);
            check_shared::<4>(seed);
        }
    }

    #[test]
    fn row_dots_of_f32_sites_equal_those_of_the_widened_site() {
        for seed in 0..20 {
            let m32: Vec<f32> = values(SITE_LEN, 500 + seed)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let m64: Vec<f64> = m32.iter().map(|&v| f64::from(v)).collect();
            let g: [f64; 8] = values(8, 600 + seed).try_into().unwrap();
            let (mut want, mut got) = ([0.0; 36], [0.0; 36]);
            Portable.dots(&m64, &g, &mut want);
            Portable.dots(&m32, &g, &mut got);
            assert!(want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            #[cfg(target_arch = "x86_64")]
            if let Some(v3) = pulp::x86::V3::try_new() {
                let d = avx2::Dots(v3);
                d.run(|| d.dots(&m32, &g, &mut got));
                for k in 0..35 {
                    assert_eq!(got[k].to_bits(), want[k].to_bits(), "seed {seed} row {k}");
                }
            }
        }
    }

    #[test]
    fn row_dots_of_every_instruction_set_equal_the_portable_tree() {
        for seed in 0..50 {
            let m = values(SITE_LEN, 100 + seed);
            let g: [f64; 8] = values(8, 200 + seed).try_into().unwrap();
            let mut want = [0.0; 36];
            Portable.dots(&m, &g, &mut want);
            // the tree itself, written out for row 0
            let p: [f64; 8] = std::array::from_fn(|o| m[o] * g[o]);
            let tree = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
            assert_eq!(want[0].to_bits(), tree.to_bits());
            #[cfg(target_arch = "x86_64")]
            if let Some(v3) = pulp::x86::V3::try_new() {
                let mut got = [0.0; 36];
                avx2::Dots(v3).run(|| avx2::Dots(v3).dots(&m, &g, &mut got));
                for k in 0..35 {
                    assert_eq!(got[k].to_bits(), want[k].to_bits(), "seed {seed} row {k}");
                }
            }
        }
    }
}
