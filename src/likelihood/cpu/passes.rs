//! The per-pixel star walks of the CPU backend. Each is a [`LanesOp`], run by
//! [`crate::likelihood::lanes::dispatch`] once per pixel, so that the whole walk over a
//! pixel's stars is compiled for the widest instruction set present and its window sums use
//! that set's explicit vectors.

use std::ops::Range;

use crate::likelihood::core::ModelCore;
use crate::likelihood::lanes::{Lanes, LanesOp};
use crate::likelihood::response::{finish_vjp, inner_columns, jvp, moments, vjp};
use crate::likelihood::state::State;

/// ā and σ_a² of the stars `stars` of one pixel (column `col`, inner columns `cum`), into
/// `a` and `v` (indexed from the pixel's first star).
pub(super) struct MomentsPass<'a> {
    pub m: &'a ModelCore,
    pub col: [&'a [f64]; 2],
    /// n_σ of all stars.
    pub nsig: &'a [f64],
    pub stars: Range<usize>,
    pub out: [&'a mut [f64]; 2],
}

impl LanesOp for MomentsPass<'_> {
    type Output = ();
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, lanes: L) {
        let MomentsPass {
            m,
            col: [col, cum],
            nsig,
            stars,
            out: [a, v],
        } = self;
        let d = &m.data;
        for (j, i) in stars.enumerate() {
            let (ab, va) = moments(lanes, d.windows.of(i), col, cum);
            let ns = nsig[i] * d.a_err[i];
            a[j] = ab;
            v[j] = ns * ns + m.distance_part(va);
        }
    }
}

/// The tangents (δā, δσ_a²) of the stars `stars` of one pixel for a tangent of its column
/// (`tan`: the column's and its inner columns'), into `out` (from the pixel's first star).
pub(super) struct TangentPass<'a> {
    pub m: &'a ModelCore,
    pub st: &'a State,
    pub col: [&'a [f64]; 2],
    pub tan: [&'a [f64]; 2],
    pub stars: Range<usize>,
    pub out: [&'a mut [f64]; 2],
}

impl LanesOp for TangentPass<'_> {
    type Output = ();
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, lanes: L) {
        let TangentPass {
            m,
            st,
            col,
            tan,
            stars,
            out: [a, v],
        } = self;
        for (j, i) in stars.enumerate() {
            let (x, y) = jvp(lanes, m.data.windows.of(i), col, tan, st.abar[i]);
            a[j] = x;
            v[j] = m.distance_part(y);
        }
    }
}

/// The energy of the stars `stars` of one pixel and its cotangents: ā, σ_a² and the ξ_σ
/// gradient into `out` (from the pixel's first star), the cotangents of the column and of
/// its inner columns added into `bars`; returns the pixel's energy.
pub(super) struct EnergyPass<'a> {
    pub m: &'a ModelCore,
    pub col: [&'a [f64]; 2],
    /// n_σ and dn_σ/dξ_σ of all stars.
    pub nsig: [&'a [f64]; 2],
    pub xsig: &'a [f64],
    pub stars: Range<usize>,
    pub out: [&'a mut [f64]; 3],
    pub bars: [&'a mut [f64]; 2],
}

impl LanesOp for EnergyPass<'_> {
    type Output = f64;
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, lanes: L) -> f64 {
        let EnergyPass {
            m,
            col,
            nsig: [nsig, dnsig],
            xsig,
            stars,
            out: [a, v, g],
            bars: [rw_bar, cum_bar],
        } = self;
        let d = &m.data;
        let mut e = 0.0;
        for (j, i) in stars.enumerate() {
            let win = d.windows.of(i);
            let (ab, va) = moments(lanes, win, col[0], col[1]);
            let ns = nsig[i] * d.a_err[i];
            let vv = ns * ns + m.distance_part(va);
            let r = d.a_obs[i] - ab;
            let (ei, ca, cv) = m.star_energy(i, r, vv);
            e += ei;
            let cot = [ca, m.distance_part(cv)];
            vjp(win, col, ab, cot, [&mut *rw_bar, &mut *cum_bar]);
            a[j] = ab;
            v[j] = vv;
            g[j] = if m.infer_nsigma {
                cv * 2.0 * ns * d.a_err[i] * dnsig[i] + xsig[i]
            } else {
                0.0
            };
        }
        e
    }
}

/// The cotangents `(ca, cv)` (on ā and σ_a² of all stars) of the stars `stars` of one
/// pixel, added into the cotangents `bars` of its column and inner columns.
pub(super) struct CotangentPass<'a> {
    pub m: &'a ModelCore,
    pub st: &'a State,
    pub col: [&'a [f64]; 2],
    pub cot: [&'a [f64]; 2],
    pub stars: Range<usize>,
    pub bars: [&'a mut [f64]; 2],
}

impl LanesOp for CotangentPass<'_> {
    type Output = ();
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, _: L) {
        let CotangentPass {
            m,
            st,
            col,
            cot: [ca, cv],
            stars,
            bars: [rw_bar, cum_bar],
        } = self;
        for i in stars {
            let cot = [ca[i], m.distance_part(cv[i])];
            let bars = [&mut *rw_bar, &mut *cum_bar];
            vjp(m.data.windows.of(i), col, st.abar[i], cot, bars);
        }
    }
}

/// The pass of [`super::metric_pixels`] over pixel `p` for all states at once: each star's
/// window is visited once, for every state in turn (its tangent, Fisher weighting and
/// cotangent), so it is read from memory once per product instead of once per state. Adds
/// each state's share (1/n of its product, n the number of states) of the kept shells' field
/// cotangent into `out.0`, in state order, and leaves each state's [Σ s t, Σ t] partials in
/// `out.1`; `sig` as there, its output restricted to the pixel's stars.
pub(super) struct MetricPixel<'a, 'b> {
    pub m: &'a ModelCore,
    pub states: &'a [State],
    /// The field tangent of the pixel's kept shells, and each state's scale and offset
    /// tangents.
    pub tangent: (&'a [f64], &'a [(f64, f64)]),
    pub sig: (Option<&'a [f64]>, Option<&'b mut [f64]>),
    pub p: usize,
    /// The field cotangent of the pixel's kept shells, and each state's partials.
    pub out: (&'b mut [f64], &'b mut [[f64; 2]]),
    /// One scratch per state.
    pub w: &'b mut [PixelScratch],
}

impl LanesOp for MetricPixel<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, lanes: L) {
        let MetricPixel {
            m,
            states,
            tangent: (ds, tangents),
            sig: (v_sig, mut os),
            p,
            out: (sbar, scalars),
            w,
        } = self;
        let (n, d) = (m.n_r(), &m.data);
        let n_states = states.len() as f64;
        let weight = 1.0 / n_states;
        let (lo, hi) = (d.offsets[p], d.offsets[p + 1]);
        // a state's extinction column and kept log-density at the pixel
        fn cols(st: &State, p: usize, n: usize) -> (&[f64], &[f64]) {
            (&st.rw[p * n..(p + 1) * n], &st.s[p * n..(p + 1) * n])
        }
        for ((st, &(dscl, doff)), w) in states.iter().zip(tangents).zip(w.iter_mut()) {
            let (col, sk) = cols(st, p, n);
            for (k, drw) in w.drw.iter_mut().enumerate() {
                *drw = col[k] * (st.scl * ds[k] + sk[k] * dscl + doff);
            }
            inner_columns(col, &mut w.cum);
            inner_columns(&w.drw, &mut w.dcum);
            w.rw_bar.fill(0.0);
            w.cum_bar.fill(0.0);
        }
        for (j, i) in (lo..hi).enumerate() {
            let win = d.windows.of(i);
            for (st, w) in states.iter().zip(w.iter_mut()) {
                let col = cols(st, p, n).0;
                let (mut da, y) = jvp(lanes, win, [col, &w.cum], [&w.drw, &w.dcum], st.abar[i]);
                let mut dv = m.distance_part(y);
                // v also depends on ξ_σ: ∂v/∂ξ_σ = 2 n_σ σ_A² dn_σ/dξ_σ (diagonal per star)
                let dvds = v_sig.map(|vs| {
                    let dvds = 2.0 * st.nsig[i] * d.a_err[i] * d.a_err[i] * st.dnsig[i];
                    dv += dvds * vs[i];
                    dvds
                });
                m.fisher_weigh(i, st.var[i], &mut da, &mut dv);
                if let (Some(os), Some(dvds)) = (os.as_deref_mut(), dvds) {
                    os[j] += dvds * dv / n_states;
                }
                let gv = m.distance_part(dv);
                let bars = [&mut w.rw_bar[..], &mut w.cum_bar[..]];
                vjp(win, [col, &w.cum], st.abar[i], [da, gv], bars);
            }
        }
        for ((st, w), sc) in states.iter().zip(w.iter_mut()).zip(scalars) {
            let (col, sk) = cols(st, p, n);
            finish_vjp(&w.cum_bar, &mut w.rw_bar);
            // rw = Δr exp(scl s + off): ∂rw/∂s = scl rw, ∂rw/∂scl = s rw, ∂rw/∂off = rw
            let (mut g_scl, mut g_off) = (0.0, 0.0);
            for k in 0..n {
                let t = weight * w.rw_bar[k] * col[k];
                sbar[k] += st.scl * t;
                g_scl += sk[k] * t;
                g_off += t;
            }
            *sc = [g_scl, g_off];
        }
    }
}

/// Per-thread scratch of the per-pixel passes: a column's tangent, its inner columns and
/// their tangents, and the cotangents of both.
pub(super) struct PixelScratch {
    drw: Vec<f64>,
    cum: Vec<f64>,
    dcum: Vec<f64>,
    rw_bar: Vec<f64>,
    cum_bar: Vec<f64>,
}

impl PixelScratch {
    pub(super) fn new(n: usize) -> Self {
        Self {
            drw: vec![0.0; n],
            cum: vec![0.0; n + 1],
            dcum: vec![0.0; n + 1],
            rw_bar: vec![0.0; n],
            cum_bar: vec![0.0; n + 1],
        }
    }
}
