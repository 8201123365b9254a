//! Value and gradient of four states in one walk of the stars (the KL's sample points):
//! [`super::Backend::value_grad_field`] split in three, so that each star's window is read once for
//! all four states, as the averaged metric reads it ([`super::passes::MetricPixel`]). The
//! walk's own work per star (its window's bounds, the short last group, the lanes' final
//! additions) is then shared by the four, which on a coarse chart's short windows is half of
//! a walk. Each state's arithmetic is [`super::value_grad_pixels`]'s, in its order.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::fill_column;
use super::passes::EnergyQuad;
use crate::base::util::DisjointMut;
use crate::likelihood::core::{ModelCore, ModelWork, SampleField, StateSlot};
use crate::likelihood::lanes;
use crate::likelihood::quad::QuadColumns;
use crate::likelihood::state::State;

/// The most window entries per star (on average) at which four states are walked together:
/// the walk together saves each star's own work three times over but spends more per entry
/// (each entry's values broadcast to the four states' lanes, four states' columns in the
/// cache), so it pays on a coarse chart's short windows and not on long ones (measured in
/// docs/performance.md, "value and gradient of four states in one walk").
pub const TOGETHER_MAX_ENTRIES: usize = 32;

/// Whether the KL's states are walked four at a time on this rank's part of `m` (see
/// [`TOGETHER_MAX_ENTRIES`]; the model walks them together only where every rank does).
pub(super) fn together(m: &ModelCore) -> bool {
    m.data.windows.prob.len() <= TOGETHER_MAX_ENTRIES * m.data.len()
}

/// `st.s` and `st.rw` from the final chart's field (the first part of a value and
/// gradient).
pub(super) fn prepare(m: &ModelCore, field: SampleField<'_>, st: &mut State) {
    st.fields_on_host = true;
    let n = m.n_r();
    let (scl, off) = (st.scl, st.off);
    st.s.par_chunks_mut(n)
        .zip(st.rw.par_chunks_mut(n))
        .enumerate()
        .for_each(|(p, (sk, col))| fill_column(m, field, p, scl, off, sk, col));
}

/// One state's read-only parts and its writable per-star outputs, for the walk.
struct Parts<'a> {
    s: &'a [f64],
    rw: &'a [f64],
    scl: f64,
    sig: [&'a [f64]; 2],
    out: [DisjointMut<f64>; 3],
    slot: (DisjointMut<[f64; 2]>, DisjointMut<f64>),
}

/// The walk of four prepared states: their ā and σ_a², their final chart field cotangents
/// added into `field_bar` (state by state, in state order), and per state in `w.slots` each
/// pixel's [Σ s t, Σ t] and energy and each star's ξ_σ gradient less its prior term.
pub(super) fn walk(
    m: &ModelCore,
    states: &mut [State],
    field_bar: &mut [f64],
    w: &mut ModelWork,
) -> Result<()> {
    if states.len() != 4 {
        bail!("a walk of {} states (four at a time)", states.len());
    }
    let (npix, n_stars) = (m.npix(), m.data.len());
    // the KL's states share n_σ (copied from the first): read from one copy, the same bits
    let shared = states.iter().all(|s| s.sig_id == states[0].sig_id);
    w.slots.resize_with(4, StateSlot::default);
    let parts: Vec<Parts> = states
        .iter_mut()
        .zip(&mut w.slots)
        .map(|(st, slot)| {
            slot.pix_scalars.resize(npix, [0.0; 2]);
            slot.pix_energy.resize(npix, 0.0);
            slot.gsig.resize(n_stars, 0.0);
            let State {
                s,
                rw,
                scl,
                abar,
                var,
                nsig,
                dnsig,
                ..
            } = st;
            Parts {
                s,
                rw,
                scl: *scl,
                sig: [nsig, dnsig],
                out: [
                    DisjointMut::new(abar),
                    DisjointMut::new(var),
                    DisjointMut::new(&mut slot.gsig),
                ],
                slot: (
                    DisjointMut::new(&mut slot.pix_scalars),
                    DisjointMut::new(&mut slot.pix_energy),
                ),
            }
        })
        .collect();
    let n = m.n_r();
    let bar = DisjointMut::new(field_bar);
    (0..npix).into_par_iter().for_each_init(
        || QuadColumns::new(n),
        |q, p| pixel(m, (&parts, &bar), shared, p, q),
    );
    Ok(())
}

/// The walk's pass over pixel `p` for the four states of `parts` (`q` its scratch), their
/// field cotangents added into `bar`, their n_σ read from the first's when `shared_sig`
/// (equal bit for bit).
fn pixel(
    m: &ModelCore,
    (parts, bar): (&[Parts], &DisjointMut<f64>),
    shared_sig: bool,
    p: usize,
    q: &mut QuadColumns,
) {
    let (n, nc, pad) = (m.n_r(), m.n_chart(), m.padding());
    let cols = p * n..(p + 1) * n;
    // the columns and inner columns as `inner_columns` forms them, lane by lane
    let mut c = [0.0; 4];
    for k in 0..n {
        let mut r = [0.0; 4];
        for s in 0..4 {
            r[s] = parts[s].rw[cols.start + k];
        }
        (q.r[k], q.c[k]) = (r, c);
        for s in 0..4 {
            c[s] += r[s];
        }
    }
    q.c[n] = c;
    q.rb.fill([0.0; 4]);
    q.cb.fill([0.0; 4]);
    let (lo, hi) = (m.data.offsets[p], m.data.offsets[p + 1]);
    // SAFETY: star ranges of distinct pixels are disjoint
    let out = std::array::from_fn(|s| {
        let [a, v, g] = &parts[s].out;
        unsafe {
            [
                a.chunk(lo, hi - lo),
                v.chunk(lo, hi - lo),
                g.chunk(lo, hi - lo),
            ]
        }
    });
    let sig = std::array::from_fn(|s| parts[if shared_sig { 0 } else { s }].sig);
    let e = lanes::dispatch(EnergyQuad {
        m,
        sig,
        stars: lo..hi,
        q: &mut *q,
        out,
    });
    q.fold_bars();
    // SAFETY: each pixel writes its own chunk of the field
    let sbar = unsafe { bar.chunk(p * nc + pad, n) };
    for (s, part) in parts.iter().enumerate() {
        let (scalars, energy) = &part.slot;
        // SAFETY: each pixel writes its own entries
        let (sc, en) = unsafe { (scalars.chunk(p, 1), energy.chunk(p, 1)) };
        let (mut g_scl, mut g_off) = (0.0, 0.0);
        for k in 0..n {
            let t = q.rb[k][s] * part.rw[cols.start + k];
            sbar[k] += part.scl * t;
            g_scl += part.s[cols.start + k] * t;
            g_off += t;
        }
        (sc[0], en[0]) = ([g_scl, g_off], e[s]);
    }
}

/// The rest of a value and gradient for state `k` of the last walk: the ξ_σ gradient with
/// its prior term `xsig` into `gsig`; returns [energy, ∂E/∂scale, ∂E/∂offset].
pub(super) fn finish(
    m: &ModelCore,
    k: usize,
    xsig: &[f64],
    gsig: &mut [f64],
    w: &mut ModelWork,
) -> Result<[f64; 3]> {
    let Some(slot) = w.slots.get(k) else {
        bail!("no state {k} in the last walk");
    };
    if m.infer_nsigma {
        gsig.par_iter_mut()
            .zip(&slot.gsig)
            .zip(xsig)
            .for_each(|((g, &t), &x)| *g = t + x);
    } else {
        gsig.par_iter_mut().for_each(|g| *g = 0.0);
    }
    let [g_scl, g_off] = m.dom.pixel_sum2(&slot.pix_scalars);
    Ok([m.dom.pixel_sum(&slot.pix_energy), g_scl, g_off])
}
