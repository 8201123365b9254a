//! The star response (paper eqs. 12–17, docs/model.md): each star's distance distribution
//! (parallax Gaussian in 1/d) over the radial shells, and per pixel the parallax-
//! marginalised mean extinction ā and its variance σ_a², with JVP and VJP.
//!
//! Shells are indexed by an *extended* index `e`: `e = 0` is "nearer than the inner edge"
//! (no dust there, extinction 0), `e = k + 1` is kept shell `k`, `e = n + 1` is "beyond the
//! outer edge" (the whole column; this bin also holds the mass at negative parallax).
//!
//! Within-shell convention: a star in shell k sees `c̃ = C_{k−1} + ρ_k Δr_k f`, where
//! `C_{k−1}` is the column to the shell's inner edge and `f` is the star's mean fractional
//! position inside the shell under its own distance distribution (not the midpoint). Then ā
//! is the exact expectation of the extinction of the piecewise-constant ρ, which tends to the
//! exact integral to the star's distance as σ_ω → 0. The second moment adds the spread
//! inside the shell, `ρ_k² Δr_k² h` with `h` the variance of the fractional position, so ā
//! and σ_a² are the exact first two moments of the extinction of a piecewise-constant ρ
//! under the star's distance distribution.

use rayon::prelude::*;

use super::lanes::{self, tangent_terms, Entries, Lanes, LanesOp, LANES};
use crate::base::util::DisjointMut;
use crate::sphere::grid::Shells;
use crate::sphere::transforms::{norm_cdf, norm_pdf};

/// Half-width of a star's window in units of its parallax error: tails beyond ±5.3σ (mass
/// 6e-8 each) are lumped into the window's end bins, so each window sums to 1.
const Z_WINDOW: f64 = 5.3;

/// Per-star shell windows: probabilities and within-shell positions.
#[derive(Clone, Debug, Default)]
pub struct Windows {
    /// Number of kept shells `n`.
    pub n: usize,
    /// First extended index of each star's window.
    pub start: Vec<u32>,
    /// Star `i` owns entries `offset[i]..offset[i+1]`.
    pub offset: Vec<usize>,
    /// Probability of each extended bin of the window (f32: ā to 1e-7 relative, and the
    /// window data is what the per-star passes stream from memory).
    pub prob: Vec<f32>,
    /// Mean fractional position inside the shell, quantised: f = frac / 65535 (0 for the two
    /// outer bins). 16 bits place a star to 1.5e-5 of a shell width, far below what the data
    /// resolve, and keep the window data (streamed by every pass) at 8 bytes per entry.
    pub frac: Vec<u16>,
    /// Variance of the fractional position (≤ 1/4), quantised: h = spread / (4 · 65535).
    pub spread: Vec<u16>,
    /// Each star's `2 − Σ p` (see [`Window::kappa`]), summed once here so that the per-star
    /// passes do not walk the probabilities a second time for it.
    pub kappa: Vec<f64>,
}

/// One star's first and last extended bin from `(shell edges, ω, σ)`.
pub(super) type WindowRange<'a> = dyn Fn(&[f64], f64, f64) -> (usize, usize) + Sync + 'a;

/// Fills one star's window: `(ω, σ, its extended-bin range, (probabilities, quantised
/// positions, quantised position variances))`.
pub(super) type WindowFill<'a> =
    dyn Fn(f64, f64, (usize, usize), (&mut [f32], &mut [u16], &mut [u16])) + Sync + 'a;

/// One star's window, as the per-star passes read it.
#[derive(Clone, Copy, Debug)]
pub struct Window<'a> {
    /// First extended bin (0: nearer than the first shell).
    pub e0: usize,
    /// Probability of each extended bin from `e0` on.
    pub prob: &'a [f32],
    /// Quantised mean fractional position in each bin ([`Windows::frac`]).
    pub frac: &'a [u16],
    /// Quantised position variance in each bin ([`Windows::spread`]).
    pub spread: &'a [u16],
    /// `2 − Σ prob` over all its bins: 1 up to the f32 rounding of the probabilities.
    /// σ_a² = m − κ ā² is then Σ p (c − ā)² exactly for the stored probabilities (not
    /// negative beyond the rounding of ā²); `m − ā²` carries the spurious (Σ p − 1) ā², a
    /// few 1e-8 ā², which at columns of thousands of magnitudes (a fresh fit's first
    /// samples) outweighs (n_σ σ_A)² and made the variance negative.
    pub kappa: f64,
}

/// Scale of the quantised mean position.
pub(super) const F_SCALE: f64 = 1.0 / 65535.0;
/// Scale of the quantised position variance.
pub(super) const H_SCALE: f64 = 1.0 / (4.0 * 65535.0);

/// A bin's mean fractional position and position variance as stored (u16 on
/// [`F_SCALE`] and [`H_SCALE`]).
pub(super) fn quantised(frac: f64, spread: f64) -> (u16, u16) {
    (
        (frac / F_SCALE).round().clamp(0.0, 65535.0) as u16,
        (spread / H_SCALE).round().clamp(0.0, 65535.0) as u16,
    )
}

/// sf(r) = P(d > r) for parallax ω ± σ (mas), r in pc; and its complement, both accurate.
fn tail_probs(r_pc: f64, parallax: f64, err: f64) -> (f64, f64) {
    if r_pc.is_infinite() {
        return (0.0, 1.0);
    }
    if r_pc <= 0.0 {
        return (1.0, 0.0);
    }
    let z = (1000.0 / r_pc - parallax) / err;
    (norm_cdf(z), norm_cdf(-z))
}

/// Extended bin containing distance `d_pc`.
pub(super) fn extended_bin(edges: &[f64], d_pc: f64) -> usize {
    let n = edges.len() - 1;
    if d_pc < edges[0] {
        0
    } else if d_pc >= edges[n] {
        n + 1
    } else {
        edges.partition_point(|&x| x <= d_pc)
    }
}

/// Gauss–Legendre nodes and weights on [−1, 1], 5 points.
pub(super) const GL5: [(f64, f64); 5] = [
    (0.0, 0.568_888_888_888_888_9),
    (-0.538_469_310_105_683_1, 0.478_628_670_499_366_47),
    (0.538_469_310_105_683_1, 0.478_628_670_499_366_47),
    (-0.906_179_845_938_664, 0.236_926_885_056_189_08),
    (0.906_179_845_938_664, 0.236_926_885_056_189_08),
];

/// Mean and variance of the fractional position in [r_lo, r_hi] of a star with parallax
/// ω ± σ, by quadrature over the parallax variable t = 1000/d (pieces ≤ 1σ wide, 5-point
/// Gauss–Legendre).
fn position_moments(r_lo: f64, r_hi: f64, parallax: f64, err: f64) -> (f32, f32) {
    let z_a = ((1000.0 / r_hi - parallax) / err).max(-8.5);
    let z_b = ((1000.0 / r_lo - parallax) / err).min(8.5);
    if z_b <= z_a {
        // the distribution's bulk is outside the shell: use the nearer edge
        return (
            if (1000.0 / r_hi - parallax) / err > 0.0 {
                0.0
            } else {
                1.0
            },
            0.0,
        );
    }
    let pieces = ((z_b - z_a).ceil() as usize).max(1);
    let h = (z_b - z_a) / pieces as f64;
    let (mut num, mut num2, mut den) = (0.0, 0.0, 0.0);
    for p in 0..pieces {
        let mid = z_a + (p as f64 + 0.5) * h;
        for (x, w) in GL5 {
            let z = mid + 0.5 * h * x;
            let d = 1000.0 / (parallax + err * z);
            let wt = w * norm_pdf(z);
            let x = (d - r_lo) / (r_hi - r_lo);
            num += wt * x;
            num2 += wt * x * x;
            den += wt;
        }
    }
    if den > 0.0 {
        let f = (num / den).clamp(0.0, 1.0);
        (f as f32, (num2 / den - f * f).max(0.0) as f32)
    } else {
        (0.5, 1.0 / 12.0)
    }
}

impl Windows {
    /// Windows of all stars over `shells` with the paper's distance prior (uniform in
    /// parallax), computed in parallel (order of `parallax`); other priors:
    /// [`Windows::with_prior`].
    pub fn new(shells: &Shells, parallax_mas: &[f64], error_mas: &[f64]) -> Self {
        let (edges, n) = (&shells.edges_pc, shells.len());
        let fill: &WindowFill = &|w, s, r, (p, f, h)| Self::fill(edges, n, w, s, r, p, f, h);
        Self::build(shells, parallax_mas, error_mas, &Self::range, fill)
    }

    /// Windows from each star's extended-bin range `range(edges, ω, σ)` and a `fill` of its
    /// probabilities, positions and position variances over that range.
    pub(super) fn build(
        shells: &Shells,
        parallax_mas: &[f64],
        error_mas: &[f64],
        range: &WindowRange<'_>,
        fill: &WindowFill<'_>,
    ) -> Self {
        let edges = &shells.edges_pc;
        let n = shells.len();
        // two passes, so the flat arrays are allocated once at their final size
        let ranges: Vec<(usize, usize)> = parallax_mas
            .par_iter()
            .zip(error_mas)
            .map(|(&w, &s)| range(edges, w, s))
            .collect();
        let mut offset = Vec::with_capacity(ranges.len() + 1);
        offset.push(0);
        for (lo, hi) in &ranges {
            offset.push(offset.last().copied().unwrap_or(0) + hi - lo + 1);
        }
        let total = *offset.last().unwrap_or(&0);
        let (mut prob, mut frac, mut spread) =
            (vec![0f32; total], vec![0u16; total], vec![0u16; total]);
        let (pp, fp, hp) = (
            DisjointMut::new(&mut prob),
            DisjointMut::new(&mut frac),
            DisjointMut::new(&mut spread),
        );
        (0..ranges.len()).into_par_iter().for_each(|i| {
            let len = offset[i + 1] - offset[i];
            // SAFETY: the star ranges `offset[i]..offset[i+1]` are disjoint
            let (p, f, h) = unsafe {
                (
                    pp.chunk(offset[i], len),
                    fp.chunk(offset[i], len),
                    hp.chunk(offset[i], len),
                )
            };
            fill(parallax_mas[i], error_mas[i], ranges[i], (p, f, h));
        });
        let start = ranges.iter().map(|r| r.0 as u32).collect();
        let kappa = offset
            .par_windows(2)
            .map(|o| 2.0 - prob[o[0]..o[1]].iter().map(|&x| f64::from(x)).sum::<f64>())
            .collect();
        Windows {
            n,
            start,
            offset,
            prob,
            frac,
            spread,
            kappa,
        }
    }

    /// First and last extended bin of a star's ±Z_WINDOW σ window.
    fn range(edges: &[f64], w: f64, s: f64) -> (usize, usize) {
        let t_hi = w + Z_WINDOW * s;
        let t_lo = w - Z_WINDOW * s;
        let d_near = if t_hi > 0.0 {
            1000.0 / t_hi
        } else {
            f64::INFINITY
        };
        let d_far = if t_lo > 0.0 {
            1000.0 / t_lo
        } else {
            f64::INFINITY
        };
        (extended_bin(edges, d_near), extended_bin(edges, d_far))
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        edges: &[f64],
        n: usize,
        w: f64,
        s: f64,
        (e_lo, e_hi): (usize, usize),
        prob: &mut [f32],
        frac: &mut [u16],
        spread: &mut [u16],
    ) {
        let lower = |e: usize| if e == 0 { 0.0 } else { edges[e - 1] };
        let upper = |e: usize| if e > n { f64::INFINITY } else { edges[e] };
        for (j, e) in (e_lo..=e_hi).enumerate() {
            // the window's end bins absorb the tails: all mass nearer / farther
            let (sf_lo, cdf_lo) = if e == e_lo {
                (1.0, 0.0)
            } else {
                tail_probs(lower(e), w, s)
            };
            let (sf_hi, cdf_hi) = if e == e_hi {
                (0.0, 1.0)
            } else {
                tail_probs(upper(e), w, s)
            };
            // difference of the smaller-magnitude representation, for precision in the tails
            let p = if sf_lo < 0.5 {
                sf_lo - sf_hi
            } else {
                cdf_hi - cdf_lo
            };
            prob[j] = p.max(0.0) as f32;
            let (f, h) = if e == 0 || e > n {
                (0.0, 0.0)
            } else {
                position_moments(lower(e), upper(e), w, s)
            };
            (frac[j], spread[j]) = quantised(f as f64, h as f64);
        }
    }

    /// Number of stars.
    pub fn len(&self) -> usize {
        self.start.len()
    }

    /// True if there are no stars.
    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
    }

    /// Bytes held: 8 per entry (f32 probability, two u16), 20 per star (start, offset, κ).
    pub fn bytes(&self) -> usize {
        self.prob.len() * 8 + self.start.len() * 20
    }

    /// The window of star `i`.
    #[inline(always)]
    pub fn of(&self, i: usize) -> Window<'_> {
        let r = self.offset[i]..self.offset[i + 1];
        Window {
            e0: self.start[i] as usize,
            prob: &self.prob[r.clone()],
            frac: &self.frac[r.clone()],
            spread: &self.spread[r],
            kappa: self.kappa[i],
        }
    }
}

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
/// use dust3d::likelihood::response::{inner_columns, star_moments, Windows};
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
        c: c0 + r * f,
    }
}

impl CotangentEntry {
    /// The entry's additions to the cotangents of the inner column and of the column for a
    /// star's `base` = g_a − 2 g_v κ ā and `gv` = g_v.
    #[inline(always)]
    fn terms(&self, base: f64, gv: f64) -> (f64, f64) {
        let w = self.p * (base + 2.0 * gv * self.c);
        (w, w * self.f + 2.0 * gv * self.p * self.r * self.h)
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

    #[test]
    fn windows_sum_to_one_and_small_error_limit_is_exact() {
        let shells = Shells::log_uniform(40.0, 2000.0, 64).unwrap();
        let par = [2.5, 0.6, 10.0, -2.0, 30.0, 1.0];
        let err = [0.1, 0.3, 0.02, 0.2, 0.05, 1e-6];
        let w = Windows::new(&shells, &par, &err);
        for i in 0..par.len() {
            let p = w.of(i).prob;
            let s: f64 = p.iter().map(|&v| v as f64).sum();
            assert!((s - 1.0).abs() < 1e-6, "star {i}: sum {s}");
        }
        // negative parallax: everything is beyond the grid
        assert_eq!(w.of(3).e0, 65);
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
