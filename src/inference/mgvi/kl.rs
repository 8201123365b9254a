//! The KL objective of MGVI: the energy averaged over the samples x + c_k ± δ_k, as a
//! function of the expansion point x and the per-star ξ_σ, with the sample-averaged metric
//! for the Newton-CG minimiser.

use anyhow::{Context, Result};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use crate::base::util::{par_add, par_copy, par_equal, par_zero, Stopwatch, PAR_MIN_LEN};
use crate::inference::newton::MetricObjective;
use crate::likelihood::mask::Mask;
use crate::likelihood::model::{Model, ModelWork, SampleFields, State};
use crate::num::cg::{self, CgReport, CgSettings, Operator};
use crate::sphere::decomp::Space;

/// The KL objective over p = [x | ξ_σ]: average energy over the samples p + c_k ± δ_k
/// (residuals over x leave ξ_σ at its point estimate in every sample).
pub struct Kl<'a> {
    model: &'a Model,
    residuals: &'a [Vec<f64>],
    shifts: &'a [Vec<f64>],
    mask: &'a Mask,
    space: Arc<dyn Space>,
    cache: Mutex<KlCache>,
    record: Mutex<MeanRecord>,
    /// Time in value-and-gradient evaluations.
    evaluations: Stopwatch,
    /// Time in metric products (on a device, whole metric solves).
    products: Stopwatch,
}

/// Where a [`Kl`]'s time went so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KlTimes {
    /// Value-and-gradient evaluations, seconds.
    pub evaluations_s: f64,
    /// Metric products (on a device, whole metric solves), seconds.
    pub products_s: f64,
}

/// The point whose samples' mean ln ρ is wanted from its first evaluation, and that mean
/// once taken ([`Kl::recording_mean_at`]).
#[derive(Default)]
struct MeanRecord {
    at: Option<Vec<f64>>,
    mean: Option<Vec<f64>>,
}

struct KlCache {
    /// The point the states were computed at, when `at_valid` (its buffer kept between
    /// points, so a new point is copied in place and on the pool).
    at: Vec<f64>,
    at_valid: bool,
    states: Vec<State>,
    work: ModelWork,
    /// One sample point p + c_k ± δ_k at a time: the states are computed one after the
    /// other, so one buffer serves them all (W2: 133 MB instead of 4 × 133 MB).
    xk: Vec<f64>,
    gx: Vec<f64>,
    gs: Vec<f64>,
    /// The samples' fields by the ICR's linearity, where the backend takes fields (made at
    /// the first use: one ICR forward per residual).
    fields: Option<SampleFields>,
}

impl Drop for Kl<'_> {
    /// The states and the workspace handed back to the model for the next iteration's KL.
    fn drop(&mut self) {
        let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        let states = std::mem::take(&mut c.states);
        let work = std::mem::take(&mut c.work);
        self.model.recycle(states, vec![work]);
    }
}

impl<'a> Kl<'a> {
    /// KL of `model` with the sample pairs x + c_k ± δ_k of `residuals` δ_k and `shifts` c_k
    /// (empty for MGVI) and free-entry `mask`.
    pub fn new(
        model: &'a Model,
        residuals: &'a [Vec<f64>],
        shifts: &'a [Vec<f64>],
        mask: &'a Mask,
    ) -> Self {
        model.reserve_device_states(2 * residuals.len() + 1);
        let cache = KlCache {
            at: Vec::new(),
            at_valid: false,
            states: Vec::new(),
            work: model.workspace(),
            xk: Vec::new(),
            gx: Vec::new(),
            gs: Vec::new(),
            fields: None,
        };
        Self {
            model,
            residuals,
            shifts,
            mask,
            space: Arc::new(model.dom.p.clone()),
            cache: Mutex::new(cache),
            record: Mutex::new(MeanRecord::default()),
            evaluations: Stopwatch::default(),
            products: Stopwatch::default(),
        }
    }

    /// The time spent in evaluations and metric products so far.
    pub fn times(&self) -> KlTimes {
        KlTimes {
            evaluations_s: self.evaluations.seconds(),
            products_s: self.products.seconds(),
        }
    }

    /// This KL, keeping the samples' mean ln ρ (as `log_density_moments` gives it) from the
    /// first evaluation at `p0` (the Newton steps start there), so that the caller does not
    /// compute those samples' fields again ([`Kl::recorded_mean`]).
    pub fn recording_mean_at(self, p0: &[f64]) -> Self {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = MeanRecord {
            at: Some(p0.to_vec()),
            mean: None,
        };
        self
    }

    /// The mean recorded at the point given to [`Kl::recording_mean_at`], if it was
    /// evaluated there with the fields on the host on every rank.
    pub fn recorded_mean(&self) -> Option<Vec<f64>> {
        let mean = self
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mean
            .take();
        // every rank must take the same branch: the caller's fallback communicates
        self.space.all(mean.is_some()).then_some(mean).flatten()
    }

    /// After an evaluation at `p`: the samples' mean ln ρ, if `p` is the point to record.
    fn record(&self, p: &[f64], states: &[State]) {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = r.at.as_deref().is_some_and(|p0| par_equal(p0, p));
        if wanted && states.iter().all(|s| s.fields_on_host) {
            let [mean, _] = super::log_density_moments_of(self.model, states);
            *r = MeanRecord {
                at: None,
                mean: Some(mean),
            };
        }
    }

    /// Whether every sample point has p's ξ_σ: the residuals and shifts cover x alone (ξ_σ
    /// is not sampled), so the samples' n_σ are one computation.
    fn samples_share_xsig(&self) -> bool {
        let np = self.model.n_params();
        self.residuals
            .iter()
            .chain(self.shifts)
            .all(|v| v.len() <= np)
    }

    /// Write sample point `j`, p + c_k ± δ_k, into `out` (sized on first use, then reused).
    fn fill_sample(&self, p: &[f64], j: usize, out: &mut Vec<f64>) {
        out.resize(p.len(), 0.0);
        super::sampling::sample_point(p, self.residuals, self.shifts, j, out);
    }

    /// Write sample point `j`'s entries from the scale's latent on, `[ξ_scale, ξ_offset |
    /// ξ_σ]`, into `out` (as [`Kl::fill_sample`] writes them).
    fn fill_tail(&self, p: &[f64], j: usize, out: &mut Vec<f64>) {
        let from = self.model.icr.n_xi();
        out.resize(p.len() - from, 0.0);
        let (r, s) = (self.residuals, self.shifts);
        super::sampling::sample_point_from(p, r, s, (j, from), out);
    }

    /// Buffers sized for this model and sample count, and the samples' fields where the
    /// backend takes them.
    fn prepare(&self, c: &mut KlCache) {
        let n = 2 * self.residuals.len();
        if c.states.len() != n {
            c.states = (0..n).map(|_| self.model.empty_state()).collect();
            c.at_valid = false;
        }
        if c.fields.is_none() && self.model.takes_fields() {
            let f = (self.model).sample_fields(self.residuals, self.shifts, &mut c.work);
            c.fields = Some(f);
        }
    }

    /// States at the samples of p (cached for the last p).
    fn ensure_states(&self, p: &[f64], c: &mut KlCache) -> Result<()> {
        self.prepare(c);
        // every rank must take the same branch: the evaluation below communicates
        if self.space.all(c.at_valid && par_equal(&c.at, p)) {
            return Ok(());
        }
        let np = self.model.n_params();
        let shared_sig = self.samples_share_xsig();
        let KlCache {
            states,
            work,
            xk,
            fields,
            ..
        } = c;
        let updated = match fields {
            Some(f) => self.model.with_point_field(p, work, |at, work| {
                (0..states.len()).try_for_each(|j| {
                    self.fill_tail(p, j, xk);
                    let (st, same) = state_and_sig_source(states, j, shared_sig);
                    let field = f.of(at, j);
                    (self.model).update_state_field(xk, same, field, st, work)
                })
            }),
            None => (0..states.len()).try_for_each(|j| {
                self.fill_sample(p, j, xk);
                let (xk, xsig) = xk.split_at(np);
                let (st, same) = state_and_sig_source(states, j, shared_sig);
                (self.model).update_state_sharing(xk, xsig, same, st, work)
            }),
        };
        if let Err(e) = updated {
            // the cached states are half updated: none of them may be reused
            c.at_valid = false;
            return Err(e);
        }
        par_copy(&mut c.at, p);
        c.at_valid = true;
        Ok(())
    }

    /// The averaged metric product at the cached states (the caller has made them its
    /// point's), timed.
    fn metric_at_states(&self, c: &mut KlCache, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.fisher_at_states(c, v, out)?;
        par_add(out, v);
        Ok(())
    }

    /// [`Kl::metric_at_states`] without the identity part, for a CG that adds it itself.
    fn fisher_at_states(&self, c: &mut KlCache, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.products.time(|| {
            let KlCache { states, work, .. } = c;
            self.model.averaged_fisher(states, self.mask, v, out, work)
        })
    }

    /// `f` of the samples' states, in sample order, when the last evaluation left them at
    /// `p` with their fields on the host on every rank (`None` otherwise).
    pub fn with_states_at<R>(&self, p: &[f64], f: impl FnOnce(&[State]) -> R) -> Option<R> {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let here = c.at_valid && par_equal(&c.at, p) && c.states.iter().all(|s| s.fields_on_host);
        // every rank must take the same branch: the caller's fallback communicates
        self.space.all(here).then(|| f(&c.states))
    }
}

/// Sample state `j` to update, and the first state to copy its n_σ from when the samples
/// `share` ξ_σ (none for the first).
fn state_and_sig_source(
    states: &mut [State],
    j: usize,
    share: bool,
) -> (&mut State, Option<&State>) {
    let (done, rest) = states.split_at_mut(j);
    (&mut rest[0], done.first().filter(|_| share))
}

impl MetricObjective for Kl<'_> {
    /// The scale and offset components (replicated on every rank): those two often carry
    /// most of the gradient's norm, and a Newton CG measured against them stops after the
    /// one or two iterations that resolve them, leaving the map almost where it was
    /// (docs/model.md, "The Newton forcing").
    fn forcing_excluded2(&self, g: &[f64]) -> f64 {
        let np = self.model.n_params();
        g[np - 2].powi(2) + g[np - 1].powi(2)
    }
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> Result<f64> {
        self.evaluations.time(|| self.evaluate(p, g))
    }

    fn metric(&self, p: &[f64], v: &[f64], out: &mut [f64]) -> Result<()> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.ensure_states(p, &mut c)?;
        self.metric_at_states(&mut c, v, out)
    }

    fn solve(
        &self,
        p: &[f64],
        b: &[f64],
        x: &mut [f64],
        settings: &CgSettings,
    ) -> Result<CgReport> {
        let on_device = {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            self.ensure_states(p, &mut c)?;
            let refs: Vec<&State> = c.states.iter().collect();
            self.products
                .time(|| (self.model).solve_metric(&refs, self.mask, true, b, x, settings))
                .context("metric solve on the device")?
        };
        match on_device {
            Some(rep) => Ok(rep),
            // the states are p's for the whole solve (made so above; nothing else runs
            // meanwhile), so the products skip comparing p with the cached point (a pass
            // over two parameter-sized vectors per product)
            None => cg::try_solve_with(
                &*self.space,
                (Operator::IdentityPlus, |v: &[f64], out: &mut [f64]| {
                    let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    self.fisher_at_states(&mut c, v, out)
                }),
                b,
                x,
                settings,
            ),
        }
    }

    fn space(&self) -> Arc<dyn Space> {
        self.space.clone()
    }
}

impl Kl<'_> {
    /// [`MetricObjective::value_grad`], untimed.
    fn evaluate(&self, p: &[f64], g: &mut [f64]) -> Result<f64> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.prepare(&mut c);
        let np = self.model.n_params();
        let KlCache {
            states,
            work,
            at,
            at_valid,
            xk,
            gx,
            gs,
            fields,
        } = &mut *c;
        gs.resize(p.len() - np, 0.0);
        // the states the metric will reuse, made anew here
        *at_valid = false;
        let share = self.samples_share_xsig();
        let value = match fields {
            Some(f) => {
                let mut tail = |j: usize, buf: &mut Vec<f64>| self.fill_tail(p, j, buf);
                let model = self.model;
                let v = model.samples_value_grad(
                    (states, share),
                    (f, p),
                    &mut tail,
                    (xk, gs),
                    g,
                    work,
                )?;
                self.mask.zero_held(&mut g[..np]);
                v
            }
            None => self.evaluate_apart(p, (states, share), (xk, gx, gs), g, work)?,
        };
        par_copy(at, p);
        *at_valid = true;
        self.record(p, states);
        Ok(value)
    }

    /// The mean energy and gradient of the samples of `p` evaluated one by one from their
    /// points, for a backend that does not take fields: each sample's
    /// [`Model::value_grad_sharing`] (n_σ shared from the first with `share`).
    fn evaluate_apart(
        &self,
        p: &[f64],
        (states, share): (&mut [State], bool),
        (xk, gx, gs): (&mut Vec<f64>, &mut Vec<f64>, &mut Vec<f64>),
        g: &mut [f64],
        work: &mut ModelWork,
    ) -> Result<f64> {
        let (np, n) = (self.model.n_params(), states.len() as f64);
        gx.resize(np, 0.0);
        par_zero(g);
        let mut value = 0.0;
        for j in 0..states.len() {
            self.fill_sample(p, j, xk);
            let (x, xsig) = xk.split_at(np);
            let (st, same) = state_and_sig_source(states, j, share);
            let v = (self.model).value_grad_sharing(x, xsig, (st, same), gx, gs, work)?;
            value += v / n;
            let gj = gx.par_iter().chain(gs.par_iter());
            g.par_iter_mut()
                .with_min_len(PAR_MIN_LEN)
                .zip(gj)
                .for_each(|(o, v)| *o += v / n);
        }
        self.mask.zero_held(&mut g[..np]);
        Ok(value)
    }
}
