//! Metric Gaussian variational inference (paper §5, App. B): antithetic residuals drawn by
//! conjugate gradients from `N(0, M⁻¹)` ([`sampling`]), and the KL — the sample average of
//! the energy — minimised over the expansion point and the per-star ξ_σ by truncated
//! Newton-CG with the sample-averaged metric ([`kl`]). [`global_iteration`] is one round of
//! both; the schedule of rounds lives in `app::fit`.

pub mod kl;
pub mod sampling;

use anyhow::{Context, Result};

use crate::inference::newton::{self, NewtonReport, NewtonSettings};
use crate::likelihood::mask::mask_in_place;
use crate::likelihood::model::Model;
use crate::num::cg::CgSettings;
pub use kl::Kl;
pub use sampling::{draw_residual, draw_residual_in, Fisher, ModelAt};

/// What MGVI carries from one global iteration to the next (and a checkpoint stores).
#[derive(Clone, Debug, PartialEq)]
pub struct MgviState {
    /// Expansion point x = [ξ_e | ξ_scale | ξ_offset] (standardized coordinates).
    pub x: Vec<f64>,
    /// Point estimates ξ_σ of the current stage's stars.
    pub xsig: Vec<f64>,
    /// Residuals δ_k of the last global iteration (samples are x ± δ_k).
    pub residuals: Vec<Vec<f64>>,
}

impl MgviState {
    /// The prior median: x = 0 with `n_params` entries, no stars, no residuals yet.
    pub fn start(n_params: usize) -> Self {
        Self {
            x: vec![0.0; n_params],
            xsig: Vec::new(),
            residuals: Vec::new(),
        }
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
}

impl Default for IterationSettings {
    /// 2 pairs, sampling CG ≤ 100 iterations to 1e-3, 5 Newton steps of ≤ 50 CG
    /// iterations to relative residual 0.1.
    fn default() -> Self {
        Self {
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

/// Which entries of x are free in a stage (1) or held fixed (0): ICR levels beyond the
/// stage's `levels` are held (at 0 when they first appear).
pub fn level_mask(model: &Model, levels: Option<usize>) -> Vec<f64> {
    let np = model.n_params();
    let nxi = model.icr.n_xi();
    let end = match levels {
        Some(l) if l < model.icr.levels.len() => model.icr.levels[l].xi_off,
        _ => nxi,
    };
    (0..np)
        .map(|i| if i < end || i >= nxi { 1.0 } else { 0.0 })
        .collect()
}

/// What one global MGVI iteration did.
#[derive(Clone, Debug)]
pub struct IterationReport {
    /// KL (sample-averaged energy) after the Newton steps.
    pub kl: f64,
    /// CG iterations of each residual draw.
    pub sample_cg: Vec<usize>,
    /// Newton minimisation summary.
    pub newton: NewtonReport,
}

/// Stream id of residual pair `pair` of global iteration (`stage`, `iteration`).
pub fn residual_stream(stage: usize, iteration: usize, pair: usize) -> u64 {
    1_000 + ((stage as u64 * 100_000 + iteration as u64) * 1_000 + pair as u64)
}

/// One global iteration: draw residuals at (x, ξ_σ), then minimise the KL over x and ξ_σ
/// with the entries `mask` holds (0) kept fixed; updates `state` in place.
pub fn global_iteration(
    model: &Model,
    settings: &IterationSettings,
    mask: &[f64],
    state: &mut MgviState,
    streams: Streams,
) -> Result<IterationReport> {
    let MgviState { x, xsig, residuals } = state;
    let mut w = model.workspace();
    let st = model.state(x, xsig, &mut w)?;
    let lin = ModelAt::new(model, &st, mask);
    let cg_settings = CgSettings {
        rel_tol: settings.sample_cg_tolerance,
        max_iter: settings.sample_cg_iterations,
        ..Default::default()
    };
    residuals.clear();
    let mut sample_cg = Vec::new();
    for pair in 0..settings.sample_pairs {
        let stream = residual_stream(streams.stage, streams.iteration, pair);
        let (mut d, rep) = draw_residual_in(&lin, streams.seed, stream, &cg_settings)?;
        // held entries stay where they are in every sample
        mask_in_place(&mut d, mask);
        tracing::debug!(
            pair,
            cg_iterations = rep.iterations,
            rel_residual = rep.rel_residual,
            "residual drawn"
        );
        sample_cg.push(rep.iterations);
        residuals.push(d);
    }
    drop(lin);
    drop(st);
    let kl = Kl::new(model, residuals, mask);
    let mut p0 = x.to_vec();
    p0.extend_from_slice(xsig);
    let newton_settings = NewtonSettings {
        forcing: settings.newton_forcing,
        cg_max_iter: settings.newton_cg_iterations,
        rel_tol: 1e-10,
        ..Default::default()
    };
    let (p, newton) = newton::minimize(&kl, p0, settings.newton_steps as u64, newton_settings)
        .context("KL minimisation failed")?;
    let np = model.n_params();
    x.copy_from_slice(&p[..np]);
    xsig.copy_from_slice(&p[np..]);
    Ok(IterationReport {
        kl: newton.value,
        sample_cg,
        newton,
    })
}

#[cfg(test)]
mod tests;
