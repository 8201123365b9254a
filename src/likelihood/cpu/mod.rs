//! The likelihood on the CPU: rayon over pixels, one pass per pixel over its column and its
//! stars. Every reduction runs in a fixed order (pixel partials summed per patch), so the
//! results do not depend on the thread count or the MPI rank count.

mod pair;
mod passes;
mod states;

use anyhow::Result;
use rayon::prelude::*;

use self::passes::{
    CotangentPass, EnergyPass, MetricPixel, MetricScratch, MomentsPass, TangentPass,
};
pub use self::states::TOGETHER_MAX_ENTRIES;
use super::backend::Backend;
use super::core::{ModelCore, ModelWork, SampleField};
use super::lanes;
use super::mask::Mask;
use super::response::{finish_vjp, inner_columns};
use super::state::State;
use crate::base::util::{par_zero, DisjointMut};
use crate::base::vexp;

/// The CPU backend (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Pixel `p`'s kept log-density `sk` (from the final chart's `field`) and extinction per
/// shell `col = Δr exp(scl s + off)`.
fn fill_column(
    m: &ModelCore,
    field: SampleField<'_>,
    p: usize,
    scl: f64,
    off: f64,
    sk: &mut [f64],
    col: &mut [f64],
) {
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    field.copy_to(p * nc + pad, &mut sk[..n]);
    for k in 0..n {
        col[k] = scl * sk[k] + off;
    }
    vexp::exp_in_place(&mut col[..n]);
    for k in 0..n {
        col[k] *= m.widths[k];
    }
}

impl Backend for Cpu {
    fn describe(&self) -> String {
        "cpu".into()
    }

    fn state(&self, m: &ModelCore, xi: &[f64], st: &mut State, w: &mut ModelWork) -> Result<()> {
        m.icr.forward(xi, &mut w.icr);
        fill_state(m, SampleField::plain(&w.icr.fields[m.icr.chart.levels]), st);
        Ok(())
    }

    fn takes_fields(&self) -> bool {
        true
    }

    fn state_field(
        &self,
        m: &ModelCore,
        field: SampleField<'_>,
        st: &mut State,
        _w: &mut ModelWork,
    ) -> Result<()> {
        fill_state(m, field, st);
        Ok(())
    }

    fn value_grad(
        &self,
        m: &ModelCore,
        xi: &[f64],
        xsig: &[f64],
        st: &mut State,
        g_xi: &mut [f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 3]> {
        m.icr.forward(xi, &mut w.icr);
        let ModelWork {
            icr,
            field: sbar_all,
            pix_scalars,
            pix_energy,
            ..
        } = w;
        let field = SampleField::plain(&icr.fields[m.icr.chart.levels]);
        let out = (&mut sbar_all[..], false);
        value_grad_pixels(m, field, xsig, st, gsig, out, pix_scalars, pix_energy);
        m.icr.adjoint(sbar_all, g_xi, icr);
        let [g_scl, g_off] = m.dom.pixel_sum2(pix_scalars);
        Ok([m.dom.pixel_sum(pix_energy), g_scl, g_off])
    }

    fn value_grad_field(
        &self,
        m: &ModelCore,
        field: SampleField<'_>,
        xsig: &[f64],
        st: &mut State,
        gsig: &mut [f64],
        field_bar: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 3]> {
        let (scalars, energy) = (&mut w.pix_scalars, &mut w.pix_energy);
        value_grad_pixels(m, field, xsig, st, gsig, (field_bar, true), scalars, energy);
        let [g_scl, g_off] = m.dom.pixel_sum2(scalars);
        Ok([m.dom.pixel_sum(energy), g_scl, g_off])
    }

    fn walks_states_together(&self, m: &ModelCore) -> bool {
        states::together(m)
    }

    fn value_grad_prepare(
        &self,
        m: &ModelCore,
        field: SampleField<'_>,
        st: &mut State,
        _w: &mut ModelWork,
    ) -> Result<()> {
        states::prepare(m, field, st);
        Ok(())
    }

    fn value_grad_walk(
        &self,
        m: &ModelCore,
        states: &mut [State],
        field_bar: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        states::walk(m, states, field_bar, w)
    }

    fn value_grad_finish(
        &self,
        m: &ModelCore,
        k: usize,
        xsig: &[f64],
        gsig: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 3]> {
        states::finish(m, k, xsig, gsig, w)
    }

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
    ) -> Result<()> {
        m.icr.forward(dxi, &mut w.icr);
        let ds = &w.icr.fields[m.icr.chart.levels];
        jvp_from_field(m, st, ds, dscl, doff, da, dv, &mut w.field);
        Ok(())
    }

    fn vjp(
        &self,
        m: &ModelCore,
        st: &State,
        ca: &[f64],
        cv: &[f64],
        g_xi: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<[f64; 2]> {
        let c = vjp_to_field(m, st, ca, cv, 1.0, false, &mut w.field, &mut w.pix_scalars);
        m.icr.adjoint(&w.field, g_xi, &mut w.icr);
        Ok(c)
    }

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
        let c = through_icr(m, dxi, g_xi, w, |ds, acc, pix| {
            let states = std::slice::from_ref(st);
            metric_pixels(m, states, &[(dscl, doff)], ds, None, acc, pix);
            m.dom.pixel_sum2(pix)
        });
        Ok(c)
    }

    fn metric_pair(
        &self,
        m: &ModelCore,
        st: &State,
        dxi: [&[f64]; 2],
        tangents: [(f64, f64); 2],
        g_xi: [&mut [f64]; 2],
        w: &mut ModelWork,
    ) -> Result<[[f64; 2]; 2]> {
        Ok(pair::metric_pair(m, st, dxi, tangents, g_xi, w))
    }

    fn averaged_fisher(
        &self,
        m: &ModelCore,
        states: &[State],
        mask: &Mask,
        v: &[f64],
        out: &mut [f64],
        w: &mut ModelWork,
    ) -> Result<()> {
        let (nxi, np, ns) = (m.icr.n_xi(), m.n_params(), m.data.len());
        let (vx, vs) = v.split_at(np);
        let chain = m.chain();
        let mut scratch = std::mem::take(&mut w.masked);
        // the excitations through the ICR (copied only if one of them is held), the scale
        // and offset tangents as scalars
        let vxm = mask.masked(&vx[..nxi], &mut scratch);
        let lat = [
            mask.factor(nxi) * vx[nxi],
            mask.factor(nxi + 1) * vx[nxi + 1],
        ];
        let (ox, osig) = out.split_at_mut(np);
        osig.fill(0.0);
        let tangents: Vec<(f64, f64)> = states
            .iter()
            .map(|st| chain.tangent(st.dscl, lat))
            .collect();
        // one state's per-pixel partials at a time, for the patch-ordered sums
        let mut per_state = std::mem::take(&mut w.pix_scalars);
        let [g_scl, g_off] = through_icr(m, vxm, &mut ox[..nxi], w, |ds, acc, pix| {
            let sig = Some((vs, &mut osig[..ns]));
            metric_pixels(m, states, &tangents, ds, sig, acc, pix);
            let (mut g_scl, mut g_off) = (0.0, 0.0);
            for (si, st) in states.iter().enumerate() {
                let sum = lane_sum2(m, pix, states.len(), si, &mut per_state);
                let [a, b] = chain.cotangent(st.dscl, sum);
                g_scl += a;
                g_off += b;
            }
            [g_scl, g_off]
        });
        w.pix_scalars = per_state;
        out[nxi] = g_scl;
        out[nxi + 1] = g_off;
        mask.apply(&mut out[..np]);
        w.masked = scratch;
        Ok(())
    }
}

/// The state's per-star moments (`st.abar`, `st.var`) and its columns (`st.s`, `st.rw`) from
/// the final chart's `field`: one pass per pixel over its column and its stars.
fn fill_state(m: &ModelCore, field: SampleField<'_>, st: &mut State) {
    st.fields_on_host = true;
    let n = m.n_r();
    let (scl, off) = (st.scl, st.off);
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
    let d = &m.data;
    s.par_chunks_mut(n)
        .zip(rw.par_chunks_mut(n))
        .enumerate()
        .for_each_init(
            || vec![0.0; n + 1],
            |cum, (p, (sk, col))| {
                fill_column(m, field, p, scl, off, sk, col);
                let (lo, hi) = (d.offsets[p], d.offsets[p + 1]);
                if lo == hi {
                    return;
                }
                // SAFETY: star ranges of distinct pixels are disjoint
                let (a, v) = unsafe { (ap.chunk(lo, hi - lo), vp.chunk(lo, hi - lo)) };
                inner_columns(col, cum);
                lanes::dispatch(MomentsPass {
                    m,
                    col: [col, cum],
                    nsig,
                    stars: lo..hi,
                    out: [a, v],
                });
            },
        );
}

/// The per-pixel pass of a value and gradient from the final chart's `field`: state, energy
/// partials, ξ_σ gradient, field cotangent (written into `sbar_all`, or added when its flag
/// is set) and the [Σ s t, Σ t] partials of every pixel.
#[allow(clippy::too_many_arguments)]
fn value_grad_pixels(
    m: &ModelCore,
    field: SampleField<'_>,
    xsig: &[f64],
    st: &mut State,
    gsig: &mut [f64],
    (sbar_all, add): (&mut [f64], bool),
    pix_scalars: &mut [[f64; 2]],
    pix_energy: &mut [f64],
) {
    st.fields_on_host = true;
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    let d = &m.data;
    let (scl, off) = (st.scl, st.off);
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
                fill_column(m, field, p, scl, off, sk, col);
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
                *en = lanes::dispatch(EnergyPass {
                    m,
                    col: [col, cum],
                    nsig: [nsig, dnsig],
                    xsig,
                    stars: lo..hi,
                    out: [a, v, g],
                    bars: [rw_bar, cum_bar],
                });
                finish_vjp(cum_bar, rw_bar);
                if !add {
                    sbar.fill(0.0);
                }
                let (mut g_scl, mut g_off) = (0.0, 0.0);
                for k in 0..n {
                    let t = rw_bar[k] * col[k];
                    let sb = &mut sbar[pad + k];
                    *sb = if add { *sb + scl * t } else { scl * t };
                    g_scl += sk[k] * t;
                    g_off += t;
                }
                *sc = [g_scl, g_off];
            },
        );
}

/// The global sum of lane `lane` of per-pixel partials held `lanes` to a pixel (pixel-major,
/// as the metric walks leave them), through `per` (one pixel's worth each) so that it is
/// summed in the patch order of [`crate::sphere::decomp::Domain::pixel_sum2`].
fn lane_sum2(
    m: &ModelCore,
    scalars: &[[f64; 2]],
    lanes: usize,
    lane: usize,
    per: &mut [[f64; 2]],
) -> [f64; 2] {
    for (q, sc) in per.iter_mut().zip(scalars.chunks_exact(lanes)) {
        *q = sc[lane];
    }
    m.dom.pixel_sum2(per)
}

/// ICR forward of `dxi`, then `pass(ds, acc, scalars)` adding the final chart field's
/// cotangent into a zeroed `acc` and leaving per-pixel partials in `scalars` (sized by the
/// pass), then the ICR adjoint of `acc` into `g_xi`: the `Sᵀ (…) S` around the per-pixel part
/// of a metric product, in the workspace's buffers.
fn through_icr<R>(
    m: &ModelCore,
    dxi: &[f64],
    g_xi: &mut [f64],
    w: &mut ModelWork,
    pass: impl FnOnce(&[f64], &mut [f64], &mut Vec<[f64; 2]>) -> R,
) -> R {
    let top = m.icr.chart.levels;
    m.icr.forward(dxi, &mut w.icr);
    let ds = std::mem::take(&mut w.icr.fields[top]);
    let mut acc = std::mem::take(&mut w.acc);
    acc.resize(ds.len(), 0.0);
    par_zero(&mut acc);
    let r = pass(&ds, &mut acc, &mut w.state_scalars);
    w.icr.fields[top] = ds;
    m.icr.adjoint(&acc, g_xi, &mut w.icr);
    w.acc = acc;
    r
}

/// The states' mean metric product after the ICR forward, `Σ_s J_sᵀ F_s J_s v / n`, one
/// pixel at a time ([`MetricPixel`]): each star's window is visited once, and for each
/// state in turn its tangent, Fisher weighting and cotangent (the window read from memory
/// once for all states and both directions). State `s`'s tangent is `(ds, tangents[s])`: the final chart
/// field's tangent `S dξ_e` and the value tangents of scale and offset; `sig`, when ξ_σ is
/// not held, holds its tangent and the output its part is added to. Adds the field's part
/// into `acc` (state by state, in order) and leaves each pixel's [Σ s t, Σ t] partials per
/// state (times 1/n, pixel-major) in `scalars`. The arithmetic is that of
/// [`jvp_from_field`], the Fisher weighting and [`vjp_to_field`] in the same order.
fn metric_pixels(
    m: &ModelCore,
    states: &[State],
    tangents: &[(f64, f64)],
    ds: &[f64],
    sig: Option<(&[f64], &mut [f64])>,
    acc: &mut [f64],
    scalars: &mut Vec<[f64; 2]>,
) {
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    let (v_sig, op) = match sig {
        Some((v, out)) => (Some(v), Some(DisjointMut::new(out))),
        None => (None, None),
    };
    scalars.clear();
    scalars.resize(m.npix() * states.len(), [0.0; 2]);
    acc.par_chunks_mut(nc)
        .zip(scalars.par_chunks_mut(states.len()))
        .enumerate()
        .for_each_init(
            || MetricScratch::new(states.len(), n),
            |w, (p, (sbar, sc))| {
                let ds = &ds[p * nc + pad..p * nc + pad + n];
                let (lo, hi) = (m.data.offsets[p], m.data.offsets[p + 1]);
                // SAFETY: star ranges of distinct pixels are disjoint
                let os = op.as_ref().map(|op| unsafe { op.chunk(lo, hi - lo) });
                lanes::dispatch(MetricPixel {
                    m,
                    states,
                    tangent: (ds, tangents),
                    sig: (v_sig, os),
                    p,
                    out: (&mut sbar[pad..pad + n], sc),
                    w,
                });
            },
        );
}

/// The part of a VJP before the ICR adjoint: the cotangent of the final chart field, times
/// `weight`, written to (or with `accumulate` added to) `sbar_all`; returns the value-space
/// cotangents of the scale and offset, times `weight`.
#[allow(clippy::too_many_arguments)]
fn vjp_to_field(
    m: &ModelCore,
    st: &State,
    ca: &[f64],
    cv: &[f64],
    weight: f64,
    accumulate: bool,
    sbar_all: &mut [f64],
    pix_scalars: &mut [[f64; 2]],
) -> [f64; 2] {
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    let d = &m.data;
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
                lanes::dispatch(CotangentPass {
                    m,
                    st,
                    col: [col, cum],
                    cot: [ca, cv],
                    stars: d.offsets[p]..d.offsets[p + 1],
                    bars: [rw_bar, cum_bar],
                });
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
    m.dom.pixel_sum2(pix_scalars)
}

/// The part of a JVP after the ICR forward: `ds = S dξ_e` (final chart field) and the value
/// tangents of scale and offset; `buf` holds the tangent of rw.
#[allow(clippy::too_many_arguments)]
fn jvp_from_field(
    m: &ModelCore,
    st: &State,
    ds: &[f64],
    dscl: f64,
    doff: f64,
    da: &mut [f64],
    dv: &mut [f64],
    buf: &mut [f64],
) {
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    let d = &m.data;
    let (ap, vp) = (DisjointMut::new(da), DisjointMut::new(dv));
    buf[..m.npix() * n]
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
                lanes::dispatch(TangentPass {
                    m,
                    st,
                    col: [col, cum],
                    tan: [drw, dcum],
                    stars: lo..hi,
                    out: [a, v],
                });
            },
        );
}
