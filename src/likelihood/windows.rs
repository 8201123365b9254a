//! Per-star windows over the radial shells: each star's distance distribution (its
//! parallax Gaussian in 1/d, which paper eqs. 12–16 average over) as probabilities of the
//! shells its ±5.3σ range touches, with the star's mean fractional position and position
//! variance inside each shell. [`Windows::new`] weights by the paper's prior (uniform in parallax);
//! `Windows::with_prior` (`likelihood::distance`) by others. The response
//! (`likelihood::response`) walks these windows through the columns of extinction.
//!
//! Shells are indexed by an *extended* index `e`: `e = 0` is "nearer than the inner edge"
//! (no dust there, extinction 0), `e = k + 1` is kept shell `k`, `e = n + 1` is "beyond the
//! outer edge" (the whole column; this bin also holds the mass at negative parallax).

use rayon::prelude::*;

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

/// Six stars' windows on 64 log-uniform shells over 40–2000 pc, for tests: star 3 has a
/// negative parallax, star 5 a parallax of 1 mas ± 1e-6.
#[cfg(test)]
pub(crate) fn six_stars() -> (Shells, Windows) {
    let shells = Shells::log_uniform(40.0, 2000.0, 64).unwrap();
    let par = [2.5, 0.6, 10.0, -2.0, 30.0, 1.0];
    let err = [0.1, 0.3, 0.02, 0.2, 0.05, 1e-6];
    let w = Windows::new(&shells, &par, &err);
    (shells, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_sum_to_one_and_negative_parallaxes_lie_beyond_the_grid() {
        let (_, w) = six_stars();
        for i in 0..6 {
            let p = w.of(i).prob;
            let s: f64 = p.iter().map(|&v| v as f64).sum();
            assert!((s - 1.0).abs() < 1e-6, "star {i}: sum {s}");
        }
        assert_eq!(w.of(3).e0, 65);
    }
}
