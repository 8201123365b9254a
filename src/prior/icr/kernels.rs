//! The per-level kernels of the ICR forward and adjoint: the site products of a refinement
//! and their transpose, parallel over coarse pixels, and the halo exchanges of a step whose
//! coarse field is split across ranks. Allocation-free: every buffer comes from [`IcrWork`].
//!
//! [`IcrWork`]: super::IcrWork

use rayon::prelude::*;

use super::matrices::SITE_LEN;
use super::site::{prefetch, prefetch_head, sites_shared, MatEntry, Portable, SiteDots};
use super::Level;
use crate::base::comm;
use crate::base::simd::{self, WithSimd};
use crate::base::util::DisjointMut;

/// Refine one level: every coarse pixel's sites write its 4 children's fine columns.
pub(super) fn refine<T: MatEntry>(
    level: &Level,
    mats: &[T],
    coarse: &[f64],
    xi: &[f64],
    fine: &mut [f64],
) {
    let n_f = level.n_f;
    let fine = DisjointMut::new(fine);
    let class = &level.geom.class;
    // pixels grouped by angular class: the members of a class in a chunk share each site's
    // matrix while it is in L1
    level.by_class.par_chunks(8).for_each(|ps| {
        for run in ps.chunk_by(|&a, &b| class[a as usize] == class[b as usize]) {
            // SAFETY: every pixel occurs once in `by_class`, so the chunks are disjoint
            let outs = run
                .iter()
                .map(|&p| unsafe { fine.chunk(p as usize * 4 * n_f, 4 * n_f) });
            let mut out: [&mut [f64]; 8] = Default::default();
            for (o, c) in out.iter_mut().zip(outs) {
                *o = c;
            }
            simd::dispatch(RefineRun {
                level,
                mats,
                coarse,
                xi,
                run,
                out: &mut out[..run.len()],
            });
        }
    });
}

/// The sites of coarse pixels of one angular class, compiled for the widest instruction set
/// present.
struct RefineRun<'a, 'b, T> {
    level: &'a Level,
    mats: &'a [T],
    coarse: &'a [f64],
    xi: &'a [f64],
    run: &'a [u32],
    out: &'b mut [&'a mut [f64]],
}

impl<T: MatEntry> WithSimd for RefineRun<'_, '_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let RefineRun {
            level,
            mats,
            coarse,
            xi,
            run,
            out,
        } = self;
        let ns = level.n_sites_r();
        let class = level.geom.class[run[0] as usize] as usize;
        let mut buf = T::buf();
        for j in 0..ns {
            // the next site's matrix and excitations, and the fine columns' lines four sites
            // on, asked for ahead: a run of 8 pixels reads and writes about 40 streams at
            // once, more than the hardware's prefetchers follow, and inside an iteration
            // none of them is in cache (W1 forward with cold caches 9.3 → 6.8 ms)
            prefetch_next_site(mats, class, ns, j);
            if j + 1 < ns {
                for &p in run {
                    prefetch(&xi[(p as usize * ns + j + 1) * 8..][..8]);
                }
            }
            for o in out.iter() {
                prefetch_fine_ahead(o, level.n_f, j);
            }
            let m = T::site_f64(&mats[(class * ns + j) * SITE_LEN..][..SITE_LEN], &mut buf);
            let site = Site {
                level,
                coarse,
                xi,
                j,
            };
            for (ps, os) in run.chunks(4).zip(out.chunks_mut(4)) {
                match ps.len() {
                    4 => site.refine::<S, 4>(simd, m, ps, os),
                    3 => site.refine::<S, 3>(simd, m, ps, os),
                    2 => site.refine::<S, 2>(simd, m, ps, os),
                    _ => site.refine::<S, 1>(simd, m, ps, os),
                }
            }
        }
    }
}

/// Radial site `j` of a level, with the fields it reads.
#[derive(Clone, Copy)]
struct Site<'a> {
    level: &'a Level,
    coarse: &'a [f64],
    xi: &'a [f64],
    j: usize,
}

impl Site<'_> {
    /// Refine this site of `G` pixels of one class (site matrix `m`) into their fine columns.
    #[inline(always)]
    fn refine<S: pulp::Simd, const G: usize>(
        self,
        simd: S,
        m: &[f64],
        ps: &[u32],
        out: &mut [&mut [f64]],
    ) {
        let Site {
            level,
            coarse,
            xi,
            j,
        } = self;
        let (n_c, n_f, ns) = (level.n_c, level.n_f, level.n_sites_r());
        let mut v = [[0.0f64; 35]; G];
        for (vt, &p) in v.iter_mut().zip(ps) {
            let p = p as usize;
            for (a, &q) in level.geom.window[p].iter().enumerate() {
                let base = q as usize * n_c + j;
                vt[a * 3..a * 3 + 3].copy_from_slice(&coarse[base..base + 3]);
            }
            vt[27..].copy_from_slice(&xi[(p * ns + j) * 8..][..8]);
        }
        let mut acc = [[0.0f64; 8]; G];
        sites_shared(simd, m, &v, &mut acc);
        for (o, a) in out.iter_mut().zip(&acc) {
            for (r, &x) in a.iter().enumerate() {
                o[(r / 2) * n_f + 2 * j + (r % 2)] = x;
            }
        }
    }
}

/// Transpose of [`refine`], first half, for `V` cotangents at once: every local pixel's
/// window contributions into `scatter` (chunk p·9 + slot) and its excitations' cotangents,
/// each site matrix read once for all `V`.
pub(super) fn scatter_adjoint<T: MatEntry, const V: usize>(
    level: &Level,
    mats: &[T],
    fine_bar: [&[f64]; V],
    xi_bar: [&mut [f64]; V],
    scatter: [&mut [f64]; V],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return scatter_with(
            super::site::avx2::Dots(v3),
            level,
            mats,
            fine_bar,
            xi_bar,
            scatter,
        );
    }
    scatter_with(Portable, level, mats, fine_bar, xi_bar, scatter)
}

/// [`scatter_adjoint`] with the row dots of `d`.
pub(super) fn scatter_with<T: MatEntry, D: SiteDots, const V: usize>(
    d: D,
    level: &Level,
    mats: &[T],
    fine_bar: [&[f64]; V],
    xi_bar: [&mut [f64]; V],
    scatter: [&mut [f64]; V],
) {
    let (n_c, n_f, ns) = (level.n_c, level.n_f, level.n_sites_r());
    let (tp, xp) = (scatter.map(DisjointMut::new), xi_bar.map(DisjointMut::new));
    // SAFETY (both): every pixel occurs once in `by_class` and a chunk of `par_chunks` is
    // one thread's, so a pixel's chunks are touched by that thread alone
    let chunks = |q: usize| -> [(&mut [f64], &mut [f64]); V] {
        std::array::from_fn(|t| unsafe {
            (
                tp[t].chunk(q * 9 * n_c, 9 * n_c),
                xp[t].chunk(q * ns * 8, ns * 8),
            )
        })
    };
    level.by_class.par_chunks(8).for_each(|ps| {
        for (k, &p) in ps.iter().enumerate() {
            let p = p as usize;
            // the first lines of the next pixel's cotangents and output chunks on their way
            // meanwhile, the rest a few sites ahead below: inside an iteration they are in
            // memory, not in cache (W1 adjoint with cold caches 12.2 → 8.9 ms)
            if let Some(&q) = ps.get(k + 1) {
                let q = q as usize;
                // the next pixel's borrows, dropped at once, overlap no live one (q ≠ p)
                for (fb, next) in fine_bar.iter().zip(chunks(q)) {
                    prefetch_heads(level, &fb[4 * q * n_f..4 * (q + 1) * n_f], next);
                }
            }
            let mut out = chunks(p);
            let fb = fine_bar.map(|fb| &fb[4 * p * n_f..4 * (p + 1) * n_f]);
            let class = level.geom.class[p] as usize;
            d.run(|| scatter_pixel(d, level, &mats[class * ns * SITE_LEN..], fb, &mut out));
        }
    });
}

/// One coarse pixel of [`scatter_with`]: its sites' row dots (site matrices `mats`, from
/// its class's first) with each of the `V` fine cotangents `fb`, into each one's window
/// chunks and excitation cotangents `out`.
#[inline(always)]
fn scatter_pixel<T: MatEntry, D: SiteDots, const V: usize>(
    d: D,
    level: &Level,
    mats: &[T],
    fb: [&[f64]; V],
    out: &mut [(&mut [f64], &mut [f64]); V],
) {
    let (n_c, n_f, ns) = (level.n_c, level.n_f, level.n_sites_r());
    // the row dots of the last three sites: window value i of a slot sums the dots of sites
    // i − 2, i − 1 and i (in that order), so it is written once, when site i is done,
    // instead of being added to in memory three times
    let mut r = [[[0.0f64; 36]; 3]; V];
    let finish = |t: &mut [f64], r: &[[f64; 36]; 3], i: usize| {
        for a in 0..9 {
            let mut v = 0.0;
            for dj in (0..3).rev() {
                if (dj..ns + dj).contains(&i) {
                    v += r[(i - dj) % 3][a * 3 + dj];
                }
            }
            t[a * n_c + i] = v;
        }
    };
    for j in 0..ns {
        prefetch_next_site(mats, 0, ns, j);
        let m = &mats[j * SITE_LEN..][..SITE_LEN];
        for ((fb, (t, xb)), r) in fb.iter().zip(out.iter_mut()).zip(&mut r) {
            prefetch_fine_ahead(fb, n_f, j);
            if j + 2 < ns {
                prefetch(&xb[(j + 2) * 8..][..8]);
            }
            if j.is_multiple_of(8) && j + 8 < n_c {
                for a in 0..9 {
                    prefetch(&t[a * n_c + j + 8..][..1]);
                }
            }
            let g: [f64; 8] = std::array::from_fn(|o| fb[(o / 2) * n_f + 2 * j + (o % 2)]);
            d.dots(m, &g, &mut r[j % 3]);
            xb[j * 8..j * 8 + 8].copy_from_slice(&r[j % 3][27..35]);
            if j >= 2 {
                let (r0, r1, r2) = (&r[j % 3], &r[(j + 2) % 3], &r[(j + 1) % 3]);
                for a in 0..9 {
                    t[a * n_c + j] = ((0.0 + r2[a * 3 + 2]) + r1[a * 3 + 1]) + r0[a * 3];
                }
            } else {
                finish(t, r, j);
            }
        }
    }
    for ((t, _), r) in out.iter_mut().zip(&r) {
        finish(t, r, ns);
        finish(t, r, ns + 1);
    }
}

/// The matrix of site `j + 1` of angular class `class` (`ns` sites), if there is one.
#[inline(always)]
fn prefetch_next_site<T: MatEntry>(mats: &[T], class: usize, ns: usize, j: usize) {
    if j + 1 < ns {
        prefetch(&mats[(class * ns + j + 1) * SITE_LEN..][..SITE_LEN]);
    }
}

/// At every fourth site `j`, the lines four sites on of a pixel's four fine columns `cols`
/// (`n_f` values each, two per site: a line holds four sites' values).
#[inline(always)]
fn prefetch_fine_ahead(cols: &[f64], n_f: usize, j: usize) {
    if j.is_multiple_of(4) && 2 * (j + 4) < n_f {
        for c in 0..4 {
            prefetch(&cols[c * n_f + 2 * (j + 4)..][..1]);
        }
    }
}

/// The first lines of a pixel's fine cotangents `fb`, window chunks and excitation
/// cotangents, asked for before its sites (the rest come a few sites ahead in the site loop).
fn prefetch_heads(level: &Level, fb: &[f64], (t, xb): (&mut [f64], &mut [f64])) {
    for c in 0..4 {
        prefetch_head(&fb[c * level.n_f..], 8);
    }
    for a in 0..9 {
        prefetch_head(&t[a * level.n_c..], 8);
    }
    prefetch_head(xb, 16);
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
            // the next pixel's chunks lie anywhere in the 9 · n_c per pixel of `source`
            if q + 1 < n_out {
                let next = &level.rev[level.rev_off[q + 1] as usize..level.rev_off[q + 2] as usize];
                for &c in next {
                    prefetch(&source[c as usize * n_c..][..n_c]);
                }
            }
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
