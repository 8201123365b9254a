//! The prior of a star's distance in its window ([`DistancePrior`], `[distances]`): the
//! paper reads the parallax likelihood N(ω; 1/d, σ_ω²) as the posterior of 1/d, i.e. a prior
//! uniform in parallax; a space-density prior (uniform in volume, or exponentially
//! decreasing) weighs it by ∝ t⁻⁴ (t = 1/d), and the window's probabilities and within-shell
//! moments are then integrated numerically over the parallax (docs/model.md).

use super::windows::{extended_bin, quantised, Windows, GL5};
use crate::sphere::grid::Shells;

/// Half-width, in parallax errors, of the parallax range a window with a distance prior
/// integrates over: the prior may weigh the likelihood's far tail up by its own range
/// (∝ t⁻⁴: 4e4 between 45 and 650 pc), so the window reaches further than the closed
/// form's ±5.3σ.
const Z_PRIOR: f64 = 8.5;

/// Smallest parallax (mas, 1 Gpc) a window with a distance prior integrates from.
const T_FLOOR_MAS: f64 = 1e-6;

/// The prior of a star's distance that its window combines with its parallax likelihood
/// (`[distances]`; docs/model.md, "Distance windows").
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum DistancePrior {
    /// Uniform in parallax (∝ d⁻² per pc), the paper's: the window is the parallax
    /// likelihood read as a posterior in 1/d.
    #[default]
    Parallax,
    /// Uniform in space (∝ d² per pc) between `min_pc` and `max_pc`.
    Volume {
        /// Nearest distance, pc.
        min_pc: f64,
        /// Farthest distance, pc.
        max_pc: f64,
    },
    /// Exponentially decreasing space density, ∝ d² e^{−d/L} per pc, between `min_pc` and
    /// `max_pc` (may be infinite).
    Exponential {
        /// Length scale L, pc.
        length_pc: f64,
        /// Nearest distance, pc.
        min_pc: f64,
        /// Farthest distance, pc.
        max_pc: f64,
    },
}

impl DistancePrior {
    /// ln of the prior density per unit parallax at parallax `t_mas` > 0, up to a constant.
    fn ln_density(&self, t_mas: f64) -> f64 {
        match *self {
            DistancePrior::Parallax => 0.0,
            // d² per pc is t⁻² per pc, and dd/dt = −1000/t²
            DistancePrior::Volume { .. } => -4.0 * t_mas.ln(),
            DistancePrior::Exponential { length_pc, .. } => {
                -4.0 * t_mas.ln() - 1000.0 / (t_mas * length_pc)
            }
        }
    }

    /// The prior as one line of text (a map file's `distance_prior` attribute):
    /// `parallax`, `volume MIN MAX` or `exponential L MIN MAX`, distances in pc.
    ///
    /// ```
    /// use dust3d::likelihood::distance::DistancePrior;
    /// let p = DistancePrior::Volume { min_pc: 45.0, max_pc: 650.0 };
    /// assert_eq!(p.to_text(), "volume 45 650");
    /// assert_eq!(DistancePrior::from_text(&p.to_text()).unwrap(), p);
    /// ```
    pub fn to_text(&self) -> String {
        match *self {
            DistancePrior::Parallax => "parallax".into(),
            DistancePrior::Volume { min_pc, max_pc } => format!("volume {min_pc} {max_pc}"),
            DistancePrior::Exponential {
                length_pc,
                min_pc,
                max_pc,
            } => format!("exponential {length_pc} {min_pc} {max_pc}"),
        }
    }

    /// Read [`DistancePrior::to_text`]'s form back.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let nums: Result<Vec<f64>, _> = words.iter().skip(1).map(|w| w.parse::<f64>()).collect();
        let nums = nums.map_err(|_| format!("distance prior {text:?}: not a number"))?;
        match (words.first().copied(), nums.as_slice()) {
            (Some("parallax"), []) => Ok(DistancePrior::Parallax),
            (Some("volume"), &[min_pc, max_pc]) => Ok(DistancePrior::Volume { min_pc, max_pc }),
            (Some("exponential"), &[length_pc, min_pc, max_pc]) => Ok(DistancePrior::Exponential {
                length_pc,
                min_pc,
                max_pc,
            }),
            _ => Err(format!(
                "distance prior {text:?}: expected \"parallax\", \"volume MIN MAX\" or \
                 \"exponential L MIN MAX\""
            )),
        }
    }

    /// The parallaxes (mas) the prior allows, [1000 / max_pc, 1000 / min_pc].
    fn support_mas(&self) -> (f64, f64) {
        let (lo, hi) = match *self {
            DistancePrior::Parallax => return (f64::NEG_INFINITY, f64::INFINITY),
            DistancePrior::Volume { min_pc, max_pc } => (min_pc, max_pc),
            DistancePrior::Exponential { min_pc, max_pc, .. } => (min_pc, max_pc),
        };
        (1000.0 / hi, 1000.0 / lo)
    }
}

impl Windows {
    /// Windows of all stars over `shells` under the distance prior `prior` (the paper's
    /// closed form for [`DistancePrior::Parallax`]), computed in parallel.
    pub fn with_prior(
        shells: &Shells,
        parallax_mas: &[f64],
        error_mas: &[f64],
        prior: &DistancePrior,
    ) -> Self {
        if *prior == DistancePrior::Parallax {
            return Self::new(shells, parallax_mas, error_mas);
        }
        let (edges, n) = (&shells.edges_pc, shells.len());
        let range = |e: &[f64], w: f64, s: f64| prior_range(e, w, s, prior);
        Self::build(
            shells,
            parallax_mas,
            error_mas,
            &range,
            &|w, s, r, (p, f, h)| fill_with_prior(edges, n, (w, s), prior, r, p, f, h),
        )
    }
}

/// The parallaxes (mas) a window with a distance prior integrates over: ±[`Z_PRIOR`] σ
/// about the parallax, within the prior's support; `None` if the two do not meet.
fn prior_support(w: f64, s: f64, prior: &DistancePrior) -> Option<(f64, f64)> {
    let (t_min, t_max) = prior.support_mas();
    let t_a = (w - Z_PRIOR * s).max(t_min).max(T_FLOOR_MAS);
    let t_b = (w + Z_PRIOR * s).min(t_max);
    (t_a < t_b).then_some((t_a, t_b))
}

/// Where a parallax incompatible with the prior's support puts its star: the support's end
/// nearest to the parallax, mas.
fn prior_fallback_mas(w: f64, prior: &DistancePrior) -> f64 {
    let (t_min, t_max) = prior.support_mas();
    w.clamp(t_min.max(T_FLOOR_MAS), t_max.max(T_FLOOR_MAS))
}

/// Probability mass of a window's far and near tails that is lumped into its end bins, as
/// the closed form lumps its tails beyond ±5.3σ: the window keeps the bins that matter.
const TAIL_MASS: f64 = 6e-8;

/// A window's bins under a distance prior before quantisation: the first extended bin and,
/// per bin from there, (probability, mean position, position variance); the tails' bins
/// (less than [`TAIL_MASS`] each side) already lumped into the end bins.
struct PriorWindow {
    first: usize,
    bins: Vec<[f64; 3]>,
}

/// First and last extended bin of a window under a distance prior. The window is integrated
/// here and again in [`fill_with_prior`] rather than held between the two passes of
/// [`Windows::build`]: holding every star's bins would double the windows' peak memory, the
/// largest star-side array of a fit, to save 10 µs per star once per stage.
fn prior_range(edges: &[f64], w: f64, s: f64, prior: &DistancePrior) -> (usize, usize) {
    let win = prior_window(edges, edges.len() - 1, (w, s), prior);
    (win.first, win.first + win.bins.len() - 1)
}

/// Fractional position of distance `d_pc` in extended bin `e` (0 outside the kept shells).
fn position_in(edges: &[f64], n: usize, e: usize, d_pc: f64) -> f64 {
    if e == 0 || e > n {
        return 0.0;
    }
    let (lo, hi) = (edges[e - 1], edges[e]);
    ((d_pc - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// One window under a distance prior: the posterior N(t; ω, σ) · prior(t) of the parallax t
/// integrated bin by bin (pieces at most σ/2 and a tenth of t wide, 5-point Gauss–Legendre),
/// normalised over the support, with each kept shell's mean and variance of the position.
fn prior_window(edges: &[f64], n: usize, (w, s): (f64, f64), prior: &DistancePrior) -> PriorWindow {
    let Some((t_a, t_b)) = prior_support(w, s, prior) else {
        let d = 1000.0 / prior_fallback_mas(w, prior);
        let e = extended_bin(edges, d);
        return PriorWindow {
            first: e,
            bins: vec![[1.0, position_in(edges, n, e, d), 0.0]],
        };
    };
    // nodes (bin, ln weight, position) over the support, split at the shell edges
    let mut cuts: Vec<f64> = edges
        .iter()
        .map(|&r| 1000.0 / r)
        .filter(|&t| t > t_a && t < t_b)
        .collect();
    cuts.extend([t_a, t_b]);
    cuts.sort_by(f64::total_cmp);
    let mut nodes: Vec<(usize, f64, f64)> = Vec::new();
    for seg in cuts.windows(2) {
        let (u0, u1) = (seg[0], seg[1]);
        let e = extended_bin(edges, 2000.0 / (u0 + u1));
        let width = (0.5 * s).min(0.1 * u0);
        let pieces = ((u1 - u0) / width).ceil().clamp(1.0, 4096.0) as usize;
        let h = (u1 - u0) / pieces as f64;
        for p in 0..pieces {
            let mid = u0 + (p as f64 + 0.5) * h;
            for (x, gw) in GL5 {
                let t = mid + 0.5 * h * x;
                let z = (t - w) / s;
                let lw = (gw * 0.5 * h).ln() - 0.5 * z * z + prior.ln_density(t);
                nodes.push((e, lw, position_in(edges, n, e, 1000.0 / t)));
            }
        }
    }
    let first = extended_bin(edges, 1000.0 / t_b);
    let last = extended_bin(edges, 1000.0 / t_a);
    let top = nodes.iter().fold(f64::NEG_INFINITY, |m, n| m.max(n.1));
    let mut sums = vec![[0.0f64; 3]; last - first + 1];
    for &(e, lw, x) in &nodes {
        let wt = (lw - top).exp();
        let m = &mut sums[e - first];
        m[0] += wt;
        m[1] += wt * x;
        m[2] += wt * x * x;
    }
    let total: f64 = sums.iter().map(|m| m[0]).sum();
    // sums of (1, x, x²) become (probability, mean position, position variance) in place
    for m in sums.iter_mut().filter(|m| m[0] > 0.0) {
        let f = m[1] / m[0];
        *m = [m[0] / total, f, (m[2] / m[0] - f * f).max(0.0)];
    }
    let mut bins = sums;
    let (lo, hi) = kept_bins(&bins);
    // the tails' mass joins the end bins, whose positions stay their own
    let below: f64 = bins[..lo].iter().map(|b| b[0]).sum();
    let above: f64 = bins[hi + 1..].iter().map(|b| b[0]).sum();
    bins[lo][0] += below;
    bins[hi][0] += above;
    bins.truncate(hi + 1);
    bins.drain(..lo);
    PriorWindow {
        first: first + lo,
        bins,
    }
}

/// The bins a window keeps: from the first whose cumulative mass from the near side passes
/// [`TAIL_MASS`] to the last whose cumulative mass from the far side does.
fn kept_bins(bins: &[[f64; 3]]) -> (usize, usize) {
    let mut acc = 0.0;
    let lo = bins
        .iter()
        .position(|b| {
            acc += b[0];
            acc > TAIL_MASS
        })
        .unwrap_or(0);
    acc = 0.0;
    let hi = bins
        .iter()
        .rposition(|b| {
            acc += b[0];
            acc > TAIL_MASS
        })
        .unwrap_or(bins.len() - 1);
    (lo, hi.max(lo))
}

/// Write one window under a distance prior over the extended bins `e_lo..=e_hi` that
/// [`prior_range`] gave for it.
#[allow(clippy::too_many_arguments)]
fn fill_with_prior(
    edges: &[f64],
    n: usize,
    (w, s): (f64, f64),
    prior: &DistancePrior,
    (e_lo, e_hi): (usize, usize),
    prob: &mut [f32],
    frac: &mut [u16],
    spread: &mut [u16],
) {
    let win = prior_window(edges, n, (w, s), prior);
    debug_assert_eq!((win.first, win.first + win.bins.len() - 1), (e_lo, e_hi));
    for (j, b) in win.bins.iter().enumerate() {
        prob[j] = b[0] as f32;
        (frac[j], spread[j]) = quantised(b[1], b[2]);
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;
    use rand_distr::StandardNormal;

    use super::*;
    use crate::likelihood::windows::{Window, Windows, F_SCALE, H_SCALE};
    use crate::sphere::grid::Shells;
    use crate::sphere::transforms::norm_pdf;

    const VOLUME: DistancePrior = DistancePrior::Volume {
        min_pc: 45.0,
        max_pc: 650.0,
    };

    /// Probability and mean / variance of the fractional position per extended bin of one
    /// star, by the trapezoid rule over distance on a fine grid: the posterior density in d
    /// is N(ω; 1000/d, σ) · prior(d), a computation independent of the windows' (which
    /// integrate over the parallax).
    fn brute(shells: &Shells, w: f64, s: f64, prior: &DistancePrior) -> Vec<[f64; 3]> {
        let (lo, hi, ln_prior): (f64, f64, Box<dyn Fn(f64) -> f64>) = match *prior {
            DistancePrior::Volume { min_pc, max_pc } => {
                (min_pc, max_pc, Box::new(|d| 2.0 * d.ln()))
            }
            DistancePrior::Exponential {
                length_pc,
                min_pc,
                max_pc,
            } => (
                min_pc,
                max_pc,
                Box::new(move |d| 2.0 * d.ln() - d / length_pc),
            ),
            DistancePrior::Parallax => unreachable!(),
        };
        let edges = &shells.edges_pc;
        let n = shells.len();
        let mut acc = vec![[0.0; 3]; n + 2];
        // Simpson's rule bin by bin, so that no bin edge falls inside a step
        for (e, a) in acc.iter_mut().enumerate() {
            let r0 = if e == 0 { lo } else { edges[e - 1].max(lo) };
            let r1 = if e > n { hi } else { edges[e].min(hi) };
            if r1 <= r0 {
                continue;
            }
            let steps = 20_000;
            let h = (r1 - r0) / steps as f64;
            for k in 0..=steps {
                let d = r0 + k as f64 * h;
                let simpson = if k == 0 || k == steps {
                    1.0
                } else {
                    2.0 + 2.0 * (k % 2) as f64
                };
                let wt = simpson * h / 3.0 * norm_pdf((1000.0 / d - w) / s) * ln_prior(d).exp();
                let x = if e == 0 || e > n {
                    0.0
                } else {
                    (d - edges[e - 1]) / (edges[e] - edges[e - 1])
                };
                a[0] += wt;
                a[1] += wt * x;
                a[2] += wt * x * x;
            }
        }
        let total: f64 = acc.iter().map(|a| a[0]).sum();
        acc.iter()
            .map(|a| {
                if a[0] == 0.0 {
                    return [0.0; 3];
                }
                let f = a[1] / a[0];
                [a[0] / total, f, a[2] / a[0] - f * f]
            })
            .collect()
    }

    #[test]
    fn windows_under_a_prior_match_direct_integration_over_distance() {
        let shells = Shells::log_uniform(40.0, 600.0, 24).unwrap();
        let expo = DistancePrior::Exponential {
            length_pc: 300.0,
            min_pc: 10.0,
            max_pc: 2000.0,
        };
        // low and high signal-to-noise, near, far, beyond the grid, negative parallax
        let stars = [
            (2.0, 0.6),
            (5.0, 0.5),
            (1.6, 0.05),
            (20.0, 3.0),
            (0.5, 1.0),
            (-1.0, 0.5),
        ];
        for prior in [VOLUME, expo] {
            let (par, err): (Vec<f64>, Vec<f64>) = stars.iter().copied().unzip();
            let win = Windows::with_prior(&shells, &par, &err, &prior);
            for (i, &(w, s)) in stars.iter().enumerate() {
                let want = brute(&shells, w, s, &prior);
                let Window {
                    e0,
                    prob: p,
                    frac: f,
                    spread: h,
                    ..
                } = win.of(i);
                let sum: f64 = p.iter().map(|&v| v as f64).sum();
                assert!((sum - 1.0).abs() < 1e-6, "{prior:?} star {i}: sum {sum}");
                for (e, wb) in want.iter().enumerate() {
                    let j = e.wrapping_sub(e0);
                    let (pg, fg, hg) = if j < p.len() {
                        (p[j] as f64, f[j] as f64 * F_SCALE, h[j] as f64 * H_SCALE)
                    } else {
                        (0.0, 0.0, 0.0)
                    };
                    let at = format!("{prior:?} star {i} bin {e}: {pg} {fg} {hg} vs {wb:?}");
                    assert!((pg - wb[0]).abs() < 2e-6, "{at}");
                    if wb[0] > 1e-4 && e >= 1 && e <= shells.len() {
                        assert!((fg - wb[1]).abs() < 2e-4, "{at}");
                        assert!((hg - wb[2]).abs() < 2e-4, "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_parallax_outside_the_prior_puts_the_star_at_the_nearest_allowed_distance() {
        let shells = Shells::log_uniform(40.0, 600.0, 24).unwrap();
        // 1/30 mas = 33 pc, 30σ inside the prior's 45 pc
        let win = Windows::with_prior(&shells, &[30.0], &[0.1], &VOLUME);
        let Window {
            e0,
            prob: p,
            frac: f,
            ..
        } = win.of(0);
        assert_eq!(p, &[1.0]);
        assert_eq!(e0, extended_bin(&shells.edges_pc, 45.0));
        let x = (45.0 - shells.edges_pc[e0 - 1]) / (shells.edges_pc[e0] - shells.edges_pc[e0 - 1]);
        assert!((f[0] as f64 * F_SCALE - x).abs() < 1e-4);
    }

    /// |observed − expected| / sd of the stars in each extended bin, the largest over bins:
    /// with windows that are the stars' exact distance posteriors, each star falls in bin e
    /// with its window's probability, independently of the others.
    fn worst_bin_z(shells: &Shells, d_true: &[f64], win: &Windows) -> f64 {
        let n = shells.len();
        let (mut expect, mut var, mut seen) =
            (vec![0.0; n + 2], vec![0.0; n + 2], vec![0.0; n + 2]);
        for (i, &d) in d_true.iter().enumerate() {
            let Window { e0, prob: p, .. } = win.of(i);
            for (j, &pj) in p.iter().enumerate() {
                expect[e0 + j] += pj as f64;
                var[e0 + j] += pj as f64 * (1.0 - pj as f64);
            }
            seen[extended_bin(&shells.edges_pc, d)] += 1.0;
        }
        (0..n + 2)
            .filter(|&e| var[e] > 0.0)
            .map(|e| (seen[e] - expect[e]).abs() / var[e].sqrt())
            .fold(0.0, f64::max)
    }

    #[test]
    fn volume_prior_windows_are_calibrated_on_stars_uniform_in_space() {
        // stars ∝ d² between 45 and 650 pc with parallax errors of 0.2–1 mas (drawn
        // independently of the distance, or the error itself would tell it); the shells' star
        // counts must match the windows' sums within 4.5 sd in every bin (26 bins: a false
        // alarm has probability ~2e-4), which the paper's prior (uniform in parallax) fails
        let shells = Shells::log_uniform(40.0, 600.0, 24).unwrap();
        let mut rng = crate::base::rng::stream(11, 0);
        let (lo, hi) = (45.0f64, 650.0f64);
        let n = 20_000;
        let (mut d_true, mut par, mut err) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let u: f64 = rng.random();
            let d = (lo.powi(3) + u * (hi.powi(3) - lo.powi(3))).cbrt();
            let s = rng.random_range(0.2..1.0);
            let z: f64 = rng.sample(StandardNormal);
            d_true.push(d);
            par.push(1000.0 / d + s * z);
            err.push(s);
        }
        let exact = worst_bin_z(
            &shells,
            &d_true,
            &Windows::with_prior(&shells, &par, &err, &VOLUME),
        );
        assert!(exact < 4.5, "volume prior: worst bin {exact:.2} sd");
        let paper = worst_bin_z(&shells, &d_true, &Windows::new(&shells, &par, &err));
        eprintln!("worst shell count: {exact:.2} sd (volume prior), {paper:.2} sd (parallax)");
        assert!(
            paper > 10.0,
            "uniform-in-parallax prior: worst bin only {paper:.2} sd"
        );
    }
}
