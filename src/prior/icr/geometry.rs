//! Angular geometry of ICR refinement sites: the 9-pixel coarse window of every coarse
//! pixel (with the fixed rule for the missing neighbour at base-pixel corners), its 4 NESTED
//! children, and the deduplication of congruent windows into angular classes.

use std::collections::HashMap;

use crate::sphere::grid;

/// Coarse windows and angular classes of one refinement level.
#[derive(Clone, Debug)]
pub struct LevelGeometry {
    /// nside of the coarse level.
    pub nside: u32,
    /// Per coarse pixel: [centre, SW, W, NW, N, NE, E, SE, S] (NESTED indices).
    pub window: Vec<[u32; 9]>,
    /// Per coarse pixel: its angular class.
    pub class: Vec<u32>,
    /// One representative Gram matrix (13×13, window then children) per class.
    pub class_gram: Vec<[f64; 169]>,
}

/// The pixel standing in for a missing neighbour: among the neighbours of the window's
/// pixels that are not in the window yet, the one whose centre is nearest to where the
/// missing pixel would be (the centre reflected through the two adjacent compass neighbours,
/// `a + b − centre`); ties go to the smaller index. Never a duplicate, always deterministic.
fn substitute(nside: u32, window: &[Option<u64>; 9], slot: usize) -> u64 {
    let centre = window[0].expect("centre present");
    // slots 1..=8 are compass directions in a ring; neighbours in the ring flank `slot`
    let prev = if slot == 1 { 8 } else { slot - 1 };
    let next = if slot == 8 { 1 } else { slot + 1 };
    let vc = grid::pix2vec(nside, centre);
    let mut target = [0.0; 3];
    let flank: Vec<u64> = [prev, next].iter().filter_map(|&s| window[s]).collect();
    for k in 0..3 {
        target[k] = flank
            .iter()
            .map(|&p| grid::pix2vec(nside, p)[k])
            .sum::<f64>()
            - (flank.len() as f64 - 1.0) * vc[k];
    }
    let in_window = |q: u64| window.contains(&Some(q));
    let mut best: Option<(f64, u64)> = None;
    for w in window.iter().flatten() {
        for q in grid::neighbours(nside, *w).into_iter().flatten() {
            if in_window(q) {
                continue;
            }
            let v = grid::pix2vec(nside, q);
            let d = (0..3).map(|k| (v[k] - target[k]).powi(2)).sum::<f64>();
            if best.is_none_or(|(bd, bq)| d < bd - 1e-15 || (d <= bd + 1e-15 && q < bq)) {
                best = Some((d, q));
            }
        }
    }
    best.expect("a second-order neighbour always exists").1
}

/// The 9-pixel window of coarse pixel `p` at `nside`, corners filled by `substitute`.
pub fn window(nside: u32, p: u64) -> [u32; 9] {
    let nb = grid::neighbours(nside, p);
    let mut w: [Option<u64>; 9] = [None; 9];
    w[0] = Some(p);
    w[1..].copy_from_slice(&nb);
    for slot in 1..9 {
        if w[slot].is_none() {
            w[slot] = Some(substitute(nside, &w, slot));
        }
    }
    w.map(|q| q.expect("filled") as u32)
}

/// Gram matrix of the 13 unit vectors (9 window pixels at `nside`, 4 children at 2·nside).
pub fn gram(nside: u32, win: &[u32; 9]) -> [f64; 169] {
    let mut v = [[0.0; 3]; 13];
    for (a, &q) in win.iter().enumerate() {
        v[a] = grid::pix2vec(nside, q as u64);
    }
    for c in 0..4 {
        v[9 + c] = grid::pix2vec(2 * nside, 4 * win[0] as u64 + c as u64);
    }
    let mut g = [0.0; 169];
    for i in 0..13 {
        for j in 0..13 {
            g[i * 13 + j] = (0..3).map(|k| v[i][k] * v[j][k]).sum();
        }
    }
    g
}

impl LevelGeometry {
    /// Windows and classes for all coarse pixels at `nside`.
    pub fn new(nside: u32) -> Self {
        let npix = grid::npix(nside);
        let window: Vec<[u32; 9]> = (0..npix as u64).map(|p| window(nside, p)).collect();
        let mut lookup: HashMap<Vec<i64>, u32> = HashMap::new();
        let mut class = Vec::with_capacity(npix);
        let mut class_gram = Vec::new();
        for w in &window {
            let g = gram(nside, w);
            // congruent sites have equal Gram matrices up to rounding; 1e-10 groups them
            // safely while sites differing by more are kept apart
            let key: Vec<i64> = (0..13)
                .flat_map(|i| ((i + 1)..13).map(move |j| (i, j)))
                .map(|(i, j)| (g[i * 13 + j] * 1e10).round() as i64)
                .collect();
            let id = *lookup.entry(key).or_insert_with(|| {
                class_gram.push(g);
                (class_gram.len() - 1) as u32
            });
            class.push(id);
        }
        Self {
            nside,
            window,
            class,
            class_gram,
        }
    }

    /// Number of distinct angular classes.
    pub fn n_classes(&self) -> usize {
        self.class_gram.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_window_has_nine_distinct_pixels() {
        for nside in [1u32, 2, 4, 8, 16] {
            let mut corner_sites = 0;
            for p in 0..grid::npix(nside) as u64 {
                let w = window(nside, p);
                let mut s = w.to_vec();
                s.sort_unstable();
                s.dedup();
                assert_eq!(s.len(), 9, "nside {nside} pixel {p}: {w:?}");
                if grid::neighbours(nside, p).iter().any(Option::is_none) {
                    corner_sites += 1;
                }
            }
            // HEALPix: 24 pixels per nside ≥ 2 lack one neighbour (nside 1: 8 base corners)
            if nside > 1 {
                assert_eq!(corner_sites, 24, "nside {nside}");
            }
        }
    }

    #[test]
    fn classes_dedupe_congruent_windows() {
        let g = LevelGeometry::new(16);
        assert!(
            g.n_classes() < grid::npix(16) / 4,
            "{} classes",
            g.n_classes()
        );
        // members of one class really share their Gram matrix
        for (p, &c) in g.class.iter().enumerate().step_by(37) {
            let gp = gram(16, &g.window[p]);
            let gc = &g.class_gram[c as usize];
            assert!(gp.iter().zip(gc).all(|(a, b)| (a - b).abs() < 1e-9));
        }
    }
}
