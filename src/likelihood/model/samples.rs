//! The model at the KL's sample points x + o_j: their fields by the ICR's linearity, and
//! their values and gradients in one call.
//!
//! ICR is linear, so a sample's final-chart field is S(x + o) = S x + S o. The offsets'
//! fields are computed once per set of samples (one forward per residual: MGVI's antithetic
//! pair ±δ shares one), and each evaluation of the KL then runs one forward, of its point,
//! instead of one per sample. The samples' gradients likewise pull their summed field
//! cotangents back through one adjoint, Σ_j Sᵀ c_j = Sᵀ Σ_j c_j. With two pairs that is one
//! forward and one adjoint instead of four of each per evaluation. Both sums are rounded
//! differently from a forward of each sample point and an adjoint of each cotangent: the
//! results agree to the rounding of the field (unit tests in `tests.rs`).

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::{Model, ModelWork, State};
use crate::base::util::{par_copy, par_zero, PAR_MIN_LEN};
use crate::likelihood::core::SampleField;
use crate::likelihood::state::next_state_id;

/// Writes sample point `j`'s [x | ξ_σ] into the buffer ([`Model::value_grad_states`]).
pub type StatePoint<'a> = dyn FnMut(usize, &mut Vec<f64>) + 'a;

/// Receives sample point `j`'s energy and its gradients in x and ξ_σ
/// ([`Model::value_grad_states`]).
pub type StateResult<'a> = dyn FnMut(usize, f64, &[f64], &[f64]) + 'a;

/// The final chart's fields of the offsets o_j of a KL's sample points x + o_j, S o_j
/// ([`Model::sample_fields`]); the point's S x comes from [`Model::with_point_field`].
pub struct SampleFields {
    offsets: Vec<Vec<f64>>,
    /// Whether `offsets[k]` serves samples 2k (+) and 2k + 1 (−), MGVI's antithetic pairs
    /// ±δ_k (S(−δ) = −S δ exactly); otherwise `offsets[j]` is sample j's (geoVI's c_k ± δ_k).
    antithetic: bool,
    samples: usize,
}

impl SampleFields {
    /// Sample `j`'s field, S x ± S o, for the point's field `point` = S x.
    pub fn of<'a>(&'a self, point: &'a [f64], j: usize) -> SampleField<'a> {
        let (k, sign) = if self.antithetic {
            (j / 2, if j.is_multiple_of(2) { 1.0 } else { -1.0 })
        } else {
            (j, 1.0)
        };
        SampleField {
            point,
            offset: Some((&self.offsets[k], sign)),
        }
    }

    /// Number of sample points.
    pub fn len(&self) -> usize {
        self.samples
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Sample `j`'s whole field into `out` (resized), for the point's field `point`.
    pub fn fill(&self, point: &[f64], j: usize, out: &mut Vec<f64>) {
        out.resize(point.len(), 0.0);
        let f = self.of(point, j);
        out.par_chunks_mut(PAR_MIN_LEN)
            .enumerate()
            .for_each(|(c, o)| f.copy_to(c * PAR_MIN_LEN, o));
    }
}

impl Model {
    /// Whether the backend takes final-chart fields from the host, so that the KL's samples
    /// can be evaluated from [`SampleFields`].
    pub fn takes_fields(&self) -> bool {
        self.backend.takes_fields()
    }

    /// The fields of the offsets o_j of the sample points of `residuals` δ_k and `shifts` c_k
    /// (geoVI; empty for MGVI): sample 2k is x + c_k + δ_k and sample 2k + 1 is
    /// x + c_k − δ_k, as [`crate::inference::mgvi::sampling::sample_point`] writes them. One
    /// ICR forward per residual (MGVI) or per sample (geoVI).
    pub fn sample_fields(
        &self,
        residuals: &[Vec<f64>],
        shifts: &[Vec<f64>],
        w: &mut ModelWork,
    ) -> SampleFields {
        let (nxi, top) = (self.icr.n_xi(), self.icr.chart.levels);
        let antithetic = shifts.is_empty();
        let mut o = vec![0.0; nxi];
        let mut offsets = Vec::new();
        for j in 0..2 * residuals.len() {
            if antithetic && !j.is_multiple_of(2) {
                continue;
            }
            let d = &residuals[j / 2][..nxi];
            let sign = if j.is_multiple_of(2) { 1.0 } else { -1.0 };
            match shifts.get(j / 2) {
                Some(c) => o
                    .par_iter_mut()
                    .with_min_len(PAR_MIN_LEN)
                    .zip(d.par_iter().zip(&c[..nxi]))
                    .for_each(|(o, (b, s))| *o = s + sign * b),
                None => o.copy_from_slice(d),
            }
            self.icr.forward(&o, &mut w.icr);
            let mut field = Vec::new();
            par_copy(&mut field, &w.icr.fields[top]);
            offsets.push(field);
        }
        SampleFields {
            offsets,
            antithetic,
            samples: 2 * residuals.len(),
        }
    }

    /// `f(point, w)` with `point` the final chart's field of the parameters `x` (one ICR
    /// forward of its excitations, into `w`'s own buffer, which `f` reads in place: `f` must
    /// not run the ICR on `w`).
    pub fn with_point_field<R>(
        &self,
        x: &[f64],
        w: &mut ModelWork,
        f: impl FnOnce(&[f64], &mut ModelWork) -> R,
    ) -> R {
        let top = self.icr.chart.levels;
        self.icr.forward(&x[..self.icr.n_xi()], &mut w.icr);
        let point = std::mem::take(&mut w.icr.fields[top]);
        let r = f(&point, w);
        w.icr.fields[top] = point;
        r
    }

    /// [`Model::update_state_sharing`] from the final chart's `field` of x's excitations,
    /// for a backend that [takes fields](Model::takes_fields).
    pub fn update_state_field(
        &self,
        (x, xsig): (&[f64], &[f64]),
        same_sig: Option<&State>,
        field: SampleField<'_>,
        st: &mut State,
        w: &mut ModelWork,
    ) -> Result<()> {
        self.check_lengths(x, xsig)?;
        st.id = next_state_id();
        self.set_globals(x, xsig, same_sig, st);
        self.backend.state_field(&self.core, field, st, w)
    }

    /// Value and gradient of every state of `states` (the KL's sample points); with `share`,
    /// each state after the first copies its n_σ from the first. `point(j, buf)` writes
    /// state j's [x | ξ_σ] into `buf`; `take(j, value, gx, gsig)` receives each state's
    /// energy and gradients, in state order.
    ///
    /// Without `fields`, each state is [`Model::value_grad_sharing`]'s. With `fields` (the
    /// samples' offset fields and the parameters x whose samples `point` writes; a backend
    /// that takes fields), each state's field is x's plus its offset's, the states are
    /// walked four at a time where the backend walks states together, and each state's
    /// gradient in x leaves out the ICR part of its likelihood: their sum over the states,
    /// one adjoint of the summed field cotangents, is left in the first n_ξ entries of `gx`
    /// at the end.
    pub fn value_grad_states(
        &self,
        states: &mut [State],
        share: bool,
        fields: Option<(&SampleFields, &[f64])>,
        (point, take): (&mut StatePoint<'_>, &mut StateResult<'_>),
        (xk, gx, gsig): (&mut Vec<f64>, &mut [f64], &mut [f64]),
        w: &mut ModelWork,
    ) -> Result<()> {
        let np = self.n_params();
        let Some((fields, x)) = fields else {
            for j in 0..states.len() {
                point(j, xk);
                let (x, xsig) = xk.split_at(np);
                let (done, rest) = states.split_at_mut(j);
                let same = done.first().filter(|_| share);
                let value = self.value_grad_sharing(x, xsig, (&mut rest[0], same), gx, gsig, w)?;
                take(j, value, gx, gsig);
            }
            return Ok(());
        };
        if !self.takes_fields() {
            bail!("{} does not take fields from the host", self.backend_name());
        }
        let mut bar = std::mem::take(&mut w.field);
        par_zero(&mut bar);
        let walked = self.with_point_field(x, w, |at, w| {
            self.walk_fields(
                (states, share, (fields, at)),
                (point, take),
                (xk, gx, gsig),
                &mut bar,
                w,
            )
        });
        if walked.is_ok() {
            self.icr
                .adjoint(&bar, &mut gx[..self.icr.n_xi()], &mut w.icr);
        }
        w.field = bar;
        walked
    }

    /// The states of [`Model::value_grad_states`] with `fields`, their field cotangents
    /// added into `bar` in state order.
    fn walk_fields(
        &self,
        (states, share, (fields, at)): (&mut [State], bool, (&SampleFields, &[f64])),
        (point, take): (&mut StatePoint<'_>, &mut StateResult<'_>),
        (xk, gx, gsig): (&mut Vec<f64>, &mut [f64], &mut [f64]),
        bar: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let np = self.n_params();
        // decided on all ranks together, so that every rank makes the same reductions in
        // the same order
        let walk = self.backend.walks_states_together(&self.core);
        let together = if self.dom.decomp.all(walk) {
            states.len() / 4 * 4
        } else {
            0
        };
        for first in (0..together).step_by(4) {
            for j in first..first + 4 {
                point(j, xk);
                let (x, xsig) = xk.split_at(np);
                let st = self.start_state((x, xsig), states, j, share)?;
                self.backend
                    .value_grad_prepare(&self.core, fields.of(at, j), st, w)?;
            }
            let block = &mut states[first..first + 4];
            self.backend.value_grad_walk(&self.core, block, bar, w)?;
            for (k, j) in (first..first + 4).enumerate() {
                point(j, xk);
                let (x, xsig) = xk.split_at(np);
                let parts = self
                    .backend
                    .value_grad_finish(&self.core, k, xsig, gsig, w)?;
                let value = self.prior_part((x, xsig), states[j].dscl, parts, gx);
                take(j, value, gx, gsig);
            }
        }
        for j in together..states.len() {
            point(j, xk);
            let (x, xsig) = xk.split_at(np);
            let st = self.start_state((x, xsig), states, j, share)?;
            let field = fields.of(at, j);
            let parts = self
                .backend
                .value_grad_field(&self.core, field, xsig, st, gsig, bar, w)?;
            let value = self.prior_part((x, xsig), st.dscl, parts, gx);
            take(j, value, gx, gsig);
        }
        Ok(())
    }

    /// State `j` of `states` with its id, scale, offset and n_σ (copied from the first state
    /// when `share`) set for (x, ξ_σ).
    fn start_state<'s>(
        &self,
        (x, xsig): (&[f64], &[f64]),
        states: &'s mut [State],
        j: usize,
        share: bool,
    ) -> Result<&'s mut State> {
        self.check_lengths(x, xsig)?;
        let (done, rest) = states.split_at_mut(j);
        let st = &mut rest[0];
        st.id = next_state_id();
        self.set_globals(x, xsig, done.first().filter(|_| share), st);
        Ok(st)
    }

    /// A sample's gradient in x without the ICR part of its likelihood into `gx` (the prior
    /// term, and the scale's and offset's cotangents of the value-space `[_, ∂E/∂scale,
    /// ∂E/∂offset]` of `parts`); returns its energy.
    fn prior_part(
        &self,
        (x, xsig): (&[f64], &[f64]),
        dscl: f64,
        [lik, g_scl, g_off]: [f64; 3],
        gx: &mut [f64],
    ) -> f64 {
        let nxi = self.icr.n_xi();
        gx[..nxi]
            .par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(&x[..nxi])
            .for_each(|(g, v)| *g = *v);
        let [a, b] = self.chain().cotangent(dscl, [g_scl, g_off]);
        gx[nxi] = a + x[nxi];
        gx[nxi + 1] = b + x[nxi + 1];
        lik + self.prior_energy(x, xsig)
    }
}
