//! The per-level kernels of the ICR forward and adjoint: the site products of a refinement
//! and their transpose, parallel over coarse pixels, and the halo exchanges of a step whose
//! coarse field is split across ranks. Allocation-free: every buffer comes from [`IcrWork`].
//!
//! [`IcrWork`]: super::IcrWork

use rayon::prelude::*;

use super::matrices::SITE_LEN;
use super::Level;
use crate::base::comm;
use crate::base::util::DisjointMut;

/// Refine one level: every coarse pixel's sites write its 4 children's fine columns.
pub(super) fn refine<T: Copy + Into<f64> + Sync>(
    level: &Level,
    mats: &[T],
    coarse: &[f64],
    xi: &[f64],
    fine: &mut [f64],
) {
    let (n_c, n_f, ns) = (level.n_c, level.n_f, level.n_sites_r());
    let fine = DisjointMut::new(fine);
    // pixels grouped by angular class: a class's matrices stay in cache for all its members
    level.by_class.par_chunks(8).for_each(|ps| {
        for &p in ps {
            let p = p as usize;
            // SAFETY: every pixel occurs once in `by_class`, so the chunks are disjoint
            let out = unsafe { fine.chunk(p * 4 * n_f, 4 * n_f) };
            let win = &level.geom.window[p];
            let class = level.geom.class[p] as usize;
            let mut c = [0.0f64; 27];
            for j in 0..ns {
                for (a, &q) in win.iter().enumerate() {
                    let base = q as usize * n_c + j;
                    c[a * 3..a * 3 + 3].copy_from_slice(&coarse[base..base + 3]);
                }
                let m = &mats[(class * ns + j) * SITE_LEN..][..SITE_LEN];
                let x = &xi[(p * ns + j) * 8..][..8];
                let mut acc = [0.0f64; 8];
                for (k, row) in m.chunks_exact(8).enumerate() {
                    // rows 0..27 multiply the coarse values, rows 27..35 the excitations
                    let v = if k < 27 { c[k] } else { x[k - 27] };
                    for o in 0..8 {
                        acc[o] += row[o].into() * v;
                    }
                }
                for (o, a) in acc.iter().enumerate() {
                    out[(o / 2) * n_f + 2 * j + (o % 2)] = *a;
                }
            }
        }
    });
}

/// Transpose of [`refine`], first half: every local pixel's window contributions into
/// `scatter` (chunk p·9 + slot) and its excitations' cotangents.
pub(super) fn scatter_adjoint<T: Copy + Into<f64> + Sync>(
    level: &Level,
    mats: &[T],
    fine_bar: &[f64],
    xi_bar: &mut [f64],
    scatter: &mut [f64],
) {
    let (n_c, n_f, ns) = (level.n_c, level.n_f, level.n_sites_r());
    let (tp, xp) = (DisjointMut::new(scatter), DisjointMut::new(xi_bar));
    level.by_class.par_chunks(8).for_each(|ps| {
        for &p in ps {
            let p = p as usize;
            // SAFETY: every pixel occurs once in `by_class`, so the chunks are disjoint
            let (t, xb) = unsafe { (tp.chunk(p * 9 * n_c, 9 * n_c), xp.chunk(p * ns * 8, ns * 8)) };
            t.fill(0.0);
            let class = level.geom.class[p] as usize;
            let fb = &fine_bar[4 * p * n_f..4 * (p + 1) * n_f];
            for j in 0..ns {
                let mut g = [0.0f64; 8];
                for (o, gv) in g.iter_mut().enumerate() {
                    *gv = fb[(o / 2) * n_f + 2 * j + (o % 2)];
                }
                let m = &mats[(class * ns + j) * SITE_LEN..][..SITE_LEN];
                let x = &mut xb[j * 8..j * 8 + 8];
                let dot = |k: usize| -> f64 {
                    let row = &m[k * 8..k * 8 + 8];
                    let p: [f64; 8] = std::array::from_fn(|o| row[o].into() * g[o]);
                    // a balanced tree instead of a sequential chain: independent adds
                    // that vectorise (float sums are not reassociated by the compiler)
                    ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
                };
                for (q, xq) in x.iter_mut().enumerate() {
                    *xq = dot(27 + q);
                }
                for a in 0..9 {
                    for dj in 0..3 {
                        t[a * n_c + j + dj] += dot(a * 3 + dj);
                    }
                }
            }
        }
    });
}

/// Transpose of [`refine`], second half: each coarse cotangent sums its window chunks in the
/// fixed reverse-map order, so no two threads write the same value.
pub(super) fn gather_adjoint(level: &Level, source: &[f64], coarse_bar: &mut [f64]) {
    let n_c = level.n_c;
    let n_out = level.rev_off.len() - 1;
    coarse_bar[..n_out * n_c]
        .par_chunks_mut(n_c)
        .enumerate()
        .for_each(|(q, out)| {
            out.fill(0.0);
            for &c in &level.rev[level.rev_off[q] as usize..level.rev_off[q + 1] as usize] {
                let t = &source[c as usize * n_c..][..n_c];
                for (o, v) in out.iter_mut().zip(t) {
                    *o += v;
                }
            }
        });
}

/// Fill the halo rows of a coarse field (after the owned rows) from their owners.
pub(super) fn exchange_halo(level: &Level, coarse: &mut [f64], send: &mut Vec<f64>) {
    let (n_c, n_own) = (level.n_c, level.npix_c());
    send.clear();
    for &q in &level.ex.halo_send {
        send.extend_from_slice(&coarse[q as usize * n_c..][..n_c]);
    }
    let halo = &mut coarse[n_own * n_c..(n_own + level.halo.len()) * n_c];
    comm::all_to_all_into(send, &level.counts[0], &level.counts[1], halo);
}

/// Send the window chunks of foreign coarse pixels to their owners; what arrives lands
/// after the local chunks of `scatter`.
pub(super) fn exchange_back(level: &Level, scatter: &mut [f64], send: &mut Vec<f64>) {
    let n_c = level.n_c;
    let n_local = 9 * level.npix_c() * n_c;
    send.clear();
    for &c in &level.ex.back_send {
        send.extend_from_slice(&scatter[c as usize * n_c..][..n_c]);
    }
    let n_recv: usize = level.counts[3].iter().sum();
    let out = &mut scatter[n_local..n_local + n_recv];
    comm::all_to_all_into(send, &level.counts[2], &level.counts[3], out);
}
