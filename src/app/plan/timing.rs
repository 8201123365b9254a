//! The time model of `dust3d plan`: the work of one global iteration at a stage's CG caps
//! (ICR pairs, star walks, vector passes) and this machine's speed at each, timed on one
//! thread.

use anyhow::Result;
use std::sync::Arc;

use super::RankFigures;
use crate::app::config::{Config, Precision, StageConfig};
use crate::prior::icr::Icr;

/// The cost of one star walk (a read of every star's window: the moments, a tangent or a
/// cotangent) on one thread, in seconds per kept voxel, per star and per window entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WalkCosts {
    /// Seconds per kept voxel: each pixel's column work around its stars.
    pub voxel_s: f64,
    /// Seconds per star: finding its window, its weighting.
    pub star_s: f64,
    /// Seconds per window entry.
    pub entry_s: f64,
}

/// Kernel speeds on one thread, in seconds: of an ICR forward + adjoint per chart voxel, of
/// a star walk for one state, for two tangents at one state (the sampling solves in
/// lockstep, `likelihood::cpu::pair`) and for a block of four states side by side (the
/// Newton steps' averaged metric and the evaluations of short windows, `likelihood::quad`),
/// and of one pass over a parameter-sized vector per value.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpeeds {
    /// Seconds per chart voxel per ICR forward + adjoint.
    pub voxel_s: f64,
    /// One state's star walk.
    pub walk: WalkCosts,
    /// Two tangents' star walk at one state.
    pub pair_walk: WalkCosts,
    /// Four states' star walk, side by side.
    pub quad_walk: WalkCosts,
    /// Seconds per value per vector pass.
    pub vector_s: f64,
}

impl KernelSpeeds {
    /// Fixed speeds (`--no-timing`): one thread of a recent server core, as `dust3d plan`
    /// timed them on an Intel Xeon with AVX2 (2026-12-04; from run to run 21.1–23.5 ns per
    /// ICR voxel; one state's walk 1.1–4.3 ns per voxel, 5.8–13 ns per star, 1.0–1.7 ns per
    /// entry; two tangents' 6.4–7.5 ns per voxel, 25–30 ns per star, 1.1–1.5 ns per entry;
    /// four states' 8.8–10.5 ns per voxel, 14–17 ns per star, 1.5–1.8 ns per entry; 1.1–1.2
    /// ns per vector value).
    pub const REFERENCE: Self = Self {
        voxel_s: 2.2e-8,
        walk: WalkCosts {
            voxel_s: 3.0e-9,
            star_s: 1.0e-8,
            entry_s: 1.3e-9,
        },
        pair_walk: WalkCosts {
            voxel_s: 7.0e-9,
            star_s: 2.8e-8,
            entry_s: 1.3e-9,
        },
        quad_walk: WalkCosts {
            voxel_s: 9.5e-9,
            star_s: 1.6e-8,
            entry_s: 1.6e-9,
        },
        vector_s: 1.2e-9,
    };
}

/// [`KernelSpeeds`] of this machine, timed on one thread: the ICR on the W1 chart (1.6 M
/// voxels, whose matrices and fields do not fit in cache, as a fit's do not); the star walks
/// as metric products less their ICR pairs (of one state, of two vectors at one state, and
/// averaged over four states), on the W1 sky of 200,000 stars and on every fourth of them,
/// each with all 4 levels (128 shells, about 35 window entries per star) and with 2 (32
/// shells, about 10) — see [`walk_costs`]; and a vector update over 16 M values.
pub(super) fn kernel_speeds(no_timing: bool) -> Result<KernelSpeeds> {
    if no_timing {
        return Ok(KernelSpeeds::REFERENCE);
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    pool.install(|| -> Result<KernelSpeeds> {
        let mut cfg = crate::app::bench::preset_config(&crate::app::bench::preset("w1")?);
        let all = crate::app::simulate::run(&cfg, "")?.catalog;
        let quarter: Vec<bool> = (0..all.len()).map(|i| i % 4 == 0).collect();
        let quarter = all.subset(&quarter);
        let (t_icr4, icr4) = icr_pair_seconds(&cfg)?;
        let fine = walk_seconds(&cfg, icr4.clone(), [&all, &quarter], t_icr4)?;
        cfg.grid.levels = 2;
        let (t_icr2, icr2) = icr_pair_seconds(&cfg)?;
        let coarse = walk_seconds(&cfg, icr2, [&all, &quarter], t_icr2)?;
        let (a, mut b) = (vec![0.5; 1 << 24], vec![0.25; 1 << 24]);
        let t_vec = crate::app::bench::median_time(3, || {
            b.iter_mut().zip(&a).for_each(|(y, x)| *y += 0.5 * x);
        });
        Ok(KernelSpeeds {
            voxel_s: t_icr4 / icr4.n_field() as f64,
            walk: walk_costs(fine[0], coarse[0]),
            pair_walk: walk_costs(fine[1], coarse[1]),
            quad_walk: walk_costs(fine[2], coarse[2]),
            vector_s: t_vec / b.len() as f64,
        })
    })
}

/// Star walks' seconds on the catalogs `cats` with the chart of `icr` (half a metric product
/// less its ICR pairs, `t_icr` each), as `[voxels, stars, entries, seconds]`: of one state,
/// of two vectors at one state, and of four states side by side (the product averaged over
/// four), for each catalog.
fn walk_seconds(
    cfg: &Config,
    icr: Arc<Icr>,
    cats: [&crate::data::catalog::Catalog; 2],
    t_icr: f64,
) -> Result<[[[f64; 4]; 2]; 3]> {
    let chart = cfg.chart()?;
    let mut out = [[[0.0; 4]; 2]; 3];
    for (c, cat) in cats.into_iter().enumerate() {
        let cat = cat.clone().into_pixel_layout(chart.nside_final());
        let model = crate::app::build::model(cfg, icr.clone(), &cat)?;
        let (np, ns) = (model.n_params(), model.data.len());
        let x = vec![0.1; np];
        let xsig = vec![0.0; ns];
        let mut w = model.workspace();
        let mut st = model.empty_state();
        model.update_state(&x, &xsig, &mut st, &mut w)?;
        let (mut o, mut o2) = (vec![0.0; np], vec![0.0; np]);
        let t1 = crate::app::bench::try_median_time(5, || model.metric(&st, &x, &mut o, &mut w))?;
        let y = vec![-0.2; np];
        let t2 = crate::app::bench::try_median_time(5, || {
            model.metric_pair(&st, [&x, &y], [&mut o, &mut o2], &mut w)
        })?;
        let states = vec![st; 4];
        let (mask, v) = (
            crate::likelihood::mask::Mask::all_free(),
            vec![0.1; np + ns],
        );
        let mut o = vec![0.0; np + ns];
        let t4 = crate::app::bench::try_median_time(3, || {
            model.averaged_metric(&states, &mask, &v, &mut o, &mut w)
        })?;
        let shape = [
            (model.npix() * model.n_r()) as f64,
            ns as f64,
            model.data.windows.prob.len() as f64,
        ];
        // a product of two vectors runs two ICR pairs (its two adjoints share their site
        // matrices: what that saves shows in the walk's figure, which the plan counts as
        // often as the pairs)
        for (q, (t, icr_pairs)) in [(t1, 1.0), (t2, 2.0), (t4, 1.0)].into_iter().enumerate() {
            let [a, b, e] = shape;
            out[q][c] = [a, b, e, (t - icr_pairs * t_icr).max(0.0) / 2.0];
        }
    }
    Ok(out)
}

/// The walk costs `[per voxel, per star, per entry]` from timed walks `[voxels, stars,
/// entries, seconds]` of all stars and of a quarter of them on a fine and on a coarse chart.
/// On one chart the two differ only in stars, so their difference per star is the cost of a
/// star with that chart's entries per star; the two charts' entries per star differ about
/// 3.5-fold, which separates the cost per entry from the cost per star; what the fine chart's
/// walk of all stars leaves is its voxels' (each pixel's column work). Differences of times
/// four-fold apart keep the timing's scatter small; a cost the scatter still makes negative
/// is taken as zero.
fn walk_costs(fine: [[f64; 4]; 2], coarse: [[f64; 4]; 2]) -> WalkCosts {
    // (seconds, entries) per star of the stars one walk has and the other has not
    let per_star = |[a, b]: [[f64; 4]; 2]| {
        let ds = a[1] - b[1];
        ((a[3] - b[3]) / ds, (a[2] - b[2]) / ds)
    };
    let ((t_f, e_f), (t_c, e_c)) = (per_star(fine), per_star(coarse));
    let entry = ((t_f - t_c) / (e_f - e_c)).max(0.0);
    let star = (t_c - entry * e_c).max(0.0);
    let [v, s, e, t] = fine[0];
    WalkCosts {
        voxel_s: ((t - star * s - entry * e) / v).max(0.0),
        star_s: star,
        entry_s: entry,
    }
}

/// Seconds of an ICR forward + adjoint on the chart and kernel of `cfg`, and the ICR built
/// for it.
fn icr_pair_seconds(cfg: &Config) -> Result<(f64, Arc<Icr>)> {
    let kernel = cfg.kernel.build()?;
    let icr = Arc::new(Icr::new(&cfg.chart()?, kernel.as_ref(), Precision::F64)?);
    let mut iw = icr.workspace();
    let x = vec![0.1; icr.n_xi()];
    let mut xb = vec![0.0; icr.n_xi()];
    let field = vec![0.1; icr.n_field()];
    let t = crate::app::bench::median_time(3, || {
        icr.forward(&x, &mut iw);
        icr.adjoint(&field, &mut xb, &mut iw);
    });
    Ok((t, icr))
}

/// A stage's sample pairs, sampling-CG cap, Newton steps and Newton-CG cap.
pub(super) fn stage_counts(stage: &StageConfig) -> (f64, f64, f64, f64) {
    (
        stage.sample_pairs as f64,
        stage.sample_cg_iterations as f64,
        stage.newton_steps as f64,
        stage.newton_cg_iterations as f64,
    )
}

/// The work of one global iteration at a stage's caps, in the units [`KernelSpeeds`] times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct StageWork {
    /// ICR forward + adjoint pairs.
    pub icr_pairs: f64,
    /// Star walks of one state (each reads every star's window once).
    walks: f64,
    /// Star walks of two tangents at one state.
    pair_walks: f64,
    /// Star walks of four states side by side.
    quad_walks: f64,
    /// Passes over a parameter-sized vector.
    vector_passes: f64,
}

/// Which walks the backend shares between solves and samples (the CPU backend's; OpenCL
/// shares none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Sharing {
    /// The sample pairs' solves run two at a time in lockstep, each product one walk of two
    /// tangents (not with n_σ sampled: those solves run one after the other).
    pub lockstep: bool,
    /// The evaluations walk the samples' states four at a time (windows short enough:
    /// [`crate::likelihood::cpu::TOGETHER_MAX_ENTRIES`]).
    pub together: bool,
    /// The evaluations form the samples' fields by the ICR's linearity
    /// ([`crate::likelihood::model::SampleFields`]): one ICR pair per evaluation for all
    /// samples, and one forward per residual and iteration.
    pub fields: bool,
}

impl Sharing {
    /// Nothing shared: every solve and every evaluation on its own.
    #[cfg(test)]
    const NONE: Self = Self {
        lockstep: false,
        together: false,
        fields: false,
    };

    /// What the configured backend shares for stars of `win_bytes` window bytes each.
    pub(super) fn of(cfg: &Config, win_bytes: f64) -> Self {
        let cpu = cfg.backend.kind == crate::app::config::BackendKind::Cpu;
        let entries = (win_bytes - WINDOW_STAR_BYTES) / WINDOW_ENTRY_BYTES;
        Self {
            lockstep: cpu && !cfg.noise.sample_nsigma,
            together: cpu && entries <= crate::likelihood::cpu::TOGETHER_MAX_ENTRIES as f64,
            fields: cpu,
        }
    }
}

/// Window bytes per entry, and per star besides its entries (start, offset and κ).
const WINDOW_ENTRY_BYTES: f64 = 8.0;
const WINDOW_STAR_BYTES: f64 = 12.0;

/// Vector passes per CG iteration: the product's output accumulation, two dot products and
/// three updates, counted as passes of an update (one read, one write). Free entries are not
/// masked (`likelihood::mask`).
const CG_VECTOR_PASSES: f64 = 7.0;
/// Passes over the voxels and parameters per value + gradient of one sample: its sample
/// point, the field's exponential (a few passes' worth), its state and the gradient's
/// accumulation.
const EVAL_VECTOR_PASSES: f64 = 10.0;

/// The work of one global iteration at the stage's caps: each sample pair's CG solve (its
/// draw, a cotangent walk and an ICR adjoint, and one product per iteration: CG starts from
/// zero and skips the product with its start; the scale's evidence update solves once more
/// per iteration, and once more per pair when n_σ is sampled, `sample_nsigma`; with
/// `lockstep`, the pairs' solves two at a time, each iteration's two products one walk of
/// two tangents each way), and per Newton step about 2 value + gradient evaluations of all
/// 2N samples (line search included) and the CG's products with the metric averaged over
/// them (one ICR pair per product, two walks per sample, tangent and cotangent, for the
/// samples in blocks of four side by side and the rest one by one; an evaluation walks each
/// window twice too: the moments and the cotangent, in blocks of four with `together`; it
/// runs an ICR pair per sample, or one for all with `fields`, which adds a forward per
/// residual and iteration).
pub(super) fn stage_work(stage: &StageConfig, sample_nsigma: bool, share: Sharing) -> StageWork {
    let (n, cs, sn, cn) = stage_counts(stage);
    let solves = match (stage.scale_update, sample_nsigma) {
        (crate::app::config::ScaleUpdateName::Evidence, false) => n + 1.0,
        (crate::app::config::ScaleUpdateName::Evidence, true) => 2.0 * n + 1.0,
        _ => n,
    };
    let lockstep = if share.lockstep {
        (n / 2.0).floor()
    } else {
        0.0
    };
    let alone = solves - 2.0 * lockstep;
    let evaluations = sn * 2.0 * 2.0 * n;
    let cg_iterations = solves * cs + sn * cn;
    let (blocks, rest) = ((2.0 * n / 4.0).floor(), (2.0 * n) % 4.0);
    let (eval_blocks, eval_alone) = if share.together {
        (sn * 2.0 * blocks, sn * 2.0 * rest)
    } else {
        (0.0, evaluations)
    };
    let eval_icr = if share.fields {
        sn * 2.0 + 0.5 * n
    } else {
        evaluations
    };
    StageWork {
        icr_pairs: solves * (0.5 + cs) + eval_icr + sn * cn,
        walks: alone * (1.0 + 2.0 * cs) + 2.0 * lockstep + 2.0 * eval_alone + sn * cn * 2.0 * rest,
        pair_walks: lockstep * 2.0 * cs,
        quad_walks: sn * cn * 2.0 * blocks + 2.0 * eval_blocks,
        vector_passes: CG_VECTOR_PASSES * cg_iterations + EVAL_VECTOR_PASSES * evaluations,
    }
}

/// Seconds of one global iteration of `stage` on one thread for rank figures `f`, at the
/// stage's CG caps.
pub(super) fn iteration_seconds(
    cfg: &Config,
    stage: &StageConfig,
    f: &RankFigures,
    win_bytes: f64,
    speeds: KernelSpeeds,
) -> f64 {
    let share = Sharing::of(cfg, win_bytes);
    let w = stage_work(stage, cfg.noise.sample_nsigma, share);
    let entries = f.stars * (win_bytes - WINDOW_STAR_BYTES) / WINDOW_ENTRY_BYTES;
    let values = (f.voxels + f.xi) as f64 + f.stars;
    let walk =
        |c: WalkCosts| c.voxel_s * f.voxels as f64 + c.star_s * f.stars + c.entry_s * entries;
    w.icr_pairs * speeds.voxel_s * f.voxels as f64
        + w.walks * walk(speeds.walk)
        + w.pair_walks * walk(speeds.pair_walk)
        + w.quad_walks * walk(speeds.quad_walk)
        + w.vector_passes * speeds.vector_s * values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_evidence_update_adds_a_solve_per_iteration_and_per_pair_with_nsigma_sampled() {
        let joint = StageConfig {
            sample_pairs: 4,
            sample_cg_iterations: 100,
            ..Default::default()
        };
        let evidence = StageConfig {
            scale_update: crate::app::config::ScaleUpdateName::Evidence,
            ..joint.clone()
        };
        // one more solve: its draw (a walk, an ICR adjoint), 100 products (ICR pairs, two
        // walks each) and 100 CG iterations' vector passes
        let extra = |a: StageWork, b: StageWork| {
            assert_eq!(a.quad_walks, b.quad_walks);
            [
                b.icr_pairs - a.icr_pairs,
                b.walks - a.walks,
                b.vector_passes - a.vector_passes,
            ]
        };
        let (a, b) = (
            stage_work(&joint, false, Sharing::NONE),
            stage_work(&evidence, false, Sharing::NONE),
        );
        let passes = 100.0 * CG_VECTOR_PASSES;
        assert_eq!(extra(a, b), [100.5, 201.0, passes]);
        let (a, b) = (
            stage_work(&joint, true, Sharing::NONE),
            stage_work(&evidence, true, Sharing::NONE),
        );
        assert_eq!(extra(a, b), [5.0 * 100.5, 5.0 * 201.0, 5.0 * passes]);
    }

    #[test]
    fn the_newton_walks_of_the_samples_go_in_blocks_of_four_and_the_rest_alone() {
        let stage = |pairs| StageConfig {
            sample_pairs: pairs,
            newton_steps: 3,
            newton_cg_iterations: 10,
            ..Default::default()
        };
        // 1 pair: two states alone; 2 pairs: one block of four; 3 pairs: a block and two alone
        let [one, two, three] = [1, 2, 3].map(|n| stage_work(&stage(n), false, Sharing::NONE));
        assert_eq!([one, two, three].map(|w| w.quad_walks), [0.0, 60.0, 60.0]);
        // a pair more: its solve (draw, cs products of two walks), its evaluations (3 steps
        // × 2 × 2 states, two walks each), and the Newton CG's single-state walks (3 steps ×
        // 10 iterations × 2 walks per state alone)
        let cs = stage_counts(&stage(1)).1;
        let pair = 1.0 + 2.0 * cs + 24.0;
        assert_eq!(two.walks - one.walks, pair - 120.0);
        assert_eq!(three.walks - two.walks, pair + 120.0);
    }

    #[test]
    fn lockstep_solves_share_their_walks_two_at_a_time_and_the_evidence_solve_goes_alone() {
        let stage = |pairs| StageConfig {
            sample_pairs: pairs,
            sample_cg_iterations: 20,
            scale_update: crate::app::config::ScaleUpdateName::Evidence,
            ..Default::default()
        };
        let lockstep = Sharing {
            lockstep: true,
            ..Sharing::NONE
        };
        let cs = 20.0;
        for pairs in [1, 2, 3, 4] {
            let (a, b) = (
                stage_work(&stage(pairs), false, Sharing::NONE),
                stage_work(&stage(pairs), false, lockstep),
            );
            // ⌊N/2⌋ solves in lockstep: each pair's 2 cs products one walk of two tangents
            // each way instead of four one-state walks; draws, ICR pairs, vectors unchanged
            let together = (pairs / 2) as f64;
            assert_eq!(b.pair_walks, together * 2.0 * cs, "{pairs} pairs");
            assert_eq!(a.walks - b.walks, together * 4.0 * cs, "{pairs} pairs");
            assert_eq!(
                [a.icr_pairs, a.quad_walks, a.vector_passes],
                [b.icr_pairs, b.quad_walks, b.vector_passes]
            );
        }
    }

    #[test]
    fn short_windows_evaluate_the_samples_four_at_a_time() {
        let stage = |pairs| StageConfig {
            sample_pairs: pairs,
            newton_steps: 3,
            ..Default::default()
        };
        let together = Sharing {
            together: true,
            ..Sharing::NONE
        };
        for (pairs, blocks) in [(1, 0.0), (2, 1.0), (3, 1.0)] {
            let (a, b) = (
                stage_work(&stage(pairs), false, Sharing::NONE),
                stage_work(&stage(pairs), false, together),
            );
            // 3 steps × 2 evaluations: a block's eight one-state walks (moments and cotangent
            // of four states) become two four-state walks; the states after the last block
            // walk alone as before
            assert_eq!(
                b.quad_walks - a.quad_walks,
                6.0 * 2.0 * blocks,
                "{pairs} pairs"
            );
            assert_eq!(a.walks - b.walks, 6.0 * 2.0 * 4.0 * blocks, "{pairs} pairs");
            assert_eq!(a.icr_pairs, b.icr_pairs);
        }
    }

    #[test]
    fn sample_fields_take_one_icr_pair_per_evaluation_and_a_forward_per_residual() {
        let stage = |pairs| StageConfig {
            sample_pairs: pairs,
            newton_steps: 3,
            ..Default::default()
        };
        let fields = Sharing {
            fields: true,
            ..Sharing::NONE
        };
        for pairs in [1, 2, 3] {
            let (a, b) = (
                stage_work(&stage(pairs), false, Sharing::NONE),
                stage_work(&stage(pairs), false, fields),
            );
            // 3 steps × 2 evaluations of 2N samples, an ICR pair each, against one pair per
            // evaluation and N forwards (half a pair each); the walks unchanged
            let n = pairs as f64;
            assert_eq!(a.icr_pairs - b.icr_pairs, 6.0 * 2.0 * n - (6.0 + 0.5 * n));
            assert_eq!([a.walks, a.quad_walks], [b.walks, b.quad_walks]);
        }
    }

    #[test]
    fn the_backend_and_the_window_length_decide_the_sharing() {
        let mut cfg = Config::default();
        let bytes = |entries: f64| WINDOW_STAR_BYTES + WINDOW_ENTRY_BYTES * entries;
        let max = crate::likelihood::cpu::TOGETHER_MAX_ENTRIES as f64;
        assert_eq!(
            Sharing::of(&cfg, bytes(max)),
            Sharing {
                lockstep: true,
                together: true,
                fields: true
            }
        );
        assert!(!Sharing::of(&cfg, bytes(max + 0.5)).together);
        cfg.noise.sample_nsigma = true;
        assert!(!Sharing::of(&cfg, bytes(10.0)).lockstep);
        cfg.noise.sample_nsigma = false;
        cfg.backend.kind = crate::app::config::BackendKind::Opencl;
        assert_eq!(Sharing::of(&cfg, bytes(10.0)), Sharing::NONE);
    }

    #[test]
    fn the_walk_costs_are_recovered_from_four_timed_problems() {
        // the timing problems' shapes (all stars and a quarter, on 4 and on 2 levels) and
        // made-up costs per voxel, star and entry
        let costs = [2.5e-9, 3.5e-9, 1.5e-9];
        let row = |v: f64, s: f64, e: f64| [v, s, e, costs[0] * v + costs[1] * s + costs[2] * e];
        let fine = [row(1.6e6, 2e5, 7e6), row(1.6e6, 5e4, 1.75e6)];
        let coarse = [row(2.8e4, 2e5, 1.9e6), row(2.8e4, 5e4, 4.8e5)];
        let got = walk_costs(fine, coarse);
        let got3 = [got.voxel_s, got.star_s, got.entry_s];
        for (g, c) in got3.iter().zip(costs) {
            assert!((g / c - 1.0).abs() < 1e-9, "{got:?} against {costs:?}");
        }
        // scatter that would make a cost negative leaves it at zero
        let n = walk_costs(fine, [[2.8e4, 2e5, 1.9e6, 1.0], coarse[1]]);
        assert!(
            n.voxel_s >= 0.0 && n.star_s >= 0.0 && n.entry_s >= 0.0,
            "{n:?}"
        );
    }
}
