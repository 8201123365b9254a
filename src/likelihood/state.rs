//! What the model computes at one point and the stars it sees: [`State`] (log-density,
//! ρΔr, global scalars and per-star moments at (x, ξ_σ)) and [`StarData`] (observations and
//! distance windows grouped by pixel). Shared by the CPU model and the OpenCL backend.

use crate::data::catalog::PixelCatalog;
use crate::likelihood::distance::DistancePrior;
use crate::likelihood::windows::Windows;

/// Stars as the likelihood sees them: grouped by final-level pixel.
#[derive(Clone, Debug)]
pub struct StarData {
    /// Stars of pixel p are `offsets[p]..offsets[p+1]`.
    pub offsets: Vec<usize>,
    /// Distance windows.
    pub windows: Windows,
    /// Observed extinction A, catalog units.
    pub a_obs: Vec<f64>,
    /// Extinction uncertainty σ_A, catalog units.
    pub a_err: Vec<f64>,
}

impl StarData {
    /// Build from a pixel-sorted catalog on the model's kept shells, the windows under the
    /// distance prior `prior`.
    pub fn new(
        cat: &PixelCatalog,
        shells: &crate::sphere::grid::Shells,
        prior: &DistancePrior,
    ) -> Self {
        let s = &cat.stars;
        Self {
            offsets: cat.offsets.clone(),
            windows: Windows::with_prior(shells, &s.parallax_mas, &s.parallax_error_mas, prior),
            a_obs: s.extinction.clone(),
            a_err: s.extinction_error.clone(),
        }
    }

    /// Number of stars.
    pub fn len(&self) -> usize {
        self.a_obs.len()
    }

    /// True if there are no stars.
    pub fn is_empty(&self) -> bool {
        self.a_obs.is_empty()
    }
}

/// Everything computed at one point (x, ξ_σ); JVPs, VJPs and metric products reuse it.
#[derive(Clone, Debug)]
pub struct State {
    /// Log-density s on the kept shells (dimensionless, before scale and offset),
    /// pixel-major.
    pub s: Vec<f64>,
    /// Extinction across each kept shell, `ρ Δr`, catalog units, pixel-major (ρ = rw / Δr
    /// per pc).
    pub rw: Vec<f64>,
    /// Scale of s (dimensionless).
    pub scl: f64,
    /// d scale / d ξ_scale.
    pub dscl: f64,
    /// Offset of ln ρ, ln(catalog units per pc).
    pub off: f64,
    /// Predicted mean extinction ā per star, catalog units.
    pub abar: Vec<f64>,
    /// Variance v = (n_σ σ_A)² + σ_a² per star, catalog units².
    pub var: Vec<f64>,
    /// n_σ per star (dimensionless inflation of σ_A).
    pub nsig: Vec<f64>,
    /// d n_σ / d ξ_σ per star.
    pub dnsig: Vec<f64>,
    /// Identity of the contents: a fresh value whenever a model method refills the state
    /// (the OpenCL backend keeps device copies keyed by it).
    pub id: u64,
    /// Identity of `nsig` and `dnsig`: the source state's when a model method copied them
    /// from a state at the same ξ_σ (the KL's sample states), else fresh; states with equal
    /// values here hold the same n_σ bit for bit, so a walk of several reads them once.
    pub sig_id: u64,
    /// Whether `s` and `rw` hold this state's values on the host (the OpenCL `value_grad`
    /// leaves them on the device: the KL needs them only there).
    pub fields_on_host: bool,
}

/// A fresh state identity.
pub(crate) fn next_state_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Host views of a state's arrays, filled from the OpenCL device.
pub struct HostState<'a> {
    /// Log-density on the kept shells.
    pub s: &'a mut [f64],
    /// ρΔr.
    pub rw: &'a mut [f64],
    /// ā per star.
    pub abar: &'a mut [f64],
    /// v per star.
    pub var: &'a mut [f64],
}

impl State {
    /// Split for a device evaluation: the identity, the arrays the device fills, and the
    /// per-star n_σ and dn_σ/dξ_σ it reads.
    pub fn device_parts(&mut self) -> (u64, HostState<'_>, [&[f64]; 2]) {
        let State {
            s,
            rw,
            abar,
            var,
            nsig,
            dnsig,
            id,
            ..
        } = self;
        (*id, HostState { s, rw, abar, var }, [nsig, dnsig])
    }
}
