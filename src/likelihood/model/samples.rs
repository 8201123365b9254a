//! The model at the KL's sample points x + o_j: their fields by the ICR's linearity, and
//! the samples' mean energy and gradient in one call.
//!
//! ICR is linear, so a sample's final-chart field is S(x + o) = S x + S o. The offsets'
//! fields are computed once per set of samples (one forward per residual: MGVI's antithetic
//! pair ±δ shares one), and each evaluation of the KL then runs one forward, of its point,
//! instead of one per sample. The samples' gradients likewise pull their summed field
//! cotangents back through one adjoint, Σ_j Sᵀ c_j = Sᵀ Σ_j c_j. With two pairs that is one
//! forward and one adjoint instead of four of each per evaluation. The prior term is
//! quadratic, so its mean over the samples is ½|x|² + x·ō + mean_j ½|o_j|² with ō the mean
//! offset (zero for antithetic pairs), and its gradient x + ō: no sample point is written
//! out. These sums are rounded differently from an evaluation of each sample point on its
//! own: the results agree to the rounding of the field (unit tests in `tests.rs`).

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::{Model, ModelWork, State};
use crate::base::util::{par_copy, par_zero, PAR_MIN_LEN};
use crate::likelihood::core::SampleField;
use crate::likelihood::state::next_state_id;
use crate::sphere::decomp::Space;

/// Writes sample j's parameters from the scale's latent on, `[ξ_scale, ξ_offset | ξ_σ]`, into
/// the buffer ([`Model::samples_value_grad`]).
pub type SampleTail<'a> = dyn FnMut(usize, &mut Vec<f64>) + 'a;

/// The offsets o_j of a KL's sample points x + o_j as the model needs them: their
/// final-chart fields S o_j, their mean and their mean half squared norm
/// ([`Model::sample_fields`]); the point's S x comes from [`Model::with_point_field`].
pub struct SampleFields {
    offsets: Vec<Vec<f64>>,
    /// Whether `offsets[k]` serves samples 2k (+) and 2k + 1 (−), MGVI's antithetic pairs
    /// ±δ_k (S(−δ) = −S δ exactly); otherwise `offsets[j]` is sample j's (geoVI's c_k ± δ_k).
    antithetic: bool,
    samples: usize,
    /// The mean offset over x, where it is not zero (geoVI's shifts; antithetic pairs
    /// cancel exactly).
    mean: Option<Vec<f64>>,
    /// The mean over the samples of ½|o_j|² over x.
    half_norm2: f64,
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

    /// The offsets o_j over x of the sample points of `residuals` δ_k and `shifts` c_k
    /// (geoVI; empty for MGVI): sample 2k is x + c_k + δ_k and sample 2k + 1 is
    /// x + c_k − δ_k, as [`crate::inference::mgvi::sampling::sample_point`] writes them. One
    /// ICR forward per residual (MGVI) or per sample (geoVI).
    pub fn sample_fields(
        &self,
        residuals: &[Vec<f64>],
        shifts: &[Vec<f64>],
        w: &mut ModelWork,
    ) -> SampleFields {
        let (np, nxi, top) = (self.n_params(), self.icr.n_xi(), self.icr.chart.levels);
        let (antithetic, n) = (shifts.is_empty(), 2 * residuals.len());
        // geoVI's offsets c_k ± δ_k are formed here; MGVI's ±δ_k are the residuals themselves
        let mut shifted = (!antithetic).then(|| vec![0.0; np]);
        let (mut offsets, mut half_norm2, mut norm2) = (Vec::new(), 0.0, 0.0);
        let mut mean = (!antithetic).then(|| vec![0.0; np]);
        for j in 0..n {
            let d = &residuals[j / 2][..np];
            let sign = if j.is_multiple_of(2) { 1.0 } else { -1.0 };
            let o: &[f64] = match (shifts.get(j / 2), shifted.as_mut()) {
                (Some(c), Some(buf)) => {
                    buf.par_iter_mut()
                        .with_min_len(PAR_MIN_LEN)
                        .zip(d.par_iter().zip(&c[..np]))
                        .for_each(|(o, (b, s))| *o = s + sign * b);
                    buf
                }
                _ => d,
            };
            // |−δ|² has the bits of |δ|²: an antithetic pair's second norm is its first
            if !antithetic || j.is_multiple_of(2) {
                norm2 = self.dom.x.dot(o, o);
            }
            half_norm2 += 0.5 * norm2 / n as f64;
            if let Some(m) = mean.as_mut() {
                m.iter_mut().zip(o).for_each(|(m, o)| *m += o / n as f64);
            }
            if antithetic && !j.is_multiple_of(2) {
                continue;
            }
            self.icr.forward(&o[..nxi], &mut w.icr);
            let mut field = Vec::new();
            par_copy(&mut field, &w.icr.fields[top]);
            offsets.push(field);
        }
        SampleFields {
            offsets,
            antithetic,
            samples: n,
            mean,
            half_norm2,
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

    /// [`Model::update_state_sharing`] for parameters whose `[ξ_scale, ξ_offset | ξ_σ]` are
    /// `tail` and whose excitations' final-chart field is `field`, for a backend that
    /// [takes fields](Model::takes_fields).
    pub fn update_state_field(
        &self,
        tail: &[f64],
        same_sig: Option<&State>,
        field: SampleField<'_>,
        st: &mut State,
        w: &mut ModelWork,
    ) -> Result<()> {
        let (globals, xsig) = self.split_tail(tail)?;
        st.id = next_state_id();
        self.set_globals(globals, xsig, same_sig, st);
        self.backend.state_field(&self.core, field, st, w)
    }

    /// The mean over the KL's samples of the energy, returned, and of its gradient in
    /// p = [x | ξ_σ], into `g`, for a backend that [takes fields](Model::takes_fields): the
    /// samples' states into `states` (with `share`, each after the first copies its n_σ
    /// from the first), their fields from `fields` and the point p. `tail(j, buf)` writes
    /// sample j's `[ξ_scale, ξ_offset | ξ_σ]`; `gsig` is a buffer of a star per entry. The
    /// states are walked four at a time where the backend walks states together.
    #[allow(clippy::too_many_arguments)]
    pub fn samples_value_grad(
        &self,
        (states, share): (&mut [State], bool),
        (fields, p): (&SampleFields, &[f64]),
        tail: &mut SampleTail<'_>,
        (tbuf, gsig): (&mut Vec<f64>, &mut [f64]),
        g: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<f64> {
        let (np, nxi, n) = (self.n_params(), self.icr.n_xi(), states.len() as f64);
        if !self.takes_fields() {
            bail!("{} does not take fields from the host", self.backend_name());
        }
        let ns = self.data.len();
        if states.is_empty() || fields.len() != states.len() {
            bail!(
                "{} sample states for {} sample fields",
                states.len(),
                fields.len()
            );
        }
        if p.len() != np + ns || g.len() != p.len() {
            bail!(
                "a KL point of {} entries and a gradient of {} for a model of {np} parameters \
                 and {ns} stars",
                p.len(),
                g.len()
            );
        }
        let mut bar = std::mem::take(&mut w.field);
        par_zero(&mut bar);
        par_zero(g);
        let sums = self.with_point_field(p, w, |at, w| {
            let walk = (states, share, (fields, at));
            self.walk_samples(walk, tail, (tbuf, gsig), (&mut bar, &mut g[np..]), w)
        });
        if sums.is_ok() {
            self.icr.adjoint(&bar, &mut g[..nxi], &mut w.icr);
        }
        w.field = bar;
        let (energy, [c_scl, c_off]) = sums?;
        // the likelihood's share of each sample, then the prior's mean: x + ō
        let (x, g_x) = (&p[..np], &mut g[..np]);
        (g_x[nxi], g_x[nxi + 1]) = (c_scl, c_off);
        let mean = fields.mean.as_deref();
        g_x.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .enumerate()
            .for_each(|(i, gi)| *gi = *gi / n + x[i] + mean.map_or(0.0, |m| m[i]));
        g[np..]
            .par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .for_each(|gi| *gi /= n);
        let prior = 0.5 * self.dom.x.dot(x, x) + mean.map_or(0.0, |m| self.dom.x.dot(x, m));
        Ok(energy / n + prior + fields.half_norm2)
    }

    /// The samples' walks of [`Model::samples_value_grad`]: their field cotangents added into
    /// `bar` and their ξ_σ gradients into `g_sig`, in sample order; returns the sum of their
    /// likelihoods and ξ_σ priors and of their scale's and offset's latent cotangents.
    pub(super) fn walk_samples(
        &self,
        (states, share, (fields, at)): (&mut [State], bool, (&SampleFields, &[f64])),
        tail: &mut SampleTail<'_>,
        (tbuf, gsig): (&mut Vec<f64>, &mut [f64]),
        (bar, g_sig): (&mut [f64], &mut [f64]),
        w: &mut ModelWork,
    ) -> Result<(f64, [f64; 2])> {
        // decided on all ranks together, so that every rank makes the same reductions in
        // the same order
        let walk = self.backend.walks_states_together(&self.core);
        let together = if self.dom.decomp.all(walk) {
            states.len() / 4 * 4
        } else {
            0
        };
        let mut sums = (0.0, [0.0; 2]);
        let mut add = |xsig: &[f64], dscl: f64, parts: [f64; 3], gsig: &[f64]| {
            let [lik, g_scl, g_off] = parts;
            let [a, b] = self.chain().cotangent(dscl, [g_scl, g_off]);
            sums.0 += lik + self.sig_prior_energy(xsig);
            (sums.1[0], sums.1[1]) = (sums.1[0] + a, sums.1[1] + b);
            g_sig
                .par_iter_mut()
                .with_min_len(PAR_MIN_LEN)
                .zip(gsig)
                .for_each(|(o, v)| *o += v);
        };
        for first in (0..together).step_by(4) {
            for j in first..first + 4 {
                tail(j, tbuf);
                let st = self.start_state(tbuf, states, j, share)?;
                self.backend
                    .value_grad_prepare(&self.core, fields.of(at, j), st, w)?;
            }
            let block = &mut states[first..first + 4];
            self.backend.value_grad_walk(&self.core, block, bar, w)?;
            for (k, j) in (first..first + 4).enumerate() {
                tail(j, tbuf);
                let xsig = &tbuf[2..];
                let parts = (self.backend).value_grad_finish(&self.core, k, xsig, gsig, w)?;
                add(xsig, states[j].dscl, parts, gsig);
            }
        }
        for j in together..states.len() {
            tail(j, tbuf);
            let st = self.start_state(tbuf, states, j, share)?;
            let (field, xsig) = (fields.of(at, j), &tbuf[2..]);
            let parts =
                (self.backend).value_grad_field(&self.core, field, xsig, st, gsig, bar, w)?;
            add(xsig, st.dscl, parts, gsig);
        }
        Ok(sums)
    }

    /// `[ξ_scale, ξ_offset]` and ξ_σ of a sample's `tail`, checked against the model's size.
    fn split_tail<'t>(&self, tail: &'t [f64]) -> Result<([f64; 2], &'t [f64])> {
        if tail.len() != 2 + self.data.len() {
            bail!(
                "a sample tail of {} entries for a model of {} stars",
                tail.len(),
                self.data.len()
            );
        }
        Ok(([tail[0], tail[1]], &tail[2..]))
    }

    /// State `j` of `states` with its id, scale, offset and n_σ (copied from the first state
    /// when `share`) set for the sample's `tail`, `[ξ_scale, ξ_offset | ξ_σ]`.
    fn start_state<'s>(
        &self,
        tail: &[f64],
        states: &'s mut [State],
        j: usize,
        share: bool,
    ) -> Result<&'s mut State> {
        let (globals, xsig) = self.split_tail(tail)?;
        let (done, rest) = states.split_at_mut(j);
        let st = &mut rest[0];
        st.id = next_state_id();
        self.set_globals(globals, xsig, done.first().filter(|_| share), st);
        Ok(st)
    }
}
