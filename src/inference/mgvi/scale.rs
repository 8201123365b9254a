//! The field's scale in its own variational factor (`scale_update = "marginal"`).
//!
//! As one more MGVI coordinate the scale is biased low: the KL minimisation holds the
//! residuals δ fixed in standardized coordinates, so raising the scale widens every
//! sample's field in the directions the data pin down and costs likelihood, while the
//! Gaussian's entropy, which would pay it back (the residuals shrink as 1/scale there), is
//! not part of the sample-averaged energy. At the fixed point scale² ≈ |φ̄|²/N, the posterior
//! *mean* field's power alone (docs/model.md, "Calibration").
//!
//! Here the scale a = exp(μ + σ ξ_a) instead gets its own factor q(ξ_a) of a mean-field
//! posterior q(ξ_a) q(φ) in the centred field φ = a · ξ_e, whose prior is N(0, a² I) on the
//! N free excitations. Its optimum is
//!
//! ln q(ξ_a) = −ξ_a²/2 − N ln a − E_q|φ|² / (2a²) + const,
//!
//! with E_q|φ|² = a² · mean_j |ξ_e^(j)|² over the current samples: mean power *plus* the
//! samples' spread, the term the joint treatment loses. It is strictly concave in ξ_a; its
//! mode is found by Newton's method and its curvature gives the reported spread. The update
//! then re-expresses the expansion point and every residual at the new scale (ξ_e · a_old /
//! a_new), which leaves every sample's ln ρ, and so the map, unchanged: only the prior the
//! next iteration samples and minimises under moves.

use crate::likelihood::model::Model;
use crate::sphere::transforms::LogNormal;

/// How the field's scale is inferred.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleUpdate {
    /// One more coordinate of MGVI's Gaussian (the paper's treatment; biased low).
    #[default]
    Joint,
    /// Its own factor, updated after each iteration from the samples' second moment (this
    /// module).
    Marginal,
}

/// What one update of the scale's own factor found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleFactor {
    /// Mode of q(ξ_a), as the scale.
    pub scale: f64,
    /// Standard deviation of the scale under the Laplace approximation of q(ξ_a).
    pub std: f64,
    /// Free excitations N.
    pub free: f64,
    /// mean_j |ξ_e^(j)|² / N at the old scale: 1 for a posterior with the prior's power.
    pub moment: f64,
}

/// Mode and curvature −f'' of f(t) = −t²/2 − N σ t − m2 e^{−2(μ+σt)}/2 (ln q(ξ_a) up to a
/// constant, with `m2` = E_q|φ|²), by Newton's method from `t0`; f is strictly concave.
pub fn scale_mode(prior: &LogNormal, n: f64, m2: f64, t0: f64) -> (f64, f64) {
    let (mu, sigma) = prior.mu_sigma();
    let grad = |t: f64| -t - n * sigma + sigma * m2 * (-2.0 * (mu + sigma * t)).exp();
    let curv = |t: f64| 1.0 + 2.0 * sigma * sigma * m2 * (-2.0 * (mu + sigma * t)).exp();
    let mut t = t0;
    for _ in 0..200 {
        // f' is decreasing and convex in t: a Newton step from the right of the root lands
        // left of it at worst, and from the left it never overshoots. Cap the step so
        // e^{−2σt} cannot overflow from a far-left start.
        let step = (grad(t) / curv(t)).clamp(-5.0, 5.0);
        t += step;
        if step.abs() <= 1e-13 * (1.0 + t.abs()) {
            break;
        }
    }
    (t, curv(t))
}

/// Update the scale's factor from the samples of (`x`, `residuals`, `shifts`) and re-express
/// them at the new scale (see the module docs). `mask` marks the free entries of x; ξ_a
/// must be held (0) in it. Returns `None` when no excitation is free.
pub fn update(
    model: &Model,
    mask: &[f64],
    x: &mut [f64],
    residuals: &mut [Vec<f64>],
    shifts: &mut [Vec<f64>],
) -> Option<ScaleFactor> {
    let nxi = model.icr.n_xi();
    let layout = &model.dom.x;
    let free = layout.sum(|i| if i < nxi { mask[i] } else { 0.0 });
    if free < 1.0 || residuals.is_empty() {
        return None;
    }
    let n_samples = 2 * residuals.len();
    let mut xs = x.to_vec();
    let mut power = 0.0;
    for j in 0..n_samples {
        super::sample_point(x, residuals, shifts, j, &mut xs);
        power += layout.sum(|i| {
            if i < nxi {
                mask[i] * xs[i] * xs[i]
            } else {
                0.0
            }
        });
    }
    let moment = power / (n_samples as f64 * free);
    let before = model.scale.value(x[nxi]);
    let m2 = before * before * moment * free;
    let (t, curv) = scale_mode(&model.scale, free, m2, x[nxi]);
    let scale = model.scale.value(t);
    let ratio = before / scale;
    let rescale = |v: &mut [f64]| v[..nxi].iter_mut().for_each(|e| *e *= ratio);
    rescale(x);
    residuals.iter_mut().for_each(|d| rescale(d));
    shifts.iter_mut().for_each(|c| rescale(c));
    x[nxi] = t;
    let sigma = model.scale.mu_sigma().1;
    tracing::debug!(
        free,
        moment = format!("{moment:.4}"),
        "scale's own factor: {before:.4} -> {scale:.4}"
    );
    Some(ScaleFactor {
        scale,
        std: scale * sigma / curv.sqrt(),
        free,
        moment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ln q(ξ_a) of the module docs.
    fn log_q(prior: &LogNormal, n: f64, m2: f64, t: f64) -> f64 {
        let a = prior.value(t);
        -0.5 * t * t - n * a.ln() - m2 / (2.0 * a * a)
    }

    #[test]
    fn the_mode_is_the_maximum_of_the_factor_and_its_curvature_the_second_derivative() {
        let prior = LogNormal::from_mean_std(1.0, 0.5);
        for (n, m2, t0) in [(5000.0, 4000.0, 0.0), (3.0, 0.5, -8.0), (1e6, 3e6, 6.0)] {
            let (t, curv) = scale_mode(&prior, n, m2, t0);
            let h = 1e-4;
            let (lo, mid, hi) = (
                log_q(&prior, n, m2, t - h),
                log_q(&prior, n, m2, t),
                log_q(&prior, n, m2, t + h),
            );
            assert!(mid >= lo && mid >= hi, "not a maximum at {t} (n {n})");
            let fd = -(hi - 2.0 * mid + lo) / (h * h);
            assert!((fd - curv).abs() <= 1e-4 * curv, "curvature {curv} vs {fd}");
        }
    }

    /// ln ρ = scale · s + offset of every sample of (x, residuals, shifts), voxel-major.
    fn sample_fields(
        model: &Model,
        x: &[f64],
        residuals: &[Vec<f64>],
        shifts: &[Vec<f64>],
    ) -> Vec<Vec<f64>> {
        let nxi = model.icr.n_xi();
        let mut iw = model.icr.workspace();
        let mut xs = x.to_vec();
        (0..2 * residuals.len())
            .map(|j| {
                crate::inference::mgvi::sample_point(x, residuals, shifts, j, &mut xs);
                model.icr.forward(&xs[..nxi], &mut iw);
                let (a, o) = (model.scale.value(xs[nxi]), model.offset.value(xs[nxi + 1]));
                iw.fields[model.icr.chart.levels]
                    .iter()
                    .map(|s| a * s + o)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_update_leaves_every_sample_map_unchanged_and_takes_the_mode() {
        let model = crate::inference::mgvi::tests::tiny_model(200);
        let (np, nxi) = (model.n_params(), model.icr.n_xi());
        let mut draw = crate::inference::mgvi::tests::normals(31);
        let mut mask = vec![1.0; np];
        mask[nxi] = 0.0;
        let mut x = draw(np, 1.5);
        x[nxi] = 0.4;
        // geoVI-like pairs (shifts) too; held ξ_a: no residual there
        let mut residuals: Vec<Vec<f64>> = (0..2).map(|_| draw(np, 0.5)).collect();
        let mut shifts: Vec<Vec<f64>> = (0..2).map(|_| draw(np, 0.1)).collect();
        for v in residuals.iter_mut().chain(shifts.iter_mut()) {
            v[nxi] = 0.0;
        }
        let before = sample_fields(&model, &x, &residuals, &shifts);
        // the samples' mean power per excitation, summed directly
        let mut xs = x.clone();
        let power: f64 = (0..4)
            .map(|j| {
                crate::inference::mgvi::sample_point(&x, &residuals, &shifts, j, &mut xs);
                xs[..nxi].iter().map(|v| v * v).sum::<f64>()
            })
            .sum::<f64>()
            / (4.0 * nxi as f64);
        let f = update(&model, &mask, &mut x, &mut residuals, &mut shifts).unwrap();
        assert_eq!(f.free, nxi as f64);
        assert!((f.moment - power).abs() <= 1e-12 * power);
        let a0 = model.scale.value(0.4);
        let (t, _) = scale_mode(&model.scale, f.free, a0 * a0 * power * f.free, 0.0);
        assert!((f.scale - model.scale.value(t)).abs() <= 1e-12 * f.scale);
        assert!((model.scale.value(x[nxi]) - f.scale).abs() <= 1e-12 * f.scale);
        assert!(
            f.scale > a0,
            "samples with 2.5x the prior's power raise the scale"
        );
        let after = sample_fields(&model, &x, &residuals, &shifts);
        for (b, a) in before.iter().zip(&after) {
            for (u, v) in b.iter().zip(a) {
                assert!((u - v).abs() <= 1e-10 * (1.0 + u.abs()), "{u} vs {v}");
            }
        }
    }

    #[test]
    fn the_update_recovers_the_scale_of_samples_with_known_power() {
        // samples whose fields are draws of scale a_true, expressed at the current scale a:
        // ξ = (a_true / a) z with z standard normal. The update must land on a_true within the
        // statistical error of N·K squared normals (relative 1/√(2NK)), plus the prior's pull
        // (relative |ξ_a| / (2 N σ)), whatever the current scale.
        let model = crate::inference::mgvi::tests::tiny_model(50);
        let (np, nxi) = (model.n_params(), model.icr.n_xi());
        let mut mask = vec![1.0; np];
        mask[nxi] = 0.0;
        let sigma = model.scale.mu_sigma().1;
        for (seed, t_now, a_true) in [(3, 0.0, 0.9), (4, -2.0, 0.9), (5, 1.5, 0.4)] {
            let mut draw = crate::inference::mgvi::tests::normals(seed);
            let a_now = model.scale.value(t_now);
            let mut x = vec![0.0; np];
            x[nxi] = t_now;
            let mut residuals: Vec<Vec<f64>> = (0..2).map(|_| draw(np, a_true / a_now)).collect();
            residuals.iter_mut().for_each(|d| d[nxi] = 0.0);
            let f = update(&model, &mask, &mut x, &mut residuals, &mut []).unwrap();
            let n_k = nxi as f64 * 2.0; // two antithetic pairs: two independent draws
            let tol = 4.0 / (2.0 * n_k).sqrt() + 3.0 / (2.0 * nxi as f64 * sigma);
            assert!(
                (f.scale / a_true - 1.0).abs() <= tol,
                "seed {seed}: {} vs {a_true} (tolerance {tol:.3})",
                f.scale
            );
            // the Laplace spread: relative 1/√(2N) for many excitations
            let rel = f.std / f.scale;
            assert!(
                (rel * (2.0 * nxi as f64).sqrt() - 1.0).abs() < 0.05,
                "{rel}"
            );
        }
    }

    #[test]
    fn with_many_excitations_the_scale_matches_the_samples_power() {
        // N → ∞: the prior on ξ_a is negligible and a² → E|φ|²/N
        let prior = LogNormal::from_mean_std(1.0, 0.5);
        let n = 1e8;
        let (t, _) = scale_mode(&prior, n, 0.81 * n, 0.0);
        assert!((prior.value(t) - 0.9).abs() < 1e-6, "{}", prior.value(t));
    }
}
