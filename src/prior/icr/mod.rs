//! Iterative charted refinement (ICR) on HEALPix NESTED × log-radius (docs/model.md):
//! the linear map `s = S ξ` from standardized excitations to the log-density Gaussian
//! process, and its exact transpose `ξ̄ = Sᵀ s̄`.
//!
//! Layout: the field of level `l` is pixel-major, `s_l[p * n_r(l) + i]`. The excitation
//! vector is `[ξ_0 (npix_0 · n_r0) | level-1 sites | level-2 sites | …]`, where site
//! (p, j) of a refinement from level l owns `ξ[off_l + (p (n_r(l) − 2) + j) · 8 ..][..8]`,
//! ordered (child c, radial t) → `2c + t`. Both directions are parallel over coarse pixels
//! and allocation-free given an [`IcrWork`].

pub mod exchange;
pub mod geometry;
mod kernels;
pub mod matrices;
mod site;
pub mod variance;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::base::comm;
use crate::base::precision::Precision;
use crate::sphere::covariance::Kernel;
use crate::sphere::decomp::Decomp;
use crate::sphere::grid::{self, Chart};
use exchange::{Exchange, StepKind};
use geometry::LevelGeometry;
use kernels::{exchange_back, exchange_halo, gather_adjoint, refine, scatter_adjoint};
use matrices::{cholesky_lower, site_matrices, SITE_LEN};
use std::ops::Range;
use std::sync::Arc;

/// Refinement matrices of all (angular class, radial index) pairs of one level.
#[derive(Clone, Debug)]
pub enum Matrices {
    /// Stored in f64.
    F64(Vec<f64>),
    /// Stored in f32 (computed in f64).
    F32(Vec<f32>),
}

impl Matrices {
    fn bytes(&self) -> usize {
        match self {
            Matrices::F64(v) => v.len() * 8,
            Matrices::F32(v) => v.len() * 4,
        }
    }
}

/// One refinement step from level `l` (coarse) to level `l + 1` (fine), as this rank runs it.
#[derive(Clone, Debug)]
pub struct Level {
    /// Coarse windows (indices into the local coarse array) and local angular classes of
    /// the coarse pixels this rank refines.
    pub geom: LevelGeometry,
    /// Coarse radial shells.
    pub n_c: usize,
    /// Fine radial shells, `2 (n_c − 2)`.
    pub n_f: usize,
    /// Matrices, `[(class · (n_c − 2) + j) · SITE_LEN ..]`.
    pub mats: Matrices,
    /// Reverse window map: the cotangent of coarse pixel q sums the window-contribution
    /// chunks `rev[rev_off[q]..rev_off[q+1]]` (chunk p·9 + slot of local pixel p, or of the
    /// received/gathered chunks in a distributed step).
    pub(crate) rev_off: Vec<u32>,
    pub(crate) rev: Vec<u32>,
    /// Coarse pixels ordered by angular class.
    by_class: Vec<u32>,
    /// Offset of this level's excitations in ξ.
    pub xi_off: usize,
    /// How the step is distributed.
    pub kind: StepKind,
    /// Global coarse pixels refined here.
    pub own: Range<usize>,
    /// Halo pixels (global ids) received before refining.
    pub halo: Vec<u32>,
    /// Exchange lists.
    pub(crate) ex: Exchange,
    /// The exchange counts in values (× n_c): halo send, halo receive, back send, back
    /// receive, gather.
    counts: [Vec<usize>; 5],
}

impl Level {
    /// Number of coarse pixels refined on this rank.
    pub fn npix_c(&self) -> usize {
        self.geom.window.len()
    }
    fn n_sites_r(&self) -> usize {
        self.n_c - 2
    }
    /// Number of excitations of this level.
    pub fn n_xi(&self) -> usize {
        self.npix_c() * self.n_sites_r() * 8
    }
    /// Coarse pixels whose cotangent this rank forms (all of them in a gathered step).
    pub(crate) fn n_cotangent_pixels(&self) -> usize {
        self.rev_off.len() - 1
    }
    /// Values sent to and received from each rank by the forward halo exchange.
    pub(crate) fn halo_counts(&self) -> (&[usize], &[usize]) {
        (&self.counts[0], &self.counts[1])
    }
    /// Values sent to and received from each rank by the adjoint's return of window chunks.
    pub(crate) fn back_counts(&self) -> (&[usize], &[usize]) {
        (&self.counts[2], &self.counts[3])
    }
    /// Values of window chunks every rank contributes to a gathered step's adjoint.
    pub(crate) fn gather_counts(&self) -> &[usize] {
        &self.counts[4]
    }
    /// Values of the adjoint's window chunks on this rank: its own, then those received.
    pub(crate) fn scatter_len(&self) -> usize {
        9 * self.npix_c() * self.n_c + self.counts[3].iter().sum::<usize>()
    }
    /// Values of every rank's window chunks in a gathered step's adjoint.
    pub(crate) fn gathered_len(&self) -> usize {
        self.counts[4].iter().sum()
    }
    /// Values the larger of this step's two exchanges sends.
    pub(crate) fn send_len(&self) -> usize {
        self.ex.halo_send.len().max(self.ex.back_send.len()) * self.n_c
    }
}

/// The ICR prior operator for a chart and kernel.
#[derive(Clone, Debug)]
pub struct Icr {
    /// The chart.
    pub chart: Chart,
    /// Lower Cholesky factor of the level-0 covariance, row-major `n0 × n0`.
    level0: Vec<f64>,
    n0: usize,
    /// Refinement steps, level 0→1 first.
    pub levels: Vec<Level>,
    /// The decomposition over ranks.
    pub decomp: Arc<Decomp>,
    /// Pixels in the local field array of every level (owned or all, then any halo).
    field_pix: Vec<usize>,
    /// The variance correction applied to the last refinement, if any.
    pub correction: Option<variance::VarianceCorrection>,
}

/// Preallocated buffers of [`Icr::forward`] and [`Icr::adjoint`].
#[derive(Clone, Debug, Default)]
pub struct IcrWork {
    /// Field of every level, pixel-major.
    pub fields: Vec<Vec<f64>>,
    /// Per-pixel window contributions of the adjoint, `9 · n_c` per coarse pixel, followed
    /// by those received from other ranks.
    scatter: Vec<f64>,
    /// All ranks' window contributions of a gathered step.
    gathered: Vec<f64>,
    /// Send buffer of the exchanges.
    send: Vec<f64>,
}

impl Icr {
    /// Build the operator on one process: level-0 Cholesky and deduplicated refinement
    /// matrices, in parallel.
    pub fn new(chart: &Chart, kernel: &dyn Kernel, precision: Precision) -> Result<Self> {
        let d = Decomp::single(crate::sphere::decomp::default_nside_dec(chart));
        Self::distributed(chart, kernel, precision, Arc::new(d))
    }

    /// Build this rank's part of the operator for decomposition `decomp`: the steps coarser
    /// than `decomp.nside_dec` whole, the later ones for the rank's own pixels only, with
    /// matrices of the angular classes those pixels use.
    pub fn distributed(
        chart: &Chart,
        kernel: &dyn Kernel,
        precision: Precision,
        decomp: Arc<Decomp>,
    ) -> Result<Self> {
        faer::set_global_parallelism(faer::Par::Seq);
        if decomp.nside_dec > chart.nside_final() {
            anyhow::bail!(
                "parallel.nside_dec = {} is finer than the map (nside {})",
                decomp.nside_dec,
                chart.nside_final()
            );
        }
        if decomp.size() > 1
            && !crate::sphere::decomp::last_refinement_distributed(
                chart,
                chart.levels,
                decomp.nside_dec,
            )
        {
            anyhow::bail!(
                "with {} ranks the last refinement must be distributed: parallel.nside_dec = {} \
                 must not exceed nside {} (where the last refinement starts)",
                decomp.size(),
                decomp.nside_dec,
                chart.nside(chart.levels.max(1) - 1)
            );
        }
        let level0 = Self::level0_factor(chart, kernel)?;
        let n0 = chart.npix(0) * chart.n_r0;
        let mut xi_off = n0;
        let mut levels: Vec<Level> = Vec::with_capacity(chart.levels);
        for l in 0..chart.levels {
            let coarse_distributed = levels
                .last()
                .is_some_and(|p| p.kind != StepKind::Replicated);
            let level = Self::build_level(
                chart,
                kernel,
                l,
                xi_off,
                precision,
                &decomp,
                coarse_distributed,
            )
            .with_context(|| format!("ICR level {l} → {}", l + 1))?;
            xi_off += level.n_xi();
            levels.push(level);
        }
        let field_pix = (0..=chart.levels)
            .map(|l| {
                let made = match l.checked_sub(1).map(|k| &levels[k]) {
                    None => chart.npix(0),
                    Some(s) if s.kind == StepKind::Replicated => chart.npix(l),
                    Some(s) => 4 * s.npix_c(),
                };
                made + levels.get(l).map_or(0, |s| s.halo.len())
            })
            .collect();
        Ok(Self {
            chart: chart.clone(),
            level0,
            n0,
            levels,
            decomp,
            field_pix,
            correction: None,
        })
    }

    /// The operator of the chart ended at level `k` ([`Chart::truncated`]): level 0 and the
    /// first `k` refinements of this one, unchanged, so its excitations are the first
    /// [`Icr::n_xi_upto`]`(k)` of this operator's and its final field is this operator's
    /// level-`k` field. A variance correction (folded into the last refinement only) is not
    /// carried over unless `k` is the last level. Fails on several ranks when step `k − 1`
    /// is not distributed (parallel.nside_dec above nside(k − 1)).
    pub fn truncated(&self, k: usize) -> Result<Icr> {
        self.check_truncation(k)?;
        if k == self.chart.levels {
            return Ok(self.clone());
        }
        let mut field_pix = self.field_pix[..=k].to_vec();
        // the final field carries no halo: nothing refines it further
        field_pix[k] -= self.levels[k].halo.len();
        Ok(Icr {
            chart: self.chart.truncated(k),
            level0: self.level0.clone(),
            n0: self.n0,
            levels: self.levels[..k].to_vec(),
            decomp: self.decomp.clone(),
            field_pix,
            correction: None,
        })
    }

    /// Whether [`Icr::truncated`]`(k)` can be built, without building it.
    pub fn check_truncation(&self, k: usize) -> Result<()> {
        let chart = &self.chart;
        anyhow::ensure!(
            k <= chart.levels,
            "ICR truncated at {k} of {} levels",
            chart.levels
        );
        let nside_dec = self.decomp.nside_dec;
        if self.decomp.size() > 1
            && !crate::sphere::decomp::last_refinement_distributed(chart, k, nside_dec)
        {
            anyhow::bail!(
                "on {} ranks with parallel.nside_dec = {nside_dec} a stage's chart must end at \
                 nside {} or finer (its last refinement distributed); {k} levels end at nside \
                 {}: use more levels or a smaller parallel.nside_dec",
                self.decomp.size(),
                2 * nside_dec,
                chart.nside(k)
            );
        }
        Ok(())
    }

    /// Number of this rank's excitations of level 0 and the first `k` refinements.
    pub fn n_xi_upto(&self, k: usize) -> usize {
        self.levels.get(k).map_or(self.n_xi(), |l| l.xi_off)
    }

    /// How the excitations followed by the two global latents (ξ_scale, ξ_offset) lie on
    /// this rank: level 0 and replicated steps are replicated, a distributed step's sites
    /// belong to the patch of their coarse pixel.
    pub fn x_layout(&self) -> crate::sphere::decomp::VecLayout {
        let d = &self.decomp;
        let n_patch = d.patches().len();
        let mut rep: Vec<Range<usize>> = Vec::new();
        rep.push(0..self.n0);
        let mut patch = vec![Vec::new(); n_patch];
        for (l, lev) in self.levels.iter().enumerate() {
            let r = lev.xi_off..lev.xi_off + lev.n_xi();
            // by nside, not by step kind: one process splits its sums exactly as N ranks do
            if self.chart.nside(l) < d.nside_dec {
                rep.push(r);
                continue;
            }
            let per = lev.n_xi() / n_patch;
            for (k, rs) in patch.iter_mut().enumerate() {
                rs.push(r.start + k * per..r.start + (k + 1) * per);
            }
        }
        let nxi = self.n_xi();
        rep.push(nxi..nxi + 2);
        crate::sphere::decomp::VecLayout {
            decomp: self.decomp.clone(),
            rep,
            patch,
            len: nxi + 2,
        }
    }

    /// Final-level pixels (global NESTED ids) whose field this rank computes.
    pub fn final_pixels(&self) -> Range<usize> {
        match self.levels.last() {
            Some(s) if s.kind != StepKind::Replicated => 4 * s.own.start..4 * s.own.end,
            _ => 0..self.chart.npix(self.chart.levels),
        }
    }

    fn level0_factor(chart: &Chart, kernel: &dyn Kernel) -> Result<Vec<f64>> {
        let nside = chart.nside(0);
        let radii = chart.radii_pc(0);
        let nr = radii.len();
        let pos: Vec<[f64; 3]> = (0..chart.npix(0))
            .flat_map(|p| {
                let u = grid::pix2vec(nside, p as u64);
                radii
                    .iter()
                    .map(move |&r| [r * u[0], r * u[1], r * u[2]])
                    .collect::<Vec<_>>()
            })
            .collect();
        let n = pos.len();
        debug_assert_eq!(n, chart.npix(0) * nr);
        let k = faer::Mat::from_fn(n, n, |i, j| {
            let d = (0..3)
                .map(|a| (pos[i][a] - pos[j][a]).powi(2))
                .sum::<f64>()
                .sqrt();
            kernel.cov(d)
        });
        let l = cholesky_lower(&k).context("level-0 covariance")?;
        Ok((0..n * n).map(|ij| l[(ij / n, ij % n)]).collect())
    }

    fn build_level(
        chart: &Chart,
        kernel: &dyn Kernel,
        l: usize,
        xi_off: usize,
        precision: Precision,
        decomp: &Decomp,
        coarse_distributed: bool,
    ) -> Result<Level> {
        let global = LevelGeometry::new(chart.nside(l));
        let step = exchange::plan_step(global, decomp, coarse_distributed);
        let geom = step.geom;
        let n_c = chart.n_r(l);
        let ns = n_c - 2;
        let mut m = vec![0.0f64; geom.n_classes() * ns * SITE_LEN];
        m.par_chunks_mut(SITE_LEN)
            .enumerate()
            .try_for_each(|(idx, out)| {
                let (class, j) = (idx / ns, idx % ns);
                let cr = [0, 1, 2].map(|d| chart.radius_pc(l, (j + d) as f64));
                let fr = [0, 1].map(|t| chart.radius_pc(l + 1, (2 * j + t) as f64));
                site_matrices(kernel, &geom.class_gram[class], cr, fr, out)
            })?;
        let mats = match precision {
            Precision::F64 => Matrices::F64(m),
            Precision::F32 => Matrices::F32(m.iter().map(|&v| v as f32).collect()),
        };
        let npix = geom.window.len();
        let mut by_class: Vec<u32> = (0..npix as u32).collect();
        by_class.sort_by_key(|&p| (geom.class[p as usize], p));
        Ok(Level {
            geom,
            n_c,
            n_f: 2 * ns,
            mats,
            rev_off: step.rev_off,
            rev: step.rev,
            by_class,
            xi_off,
            kind: step.kind,
            own: step.own,
            halo: step.halo,
            counts: [
                &step.ex.halo_send_counts,
                &step.ex.halo_recv_counts,
                &step.ex.back_send_counts,
                &step.ex.back_recv_counts,
                &step.ex.gather_counts,
            ]
            .map(|c| c.iter().map(|v| v * n_c).collect()),
            ex: step.ex,
        })
    }

    /// Lower Cholesky factor of the level-0 covariance (row-major n0 × n0) and n0.
    pub(crate) fn level0_factor_rows(&self) -> (&[f64], usize) {
        (&self.level0, self.n0)
    }

    /// Total number of excitations ξ.
    pub fn n_xi(&self) -> usize {
        self.levels.last().map_or(self.n0, |l| l.xi_off + l.n_xi())
    }

    /// Values of this rank's field array at level `l` (owned or all pixels, then any halo,
    /// × chart shells).
    pub(crate) fn field_len(&self, l: usize) -> usize {
        self.field_pix[l] * self.chart.n_r(l)
    }

    /// Number of values of this rank's final field (pixels × chart shells).
    pub fn n_field(&self) -> usize {
        let l = self.chart.levels;
        self.final_pixels().len() * self.chart.n_r(l)
    }

    /// Bytes held by refinement matrices and the level-0 factor.
    pub fn matrix_bytes(&self) -> usize {
        self.level0.len() * 8 + self.levels.iter().map(|l| l.mats.bytes()).sum::<usize>()
    }

    /// Distinct angular classes per refinement level.
    pub fn class_counts(&self) -> Vec<usize> {
        self.levels.iter().map(|l| l.geom.n_classes()).collect()
    }

    /// Buffers for forward and adjoint.
    pub fn workspace(&self) -> IcrWork {
        let c = &self.chart;
        let fields = (0..=c.levels)
            .map(|l| vec![0.0; self.field_len(l)])
            .collect();
        IcrWork {
            fields,
            scatter: vec![0.0; self.level_max(Level::scatter_len)],
            gathered: vec![0.0; self.level_max(Level::gathered_len)],
            send: vec![0.0; self.level_max(Level::send_len)],
        }
    }

    /// The largest `f` over the refinement levels (0 without any).
    pub(crate) fn level_max(&self, f: impl Fn(&Level) -> usize) -> usize {
        self.levels.iter().map(f).max().unwrap_or(0)
    }

    /// `s = S ξ`; the final field is left in `work.fields[levels]`.
    pub fn forward(&self, xi: &[f64], work: &mut IcrWork) {
        assert_eq!(
            xi.len(),
            self.n_xi(),
            "ICR forward: wrong number of excitations"
        );
        let n0 = self.n0;
        let l0 = &self.level0;
        work.fields[0]
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, s)| {
                let row = &l0[i * n0..i * n0 + i + 1];
                *s = row.iter().zip(&xi[..=i]).map(|(a, b)| a * b).sum();
            });
        for (l, level) in self.levels.iter().enumerate() {
            let (lo, hi) = work.fields.split_at_mut(l + 1);
            if level.kind == StepKind::Halo {
                exchange_halo(level, &mut lo[l], &mut work.send);
            }
            let xi_l = &xi[level.xi_off..level.xi_off + level.n_xi()];
            match &level.mats {
                Matrices::F64(m) => refine(level, m, &lo[l], xi_l, &mut hi[0]),
                Matrices::F32(m) => refine(level, m, &lo[l], xi_l, &mut hi[0]),
            }
        }
    }

    /// `ξ̄ = Sᵀ s̄` for a final-level cotangent `s_bar`; overwrites `xi_bar`.
    pub fn adjoint(&self, s_bar: &[f64], xi_bar: &mut [f64], work: &mut IcrWork) {
        self.adjoint_n([s_bar], [xi_bar], [work]);
    }

    /// [`Icr::adjoint`] of two cotangents, each site matrix read once for both; each
    /// result has the bits of its own adjoint.
    pub fn adjoint_pair(
        &self,
        s_bar: [&[f64]; 2],
        xi_bar: [&mut [f64]; 2],
        work: [&mut IcrWork; 2],
    ) {
        self.adjoint_n(s_bar, xi_bar, work);
    }

    fn adjoint_n<const V: usize>(
        &self,
        s_bar: [&[f64]; V],
        mut xi_bar: [&mut [f64]; V],
        mut work: [&mut IcrWork; V],
    ) {
        for xb in &xi_bar {
            assert_eq!(
                xb.len(),
                self.n_xi(),
                "ICR adjoint: wrong number of excitations"
            );
        }
        let nl = self.levels.len();
        for (l, level) in self.levels.iter().enumerate().rev() {
            let n_local = 9 * level.npix_c() * level.n_c;
            // the last step reads the caller's cotangent where it lies (a parameter-sized
            // copy saved per adjoint)
            let mut fine_bar: [&[f64]; V] = s_bar;
            let mut scatter: [&mut [f64]; V] = std::array::from_fn(|_| Default::default());
            for ((w, fb), t) in work.iter_mut().zip(&mut fine_bar).zip(&mut scatter) {
                let IcrWork {
                    fields, scatter, ..
                } = &mut **w;
                if l + 1 < nl {
                    *fb = &fields[l + 1];
                }
                *t = &mut scatter[..n_local];
            }
            let xb = xi_bar
                .each_mut()
                .map(|x| &mut x[level.xi_off..level.xi_off + level.n_xi()]);
            match &level.mats {
                Matrices::F64(m) => scatter_adjoint(level, m, fine_bar, xb, scatter),
                Matrices::F32(m) => scatter_adjoint(level, m, fine_bar, xb, scatter),
            }
            for w in work.iter_mut() {
                gather_step(level, n_local, l, w);
            }
        }
        let n0 = self.n0;
        let l0 = &self.level0;
        for ((s_bar, xi_bar), w) in s_bar.iter().zip(xi_bar).zip(&work) {
            let s0: &[f64] = if nl == 0 { s_bar } else { &w.fields[0] };
            xi_bar[..n0].par_iter_mut().enumerate().for_each(|(m, x)| {
                *x = (m..n0).map(|i| l0[i * n0 + m] * s0[i]).sum();
            });
        }
    }
}

/// Second half of an adjoint step `l` after its scatter (`n_local` local values): the window
/// contributions brought to their owners, then summed into the coarse cotangent.
fn gather_step(level: &Level, n_local: usize, l: usize, work: &mut IcrWork) {
    let IcrWork {
        fields,
        scatter,
        gathered,
        send,
    } = work;
    let source: &[f64] = match level.kind {
        StepKind::Replicated => &scatter[..n_local],
        StepKind::Gathered => {
            let n = level.counts[4].iter().sum();
            comm::all_gather_into(&scatter[..n_local], &level.counts[4], &mut gathered[..n]);
            &gathered[..n]
        }
        StepKind::Halo => {
            exchange_back(level, scatter, send);
            scatter
        }
    };
    gather_adjoint(level, source, &mut fields[l]);
}

#[cfg(test)]
mod tests;
