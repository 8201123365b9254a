//! Metric Gaussian variational inference (paper §5, App. B; DESIGN.md §4): antithetic
//! residuals drawn by conjugate gradients from `N(0, M⁻¹)`, and the KL — the sample average
//! of the energy — minimised over the expansion point and the per-star ξ_σ by truncated
//! Newton-CG with the sample-averaged metric.

use anyhow::{anyhow, Result};
use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use crate::cg::{self, CgReport, CgSettings};
use crate::config::StageConfig;
use crate::decomp::{Serial, Space, VecLayout};
use crate::model::{Model, ModelWork, State};
use crate::newton::{self, MetricObjective, NewtonReport, NewtonSettings};

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

/// A linearised model as MGVI's sampler sees it: the metric `M = I + Jᵀ F J` and the map
/// `η ↦ Jᵀ F^{1/2} η` (two standard normals per datum: mean and variance parts).
pub trait Fisher {
    /// Number of parameters.
    fn dim(&self) -> usize;
    /// Number of data.
    fn n_data(&self) -> usize;
    /// `out = Jᵀ F^{1/2} (eta_a, eta_v)`.
    fn sqrt_fisher_t(&self, eta_a: &[f64], eta_v: &[f64], out: &mut [f64]);
    /// `out = M v`.
    fn metric(&self, v: &[f64], out: &mut [f64]);
    /// How parameter vectors are distributed (inner products over ranks).
    fn space(&self) -> Arc<dyn Space> {
        Arc::new(Serial)
    }
    /// Layouts of parameter and data vectors over patches, when distributed: normals are
    /// then drawn per patch, so samples do not depend on the rank count.
    fn layouts(&self) -> Option<(&VecLayout, &VecLayout)> {
        None
    }
    /// Solve `M δ = y` by CG from the guess in `delta` (on the host unless overridden).
    fn solve(&self, y: &[f64], delta: &mut [f64], settings: &CgSettings) -> CgReport {
        let space = self.space();
        cg::solve_with(&*space, |v, out| self.metric(v, out), y, delta, settings)
    }
}

/// The dust model linearised at a state, restricted to the free entries of `mask`
/// (identity on the held ones).
pub struct ModelAt<'a> {
    /// The model.
    pub model: &'a Model,
    /// The expansion point.
    pub state: &'a State,
    /// Free (1) or held (0) entries of x.
    pub mask: &'a [f64],
    work: std::cell::RefCell<ModelWork>,
    scratch: std::cell::RefCell<Vec<f64>>,
    space: Arc<dyn Space>,
}

impl<'a> ModelAt<'a> {
    /// Linearisation of `model` at `state`.
    pub fn new(model: &'a Model, state: &'a State, mask: &'a [f64]) -> Self {
        Self {
            model,
            state,
            mask,
            work: std::cell::RefCell::new(model.workspace()),
            scratch: std::cell::RefCell::new(Vec::new()),
            space: Arc::new(model.dom.x.clone()),
        }
    }
}

impl Fisher for ModelAt<'_> {
    fn dim(&self) -> usize {
        self.model.n_params()
    }
    fn n_data(&self) -> usize {
        self.model.data.len()
    }
    fn sqrt_fisher_t(&self, eta_a: &[f64], eta_v: &[f64], out: &mut [f64]) {
        self.model
            .sqrt_fisher_t(self.state, eta_a, eta_v, out, &mut self.work.borrow_mut());
        out.iter_mut().zip(self.mask).for_each(|(o, m)| *o *= m);
    }
    fn metric(&self, v: &[f64], out: &mut [f64]) {
        let mut vm = self.scratch.borrow_mut();
        vm.clear();
        vm.extend(v.iter().zip(self.mask).map(|(a, m)| a * m));
        self.model
            .metric(self.state, &vm, out, &mut self.work.borrow_mut());
        out.par_iter_mut()
            .zip(v)
            .zip(self.mask)
            .for_each(|((o, vi), m)| *o = m * *o + (1.0 - m) * vi);
    }
    fn space(&self) -> Arc<dyn Space> {
        self.space.clone()
    }
    fn layouts(&self) -> Option<(&VecLayout, &VecLayout)> {
        Some((&self.model.dom.x, &self.model.dom.stars))
    }
    fn solve(&self, y: &[f64], delta: &mut [f64], settings: &CgSettings) -> CgReport {
        // on a device the whole CG stays there; on the CPU it runs here
        self.model
            .solve_metric(&[self.state], self.mask, false, y, delta, settings)
            .unwrap_or_else(|| {
                cg::solve_with(
                    &*self.space,
                    |v, out| self.metric(v, out),
                    y,
                    delta,
                    settings,
                )
            })
    }
}

/// One residual δ ~ N(0, M⁻¹): y = η₁ + Jᵀ F^{1/2} η₂ (so y ~ N(0, M)), then M δ = y by CG.
/// The normals are drawn in a fixed order from `rng`.
pub fn draw_residual<F: Fisher, R: Rng>(
    f: &F,
    rng: &mut R,
    settings: &CgSettings,
) -> (Vec<f64>, CgReport) {
    let (np, ns) = (f.dim(), f.n_data());
    let eta1: Vec<f64> = (0..np).map(|_| rng.sample(StandardNormal)).collect();
    let eta_a: Vec<f64> = (0..ns).map(|_| rng.sample(StandardNormal)).collect();
    let eta_v: Vec<f64> = (0..ns).map(|_| rng.sample(StandardNormal)).collect();
    residual_from_normals(f, &eta1, [&eta_a, &eta_v], settings)
}

/// δ solving `M δ = η₁ + Jᵀ F^{1/2} (η_a, η_v)`.
fn residual_from_normals<F: Fisher>(
    f: &F,
    eta1: &[f64],
    [eta_a, eta_v]: [&[f64]; 2],
    settings: &CgSettings,
) -> (Vec<f64>, CgReport) {
    let np = f.dim();
    let mut y = vec![0.0; np];
    f.sqrt_fisher_t(eta_a, eta_v, &mut y);
    for i in 0..np {
        y[i] += eta1[i];
    }
    let mut delta = vec![0.0; np];
    let rep = f.solve(&y, &mut delta, settings);
    (delta, rep)
}

/// Sub-stream of random stream `stream` for the replicated entries (`part` 0) or for patch
/// q (`part` q + 1).
fn sub_stream(stream: u64, part: usize) -> u64 {
    (stream << 24) | part as u64
}

/// One residual like [`draw_residual`], with its normals drawn from stream `stream` of
/// `seed`: per patch when `f` is distributed (rank-count independent), else in one
/// sequence.
pub fn draw_residual_in<F: Fisher>(
    f: &F,
    seed: u64,
    stream: u64,
    settings: &CgSettings,
) -> (Vec<f64>, CgReport) {
    let Some((xl, sl)) = f.layouts() else {
        return draw_residual(f, &mut crate::rng::stream(seed, stream), settings);
    };
    let (np, ns) = (f.dim(), f.n_data());
    let (mut eta1, mut eta_a, mut eta_v) = (vec![0.0; np], vec![0.0; ns], vec![0.0; ns]);
    let mut rng = crate::rng::stream(seed, sub_stream(stream, 0));
    for i in xl.rep.iter().flat_map(|r| r.clone()) {
        eta1[i] = rng.sample(StandardNormal);
    }
    let first = xl.decomp.patches().start;
    for (k, (xr, sr)) in xl.patch.iter().zip(&sl.patch).enumerate() {
        let mut rng = crate::rng::stream(seed, sub_stream(stream, first + k + 1));
        for i in xr.iter().flat_map(|r| r.clone()) {
            eta1[i] = rng.sample(StandardNormal);
        }
        for eta in [&mut eta_a, &mut eta_v] {
            for i in sr.iter().flat_map(|r| r.clone()) {
                eta[i] = rng.sample(StandardNormal);
            }
        }
    }
    residual_from_normals(f, &eta1, [&eta_a, &eta_v], settings)
}

/// The KL objective over p = [x | ξ_σ]: average energy over the samples x ± δ_k.
pub struct Kl<'a> {
    model: &'a Model,
    residuals: &'a [Vec<f64>],
    mask: &'a [f64],
    space: Arc<dyn Space>,
    cache: Mutex<KlCache>,
}

struct KlCache {
    at: Vec<f64>,
    states: Vec<State>,
    work: ModelWork,
    /// The sample points x ± δ_k of `at`.
    xs: Vec<Vec<f64>>,
    gx: Vec<f64>,
    gs: Vec<f64>,
}

impl<'a> Kl<'a> {
    /// KL of `model` with antithetic residuals `residuals` and free-entry `mask`.
    pub fn new(model: &'a Model, residuals: &'a [Vec<f64>], mask: &'a [f64]) -> Self {
        model.reserve_device_states(2 * residuals.len() + 1);
        let cache = KlCache {
            at: Vec::new(),
            states: Vec::new(),
            work: model.workspace(),
            xs: Vec::new(),
            gx: Vec::new(),
            gs: Vec::new(),
        };
        Self {
            model,
            residuals,
            mask,
            space: Arc::new(model.dom.p.clone()),
            cache: Mutex::new(cache),
        }
    }

    /// Write the sample points x ± δ_k into `xs` (allocated once, then reused).
    fn fill_samples(&self, x: &[f64], xs: &mut Vec<Vec<f64>>) {
        xs.resize_with(2 * self.residuals.len(), || vec![0.0; x.len()]);
        for (k, d) in self.residuals.iter().enumerate() {
            let sign_pair = xs[2 * k..2 * k + 2].iter_mut().zip([1.0, -1.0]);
            for (out, sign) in sign_pair {
                out.par_iter_mut()
                    .zip(x)
                    .zip(d)
                    .for_each(|((o, a), b)| *o = a + sign * b);
            }
        }
    }

    /// Buffers sized for this model and sample count.
    fn prepare(&self, c: &mut KlCache) {
        let n = 2 * self.residuals.len();
        if c.states.len() != n {
            c.states = (0..n).map(|_| self.model.empty_state()).collect();
            c.at.clear();
        }
    }

    /// States at the samples of p (cached for the last p).
    fn ensure_states(&self, p: &[f64], c: &mut KlCache) {
        self.prepare(c);
        // every rank must take the same branch: the evaluation below communicates
        if self.space.all(c.at == p) {
            return;
        }
        let np = self.model.n_params();
        let (x, xsig) = p.split_at(np);
        self.fill_samples(x, &mut c.xs);
        let KlCache {
            states, work, xs, ..
        } = c;
        for (st, xk) in states.iter_mut().zip(xs.iter()) {
            self.model.update_state(xk, xsig, st, work);
        }
        c.at = p.to_vec();
    }
}

impl MetricObjective for Kl<'_> {
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> f64 {
        let mut c = self.cache.lock().expect("KL cache");
        self.prepare(&mut c);
        let np = self.model.n_params();
        let (x, xsig) = p.split_at(np);
        let KlCache {
            states,
            work,
            at,
            xs,
            gx,
            gs,
        } = &mut *c;
        self.fill_samples(x, xs);
        gx.resize(np, 0.0);
        gs.resize(xsig.len(), 0.0);
        let n = xs.len() as f64;
        g.iter_mut().for_each(|v| *v = 0.0);
        let mut value = 0.0;
        // one fused pass per sample: value, gradient, and the state the metric will reuse
        for (st, xk) in states.iter_mut().zip(xs.iter()) {
            value += self.model.value_grad(xk, xsig, st, gx, gs, work) / n;
            for i in 0..np {
                g[i] += self.mask[i] * gx[i] / n;
            }
            for (o, v) in g[np..].iter_mut().zip(gs.iter()) {
                *o += v / n;
            }
        }
        *at = p.to_vec();
        value
    }

    fn metric(&self, p: &[f64], v: &[f64], out: &mut [f64]) {
        let mut c = self.cache.lock().expect("KL cache");
        self.ensure_states(p, &mut c);
        let KlCache { states, work, .. } = &mut *c;
        self.model.averaged_metric(states, self.mask, v, out, work);
    }

    fn solve(&self, p: &[f64], b: &[f64], x: &mut [f64], settings: &CgSettings) -> CgReport {
        let on_device = {
            let mut c = self.cache.lock().expect("KL cache");
            self.ensure_states(p, &mut c);
            let refs: Vec<&State> = c.states.iter().collect();
            self.model
                .solve_metric(&refs, self.mask, true, b, x, settings)
        };
        on_device.unwrap_or_else(|| {
            cg::solve_with(
                &*self.space,
                |v, out| self.metric(p, v, out),
                b,
                x,
                settings,
            )
        })
    }

    fn space(&self) -> Arc<dyn Space> {
        self.space.clone()
    }
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

/// One global iteration: draw residuals at (x, ξ_σ), then minimise the KL; updates x, ξ_σ and
/// `residuals` in place.
#[allow(clippy::too_many_arguments)]
pub fn global_iteration(
    model: &Model,
    stage_cfg: &StageConfig,
    mask: &[f64],
    seed: u64,
    ids: (usize, usize),
    x: &mut [f64],
    xsig: &mut [f64],
    residuals: &mut Vec<Vec<f64>>,
) -> Result<IterationReport> {
    let mut w = model.workspace();
    let st = model.state(x, xsig, &mut w);
    let lin = ModelAt::new(model, &st, mask);
    let cg_settings = CgSettings {
        rel_tol: stage_cfg.sample_cg_tolerance,
        max_iter: stage_cfg.sample_cg_iterations,
        ..Default::default()
    };
    residuals.clear();
    let mut sample_cg = Vec::new();
    for pair in 0..stage_cfg.sample_pairs {
        let stream = residual_stream(ids.0, ids.1, pair);
        let (mut d, rep) = draw_residual_in(&lin, seed, stream, &cg_settings);
        // held entries stay where they are in every sample
        d.iter_mut().zip(mask).for_each(|(v, m)| *v *= m);
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
    let settings = NewtonSettings {
        forcing: stage_cfg.newton_forcing,
        cg_max_iter: stage_cfg.newton_cg_iterations,
        rel_tol: 1e-10,
        ..Default::default()
    };
    let (p, newton) = newton::minimize(&kl, p0, stage_cfg.newton_steps as u64, settings)
        .map_err(|e| anyhow!("KL minimisation failed: {e}"))?;
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
