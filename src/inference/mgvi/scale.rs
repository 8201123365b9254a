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
//!
//! That update is expectation–maximisation for the scale, and converges as slowly as EM does
//! when most excitations are prior-dominated: each iteration moves the scale by the share
//! of the power that the data determine (on the demo grid's prior draw a few per cent per
//! iteration, still rising after 40). `ScaleUpdate::Evidence` (`"evidence"`) solves for the
//! evidence's fixed point instead, reading only the directions the data determine. With the
//! metric M = I + A at the point the residuals are drawn (A the likelihood's Fisher metric
//! in standardized coordinates) and W = M⁻¹A, a linear-Gaussian posterior at the true scale
//! has E[ξ̄ᵀWξ̄] = tr W² over the free excitations; at a scale a instead of a_true, in an
//! eigendirection of A with eigenvalue λ (W's is w = λ/(1+λ)), the expectation is
//! w² · (λ r + 1)/(1 + λ) with r = (a_true/a)²: r times tr W²'s share where the data pin
//! the direction (λ ≫ 1), that share unchanged where they do not. So the factor above is
//! taken with N replaced by tr W² and E_q|φ|² by a² ξ̄ᵀWξ̄: its mode has
//! a² ← a² · ξ̄ᵀWξ̄ / tr W² without the prior, which lands
//! on the scale at once where the data pin the field, and its Laplace spread counts the
//! determined excitations instead of all. tr W² is estimated from each residual δ ~ N(0,
//! M⁻¹) as (Aδ)ᵀM⁻¹(Aδ): with M δ = y, Aδ = y − δ and the form is yᵀ(M⁻¹ − 2M⁻² + M⁻³)y,
//! which the sampling CG's own Lanczos quadrature gives at no further solve (over every
//! free coordinate, so the offset adds its one determined direction); ξ̄ᵀWξ̄ = |ξ̄|² −
//! ξ̄ᵀM⁻¹ξ̄ over the free excitations costs one metric solve per iteration. The samples' CG
//! must converge: what an unconverged residual lacks biases both. Weighting by W keeps out the
//! directions where MGVI's mean is pushed by a one-sided likelihood (a voxel the data see
//! only as "little dust": A ≈ 0 there), whose power the plain evidence update
//! (ξ̄ᵀξ̄ over tr W) and EM count and then run away on.

use crate::likelihood::mask::Mask;
use crate::likelihood::model::Model;
use crate::num::cg::{CgReport, CgSettings};
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
    /// Its own factor at the evidence's fixed point, read in the directions the data
    /// determine (this module).
    Evidence,
}

/// What one update of the scale's own factor found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleFactor {
    /// Mode of q(ξ_a), as the scale.
    pub scale: f64,
    /// The scale before this update.
    pub previous: f64,
    /// Standard deviation of the scale under the Laplace approximation of q(ξ_a).
    pub std: f64,
    /// Free excitations N.
    pub free: f64,
    /// mean_j |ξ_e^(j)|² / N at the old scale: 1 for a posterior with the prior's power.
    pub moment: f64,
}

/// What the data determine about the field at the point the residuals are drawn, from
/// the metric M = I + A there (A the likelihood's Fisher metric) and W = M⁻¹A, over the
/// free excitations: the sums the evidence update of the scale reads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Evidence {
    /// γ = E δᵀAδ = tr W: the number of excitations the data determine.
    pub gamma: f64,
    /// |ξ̄|².
    pub power: f64,
    /// ξ̄ᵀWξ̄: the power of the expansion point where the data determine it.
    pub power_w: f64,
    /// E (Aδ)ᵀM⁻¹(Aδ) = tr W²: that power's expectation at the true scale.
    pub spread_w: f64,
    /// Solves behind these sums that stopped at their cap above their tolerance.
    pub capped: usize,
}

/// Σ f(i) over this rank's excitations, summed over all ranks.
fn excitation_sum(model: &Model, f: &(dyn Fn(usize) -> f64 + Sync)) -> f64 {
    let nxi = model.icr.n_xi();
    model.dom.x.sum(|i| if i < nxi { f(i) } else { 0.0 })
}

impl Evidence {
    /// Start the sums at the expansion point `x`.
    pub fn at(
        model: &Model,
        lin: &impl super::sampling::Fisher,
        x: &[f64],
        cg: &CgSettings,
    ) -> anyhow::Result<Self> {
        let mut u = vec![0.0; lin.dim()];
        u[..x.len()].copy_from_slice(x);
        let mut z = vec![0.0; u.len()];
        let rep = lin.solve(&u, &mut z, cg)?;
        Ok(Self {
            power: excitation_sum(model, &|i| u[i] * u[i]),
            power_w: excitation_sum(model, &|i| u[i] * (u[i] - z[i])),
            capped: usize::from(rep.stopped_at_cap(cg)),
            ..Default::default()
        })
    }

    /// Add one residual δ of `pairs` (its share of γ and of tr W²), drawn by solving
    /// M δ = y from δ = 0 with the report `solved` (its moments are then y's).
    pub fn add_residual(
        &mut self,
        model: &Model,
        lin: &impl super::sampling::Fisher,
        delta: &[f64],
        solved: &CgReport,
        pairs: usize,
        cg: &CgSettings,
    ) -> anyhow::Result<()> {
        let mut a = vec![0.0; delta.len()];
        lin.metric(delta, &mut a)?;
        a.iter_mut().zip(delta).for_each(|(ai, di)| *ai -= di);
        let spread = if lin.dim() == model.n_params() {
            // Aδ = y − δ, so (Aδ)ᵀM⁻¹(Aδ) = yᵀ(M⁻¹ − 2M⁻² + M⁻³)y: the sampling solve's own
            // Gauss quadrature, no further solve (over every free coordinate: the offset
            // adds its one determined direction)
            let [m1, m2, m3] = solved.inverse_moments;
            m1 - 2.0 * m2 + m3
        } else {
            // n_σ sampled too: its directions stay out of the sum, at the cost of a solve
            let mut z = vec![0.0; a.len()];
            self.capped += usize::from(lin.solve(&a, &mut z, cg)?.stopped_at_cap(cg));
            excitation_sum(model, &|i| a[i] * z[i])
        };
        let w = 1.0 / pairs as f64;
        self.gamma += w * excitation_sum(model, &|i| delta[i] * a[i]);
        self.spread_w += w * spread;
        Ok(())
    }
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

/// The most the evidence's update moves ξ_a in one iteration: one prior standard deviation
/// (a factor e^σ on the scale, 1.6 for the shipped prior). Where the map does not fit its
/// columns yet the fixed point it reads is far from the posterior's, and unbounded steps
/// overshoot it (the reference implementation's W0 mock after a first stage without σ_a²:
/// 0.17 → 0.013 → 0.75 → 0.005 → … → 5.4 and overflow); the prior-draw mock's steps are
/// at most half of it (its fit is byte-identical with and without the cap).
pub const EVIDENCE_MAX_STEP: f64 = 1.0;

/// ξ_a after the evidence's update: its factor's mode, at most [`EVIDENCE_MAX_STEP`] away.
fn evidence_step(now: f64, mode: f64) -> f64 {
    // a mode that is not a number passes through, for the caller to hold the scale
    if !mode.is_finite() || (mode - now).abs() <= EVIDENCE_MAX_STEP {
        return mode;
    }
    let to = now + EVIDENCE_MAX_STEP.copysign(mode - now);
    tracing::info!(
        "the scale's evidence update: its mode {mode:.3} is more than {EVIDENCE_MAX_STEP} \
         prior standard deviation from ξ_scale {now:.3}; moved to {to:.3}"
    );
    to
}

/// The samples' power Σ ξ² over the free excitations of `mask`, summed over the samples.
fn samples_power(
    model: &Model,
    mask: &Mask,
    x: &[f64],
    residuals: &[Vec<f64>],
    shifts: &[Vec<f64>],
) -> f64 {
    let (nxi, layout) = (model.icr.n_xi(), &model.dom.x);
    let n_samples = 2 * residuals.len();
    let mut xs = x.to_vec();
    let mut power = 0.0;
    for j in 0..n_samples {
        super::sample_point(x, residuals, shifts, j, &mut xs);
        power += layout.sum(|i| {
            if i < nxi && mask.is_free(i) {
                xs[i] * xs[i]
            } else {
                0.0
            }
        });
    }
    power
}

/// Update the scale's factor from the samples of (`x`, `residuals`, `shifts`) and re-express
/// them at the new scale (see the module docs). `mask` marks the free entries of x; ξ_a
/// must be held (0) in it. With `determined` (the sums of [`Evidence`] from this
/// iteration's residuals) the factor is the evidence's; without, the samples' moment.
/// Returns `None` when no excitation is free, or when the evidence's expansion point carries
/// no power where the data determine it (ξ̄ᵀWξ̄ ≤ 0: a fit's first iteration from ξ = 0, where
/// the factor's mode would be a scale of 0), or when the mode is not a finite positive
/// scale; x and the samples are then left as they were.
pub fn update(
    model: &Model,
    mask: &Mask,
    x: &mut [f64],
    residuals: &mut [Vec<f64>],
    shifts: &mut [Vec<f64>],
    determined: Option<Evidence>,
) -> Option<ScaleFactor> {
    let nxi = model.icr.n_xi();
    let layout = &model.dom.x;
    let free = layout.sum(|i| if i < nxi && mask.is_free(i) { 1.0 } else { 0.0 });
    if free < 1.0 || residuals.is_empty() {
        return None;
    }
    if determined.is_some_and(|e| e.power_w <= 0.0) {
        tracing::info!(
            "the scale's evidence update: no determined power at the expansion point yet \
             (a start from ξ = 0); scale held this iteration"
        );
        return None;
    }
    // in this order, as the bits of every fit so far
    let power = samples_power(model, mask, x, residuals, shifts);
    let moment = power / (2.0 * residuals.len() as f64 * free);
    let before = model.scale.value(x[nxi]);
    // the evidence's count and power both read in the directions the data determine
    let (n, m2) = match determined {
        Some(e) => (e.spread_w.max(1.0), before * before * e.power_w),
        None => (free, before * before * moment * free),
    };
    if let Some(e) = determined {
        tracing::debug!(
            gamma = e.gamma,
            power = e.power,
            power_w = e.power_w,
            trace_w2 = e.spread_w,
            "the scale's evidence sums"
        );
    }
    let (mode, curv) = scale_mode(&model.scale, n, m2, x[nxi]);
    let t = match determined {
        Some(_) => evidence_step(x[nxi], mode),
        None => mode,
    };
    let scale = model.scale.value(t);
    let ratio = before / scale;
    if !(ratio.is_finite() && ratio > 0.0 && curv.is_finite()) {
        // the sums were not numbers (a non-finite sample): hold rather than rescale by it
        tracing::warn!(
            scale,
            "the scale's own factor has no finite mode: scale held"
        );
        return None;
    }
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
        previous: before,
        std: scale * sigma / curv.sqrt(),
        free,
        moment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter count, excitation count and a mask that holds only the scale (as a stage
    /// with the scale in its own factor has it).
    fn scale_held(model: &Model) -> (usize, usize, Mask) {
        let (np, nxi) = (model.n_params(), model.icr.n_xi());
        (np, nxi, Mask::holding([nxi]))
    }

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
        let mask = Mask::holding([nxi]);
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
        let f = update(&model, &mask, &mut x, &mut residuals, &mut shifts, None).unwrap();
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
    fn the_evidence_update_holds_the_scale_where_the_point_carries_no_determined_power() {
        // a fit's first iteration from ξ = 0: ξ̄ᵀWξ̄ = 0, whose mode would be a scale of 0
        // (and every excitation rescaled by an infinite factor)
        let model = crate::inference::mgvi::tests::tiny_model(50);
        let (np, _, mask) = scale_held(&model);
        let mut draw = crate::inference::mgvi::tests::normals(9);
        let mut x = vec![0.0; np];
        let mut residuals: Vec<Vec<f64>> = (0..2).map(|_| draw(np, 0.5)).collect();
        let (x0, r0) = (x.clone(), residuals.clone());
        let at_zero = Evidence {
            gamma: 20.0,
            spread_w: 15.0,
            ..Default::default()
        };
        let mut no_shifts = Vec::new();
        let f = update(
            &model,
            &mask,
            &mut x,
            &mut residuals,
            &mut no_shifts,
            Some(at_zero),
        );
        assert!(f.is_none());
        assert_eq!((x, residuals), (x0, r0));
    }

    #[test]
    fn the_evidence_update_moves_the_scale_at_most_one_prior_sd() {
        // determined power 100× what the current scale predicts: the factor's mode lies
        // ln(10)/σ ≈ 4.9 prior standard deviations up; the update moves exactly one, and the
        // samples' fields are unchanged by the re-expression as for any step
        let model = crate::inference::mgvi::tests::tiny_model(50);
        let (np, nxi, mask) = scale_held(&model);
        let mut draw = crate::inference::mgvi::tests::normals(11);
        let mut x = draw(np, 1.0);
        x[nxi] = 0.3;
        let mut residuals: Vec<Vec<f64>> = (0..2).map(|_| draw(np, 0.5)).collect();
        residuals.iter_mut().for_each(|d| d[nxi] = 0.0);
        let before = sample_fields(&model, &x, &residuals, &[]);
        let far = Evidence {
            power_w: 100.0 * 40.0,
            spread_w: 40.0,
            ..Default::default()
        };
        let f = update(&model, &mask, &mut x, &mut residuals, &mut [], Some(far)).unwrap();
        assert!(
            (x[nxi] - (0.3 + EVIDENCE_MAX_STEP)).abs() < 1e-12,
            "ξ_a {}",
            x[nxi]
        );
        assert!(f.scale > f.previous);
        let after = sample_fields(&model, &x, &residuals, &[]);
        for (b, a) in before.iter().zip(&after) {
            for (u, v) in b.iter().zip(a) {
                assert!((u - v).abs() <= 1e-10 * (1.0 + u.abs()), "{u} vs {v}");
            }
        }
        // within one standard deviation the mode itself is taken
        assert_eq!(evidence_step(0.3, 0.9), 0.9);
        assert_eq!(evidence_step(0.3, -2.0), 0.3 - EVIDENCE_MAX_STEP);
        assert!(evidence_step(0.3, f64::NAN).is_nan());
    }

    #[test]
    fn the_update_recovers_the_scale_of_samples_with_known_power() {
        // samples whose fields are draws of scale a_true, expressed at the current scale a:
        // ξ = (a_true / a) z with z standard normal. The update must land on a_true within the
        // statistical error of N·K squared normals (relative 1/√(2NK)), plus the prior's pull
        // (relative |ξ_a| / (2 N σ)), whatever the current scale.
        let model = crate::inference::mgvi::tests::tiny_model(50);
        let (np, nxi, mask) = scale_held(&model);
        let sigma = model.scale.mu_sigma().1;
        for (seed, t_now, a_true) in [(3, 0.0, 0.9), (4, -2.0, 0.9), (5, 1.5, 0.4)] {
            let mut draw = crate::inference::mgvi::tests::normals(seed);
            let a_now = model.scale.value(t_now);
            let mut x = vec![0.0; np];
            x[nxi] = t_now;
            let mut residuals: Vec<Vec<f64>> = (0..2).map(|_| draw(np, a_true / a_now)).collect();
            residuals.iter_mut().for_each(|d| d[nxi] = 0.0);
            let f = update(&model, &mask, &mut x, &mut residuals, &mut [], None).unwrap();
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

    #[test]
    fn the_evidence_sums_estimate_the_traces_they_stand_for() {
        // dense M = I + A at a point of the tiny model (ξ_a held, as the update holds it),
        // W = M⁻¹A: γ is unbiased for tr_e W over the excitations and the spread for tr W²
        // over the free coordinates, the power is ξ̄ᵀWξ̄ exactly (up to the CG tolerance)
        use crate::inference::mgvi::sampling::{draw_residual_in, Fisher, ModelAt};
        use faer::linalg::solvers::Solve;
        let model = crate::inference::mgvi::tests::tiny_model(300);
        let (np, nxi) = (model.n_params(), model.icr.n_xi());
        let mut g = crate::inference::mgvi::tests::normals(5);
        let x = g(np, 0.3);
        let xsig = vec![0.0; model.data.len()];
        let st = model.state(&x, &xsig, &mut model.workspace()).unwrap();
        let mask = Mask::holding([nxi]);
        let lin = ModelAt::new(&model, &st, &mask);
        let mut m = faer::Mat::<f64>::zeros(np, np);
        let (mut e, mut col) = (vec![0.0; np], vec![0.0; np]);
        for j in 0..np {
            e[j] = 1.0;
            lin.metric(&e, &mut col).unwrap();
            e[j] = 0.0;
            (0..np).for_each(|i| m[(i, j)] = col[i]);
        }
        let minv = m
            .llt(faer::Side::Lower)
            .unwrap()
            .solve(faer::Mat::<f64>::identity(np, np));
        let w = &minv * (&m - faer::Mat::<f64>::identity(np, np));
        let w2 = &w * &w;
        let tr_w: f64 = (0..nxi).map(|i| w[(i, i)]).sum();
        let tr_w2: f64 = (0..np).map(|i| w2[(i, i)]).sum();
        let power_w: f64 = (0..nxi)
            .map(|i| x[i] * (0..np).map(|j| w[(i, j)] * x[j]).sum::<f64>())
            .sum();
        assert!(
            tr_w > 5.0 && tr_w2 < tr_w && tr_w < nxi as f64,
            "{tr_w} {tr_w2}"
        );
        let cg = crate::num::cg::CgSettings {
            rel_tol: 1e-9,
            max_iter: 3000,
            ..Default::default()
        };
        let at = Evidence::at(&model, &lin, &x, &cg).unwrap();
        assert!(
            (at.power_w - power_w).abs() <= 1e-6 * power_w,
            "{} vs {power_w}",
            at.power_w
        );
        let draws = 60;
        let (mut gam, mut spr) = (Vec::new(), Vec::new());
        for k in 0..draws {
            let (mut d, rep, _) = draw_residual_in(&lin, 11, k, &cg).unwrap();
            assert!(rep.rel_residual <= 1e-9, "{rep:?}");
            d[nxi] = 0.0;
            let mut one = Evidence::default();
            one.add_residual(&model, &lin, &d, &rep, 1, &cg).unwrap();
            gam.push(one.gamma);
            spr.push(one.spread_w);
        }
        for (name, v, want) in [("gamma", &gam, tr_w), ("spread", &spr, tr_w2)] {
            let mean = v.iter().sum::<f64>() / draws as f64;
            let sd =
                (v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (draws as f64 - 1.0)).sqrt();
            let tol = 4.0 * sd / (draws as f64).sqrt();
            assert!(
                (mean - want).abs() <= tol,
                "{name}: {mean} vs {want} (tolerance {tol})"
            );
        }
    }
}
