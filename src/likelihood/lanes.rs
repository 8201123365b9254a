//! The per-entry arithmetic of the star walks in explicit vectors: a window's kept shells
//! are taken in groups of [`LANES`] entries, entry `j` adding into lane `j mod LANES`, and the
//! lanes are added pairwise at the end. Independent lanes let a walk run as vector operations
//! instead of one chain of dependent additions; the order is fixed, so a star's sums do not
//! depend on the instruction set (every path below computes the scalar terms' operations, lane
//! by lane: tested), the thread count or the rank count.

use crate::base::simd::{self, WithSimd};

use super::windows::{F_SCALE, H_SCALE};

/// Lanes of the window sums.
pub(super) const LANES: usize = 4;

/// A group of [`LANES`] window entries: probabilities and the quantised position and
/// position variance ([`super::windows::Windows`]).
#[derive(Clone, Copy)]
pub(super) struct Entries<'a> {
    pub p: &'a [f32; LANES],
    pub f: &'a [u16; LANES],
    pub h: &'a [u16; LANES],
}

/// A star's tangent terms `(p δc, p (c δc + r δr h))` of ā and its second moment at one
/// entry, `c` the inner column at the star's mean position in the shell, for the tangents
/// `dr` of the column and `dc0` of its inner columns (with the column itself as tangent,
/// the terms of ā and of its second moment). The three multiply-adds are fused (rounded
/// once): every instruction set computes them so, in hardware where it can (x86-64 with
/// FMA, aarch64), otherwise in software (slower, the same bits), and the walks are bound by
/// their floating-point operations (docs/performance.md).
#[inline(always)]
pub(super) fn tangent_terms(
    p: f32,
    f: u16,
    h: u16,
    [r, c0]: [f64; 2],
    [dr, dc0]: [f64; 2],
) -> (f64, f64) {
    let (p, f) = (f64::from(p), f64::from(f) * F_SCALE);
    let c = r.mul_add(f, c0);
    let dc = dr.mul_add(f, dc0);
    (p * dc, p * c.mul_add(dc, r * dr * (f64::from(h) * H_SCALE)))
}

/// How a walk computes and adds up groups of [`LANES`] terms, for one instruction set.
pub(super) trait Lanes: Copy + Send + Sync {
    /// Two sums in the lane order, held as this instruction set holds them.
    type Acc: Copy;
    /// Both sums zero.
    fn zero(self) -> Self::Acc;
    /// Adds [`tangent_terms`] of a group, for columns `col = [r, c]` and tangents `tan`.
    fn tangents(
        self,
        acc: &mut Self::Acc,
        e: Entries<'_>,
        col: [&[f64; LANES]; 2],
        tan: [&[f64; LANES]; 2],
    );
    /// The sums, lane by lane.
    fn sums(self, acc: Self::Acc) -> LaneSums;
    /// Four states' values side by side, in this instruction set ([`super::quad`]).
    type Quad: QuadOps;
    /// The arithmetic of [`Self::Quad`].
    fn quad(self) -> Self::Quad;
}

/// Element-wise arithmetic on four f64 (one per state of a block of four), as an
/// instruction set holds them: each lane rounds as the scalar operation does.
pub(super) trait QuadOps: Copy {
    /// Four values.
    type V: Copy;
    /// The values of `q`.
    fn load(self, q: &[f64; 4]) -> Self::V;
    /// Writes `v` to `q`.
    fn store(self, q: &mut [f64; 4], v: Self::V);
    /// `x` in every lane.
    fn splat(self, x: f64) -> Self::V;
    /// Lane-wise sum.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise product.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise quotient.
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise a·b + c, rounded once (as `f64::mul_add`).
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// A window entry's probability, fractional position and its variance, as f64 in every
    /// lane (the conversions of [`tangent_terms`]).
    #[inline(always)]
    fn entry(self, p: f32, f: u16, h: u16) -> [Self::V; 3] {
        [
            self.splat(f64::from(p)),
            self.splat(f64::from(f) * F_SCALE),
            self.splat(f64::from(h) * H_SCALE),
        ]
    }
    /// [`QuadOps::entry`] of each entry of a group (`[entry][p, f, h]`).
    #[inline(always)]
    fn group(self, e: Entries<'_>) -> [[Self::V; 3]; LANES] {
        [0, 1, 2, 3].map(|l| self.entry(e.p[l], e.f[l], e.h[l]))
    }
}

/// [`QuadOps`] lane by lane, for any instruction set.
#[derive(Clone, Copy)]
pub(super) struct PortableQuad;

impl QuadOps for PortableQuad {
    type V = [f64; 4];
    #[inline(always)]
    fn load(self, q: &[f64; 4]) -> [f64; 4] {
        *q
    }
    #[inline(always)]
    fn store(self, q: &mut [f64; 4], v: [f64; 4]) {
        *q = v;
    }
    #[inline(always)]
    fn splat(self, x: f64) -> [f64; 4] {
        [x; 4]
    }
    #[inline(always)]
    fn add(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        std::array::from_fn(|s| a[s] + b[s])
    }
    #[inline(always)]
    fn mul(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        std::array::from_fn(|s| a[s] * b[s])
    }
    #[inline(always)]
    fn div(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        std::array::from_fn(|s| a[s] / b[s])
    }
    #[inline(always)]
    fn mul_add(self, a: [f64; 4], b: [f64; 4], c: [f64; 4]) -> [f64; 4] {
        std::array::from_fn(|s| a[s].mul_add(b[s], c[s]))
    }
}

/// The terms lane by lane, for any instruction set.
#[derive(Clone, Copy)]
pub(super) struct Portable;

impl Lanes for Portable {
    type Acc = LaneSums;

    #[inline(always)]
    fn zero(self) -> LaneSums {
        LaneSums::ZERO
    }

    #[inline(always)]
    fn tangents(
        self,
        acc: &mut LaneSums,
        e: Entries<'_>,
        [r, c]: [&[f64; LANES]; 2],
        [dr, dc]: [&[f64; LANES]; 2],
    ) {
        for l in 0..LANES {
            let t = tangent_terms(e.p[l], e.f[l], e.h[l], [r[l], c[l]], [dr[l], dc[l]]);
            acc.add_lane(l, t);
        }
    }

    #[inline(always)]
    fn sums(self, acc: LaneSums) -> LaneSums {
        acc
    }

    type Quad = PortableQuad;
    #[inline(always)]
    fn quad(self) -> PortableQuad {
        PortableQuad
    }
}

/// Two sums in the lane order of [`LANES`].
#[derive(Clone, Copy)]
pub(super) struct LaneSums(pub [f64; LANES], pub [f64; LANES]);

impl LaneSums {
    /// Both sums zero.
    pub const ZERO: Self = Self([0.0; LANES], [0.0; LANES]);

    /// Adds the terms of the entry in lane `l`.
    #[inline(always)]
    pub fn add_lane(&mut self, l: usize, (x, y): (f64, f64)) {
        self.0[l] += x;
        self.1[l] += y;
    }

    /// The two totals, lanes added pairwise.
    #[inline(always)]
    pub fn totals(self) -> (f64, f64) {
        let total = |s: [f64; LANES]| (s[0] + s[1]) + (s[2] + s[3]);
        (total(self.0), total(self.1))
    }
}

/// A pass over stars that walks their windows with some [`Lanes`].
pub(super) trait LanesOp {
    /// What the pass returns.
    type Output;
    /// Runs the pass with `lanes`.
    fn with_lanes<L: Lanes>(self, lanes: L) -> Self::Output;
}

/// Runs `op` compiled for the widest instruction set present, with the explicit vectors of
/// that set where there are some ([`avx2::Avx2`]) and the portable lanes otherwise.
#[inline(always)]
pub(super) fn dispatch<Op: LanesOp>(op: Op) -> Op::Output {
    struct WithLanes<Op, L>(Op, L);
    impl<Op: LanesOp, L: Lanes> WithSimd for WithLanes<Op, L> {
        type Output = Op::Output;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> Op::Output {
            self.0.with_lanes(self.1)
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return pulp::Simd::vectorize(v3, WithLanes(op, avx2::Avx2(v3)));
    }
    simd::dispatch(WithLanes(op, Portable))
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use core::arch::x86_64::{__m128, __m128i, __m256d};
    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    use super::{Entries, LaneSums, Lanes, QuadOps, LANES};
    use crate::likelihood::windows::{F_SCALE, H_SCALE};

    /// The terms of four entries at once in AVX2 registers: the same multiplications,
    /// additions and fused multiply-adds as [`super::tangent_terms`], in the same order,
    /// with exact conversions of the stored f32 and u16 values.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(pub(crate) V3);

    impl Avx2 {
        /// The probabilities and scaled positions and variances of a group, as f64.
        #[inline(always)]
        fn entries(self, e: Entries<'_>) -> [__m256d; 3] {
            let (avx, sse41) = (self.0.avx, self.0.sse4_1);
            let widen = |q: &[u16; LANES]| -> __m256d {
                let w: __m128i = cast([q[0], q[1], q[2], q[3], 0, 0, 0, 0]);
                avx._mm256_cvtepi32_pd(sse41._mm_cvtepu16_epi32(w))
            };
            let p: __m128 = cast(*e.p);
            [
                avx._mm256_cvtps_pd(p),
                avx._mm256_mul_pd(widen(e.f), avx._mm256_set1_pd(F_SCALE)),
                avx._mm256_mul_pd(widen(e.h), avx._mm256_set1_pd(H_SCALE)),
            ]
        }
    }

    impl Lanes for Avx2 {
        type Acc = [__m256d; 2];

        #[inline(always)]
        fn zero(self) -> [__m256d; 2] {
            [self.0.avx._mm256_setzero_pd(); 2]
        }

        #[inline(always)]
        fn tangents(
            self,
            acc: &mut [__m256d; 2],
            e: Entries<'_>,
            [r, c]: [&[f64; LANES]; 2],
            [dr, dc]: [&[f64; LANES]; 2],
        ) {
            let avx = self.0.avx;
            let [p, f, h] = self.entries(e);
            let (r, c0): (__m256d, __m256d) = (cast(*r), cast(*c));
            let (dr, dc0): (__m256d, __m256d) = (cast(*dr), cast(*dc));
            let fma = self.0.fma;
            let c = fma._mm256_fmadd_pd(r, f, c0);
            let dc = fma._mm256_fmadd_pd(dr, f, dc0);
            let x = avx._mm256_mul_pd(p, dc);
            let spread = avx._mm256_mul_pd(avx._mm256_mul_pd(r, dr), h);
            let y = avx._mm256_mul_pd(p, fma._mm256_fmadd_pd(c, dc, spread));
            acc[0] = avx._mm256_add_pd(acc[0], x);
            acc[1] = avx._mm256_add_pd(acc[1], y);
        }

        #[inline(always)]
        fn sums(self, [x, y]: [__m256d; 2]) -> LaneSums {
            LaneSums(cast(x), cast(y))
        }

        type Quad = Self;
        #[inline(always)]
        fn quad(self) -> Self {
            self
        }
    }

    impl QuadOps for Avx2 {
        type V = __m256d;
        #[inline(always)]
        fn load(self, q: &[f64; 4]) -> __m256d {
            cast(*q)
        }
        #[inline(always)]
        fn store(self, q: &mut [f64; 4], v: __m256d) {
            *q = cast(v);
        }
        #[inline(always)]
        fn splat(self, x: f64) -> __m256d {
            self.0.avx._mm256_set1_pd(x)
        }
        #[inline(always)]
        fn add(self, a: __m256d, b: __m256d) -> __m256d {
            self.0.avx._mm256_add_pd(a, b)
        }
        #[inline(always)]
        fn mul(self, a: __m256d, b: __m256d) -> __m256d {
            self.0.avx._mm256_mul_pd(a, b)
        }
        #[inline(always)]
        fn div(self, a: __m256d, b: __m256d) -> __m256d {
            self.0.avx._mm256_div_pd(a, b)
        }
        #[inline(always)]
        fn mul_add(self, a: __m256d, b: __m256d, c: __m256d) -> __m256d {
            self.0.fma._mm256_fmadd_pd(a, b, c)
        }
        /// Converted four entries at a time, then each lane broadcast by a permute.
        #[inline(always)]
        fn group(self, e: Entries<'_>) -> [[__m256d; 3]; LANES] {
            let v = self.entries(e);
            [
                self.broadcast::<0b00_00_00_00>(v),
                self.broadcast::<0b01_01_01_01>(v),
                self.broadcast::<0b10_10_10_10>(v),
                self.broadcast::<0b11_11_11_11>(v),
            ]
        }
    }

    impl Avx2 {
        /// Lane `L` (as a permute selector) of each of `v` in every lane.
        #[inline(always)]
        fn broadcast<const L: i32>(self, [p, f, h]: [__m256d; 3]) -> [__m256d; 3] {
            let avx2 = self.0.avx2;
            [
                avx2._mm256_permute4x64_pd::<L>(p),
                avx2._mm256_permute4x64_pd::<L>(f),
                avx2._mm256_permute4x64_pd::<L>(h),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::StandardNormal;

    /// Columns of all magnitudes and both zeros, and window entries over their whole ranges
    /// (u16 extremes included), so that a reordered or fused operation shows in the last bits.
    fn group(
        r: &mut impl Rng,
        i: usize,
    ) -> ([f32; LANES], [u16; LANES], [u16; LANES], [[f64; LANES]; 4]) {
        let mut col = || -> [f64; LANES] {
            std::array::from_fn(|l| match (i + l) % 9 {
                2 => -0.0,
                5 => 0.0,
                _ => r.sample::<f64, _>(StandardNormal) * 10f64.powi(r.random_range(-8..8)),
            })
        };
        let cols = [col(), col(), col(), col()];
        let p = std::array::from_fn(|_| r.random::<f32>());
        let f = std::array::from_fn(|l| match (i + l) % 7 {
            0 => u16::MAX,
            _ => r.random(),
        });
        let h = std::array::from_fn(|l| match (i + l) % 5 {
            0 => 0,
            _ => r.random(),
        });
        (p, f, h, cols)
    }

    /// The moment terms `(p c, p (c² + r² h))` as the response defines them: what the
    /// tangent terms with the column as its own tangent must give, bit for bit.
    fn moment_terms(p: f32, f: u16, h: u16, r: f64, c0: f64) -> (f64, f64) {
        let p = f64::from(p);
        let c = r.mul_add(f64::from(f) * F_SCALE, c0);
        (p * c, p * c.mul_add(c, r * r * (f64::from(h) * H_SCALE)))
    }

    /// The scalar terms, lane by lane, added to zero lane sums (compiled for the baseline).
    fn scalar(e: Entries<'_>, [r, c, dr, dc]: &[[f64; LANES]; 4]) -> [[[f64; LANES]; 2]; 2] {
        let (mut m, mut t) = (LaneSums::ZERO, LaneSums::ZERO);
        for l in 0..LANES {
            m.add_lane(l, moment_terms(e.p[l], e.f[l], e.h[l], r[l], c[l]));
            let tan = tangent_terms(e.p[l], e.f[l], e.h[l], [r[l], c[l]], [dr[l], dc[l]]);
            t.add_lane(l, tan);
        }
        [[m.0, m.1], [t.0, t.1]]
    }

    /// The same sums through [`dispatch`] (explicit AVX2 vectors where the CPU has them).
    struct Dispatched<'a>(Entries<'a>, &'a [[f64; LANES]; 4]);
    impl LanesOp for Dispatched<'_> {
        type Output = [[[f64; LANES]; 2]; 2];
        #[inline(always)]
        fn with_lanes<L: Lanes>(self, lanes: L) -> Self::Output {
            let [r, c, dr, dc] = self.1;
            let (mut m, mut t) = (lanes.zero(), lanes.zero());
            lanes.tangents(&mut m, self.0, [r, c], [r, c]);
            lanes.tangents(&mut t, self.0, [r, c], [dr, dc]);
            let (m, t) = (lanes.sums(m), lanes.sums(t));
            [[m.0, m.1], [t.0, t.1]]
        }
    }

    #[test]
    fn vector_sums_equal_the_scalar_sums_bit_for_bit() {
        let mut r = crate::base::rng::stream(11, 3);
        for i in 0..2000 {
            let (p, f, h, cols) = group(&mut r, i);
            let e = Entries {
                p: &p,
                f: &f,
                h: &h,
            };
            let want = scalar(e, &cols);
            let got = dispatch(Dispatched(e, &cols));
            let bits = |t: [[[f64; LANES]; 2]; 2]| t.map(|u| u.map(|v| v.map(f64::to_bits)));
            assert_eq!(bits(got), bits(want), "group {i}");
        }
    }

    #[test]
    fn lane_sums_keep_the_lane_order() {
        let mut s = LaneSums::ZERO;
        for (l, x) in [1e16, 1.0, 2.0, 3.0].into_iter().enumerate() {
            s.add_lane(l, (x, 0.5));
        }
        for l in 0..LANES {
            s.add_lane(l, (1.0, 0.25));
        }
        s.add_lane(0, (-1e16, 0.25));
        // lane 0: (1e16 + 1) − 1e16 = 0 in f64 (the 1 is lost), lanes 1–3: 2, 3, 4
        assert_eq!(
            s.totals(),
            ((0.0 + 2.0) + (3.0 + 4.0), (1.0 + 0.75) + (0.75 + 0.75))
        );
    }
}
