//! The star walks of four states at once, one state in each lane of a vector: the averaged
//! metric walks every star's window once for each of its states, and with the states side by
//! side a window entry is read and widened once for all four, and the per-state work of a
//! star (its window's bounds, the short last group, the lanes' final additions, the Fisher
//! weighting) is done for four states in one go. Each lane computes exactly the operations
//! of [`super::response::jvp`] and [`super::response::vjp`] for its state, in their order —
//! entry `j` of a window added into partial sum `j mod LANES` as there — so results are
//! bit-identical to walking the states one by one (tested below). A closure is not compiled
//! for the dispatched instruction set unless it is inlined; `array::from_fn`'s over the lanes
//! were not (a call per star), so per-star lane loops are written out.

use super::lanes::{QuadOps, LANES};
use super::response::kept;
use super::windows::Window;

/// One value per state of a block of four.
pub(super) type Quad = [f64; 4];

/// The columns of four states at one pixel, interleaved by shell (`r[k][s]`: state `s`'s
/// value at shell `k`), with their tangents and the cotangents the walks add into.
#[derive(Clone)]
pub(super) struct QuadColumns {
    /// Extinction per shell `ρ Δr` (n values).
    pub r: Vec<Quad>,
    /// Inner columns (n + 1 values).
    pub c: Vec<Quad>,
    /// Tangent of `r`.
    pub dr: Vec<Quad>,
    /// Tangent of `c`.
    pub dc: Vec<Quad>,
    /// Cotangent of `r`.
    pub rb: Vec<Quad>,
    /// Cotangent of `c`.
    pub cb: Vec<Quad>,
}

impl QuadColumns {
    /// Room for columns of `n` shells.
    pub(super) fn new(n: usize) -> Self {
        let z = |len| vec![[0.0; 4]; len];
        Self {
            r: z(n),
            c: z(n + 1),
            dr: z(n),
            dc: z(n + 1),
            rb: z(n),
            cb: z(n + 1),
        }
    }
}

impl QuadColumns {
    /// The inner columns' cotangents folded into the column's, lane by lane
    /// ([`super::response::finish_vjp`] for each state).
    #[inline(always)]
    pub(super) fn fold_bars(&mut self) {
        let n = self.r.len();
        let mut acc = self.cb[n];
        for k in (0..n).rev() {
            for s in 0..4 {
                self.rb[k][s] += acc[s];
                acc[s] += self.cb[k][s];
            }
        }
    }
}

/// One entry's share of the tangent sums, four states at once: the operations of
/// `lanes::tangent_terms`, lane by lane, for the entry `e` and the columns `[r, c, dr, dc]`
/// at its shell.
#[inline(always)]
fn tangent_entry<O: QuadOps>(o: O, [p, f, h]: [O::V; 3], col: [&Quad; 4], xy: &mut [O::V; 2]) {
    let [r, c0, dr, dc0] = col.map(|v| o.load(v));
    let c = o.mul_add(r, f, c0);
    let dc = o.mul_add(dr, f, dc0);
    let spread = o.mul(o.mul(r, dr), h);
    xy[0] = o.add(xy[0], o.mul(p, dc));
    xy[1] = o.add(xy[1], o.mul(p, o.mul_add(c, dc, spread)));
}

/// The tangents `(δā, δσ_a²)` of one star for four states (their columns, tangents and
/// means `abar` in `q`'s lanes): [`super::response::jvp`] for each lane.
#[inline(always)]
pub(super) fn jvp<O: QuadOps>(o: O, win: &Window<'_>, q: &QuadColumns, abar: Quad) -> (Quad, Quad) {
    let (da, dm) = sums::<O, false>(o, win, q);
    let mut dv = [0.0; 4];
    for s in 0..4 {
        dv[s] = 2.0 * dm[s] - 2.0 * win.kappa * abar[s] * da[s];
    }
    (da, dv)
}

/// ā and σ_a² of one star for four states (their columns in `q`'s lanes; `q.dr` and `q.dc`
/// are not read): [`super::response::moments`] for each lane.
#[inline(always)]
pub(super) fn moments<O: QuadOps>(o: O, win: &Window<'_>, q: &QuadColumns) -> (Quad, Quad) {
    let (a, m) = sums::<O, true>(o, win, q);
    let mut v = [0.0; 4];
    for s in 0..4 {
        v[s] = m[s] - win.kappa * a[s] * a[s];
    }
    (a, v)
}

/// The window sums `(Σ p δc̃, Σ p (c̃ δc̃ + r δr h))` of one star for four states: those of
/// `response::window_sums` for each lane, the "beyond the grid" bin included; with `OWN`,
/// for the columns as their own tangents (the moments' sums, without reading `q.dr`, `q.dc`).
#[inline(always)]
fn sums<O: QuadOps, const OWN: bool>(o: O, win: &Window<'_>, q: &QuadColumns) -> (Quad, Quad) {
    let n = q.r.len();
    let k = kept(win, n);
    let len = k.p.len();
    let kr = k.shells();
    let (r, c) = (&q.r[kr.clone()], &q.c[kr.clone()]);
    let (dr, dc) = if OWN {
        (r, c)
    } else {
        (&q.dr[kr.clone()], &q.dc[kr])
    };
    let col = |j: usize| [&r[j], &c[j], &dr[j], &dc[j]];
    let full = len - len % LANES;
    let zero = o.splat(0.0);
    let mut acc = [[zero; 2]; LANES];
    for j in (0..full).step_by(LANES) {
        let g = o.group(k.entries(j));
        for (l, (acc, e)) in acc.iter_mut().zip(g).enumerate() {
            tangent_entry(o, e, col(j + l), acc);
        }
    }
    for j in full..len {
        let e = o.entry(k.p[j], k.f[j], k.h[j]);
        tangent_entry(o, e, col(j), &mut acc[j - full]);
    }
    let total = |i: usize| {
        let [a, b, c, d] = acc.map(|a| a[i]);
        o.add(o.add(a, b), o.add(c, d))
    };
    let mut x = [0.0; 4];
    let mut y = [0.0; 4];
    o.store(&mut x, total(0));
    o.store(&mut y, total(1));
    if k.beyond {
        let pj = f64::from(win.prob[win.prob.len() - 1]);
        let dc_n = if OWN { &q.c[n] } else { &q.dc[n] };
        for s in 0..4 {
            x[s] += pj * dc_n[s];
            y[s] += pj * q.c[n][s] * dc_n[s];
        }
    }
    (x, y)
}

/// One entry's share of the cotangents, four states at once: the operations of the loop of
/// [`super::response::vjp`], lane by lane, for the entry `[p, f, h]`, the star's
/// `[base, 2 gv]`, and the columns `[r, c]` and cotangents `[rb, cb]` of its shell `j`.
#[inline(always)]
fn cotangent_entry<O: QuadOps>(
    o: O,
    [p, f, h]: [O::V; 3],
    [base, two_gv]: [O::V; 2],
    [r, c]: [&[Quad]; 2],
    [rb, cb]: [&mut [Quad]; 2],
    j: usize,
) {
    let (r, c0) = (o.load(&r[j]), o.load(&c[j]));
    let c = o.mul_add(r, f, c0);
    let w = o.mul(p, o.mul_add(two_gv, c, base));
    let cb_j = o.add(o.load(&cb[j]), w);
    o.store(&mut cb[j], cb_j);
    let spread = o.mul(o.mul(o.mul(two_gv, p), r), h);
    let rb_j = o.add(o.load(&rb[j]), o.mul_add(w, f, spread));
    o.store(&mut rb[j], rb_j);
}

/// [`super::response::vjp`] for four states: cotangents `[ga, gv]` on ā and σ_a² of one
/// star, accumulated into `q.rb` and `q.cb`.
#[inline(always)]
pub(super) fn vjp<O: QuadOps>(
    o: O,
    win: &Window<'_>,
    q: &mut QuadColumns,
    abar: Quad,
    [ga, gv]: [Quad; 2],
) {
    let n = q.r.len();
    let k = kept(win, n);
    let (mut base, mut two_gv) = ([0.0; 4], [0.0; 4]);
    for s in 0..4 {
        base[s] = ga[s] - 2.0 * gv[s] * win.kappa * abar[s];
        two_gv[s] = 2.0 * gv[s];
    }
    let (base_v, two_gv_v) = (o.load(&base), o.load(&two_gv));
    let kr = k.shells();
    let (r, c) = (&q.r[kr.clone()], &q.c[kr.clone()]);
    let (rb, cb) = (&mut q.rb[kr.clone()], &mut q.cb[kr]);
    let len = k.p.len();
    let full = len - len % LANES;
    let star = [base_v, two_gv_v];
    for j in (0..full).step_by(LANES) {
        for (l, e) in o.group(k.entries(j)).into_iter().enumerate() {
            cotangent_entry(o, e, star, [r, c], [&mut *rb, &mut *cb], j + l);
        }
    }
    for j in full..len {
        let e = o.entry(k.p[j], k.f[j], k.h[j]);
        cotangent_entry(o, e, star, [r, c], [&mut *rb, &mut *cb], j);
    }
    if k.beyond {
        let pj = f64::from(win.prob[win.prob.len() - 1]);
        for s in 0..4 {
            q.cb[n][s] += pj * (base[s] + two_gv[s] * q.c[n][s]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::likelihood::lanes::{dispatch, Lanes, LanesOp, Portable, PortableQuad};
    use crate::likelihood::response::{self, inner_columns};
    use crate::likelihood::windows::Windows;
    use crate::sphere::grid::Shells;

    /// Four states' columns and tangents of all magnitudes, some negative, on `n` shells.
    fn columns(n: usize, seed: u64) -> ([Vec<f64>; 4], [Vec<f64>; 4], QuadColumns) {
        use rand::Rng;
        let mut rng = crate::base::rng::stream(seed, 3);
        let mut q = QuadColumns::new(n);
        let mut cols: [Vec<f64>; 4] = Default::default();
        let mut tans: [Vec<f64>; 4] = Default::default();
        for s in 0..4 {
            cols[s] = (0..n)
                .map(|_| rng.random::<f64>() * 10f64.powi(rng.random_range(-3..3)))
                .collect();
            tans[s] = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
        }
        for s in 0..4 {
            let (mut cum, mut dcum) = (vec![0.0; n + 1], vec![0.0; n + 1]);
            inner_columns(&cols[s], &mut cum);
            inner_columns(&tans[s], &mut dcum);
            for k in 0..=n {
                if k < n {
                    q.r[k][s] = cols[s][k];
                    q.dr[k][s] = tans[s][k];
                }
                q.c[k][s] = cum[k];
                q.dc[k][s] = dcum[k];
            }
        }
        (cols, tans, q)
    }

    /// Every star of `w` walked with `o` on the columns of `q`: each star's tangents, and
    /// the cotangents of made-up star cotangents accumulated into `q`.
    fn walk_all<O: QuadOps>(o: O, w: &Windows, q: &mut QuadColumns) -> Vec<[Quad; 4]> {
        (0..w.start.len())
            .map(|i| {
                let win = w.of(i);
                let abar: Quad = std::array::from_fn(|s| 0.3 * s as f64 + 0.1 * i as f64);
                let (da, dv) = jvp(o, &win, q, abar);
                let ga: Quad = std::array::from_fn(|s| da[s] * 0.7 - 0.2);
                let gv: Quad = std::array::from_fn(|s| dv[s] * 1.3 + 0.1);
                vjp(o, &win, q, abar, [ga, gv]);
                [da, dv, ga, gv]
            })
            .collect()
    }

    /// [`walk_all`] with the widest instruction set present.
    struct Dispatched<'a>(&'a Windows, &'a mut QuadColumns);
    impl LanesOp for Dispatched<'_> {
        type Output = Vec<[Quad; 4]>;
        #[inline(always)]
        fn with_lanes<L: Lanes>(self, lanes: L) -> Self::Output {
            walk_all(lanes.quad(), self.0, self.1)
        }
    }

    #[test]
    fn four_states_at_once_give_the_bits_of_one_at_a_time() {
        let n = 40;
        let shells = Shells::log_uniform(40.0, 2000.0, n).unwrap();
        // windows of every length and position: near, far, inside, beyond, negative parallax
        let par = [
            25.0, 10.0, 4.0, 2.5, 1.2, 0.6, 0.5, -1.0, 3.0, 0.8, 1.6, 7.0,
        ];
        let err = [
            0.1, 2.0, 0.5, 0.1, 0.3, 0.02, 0.4, 0.2, 1e-4, 0.05, 0.9, 3.0,
        ];
        let w = Windows::new(&shells, &par, &err);
        for seed in 0..6 {
            let (cols, tans, q) = columns(n, seed);
            let cums: Vec<(Vec<f64>, Vec<f64>)> = (0..4)
                .map(|s| {
                    let (mut c, mut d) = (vec![0.0; n + 1], vec![0.0; n + 1]);
                    inner_columns(&cols[s], &mut c);
                    inner_columns(&tans[s], &mut d);
                    (c, d)
                })
                .collect();
            let (mut qp, mut qd) = (q.clone(), q);
            let portable = walk_all(PortableQuad, &w, &mut qp);
            let dispatched = dispatch(Dispatched(&w, &mut qd));
            let mut bars: Vec<(Vec<f64>, Vec<f64>)> =
                (0..4).map(|_| (vec![0.0; n], vec![0.0; n + 1])).collect();
            for (i, (got, other)) in portable.iter().zip(&dispatched).enumerate() {
                let [da, dv, ga, gv] = *got;
                let bits = |q: &[Quad; 4]| q.map(|v| v.map(f64::to_bits));
                assert_eq!(bits(got), bits(other), "star {i}: portable vs dispatched");
                let win = w.of(i);
                let abar = 0.1 * i as f64;
                for s in 0..4 {
                    let (c, d) = &cums[s];
                    let col = [&cols[s][..], &c[..]];
                    let tan = [&tans[s][..], &d[..]];
                    let (a1, v1) = response::jvp(Portable, win, col, tan, 0.3 * s as f64 + abar);
                    assert_eq!(a1.to_bits(), da[s].to_bits(), "star {i} state {s}");
                    assert_eq!(v1.to_bits(), dv[s].to_bits(), "star {i} state {s}");
                    let (rb, cb) = &mut bars[s];
                    let abar_s = 0.3 * s as f64 + abar;
                    response::vjp(win, col, abar_s, [ga[s], gv[s]], [rb, cb]);
                }
            }
            for (q, which) in [(&qp, "portable"), (&qd, "dispatched")] {
                for s in 0..4 {
                    for k in 0..=n {
                        if k < n {
                            let (a, b) = (q.rb[k][s], bars[s].0[k]);
                            assert_eq!(a.to_bits(), b.to_bits(), "{which} rb {k} {s}");
                        }
                        let (a, b) = (q.cb[k][s], bars[s].1[k]);
                        assert_eq!(a.to_bits(), b.to_bits(), "{which} cb {k} {s}");
                    }
                }
            }
        }
    }
}
