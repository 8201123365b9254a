//! The dust model composed from its stages (docs/model.md):
//! `ξ → (s, scale, offset) → ρ → (ā, σ_a²) per star → (ā, v) → −ln P`,
//! with the gradient (VJP of the energy), the Jacobian-vector product into (ā, v) space, its
//! transpose, and the MGVI metric `M = I + Jᵀ F J` with `F = diag(1/v, 1/(2v²))`.
//!
//! Parameters: the sampled vector `x = [ξ_e (ICR) | ξ_scale | ξ_offset]` and the per-star
//! point estimates `ξ_σ` (never sampled, not part of the metric). Energies drop the constant
//! `½ ln 2π` per star. The voxel and star stages run on a [`Backend`] (the CPU by default);
//! the chain rule through the priors, the prior terms and the masks live here, once.

use anyhow::{bail, Result};
use rayon::prelude::*;
use std::sync::Arc;

use super::backend::{Backend, Traffic};
pub use super::core::{ModelCore, ModelParams, ModelWork};
use super::cpu::Cpu;
use super::mask::Mask;
use super::state::next_state_id;
pub use super::state::{StarData, State};
use crate::base::util::{par_add, par_copy, PAR_MIN_LEN};
use crate::data::catalog::PixelCatalog;
use crate::num::cg::{CgReport, CgSettings};
use crate::prior::icr::Icr;
use crate::sphere::decomp::{Domain, Space};
pub use samples::{SampleFields, SampleTail};

/// Stars per task of the n_σ transform (its exponentials taken a block at a time).
const SIG_CHUNK: usize = 4096;

/// The composed model: its [`ModelCore`] (which it derefs to) and the backend its voxel
/// and star stages run on.
pub struct Model {
    core: ModelCore,
    /// Where the voxel and star stages run.
    backend: Box<dyn Backend>,
}

impl std::ops::Deref for Model {
    type Target = ModelCore;
    fn deref(&self) -> &ModelCore {
        &self.core
    }
}

impl Model {
    /// Build the model on the CPU backend for pixel-sorted stars at the final nside: all
    /// pixels on one process, or the rank's own pixels (`icr.final_pixels()`, offsets
    /// local) on many.
    pub fn new(params: &ModelParams, icr: Arc<Icr>, cat: &PixelCatalog) -> Result<Self> {
        let chart = icr.chart.clone();
        if cat.nside != chart.nside_final() {
            bail!(
                "stars are pixelised at nside {}, the model at {}",
                cat.nside,
                chart.nside_final()
            );
        }
        let own = icr.final_pixels();
        if cat.offsets.len() != own.len() + 1 {
            bail!(
                "the catalog covers {} pixels, this rank's model {}",
                cat.offsets.len() - 1,
                own.len()
            );
        }
        let dom = Arc::new(Domain::new(
            icr.x_layout(),
            &cat.offsets,
            icr.decomp
                .pixels_per_patch(chart.nside_final().max(icr.decomp.nside_dec)),
        ));
        let shells = chart.kept_shells();
        let data = StarData::new(cat, &shells, &params.distance_prior);
        let widths = shells.widths_pc();
        let core = ModelCore {
            dom,
            data,
            widths,
            scale: params.scale,
            offset: params.offset,
            nsigma: params.nsigma.clone(),
            infer_nsigma: params.infer_nsigma && !params.marginal_nsigma,
            marginal: params.marginal_nsigma.then(|| {
                Arc::new(crate::likelihood::noise::MarginalNsigma::new(
                    &params.nsigma,
                ))
            }),
            distance_variance: params.distance_variance,
            pad: chart.padding,
            n_chart: chart.n_r(chart.levels),
            icr,
            spares: Default::default(),
        };
        Ok(Self {
            core,
            backend: Box::new(Cpu),
        })
    }

    /// Run the voxel and star stages on `backend` from now on.
    pub fn set_backend(&mut self, backend: Box<dyn Backend>) {
        self.backend = backend;
    }

    /// "cpu" or the device the model runs on.
    pub fn backend_name(&self) -> String {
        self.backend.describe()
    }

    /// Evaluate the model at (x, ξ_σ).
    pub fn state(&self, x: &[f64], xsig: &[f64], w: &mut ModelWork) -> Result<State> {
        let mut st = self.empty_state();
        self.update_state(x, xsig, &mut st, w)?;
        Ok(st)
    }

    /// A state with every buffer allocated, to be filled by [`Model::update_state`] or
    /// [`Model::value_grad`]: a handed-back one ([`ModelCore::recycle`]) reset to the values
    /// of a new one, if there is one.
    pub fn empty_state(&self) -> State {
        if let Some(mut st) = self.spare_state() {
            let fills = [
                (&mut st.s, 0.0),
                (&mut st.rw, 0.0),
                (&mut st.abar, 0.0),
                (&mut st.var, 0.0),
                (&mut st.nsig, 1.0),
                (&mut st.dnsig, 0.0),
            ];
            for (v, x) in fills {
                v.par_iter_mut()
                    .with_min_len(PAR_MIN_LEN)
                    .for_each(|y| *y = x);
            }
            (st.scl, st.dscl, st.off) = (0.0, 0.0, 0.0);
            (st.id, st.sig_id, st.fields_on_host) = (next_state_id(), next_state_id(), true);
            return st;
        }
        State {
            s: vec![0.0; self.npix() * self.n_r()],
            rw: vec![0.0; self.npix() * self.n_r()],
            scl: 0.0,
            dscl: 0.0,
            off: 0.0,
            abar: vec![0.0; self.data.len()],
            var: vec![0.0; self.data.len()],
            nsig: vec![1.0; self.data.len()],
            dnsig: vec![0.0; self.data.len()],
            id: next_state_id(),
            sig_id: next_state_id(),
            fields_on_host: true,
        }
    }

    /// On a device backend, keep at least `n` states resident (a KL with n samples needs
    /// them all at once); nothing on the CPU.
    pub fn reserve_device_states(&self, n: usize) {
        self.backend.reserve_states(n);
    }

    /// Estimated bytes per call on the device and across the bus, if on a device.
    pub fn device_traffic(&self) -> Option<Traffic> {
        self.backend.traffic()
    }

    /// The global scale and offset of the latents `[ξ_scale, ξ_offset]` and every star's
    /// n_σ into `st`; n_σ copied from `same_sig` when given (a state at the same ξ_σ) instead
    /// of recomputed.
    fn set_globals(
        &self,
        [zs, zo]: [f64; 2],
        xsig: &[f64],
        same_sig: Option<&State>,
        st: &mut State,
    ) {
        st.sig_id = next_state_id();
        if let Some(src) = same_sig.filter(|_| self.marginal.is_none() && self.infer_nsigma) {
            par_copy(&mut st.nsig, &src.nsig);
            par_copy(&mut st.dnsig, &src.dnsig);
            st.sig_id = src.sig_id;
        } else if self.marginal.is_some() {
            // the likelihood integrates n_σ out: v holds the distance part σ_a² alone
            st.nsig.fill(0.0);
            st.dnsig.fill(0.0);
        } else if self.infer_nsigma {
            st.nsig
                .par_chunks_mut(SIG_CHUNK)
                .zip(st.dnsig.par_chunks_mut(SIG_CHUNK))
                .zip(xsig.par_chunks(SIG_CHUNK))
                .for_each(|((v, d), z)| self.nsigma.values_derivs(z, v, d));
        }
        st.scl = self.scale.value(zs);
        st.off = self.offset.value(zo);
        st.dscl = self.scale.deriv(zs);
    }

    /// The latents `[ξ_scale, ξ_offset]` of parameters `x`.
    fn globals(&self, x: &[f64]) -> [f64; 2] {
        let nxi = self.icr.n_xi();
        [x[nxi], x[nxi + 1]]
    }

    /// Check the lengths of a parameter vector and its ξ_σ.
    fn check_lengths(&self, x: &[f64], xsig: &[f64]) -> Result<()> {
        if x.len() != self.n_params() || xsig.len() != self.data.len() {
            bail!(
                "parameter vectors of length {} and {} for a model of {} parameters and {} stars",
                x.len(),
                xsig.len(),
                self.n_params(),
                self.data.len()
            );
        }
        Ok(())
    }

    /// Re-evaluate the model at (x, ξ_σ) into an existing state (no allocation).
    pub fn update_state(
        &self,
        x: &[f64],
        xsig: &[f64],
        st: &mut State,
        w: &mut ModelWork,
    ) -> Result<()> {
        self.update_state_sharing(x, xsig, None, st, w)
    }

    /// [`Model::update_state`], with the stars' n_σ copied from `same_sig`, a state at the
    /// same ξ_σ, when given: MGVI's samples share ξ_σ unless they sample it, and n_σ of 2
    /// million stars costs more than copying it (W2: 14 ms against 2).
    pub fn update_state_sharing(
        &self,
        x: &[f64],
        xsig: &[f64],
        same_sig: Option<&State>,
        st: &mut State,
        w: &mut ModelWork,
    ) -> Result<()> {
        self.check_lengths(x, xsig)?;
        st.id = next_state_id();
        self.set_globals(self.globals(x), xsig, same_sig, st);
        self.backend.state(&self.core, &x[..self.icr.n_xi()], st, w)
    }

    /// −ln P(x, ξ_σ | data) up to a constant: Σ_i [(A−ā)²/(2v) + ½ ln v] + ½|x|² + ½|ξ_σ|².
    pub fn energy(&self, st: &State, x: &[f64], xsig: &[f64]) -> f64 {
        let d = &self.data;
        let lik = self
            .dom
            .stars
            .sum(|i| self.star_energy(i, d.a_obs[i] - st.abar[i], st.var[i]).0);
        lik + self.prior_energy(x, xsig)
    }

    /// Pull star cotangents (`ca` on ā, `cv` on σ_a² — the data part of v) back to x:
    /// writes `g = Jᵀ c` (no prior term).
    pub fn vjp(
        &self,
        st: &State,
        ca: &[f64],
        cv: &[f64],
        g: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let nxi = self.icr.n_xi();
        let c = self.backend.vjp(&self.core, st, ca, cv, &mut g[..nxi], w)?;
        let [a, b] = self.chain().cotangent(st.dscl, c);
        g[nxi] = a;
        g[nxi + 1] = b;
        Ok(())
    }

    /// Sample-averaged metric of the KL over p = [x | ξ_σ]: `out = v + (1/N) Σ_k J_kᵀ F_k J_k v`
    /// with J_k the Jacobian at sample state k into (ā, v) including ∂v/∂ξ_σ, and `mask`
    /// restricting x. ICR is linear and the same for every sample, so one forward and one
    /// adjoint serve all N samples.
    pub fn averaged_metric(
        &self,
        states: &[State],
        mask: &Mask,
        v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        self.averaged_fisher(states, mask, v, out, w)?;
        par_add(out, v);
        Ok(())
    }

    /// [`Model::averaged_metric`] without its identity part: `out = mask ∘ (1/N) Σ_k J_kᵀ F_k
    /// J_k v` (held entries multiplied by 0), for a CG that adds `v` itself
    /// ([`crate::num::cg::Operator::IdentityPlus`]).
    pub fn averaged_fisher(
        &self,
        states: &[State],
        mask: &Mask,
        v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        self.backend
            .averaged_fisher(&self.core, states, mask, v, out, w)
    }

    /// Solve `M x = b` where the backend keeps its vectors, for the metric of `states`
    /// (averaged, with the ξ_σ block when `with_sig`, as [`Model::averaged_metric`]; one
    /// state without it is the sampling metric of `inference::mgvi::ModelAt`). `Ok(None)` on
    /// the CPU backend (or when the states do not fit on the device): the caller then runs
    /// CG on the host.
    pub fn solve_metric(
        &self,
        states: &[&State],
        mask: &Mask,
        with_sig: bool,
        b: &[f64],
        x: &mut [f64],
        settings: &CgSettings,
    ) -> Result<Option<CgReport>> {
        self.backend
            .solve_metric(&self.core, states, mask, with_sig, b, x, settings)
    }

    /// ½|x|² + ½|ξ_σ|² (the latter only when n_σ is inferred).
    fn prior_energy(&self, x: &[f64], xsig: &[f64]) -> f64 {
        0.5 * self.dom.x.dot(x, x) + self.sig_prior_energy(xsig)
    }

    /// ½|ξ_σ|² when n_σ is inferred, else 0.
    fn sig_prior_energy(&self, xsig: &[f64]) -> f64 {
        if self.infer_nsigma {
            0.5 * self.dom.stars.dot(xsig, xsig)
        } else {
            0.0
        }
    }

    /// Gradient of [`Model::energy`] with respect to x and ξ_σ.
    pub fn gradient(
        &self,
        st: &State,
        x: &[f64],
        xsig: &[f64],
        gx: &mut [f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let d = &self.data;
        let mut ca = std::mem::take(&mut w.star_a);
        let mut cv = std::mem::take(&mut w.star_v);
        ca.par_iter_mut()
            .zip(cv.par_iter_mut())
            .zip(gsig.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((a, c), gs))| {
                let (_, ga, gv) = self.star_energy(i, d.a_obs[i] - st.abar[i], st.var[i]);
                (*a, *c) = (ga, gv);
                *gs = if self.infer_nsigma {
                    *c * 2.0 * st.nsig[i] * d.a_err[i] * d.a_err[i] * st.dnsig[i] + xsig[i]
                } else {
                    0.0
                };
            });
        let r = self.vjp(st, &ca, &cv, gx, w);
        w.star_a = ca;
        w.star_v = cv;
        r?;
        gx.par_iter_mut().zip(x).for_each(|(g, xv)| *g += xv);
        Ok(())
    }

    /// Energy and gradient in one pass over the stars (each star's window is read once):
    /// fills `st` like [`Model::update_state`] and the gradients like [`Model::gradient`].
    pub fn value_grad(
        &self,
        x: &[f64],
        xsig: &[f64],
        st: &mut State,
        gx: &mut [f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<f64> {
        self.value_grad_sharing(x, xsig, (st, None), gx, gsig, w)
    }

    /// [`Model::value_grad`] into `st`, with the stars' n_σ copied from the second state when
    /// given, a state at the same ξ_σ (as [`Model::update_state_sharing`]).
    pub fn value_grad_sharing(
        &self,
        x: &[f64],
        xsig: &[f64],
        (st, same_sig): (&mut State, Option<&State>),
        gx: &mut [f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<f64> {
        self.check_lengths(x, xsig)?;
        let nxi = self.icr.n_xi();
        st.id = next_state_id();
        self.set_globals(self.globals(x), xsig, same_sig, st);
        let [lik, g_scl, g_off] =
            self.backend
                .value_grad(&self.core, &x[..nxi], xsig, st, &mut gx[..nxi], gsig, w)?;
        let [a, b] = self.chain().cotangent(st.dscl, [g_scl, g_off]);
        gx[nxi] = a;
        gx[nxi + 1] = b;
        gx.par_iter_mut().zip(x).for_each(|(g, xv)| *g += xv);
        Ok(lik + self.prior_energy(x, xsig))
    }

    /// Tangent of (ā, v) per star for a tangent `dx` of x (ξ_σ held fixed).
    pub fn jvp(
        &self,
        st: &State,
        dx: &[f64],
        da: &mut [f64],
        dv: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let nxi = self.icr.n_xi();
        let (dscl, doff) = self.chain().tangent(st.dscl, [dx[nxi], dx[nxi + 1]]);
        self.backend
            .jvp(&self.core, st, &dx[..nxi], dscl, doff, da, dv, w)
    }

    /// Metric-vector product `out = v + Jᵀ F J v`.
    pub fn metric(&self, st: &State, v: &[f64], out: &mut [f64], w: &mut ModelWork) -> Result<()> {
        self.fisher_metric(st, v, out, w)?;
        par_add(out, v);
        Ok(())
    }

    /// [`Model::metric`] without its identity part: `out = Jᵀ F J v`.
    pub fn fisher_metric(
        &self,
        st: &State,
        v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let nxi = self.icr.n_xi();
        let chain = self.chain();
        let (dscl, doff) = chain.tangent(st.dscl, [v[nxi], v[nxi + 1]]);
        let (core, g_xi) = (&self.core, &mut out[..nxi]);
        let c = self
            .backend
            .metric(core, st, &v[..nxi], dscl, doff, g_xi, w)?;
        [out[nxi], out[nxi + 1]] = chain.cotangent(st.dscl, c);
        Ok(())
    }

    /// [`Model::metric`] of two vectors `v[t]` into `out[t]` at one state, each the bits of
    /// its product on its own (the backend may walk the stars once for both).
    pub fn metric_pair(
        &self,
        st: &State,
        v: [&[f64]; 2],
        [o0, o1]: [&mut [f64]; 2],
        w: &mut ModelWork,
    ) -> Result<()> {
        self.fisher_metric_pair(st, v, [&mut *o0, &mut *o1], w)?;
        par_add(o0, v[0]);
        par_add(o1, v[1]);
        Ok(())
    }

    /// [`Model::metric_pair`] without the identity parts: `out[t] = Jᵀ F J v[t]`.
    pub fn fisher_metric_pair(
        &self,
        st: &State,
        v: [&[f64]; 2],
        out: [&mut [f64]; 2],
        w: &mut ModelWork,
    ) -> Result<()> {
        let nxi = self.icr.n_xi();
        let chain = self.chain();
        let tangents = v.map(|v| chain.tangent(st.dscl, [v[nxi], v[nxi + 1]]));
        let [o0, o1] = out;
        {
            let (g0, g1) = (&mut o0[..nxi], &mut o1[..nxi]);
            let dxi = [&v[0][..nxi], &v[1][..nxi]];
            let c = self
                .backend
                .metric_pair(&self.core, st, dxi, tangents, [g0, g1], w)?;
            [o0[nxi], o0[nxi + 1]] = chain.cotangent(st.dscl, c[0]);
            [o1[nxi], o1[nxi + 1]] = chain.cotangent(st.dscl, c[1]);
        }
        Ok(())
    }

    /// `Jᵀ F^{1/2} η` for standard-normal `eta_a`, `eta_v` (one pair per star).
    pub fn sqrt_fisher_t(
        &self,
        st: &State,
        eta_a: &[f64],
        eta_v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let (ca, cv): (Vec<f64>, Vec<f64>) = (0..st.var.len())
            .map(|i| self.sqrt_fisher(i, st.var[i], eta_a[i], eta_v[i]))
            .unzip();
        self.vjp(st, &ca, &cv, out, w)
    }
}

mod samples;

#[cfg(test)]
mod tests;
