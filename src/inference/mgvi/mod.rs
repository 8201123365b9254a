//! Metric Gaussian variational inference (paper §5, App. B): antithetic residuals drawn by
//! conjugate gradients from `N(0, M⁻¹)` ([`sampling`]), optionally bent along the posterior
//! by geoVI ([`geovi`]), and the KL — the sample average of
//! the energy — minimised over the expansion point and the per-star ξ_σ by truncated
//! Newton-CG with the sample-averaged metric ([`kl`]). [`global_iteration`] is one round of
//! both; the schedule of rounds lives in `app::fit`.

pub mod geovi;
pub mod kl;
mod moments;
pub mod sampling;
pub mod scale;

use anyhow::{Context, Result};

use crate::inference::newton::{self, NewtonReport, NewtonSettings};
use crate::likelihood::mask::Mask;
use crate::likelihood::model::Model;
use crate::sphere::decomp::Space;
pub use kl::{Kl, KlTimes};
use moments::{log_density_moments, log_density_moments_of, z_rms_change};
pub use sampling::{
    draw_residual, draw_residual_in, draw_residuals_in, sample_point, Fisher, ModelAt,
};
use sampling::{draw_samples, Draws};
pub use scale::{ScaleFactor, ScaleUpdate};

/// What MGVI carries from one global iteration to the next (and a checkpoint stores).
#[derive(Clone, Debug, PartialEq)]
pub struct MgviState {
    /// Expansion point x = [ξ_e | ξ_scale | ξ_offset] (standardized coordinates).
    pub x: Vec<f64>,
    /// Point estimates ξ_σ of the current stage's stars.
    pub xsig: Vec<f64>,
    /// Residuals δ_k of the last global iteration (samples are x + c_k ± δ_k), over x, or
    /// over p = [x | ξ_σ] when n_σ is sampled.
    pub residuals: Vec<Vec<f64>>,
    /// geoVI's shifts c_k, the even part of each nonlinear sample pair; empty for MGVI
    /// (c_k = 0: antithetic pairs x ± δ_k).
    pub shifts: Vec<Vec<f64>>,
}

impl MgviState {
    /// The prior median: x = 0 with `n_params` entries, no stars, no residuals yet.
    pub fn start(n_params: usize) -> Self {
        Self {
            x: vec![0.0; n_params],
            xsig: Vec::new(),
            residuals: Vec::new(),
            shifts: Vec::new(),
        }
    }

    /// Number of posterior samples (two per pair).
    pub fn n_samples(&self) -> usize {
        2 * self.residuals.len()
    }

    /// Posterior sample `j` of x or of p = [x | ξ_σ] (pair j / 2; + δ for even j, − δ for
    /// odd) about the expansion point `x` (x or p) into `out`.
    pub fn sample_into(&self, x: &[f64], j: usize, out: &mut [f64]) {
        sample_point(x, &self.residuals, &self.shifts, j, out)
    }

    /// Entry `i` of posterior sample `j` about the expansion point `self.x` (as
    /// [`MgviState::sample_into`] writes it, without the whole vector).
    pub fn sample_entry(&self, j: usize, i: usize) -> f64 {
        let sign = if j.is_multiple_of(2) { 1.0 } else { -1.0 };
        let shift = self.shifts.get(j / 2).map_or(0.0, |c| c[i]);
        self.x[i] + (shift + sign * self.residuals[j / 2][i])
    }
}

impl MgviState {
    /// The state of a coarse stage's model, whose excitations are the first `n_coarse` of
    /// the `n_full` ones here (its chart ends at a coarser level): every vector keeps those
    /// and everything after the excitations (the global latents, ξ_σ where sampled).
    pub fn restricted(&self, n_coarse: usize, n_full: usize) -> MgviState {
        let cut = |v: &Vec<f64>| [&v[..n_coarse], &v[n_full..]].concat();
        MgviState {
            x: cut(&self.x),
            xsig: self.xsig.clone(),
            residuals: self.residuals.iter().map(cut).collect(),
            shifts: self.shifts.iter().map(cut).collect(),
        }
    }

    /// Write a coarse stage's state (see [`MgviState::restricted`]) back: its entries
    /// replace the coarse ones here; the finer excitations keep their expansion point and
    /// have no spread in the samples.
    pub fn absorb(&mut self, coarse: MgviState, n_coarse: usize, n_full: usize) {
        let widen = |c: &[f64], keep: &[f64]| {
            [&c[..n_coarse], &keep[n_coarse..n_full], &c[n_coarse..]].concat()
        };
        self.x = widen(&coarse.x, &self.x);
        let zeros = vec![0.0; n_full];
        self.residuals = coarse.residuals.iter().map(|r| widen(r, &zeros)).collect();
        self.shifts = coarse.shifts.iter().map(|r| widen(r, &zeros)).collect();
        self.xsig = coarse.xsig;
    }
}

/// Settings of one global iteration: how samples are drawn and how far the KL is minimised.
#[derive(Clone, Debug, PartialEq)]
pub struct IterationSettings {
    /// Antithetic sample pairs.
    pub sample_pairs: usize,
    /// Cap of CG iterations per residual draw.
    pub sample_cg_iterations: usize,
    /// Relative residual at which a residual draw's CG stops.
    pub sample_cg_tolerance: f64,
    /// Newton steps of the KL minimisation.
    pub newton_steps: usize,
    /// Cap of CG iterations inside one Newton step.
    pub newton_cg_iterations: usize,
    /// Relative residual at which a Newton step's inner CG stops.
    pub newton_forcing: f64,
    /// How samples are drawn: linear MGVI residuals, or refined by geoVI.
    pub mode: SampleMode,
    /// Whether the samples cover the per-star ξ_σ too (else ξ_σ is a point estimate, the
    /// same in every sample); only when the model infers n_σ.
    pub sample_nsigma: bool,
    /// How the field's scale is inferred: in MGVI's Gaussian, or in its own factor
    /// ([`scale`]).
    pub scale_update: ScaleUpdate,
}

/// How the residual samples of an iteration are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SampleMode {
    /// Metric Gaussian VI: antithetic linear residuals ±M̄⁻¹ y.
    Mgvi,
    /// Geometric VI: each linear residual refined by solving the coordinate equation
    /// ([`geovi`]).
    GeoVi(geovi::GeoSettings),
}

impl Default for IterationSettings {
    /// 2 MGVI pairs, sampling CG ≤ 100 iterations to 1e-3, 5 Newton steps of ≤ 50 CG
    /// iterations to relative residual 0.1.
    fn default() -> Self {
        Self {
            mode: SampleMode::Mgvi,
            sample_nsigma: false,
            scale_update: ScaleUpdate::default(),
            sample_pairs: 2,
            sample_cg_iterations: 100,
            sample_cg_tolerance: 1e-3,
            newton_steps: 5,
            newton_cg_iterations: 50,
            newton_forcing: 0.1,
        }
    }
}

/// The random streams of one global iteration: master seed, stage and iteration index.
#[derive(Clone, Copy, Debug)]
pub struct Streams {
    /// Master seed of the run.
    pub seed: u64,
    /// Stage of the schedule.
    pub stage: usize,
    /// Global iteration within the stage.
    pub iteration: usize,
}

/// Every entry of x free: a stage with fewer levels runs on its own chart's model instead of
/// holding the finer excitations.
pub fn free_mask() -> Mask {
    Mask::all_free()
}

/// What one global MGVI iteration did.
#[derive(Clone, Debug)]
pub struct IterationReport {
    /// KL (sample-averaged energy) after the Newton steps.
    pub kl: f64,
    /// CG iterations of each residual draw.
    pub sample_cg: Vec<usize>,
    /// Relative residual of each residual draw's CG.
    pub sample_cg_residuals: Vec<f64>,
    /// Residual draws whose CG stopped at its cap above its tolerance.
    pub sample_cg_capped: usize,
    /// Newton minimisation summary.
    pub newton: NewtonReport,
    /// How far the iteration moved the posterior (convergence measures).
    pub change: Change,
    /// The update of the scale's own factor (`ScaleUpdate::Marginal` or `Evidence`; `None`
    /// where an update was held: unconverged solves, no determined power yet, no finite
    /// mode).
    pub scale: Option<ScaleFactor>,
    /// Where the iteration's wall-clock time went.
    pub timings: IterationTimings,
}

/// Wall-clock seconds of one global iteration's parts. A part's products are the operator
/// applications inside its CG solves (on a device, the whole device solve); the rest of a
/// part is the CGs' vector updates, the line search's bookkeeping, the sampling's
/// right-hand sides and geoVI's refinement.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IterationTimings {
    /// Drawing the residuals (their right-hand sides and CG solves), seconds.
    pub sampling_s: f64,
    /// Metric products inside the sampling CGs (their likelihood parts: on the host CG adds
    /// the identity in its own pass), seconds.
    pub sampling_products_s: f64,
    /// Minimising the KL (the Newton steps), seconds.
    pub newton_s: f64,
    /// Evaluations of the KL's value and gradient (every sample's energy), seconds.
    pub kl_evaluations_s: f64,
    /// Sample-averaged metric products inside the Newton CGs (likelihood parts, as in the
    /// sampling), seconds.
    pub newton_products_s: f64,
    /// The whole iteration (the scale's own update included), seconds.
    pub total_s: f64,
}

impl IterationTimings {
    /// One debug line with the parts and their products.
    fn log(&self) {
        let f = |s: f64| format!("{s:.2}");
        tracing::debug!(
            sampling_s = f(self.sampling_s),
            sampling_products_s = f(self.sampling_products_s),
            newton_s = f(self.newton_s),
            kl_evaluations_s = f(self.kl_evaluations_s),
            newton_products_s = f(self.newton_products_s),
            total_s = f(self.total_s),
            "MGVI iteration timings"
        );
    }
}

/// How much one global iteration changed the approximate posterior, with this iteration's
/// samples held fixed: so the measures depend on the iteration alone (a resumed run decides
/// as the uninterrupted one).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Change {
    /// |KL after − KL before| / max(|KL after|, 1): the KL at the old expansion point with the
    /// new samples against the KL after the Newton steps.
    pub kl_relative: f64,
    /// RMS change of the expansion point x̄ per parameter, standardized units.
    pub step_rms: f64,
    /// RMS over the kept voxels of the change of the sample mean of ln ρ, in units of the
    /// samples' standard deviation of ln ρ at the voxel.
    pub map_z_rms: f64,
    /// How far the scale's own factor moved its mode, in units of its reported standard
    /// deviation (0 when the scale is joint with the map; infinite when an evidence update
    /// was refused, so that such an iteration never ends a stage).
    pub scale_z: f64,
}

/// When a stage may end before its iteration cap: every [`Change`] measure of an iteration
/// at or below its tolerance (a tolerance of 0 never ends a stage).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Convergence {
    /// Tolerance of [`Change::kl_relative`].
    pub kl_rtol: f64,
    /// Tolerance of [`Change::step_rms`], standardized units.
    pub step_tol: f64,
    /// Tolerance of [`Change::map_z_rms`], in posterior standard deviations.
    pub map_tol: f64,
    /// Tolerance of [`Change::scale_z`], in the scale's standard deviations.
    pub scale_tol: f64,
}

impl Convergence {
    /// Whether `c` meets every tolerance (never when a tolerance is 0).
    pub fn met_by(&self, c: &Change) -> bool {
        let tol = [self.kl_rtol, self.step_tol, self.map_tol, self.scale_tol];
        tol.iter().all(|&t| t > 0.0)
            && c.kl_relative <= self.kl_rtol
            && c.step_rms <= self.step_tol
            && c.map_z_rms <= self.map_tol
            && c.scale_z <= self.scale_tol
    }
}

/// Stream id of residual pair `pair` of global iteration (`stage`, `iteration`).
pub fn residual_stream(stage: usize, iteration: usize, pair: usize) -> u64 {
    1_000 + ((stage as u64 * 100_000 + iteration as u64) * 1_000 + pair as u64)
}

/// One global iteration: draw residuals at (x, ξ_σ), then minimise the KL over x and ξ_σ
/// with the entries `mask` holds kept fixed; updates `state` in place.
pub fn global_iteration(
    model: &Model,
    settings: &IterationSettings,
    mask: &Mask,
    state: &mut MgviState,
    streams: Streams,
) -> Result<IterationReport> {
    let t_start = std::time::Instant::now();
    let own_factor = settings.scale_update != ScaleUpdate::Joint;
    let evidence = settings.scale_update == ScaleUpdate::Evidence;
    // the scale's own factor moves it outside the Gaussian: held in sampling and KL
    let held;
    let mask = if own_factor {
        held = mask.with_held(model.icr.n_xi());
        &held
    } else {
        mask
    };
    let MgviState {
        x,
        xsig,
        residuals,
        shifts,
    } = state;
    let Draws {
        sample_cg,
        sample_cg_residuals,
        sample_cg_capped,
        determined,
        products_s: sampling_products_s,
    } = draw_samples(
        model, settings, mask, x, xsig, residuals, shifts, streams, evidence,
    )?;
    let sampling_s = t_start.elapsed().as_secs_f64();
    let t_newton = std::time::Instant::now();
    let (newton, mut change, kl_times) =
        kl_step(model, settings, mask, (x, xsig), (residuals, shifts))?;
    let newton_s = t_newton.elapsed().as_secs_f64();
    let scale = if own_factor {
        let samples = Samples {
            residuals,
            shifts,
            capped: sample_cg_capped,
        };
        scale_update(model, mask, x, samples, determined)
    } else {
        None
    };
    if own_factor {
        change.scale_z = scale.map_or(f64::INFINITY, |f| (f.scale - f.previous).abs() / f.std);
    }
    let timings = IterationTimings {
        sampling_s,
        sampling_products_s,
        newton_s,
        kl_evaluations_s: kl_times.evaluations_s,
        newton_products_s: kl_times.products_s,
        total_s: t_start.elapsed().as_secs_f64(),
    };
    timings.log();
    Ok(IterationReport {
        kl: newton.value,
        sample_cg,
        sample_cg_residuals,
        sample_cg_capped,
        newton,
        change,
        scale,
        timings,
    })
}

/// The KL of the iteration's samples minimised by Newton steps from (x, ξ_σ), which move to
/// its minimum; the Newton report, what changed (the KL, the step, the samples' mean
/// ln ρ; `scale_z` 0) and where the KL's time went.
fn kl_step(
    model: &Model,
    settings: &IterationSettings,
    mask: &Mask,
    (x, xsig): (&mut [f64], &mut [f64]),
    (residuals, shifts): (&[Vec<f64>], &[Vec<f64>]),
) -> Result<(NewtonReport, Change, kl::KlTimes)> {
    let mut p0 = x.to_vec();
    p0.extend_from_slice(xsig);
    // the samples' mean ln ρ before the Newton steps, from their first evaluation
    let kl = Kl::new(model, residuals, shifts, mask).recording_mean_at(&p0);
    let newton_settings = NewtonSettings {
        forcing: settings.newton_forcing,
        cg_max_iter: settings.newton_cg_iterations,
        rel_tol: 1e-10,
        ..Default::default()
    };
    let (p, newton) = newton::minimize(&kl, p0, settings.newton_steps as u64, newton_settings)
        .context("KL minimisation failed")?;
    // the KL's last evaluation is usually at the accepted point: its states are the samples'
    let after = kl.with_states_at(&p, |states| log_density_moments_of(model, states));
    let before = kl.recorded_mean();
    let times = kl.times();
    drop(kl);
    // (x is still the start point here)
    let map_before = before.unwrap_or_else(|| {
        tracing::debug!("no KL evaluation at the start point: ln ρ moments recomputed");
        let [mean, _] = log_density_moments(model, x, residuals, shifts);
        mean
    });
    let np = model.n_params();
    let dx: Vec<f64> = p[..np].iter().zip(x.iter()).map(|(a, b)| a - b).collect();
    x.copy_from_slice(&p[..np]);
    xsig.copy_from_slice(&p[np..]);
    let [map_after, map_std] = after.unwrap_or_else(|| {
        tracing::debug!("the KL's states are not the final point's: ln ρ moments recomputed");
        log_density_moments(model, x, residuals, shifts)
    });
    let change = Change {
        kl_relative: (newton.value - newton.initial_value).abs() / newton.value.abs().max(1.0),
        step_rms: (model.dom.x.dot(&dx, &dx) / np as f64).sqrt(),
        map_z_rms: z_rms_change(model, &map_before, &map_after, &map_std),
        scale_z: 0.0,
    };
    Ok((newton, change, times))
}

/// An iteration's residual pairs, their geoVI shifts (empty for MGVI) and how many of their
/// solves stopped at the CG cap.
struct Samples<'a> {
    residuals: &'a mut [Vec<f64>],
    shifts: &'a mut [Vec<f64>],
    capped: usize,
}

/// [`scale::update`] of the scale's own factor from `x` and the samples (re-expressed at the
/// new scale), with the evidence sums `determined` (`ScaleUpdate::Evidence`); held (`None`,
/// nothing changed) where the evidence would read samples whose solves did not converge.
fn scale_update(
    model: &Model,
    mask: &Mask,
    x: &mut [f64],
    samples: Samples<'_>,
    determined: Option<scale::Evidence>,
) -> Option<scale::ScaleFactor> {
    match determined {
        // sums from residuals that did not converge lack the spread they read: the scale
        // stays where it is rather than follow them
        Some(e) if samples.capped > 0 || e.capped > 0 => {
            tracing::warn!(
                capped = samples.capped + e.capped,
                "the scale's evidence update needs converged samples: scale held this \
                 iteration (raise sample_cg_iterations)"
            );
            None
        }
        _ => scale::update(
            model,
            mask,
            x,
            samples.residuals,
            samples.shifts,
            determined,
        ),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod convergence_tests {
    use super::*;

    #[test]
    fn a_stage_converges_only_when_every_measure_is_within_its_tolerance() {
        let tol = Convergence {
            kl_rtol: 1e-2,
            step_tol: 0.1,
            map_tol: 1.0,
            scale_tol: 1.0,
        };
        let ok = Change {
            kl_relative: 5e-3,
            step_rms: 0.05,
            map_z_rms: 0.8,
            scale_z: 0.5,
        };
        assert!(tol.met_by(&ok));
        for bad in [
            Change {
                kl_relative: 2e-2,
                ..ok
            },
            Change {
                step_rms: 0.2,
                ..ok
            },
            Change {
                map_z_rms: 1.5,
                ..ok
            },
            Change {
                scale_z: f64::INFINITY,
                ..ok
            },
        ] {
            assert!(!tol.met_by(&bad), "{bad:?}");
        }
        // a tolerance of 0 disables early stopping, even for a change of exactly 0
        let never = Convergence {
            kl_rtol: 0.0,
            ..tol
        };
        assert!(!never.met_by(&Change::default()));
    }
}
