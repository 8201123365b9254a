//! What one rank does at one refinement step: which coarse pixels it refines, where each
//! window value sits in its local coarse array, which halo pixels it receives from their
//! owners, and how the adjoint's window contributions travel back (docs/architecture.md).
//!
//! Every rank holds the global geometry of a level (it is small and deterministic), so both
//! sides of every exchange derive the same lists without negotiating them.
//!
//! Steps are of three kinds. *Replicated* (coarse nside < nside_dec): every rank refines
//! every pixel. *Gathered* (the first distributed step, its coarse field replicated): a
//! rank refines its own pixels; in the adjoint all window contributions are all-gathered so
//! every rank forms the whole coarse cotangent. *Halo* (coarse field distributed): a rank
//! receives the ring of foreign window pixels before refining and returns their
//! contributions afterwards. In every kind each coarse cotangent is summed over its windows
//! in the same (pixel, slot) order as on one process, so results agree bit for bit.

use std::ops::Range;

use super::geometry::LevelGeometry;
use crate::sphere::decomp::Decomp;

/// How a step is distributed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Every rank refines every coarse pixel.
    Replicated,
    /// Own pixels refined from a replicated coarse field; the adjoint all-gathers.
    Gathered,
    /// Own pixels refined from own + halo coarse pixels.
    Halo,
}

/// Exchange lists of a distributed step (empty on one rank).
#[derive(Clone, Debug, Default)]
pub struct Exchange {
    /// Forward: local coarse indices of owned pixels to send, grouped by destination rank.
    pub halo_send: Vec<u32>,
    /// Forward: pixels sent to each rank.
    pub halo_send_counts: Vec<usize>,
    /// Forward: halo pixels received from each rank (they follow the owned pixels).
    pub halo_recv_counts: Vec<usize>,
    /// Adjoint: local window-contribution chunks (p·9 + slot) to send, by destination.
    pub back_send: Vec<u32>,
    /// Adjoint: chunks sent to each rank.
    pub back_send_counts: Vec<usize>,
    /// Adjoint: chunks received from each rank (they follow the local chunks).
    pub back_recv_counts: Vec<usize>,
    /// Gathered steps: window-contribution chunks of every rank (9 per owned pixel).
    pub gather_counts: Vec<usize>,
}

/// The local view of one refinement step.
#[derive(Clone, Debug)]
pub struct StepPlan {
    /// Kind of step.
    pub kind: StepKind,
    /// Global coarse pixels this rank refines (a contiguous range).
    pub own: Range<usize>,
    /// Local geometry: windows as indices into the local coarse array, local classes.
    pub geom: LevelGeometry,
    /// Global class id of each local class (matrices are computed only for these).
    pub global_class: Vec<u32>,
    /// Halo pixels (global ids), after the owned ones in the local coarse array.
    pub halo: Vec<u32>,
    /// Coarse pixels whose cotangent this rank forms, and for each the chunks summed:
    /// `rev[rev_off[q]..rev_off[q + 1]]`, indices into [local chunks | received chunks]
    /// (or, for gathered steps, into the all-gathered chunks, global p·9 + slot).
    pub rev_off: Vec<u32>,
    /// See `rev_off`.
    pub rev: Vec<u32>,
    /// Exchange lists.
    pub ex: Exchange,
}

/// Windows that contain each pixel: `(p, slot)` in increasing (p, slot), CSR by pixel.
fn reverse_windows(window: &[[u32; 9]]) -> (Vec<u32>, Vec<(u32, u8)>) {
    let npix = window.len();
    let mut off = vec![0u32; npix + 1];
    for w in window {
        for &q in w {
            off[q as usize + 1] += 1;
        }
    }
    for i in 1..=npix {
        off[i] += off[i - 1];
    }
    let mut fill = off.clone();
    let mut rev = vec![(0u32, 0u8); 9 * npix];
    for (p, w) in window.iter().enumerate() {
        for (a, &q) in w.iter().enumerate() {
            rev[fill[q as usize] as usize] = (p as u32, a as u8);
            fill[q as usize] += 1;
        }
    }
    (off, rev)
}

/// Local classes of the pixels `own` of `g`, renumbered in order of first global id.
fn local_classes(g: &LevelGeometry, own: &Range<usize>) -> (Vec<u32>, Vec<u32>, Vec<[f64; 169]>) {
    let mut used: Vec<u32> = g.class[own.clone()].to_vec();
    used.sort_unstable();
    used.dedup();
    let local: Vec<u32> = g.class[own.clone()]
        .iter()
        .map(|c| used.binary_search(c).expect("class present") as u32)
        .collect();
    let grams = used.iter().map(|&c| g.class_gram[c as usize]).collect();
    (local, used, grams)
}

/// Plan of step `l` (coarse nside `nside`) on this rank; `coarse_distributed` says whether
/// the coarse field is itself split over ranks.
pub fn plan_step(global: LevelGeometry, d: &Decomp, coarse_distributed: bool) -> StepPlan {
    let nside = global.nside;
    let npix = global.window.len();
    let kind = if d.size() == 1 || nside < d.nside_dec {
        StepKind::Replicated
    } else if coarse_distributed {
        StepKind::Halo
    } else {
        StepKind::Gathered
    };
    let own = if kind == StepKind::Replicated {
        0..npix
    } else {
        d.pixels(nside)
    };
    let (goff, grev) = reverse_windows(&global.window);
    let (class, global_class, class_gram) = local_classes(&global, &own);
    let mut plan = StepPlan {
        kind,
        own: own.clone(),
        geom: LevelGeometry {
            nside,
            window: global.window[own.clone()].to_vec(),
            class,
            class_gram,
        },
        global_class,
        halo: Vec::new(),
        rev_off: Vec::new(),
        rev: Vec::new(),
        ex: Exchange::default(),
    };
    match kind {
        StepKind::Replicated => {
            plan.rev_off = goff;
            plan.rev = grev.iter().map(|&(p, a)| p * 9 + a as u32).collect();
        }
        StepKind::Gathered => {
            plan.rev_off = goff;
            plan.rev = grev.iter().map(|&(p, a)| p * 9 + a as u32).collect();
            plan.ex.gather_counts = (0..d.size())
                .map(|r| 9 * d.pixels_of(r, nside).len())
                .collect();
        }
        StepKind::Halo => plan_halo(&mut plan, &global, &goff, &grev, d),
    }
    plan
}

/// Halo, local windows and both exchanges of a halo step.
fn plan_halo(
    plan: &mut StepPlan,
    global: &LevelGeometry,
    goff: &[u32],
    grev: &[(u32, u8)],
    d: &Decomp,
) {
    let size = d.size();
    let own = plan.own.clone();
    let halo = localise_windows(plan, global);
    let mut ex = Exchange {
        halo_recv_counts: vec![0; size],
        halo_send_counts: vec![0; size],
        back_send_counts: vec![0; size],
        back_recv_counts: vec![0; size],
        ..Default::default()
    };
    for &q in &halo {
        ex.halo_recv_counts[d.owner(global.nside, q as usize)] += 1;
    }
    let parts = RankGeometry {
        own: own.clone(),
        nside: global.nside,
        d,
        goff,
        grev,
    };
    parts.forward_sends(&mut ex);
    parts.adjoint_sends(&mut ex, global);
    let (rev_off, rev) = parts.reverse_map(&ex);
    plan.halo = halo;
    plan.rev_off = rev_off;
    plan.rev = rev;
    plan.ex = ex;
}

/// The foreign pixels of this rank's windows (sorted), and the windows renumbered to local
/// indices: own pixels first, then the halo.
fn localise_windows(plan: &mut StepPlan, global: &LevelGeometry) -> Vec<u32> {
    let own = plan.own.clone();
    let mut halo: Vec<u32> = own
        .clone()
        .flat_map(|p| global.window[p])
        .filter(|&q| !own.contains(&(q as usize)))
        .collect();
    halo.sort_unstable();
    halo.dedup();
    let n_own = own.len() as u32;
    let local = |q: u32| -> u32 {
        if own.contains(&(q as usize)) {
            q - own.start as u32
        } else {
            n_own
                + halo
                    .binary_search(&q)
                    .expect("every foreign window pixel is in the halo") as u32
        }
    };
    for w in plan.geom.window.iter_mut() {
        *w = w.map(local);
    }
    halo
}

/// What one rank's exchange plan is derived from: its pixels, the decomposition, and the
/// global reverse window map (`grev[goff[q]..goff[q+1]]` = the (pixel, slot) windows that
/// contain pixel q).
struct RankGeometry<'a> {
    own: std::ops::Range<usize>,
    nside: u32,
    d: &'a Decomp,
    goff: &'a [u32],
    grev: &'a [(u32, u8)],
}

impl RankGeometry<'_> {
    fn owner(&self, q: usize) -> usize {
        self.d.owner(self.nside, q)
    }

    /// The windows containing own pixel q.
    fn windows_of(&self, q: usize) -> &[(u32, u8)] {
        &self.grev[self.goff[q] as usize..self.goff[q + 1] as usize]
    }

    /// Forward: rank r needs my q when q lies in a window of one of r's pixels.
    fn forward_sends(&self, ex: &mut Exchange) {
        let (size, me) = (self.d.size(), self.d.rank);
        let mut need: Vec<Vec<u32>> = vec![Vec::new(); size];
        for q in self.own.clone() {
            for &(p, _) in self.windows_of(q) {
                let r = self.owner(p as usize);
                if r != me && need[r].last() != Some(&(q as u32)) {
                    need[r].push(q as u32);
                }
            }
        }
        for (r, qs) in need.iter().enumerate() {
            ex.halo_send_counts[r] = qs.len();
            ex.halo_send
                .extend(qs.iter().map(|&q| q - self.own.start as u32));
        }
    }

    /// Adjoint: my window chunks whose pixel another rank owns go back, ordered
    /// (q, p, slot); and the counts that arrive from each rank, in the same order.
    fn adjoint_sends(&self, ex: &mut Exchange, global: &LevelGeometry) {
        let (size, me) = (self.d.size(), self.d.rank);
        let mut back: Vec<Vec<(u32, u32)>> = vec![Vec::new(); size];
        for p in self.own.clone() {
            for (a, &q) in global.window[p].iter().enumerate() {
                let r = self.owner(q as usize);
                if r != me {
                    back[r].push((q, ((p - self.own.start) * 9 + a) as u32));
                }
            }
        }
        for (r, b) in back.iter_mut().enumerate() {
            b.sort_unstable();
            ex.back_send_counts[r] = b.len();
            ex.back_send.extend(b.iter().map(|&(_, c)| c));
        }
        for q in self.own.clone() {
            for &(p, _) in self.windows_of(q) {
                let r = self.owner(p as usize);
                if r != me {
                    ex.back_recv_counts[r] += 1;
                }
            }
        }
    }

    /// For every own pixel, where each of its window contributions sits: in this rank's
    /// 9-slot scatter rows, or after them in the block received from its owner.
    fn reverse_map(&self, ex: &Exchange) -> (Vec<u32>, Vec<u32>) {
        let me = self.d.rank;
        let mut recv_pos: Vec<usize> = ex
            .back_recv_counts
            .iter()
            .scan(9 * self.own.len(), |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let mut rev_off = vec![0u32];
        let mut rev = Vec::new();
        for q in self.own.clone() {
            for &(p, a) in self.windows_of(q) {
                let r = self.owner(p as usize);
                if r == me {
                    rev.push((p - self.own.start as u32) * 9 + a as u32);
                } else {
                    rev.push(recv_pos[r] as u32);
                    recv_pos[r] += 1;
                }
            }
            rev_off.push(rev.len() as u32);
        }
        (rev_off, rev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans of every rank of `size` for the step at coarse nside `nside`.
    fn plans(nside: u32, nside_dec: u32, size: usize, coarse_distributed: bool) -> Vec<StepPlan> {
        let n = 12 * (nside_dec as usize).pow(2);
        let work: Vec<f64> = (0..n).map(|q| 1.0 + (q % 5) as f64).collect();
        (0..size)
            .map(|r| {
                let d = Decomp::balanced(nside_dec, r, size, &work).unwrap();
                plan_step(LevelGeometry::new(nside), &d, coarse_distributed)
            })
            .collect()
    }

    #[test]
    fn halo_exchanges_are_symmetric_and_windows_local() {
        for size in [2, 3, 5] {
            let ps = plans(8, 2, size, true);
            let global = LevelGeometry::new(8);
            for (r, p) in ps.iter().enumerate() {
                assert_eq!(p.kind, StepKind::Halo);
                // every window value is an owned or a halo pixel, and means the same pixel
                let n_own = p.own.len();
                for (k, w) in p.geom.window.iter().enumerate() {
                    for (a, &i) in w.iter().enumerate() {
                        let i = i as usize;
                        let q = if i < n_own {
                            p.own.start + i
                        } else {
                            p.halo[i - n_own] as usize
                        };
                        assert_eq!(q as u32, global.window[p.own.start + k][a]);
                    }
                }
                for (s, o) in ps.iter().enumerate() {
                    // what r sends s is what s expects from r, both ways
                    assert_eq!(p.ex.halo_send_counts[s], o.ex.halo_recv_counts[r]);
                    assert_eq!(p.ex.back_send_counts[s], o.ex.back_recv_counts[r]);
                }
                assert_eq!(p.ex.halo_send_counts[r], 0);
                // each owned pixel's cotangent sums as many chunks as windows contain it
                for (k, q) in p.own.clone().enumerate() {
                    let n = global
                        .window
                        .iter()
                        .flatten()
                        .filter(|&&v| v as usize == q)
                        .count();
                    assert_eq!((p.rev_off[k + 1] - p.rev_off[k]) as usize, n);
                }
            }
            // the owned ranges tile the sky
            let total: usize = ps.iter().map(|p| p.own.len()).sum();
            assert_eq!(total, global.window.len());
        }
    }

    #[test]
    fn steps_coarser_than_the_patches_are_replicated() {
        let ps = plans(2, 4, 3, false);
        assert!(ps
            .iter()
            .all(|p| p.kind == StepKind::Replicated && p.own.len() == 48));
        let ps = plans(4, 4, 3, false);
        assert!(ps.iter().all(|p| p.kind == StepKind::Gathered));
        let chunks: usize = ps[0].ex.gather_counts.iter().sum();
        assert_eq!(chunks, 9 * 192);
    }
}
