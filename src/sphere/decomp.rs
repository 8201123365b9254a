//! Domain decomposition over HEALPix patches (docs/architecture.md) and the global reductions that
//! make results independent of the rank count.
//!
//! A patch is one NESTED pixel at `nside_dec`; at any finer nside it is a contiguous block
//! of pixels. Each rank owns a contiguous run of patches, so it owns one contiguous pixel
//! range at every level finer than `nside_dec`. Every global sum is formed as
//! `replicated part + Σ_patches partial_q` with each patch's partial summed in a fixed
//! order and the patches added in patch order — the same arithmetic on 1 or N ranks, so
//! results agree bit for bit.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::base::comm;
use crate::base::util::{det_sum_ranges, lane_dot, lane_sum, DisjointMut};

/// Which rank owns which patches.
#[derive(Clone, Debug, PartialEq)]
pub struct Decomp {
    /// nside of the patches.
    pub nside_dec: u32,
    /// This process's rank.
    pub rank: usize,
    /// Patch boundaries: rank r owns patches `bounds[r]..bounds[r + 1]`.
    pub bounds: Vec<usize>,
}

/// Whether the chart ended at `levels` refines its last step per patch of `nside_dec`
/// (rather than on every rank), as several ranks need: the step starts at nside(levels − 1).
pub fn last_refinement_distributed(
    chart: &crate::sphere::grid::Chart,
    levels: usize,
    nside_dec: u32,
) -> bool {
    levels > 0 && chart.nside(levels - 1) >= nside_dec
}

/// Default decomposition nside for a chart: 8 (768 patches, as the paper's 64 ranks need),
/// or the nside where the last refinement starts if that is coarser.
pub fn default_nside_dec(chart: &crate::sphere::grid::Chart) -> u32 {
    if chart.levels == 0 {
        return chart.nside(0);
    }
    8.min(chart.nside(chart.levels - 1))
}

impl Decomp {
    /// Everything on one rank.
    pub fn single(nside_dec: u32) -> Self {
        Self {
            nside_dec,
            rank: 0,
            bounds: vec![0, 12 * (nside_dec as usize).pow(2)],
        }
    }

    /// Split the patches over `size` ranks in contiguous runs of about equal `work` (one
    /// value per patch): rank r's run ends where the running total first reaches
    /// (r + 1)/size of the whole.
    pub fn balanced(nside_dec: u32, rank: usize, size: usize, work: &[f64]) -> Result<Self> {
        let n = 12 * (nside_dec as usize).pow(2);
        if work.len() != n {
            bail!("patch work has {} entries, expected {n}", work.len());
        }
        if size > n {
            bail!(
                "{size} ranks but only {n} patches at parallel.nside_dec = {nside_dec}: \
                 raise parallel.nside_dec (12·nside_dec² ≥ ranks) or use fewer ranks"
            );
        }
        let total: f64 = work.iter().sum();
        let mut bounds = vec![0usize];
        let mut acc = 0.0;
        let mut q = 0;
        for r in 0..size - 1 {
            let target = total * (r + 1) as f64 / size as f64;
            // leave at least one patch for every later rank
            let limit = n - (size - 1 - r);
            while q < limit && (acc + work[q] <= target || q < bounds[r] + 1) {
                acc += work[q];
                q += 1;
            }
            bounds.push(q);
        }
        bounds.push(n);
        Ok(Self {
            nside_dec,
            rank,
            bounds,
        })
    }

    /// Number of patches.
    pub fn n_patches(&self) -> usize {
        *self.bounds.last().expect("bounds")
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.bounds.len() - 1
    }

    /// True iff `b` is true on every rank of this decomposition.
    pub fn all(&self, b: bool) -> bool {
        if self.size() == 1 {
            b
        } else {
            comm::all(b)
        }
    }

    /// This rank's patches.
    pub fn patches(&self) -> Range<usize> {
        self.bounds[self.rank]..self.bounds[self.rank + 1]
    }

    /// Patches of rank `r`.
    pub fn patches_of(&self, r: usize) -> Range<usize> {
        self.bounds[r]..self.bounds[r + 1]
    }

    /// Pixels per patch at `nside` (≥ nside_dec).
    pub fn pixels_per_patch(&self, nside: u32) -> usize {
        debug_assert!(nside >= self.nside_dec);
        ((nside / self.nside_dec) as usize).pow(2)
    }

    /// Pixel range of rank `r` at `nside` (≥ nside_dec).
    pub fn pixels_of(&self, r: usize, nside: u32) -> Range<usize> {
        let k = self.pixels_per_patch(nside);
        self.bounds[r] * k..self.bounds[r + 1] * k
    }

    /// This rank's pixel range at `nside`.
    pub fn pixels(&self, nside: u32) -> Range<usize> {
        self.pixels_of(self.rank, nside)
    }

    /// Owner of pixel `p` at `nside` (≥ nside_dec).
    pub fn owner(&self, nside: u32, p: usize) -> usize {
        let q = p / self.pixels_per_patch(nside);
        self.bounds.partition_point(|&b| b <= q) - 1
    }
}

/// Global sum of a replicated part and per-patch partials (this rank's patches, in order):
/// `rep + Σ_q partial_q` over all patches in patch order, the same on every rank.
pub fn reduce<const K: usize>(d: &Decomp, rep: [f64; K], partials: &[[f64; K]]) -> [f64; K] {
    let v = reduce_rows(d, &rep, partials.as_flattened());
    std::array::from_fn(|k| v[k])
}

/// [`reduce`] for rows of any length `rep.len()`: `partials` holds this rank's patches'
/// rows one after another.
pub fn reduce_rows(d: &Decomp, rep: &[f64], partials: &[f64]) -> Vec<f64> {
    let k = rep.len();
    debug_assert_eq!(partials.len(), k * d.patches().len());
    let all: Vec<f64>;
    let flat: &[f64] = if d.size() == 1 {
        partials
    } else {
        let counts: Vec<usize> = (0..d.size()).map(|r| k * d.patches_of(r).len()).collect();
        all = comm::all_gather_f64(partials, &counts);
        &all
    };
    let mut acc = rep.to_vec();
    for c in flat.chunks_exact(k.max(1)) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc
}

/// Fill distributed vectors with draws of `sample`, the same values for any rank count:
/// the replicated entries from sub-stream 0 of random stream `stream`, patch q's entries
/// from sub-stream q + 1, each part's vectors in the order given. The patches' streams are
/// independent, so they are drawn in parallel (a W1 parameter vector holds 2.1 million
/// entries: drawn on one thread they took as long as an ICR forward).
pub fn fill_random(
    seed: u64,
    stream: u64,
    parts: &mut [(&VecLayout, &mut [f64])],
    sample: impl Fn(&mut rand_chacha::ChaCha8Rng) -> f64 + Sync,
) {
    let sub = |part: usize| crate::base::rng::stream(seed, (stream << 24) | part as u64);
    let mut rng = sub(0);
    for (layout, v) in parts.iter_mut() {
        for i in layout.rep.iter().flat_map(|r| r.clone()) {
            v[i] = sample(&mut rng);
        }
    }
    let Some((first, n_patch)) = parts
        .first()
        .map(|(l, _)| (l.decomp.patches().start, l.patch.len()))
    else {
        return;
    };
    let outs: Vec<(&VecLayout, DisjointMut<f64>)> = parts
        .iter_mut()
        .map(|(l, v)| (*l, DisjointMut::new(v)))
        .collect();
    (0..n_patch).into_par_iter().for_each(|k| {
        let mut rng = sub(first + k + 1);
        for (layout, v) in &outs {
            for r in &layout.patch[k] {
                // SAFETY: the index ranges of distinct patches are disjoint
                let out = unsafe { v.chunk(r.start, r.len()) };
                out.iter_mut().for_each(|o| *o = sample(&mut rng));
            }
        }
    });
}

/// How a distributed vector lies on this rank: index ranges every rank holds alike
/// (replicated) and, per owned patch, the ranges that belong to it.
#[derive(Clone, Debug)]
pub struct VecLayout {
    /// The decomposition.
    pub decomp: Arc<Decomp>,
    /// Replicated index ranges.
    pub rep: Vec<Range<usize>>,
    /// Per owned patch (in order), its index ranges.
    pub patch: Vec<Vec<Range<usize>>>,
    /// Local length.
    pub len: usize,
}

impl VecLayout {
    /// `Σ_i f(i)` over the whole distributed vector, in the fixed order.
    pub fn sum(&self, f: impl Fn(usize) -> f64 + Sync) -> f64 {
        self.sum_ranges(|r| lane_sum(r, &f))
    }

    /// The sum over the whole distributed vector of `g` of each of its index ranges, in the
    /// fixed order of [`VecLayout::sum`].
    fn sum_ranges(&self, g: impl Fn(Range<usize>) -> f64 + Sync) -> f64 {
        let rep: f64 = self.rep.iter().map(|r| g(r.clone())).sum();
        let parts: Vec<[f64; 1]> = self
            .patch
            .par_iter()
            .map(|rs| [rs.iter().map(|r| g(r.clone())).sum()])
            .collect();
        reduce(&self.decomp, [rep], &parts)[0]
    }

    /// Whether the replicated and the patches' ranges cover `0..len` exactly once.
    fn partitions(&self) -> bool {
        let mut all: Vec<&Range<usize>> =
            self.rep.iter().chain(self.patch.iter().flatten()).collect();
        all.sort_unstable_by_key(|r| r.start);
        let mut end = 0;
        for r in all.into_iter().filter(|r| !r.is_empty()) {
            if r.start != end {
                return false;
            }
            end = r.end;
        }
        end == self.len
    }

    /// Append `extra` ranges per patch (e.g. the per-star block of the KL parameters) after
    /// `offset`, extending the vector to `offset + extra_len`.
    pub fn extended(&self, offset: usize, extra: &[Range<usize>], extra_len: usize) -> Self {
        let mut out = self.clone();
        for (rs, e) in out.patch.iter_mut().zip(extra) {
            rs.push(offset + e.start..offset + e.end);
        }
        out.len = offset + extra_len;
        out
    }
}

/// Layouts of the vectors a model works with on this rank, and its pixel reductions.
#[derive(Clone, Debug)]
pub struct Domain {
    /// The decomposition.
    pub decomp: Arc<Decomp>,
    /// Parameter vector x = [ξ | ξ_scale | ξ_offset].
    pub x: VecLayout,
    /// Per-star vectors (ξ_σ, ā, …).
    pub stars: VecLayout,
    /// KL parameters [x | ξ_σ].
    pub p: VecLayout,
    /// Final-level pixels per patch.
    pub pix_per_patch: usize,
}

impl Domain {
    /// Layouts for parameter layout `x` and stars grouped by local pixel (`star_offsets`,
    /// one entry per local final pixel plus one).
    pub fn new(x: VecLayout, star_offsets: &[usize], pix_per_patch: usize) -> Self {
        let n_patch = x.patch.len();
        debug_assert_eq!(star_offsets.len(), n_patch * pix_per_patch + 1);
        let ranges: Vec<Range<usize>> = (0..n_patch)
            .map(|k| star_offsets[k * pix_per_patch]..star_offsets[(k + 1) * pix_per_patch])
            .collect();
        let n_stars = *star_offsets.last().unwrap_or(&0);
        let stars = VecLayout {
            decomp: x.decomp.clone(),
            rep: Vec::new(),
            patch: ranges.iter().map(|r| vec![r.clone()]).collect(),
            len: n_stars,
        };
        let p = x.extended(x.len, &ranges, n_stars);
        Self {
            decomp: x.decomp.clone(),
            x,
            stars,
            p,
            pix_per_patch,
        }
    }

    /// Global component sums of per-pixel pairs (local pixels, in order).
    pub fn pixel_sum2(&self, pix: &[[f64; 2]]) -> [f64; 2] {
        let parts: Vec<[f64; 2]> = pix
            .par_chunks(self.pix_per_patch.max(1))
            .map(|c| c.iter().fold([0.0, 0.0], |a, v| [a[0] + v[0], a[1] + v[1]]))
            .collect();
        reduce(&self.decomp, [0.0, 0.0], &parts)
    }

    /// Global sum of per-pixel values (local pixels, in order).
    pub fn pixel_sum(&self, pix: &[f64]) -> f64 {
        let parts: Vec<[f64; 1]> = pix
            .par_chunks(self.pix_per_patch.max(1))
            .map(|c| [c.iter().sum()])
            .collect();
        reduce(&self.decomp, [0.0], &parts)[0]
    }
}

/// The inner products, maxima and shared decisions an iterative solver needs, so the same
/// CG and Newton code runs on one process and on many ranks.
pub trait Space: Send + Sync {
    /// aᵀb over the whole (distributed) vector.
    fn dot(&self, a: &[f64], b: &[f64]) -> f64;
    /// Σ g(r) over the index ranges r in which [`Space::dot`] sums a vector of length `n`,
    /// in its order and grouping, each range visited once, so that `g` may also update its
    /// range's entries: `dot(a, b)` is `range_sum(n, |r| lane_dot(&a[r], &b[r]))` bit for
    /// bit. `None`, without calling `g`, where those ranges do not cover every entry exactly
    /// once (an update in `g` would then miss some).
    fn range_sum(&self, n: usize, g: &(dyn Fn(Range<usize>) -> f64 + Sync)) -> Option<f64>;
    /// Maximum over ranks.
    fn max(&self, v: f64) -> f64;
    /// True iff true on every rank.
    fn all(&self, b: bool) -> bool;
}

/// One process, plain vectors: sums in fixed chunks (independent of the thread count).
pub struct Serial;

impl Space for Serial {
    fn dot(&self, a: &[f64], b: &[f64]) -> f64 {
        det_sum_ranges(a.len(), |r| lane_dot(&a[r.clone()], &b[r]))
    }
    fn range_sum(&self, n: usize, g: &(dyn Fn(Range<usize>) -> f64 + Sync)) -> Option<f64> {
        Some(det_sum_ranges(n, g))
    }
    fn max(&self, v: f64) -> f64 {
        v
    }
    fn all(&self, b: bool) -> bool {
        b
    }
}

impl Space for VecLayout {
    fn dot(&self, a: &[f64], b: &[f64]) -> f64 {
        debug_assert_eq!(a.len(), self.len);
        self.sum_ranges(|r| lane_dot(&a[r.clone()], &b[r]))
    }
    fn range_sum(&self, n: usize, g: &(dyn Fn(Range<usize>) -> f64 + Sync)) -> Option<f64> {
        (n == self.len && self.partitions()).then(|| self.sum_ranges(g))
    }
    fn max(&self, v: f64) -> f64 {
        if self.decomp.size() == 1 {
            v
        } else {
            comm::max_f64(v)
        }
    }
    fn all(&self, b: bool) -> bool {
        self.decomp.all(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_split_is_contiguous_and_covers_every_patch() {
        let work: Vec<f64> = (0..48).map(|q| if q < 12 { 10.0 } else { 1.0 }).collect();
        for size in 1..=7 {
            let d = Decomp::balanced(2, 0, size, &work).unwrap();
            assert_eq!(d.bounds.len(), size + 1);
            assert_eq!(d.n_patches(), 48);
            assert!(d.bounds.windows(2).all(|w| w[1] > w[0]), "{:?}", d.bounds);
        }
        let d = Decomp::balanced(2, 0, 2, &work).unwrap();
        // total 156: the first rank stops before passing 78 (7 heavy patches = 70)
        assert_eq!(d.bounds, vec![0, 7, 48]);
        assert_eq!(d.owner(8, 7 * 16), 1);
        assert_eq!(d.owner(8, 7 * 16 - 1), 0);
        assert_eq!(d.pixels_of(1, 4), 28..192);
        assert!(Decomp::balanced(1, 0, 13, &[1.0; 12]).is_err());
    }

    #[test]
    fn reduce_adds_patches_in_order_after_the_replicated_part() {
        let d = Decomp::single(1);
        let parts: Vec<[f64; 2]> = (0..12).map(|q| [q as f64, 1.0]).collect();
        assert_eq!(reduce(&d, [0.5, 0.0], &parts), [66.5, 12.0]);
    }
}
