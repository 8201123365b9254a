//! The per-pixel star walks of the CPU backend. Each is a [`LanesOp`], run by
//! [`crate::likelihood::lanes::dispatch`] once per pixel, so that the whole walk over a
//! pixel's stars is compiled for the widest instruction set present and its window sums use
//! that set's explicit vectors.

use std::ops::Range;

use crate::likelihood::core::ModelCore;
use crate::likelihood::lanes::{Lanes, LanesOp, QuadOps};
use crate::likelihood::quad::{self, Quad, QuadColumns};
use crate::likelihood::response::{finish_vjp, inner_columns, jvp, moments, vjp};
use crate::likelihood::state::State;
use crate::likelihood::windows::Window;

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
            let t = star_terms(m, i, (ab, va), [nsig, dnsig]);
            e += t.energy;
            vjp(win, col, ab, t.cot, [&mut *rw_bar, &mut *cum_bar]);
            a[j] = ab;
            v[j] = t.var;
            g[j] = if m.infer_nsigma {
                t.gsig + xsig[i]
            } else {
                0.0
            };
        }
        e
    }
}

/// One star's part of the energy at its moments `(ā, σ_a²)` with n_σ and dn_σ/dξ_σ of all
/// stars in `sig`: its variance v, energy, cotangents on ā and σ_a², and ξ_σ gradient less
/// its prior term (0 where ξ_σ is not inferred; the operations [`EnergyPass`] and
/// [`EnergyQuad`] share, in their order).
#[inline(always)]
fn star_terms(
    m: &ModelCore,
    i: usize,
    (ab, va): (f64, f64),
    [nsig, dnsig]: [&[f64]; 2],
) -> StarTerms {
    let d = &m.data;
    let ns = nsig[i] * d.a_err[i];
    let var = ns * ns + m.distance_part(va);
    let (energy, ca, cv) = m.star_energy(i, d.a_obs[i] - ab, var);
    StarTerms {
        var,
        energy,
        cot: [ca, m.distance_part(cv)],
        gsig: if m.infer_nsigma {
            cv * 2.0 * ns * d.a_err[i] * dnsig[i]
        } else {
            0.0
        },
    }
}

/// [`star_terms`]' results.
struct StarTerms {
    var: f64,
    energy: f64,
    cot: [f64; 2],
    gsig: f64,
}

/// [`EnergyPass`] for four states at once (their columns in `q.r` and `q.c`; cotangents
/// added into `q.rb` and `q.cb`): each star's window is
/// walked once for all four. Writes each state's ā, σ_a² and the ξ_σ gradient less its prior
/// term (`xsig`, added by the caller) into `out[s]` (from the pixel's first star); returns
/// the states' energies. Each lane computes [`EnergyPass`]'s operations in its order.
pub(super) struct EnergyQuad<'a, 'b> {
    pub m: &'a ModelCore,
    /// Each state's n_σ and dn_σ/dξ_σ of all stars.
    pub sig: [[&'a [f64]; 2]; 4],
    pub stars: Range<usize>,
    pub q: &'b mut QuadColumns,
    pub out: [[&'b mut [f64]; 3]; 4],
}

impl LanesOp for EnergyQuad<'_, '_> {
    type Output = [f64; 4];
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, lanes: L) -> [f64; 4] {
        let EnergyQuad {
            m,
            sig,
            stars,
            q,
            out,
        } = self;
        let (d, o) = (&m.data, lanes.quad());
        let mut e = [0.0; 4];
        for (j, i) in stars.enumerate() {
            let win = d.windows.of(i);
            let (ab, va) = quad::moments(o, &win, q);
            let (mut ca, mut cv) = ([0.0; 4], [0.0; 4]);
            for s in 0..4 {
                let t = star_terms(m, i, (ab[s], va[s]), sig[s]);
                e[s] += t.energy;
                [ca[s], cv[s]] = t.cot;
                out[s][0][j] = ab[s];
                out[s][1][j] = t.var;
                out[s][2][j] = t.gsig;
            }
            quad::vjp(o, &win, q, ab, [ca, cv]);
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
    /// The pass's scratch.
    pub w: &'b mut MetricScratch,
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
        // blocks of four states side by side ([`quad`]), the rest one by one
        let n_quads = states.len() / 4;
        let (quads, rest) = states.split_at(4 * n_quads);
        let (quad_tangents, rest_tangents) = tangents.split_at(4 * n_quads);
        let blocks = quads.chunks_exact(4).zip(quad_tangents.chunks_exact(4));
        for ((sts, tans), q) in blocks.zip(&mut w.quads) {
            quad_columns(sts, tans, ds, p, q);
        }
        for ((st, &tangent), w) in rest.iter().zip(rest_tangents).zip(&mut w.states) {
            w.prepare(st, p, ds, tangent);
        }
        let star = StarMetric {
            m,
            v_sig,
            n_states,
            inv_exact: states.len().is_power_of_two(),
        };
        for (j, i) in (lo..hi).enumerate() {
            let win = d.windows.of(i);
            let mut os_j = os.as_deref_mut().map(|os| &mut os[j]);
            for (sts, q) in quads.chunks_exact(4).zip(&mut w.quads) {
                star.quad(lanes.quad(), sts, i, &win, q, os_j.as_deref_mut());
            }
            for (st, w) in rest.iter().zip(&mut w.states) {
                let col = cols(st, p, n).0;
                star.single(lanes, (st, col), i, win, w, os_j.as_deref_mut());
            }
        }
        let (quad_scalars, rest_scalars) = scalars.split_at_mut(4 * n_quads);
        let blocks = quads.chunks_exact(4).zip(quad_scalars.chunks_exact_mut(4));
        for ((sts, sc), q) in blocks.zip(&mut w.quads) {
            quad_finish(sts, p, weight, q, sbar, sc);
        }
        for ((st, w), sc) in rest.iter().zip(&mut w.states).zip(rest_scalars) {
            *sc = w.finish(st, p, weight, sbar);
        }
    }
}

/// A state's extinction column and kept log-density at pixel `p` (`n` shells).
#[inline(always)]
pub(super) fn cols(st: &State, p: usize, n: usize) -> (&[f64], &[f64]) {
    (&st.rw[p * n..(p + 1) * n], &st.s[p * n..(p + 1) * n])
}

/// Four states' columns at pixel `p`, their tangents for the field tangent `ds` and their
/// scale and offset tangents `tans`, their inner columns and zero cotangents, into the lanes
/// of `q` (the operations of the one-state preparation in [`MetricPixel`], lane by lane).
#[inline(always)]
fn quad_columns(sts: &[State], tans: &[(f64, f64)], ds: &[f64], p: usize, q: &mut QuadColumns) {
    let n = q.r.len();
    let col: [(&[f64], &[f64]); 4] = std::array::from_fn(|s| cols(&sts[s], p, n));
    let ds = &ds[..n];
    let (mut c, mut dc) = ([0.0; 4], [0.0; 4]);
    for k in 0..n {
        let (mut r, mut dr) = ([0.0; 4], [0.0; 4]);
        for s in 0..4 {
            let (dscl, doff) = tans[s];
            r[s] = col[s].0[k];
            dr[s] = r[s] * (sts[s].scl * ds[k] + col[s].1[k] * dscl + doff);
        }
        (q.r[k], q.dr[k], q.c[k], q.dc[k]) = (r, dr, c, dc);
        for s in 0..4 {
            c[s] += r[s];
            dc[s] += dr[s];
        }
    }
    (q.c[n], q.dc[n]) = (c, dc);
    q.rb.fill([0.0; 4]);
    q.cb.fill([0.0; 4]);
}

/// The end of [`MetricPixel`] for four states (columns in `q`): their inner columns'
/// cotangents folded into the column's ([`finish_vjp`]), each state's share (`weight`) of the
/// field cotangent added into `sbar` in state order, and its [Σ s t, Σ t] into `scalars`.
#[inline(always)]
fn quad_finish(
    sts: &[State],
    p: usize,
    weight: f64,
    q: &mut QuadColumns,
    sbar: &mut [f64],
    scalars: &mut [[f64; 2]],
) {
    let n = q.r.len();
    q.fold_bars();
    let col: [(&[f64], &[f64]); 4] = std::array::from_fn(|s| cols(&sts[s], p, n));
    let (mut g_scl, mut g_off) = ([0.0; 4], [0.0; 4]);
    for (k, sb) in sbar.iter_mut().enumerate().take(n) {
        for s in 0..4 {
            let t = weight * q.rb[k][s] * col[s].0[k];
            *sb += sts[s].scl * t;
            g_scl[s] += col[s].1[k] * t;
            g_off[s] += t;
        }
    }
    for (s, sc) in scalars.iter_mut().enumerate() {
        *sc = [g_scl[s], g_off[s]];
    }
}

/// What the metric's per-star step needs besides the star and its states.
struct StarMetric<'a> {
    m: &'a ModelCore,
    v_sig: Option<&'a [f64]>,
    n_states: f64,
    /// Whether 1/n_states is exact (a power of two).
    inv_exact: bool,
}

impl StarMetric<'_> {
    /// Adds ξ_σ's part to star `i`'s tangent `dv` of state `st` when ξ_σ is not held, and
    /// returns ∂v/∂ξ_σ = 2 n_σ σ_A² dn_σ/dξ_σ (v depends on ξ_σ, diagonally per star).
    #[inline(always)]
    fn sig_tangent(&self, st: &State, i: usize, dv: &mut f64) -> Option<f64> {
        let a_err = self.m.data.a_err[i];
        self.v_sig.map(|vs| {
            let dvds = 2.0 * st.nsig[i] * a_err * a_err * st.dnsig[i];
            *dv += dvds * vs[i];
            dvds
        })
    }

    /// [`StarMetric::sig_tangent`] for four states, with ∂v/∂ξ_σ computed once when the
    /// four hold the same n_σ (the KL's states: [`State::sig_id`]).
    #[inline(always)]
    fn sig_tangents(&self, sts: &[State], i: usize, dv: &mut Quad) -> Option<Quad> {
        let vs = self.v_sig?;
        let id = sts[0].sig_id;
        let shared = sts[1].sig_id == id && sts[2].sig_id == id && sts[3].sig_id == id;
        let a_err = self.m.data.a_err[i];
        let mut dvds = [0.0; 4];
        if shared {
            dvds = [2.0 * sts[0].nsig[i] * a_err * a_err * sts[0].dnsig[i]; 4];
        } else {
            for s in 0..4 {
                dvds[s] = 2.0 * sts[s].nsig[i] * a_err * a_err * sts[s].dnsig[i];
            }
        }
        for s in 0..4 {
            dv[s] += dvds[s] * vs[i];
        }
        Some(dvds)
    }

    /// A state's share `x / n` of the mean over the `n` states: a product with 1/n where that
    /// is exact (n a power of two), the same bits without a division.
    #[inline(always)]
    fn share(&self, x: f64) -> f64 {
        if self.inv_exact {
            x * (1.0 / self.n_states)
        } else {
            x / self.n_states
        }
    }

    /// Star `i`'s tangent, Fisher weighting and cotangent for state `st` (with its column
    /// at the pixel; the rest in its scratch `w`), adding its ξ_σ output into `os`.
    #[inline(always)]
    fn single<L: Lanes>(
        &self,
        lanes: L,
        (st, col): (&State, &[f64]),
        i: usize,
        win: Window<'_>,
        w: &mut PixelScratch,
        os: Option<&mut f64>,
    ) {
        let m = self.m;
        let (mut da, y) = jvp(lanes, win, [col, &w.cum], [&w.drw, &w.dcum], st.abar[i]);
        let mut dv = m.distance_part(y);
        let dvds = self.sig_tangent(st, i, &mut dv);
        m.fisher_weigh(i, st.var[i], &mut da, &mut dv);
        if let (Some(o), Some(dvds)) = (os, dvds) {
            *o += self.share(dvds * dv);
        }
        let gv = m.distance_part(dv);
        let bars = [&mut w.rw_bar[..], &mut w.cum_bar[..]];
        vjp(win, [col, &w.cum], st.abar[i], [da, gv], bars);
    }

    /// Star `i`'s tangent, Fisher weighting and cotangent for four states at once (their
    /// columns in `q`), adding each state's ξ_σ output into `os` in state order.
    #[inline(always)]
    fn quad<O: QuadOps>(
        &self,
        o: O,
        sts: &[State],
        i: usize,
        win: &Window<'_>,
        q: &mut QuadColumns,
        os: Option<&mut f64>,
    ) {
        let m = self.m;
        // lane loops written out: closures (`array::from_fn`) were left out of line here
        let (mut abar, mut var) = ([0.0; 4], [0.0; 4]);
        for s in 0..4 {
            (abar[s], var[s]) = (sts[s].abar[i], sts[s].var[i]);
        }
        let (mut da, y) = quad::jvp(o, win, q, abar);
        let mut dv = [0.0; 4];
        for s in 0..4 {
            dv[s] = m.distance_part(y[s]);
        }
        let dvds = self.sig_tangents(sts, i, &mut dv);
        if m.marginal.is_none() {
            // the Gaussian's weights (δā/v, δv/(2v²)) as `fisher_weigh` computes them, in one
            // vector division each instead of four scalar ones behind a branch
            let v = o.load(&var);
            let two_v2 = o.mul(o.mul(o.splat(2.0), v), v);
            let (wa, wv) = (o.div(o.load(&da), v), o.div(o.load(&dv), two_v2));
            o.store(&mut da, wa);
            o.store(&mut dv, wv);
        } else {
            for s in 0..4 {
                m.fisher_weigh(i, var[s], &mut da[s], &mut dv[s]);
            }
        }
        if let (Some(out), Some(dvds)) = (os, dvds) {
            for s in 0..4 {
                *out += self.share(dvds[s] * dv[s]);
            }
        }
        let mut gv = [0.0; 4];
        for s in 0..4 {
            gv[s] = m.distance_part(dv[s]);
        }
        quad::vjp(o, win, q, abar, [da, gv]);
    }
}

/// Per-thread scratch of [`MetricPixel`]: the columns of each block of four states side by
/// side, and one [`PixelScratch`] per state after the last block.
pub(super) struct MetricScratch {
    states: Vec<PixelScratch>,
    quads: Vec<QuadColumns>,
}

impl MetricScratch {
    /// Scratch for `n_states` states on columns of `n` shells.
    pub(super) fn new(n_states: usize, n: usize) -> Self {
        Self {
            states: (0..n_states % 4).map(|_| PixelScratch::new(n)).collect(),
            quads: (0..n_states / 4).map(|_| QuadColumns::new(n)).collect(),
        }
    }
}

/// Per-thread scratch of the per-pixel passes: a column's tangent, its inner columns and
/// their tangents, and the cotangents of both.
pub(super) struct PixelScratch {
    pub drw: Vec<f64>,
    pub cum: Vec<f64>,
    pub dcum: Vec<f64>,
    pub rw_bar: Vec<f64>,
    pub cum_bar: Vec<f64>,
}

impl PixelScratch {
    /// State `st`'s column tangent at pixel `p` for the field tangent `ds` of its kept shells
    /// and the scale and offset tangents `(dscl, doff)`, the inner columns of both, and zero
    /// cotangents: the start of a one-state metric product's pixel.
    #[inline(always)]
    pub(super) fn prepare(&mut self, st: &State, p: usize, ds: &[f64], (dscl, doff): (f64, f64)) {
        let (col, sk) = cols(st, p, self.drw.len());
        for (k, drw) in self.drw.iter_mut().enumerate() {
            *drw = col[k] * (st.scl * ds[k] + sk[k] * dscl + doff);
        }
        inner_columns(col, &mut self.cum);
        inner_columns(&self.drw, &mut self.dcum);
        self.rw_bar.fill(0.0);
        self.cum_bar.fill(0.0);
    }

    /// The end of a one-state metric product's pixel: the inner columns' cotangents folded
    /// into the column's, `weight` times the field cotangent added into `sbar`; returns the
    /// pixel's [Σ s t, Σ t] partials (times `weight`).
    #[inline(always)]
    pub(super) fn finish(
        &mut self,
        st: &State,
        p: usize,
        weight: f64,
        sbar: &mut [f64],
    ) -> [f64; 2] {
        let (col, sk) = cols(st, p, self.drw.len());
        finish_vjp(&self.cum_bar, &mut self.rw_bar);
        // rw = Δr exp(scl s + off): ∂rw/∂s = scl rw, ∂rw/∂scl = s rw, ∂rw/∂off = rw
        let (mut g_scl, mut g_off) = (0.0, 0.0);
        for k in 0..col.len() {
            let t = weight * self.rw_bar[k] * col[k];
            sbar[k] += st.scl * t;
            g_scl += sk[k] * t;
            g_off += t;
        }
        [g_scl, g_off]
    }

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
