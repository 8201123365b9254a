//! MGVI's residual samples: δ ~ N(0, M⁻¹) with M = I + Jᵀ F J the metric at the expansion
//! point, drawn as `M δ = η₁ + Jᵀ F^{1/2} η₂` by conjugate gradients (paper App. B).

use crate::base::util::{par_add, Stopwatch};
use anyhow::Result;
use rand::Rng;
use rand_distr::StandardNormal;
use std::sync::Arc;

use super::{geovi, residual_stream, scale, IterationSettings, SampleMode, Streams};
use crate::likelihood::mask::Mask;
use crate::likelihood::model::{Model, ModelWork, State};
use crate::num::cg::{self, CgReport, CgSettings, Operator};
use crate::sphere::decomp::{Serial, Space, VecLayout};

/// A linearised model as MGVI's sampler sees it: the metric `M = I + Jᵀ F J` and the map
/// `η ↦ Jᵀ F^{1/2} η` (two standard normals per datum: mean and variance parts).
pub trait Fisher {
    /// Number of parameters.
    fn dim(&self) -> usize;
    /// Number of data.
    fn n_data(&self) -> usize;
    /// `out = Jᵀ F^{1/2} (eta_a, eta_v)`.
    fn sqrt_fisher_t(&self, eta_a: &[f64], eta_v: &[f64], out: &mut [f64]) -> Result<()>;
    /// `out = M v`.
    fn metric(&self, v: &[f64], out: &mut [f64]) -> Result<()>;
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
    fn solve(&self, y: &[f64], delta: &mut [f64], settings: &CgSettings) -> Result<CgReport> {
        let space = self.space();
        let op = (Operator::Whole, |v: &[f64], out: &mut [f64]| {
            self.metric(v, out)
        });
        cg::try_solve_with(&*space, op, y, delta, settings)
    }
    /// [`Fisher::solve`] for two right-hand sides (the default: one after the other; a
    /// linearised model may solve them in lockstep, each with the bits of its own solve).
    fn solve_pair(
        &self,
        [y0, y1]: [&[f64]; 2],
        [d0, d1]: [&mut [f64]; 2],
        settings: &CgSettings,
    ) -> Result<[CgReport; 2]> {
        Ok([self.solve(y0, d0, settings)?, self.solve(y1, d1, settings)?])
    }
}

/// The dust model linearised at a state, restricted to the free entries of `mask`
/// (identity on the held ones): over x alone (ξ_σ held at its point estimate), or over
/// p = [x | ξ_σ] when the per-star n_σ are sampled too.
pub struct ModelAt<'a> {
    /// The model.
    pub model: &'a Model,
    /// The expansion point.
    pub state: &'a State,
    /// The held entries of x.
    pub mask: &'a Mask,
    /// Whether the samples cover ξ_σ (vectors over p = [x | ξ_σ]).
    pub with_sig: bool,
    work: std::cell::RefCell<ModelWork>,
    /// Copies of the vectors a product is of with their held entries zeroed (one per
    /// vector of a pair).
    scratch: [std::cell::RefCell<Vec<f64>>; 2],
    space: Arc<dyn Space>,
    /// Time in metric products (on a device, whole metric solves).
    products: Stopwatch,
}

impl<'a> ModelAt<'a> {
    /// Linearisation of `model` at `state` over x.
    pub fn new(model: &'a Model, state: &'a State, mask: &'a Mask) -> Self {
        Self {
            model,
            state,
            mask,
            with_sig: false,
            work: std::cell::RefCell::new(model.workspace()),
            scratch: Default::default(),
            space: Arc::new(model.dom.x.clone()),
            products: Stopwatch::default(),
        }
    }

    /// Seconds spent in metric products so far (on a device, in whole metric solves).
    pub fn products_s(&self) -> f64 {
        self.products.seconds()
    }

    /// The workspace, to hand back to the model ([`ModelCore::recycle`](crate::likelihood::model::ModelCore::recycle)).
    pub fn into_work(self) -> ModelWork {
        self.work.into_inner()
    }

    /// Linearisation of `model` at `state` over p = [x | ξ_σ].
    pub fn with_nsigma(model: &'a Model, state: &'a State, mask: &'a Mask) -> Self {
        Self {
            with_sig: true,
            space: Arc::new(model.dom.p.clone()),
            ..Self::new(model, state, mask)
        }
    }
}

impl Fisher for ModelAt<'_> {
    fn dim(&self) -> usize {
        self.model.n_params()
            + if self.with_sig {
                self.model.data.len()
            } else {
                0
            }
    }
    fn n_data(&self) -> usize {
        self.model.data.len()
    }
    fn sqrt_fisher_t(&self, eta_a: &[f64], eta_v: &[f64], out: &mut [f64]) -> Result<()> {
        let np = self.model.n_params();
        let (ox, os) = out.split_at_mut(np);
        self.model
            .sqrt_fisher_t(self.state, eta_a, eta_v, ox, &mut self.work.borrow_mut())?;
        self.mask.apply(ox);
        if self.with_sig {
            // v depends on ξ_σ through (n_σ σ_A)²: its Fisher factor is ∂v/∂ξ_σ / (√2 v)
            let (st, d) = (self.state, &self.model.data);
            for (i, o) in os.iter_mut().enumerate() {
                let dvds = 2.0 * st.nsig[i] * d.a_err[i] * d.a_err[i] * st.dnsig[i];
                *o = dvds * eta_v[i] / (std::f64::consts::SQRT_2 * st.var[i]);
            }
        }
        Ok(())
    }
    fn metric(&self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.products.time(|| self.product(v, out))
    }

    fn space(&self) -> Arc<dyn Space> {
        self.space.clone()
    }
    fn layouts(&self) -> Option<(&VecLayout, &VecLayout)> {
        let x = if self.with_sig {
            &self.model.dom.p
        } else {
            &self.model.dom.x
        };
        Some((x, &self.model.dom.stars))
    }
    fn solve_pair(
        &self,
        y: [&[f64]; 2],
        [d0, d1]: [&mut [f64]; 2],
        settings: &CgSettings,
    ) -> Result<[CgReport; 2]> {
        // n_σ sampled (the averaged metric's product), or on a device: one after the other
        if self.with_sig {
            return Ok([
                self.solve(y[0], d0, settings)?,
                self.solve(y[1], d1, settings)?,
            ]);
        }
        if let Some(r0) = self.device_solve(y[0], d0, settings)? {
            return Ok([r0, self.solve(y[1], d1, settings)?]);
        }
        cg::try_solve_pair_with(
            &*self.space,
            (
                Operator::IdentityPlus,
                |p: &mut [(&[f64], &mut [f64])]| self.products.time(|| self.fisher_pairs(p)),
            ),
            y,
            [d0, d1],
            settings,
        )
    }
    fn solve(&self, y: &[f64], delta: &mut [f64], settings: &CgSettings) -> Result<CgReport> {
        // on a device the whole CG stays there; on the CPU it runs here
        match self.device_solve(y, delta, settings)? {
            Some(rep) => Ok(rep),
            None => cg::try_solve_with(
                &*self.space,
                (Operator::IdentityPlus, |v: &[f64], out: &mut [f64]| {
                    self.products.time(|| self.fisher_product(v, out))
                }),
                y,
                delta,
                settings,
            ),
        }
    }
}

impl ModelAt<'_> {
    /// `M δ = y` solved where the model's backend keeps its vectors, timed as products;
    /// `None` when the CG runs on the host.
    fn device_solve(
        &self,
        y: &[f64],
        delta: &mut [f64],
        settings: &CgSettings,
    ) -> Result<Option<CgReport>> {
        self.products.time(|| {
            (self.model).solve_metric(&[self.state], self.mask, self.with_sig, y, delta, settings)
        })
    }

    /// `out = M v`, untimed ([`Fisher::metric`] times it): [`ModelAt::fisher_product`] and
    /// the identity (on held entries the identity alone: `0 · out[h] + v[h]`).
    fn product(&self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.fisher_product(v, out)?;
        par_add(out, v);
        Ok(())
    }

    /// `out = (M − I) v`, untimed: the likelihood part `mask ∘ Jᵀ F J (mask ∘ v)` (held
    /// entries multiplied by 0), for a CG that adds the identity itself.
    fn fisher_product(&self, v: &[f64], out: &mut [f64]) -> Result<()> {
        if self.with_sig {
            return self.model.averaged_fisher(
                std::slice::from_ref(self.state),
                self.mask,
                v,
                out,
                &mut self.work.borrow_mut(),
            );
        }
        let mut scratch = self.scratch[0].borrow_mut();
        let vm = self.mask.masked(v, &mut scratch);
        self.model
            .fisher_metric(self.state, vm, out, &mut self.work.borrow_mut())?;
        self.mask.apply(out);
        Ok(())
    }

    /// [`ModelAt::fisher_product`] for each `(v, out)` of `pairs` (one or two; ξ_σ held), a
    /// pair in one walk of the stars ([`Model::fisher_metric_pair`]).
    fn fisher_pairs(&self, pairs: &mut [(&[f64], &mut [f64])]) -> Result<()> {
        let [(v0, o0), (v1, o1)] = pairs else {
            return pairs
                .iter_mut()
                .try_for_each(|(v, o)| self.fisher_product(v, o));
        };
        let (mut s0, mut s1) = (self.scratch[0].borrow_mut(), self.scratch[1].borrow_mut());
        let vm = [self.mask.masked(v0, &mut s0), self.mask.masked(v1, &mut s1)];
        let (o0, o1) = (&mut **o0, &mut **o1);
        let w = &mut self.work.borrow_mut();
        self.model.fisher_metric_pair(self.state, vm, [o0, o1], w)?;
        self.mask.apply(o0);
        self.mask.apply(o1);
        Ok(())
    }
}

/// One residual δ ~ N(0, M⁻¹): y = η₁ + Jᵀ F^{1/2} η₂ (so y ~ N(0, M)), then M δ = y by CG.
/// The normals are drawn in a fixed order from `rng`.
pub fn draw_residual<F: Fisher, R: Rng>(
    f: &F,
    rng: &mut R,
    settings: &CgSettings,
) -> Result<(Vec<f64>, CgReport)> {
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
    eta: [&[f64]; 2],
    settings: &CgSettings,
) -> Result<(Vec<f64>, CgReport)> {
    let y = metric_sample_from_normals(f, eta1, eta)?;
    let mut delta = vec![0.0; f.dim()];
    let rep = f.solve(&y, &mut delta, settings)?;
    Ok((delta, rep))
}

/// `y = η₁ + Jᵀ F^{1/2} (η_a, η_v)`, a draw from N(0, M).
fn metric_sample_from_normals<F: Fisher>(
    f: &F,
    eta1: &[f64],
    [eta_a, eta_v]: [&[f64]; 2],
) -> Result<Vec<f64>> {
    let mut y = vec![0.0; f.dim()];
    f.sqrt_fisher_t(eta_a, eta_v, &mut y)?;
    y.iter_mut().zip(eta1).for_each(|(a, b)| *a += b);
    Ok(y)
}

/// A residual δ, its solve's report and the metric sample y it solved `M δ = y` for.
pub type Draw = (Vec<f64>, CgReport, Vec<f64>);

/// One residual like [`draw_residual`], with its normals drawn from stream `stream` of
/// `seed`: per patch when `f` is distributed (rank-count independent), else in one
/// sequence. Also returns the metric sample y it solved `M δ = y` for.
pub fn draw_residual_in<F: Fisher>(
    f: &F,
    seed: u64,
    stream: u64,
    settings: &CgSettings,
) -> Result<Draw> {
    let y = metric_sample_in(f, seed, stream)?;
    let mut delta = vec![0.0; f.dim()];
    let rep = f.solve(&y, &mut delta, settings)?;
    Ok((delta, rep, y))
}

/// [`draw_residual_in`] for each of `streams`, two at a time solved together
/// ([`Fisher::solve_pair`]), each the bits of its own draw.
pub fn draw_residuals_in<F: Fisher>(
    f: &F,
    seed: u64,
    streams: &[u64],
    settings: &CgSettings,
) -> Result<Vec<Draw>> {
    let [s0, s1] = streams else {
        return streams
            .iter()
            .map(|&s| draw_residual_in(f, seed, s, settings))
            .collect();
    };
    let (y0, y1) = (
        metric_sample_in(f, seed, *s0)?,
        metric_sample_in(f, seed, *s1)?,
    );
    let (mut d0, mut d1) = (vec![0.0; f.dim()], vec![0.0; f.dim()]);
    let [r0, r1] = f.solve_pair([&y0, &y1], [&mut d0, &mut d1], settings)?;
    Ok(vec![(d0, r0, y0), (d1, r1, y1)])
}

/// A draw y ~ N(0, M) from stream `stream` of `seed`, as [`draw_residual_in`] draws it.
pub fn metric_sample_in<F: Fisher>(f: &F, seed: u64, stream: u64) -> Result<Vec<f64>> {
    let (np, ns) = (f.dim(), f.n_data());
    let (mut eta1, mut eta_a, mut eta_v) = (vec![0.0; np], vec![0.0; ns], vec![0.0; ns]);
    let Some((xl, sl)) = f.layouts() else {
        let mut rng = crate::base::rng::stream(seed, stream);
        for eta in [&mut eta1, &mut eta_a, &mut eta_v] {
            eta.iter_mut().for_each(|e| *e = rng.sample(StandardNormal));
        }
        return metric_sample_from_normals(f, &eta1, [&eta_a, &eta_v]);
    };
    crate::sphere::decomp::fill_random(
        seed,
        stream,
        &mut [(xl, &mut eta1), (sl, &mut eta_a), (sl, &mut eta_v)],
        |r| r.sample(StandardNormal),
    );
    metric_sample_from_normals(f, &eta1, [&eta_a, &eta_v])
}

/// Sample `j` of the pairs (`residuals`, `shifts`) about `base` into `out` (as long as
/// `base`): base + c_{j/2} ± δ_{j/2}, + for even j, on the entries the residuals cover
/// (x, or p = [x | ξ_σ] when n_σ is sampled; entries beyond them are `base`'s); c = 0 when
/// `shifts` is empty.
///
/// ```
/// use dust3d::inference::mgvi::sample_point;
/// let base = [1.0, 2.0, 3.0];
/// let (residuals, shifts) = (vec![vec![0.5, -0.25]], vec![vec![0.125, 0.0]]);
/// let mut out = [0.0; 3];
/// sample_point(&base, &residuals, &shifts, 1, &mut out); // odd j: base + c − δ
/// assert_eq!(out, [1.0 + (0.125 - 0.5), 2.0 + (0.0 + 0.25), 3.0]);
/// sample_point(&base, &residuals, &[], 0, &mut out); // MGVI: base + δ
/// assert_eq!(out, [1.5, 1.75, 3.0]);
/// ```
pub fn sample_point(
    base: &[f64],
    residuals: &[Vec<f64>],
    shifts: &[Vec<f64>],
    j: usize,
    out: &mut [f64],
) {
    sample_point_from(base, residuals, shifts, (j, 0), out);
}

/// The entries from index `from` on of [`sample_point`] `j` into `out` (as long as `base`
/// from `from` on), the same arithmetic: `(j, from)`.
pub(crate) fn sample_point_from(
    base: &[f64],
    residuals: &[Vec<f64>],
    shifts: &[Vec<f64>],
    (j, from): (usize, usize),
    out: &mut [f64],
) {
    use crate::base::util::PAR_MIN_LEN;
    use rayon::prelude::*;
    let after = |v: &[f64]| -> usize { from.min(v.len()) };
    let d = &residuals[j / 2];
    let d = &d[after(d)..];
    let n = d.len().min(out.len());
    let sign = if j.is_multiple_of(2) { 1.0 } else { -1.0 };
    let (head, tail) = out.split_at_mut(n);
    let (base, base_tail) = base[from..].split_at(n);
    let head = head.par_iter_mut().with_min_len(PAR_MIN_LEN).zip(base);
    match shifts.get(j / 2) {
        Some(c) => head
            .zip(d[..n].par_iter().zip(&c[after(c)..][..n]))
            .for_each(|((o, x), (b, s))| *o = x + (s + sign * b)),
        None => head.zip(&d[..n]).for_each(|((o, x), b)| *o = x + sign * b),
    }
    tail.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(base_tail)
        .for_each(|(o, x)| *o = *x);
}

/// The residual pairs of one iteration at (x, ξ_σ) into `residuals` and `shifts` (geoVI
/// only), with the evidence sums when `evidence`.
#[allow(clippy::too_many_arguments)]
pub(super) fn draw_samples(
    model: &Model,
    settings: &IterationSettings,
    mask: &Mask,
    x: &[f64],
    xsig: &[f64],
    residuals: &mut Vec<Vec<f64>>,
    shifts: &mut Vec<Vec<f64>>,
    streams: Streams,
    evidence: bool,
) -> Result<Draws> {
    let mut w = model.workspace();
    let st = model.state(x, xsig, &mut w)?;
    // the linearisation's products take this workspace up again
    model.recycle(Vec::new(), vec![w]);
    let with_sig = settings.sample_nsigma && model.infer_nsigma;
    let lin = if with_sig {
        ModelAt::with_nsigma(model, &st, mask)
    } else {
        ModelAt::new(model, &st, mask)
    };
    let cg_settings = CgSettings {
        rel_tol: settings.sample_cg_tolerance,
        max_iter: settings.sample_cg_iterations,
        ..Default::default()
    };
    residuals.clear();
    shifts.clear();
    let (mut sample_cg, mut sample_cg_residuals) = (Vec::new(), Vec::new());
    let mut capped = 0;
    let mut geo = Vec::new();
    let mut determined = if evidence {
        Some(scale::Evidence::at(model, &lin, x, &cg_settings)?)
    } else {
        None
    };
    let pair_streams: Vec<u64> = (0..settings.sample_pairs)
        .map(|pair| residual_stream(streams.stage, streams.iteration, pair))
        .collect();
    // two residuals at a time: their solves walk the stars together
    for two in pair_streams.chunks(2) {
        crate::base::stop::check()?;
        for (mut d, rep, mut y) in draw_residuals_in(&lin, streams.seed, two, &cg_settings)? {
            // held entries stay where they are in every sample
            mask.apply(&mut d);
            sample_cg.push(rep.iterations);
            sample_cg_residuals.push(rep.rel_residual);
            capped += usize::from(rep.stopped_at_cap(&cg_settings));
            if let Some(e) = determined.as_mut() {
                e.add_residual(model, &lin, &d, &rep, settings.sample_pairs, &cg_settings)?;
            }
            if let SampleMode::GeoVi(gs) = &settings.mode {
                mask.apply(&mut y);
                let coords = geovi::DustCoordinates::new(model, &st, x, xsig, mask, with_sig);
                let (c, dd, reps) = geovi::refine_pair(&coords, &y, &d, gs)?;
                geo.extend(reps);
                d = dd;
                shifts.push(c);
            }
            residuals.push(d);
        }
    }
    let products_s = lin.products_s();
    let work = lin.into_work();
    model.recycle(vec![st], vec![work]);
    if !geo.is_empty() {
        let worst = geo.iter().map(|r| r.misfit).fold(0.0, f64::max);
        let start = geo.iter().map(|r| r.start_misfit).fold(0.0, f64::max);
        tracing::info!(
            samples = geo.len(),
            "geoVI: coordinate-equation misfit |g(δ) − y|/|y| ≤ {worst:.2e} (linear start ≤ {start:.2e})"
        );
    }
    Ok(Draws {
        sample_cg,
        sample_cg_residuals,
        sample_cg_capped: capped,
        determined,
        products_s,
    })
}

/// What drawing an iteration's residuals reports.
pub(super) struct Draws {
    /// Each draw's CG iterations.
    pub sample_cg: Vec<usize>,
    /// Each draw's relative residual.
    pub sample_cg_residuals: Vec<f64>,
    /// Draws whose CG stopped at its cap above its tolerance.
    pub sample_cg_capped: usize,
    /// The evidence sums of the scale's update, when asked for.
    pub determined: Option<scale::Evidence>,
    /// Seconds in metric products (on a device, in whole metric solves).
    pub products_s: f64,
}
