//! The compute backend of the likelihood: one interface for the operations whose cost grows
//! with voxels and stars, implemented on the CPU ([`super::cpu::Cpu`]) and on OpenCL devices
//! (`crate::backend::opencl`).
//!
//! A backend works in *value* space: it sees the scale and offset values of ρ = exp(scale ·
//! s + offset) and returns their cotangents. The latent transforms of the scale and offset
//! (their priors), the prior energy, the ξ_σ prior and the free-entry mask are applied once,
//! by [`super::model::Model`], through [`Chain`]; both backends call [`Chain`] for the
//! per-sample chain rule inside the averaged metric.

use anyhow::Result;

pub use super::core::Chain;
use super::core::{ModelCore, ModelWork, SampleField};
use super::mask::Mask;
use super::state::State;
use crate::num::cg::{CgReport, CgSettings};

/// The operations of the likelihood that a backend provides. Every method sees the model
/// (star data, ICR operator, shells) and may keep its own resident copies of them.
pub trait Backend: Send + Sync {
    /// "cpu", or the device's name.
    fn describe(&self) -> String;

    /// Fill `st.s`, `st.rw`, `st.abar`, `st.var` for ICR excitations `xi`; the scale,
    /// offset and n_σ in `st` are already set.
    fn state(&self, m: &ModelCore, xi: &[f64], st: &mut State, w: &mut ModelWork) -> Result<()>;

    /// The state as [`Backend::state`], the likelihood's energy, the ICR part of its
    /// gradient (`g_xi`, no prior term) and the ξ_σ gradient (prior term included) in one
    /// pass; returns [energy, ∂E/∂scale, ∂E/∂offset] (value-space cotangents).
    #[allow(clippy::too_many_arguments)]
    fn value_grad(
        &self,
        m: &ModelCore,
        xi: &[f64],
        xsig: &[f64],
        st: &mut State,
        g_xi: &mut [f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 3]>;

    /// Whether this backend reads final-chart fields from the host ([`SampleField`]), so that
    /// the model runs the ICR itself and forms the KL's sample fields by its linearity:
    /// [`Backend::state_field`], [`Backend::value_grad_field`] and the walk of several
    /// states. When not, those are never called and every sample is evaluated from its
    /// excitations ([`Backend::state`], [`Backend::value_grad`]).
    fn takes_fields(&self) -> bool {
        false
    }

    /// [`Backend::state`] from the final chart's field instead of the excitations.
    fn state_field(
        &self,
        _m: &ModelCore,
        _field: SampleField<'_>,
        _st: &mut State,
        _w: &mut ModelWork,
    ) -> Result<()> {
        anyhow::bail!("{} does not take fields from the host", self.describe())
    }

    /// [`Backend::value_grad`] from the final chart's field, without the ICR adjoint: the
    /// state, the ξ_σ gradient (prior term included), and the field's cotangent *added* into
    /// `field_bar` (so that the KL's samples pull their summed cotangents back through one
    /// adjoint); returns [energy, ∂E/∂scale, ∂E/∂offset].
    #[allow(clippy::too_many_arguments)]
    fn value_grad_field(
        &self,
        _m: &ModelCore,
        _field: SampleField<'_>,
        _xsig: &[f64],
        _st: &mut State,
        _gsig: &mut [f64],
        _field_bar: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<[f64; 3]> {
        anyhow::bail!("{} does not take fields from the host", self.describe())
    }

    /// Whether this backend, one that [takes fields](Backend::takes_fields), evaluates the
    /// KL's sample states of model `m` four at a time ([`Backend::value_grad_prepare`],
    /// [`Backend::value_grad_walk`], [`Backend::value_grad_finish`]: one walk of the stars
    /// for the four, as the averaged metric does). When not, those three are never called.
    fn walks_states_together(&self, _m: &ModelCore) -> bool {
        false
    }

    /// The first part of [`Backend::value_grad_field`] for one of several states: `st.s`
    /// and `st.rw` from the final chart's field (scale, offset and n_σ already set).
    fn value_grad_prepare(
        &self,
        _m: &ModelCore,
        _field: SampleField<'_>,
        _st: &mut State,
        _w: &mut ModelWork,
    ) -> Result<()> {
        anyhow::bail!("{} evaluates states one at a time", self.describe())
    }

    /// The stars' part of [`Backend::value_grad_field`] for four prepared states at once:
    /// their ā and σ_a², their field cotangents added into `field_bar` (state by state, in
    /// state order, voxel by voxel), and what [`Backend::value_grad_finish`] needs, kept in
    /// `w`.
    fn value_grad_walk(
        &self,
        _m: &ModelCore,
        _states: &mut [State],
        _field_bar: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<()> {
        anyhow::bail!("{} evaluates states one at a time", self.describe())
    }

    /// The rest of [`Backend::value_grad_field`] for state `k` of the last walk: the ξ_σ
    /// gradient (its prior term from `xsig`) into `gsig`; returns [energy, ∂E/∂scale,
    /// ∂E/∂offset].
    fn value_grad_finish(
        &self,
        _m: &ModelCore,
        _k: usize,
        _xsig: &[f64],
        _gsig: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<[f64; 3]> {
        anyhow::bail!("{} evaluates states one at a time", self.describe())
    }

    /// Star tangents (δā, δσ_a²) at `st` for an ICR tangent `dxi` and value tangents
    /// `dscl`, `doff` of the scale and offset.
    #[allow(clippy::too_many_arguments)]
    fn jvp(
        &self,
        m: &ModelCore,
        st: &State,
        dxi: &[f64],
        dscl: f64,
        doff: f64,
        da: &mut [f64],
        dv: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()>;

    /// Pull star cotangents (`ca` on ā, `cv` on σ_a²) back: the ICR part into `g_xi`;
    /// returns the value-space cotangents [scale, offset].
    fn vjp(
        &self,
        m: &ModelCore,
        st: &State,
        ca: &[f64],
        cv: &[f64],
        g_xi: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 2]>;

    /// `Jᵀ F J` of a tangent (ICR part `dxi`, value tangents `dscl`, `doff` of scale and
    /// offset) at one state, ξ_σ held: the ICR part into `g_xi`; returns the value-space
    /// cotangents [scale, offset] (the data part of [`super::model::Model::metric`]). The
    /// default composes [`Backend::jvp`], the Fisher weighting and [`Backend::vjp`]; a
    /// backend may fuse them, with the same arithmetic.
    #[allow(clippy::too_many_arguments)]
    fn metric(
        &self,
        m: &ModelCore,
        st: &State,
        dxi: &[f64],
        dscl: f64,
        doff: f64,
        g_xi: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 2]> {
        let mut da = std::mem::take(&mut w.star_a);
        let mut dv = std::mem::take(&mut w.star_v);
        let r = self
            .jvp(m, st, dxi, dscl, doff, &mut da, &mut dv, w)
            .and_then(|()| {
                for i in 0..da.len() {
                    m.fisher_weigh(i, st.var[i], &mut da[i], &mut dv[i]);
                }
                self.vjp(m, st, &da, &dv, g_xi, w)
            });
        w.star_a = da;
        w.star_v = dv;
        r
    }

    /// [`Backend::metric`] of two tangents at the same state (`dxi[t]`, value tangents
    /// `tangents[t]` = (δscale, δoffset)), each product's ICR part into `g_xi[t]`; returns each
    /// one's value-space cotangents. A backend may walk the stars once for both (the CPU
    /// does), with each product's arithmetic as on its own; the default runs two products.
    fn metric_pair(
        &self,
        m: &ModelCore,
        st: &State,
        dxi: [&[f64]; 2],
        tangents: [(f64, f64); 2],
        [g0, g1]: [&mut [f64]; 2],
        w: &mut ModelWork,
    ) -> Result<[[f64; 2]; 2]> {
        let [(s0, o0), (s1, o1)] = tangents;
        Ok([
            self.metric(m, st, dxi[0], s0, o0, g0, w)?,
            self.metric(m, st, dxi[1], s1, o1, g1, w)?,
        ])
    }

    /// The likelihood part of the sample-averaged KL metric product
    /// ([`super::model::Model::averaged_fisher`]: held entries multiplied by 0, no identity).
    fn averaged_fisher(
        &self,
        m: &ModelCore,
        states: &[State],
        mask: &Mask,
        v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()>;

    /// Solve `M x = b` for the metric of `states` where the vectors live (see
    /// [`super::model::Model::solve_metric`]); `Ok(None)` when the caller should run CG on the host.
    #[allow(clippy::too_many_arguments)]
    fn solve_metric(
        &self,
        _m: &ModelCore,
        _states: &[&State],
        _mask: &Mask,
        _with_sig: bool,
        _b: &[f64],
        _x: &mut [f64],
        _settings: &CgSettings,
    ) -> Result<Option<CgReport>> {
        Ok(None)
    }

    /// Keep at least `n` states resident (a KL with n sample states needs them together).
    fn reserve_states(&self, _n: usize) {}

    /// Estimated bytes per call on a device and across the bus; None on the CPU.
    fn traffic(&self) -> Option<Traffic> {
        None
    }
}

/// Estimated bytes of one call: (device global-memory bytes accessed, host↔device bytes).
#[derive(Clone, Debug)]
pub struct Traffic {
    /// Device name.
    pub device: String,
    /// `value_grad`.
    pub value_grad: (usize, usize),
    /// `metric` (one JVP and one VJP with their ICR passes).
    pub metric: (usize, usize),
}
