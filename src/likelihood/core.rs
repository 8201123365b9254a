//! What a model is made of, independent of where it runs: the ICR operator, the stars with
//! their distance windows, the shells, the priors, the decomposition ([`ModelCore`]); the
//! prior parameters a configuration sets ([`ModelParams`]); and the CPU workspace
//! ([`ModelWork`]). Backends read a [`ModelCore`]; [`super::model::Model`] adds the backend.

use std::sync::Arc;

use super::distance::DistancePrior;
use super::noise::MarginalNsigma;
use super::state::StarData;
use crate::prior::icr::{Icr, IcrWork};
use crate::sphere::decomp::Domain;
use crate::sphere::transforms::{InvGamma, LogNormal, Normal};

/// The model's priors and noise model (paper §4, App. A): what a configuration fixes.
#[derive(Clone, Debug)]
pub struct ModelParams {
    /// Prior of the scale of s (log-normal in its mean and standard deviation).
    pub scale: LogNormal,
    /// Prior of the offset of ln ρ, ln(extinction units per pc).
    pub offset: Normal,
    /// Prior of the per-star error inflation n_σ.
    pub nsigma: InvGamma,
    /// Whether n_σ is a free point estimate (else fixed at 1).
    pub infer_nsigma: bool,
    /// Whether n_σ is integrated out of each star's likelihood ([`MarginalNsigma`]; then no
    /// per-star parameter, and `infer_nsigma` is ignored).
    pub marginal_nsigma: bool,
    /// Whether each star's variance includes σ_a², the spread of its extinction over its
    /// distance uncertainty (else v = (n_σ σ_A)² alone: a start that fits the columns before
    /// the distance structure; see docs/model.md).
    pub distance_variance: bool,
    /// The stars' distance prior in their windows.
    pub distance_prior: DistancePrior,
}

impl Default for ModelParams {
    /// The paper's priors: scale LogNormal(mean 1, std 0.5), offset N(−6.91, 1),
    /// n_σ ~ InvGamma(3, 4), inferred, distances uniform in parallax.
    fn default() -> Self {
        Self {
            scale: LogNormal::from_mean_std(1.0, 0.5),
            offset: Normal {
                mean: -6.91,
                std: 1.0,
            },
            nsigma: InvGamma::new(3.0, 4.0),
            infer_nsigma: true,
            marginal_nsigma: false,
            distance_variance: true,
            distance_prior: DistancePrior::Parallax,
        }
    }
}

/// What every backend reads of a model: the ICR operator, the stars, the shells, the
/// priors and the decomposition. A [`super::model::Model`] derefs to it.
pub struct ModelCore {
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
    /// Whether n_σ is a free point estimate (else fixed at 1, or marginalised).
    pub infer_nsigma: bool,
    /// The n_σ-marginal likelihood, when n_σ is integrated out.
    pub marginal: Option<Arc<MarginalNsigma>>,
    /// Whether σ_a² enters each star's variance ([`ModelParams::distance_variance`]).
    pub distance_variance: bool,
    pub(crate) pad: usize,
    pub(crate) n_chart: usize,
    /// Vector layouts and global reductions on this rank.
    pub dom: Arc<Domain>,
    /// States and workspaces handed back for the next user ([`Spares`]).
    pub(crate) spares: Spares,
}

/// States and workspaces a finished user handed back ([`ModelCore::recycle`]), so that the
/// next iteration's are not allocated anew. Beyond ~32 MB glibc gives every block its own
/// mapping and returns it at `free`, so a buffer allocated anew costs a page fault and a
/// page zeroed by the kernel per 4 KB at its first touch (at W2 the kernel's page clearing
/// is 8 % of an iteration's CPU time, most of it the iteration's own first touches).
#[derive(Default)]
pub(crate) struct Spares {
    states: std::sync::Mutex<Vec<super::state::State>>,
    works: std::sync::Mutex<Vec<ModelWork>>,
}

/// A final-chart field as a backend reads it: the field at a point, plus or minus the field
/// of a KL sample's offset from that point. ICR is linear, S(x ± o) = S x ± S o, so one
/// forward of the point and one per offset give every sample's field
/// ([`super::model::SampleFields`]).
#[derive(Clone, Copy, Debug)]
pub struct SampleField<'a> {
    /// S x, the final chart's field at the point (this rank's pixels, pixel-major, with the
    /// chart's padding shells).
    pub point: &'a [f64],
    /// S o in the same layout and its sign (±1), for a sample's field.
    pub offset: Option<(&'a [f64], f64)>,
}

impl<'a> SampleField<'a> {
    /// The field `point` itself.
    pub fn plain(point: &'a [f64]) -> Self {
        Self {
            point,
            offset: None,
        }
    }

    /// The values from index `start` on into `out` (`point ± offset`, each entry rounded
    /// once: a sign flip is exact).
    #[inline]
    pub fn copy_to(&self, start: usize, out: &mut [f64]) {
        let x = &self.point[start..start + out.len()];
        match self.offset {
            None => out.copy_from_slice(x),
            Some((o, sign)) => {
                let o = &o[start..start + out.len()];
                for ((y, a), b) in out.iter_mut().zip(x).zip(o) {
                    *y = a + sign * b;
                }
            }
        }
    }
}

/// Buffers reused across calls (used by the CPU backend; a device backend keeps its own).
#[derive(Default)]
pub struct ModelWork {
    pub(crate) icr: IcrWork,
    pub(crate) field: Vec<f64>,
    pub(crate) star_a: Vec<f64>,
    pub(crate) star_v: Vec<f64>,
    pub(crate) pix_scalars: Vec<[f64; 2]>,
    /// Per pixel and state [Σ s t, Σ t] partials of a metric product (pixel-major).
    pub(crate) state_scalars: Vec<[f64; 2]>,
    pub(crate) pix_energy: Vec<f64>,
    pub(crate) acc: Vec<f64>,
    pub(crate) masked: Vec<f64>,
    /// What a walk of several states at once leaves for each state's end
    /// ([`super::backend::Backend::value_grad_walk`]; empty until one runs).
    pub(crate) slots: Vec<StateSlot>,
    /// The second vector's ICR buffers and final chart field cotangent of a pair of metric
    /// products ([`super::backend::Backend::metric_pair`]; empty until one runs).
    pub(crate) pair_icr: Option<IcrWork>,
    pub(crate) pair_acc: Vec<f64>,
}

/// One state's results of a walk of several states at once, until its end
/// ([`super::backend::Backend::value_grad_finish`]): each pixel's [Σ s t, Σ t] and energy,
/// and each star's ξ_σ gradient without its prior term.
#[derive(Default)]
pub(crate) struct StateSlot {
    pub(crate) pix_scalars: Vec<[f64; 2]>,
    pub(crate) pix_energy: Vec<f64>,
    pub(crate) gsig: Vec<f64>,
}

impl ModelCore {
    /// `x` when σ_a² enters the stars' variance, else 0: applied to σ_a², its tangents and
    /// its cotangents alike, so value, gradient and metric stay one consistent model.
    #[inline]
    pub fn distance_part(&self, x: f64) -> f64 {
        if self.distance_variance {
            x
        } else {
            0.0
        }
    }

    /// Energy of star `i` without ½ ln 2π, and its partials (∂/∂ā, ∂/∂σ_a²), for residual
    /// `r` = A − ā and variance `var` = (n_σ σ_A)² + σ_a² (σ_a² alone when n_σ is
    /// marginalised).
    #[inline]
    pub fn star_energy(&self, i: usize, r: f64, var: f64) -> (f64, f64, f64) {
        match &self.marginal {
            None => (
                0.5 * r * r / var + 0.5 * var.ln(),
                -r / var,
                0.5 / var - 0.5 * r * r / (var * var),
            ),
            Some(m) => m.energy(r, var, self.data.a_err[i] * self.data.a_err[i]),
        }
    }

    /// Star tangents (δā, δv) of star `i` at variance `var` (as in
    /// [`ModelCore::star_energy`]) weighed by its Fisher information: (δā/v, δv/(2v²)) for
    /// the Gaussian.
    #[inline(always)]
    pub fn fisher_weigh(&self, i: usize, var: f64, da: &mut f64, dv: &mut f64) {
        match &self.marginal {
            None => {
                *da /= var;
                *dv /= 2.0 * var * var;
            }
            Some(m) => {
                let (fa, fv) = m.fisher(var, self.data.a_err[i] * self.data.a_err[i]);
                *da *= fa;
                *dv *= fv;
            }
        }
    }

    /// Standard normals (η_a, η_v) of star `i` times the square root of its Fisher
    /// information: (η_a/√v, η_v/(√2 v)) for the Gaussian.
    #[inline]
    pub fn sqrt_fisher(&self, i: usize, var: f64, eta_a: f64, eta_v: f64) -> (f64, f64) {
        match &self.marginal {
            None => (eta_a / var.sqrt(), eta_v / (std::f64::consts::SQRT_2 * var)),
            Some(m) => {
                let (fa, fv) = m.fisher(var, self.data.a_err[i] * self.data.a_err[i]);
                (eta_a * fa.sqrt(), eta_v * fv.sqrt())
            }
        }
    }

    /// Number of kept shells.
    pub fn n_r(&self) -> usize {
        self.widths.len()
    }

    /// Shells of the final ICR chart, padding included.
    pub fn n_chart(&self) -> usize {
        self.n_chart
    }

    /// Prior-only chart shells at either radial end.
    pub fn padding(&self) -> usize {
        self.pad
    }

    /// Number of final pixels.
    pub fn npix(&self) -> usize {
        self.data.offsets.len() - 1
    }

    /// Length of the sampled parameter vector x.
    pub fn n_params(&self) -> usize {
        self.icr.n_xi() + 2
    }

    /// The latent-to-value chain rule of the scale and offset.
    pub fn chain(&self) -> Chain {
        Chain {
            offset_std: self.offset.std,
        }
    }

    /// Buffers for this model: a handed-back workspace ([`ModelCore::recycle`]) if there is
    /// one, else new ones. Every user writes a buffer before reading it.
    pub fn workspace(&self) -> ModelWork {
        if let Some(w) = lock(&self.spares.works).pop() {
            return w;
        }
        let n = self.data.len();
        ModelWork {
            icr: self.icr.workspace(),
            field: vec![0.0; self.icr.n_field()],
            star_a: vec![0.0; n],
            star_v: vec![0.0; n],
            pix_scalars: vec![[0.0; 2]; self.npix()],
            state_scalars: Vec::new(),
            pix_energy: vec![0.0; self.npix()],
            acc: Vec::new(),
            masked: Vec::new(),
            slots: Vec::new(),
            pair_icr: None,
            pair_acc: Vec::new(),
        }
    }
}

impl ModelCore {
    /// Hand back `states` and `works` that their user has finished with, for
    /// [`ModelCore::workspace`] and [`super::model::Model::empty_state`] to give out again.
    pub fn recycle(&self, states: Vec<super::state::State>, works: Vec<ModelWork>) {
        lock(&self.spares.states).extend(states);
        // what only one kind of user needs (the sampling solves' second vector, the KL's
        // per-state slots) goes: kept, it would lie idle through the other's peak
        lock(&self.spares.works).extend(works.into_iter().map(|mut w| {
            (w.pair_icr, w.pair_acc, w.slots) = (None, Vec::new(), Vec::new());
            w
        }));
    }

    /// A handed-back state, if there is one.
    pub(crate) fn spare_state(&self) -> Option<super::state::State> {
        lock(&self.spares.states).pop()
    }
}

/// The pool's lock, also after a panic elsewhere (its contents stay valid buffers).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The chain rule between the latent coordinates (ξ_scale, ξ_offset) and the values of the
/// scale and offset, written once for every backend.
#[derive(Clone, Copy, Debug)]
pub struct Chain {
    /// d offset / d ξ_offset (the offset prior's standard deviation).
    pub offset_std: f64,
}

impl Chain {
    /// Value tangents (δscale, δoffset) of latent tangents `t` at a state whose
    /// d scale / d ξ_scale is `dscl`.
    #[inline]
    pub fn tangent(&self, dscl: f64, t: [f64; 2]) -> (f64, f64) {
        (dscl * t[0], self.offset_std * t[1])
    }

    /// Latent cotangents of value cotangents `c` = [∂/∂scale, ∂/∂offset].
    #[inline]
    pub fn cotangent(&self, dscl: f64, c: [f64; 2]) -> [f64; 2] {
        [c[0] * dscl, c[1] * self.offset_std]
    }
}
