//! The star response (paper eqs. 14–16, docs/model.md): per pixel, each star's parallax-
//! marginalised mean extinction ā and its variance σ_a² from its window over the shells
//! ([`super::windows`]), with JVP and VJP.
//!
//! Within-shell convention: a star in shell k sees `c̃ = C_{k−1} + ρ_k Δr_k f`, where
//! `C_{k−1}` is the column to the shell's inner edge and `f` is the star's mean fractional
//! position inside the shell under its own distance distribution (not the midpoint). Then ā
//! is the exact expectation of the extinction of the piecewise-constant ρ, which tends to the
//! exact integral to the star's distance as σ_ω → 0. The second moment adds the spread
//! inside the shell, `ρ_k² Δr_k² h` with `h` the variance of the fractional position, so ā
//! and σ_a² are the exact first two moments of the extinction of a piecewise-constant ρ
//! under the star's distance distribution.

use super::lanes::{self, tangent_terms, Entries, Lanes, LanesOp, LANES};
use super::windows::{Window, F_SCALE, H_SCALE};

/// Inner columns `cum[k] = Σ_{k' < k} rw[k']` (n + 1 values, the total last) of a column
/// given as `rw[k] = ρ_k Δr_k` (extinction across shell k).
///
/// ```
/// use dust3d::likelihood::response::inner_columns;
/// let mut cum = [0.0; 4];
/// inner_columns(&[0.1, 0.2, 0.3], &mut cum);
/// assert_eq!(cum, [0.0, 0.1, 0.1 + 0.2, 0.1 + 0.2 + 0.3]);
/// ```
pub fn inner_columns(rw: &[f64], cum: &mut [f64]) {
    let mut acc = 0.0;
    for k in 0..rw.len() {
        cum[k] = acc;
        acc += rw[k];
    }
    cum[rw.len()] = acc;
}

/// The window positions `jl..jh` that are kept shells (shell of `jl` is `k0`), and whether
/// the last position is the "beyond" bin.
#[inline]
fn split(e0: usize, len: usize, n: usize) -> (usize, usize, usize, bool) {
    let jl = usize::from(e0 == 0);
    let jh = len.min((n + 1).saturating_sub(e0));
    let k0 = (e0 + jl).saturating_sub(1);
    (jl, jh.max(jl), k0, e0 + len == n + 2)
}

/// ā and σ_a² of one star from its pixel's `rw = ρ Δr` and inner columns `cum`, in the
/// extinction units of `rw` (and their square).
///
/// A star with a very precise parallax sees the integral out to its distance:
///
/// ```
/// use dust3d::likelihood::response::{inner_columns, star_moments};
/// use dust3d::likelihood::windows::Windows;
/// use dust3d::sphere::grid::Shells;
/// let shells = Shells::log_uniform(50.0, 800.0, 20).unwrap();
/// let rw: Vec<f64> = shells.widths_pc().iter().map(|w| 2e-3 * w).collect(); // ρ = 2e-3 / pc
/// let mut cum = vec![0.0; rw.len() + 1];
/// inner_columns(&rw, &mut cum);
/// // a star at 250 pc (parallax 4 mas ± 0.001 mas)
/// let windows = Windows::new(&shells, &[4.0], &[0.001]);
/// let (abar, var) = star_moments(windows.of(0), &rw, &cum);
/// assert!((abar - 2e-3 * (250.0 - 50.0)).abs() < 1e-3);
/// assert!(var >= 0.0 && var < 1e-6);
/// ```
pub fn star_moments(win: Window<'_>, rw: &[f64], cum: &[f64]) -> (f64, f64) {
    struct Op<'a>(Window<'a>, &'a [f64], &'a [f64]);
    impl LanesOp for Op<'_> {
        type Output = (f64, f64);
        #[inline(always)]
        fn with_lanes<L: Lanes>(self, lanes: L) -> (f64, f64) {
            moments(lanes, self.0, self.1, self.2)
        }
    }
    lanes::dispatch(Op(win, rw, cum))
}

/// Tangent (δā, δσ_a²) of one star for a tangent `drw` of its column (`dcum` its columns).
pub fn star_jvp(
    win: Window<'_>,
    rw: &[f64],
    drw: &[f64],
    cum: &[f64],
    dcum: &[f64],
    abar: f64,
) -> (f64, f64) {
    struct Op<'a>(Window<'a>, [&'a [f64]; 2], [&'a [f64]; 2], f64);
    impl LanesOp for Op<'_> {
        type Output = (f64, f64);
        #[inline(always)]
        fn with_lanes<L: Lanes>(self, lanes: L) -> (f64, f64) {
            jvp(lanes, self.0, self.1, self.2, self.3)
        }
    }
    lanes::dispatch(Op(win, [rw, cum], [drw, dcum], abar))
}

/// Accumulate the cotangent of one star (`ga` on ā, `gv` on σ_a²) into its pixel's
/// cotangents of `rw` and of the inner columns (folded by [`finish_vjp`]).
#[allow(clippy::too_many_arguments)]
pub fn star_vjp(
    win: Window<'_>,
    rw: &[f64],
    cum: &[f64],
    abar: f64,
    ga: f64,
    gv: f64,
    rw_bar: &mut [f64],
    cum_bar: &mut [f64],
) {
    struct Op<'a, 'b>(
        Window<'a>,
        [&'a [f64]; 2],
        f64,
        [f64; 2],
        [&'b mut [f64]; 2],
    );
    impl LanesOp for Op<'_, '_> {
        type Output = ();
        #[inline(always)]
        fn with_lanes<L: Lanes>(self, _: L) {
            vjp(self.0, self.1, self.2, self.3, self.4)
        }
    }
    lanes::dispatch(Op(win, [rw, cum], abar, [ga, gv], [rw_bar, cum_bar]))
}

/// The entries of a window that fall on kept shells (all of one length), where they start
/// and whether the window ends in the "beyond the grid" bin.
pub(super) struct Kept<'a> {
    pub p: &'a [f32],
    pub f: &'a [u16],
    pub h: &'a [u16],
    /// First kept shell.
    pub k0: usize,
    /// Whether the window's last bin is the "beyond the grid" bin.
    pub beyond: bool,
}

impl Kept<'_> {
    /// The kept shells the entries fall on, to slice a column with.
    #[inline(always)]
    pub(super) fn shells(&self) -> std::ops::Range<usize> {
        self.k0..self.k0 + self.p.len()
    }

    /// The number of entries and the number in whole groups of [`LANES`].
    #[inline(always)]
    fn groups(&self) -> (usize, usize) {
        let len = self.p.len();
        (len, len - len % LANES)
    }

    /// The group of entries from `j` on.
    #[inline(always)]
    pub(super) fn entries(&self, j: usize) -> Entries<'_> {
        Entries {
            p: group(self.p, j),
            f: group(self.f, j),
            h: group(self.h, j),
        }
    }
}

/// The [`LANES`] values of `v` from `j` on.
#[inline(always)]
fn group<T>(v: &[T], j: usize) -> &[T; LANES] {
    v[j..j + LANES].try_into().expect("a whole group")
}

#[inline(always)]
pub(super) fn kept<'a>(win: &Window<'a>, n: usize) -> Kept<'a> {
    let (jl, jh, k0, beyond) = split(win.e0, win.prob.len(), n);
    Kept {
        p: &win.prob[jl..jh],
        f: &win.frac[jl..jh],
        h: &win.spread[jl..jh],
        k0,
        beyond,
    }
}

/// [`star_moments`] with the given lanes, without a dispatch of its own: for loops over many
/// stars inside one [`lanes::dispatch`] (inlined, so compiled for its instruction set).
#[inline(always)]
pub(super) fn moments<L: Lanes>(lanes: L, win: Window<'_>, rw: &[f64], cum: &[f64]) -> (f64, f64) {
    // ā = Σ p c̃ and m = Σ p (c̃² + r² h) are the tangent sums of a tangent equal to the
    // column itself, term for term the same operations
    let [(a, m)] = window_sums(lanes, &win, [rw, cum], [[rw, cum]]);
    (a, m - win.kappa * a * a)
}

/// [`star_jvp`] with the given lanes, without a dispatch of its own (as [`moments`]): the
/// column and its inner columns in `col`, their tangents in `tan`.
#[inline(always)]
pub(super) fn jvp<L: Lanes>(
    lanes: L,
    win: Window<'_>,
    col: [&[f64]; 2],
    tan: [&[f64]; 2],
    abar: f64,
) -> (f64, f64) {
    jvps(lanes, win, col, [tan], abar)[0]
}

/// [`jvp`] for `N` tangents of the same column in one walk of the window (its entries and
/// the column read once): each tangent's the bits of [`jvp`] on its own.
#[inline(always)]
pub(super) fn jvps<L: Lanes, const N: usize>(
    lanes: L,
    win: Window<'_>,
    col: [&[f64]; 2],
    tans: [[&[f64]; 2]; N],
    abar: f64,
) -> [(f64, f64); N] {
    window_sums(lanes, &win, col, tans).map(|(da, dm)| (da, 2.0 * dm - 2.0 * win.kappa * abar * da))
}

/// The window sums `(Σ p δc̃, Σ p (c̃ δc̃ + r δr h))` of one star for a column and its inner
/// columns `col` and each of their tangents `tans`, the "beyond the grid" bin included: whole
/// groups of [`LANES`] entries through `lanes`, the last, shorter group lane by lane.
#[inline(always)]
fn window_sums<L: Lanes, const N: usize>(
    lanes: L,
    win: &Window<'_>,
    [rw, cum]: [&[f64]; 2],
    tans: [[&[f64]; 2]; N],
) -> [(f64, f64); N] {
    let n = rw.len();
    let k = kept(win, n);
    let kr = k.shells();
    let (r, c) = (&rw[kr.clone()], &cum[kr.clone()]);
    let d = tans.map(|[drw, dcum]| [&drw[kr.clone()], &dcum[kr.clone()]]);
    let mut acc = [lanes.zero(); N];
    let (len, full) = k.groups();
    for j in (0..full).step_by(LANES) {
        let col = [group(r, j), group(c, j)];
        for t in 0..N {
            let tan = [group(d[t][0], j), group(d[t][1], j)];
            lanes.tangents(&mut acc[t], k.entries(j), col, tan);
        }
    }
    let mut out = [(0.0, 0.0); N];
    for t in 0..N {
        let mut sums = lanes.sums(acc[t]);
        let [dr, dc] = d[t];
        for (l, j) in (full..len).enumerate() {
            let t = tangent_terms(k.p[j], k.f[j], k.h[j], [r[j], c[j]], [dr[j], dc[j]]);
            sums.add_lane(l, t);
        }
        let (mut x, mut y) = sums.totals();
        if k.beyond {
            let (pj, dcum) = (win.prob[win.prob.len() - 1] as f64, tans[t][1]);
            x += pj * dcum[n];
            y += pj * cum[n] * dcum[n];
        }
        out[t] = (x, y);
    }
    out
}

/// [`star_vjp`] without a dispatch of its own (as [`moments`]; an element-wise loop, which
/// the compiler vectorises): cotangents `[ga, gv]` on ā and σ_a², accumulated into
/// `[rw_bar, cum_bar]`.
#[inline(always)]
pub(super) fn vjp(
    win: Window<'_>,
    [rw, cum]: [&[f64]; 2],
    abar: f64,
    [ga, gv]: [f64; 2],
    [rw_bar, cum_bar]: [&mut [f64]; 2],
) {
    let n = rw.len();
    let k = kept(&win, n);
    let kr = k.shells();
    let base = ga - 2.0 * gv * win.kappa * abar;
    let entries = k.p.iter().zip(k.f).zip(k.h);
    let col = rw[kr.clone()].iter().zip(&cum[kr.clone()]);
    let bars = rw_bar[kr.clone()].iter_mut().zip(&mut cum_bar[kr]);
    for ((((&pj, &fj), &hj), (&r, &c0)), (rb, cb)) in entries.zip(col).zip(bars) {
        let e = cotangent_entry(pj, fj, hj, [r, c0]);
        let (dc, dr) = e.terms(base, gv);
        *cb += dc;
        *rb += dr;
    }
    if k.beyond {
        let pj = win.prob[win.prob.len() - 1] as f64;
        cum_bar[n] += pj * (base + 2.0 * gv * cum[n]);
    }
}

/// [`vjp`] for two cotangents of the same star in one element-wise loop over its window (each
/// entry converted and its column read once for both), each into its own `bars` with the bits
/// of [`vjp`] on its own.
#[inline(always)]
pub(super) fn vjp_pair(
    win: Window<'_>,
    [rw, cum]: [&[f64]; 2],
    abar: f64,
    [[ga0, gv0], [ga1, gv1]]: [[f64; 2]; 2],
    [[rw0, cum0], [rw1, cum1]]: [[&mut [f64]; 2]; 2],
) {
    let n = rw.len();
    let k = kept(&win, n);
    let kr = k.shells();
    let base0 = ga0 - 2.0 * gv0 * win.kappa * abar;
    let base1 = ga1 - 2.0 * gv1 * win.kappa * abar;
    let entries = k.p.iter().zip(k.f).zip(k.h);
    let col = rw[kr.clone()].iter().zip(&cum[kr.clone()]);
    let b0 = rw0[kr.clone()].iter_mut().zip(&mut cum0[kr.clone()]);
    let b1 = rw1[kr.clone()].iter_mut().zip(&mut cum1[kr]);
    for ((((&pj, &fj), &hj), (&r, &c0)), ((rb0, cb0), (rb1, cb1))) in
        entries.zip(col).zip(b0.zip(b1))
    {
        let e = cotangent_entry(pj, fj, hj, [r, c0]);
        let ((dc0, dr0), (dc1, dr1)) = (e.terms(base0, gv0), e.terms(base1, gv1));
        (*cb0, *rb0, *cb1, *rb1) = (*cb0 + dc0, *rb0 + dr0, *cb1 + dc1, *rb1 + dr1);
    }
    if k.beyond {
        let pj = win.prob[win.prob.len() - 1] as f64;
        cum0[n] += pj * (base0 + 2.0 * gv0 * cum[n]);
        cum1[n] += pj * (base1 + 2.0 * gv1 * cum[n]);
    }
}

/// One window entry as the VJP reads it: its probability, mean position and position
/// variance as f64, the column `r` at its shell and the inner column `c` at the star's
/// position in it.
struct CotangentEntry {
    p: f64,
    f: f64,
    h: f64,
    r: f64,
    c: f64,
}

#[inline(always)]
fn cotangent_entry(p: f32, f: u16, h: u16, [r, c0]: [f64; 2]) -> CotangentEntry {
    let (p, f) = (p as f64, f as f64 * F_SCALE);
    CotangentEntry {
        p,
        f,
        h: h as f64 * H_SCALE,
        r,
        c: r.mul_add(f, c0),
    }
}

impl CotangentEntry {
    /// The entry's additions to the cotangents of the inner column and of the column for a
    /// star's `base` = g_a − 2 g_v κ ā and `gv` = g_v (multiply-adds fused, as in
    /// [`lanes::tangent_terms`]).
    #[inline(always)]
    fn terms(&self, base: f64, gv: f64) -> (f64, f64) {
        let w = self.p * (2.0 * gv).mul_add(self.c, base);
        (w, w.mul_add(self.f, 2.0 * gv * self.p * self.r * self.h))
    }
}

/// Fold the inner-column cotangents into `rw_bar`: `rw_k` enters every `cum[k']`, k' > k.
pub fn finish_vjp(cum_bar: &[f64], rw_bar: &mut [f64]) {
    let n = rw_bar.len();
    let mut acc = cum_bar[n];
    for k in (0..n).rev() {
        rw_bar[k] += acc;
        acc += cum_bar[k];
    }
}

#[cfg(test)]
mod tests {
    use super::super::lanes::Portable;
    use super::*;
    use crate::likelihood::windows::Windows;
    use crate::sphere::grid::Shells;

    #[test]
    fn a_small_parallax_error_gives_the_exact_integral() {
        let (shells, w) = crate::likelihood::windows::six_stars();
        // σ_ω → 0: ā is the exact integral of the piecewise-constant ρ to d = 1 kpc
        let rho: Vec<f64> = (0..64)
            .map(|k| 1e-3 * (1.0 + (k as f64 * 0.3).sin()))
            .collect();
        let rw: Vec<f64> = rho
            .iter()
            .zip(shells.widths_pc())
            .map(|(r, w)| r * w)
            .collect();
        let mut cum = vec![0.0; 65];
        inner_columns(&rw, &mut cum);
        let (a, var) = star_moments(w.of(5), &rw, &cum);
        let exact = crate::sphere::grid::integrate_to(&shells, |k| rho[k], 1000.0);
        assert!((a - exact).abs() < 1e-6 * exact, "{a} vs {exact}");
        assert!(var.abs() < 1e-9, "var {var}");
    }

    /// The walks compiled for the widest instruction set give the baseline build's bits.
    #[test]
    fn dispatched_walks_equal_the_baseline_build() {
        let shells = Shells::log_uniform(40.0, 2000.0, 97).unwrap();
        let par: Vec<f64> = (0..60).map(|i| 0.4 + 0.11 * i as f64).collect();
        let err: Vec<f64> = (0..60).map(|i| 0.01 + 0.013 * (i % 7) as f64).collect();
        let w = Windows::new(&shells, &par, &err);
        let n = shells.len();
        let rw: Vec<f64> = (0..n).map(|k| 0.3 + (k as f64 * 0.7).sin().abs()).collect();
        let drw: Vec<f64> = (0..n).map(|k| (k as f64 * 1.3).cos()).collect();
        let (mut cum, mut dcum) = (vec![0.0; n + 1], vec![0.0; n + 1]);
        inner_columns(&rw, &mut cum);
        inner_columns(&drw, &mut dcum);
        let (mut rb, mut cb) = (vec![0.0; n], vec![0.0; n + 1]);
        let (mut rb0, mut cb0) = (vec![0.0; n], vec![0.0; n + 1]);
        // the kernels called here directly, with the portable lanes, are compiled for the
        // baseline only
        for i in 0..par.len() {
            let win = w.of(i);
            let (rw, cum) = (&rw[..], &cum[..]);
            let m = star_moments(win, rw, cum);
            assert_eq!(m, moments(Portable, win, rw, cum), "star {i}");
            let t = star_jvp(win, rw, &drw, cum, &dcum, m.0);
            let baseline = jvp(Portable, win, [rw, cum], [&drw, &dcum], m.0);
            assert_eq!(t, baseline, "star {i}");
            star_vjp(win, rw, cum, m.0, 0.7, -0.2, &mut rb, &mut cb);
            vjp(win, [rw, cum], m.0, [0.7, -0.2], [&mut rb0, &mut cb0]);
        }
        assert_eq!((rb, cb), (rb0, cb0));
        println!("dispatched to {}", crate::base::simd::describe());
    }

    /// σ_a² is the spread about ā under the stored (f32) probabilities, whose sum differs
    /// from 1 by their rounding: not negative beyond the rounding of ā², even where the
    /// columns reach thousands of magnitudes (as in a fresh fit's first samples).
    #[test]
    fn distance_variance_is_centred_for_rounded_windows() {
        let shells = crate::sphere::grid::Shells::log_uniform(40.0, 2000.0, 64).unwrap();
        // stars about the grid's outer edge (1.4–3.3 kpc), parallaxes of 7 to 25 % precision
        let par: Vec<f64> = (0..40).map(|i| 0.3 + 0.01 * i as f64).collect();
        let err: Vec<f64> = (0..40).map(|i| 0.02 + 0.004 * i as f64).collect();
        let w = Windows::new(&shells, &par, &err);
        // a column of 6,000 mag, nearly all of it in the innermost shell
        let mut rw = vec![1e-6; 64];
        rw[0] = 6000.0;
        let mut cum = vec![0.0; 65];
        inner_columns(&rw, &mut cum);
        let mut off_one = 0;
        for i in 0..par.len() {
            let Window {
                e0,
                prob: p,
                frac: f,
                spread: h,
                ..
            } = w.of(i);
            let total: f64 = p.iter().map(|&v| f64::from(v)).sum();
            off_one += usize::from(total != 1.0);
            let (a, var) = star_moments(w.of(i), &rw, &cum);
            // the same spread, entry by entry about ā (the near bin sees no dust)
            let (jl, jh, k0, beyond) = split(e0, p.len(), rw.len());
            let mut direct: f64 = p[..jl].iter().map(|&q| f64::from(q) * a * a).sum();
            for (j, k) in (jl..jh).zip(k0..) {
                let c = cum[k] + rw[k] * f64::from(f[j]) * F_SCALE;
                let spread = rw[k] * rw[k] * f64::from(h[j]) * H_SCALE;
                direct += f64::from(p[j]) * ((c - a) * (c - a) + spread);
            }
            if beyond {
                direct += f64::from(p[p.len() - 1]) * (cum[64] - a) * (cum[64] - a);
            }
            // one-pass moments round at ~1e-16 ā² (here 4e-9 mag²); the rounded window sum
            // alone used to add ±1e-8 ā² (0.4 mag²)
            assert!(var >= -1e-15 * a * a, "star {i}: σ_a² = {var}");
            assert!(
                (var - direct).abs() <= 1e-12 * a * a,
                "star {i}: {var} vs {direct}"
            );
        }
        // the case this guards: windows whose rounded probabilities do not sum to 1
        assert!(off_one > 0);
    }
}
