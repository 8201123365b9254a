//! The marginal variance of the ICR prior, diag(S Sᵀ), against the kernel's, and its
//! correction. ICR represents the kernel only approximately (paper §3): where a chart's
//! spacing is close to the kernel length the variance of s falls below k(0) (on the
//! paper's chart by 15–25 % beyond 100 pc). The variance is estimated from prior draws,
//! averaged over the pixels of each chart shell (all pixels of a shell are alike but for
//! the few next to base-pixel corners), with the standard error from the spread between
//! draws; the correction scales each final shell's outputs of the last refinement so that
//! the shell's variance is k(0). The scaling is part of the last step's matrices, so the
//! forward map, its transpose and every backend that copies the matrices stay exact.

use rand::Rng;
use rand_distr::StandardNormal;

use super::{Icr, Matrices, SITE_LEN};
use crate::sphere::decomp::{fill_random, reduce_rows};

/// Variance of s per final chart shell (inner padding first), mean and standard error.
#[derive(Clone, Debug, PartialEq)]
pub struct ShellVariance {
    /// Mean over draws and pixels of s², per chart shell.
    pub mean: Vec<f64>,
    /// Standard error of `mean` from the spread of the per-draw pixel averages.
    pub std_err: Vec<f64>,
    /// Number of prior draws.
    pub draws: usize,
}

impl ShellVariance {
    /// Over chart shells `kept`: the least and greatest variance as a fraction of `k0`, and
    /// the worst relative standard error.
    pub fn kept_range(&self, kept: std::ops::Range<usize>, k0: f64) -> (f64, f64, f64) {
        kept.fold((f64::INFINITY, 0.0f64, 0.0f64), |(lo, hi, worst), k| {
            let (m, e) = (self.mean[k], self.std_err[k]);
            (lo.min(m / k0), hi.max(m / k0), worst.max(e / m))
        })
    }
}

/// How the variance correction is estimated: draws are added in batches until every kept
/// shell's relative standard error is below `rel_tol`, or `max_draws` are reached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VarianceParams {
    /// Target relative standard error of each kept shell's variance estimate.
    pub rel_tol: f64,
    /// Most prior draws.
    pub max_draws: usize,
}

impl Default for VarianceParams {
    /// 3 % on the variance (1.5 % on the standard deviation), at most 256 draws.
    fn default() -> Self {
        Self {
            rel_tol: 0.03,
            max_draws: 256,
        }
    }
}

/// What [`Icr::correct_variance`] measured and applied.
#[derive(Clone, Debug, PartialEq)]
pub struct VarianceCorrection {
    /// The kernel's variance k(0) the shells were corrected to.
    pub k0: f64,
    /// The uncorrected variance of s per chart shell.
    pub before: ShellVariance,
    /// Factor applied to s per chart shell, √(k(0) / variance).
    pub factor: Vec<f64>,
}

impl VarianceCorrection {
    /// One line: the uncorrected range over the kept shells (all but `padding` at either
    /// end) as a fraction of k(0), the draws and the worst relative standard error.
    pub fn summary(&self, padding: usize) -> String {
        let n = self.before.mean.len();
        let kept = padding.min(n)..n.saturating_sub(padding);
        let (lo, hi, worst) = self.before.kept_range(kept, self.k0);
        format!(
            "ICR variance corrected to the kernel's per shell: uncorrected {lo:.3}–{hi:.3} of k(0) \
             over the kept shells ({} draws, relative standard error ≤ {worst:.3})",
            self.before.draws
        )
    }
}

/// Draws per batch of the adaptive estimate.
const BATCH: usize = 8;

impl Icr {
    /// Monte Carlo estimate of the marginal variance of s per final chart shell from
    /// `draws` prior draws of random stream `stream` of `seed`. Collective over ranks, and
    /// the same for any rank count (normals per patch, sums in patch order).
    pub fn variance_by_shell(&self, draws: usize, seed: u64, stream: u64) -> ShellVariance {
        self.estimate_variance(seed, stream, |v| v.draws >= draws)
    }

    /// Scale the final field per chart shell so that its marginal variance is the kernel's
    /// `k0` (see the module docs); the estimate uses a fixed random stream, so the prior
    /// depends on the chart and kernel only, not on a run's seed. Collective over ranks.
    pub fn correct_variance(&mut self, k0: f64, params: &VarianceParams) -> VarianceCorrection {
        let n_f = self.chart.n_r(self.chart.levels);
        if self.levels.is_empty() {
            // level 0 is the kernel's exact Cholesky factor
            let before = ShellVariance {
                mean: vec![k0; n_f],
                std_err: vec![0.0; n_f],
                draws: 0,
            };
            return VarianceCorrection {
                k0,
                before,
                factor: vec![1.0; n_f],
            };
        }
        let kept = self.chart.padding..n_f - self.chart.padding;
        let before = self.estimate_variance(0, crate::base::rng::streams::ICR_VARIANCE, |v| {
            let worst = v.kept_range(kept.clone(), k0).2;
            v.draws >= params.max_draws || (v.draws >= 2 * BATCH && worst <= params.rel_tol)
        });
        let factor: Vec<f64> = before.mean.iter().map(|m| (k0 / m).sqrt()).collect();
        let last = self.levels.last_mut().expect("levels");
        let ns = last.n_c - 2;
        let scale = |b: usize, i: usize| factor[2 * (b % ns) + i % 2];
        match &mut last.mats {
            Matrices::F64(m) => m.chunks_exact_mut(SITE_LEN).enumerate().for_each(|(b, s)| {
                s.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v *= scale(b, i));
            }),
            Matrices::F32(m) => m.chunks_exact_mut(SITE_LEN).enumerate().for_each(|(b, s)| {
                s.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (*v as f64 * scale(b, i)) as f32);
            }),
        }
        let c = VarianceCorrection { k0, before, factor };
        self.correction = Some(c.clone());
        c
    }

    /// Draw batches of prior samples until `done` says so; draw d uses sub-streams of
    /// `(stream << 20) + d`.
    fn estimate_variance(
        &self,
        seed: u64,
        stream: u64,
        mut done: impl FnMut(&ShellVariance) -> bool,
    ) -> ShellVariance {
        let lv = self.chart.levels;
        let nc = self.chart.n_r(lv);
        let layout = self.x_layout();
        let n_own = self.final_pixels().len();
        let n_patch = layout.patch.len();
        let per_patch = n_own / n_patch;
        let mut w = self.workspace();
        let mut x = vec![0.0; layout.len];
        let (mut m1, mut m2) = (vec![0.0; nc], vec![0.0; nc]);
        let mut partial = vec![0.0; n_patch * nc];
        let no_replicated = vec![0.0; nc];
        let npix = self.chart.npix(lv) as f64;
        let mut v = ShellVariance {
            mean: vec![0.0; nc],
            std_err: vec![f64::INFINITY; nc],
            draws: 0,
        };
        loop {
            for _ in 0..BATCH {
                let sub = (stream << 20) + v.draws as u64;
                fill_random(seed, sub, &mut [(&layout, &mut x)], |r| {
                    r.sample(StandardNormal)
                });
                self.forward(&x[..self.n_xi()], &mut w);
                let field = &w.fields[lv][..n_own * nc];
                for (q, part) in partial.chunks_exact_mut(nc).enumerate() {
                    part.fill(0.0);
                    for col in field[q * per_patch * nc..(q + 1) * per_patch * nc].chunks_exact(nc)
                    {
                        part.iter_mut().zip(col).for_each(|(a, s)| *a += s * s);
                    }
                }
                let sums = reduce_rows(&self.decomp, &no_replicated, &partial);
                for k in 0..nc {
                    let a = sums[k] / npix;
                    m1[k] += a;
                    m2[k] += a * a;
                }
                v.draws += 1;
            }
            let n = v.draws as f64;
            for k in 0..nc {
                v.mean[k] = m1[k] / n;
                v.std_err[k] = ((m2[k] / n - v.mean[k].powi(2)).max(0.0) / (n - 1.0)).sqrt();
            }
            if done(&v) {
                return v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::base::precision::Precision;
    use crate::prior::icr::Icr;
    use crate::sphere::covariance::{Kernel, Matern, Nu};
    use crate::sphere::grid::Chart;

    /// The W1 kernel: Matérn-3/2, 1.5, 30 pc.
    const K30: Matern = Matern {
        nu: Nu::ThreeHalves,
        std: 1.5,
        length_pc: 30.0,
    };

    #[test]
    fn level_zero_alone_is_the_exact_kernel_variance() {
        // no refinement: s = L ξ with L the Cholesky factor of the kernel, so the variance is
        // k(0) to Monte Carlo precision
        let k = Matern {
            nu: Nu::ThreeHalves,
            std: 1.5,
            length_pc: 60.0,
        };
        let chart = Chart::new(2, 10, 0, 2, 50.0, 400.0).unwrap();
        let icr = Icr::new(&chart, &k, Precision::F64).unwrap();
        let v = icr.variance_by_shell(400, 1, 4);
        for (m, e) in v.mean.iter().zip(&v.std_err) {
            assert!((m - k.cov(0.0)).abs() < 4.0 * e + 1e-12, "{m} ± {e}");
            assert!(*e < 0.1 * k.cov(0.0));
        }
    }

    #[test]
    fn a_chart_coarse_against_the_kernel_length_shows_its_variance_error() {
        // the W1 chart: coarse levels whose spacing is close to the 30 pc kernel length
        let k = K30;
        let chart = Chart::new(2, 12, 4, 2, 40.0, 2000.0).unwrap();
        let icr = Icr::new(&chart, &k, Precision::F64).unwrap();
        let v = icr.variance_by_shell(40, 2, 4);
        let ratio: Vec<f64> = v.mean.iter().map(|m| m / k.cov(0.0)).collect();
        let lo = ratio.iter().cloned().fold(f64::INFINITY, f64::min);
        // some shells fall well below the kernel's variance (the exact diagonal of S Sᵀ
        // reaches 1.40 against 2.25 there, a ratio of 0.62)
        assert!(lo < 0.75, "{ratio:?}");
        assert!(ratio.iter().all(|r| *r > 0.2 && *r < 1.5), "{ratio:?}");
    }

    #[test]
    fn the_correction_scales_each_final_shell_and_nothing_else() {
        // the corrected forward map is diag(factor) times the uncorrected one, exactly
        let k = K30;
        let chart = Chart::new(1, 8, 2, 1, 40.0, 600.0).unwrap();
        let plain = Icr::new(&chart, &k, Precision::F64).unwrap();
        let mut fixed = plain.clone();
        let c = fixed.correct_variance(k.cov(0.0), &super::VarianceParams::default());
        assert!(
            c.factor.iter().any(|f| (f - 1.0).abs() > 0.02),
            "{:?}",
            c.factor
        );
        let xi: Vec<f64> = (0..plain.n_xi()).map(|i| (i as f64 * 0.37).sin()).collect();
        let (mut w1, mut w2) = (plain.workspace(), fixed.workspace());
        plain.forward(&xi, &mut w1);
        fixed.forward(&xi, &mut w2);
        let nc = chart.n_r(2);
        for (i, (a, b)) in w1.fields[2].iter().zip(&w2.fields[2]).enumerate() {
            let want = a * c.factor[i % nc];
            assert!(
                (b - want).abs() <= 1e-13 * (1.0 + want.abs()),
                "{i}: {b} vs {want}"
            );
        }
    }

    #[test]
    fn after_the_correction_independent_draws_give_the_kernel_variance() {
        // a chart whose coarse spacing is close to the 30 pc kernel length: some shells
        // start more than 20 % low; corrected, every kept shell is within the combined
        // standard errors (estimate and check, 4 sigma) of k(0)
        let k = K30;
        let chart = Chart::new(2, 12, 3, 2, 40.0, 1000.0).unwrap();
        let mut icr = Icr::new(&chart, &k, Precision::F64).unwrap();
        let k0 = k.cov(0.0);
        let c = icr.correct_variance(k0, &super::VarianceParams::default());
        let kept = 2..chart.n_r(3) - 2;
        let lo = kept
            .clone()
            .map(|i| c.before.mean[i] / k0)
            .fold(f64::INFINITY, f64::min);
        assert!(lo < 0.8, "uncorrected minimum {lo}");
        let after = icr.variance_by_shell(64, 3, 4);
        for i in kept {
            let (r, e) = (after.mean[i] / k0, after.std_err[i] / k0);
            let e_fix = c.before.std_err[i] / c.before.mean[i];
            let tol = 4.0 * (e * e + e_fix * e_fix).sqrt();
            assert!(
                (r - 1.0).abs() < tol,
                "shell {i}: {r} ± {e} (correction ± {e_fix})"
            );
        }
    }
}
