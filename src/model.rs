//! The dust model composed from its stages (DESIGN.md §1, §3):
//! `ξ → (s, scale, offset) → ρ → (ā, σ_a²) per star → (ā, v) → −ln P`,
//! with the gradient (VJP of the energy), the Jacobian-vector product into (ā, v) space, its
//! transpose, and the MGVI metric `M = I + Jᵀ F J` with `F = diag(1/v, 1/(2v²))`.
//!
//! Parameters: the sampled vector `x = [ξ_e (ICR) | ξ_scale | ξ_offset]` and the per-star
//! point estimates `ξ_σ` (never sampled, not part of the metric). Energies drop the constant
//! `½ ln 2π` per star. All reductions are done in a fixed order, so results do not depend on
//! the thread count.

use anyhow::{bail, Result};
use rayon::prelude::*;
use std::sync::Arc;

use crate::catalog::PixelCatalog;
use crate::config::Config;
use crate::decomp::{Domain, Space};
use crate::icr::{Icr, IcrWork};
use crate::response::{finish_vjp, inner_columns, star_jvp, star_moments, star_vjp};
use crate::state::next_state_id;
pub use crate::state::{StarData, State};
use crate::transforms::{InvGamma, LogNormal, Normal};
use crate::util::DisjointMut;

/// The composed model.
pub struct Model {
    /// ICR prior operator (shared by the models of all schedule stages).
    pub icr: Arc<Icr>,
    /// Stars.
    pub data: StarData,
    /// Widths of the kept shells, pc.
    pub widths: Vec<f64>,
    /// Prior of the scale of s.
    pub scale: LogNormal,
    /// Prior of the offset of ln ρ.
    pub offset: Normal,
    /// Prior of n_σ.
    pub nsigma: InvGamma,
    /// Whether n_σ is a free point estimate (else fixed at 1).
    pub infer_nsigma: bool,
    pad: usize,
    n_chart: usize,
    /// Vector layouts and global reductions on this rank.
    pub dom: Arc<Domain>,
    /// The OpenCL likelihood, when `backend.kind = "opencl"`.
    gpu: Option<std::sync::Mutex<crate::gpu::model::GpuModel>>,
}

/// Buffers reused across calls.
pub struct ModelWork {
    icr: IcrWork,
    field: Vec<f64>,
    star_a: Vec<f64>,
    star_v: Vec<f64>,
    pix_scalars: Vec<[f64; 2]>,
    pix_energy: Vec<f64>,
    acc: Vec<f64>,
    masked: Vec<f64>,
}

impl Model {
    /// Build the model for `cfg` and pixel-sorted stars at the final nside: all pixels on
    /// one process, or the rank's own pixels (`icr.final_pixels()`, offsets local) on many.
    pub fn new(cfg: &Config, icr: Arc<Icr>, cat: &PixelCatalog) -> Result<Self> {
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
        if cfg.backend.kind == "opencl" && icr.decomp.size() > 1 {
            bail!(
                "the OpenCL backend runs on one process: combining it with MPI ranks is not \
                 supported yet (run `dust3d fit --backend opencl` without mpirun)"
            );
        }
        let dom = Arc::new(Domain::new(
            icr.x_layout(),
            &cat.offsets,
            icr.decomp
                .pixels_per_patch(chart.nside_final().max(icr.decomp.nside_dec)),
        ));
        let shells = chart.kept_shells();
        let p = &cfg.prior;
        let data = StarData::new(cat, &shells);
        let widths = shells.widths_pc();
        let gpu = if cfg.backend.kind == "opencl" {
            let dev = crate::gpu::Gpu::open(&cfg.backend.device_spec())?;
            let precision = cfg.backend.gpu_precision();
            tracing::info!(device = %dev.name, ?precision, "likelihood and ICR on OpenCL");
            let mut m = crate::gpu::model::GpuModel::new(
                &icr,
                &data,
                &widths,
                chart.padding,
                &dev,
                precision,
            )?;
            crate::on_gpu_model!(&mut m, g => g.set_reduction(dom.pix_per_patch, &[&dom.x, &dom.p]))?;
            Some(std::sync::Mutex::new(m))
        } else {
            None
        };
        Ok(Self {
            gpu,
            dom,
            data,
            widths,
            scale: LogNormal::from_mean_std(p.scale_mean, p.scale_std),
            offset: Normal {
                mean: p.offset_mean,
                std: p.offset_std,
            },
            nsigma: InvGamma::new(cfg.noise.nsigma_shape, cfg.noise.nsigma_scale),
            infer_nsigma: cfg.noise.infer_nsigma,
            pad: chart.padding,
            n_chart: chart.n_r(chart.levels),
            icr,
        })
    }

    /// Number of kept shells.
    pub fn n_r(&self) -> usize {
        self.widths.len()
    }

    /// Number of final pixels.
    pub fn npix(&self) -> usize {
        self.data.offsets.len() - 1
    }

    /// Length of the sampled parameter vector x.
    pub fn n_params(&self) -> usize {
        self.icr.n_xi() + 2
    }

    /// Buffers for this model.
    pub fn workspace(&self) -> ModelWork {
        let n = self.data.len();
        ModelWork {
            icr: self.icr.workspace(),
            field: vec![0.0; self.icr.n_field()],
            star_a: vec![0.0; n],
            star_v: vec![0.0; n],
            pix_scalars: vec![[0.0; 2]; self.npix()],
            pix_energy: vec![0.0; self.npix()],
            acc: Vec::new(),
            masked: Vec::new(),
        }
    }

    /// Evaluate the model at (x, ξ_σ).
    pub fn state(&self, x: &[f64], xsig: &[f64], w: &mut ModelWork) -> State {
        let mut st = self.empty_state();
        self.update_state(x, xsig, &mut st, w);
        st
    }

    /// ICR forward of x, the global scale and offset, and n_σ of every star into `st`.
    fn forward_globals(
        &self,
        x: &[f64],
        xsig: &[f64],
        st: &mut State,
        icr: &mut IcrWork,
    ) -> (f64, f64) {
        self.icr.forward(&x[..self.icr.n_xi()], icr);
        self.globals_only(x, xsig, st)
    }

    /// Pixel `p`'s kept log-density `sk` and extinction per shell `col = Δr exp(scl s + off)`.
    fn fill_column(
        &self,
        field: &[f64],
        p: usize,
        scl: f64,
        off: f64,
        sk: &mut [f64],
        col: &mut [f64],
    ) {
        let (n, nc, pad) = (self.n_r(), self.n_chart, self.pad);
        sk.copy_from_slice(&field[p * nc + pad..p * nc + pad + n]);
        for k in 0..n {
            col[k] = (scl * sk[k] + off).exp() * self.widths[k];
        }
    }

    /// A state with every buffer allocated, to be filled by [`Model::update_state`] or
    /// [`Model::value_grad`].
    pub fn empty_state(&self) -> State {
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
            fields_on_host: true,
        }
    }

    /// On the OpenCL backend, keep at least `n` states resident (a KL with n samples needs
    /// them all at once); nothing on the CPU.
    pub fn reserve_device_states(&self, n: usize) {
        if let Some(mut d) = self.device() {
            crate::on_gpu_model!(&mut *d, m => m.reserve(n));
        }
    }

    /// Estimated bytes per call on the device and across the bus, if on a device.
    pub fn device_traffic(&self) -> Option<crate::gpu::model::Traffic> {
        self.device()
            .map(|d| crate::on_gpu_model!(&*d, m => m.traffic()))
    }

    /// The OpenCL model, locked, if this model runs on a device.
    fn device(&self) -> Option<std::sync::MutexGuard<'_, crate::gpu::model::GpuModel>> {
        self.gpu
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The global scale and offset and every star's n_σ (no ICR forward).
    fn globals_only(&self, x: &[f64], xsig: &[f64], st: &mut State) -> (f64, f64) {
        let nxi = self.icr.n_xi();
        if self.infer_nsigma {
            st.nsig
                .par_iter_mut()
                .zip(st.dnsig.par_iter_mut())
                .zip(xsig)
                .for_each(|((v, d), &z)| {
                    (*v, *d) = self.nsigma.value_deriv(z);
                });
        }
        st.scl = self.scale.value(x[nxi]);
        st.off = self.offset.value(x[nxi + 1]);
        st.dscl = self.scale.deriv(x[nxi]);
        (st.scl, st.off)
    }

    /// Re-evaluate the model at (x, ξ_σ) into an existing state (no allocation).
    pub fn update_state(&self, x: &[f64], xsig: &[f64], st: &mut State, w: &mut ModelWork) {
        let nxi = self.icr.n_xi();
        assert_eq!(x.len(), nxi + 2, "parameter vector length");
        assert_eq!(xsig.len(), self.data.len(), "one ξ_σ per star");
        st.id = next_state_id();
        st.fields_on_host = true;
        if let Some(mut g) = self.device() {
            let (scl, off) = self.globals_only(x, xsig, st);
            let (id, mut out, sig) = st.device_parts();
            crate::on_gpu_model!(&mut *g, m => m.state(id, &x[..nxi], sig, scl, off, &mut out))
                .expect("OpenCL state evaluation failed");
            return;
        }
        let (scl, off) = self.forward_globals(x, xsig, st, &mut w.icr);
        let field = &w.icr.fields[self.icr.chart.levels];
        let n = self.n_r();
        let State {
            s,
            rw,
            abar,
            var,
            nsig,
            ..
        } = st;
        let nsig = &*nsig;
        let (ap, vp) = (DisjointMut::new(abar), DisjointMut::new(var));
        let d = &self.data;
        // one pass per pixel: its kept log-density, ρ column, inner columns and stars
        s.par_chunks_mut(n)
            .zip(rw.par_chunks_mut(n))
            .enumerate()
            .for_each_init(
                || vec![0.0; n + 1],
                |cum, (p, (sk, col))| {
                    self.fill_column(field, p, scl, off, sk, col);
                    let (lo, hi) = (d.offsets[p], d.offsets[p + 1]);
                    if lo == hi {
                        return;
                    }
                    // SAFETY: star ranges of distinct pixels are disjoint
                    let (a, v) = unsafe { (ap.chunk(lo, hi - lo), vp.chunk(lo, hi - lo)) };
                    inner_columns(col, cum);
                    for (j, i) in (lo..hi).enumerate() {
                        let (ab, va) = star_moments(d.windows.of(i), col, cum);
                        let ns = nsig[i] * d.a_err[i];
                        a[j] = ab;
                        v[j] = ns * ns + va;
                    }
                },
            );
    }

    /// −ln P(x, ξ_σ | data) up to a constant: Σ_i [(A−ā)²/(2v) + ½ ln v] + ½|x|² + ½|ξ_σ|².
    pub fn energy(&self, st: &State, x: &[f64], xsig: &[f64]) -> f64 {
        let d = &self.data;
        let lik = self.dom.stars.sum(|i| {
            let r = d.a_obs[i] - st.abar[i];
            0.5 * r * r / st.var[i] + 0.5 * st.var[i].ln()
        });
        lik + self.prior_energy(x, xsig)
    }

    /// Pull star cotangents (`ca` on ā, `cv` on σ_a² — the data part of v) back to x:
    /// writes `g = Jᵀ c` (no prior term).
    pub fn vjp(&self, st: &State, ca: &[f64], cv: &[f64], g: &mut [f64], w: &mut ModelWork) {
        let nxi = self.icr.n_xi();
        if let Some(mut d) = self.device() {
            let [g_scl, g_off] =
                crate::on_gpu_model!(&mut *d, m => m.vjp(st, ca, cv, &mut g[..nxi]))
                    .expect("OpenCL VJP failed");
            g[nxi] = g_scl * st.dscl;
            g[nxi + 1] = g_off * self.offset.std;
            return;
        }
        let [g_scl, g_off] =
            self.vjp_to_field(st, ca, cv, 1.0, false, &mut w.field, &mut w.pix_scalars);
        self.icr.adjoint(&w.field, &mut g[..nxi], &mut w.icr);
        g[nxi] = g_scl * st.dscl;
        g[nxi + 1] = g_off * self.offset.std;
    }

    /// The part of [`Model::vjp`] before the ICR adjoint: the cotangent of the final chart
    /// field, times `weight`, written to (or with `accumulate` added to) `sbar`; returns the
    /// cotangents of the scale and offset values (before their latent transforms), times
    /// `weight`.
    #[allow(clippy::too_many_arguments)]
    fn vjp_to_field(
        &self,
        st: &State,
        ca: &[f64],
        cv: &[f64],
        weight: f64,
        accumulate: bool,
        sbar_all: &mut [f64],
        pix_scalars: &mut [[f64; 2]],
    ) -> [f64; 2] {
        let (n, nc, pad) = (self.n_r(), self.n_chart, self.pad);
        let d = &self.data;
        sbar_all
            .par_chunks_mut(nc)
            .zip(pix_scalars.par_iter_mut())
            .enumerate()
            .for_each_init(
                || (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n]),
                |(cum, cum_bar, rw_bar), (p, (sbar, sc))| {
                    let col = &st.rw[p * n..(p + 1) * n];
                    rw_bar.fill(0.0);
                    cum_bar.fill(0.0);
                    inner_columns(col, cum);
                    for i in d.offsets[p]..d.offsets[p + 1] {
                        star_vjp(
                            d.windows.of(i),
                            col,
                            cum,
                            st.abar[i],
                            ca[i],
                            cv[i],
                            rw_bar,
                            cum_bar,
                        );
                    }
                    finish_vjp(cum_bar, rw_bar);
                    // rw = Δr exp(scl s + off): ∂rw/∂s = scl rw, ∂rw/∂scl = s rw, ∂rw/∂off = rw
                    if !accumulate {
                        sbar.fill(0.0);
                    }
                    let (mut g_scl, mut g_off) = (0.0, 0.0);
                    for k in 0..n {
                        let t = weight * rw_bar[k] * col[k];
                        sbar[pad + k] += st.scl * t;
                        g_scl += st.s[p * n + k] * t;
                        g_off += t;
                    }
                    *sc = [g_scl, g_off];
                },
            );
        self.dom.pixel_sum2(pix_scalars)
    }

    /// Sample-averaged metric of the KL over p = [x | ξ_σ]: `out = v + (1/N) Σ_k J_kᵀ F_k J_k v`
    /// with J_k the Jacobian at sample state k into (ā, v) including ∂v/∂ξ_σ, and `mask`
    /// restricting x. ICR is linear and the same for every sample, so one forward and one
    /// adjoint serve all N samples.
    pub fn averaged_metric(
        &self,
        states: &[State],
        mask: &[f64],
        v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) {
        let (nxi, np, ns) = (self.icr.n_xi(), self.n_params(), self.data.len());
        let (vx, vs) = v.split_at(np);
        if let Some(mut d) = self.device() {
            self.averaged_metric_device(&mut d, states, mask, v, out);
            return;
        }
        let mut vxm = std::mem::take(&mut w.masked);
        vxm.clear();
        vxm.extend(vx.iter().zip(mask).map(|(a, m)| a * m));
        self.icr.forward(&vxm[..nxi], &mut w.icr);
        let ds = std::mem::take(&mut w.icr.fields[self.icr.chart.levels]);
        let mut acc = std::mem::take(&mut w.acc);
        acc.resize(ds.len(), 0.0);
        acc.fill(0.0);
        let n = states.len() as f64;
        let (mut da, mut dv) = (std::mem::take(&mut w.star_a), std::mem::take(&mut w.star_v));
        let (mut g_scl, mut g_off) = (0.0, 0.0);
        out.iter_mut().for_each(|o| *o = 0.0);
        let d = &self.data;
        for st in states {
            self.jvp_from_field(
                st,
                &ds,
                vxm[nxi],
                vxm[nxi + 1],
                &mut da,
                &mut dv,
                &mut w.field,
            );
            for i in 0..ns {
                // v also depends on ξ_σ: ∂v/∂ξ_σ = 2 n_σ σ_A² dn_σ/dξ_σ (diagonal per star)
                let dvds = 2.0 * st.nsig[i] * d.a_err[i] * d.a_err[i] * st.dnsig[i];
                dv[i] += dvds * vs[i];
                da[i] /= st.var[i];
                dv[i] /= 2.0 * st.var[i] * st.var[i];
                out[np + i] += dvds * dv[i] / n;
            }
            let [a, b] =
                self.vjp_to_field(st, &da, &dv, 1.0 / n, true, &mut acc, &mut w.pix_scalars);
            g_scl += a * st.dscl;
            g_off += b * self.offset.std;
        }
        w.icr.fields[self.icr.chart.levels] = ds;
        self.icr.adjoint(&acc, &mut out[..nxi], &mut w.icr);
        out[nxi] = g_scl;
        out[nxi + 1] = g_off;
        for i in 0..np {
            out[i] = mask[i] * out[i] + vx[i];
        }
        for i in 0..ns {
            out[np + i] += vs[i];
        }
        w.acc = acc;
        w.masked = vxm;
        w.star_a = da;
        w.star_v = dv;
    }

    /// [`Model::averaged_metric`] on the OpenCL device (host vectors in and out).
    fn averaged_metric_device(
        &self,
        dev: &mut crate::gpu::model::GpuModel,
        states: &[State],
        mask: &[f64],
        v: &[f64],
        out: &mut [f64],
    ) {
        let refs: Vec<&State> = states.iter().collect();
        crate::on_gpu_model!(dev, m => m.metric_host(&refs, mask, true, self.offset.std, v, out))
            .expect("OpenCL metric product failed");
    }

    /// Solve `M x = b` by CG on the OpenCL device for the metric of `states` (averaged, with
    /// the ξ_σ block when `with_sig`, as [`Model::averaged_metric`]; one state without it is
    /// the sampling metric of [`crate::mgvi::ModelAt`]). None on the CPU backend (or when the
    /// states do not fit on the device): the caller then runs CG on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn solve_metric(
        &self,
        states: &[&State],
        mask: &[f64],
        with_sig: bool,
        b: &[f64],
        x: &mut [f64],
        settings: &crate::cg::CgSettings,
    ) -> Option<crate::cg::CgReport> {
        let mut d = self.device()?;
        crate::on_gpu_model!(&mut *d, m => m.solve(states, mask, with_sig, self.offset.std, b, x, settings))
            .expect("OpenCL CG solve failed")
    }

    /// [`Model::value_grad`] on the OpenCL device.
    fn value_grad_device(
        &self,
        dev: &mut crate::gpu::model::GpuModel,
        x: &[f64],
        xsig: &[f64],
        st: &mut State,
        gx: &mut [f64],
        gsig: &mut [f64],
    ) -> f64 {
        let nxi = self.icr.n_xi();
        st.id = next_state_id();
        st.fields_on_host = false;
        let (scl, off) = self.globals_only(x, xsig, st);
        let (id, mut out, [nsig, dnsig]) = st.device_parts();
        let sig = [nsig, dnsig, xsig];
        let [lik, g_scl, g_off] = crate::on_gpu_model!(dev, m => m.value_grad(id, &x[..nxi], sig, self.infer_nsigma, (scl, off), &mut out, gsig, &mut gx[..nxi]))
            .expect("OpenCL value and gradient failed");
        gx[nxi] = g_scl * st.dscl;
        gx[nxi + 1] = g_off * self.offset.std;
        gx.iter_mut().zip(x).for_each(|(g, xv)| *g += xv);
        lik + self.prior_energy(x, xsig)
    }

    /// ½|x|² + ½|ξ_σ|² (the latter only when n_σ is inferred).
    fn prior_energy(&self, x: &[f64], xsig: &[f64]) -> f64 {
        let prior = 0.5 * self.dom.x.dot(x, x);
        let psig = if self.infer_nsigma {
            0.5 * self.dom.stars.dot(xsig, xsig)
        } else {
            0.0
        };
        prior + psig
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
    ) {
        let d = &self.data;
        let mut ca = std::mem::take(&mut w.star_a);
        let mut cv = std::mem::take(&mut w.star_v);
        ca.par_iter_mut()
            .zip(cv.par_iter_mut())
            .zip(gsig.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((a, c), gs))| {
                let r = d.a_obs[i] - st.abar[i];
                let v = st.var[i];
                *a = -r / v;
                *c = 0.5 / v - 0.5 * r * r / (v * v);
                *gs = if self.infer_nsigma {
                    *c * 2.0 * st.nsig[i] * d.a_err[i] * d.a_err[i] * st.dnsig[i] + xsig[i]
                } else {
                    0.0
                };
            });
        self.vjp(st, &ca, &cv, gx, w);
        gx.par_iter_mut().zip(x).for_each(|(g, xv)| *g += xv);
        w.star_a = ca;
        w.star_v = cv;
    }

    /// Energy and gradient in one pass over the stars (each star's window is read once):
    /// fills `st` like [`Model::update_state`] and the gradients like [`Model::gradient`].
    #[allow(clippy::too_many_arguments)]
    pub fn value_grad(
        &self,
        x: &[f64],
        xsig: &[f64],
        st: &mut State,
        gx: &mut [f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> f64 {
        if let Some(mut d) = self.device() {
            return self.value_grad_device(&mut d, x, xsig, st, gx, gsig);
        }
        st.id = next_state_id();
        st.fields_on_host = true;
        let nxi = self.icr.n_xi();
        let (n, nc, pad) = (self.n_r(), self.n_chart, self.pad);
        let (scl, off) = self.forward_globals(x, xsig, st, &mut w.icr);
        let d = &self.data;
        let ModelWork {
            icr,
            field: sbar_all,
            pix_scalars,
            pix_energy,
            ..
        } = w;
        let field = &icr.fields[self.icr.chart.levels];
        let State {
            s,
            rw,
            abar,
            var,
            nsig,
            dnsig,
            ..
        } = st;
        let (nsig, dnsig) = (&*nsig, &*dnsig);
        let (ap, vp, gp) = (
            DisjointMut::new(abar),
            DisjointMut::new(var),
            DisjointMut::new(gsig),
        );
        s.par_chunks_mut(n)
            .zip(rw.par_chunks_mut(n))
            .zip(sbar_all.par_chunks_mut(nc))
            .zip(pix_scalars.par_iter_mut())
            .zip(pix_energy.par_iter_mut())
            .enumerate()
            .for_each_init(
                || (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n]),
                |(cum, cum_bar, rw_bar), (p, ((((sk, col), sbar), sc), en))| {
                    self.fill_column(field, p, scl, off, sk, col);
                    inner_columns(col, cum);
                    rw_bar.fill(0.0);
                    cum_bar.fill(0.0);
                    let (lo, hi) = (d.offsets[p], d.offsets[p + 1]);
                    // SAFETY: star ranges of distinct pixels are disjoint
                    let (a, v, g) = unsafe {
                        (
                            ap.chunk(lo, hi - lo),
                            vp.chunk(lo, hi - lo),
                            gp.chunk(lo, hi - lo),
                        )
                    };
                    let mut e = 0.0;
                    for (j, i) in (lo..hi).enumerate() {
                        let win = d.windows.of(i);
                        let (ab, va) = star_moments(win, col, cum);
                        let ns = nsig[i] * d.a_err[i];
                        let vv = ns * ns + va;
                        let r = d.a_obs[i] - ab;
                        e += 0.5 * r * r / vv + 0.5 * vv.ln();
                        let (ca, cv) = (-r / vv, 0.5 / vv - 0.5 * r * r / (vv * vv));
                        star_vjp(win, col, cum, ab, ca, cv, rw_bar, cum_bar);
                        a[j] = ab;
                        v[j] = vv;
                        g[j] = if self.infer_nsigma {
                            cv * 2.0 * ns * d.a_err[i] * dnsig[i] + xsig[i]
                        } else {
                            0.0
                        };
                    }
                    *en = e;
                    finish_vjp(cum_bar, rw_bar);
                    sbar.fill(0.0);
                    let (mut g_scl, mut g_off) = (0.0, 0.0);
                    for k in 0..n {
                        let t = rw_bar[k] * col[k];
                        sbar[pad + k] = scl * t;
                        g_scl += sk[k] * t;
                        g_off += t;
                    }
                    *sc = [g_scl, g_off];
                },
            );
        self.icr.adjoint(sbar_all, &mut gx[..nxi], icr);
        let [g_scl, g_off] = self.dom.pixel_sum2(pix_scalars);
        gx[nxi] = g_scl * st.dscl;
        gx[nxi + 1] = g_off * self.offset.std;
        gx.par_iter_mut().zip(x).for_each(|(g, xv)| *g += xv);
        let lik = self.dom.pixel_sum(pix_energy);
        lik + self.prior_energy(x, xsig)
    }

    /// Tangent of (ā, v) per star for a tangent `dx` of x (ξ_σ held fixed).
    pub fn jvp(&self, st: &State, dx: &[f64], da: &mut [f64], dv: &mut [f64], w: &mut ModelWork) {
        let nxi = self.icr.n_xi();
        if let Some(mut d) = self.device() {
            let (dscl, doff) = (st.dscl * dx[nxi], self.offset.std * dx[nxi + 1]);
            crate::on_gpu_model!(&mut *d, m => m.jvp(st, &dx[..nxi], dscl, doff, da, dv))
                .expect("OpenCL JVP failed");
            return;
        }
        self.icr.forward(&dx[..nxi], &mut w.icr);
        let ds = &w.icr.fields[self.icr.chart.levels];
        self.jvp_from_field(st, ds, dx[nxi], dx[nxi + 1], da, dv, &mut w.field);
    }

    /// The part of [`Model::jvp`] after the ICR forward: `ds = S dξ_e` (final chart field) and
    /// the latent tangents of scale and offset; `buf` holds the tangent of rw.
    #[allow(clippy::too_many_arguments)]
    fn jvp_from_field(
        &self,
        st: &State,
        ds: &[f64],
        dxi_scl: f64,
        dxi_off: f64,
        da: &mut [f64],
        dv: &mut [f64],
        buf: &mut [f64],
    ) {
        let (n, nc, pad) = (self.n_r(), self.n_chart, self.pad);
        let dscl = st.dscl * dxi_scl;
        let doff = self.offset.std * dxi_off;
        let d = &self.data;
        let (ap, vp) = (DisjointMut::new(da), DisjointMut::new(dv));
        buf[..self.npix() * n]
            .par_chunks_mut(n)
            .enumerate()
            .for_each_init(
                || (vec![0.0; n + 1], vec![0.0; n + 1]),
                |(cum, dcum), (p, drw)| {
                    let col = &st.rw[p * n..(p + 1) * n];
                    for k in 0..n {
                        let j = p * nc + pad + k;
                        drw[k] = col[k] * (st.scl * ds[j] + st.s[p * n + k] * dscl + doff);
                    }
                    let (lo, hi) = (d.offsets[p], d.offsets[p + 1]);
                    if lo == hi {
                        return;
                    }
                    inner_columns(col, cum);
                    inner_columns(drw, dcum);
                    // SAFETY: star ranges of distinct pixels are disjoint
                    let (a, v) = unsafe { (ap.chunk(lo, hi - lo), vp.chunk(lo, hi - lo)) };
                    for (j, i) in (lo..hi).enumerate() {
                        let (x, y) = star_jvp(d.windows.of(i), col, drw, cum, dcum, st.abar[i]);
                        a[j] = x;
                        v[j] = y;
                    }
                },
            );
    }

    /// Metric-vector product `out = v + Jᵀ F J v`.
    pub fn metric(&self, st: &State, v: &[f64], out: &mut [f64], w: &mut ModelWork) {
        let mut da = std::mem::take(&mut w.star_a);
        let mut dv = std::mem::take(&mut w.star_v);
        self.jvp(st, v, &mut da, &mut dv, w);
        for i in 0..da.len() {
            let var = st.var[i];
            da[i] /= var;
            dv[i] /= 2.0 * var * var;
        }
        self.vjp(st, &da, &dv, out, w);
        out.par_iter_mut().zip(v).for_each(|(o, x)| *o += x);
        w.star_a = da;
        w.star_v = dv;
    }

    /// `Jᵀ F^{1/2} η` for standard-normal `eta_a`, `eta_v` (one pair per star).
    pub fn sqrt_fisher_t(
        &self,
        st: &State,
        eta_a: &[f64],
        eta_v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) {
        let ca: Vec<f64> = eta_a
            .iter()
            .zip(&st.var)
            .map(|(e, v)| e / v.sqrt())
            .collect();
        let cv: Vec<f64> = eta_v
            .iter()
            .zip(&st.var)
            .map(|(e, v)| e / (std::f64::consts::SQRT_2 * v))
            .collect();
        self.vjp(st, &ca, &cv, out, w);
    }
}

#[cfg(test)]
mod tests;
