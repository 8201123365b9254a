//! Calibration of a map against stars it was not fitted to: each star's measured extinction
//! against the map's predictive distribution for it, `A ~ N(ā, Var_samples(ā) + ⟨σ_a²⟩ +
//! σ_A²)` (map uncertainty, distance uncertainty, measurement error; n_σ = 1: the quoted
//! errors). On real data this is the calibration a user can measure: a calibrated map puts
//! 68 % of the z-scores inside ±1 and 95 % inside ±2.

use anyhow::Result;
use serde::Serialize;

use crate::data::catalog::Catalog;
use crate::products::mapfile::DustMap;
use crate::products::predict::Angular;

/// Upper edges of the predicted-extinction bins of [`Validation::by_level`], catalog units (the
/// last bin is open).
pub const LEVEL_EDGES: [f64; 3] = [0.1, 0.3, 1.0];

/// Calibration scores of one set of stars.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Stars scored.
    pub n_stars: usize,
    /// Fraction with |z| ≤ 1 (calibrated: 0.683).
    pub coverage_1sigma: f64,
    /// Fraction with |z| ≤ 2 (calibrated: 0.954).
    pub coverage_2sigma: f64,
    /// The 2.5, 16, 50, 84 and 97.5 % quantiles of z (calibrated: −2, −1, 0, 1, 2).
    pub z_quantiles: [f64; 5],
    /// Mean z² (calibrated: 1).
    pub chi2_per_star: f64,
    /// Pearson correlation of measured and predicted extinction.
    pub pearson_r: f64,
}

/// [`Scores`] overall and per bin of predicted extinction.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Validation {
    /// All stars.
    pub all: Scores,
    /// Stars by predicted extinction: below 0.1, 0.1–0.3, 0.3–1, above 1 (catalog units).
    pub by_level: Vec<(String, Scores)>,
}

/// One star's measured extinction and the map's predictive mean and variance for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Predicted {
    /// Measured extinction, catalog units.
    pub a_obs: f64,
    /// Predictive mean, catalog units.
    pub mean: f64,
    /// Predictive variance (map, distance and measurement parts), catalog units².
    pub var: f64,
}

impl Predicted {
    /// The standardized residual (A − mean) / √var.
    pub fn z(&self) -> f64 {
        (self.a_obs - self.mean) / self.var.sqrt()
    }
}

/// Fraction of truths inside mean ± 1σ and ± 2σ for a *calibrated* posterior whose σ is
/// estimated from `pairs` antithetic sample pairs x̄ ± δ_k: (truth − x̄)/σ̂ then follows
/// Student's t with `pairs` degrees of freedom, so the expected coverages are
/// P(|t| ≤ 1), P(|t| ≤ 2) — below the Gaussian 0.683 / 0.954 for few pairs.
///
/// ```
/// use dust3d::products::validation::calibrated_coverage;
/// let [one, two] = calibrated_coverage(2);
/// assert!((one - 1.0 / 3f64.sqrt()).abs() < 1e-9); // t with 2 dof: P(|t| ≤ 1) = 1/√3
/// assert!((two - 2.0 / 6f64.sqrt()).abs() < 1e-9);
/// ```
pub fn calibrated_coverage(pairs: usize) -> [f64; 2] {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    match StudentsT::new(0.0, 1.0, pairs.max(1) as f64) {
        Ok(t) => [1.0, 2.0].map(|k| 2.0 * t.cdf(k) - 1.0),
        Err(_) => [f64::NAN; 2],
    }
}

/// Pearson correlation coefficient of `x` and `y`.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

/// The `q`-quantile (0 ≤ q ≤ 1) of sorted values, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let h = q * (sorted.len() - 1) as f64;
    let (i, t) = (h.floor() as usize, h - h.floor());
    let j = (i + 1).min(sorted.len() - 1);
    sorted[i] + t * (sorted[j] - sorted[i])
}

/// Scores of `stars` (non-finite z-scores are left out).
///
/// ```
/// use dust3d::products::validation::{score, Predicted};
/// // z-scores −1.5, −0.5, 0.5, 1.5
/// let stars: Vec<Predicted> = [-1.5, -0.5, 0.5, 1.5]
///     .iter()
///     .map(|&z| Predicted { a_obs: 1.0 + 0.1 * z, mean: 1.0, var: 0.01 })
///     .collect();
/// let s = score(&stars);
/// assert_eq!(s.n_stars, 4);
/// assert!((s.coverage_1sigma - 0.5).abs() < 1e-12);
/// assert!((s.coverage_2sigma - 1.0).abs() < 1e-12);
/// assert!((s.chi2_per_star - 1.25).abs() < 1e-9);
/// ```
pub fn score(stars: &[Predicted]) -> Scores {
    let good: Vec<&Predicted> = stars.iter().filter(|s| s.z().is_finite()).collect();
    let n = good.len();
    if n == 0 {
        return Scores {
            z_quantiles: [f64::NAN; 5],
            coverage_1sigma: f64::NAN,
            coverage_2sigma: f64::NAN,
            chi2_per_star: f64::NAN,
            pearson_r: f64::NAN,
            n_stars: 0,
        };
    }
    let mut z: Vec<f64> = good.iter().map(|s| s.z()).collect();
    z.sort_by(f64::total_cmp);
    let nf = n as f64;
    let within = |k: f64| z.iter().filter(|v| v.abs() <= k).count() as f64 / nf;
    let a_obs: Vec<f64> = good.iter().map(|s| s.a_obs).collect();
    let mean: Vec<f64> = good.iter().map(|s| s.mean).collect();
    Scores {
        n_stars: n,
        coverage_1sigma: within(1.0),
        coverage_2sigma: within(2.0),
        z_quantiles: [0.025, 0.16, 0.5, 0.84, 0.975].map(|q| quantile(&z, q)),
        chi2_per_star: z.iter().map(|v| v * v).sum::<f64>() / nf,
        pearson_r: pearson(&a_obs, &mean),
    }
}

/// Scores overall and by level of predicted extinction.
pub fn validate(stars: &[Predicted]) -> Validation {
    let mut by_level = Vec::new();
    let mut lo = 0.0;
    for k in 0..=LEVEL_EDGES.len() {
        let hi = LEVEL_EDGES.get(k).copied().unwrap_or(f64::INFINITY);
        let part: Vec<Predicted> = stars
            .iter()
            .filter(|s| s.mean >= lo && s.mean < hi)
            .copied()
            .collect();
        let label = if hi.is_finite() {
            format!("{lo} <= predicted < {hi}")
        } else {
            format!("predicted >= {lo}")
        };
        by_level.push((label, score(&part)));
        lo = hi;
    }
    Validation {
        all: score(stars),
        by_level,
    }
}

impl Validation {
    /// A few lines for a terminal or a log.
    pub fn summary(&self) -> String {
        let line = |name: &str, s: &Scores| {
            format!(
                "{name}: {} stars, |z| <= 1: {:.3}, |z| <= 2: {:.3}, z quantiles \
                 (2.5/16/50/84/97.5 %) {:.2} {:.2} {:.2} {:.2} {:.2}, chi2/star {:.3}, r {:.4}\n",
                s.n_stars,
                s.coverage_1sigma,
                s.coverage_2sigma,
                s.z_quantiles[0],
                s.z_quantiles[1],
                s.z_quantiles[2],
                s.z_quantiles[3],
                s.z_quantiles[4],
                s.chi2_per_star,
                s.pearson_r
            )
        };
        let mut out = line("all", &self.all);
        for (label, s) in &self.by_level {
            if s.n_stars > 0 {
                out += &line(&format!("  {label}"), s);
            }
        }
        out
    }
}

/// The predictive of `map` for every star of `cat` (windows on the map's shells, the star's
/// column as `angular` says, n_σ = 1), as [`crate::products::predict::predict_with`]
/// computes it.
pub fn predicted_from_map(
    map: &DustMap,
    cat: &Catalog,
    angular: Angular,
) -> Result<Vec<Predicted>> {
    let p = crate::products::predict::predict_with(
        map,
        &cat.l_deg,
        &cat.b_deg,
        &cat.parallax_mas,
        &cat.parallax_error_mas,
        angular,
    )?;
    Ok((0..cat.len())
        .map(|i| {
            let map_var = if p.map_std[i].is_finite() {
                p.map_std[i] * p.map_std[i]
            } else {
                0.0
            };
            let e = cat.extinction_error[i];
            Predicted {
                a_obs: cat.extinction[i],
                mean: p.mean[i],
                var: map_var + p.distance_std[i] * p.distance_std[i] + e * e,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::StandardNormal;

    #[test]
    fn a_calibrated_predictive_scores_as_calibrated() {
        // stars drawn from their own predictive: coverage within 4 standard errors of the
        // Gaussian values, z quantiles near ±1, ±2
        let mut rng = crate::base::rng::stream(3, 77);
        let n = 20_000;
        let stars: Vec<Predicted> = (0..n)
            .map(|i| {
                let mean = 0.05 * (i % 40) as f64;
                let var = 0.01 + 0.001 * (i % 7) as f64;
                let z: f64 = rng.sample(StandardNormal);
                Predicted {
                    a_obs: mean + var.sqrt() * z,
                    mean,
                    var,
                }
            })
            .collect();
        let v = validate(&stars);
        let se = |p: f64| 4.0 * (p * (1.0 - p) / n as f64).sqrt();
        assert!((v.all.coverage_1sigma - 0.6827).abs() < se(0.6827), "{v:?}");
        assert!((v.all.coverage_2sigma - 0.9545).abs() < se(0.9545), "{v:?}");
        assert!((v.all.chi2_per_star - 1.0).abs() < 4.0 * (2.0 / n as f64).sqrt());
        for (q, want) in v
            .all
            .z_quantiles
            .iter()
            .zip([-1.96, -0.994, 0.0, 0.994, 1.96])
        {
            assert!((q - want).abs() < 0.06, "{q} vs {want}");
        }
        assert_eq!(v.by_level.len(), 4);
        let total: usize = v.by_level.iter().map(|(_, s)| s.n_stars).sum();
        assert_eq!(total, n);
        // an overconfident predictive (variance a quarter of the truth's) is caught
        let over: Vec<Predicted> = stars
            .iter()
            .map(|s| Predicted {
                var: s.var / 4.0,
                ..*s
            })
            .collect();
        assert!(score(&over).coverage_1sigma < 0.45);
    }
}

#[cfg(test)]
mod calibrated_tests {
    use super::calibrated_coverage;
    use rand::Rng;
    use rand_distr::StandardNormal;

    #[test]
    fn a_calibrated_posterior_with_few_pairs_covers_as_students_t_says() {
        // truth and K residuals from the same N(0, 1), x̄ = 0 exact: coverage of ±σ̂, ±2σ̂
        let mut rng = crate::base::rng::stream(17, 17);
        let trials = 40_000;
        for pairs in [1usize, 2, 4, 8] {
            let mut inside = [0usize; 2];
            for _ in 0..trials {
                let truth: f64 = rng.sample(StandardNormal);
                let var = (0..pairs)
                    .map(|_| rng.sample::<f64, _>(StandardNormal).powi(2))
                    .sum::<f64>()
                    / pairs as f64;
                let z = truth.abs() / var.sqrt();
                inside[0] += usize::from(z <= 1.0);
                inside[1] += usize::from(z <= 2.0);
            }
            let want = calibrated_coverage(pairs);
            for k in 0..2 {
                let got = inside[k] as f64 / trials as f64;
                // 4 binomial standard errors
                let se = (want[k] * (1.0 - want[k]) / trials as f64).sqrt();
                assert!(
                    (got - want[k]).abs() < 4.0 * se,
                    "{pairs} pairs, {}σ: {got} vs {}",
                    k + 1,
                    want[k]
                );
            }
        }
    }
}
