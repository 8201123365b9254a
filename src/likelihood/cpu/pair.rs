//! Metric products of two vectors at one state in one walk of the stars (the two residual
//! samples of an MGVI iteration, solved in lockstep): each star's window, its state's ā,
//! σ_a² and Fisher weights and the state's column are read once for both tangents. Each
//! product's arithmetic is that of [`super::Backend::metric`] on its own, in its order
//! ([`super::passes::MetricPixel`] for one state), so each comes out bit for bit the same.

use rayon::prelude::*;

use super::lane_sum2;
use super::passes::{cols, PixelScratch};
use crate::base::util::par_zero;
use crate::likelihood::core::{ModelCore, ModelWork};
use crate::likelihood::lanes::{self, Lanes, LanesOp};
use crate::likelihood::response::{jvps, vjp_pair};
use crate::likelihood::state::State;

/// `g_xi[t] = Sᵀ Jᵀ F J S dxi[t]` for both `t` at state `st` (the ICR part of
/// [`super::Backend::metric`]), with the value tangents `tangents[t]` = (δscale, δoffset);
/// returns each product's value-space cotangents of the scale and offset.
pub(super) fn metric_pair(
    m: &ModelCore,
    st: &State,
    dxi: [&[f64]; 2],
    tangents: [(f64, f64); 2],
    [g0, g1]: [&mut [f64]; 2],
    w: &mut ModelWork,
) -> [[f64; 2]; 2] {
    let top = m.icr.chart.levels;
    let mut w1 = w.pair_icr.take().unwrap_or_else(|| m.icr.workspace());
    // the forwards one at a time (sharing a site matrix gains nothing there: their fine
    // columns' streams, not the matrices, bound them); the adjoints share each matrix
    m.icr.forward(dxi[0], &mut w.icr);
    m.icr.forward(dxi[1], &mut w1);
    let (ds0, ds1) = (&w.icr.fields[top], &w1.fields[top]);
    let (mut acc0, mut acc1) = (std::mem::take(&mut w.acc), std::mem::take(&mut w.pair_acc));
    for acc in [&mut acc0, &mut acc1] {
        acc.resize(ds0.len(), 0.0);
        par_zero(acc);
    }
    let scalars = &mut w.state_scalars;
    pair_pixels(m, st, [ds0, ds1], tangents, [&mut acc0, &mut acc1], scalars);
    let mut per = std::mem::take(&mut w.pix_scalars);
    let c = [0, 1].map(|t| lane_sum2(m, &w.state_scalars, 2, t, &mut per));
    w.pix_scalars = per;
    m.icr
        .adjoint_pair([&acc0, &acc1], [g0, g1], [&mut w.icr, &mut w1]);
    (w.acc, w.pair_acc, w.pair_icr) = (acc0, acc1, Some(w1));
    c
}

/// The per-pixel part of [`metric_pair`] after the ICR forwards: each final chart field's
/// cotangent into its zeroed `acc`, each pixel's [Σ s t, Σ t] per product (pixel-major) into
/// `scalars`.
fn pair_pixels(
    m: &ModelCore,
    st: &State,
    ds: [&[f64]; 2],
    tangents: [(f64, f64); 2],
    [acc0, acc1]: [&mut [f64]; 2],
    scalars: &mut Vec<[f64; 2]>,
) {
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    scalars.clear();
    scalars.resize(m.npix() * 2, [0.0; 2]);
    acc0.par_chunks_mut(nc)
        .zip(acc1.par_chunks_mut(nc))
        .zip(scalars.par_chunks_mut(2))
        .enumerate()
        .for_each_init(
            || [PixelScratch::new(n), PixelScratch::new(n)],
            |w, (p, ((sbar0, sbar1), sc))| {
                let kept = p * nc + pad..p * nc + pad + n;
                lanes::dispatch(MetricPair {
                    m,
                    st,
                    tangent: ([&ds[0][kept.clone()], &ds[1][kept]], tangents),
                    p,
                    out: ([&mut sbar0[pad..pad + n], &mut sbar1[pad..pad + n]], sc),
                    w,
                });
            },
        );
}

/// One pixel of [`metric_pair`]: both tangents' preparation, each star's two tangents,
/// Fisher weightings and cotangents, both cotangents' end.
struct MetricPair<'a, 'b> {
    m: &'a ModelCore,
    st: &'a State,
    /// The field tangents of the pixel's kept shells, and the scale and offset tangents.
    tangent: ([&'a [f64]; 2], [(f64, f64); 2]),
    p: usize,
    /// The field cotangents of the pixel's kept shells, and each product's partials.
    out: ([&'b mut [f64]; 2], &'b mut [[f64; 2]]),
    w: &'b mut [PixelScratch; 2],
}

impl LanesOp for MetricPair<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_lanes<L: Lanes>(self, lanes: L) {
        let MetricPair {
            m,
            st,
            tangent: (ds, tangents),
            p,
            out: (sbar, scalars),
            w,
        } = self;
        let (n, d) = (m.n_r(), &m.data);
        let col = cols(st, p, n).0;
        for t in 0..2 {
            w[t].prepare(st, p, ds[t], tangents[t]);
        }
        let [w0, w1] = w;
        for i in d.offsets[p]..d.offsets[p + 1] {
            let win = d.windows.of(i);
            let tans = [[&w0.drw[..], &w0.dcum[..]], [&w1.drw[..], &w1.dcum[..]]];
            let y = jvps(lanes, win, [col, &w0.cum], tans, st.abar[i]);
            let mut g = [[0.0; 2]; 2];
            for t in 0..2 {
                let (mut da, mut dv) = (y[t].0, m.distance_part(y[t].1));
                m.fisher_weigh(i, st.var[i], &mut da, &mut dv);
                g[t] = [da, m.distance_part(dv)];
            }
            let bars = [
                [&mut w0.rw_bar[..], &mut w0.cum_bar[..]],
                [&mut w1.rw_bar[..], &mut w1.cum_bar[..]],
            ];
            vjp_pair(win, [col, &w0.cum], st.abar[i], g, bars);
        }
        // as the one-state product: its weight 1/1
        for ((w, sbar), sc) in [w0, w1].into_iter().zip(sbar).zip(scalars) {
            *sc = w.finish(st, p, 1.0, sbar);
        }
    }
}
