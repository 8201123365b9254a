//! `dust3d plan`: memory and time of a distributed fit before it runs. The decomposition,
//! halos and matrix classes are the exact plans every rank would build; array sizes follow
//! the arrays the MGVI code holds at its peak (the KL minimisation); star windows are
//! measured on synthetic stars at the configured shells; kernel speeds are timed here.

use anyhow::Result;
use rand::Rng;
use rand_distr::StandardNormal;
use std::fmt::Write;
use std::time::Instant;

use crate::app::config::{Config, Precision, StageConfig};
use crate::prior::icr::exchange::{plan_step, StepKind};
use crate::prior::icr::geometry::LevelGeometry;
use crate::prior::icr::matrices::SITE_LEN;
use crate::sphere::decomp::Decomp;
use crate::sphere::grid::{self, Chart};

mod timing;

pub use timing::KernelSpeeds;
use timing::{iteration_seconds, kernel_speeds, stage_counts, stage_work, Sharing};

/// What to plan for.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// MPI ranks.
    pub ranks: usize,
    /// Stars after the selection cuts (the paper: 54 million).
    pub stars: f64,
    /// Threads per rank, for the time estimate.
    pub threads_per_rank: usize,
    /// Skip timing the kernels (fixed reference speeds instead).
    pub no_timing: bool,
    /// Global memory of each OpenCL device, GB: the plan then says whether the ranks that
    /// share one fit on it.
    pub device_gb: Option<f64>,
    /// MPI ranks sharing one device (with `device_gb`).
    pub ranks_per_device: usize,
}

/// Whether `opts.ranks_per_device` ranks needing `need` bytes each fit a device of
/// `opts.device_gb` (90 % usable, as the fit's own check), in words; None without a size.
fn device_fit_line(opts: &PlanOptions, need: f64, precision: Precision) -> Option<String> {
    let device = opts.device_gb?;
    let n = opts.ranks_per_device.max(1);
    let total = need * n as f64 / 1e9;
    let usable = 0.9 * device;
    let precision = format!("\"{precision:?}\"").to_lowercase();
    Some(if total <= usable {
        format!(
            "  fits a {device} GB device with {n} rank(s) on it: {total:.2} GB of {usable:.2} GB \
             usable (backend.precision = {precision})"
        )
    } else {
        format!(
            "  does NOT fit a {device} GB device with {n} rank(s) on it: {total:.2} GB against \
             {usable:.2} GB usable (backend.precision = {precision}); use more ranks (or fewer \
             per device), backend.precision = \"f32\" or grid.matrix_precision = \"f32\""
        )
    })
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            ranks: 64,
            stars: 54e6,
            threads_per_rank: 16,
            no_timing: false,
            device_gb: None,
            ranks_per_device: 1,
        }
    }
}

/// p-vectors ([x | ξ_σ]) alive at the KL peak: argmin's states (current, previous and best
/// points, gradients), the Newton right-hand side and direction, the CG's iterates (r, p,
/// Ap), the line search's trial point and gradient, the objective's cached gradient and the
/// KL cache's last point. Clones among them share their values (`newton::Values`) and the CG
/// works in the caller's right-hand side and solution, so six fewer than the 21 copies there
/// were: W1 and W2 peaks fell by 6.6 and 6.0 parameter vectors when that landed.
const P_VECTORS: f64 = 15.0;

/// Per-rank figures of one decomposition.
#[derive(Clone, Debug, Default)]
pub struct RankFigures {
    /// Final-level pixels.
    pub pixels: usize,
    /// Chart voxels of the final level.
    pub voxels: usize,
    /// Excitations (sampled parameters) on this rank.
    pub xi: usize,
    /// Stars.
    pub stars: f64,
    /// Angular classes per refinement step.
    pub classes: Vec<usize>,
    /// Bytes of field values sent per ICR forward + adjoint.
    pub icr_bytes: f64,
    /// Patches.
    pub patches: usize,
    /// Memory by item (name, bytes).
    pub memory: Vec<(&'static str, f64)>,
}

impl RankFigures {
    /// Total bytes.
    pub fn total(&self) -> f64 {
        self.memory.iter().map(|m| m.1).sum()
    }
}

/// Window bytes per star (8 per window entry plus its start, offset and κ), measured on 20,000
/// synthetic stars: volume-uniform distances over the configured catalog cut and
/// the simulator's parallax-error range, after the selection cuts.
pub fn window_bytes_per_star(cfg: &Config, chart: &Chart) -> f64 {
    stage_windows(cfg, chart, &StageConfig::default()).1
}

/// For a stage on `chart`: the fraction of the (synthetic, as in [`window_bytes_per_star`])
/// stars its distance selection keeps, and their window bytes per star.
fn stage_windows(cfg: &Config, chart: &Chart, stage: &StageConfig) -> (f64, f64) {
    let shells = chart.kept_shells();
    let (lo, hi) = (
        cfg.catalog.d_min_pc.unwrap_or(shells.edges_pc[0]),
        cfg.catalog
            .d_max_pc
            .unwrap_or(shells.edges_pc[shells.len()]),
    );
    let mut rng = crate::base::rng::stream(cfg.seed, crate::base::rng::streams::BENCH);
    let (mut w, mut s, mut passed) = (Vec::new(), Vec::new(), 0usize);
    let [e0, e1] = cfg.simulate.parallax_error_mas;
    while passed < 20_000 {
        let u: f64 = rng.random();
        let d = (lo.powi(3) + u * (hi.powi(3) - lo.powi(3))).cbrt();
        let sw: f64 = rng.random_range(e0..=e1);
        let n: f64 = rng.sample(StandardNormal);
        let om = 1000.0 / d + sw * n;
        if crate::data::catalog::passes_distance_cuts(om, sw, &cfg.catalog) {
            passed += 1;
            let k = stage.selection_sigma;
            if stage
                .max_distance_pc
                .is_none_or(|d| om + k * sw > 1000.0 / d)
            {
                w.push(om);
                s.push(sw);
            }
        }
    }
    let win =
        crate::likelihood::windows::Windows::with_prior(&shells, &w, &s, &cfg.distance_prior());
    let per_star = win.bytes() as f64 / w.len().max(1) as f64;
    (w.len() as f64 / passed as f64, per_star)
}

/// Memory and communication of rank `r` of `d`, with `stars` stars on it.
fn rank_figures(
    cfg: &Config,
    chart: &Chart,
    d: &Decomp,
    geoms: &[LevelGeometry],
    (stars, win_bytes): (f64, f64),
    pairs: usize,
) -> RankFigures {
    let mut f = RankFigures {
        stars,
        patches: d.patches().len(),
        ..Default::default()
    };
    let mut xi = chart.npix(0) * chart.n_r0;
    let mut field_pix = vec![chart.npix(0)];
    let (mut scatter, mut send) = (0usize, 0usize);
    let mut coarse_distributed = false;
    let mut matrices = (xi * xi * 8) as f64;
    let mbytes = cfg.grid.matrix_precision.bytes() as f64;
    for (l, g) in geoms.iter().enumerate() {
        let s = plan_step(g.clone(), d, coarse_distributed);
        let n_c = chart.n_r(l);
        let own = s.own.len();
        xi += own * (n_c - 2) * 8;
        *field_pix.last_mut().expect("level") += s.halo.len();
        field_pix.push(if s.kind == StepKind::Replicated {
            chart.npix(l + 1)
        } else {
            4 * own
        });
        f.classes.push(s.geom.n_classes());
        matrices += (s.geom.n_classes() * (n_c - 2) * SITE_LEN) as f64 * mbytes;
        let recv: usize = s.ex.back_recv_counts.iter().sum();
        scatter = scatter.max((9 * own + recv) * n_c);
        send = send.max(s.ex.halo_send.len().max(s.ex.back_send.len()) * n_c);
        let gathered = 9 * own * n_c * d.size().saturating_sub(1);
        f.icr_bytes += 8.0 * ((s.ex.halo_send.len() + s.ex.back_send.len()) * n_c) as f64;
        if s.kind == StepKind::Gathered {
            f.icr_bytes += 8.0 * gathered as f64;
        }
        coarse_distributed = s.kind != StepKind::Replicated;
    }
    let nl = chart.levels;
    f.pixels = *field_pix.last().expect("final level");
    f.voxels = f.pixels * chart.n_r(nl);
    f.xi = xi;
    let n_kept = chart.n_kept();
    let fields: usize = (0..=nl).map(|l| field_pix[l] * chart.n_r(l)).sum();
    let pairs = pairs as f64;
    let (nx, ns) = (xi as f64 + 2.0, stars);
    // two model workspaces (the iteration's and the KL's): ICR levels, exchange buffers,
    // the field cotangent and its accumulator, per-star and per-pixel scratch (tangents are
    // not copied to mask them: no excitation is held)
    let work = 2.0
        * 8.0
        * ((fields + scatter + send) as f64
            + 2.0 * f.voxels as f64
            + 2.0 * ns
            + 3.0 * f.pixels as f64);
    let states = 2.0 * pairs * 8.0 * (2.0 * (f.pixels * n_kept) as f64 + 4.0 * ns);
    f.memory = vec![
        ("model states (2N samples)", states),
        (
            "parameter vectors",
            // the residuals, the KL's one sample-point buffer and three more x-vectors
            8.0 * (P_VECTORS * (nx + ns) + (pairs + 4.0) * nx),
        ),
        ("star windows", win_bytes * ns),
        ("workspaces", work),
        ("refinement matrices", matrices),
        (
            "catalog (rank's stars, 2 copies)",
            2.0 * 64.0 * ns + 24.0 * ns,
        ),
    ];
    f
}

/// Decompose for `opts.ranks` with stars spread evenly over the sky.
fn decompose(chart: &Chart, nside_dec: u32, opts: &PlanOptions, r: usize) -> Result<Decomp> {
    let n = grid::npix(nside_dec);
    let per = grid::npix(chart.nside_final()) / n;
    let work = vec![(per * chart.n_kept()) as f64 + 4.0 * opts.stars / n as f64; n];
    Decomp::balanced(nside_dec, r, opts.ranks, &work)
}

/// Figures of the rank that needs the most memory, and the window bytes per star.
pub fn largest_rank(cfg: &Config, opts: &PlanOptions) -> Result<(RankFigures, f64)> {
    largest_rank_index(cfg, opts).map(|(f, w, _)| (f, w))
}

/// [`largest_rank`] and that rank's index.
fn largest_rank_index(cfg: &Config, opts: &PlanOptions) -> Result<(RankFigures, f64, usize)> {
    let chart = cfg.chart()?;
    let nside_dec = cfg.nside_dec()?;
    let geoms: Vec<LevelGeometry> = (0..chart.levels)
        .map(|l| LevelGeometry::new(chart.nside(l)))
        .collect();
    let win_bytes = window_bytes_per_star(cfg, &chart);
    let n_patch = grid::npix(nside_dec);
    let (mut worst, mut at) = (RankFigures::default(), 0);
    let pairs = cfg.inference.max_sample_pairs();
    for r in 0..opts.ranks {
        let d = decompose(&chart, nside_dec, opts, r)?;
        let stars = opts.stars * d.patches().len() as f64 / n_patch as f64;
        let f = rank_figures(cfg, &chart, &d, &geoms, (stars, win_bytes), pairs);
        if f.total() > worst.total() {
            (worst, at) = (f, r);
        }
    }
    Ok((worst, win_bytes, at))
}

/// The plan as text.
pub fn run(cfg: &Config, opts: &PlanOptions) -> Result<String> {
    let t0 = Instant::now();
    let chart = cfg.chart()?;
    let nside_dec = cfg.nside_dec()?;
    let n_patch = grid::npix(nside_dec);
    let (worst, win_bytes, worst_rank) = largest_rank_index(cfg, opts)?;
    let mut s = String::new();
    writeln!(
        s,
        "dust3d plan: nside {} x {} chart shells ({} kept), {} levels, {:.3e} stars, {} ranks, \
         nside_dec {} ({} patches)",
        chart.nside_final(),
        chart.n_r(chart.levels),
        chart.n_kept(),
        chart.levels,
        opts.stars,
        opts.ranks,
        nside_dec,
        n_patch
    )?;
    let f = &worst;
    writeln!(
        s,
        "largest rank: {} patches, {} pixels, {:.3e} chart voxels, {:.3e} excitations, {:.3e} stars",
        f.patches, f.pixels, f.voxels as f64, f.xi as f64, f.stars
    )?;
    writeln!(s, "angular classes per refinement step: {:?}", f.classes)?;
    s += &memory_lines(cfg, f, opts, win_bytes)?;
    let speeds = kernel_speeds(opts.no_timing)?;
    s += &traffic_and_time(cfg, &worst, opts, win_bytes, speeds)?;
    s += &stage_lines(cfg, opts, worst_rank, speeds)?;
    writeln!(s, "(planned in {:.1} s)", t0.elapsed().as_secs_f64())?;
    Ok(s)
}

/// The memory lines of rank `f`: each item, the device estimate, the per-unit figures and the
/// catalog's transient peak while it is read.
fn memory_lines(
    cfg: &Config,
    f: &RankFigures,
    opts: &PlanOptions,
    win_bytes: f64,
) -> Result<String> {
    let chart = cfg.chart()?;
    let mut s = String::new();
    let gb = |b: f64| b / 1e9;
    writeln!(s, "memory per rank (largest), GB:")?;
    for (k, v) in &f.memory {
        writeln!(s, "  {k:<34} {:>8.3}", gb(*v))?;
    }
    writeln!(s, "  {:<34} {:>8.3}", "total", gb(f.total()))?;
    let matrices = f
        .memory
        .iter()
        .find(|m| m.0 == "refinement matrices")
        .map_or(0.0, |m| m.1);
    let device = |scalar| {
        crate::backend::opencl::memory::DeviceBytes::estimate(
            matrices as usize,
            cfg.grid.matrix_precision == Precision::F32,
            (win_bytes * f.stars) as usize,
            // the coarser levels add about 1/7 of the final one
            &[f.voxels * 8 / 7],
            f.stars as usize,
            f.xi + f.stars as usize,
            scalar,
        )
        .total()
    };
    writeln!(
        s,
        "  on the rank's OpenCL device (backend.kind = \"opencl\", one device per rank, checked \
         on every rank before a fit; ranks sharing a device add up): about {:.2} GB in f64, \
         {:.2} GB in f32",
        gb(device(8)),
        gb(device(4))
    )?;
    let scalar = cfg.backend.precision.bytes();
    if let Some(line) = device_fit_line(opts, device(scalar), cfg.backend.precision) {
        writeln!(s, "{line}")?;
    }
    let per_voxel = (f.memory[0].1 + f.memory[3].1) / f.voxels as f64;
    let per_xi = f.memory[1].1 / (f.xi as f64 + f.stars);
    let l = chart.levels.max(1) - 1;
    let mbytes = cfg.grid.matrix_precision.bytes();
    let per_class = (chart.n_r(l) - 2) * SITE_LEN * mbytes;
    writeln!(
        s,
        "  per chart voxel {per_voxel:.0} B (states, workspaces); per parameter {per_xi:.0} B; \
         per star {:.0} B of windows; per angular class of the last step {:.0} KB of matrices",
        win_bytes,
        per_class as f64 / 1e3
    )?;
    // a rank's share of the rows (7 columns + row) and the 8-value exchange records
    let catalog_peak = (64.0 + 2.0 * 64.0) * opts.stars / opts.ranks as f64;
    writeln!(
        s,
        "  reading the catalog: each rank reads 1/{} of the rows (FITS/netCDF: a block; CSV: \
         every {}-th row) and receives its stars: transient {:.2} GB before the fit starts",
        opts.ranks,
        opts.ranks,
        gb(catalog_peak)
    )?;
    Ok(s)
}

/// Communication and time per global iteration of rank `f`, at the last stage's CG caps.
fn traffic_and_time(
    cfg: &Config,
    f: &RankFigures,
    opts: &PlanOptions,
    win_bytes: f64,
    speeds: KernelSpeeds,
) -> Result<String> {
    let mut s = String::new();
    let gb = |b: f64| b / 1e9;
    let last = cfg.inference.stage.last().cloned().unwrap_or_default();
    let (n, cs, sn, cn) = stage_counts(&last);
    let share = Sharing::of(cfg, win_bytes);
    let icr_pairs = stage_work(&last, cfg.noise.sample_nsigma, share).icr_pairs;
    let sums = 2.0 * (n * cs + sn * cn) + sn * 2.0 * 2.0 * n * 4.0 + sn * cn * 2.0 * n;
    let sum_bytes = 8.0 * 2.0 * f.patches as f64 * (opts.ranks as f64 - 1.0);
    let t_iter = iteration_seconds(cfg, &last, f, win_bytes, speeds) / opts.threads_per_rank as f64;
    writeln!(s, "communication per rank:")?;
    writeln!(
        s,
        "  per ICR forward+adjoint {:.2} MB; per global sum {:.1} KB",
        f.icr_bytes / 1e6,
        sum_bytes / 1e3
    )?;
    writeln!(
        s,
        "  per global iteration at the last stage's CG caps ({} pairs, {} sampling / {} Newton \
         CG steps, {} Newton steps): {:.0} ICR pairs, {:.0} sums -> {:.2} GB",
        last.sample_pairs,
        last.sample_cg_iterations,
        last.newton_cg_iterations,
        last.newton_steps,
        icr_pairs,
        sums,
        gb(icr_pairs * f.icr_bytes + sums * sum_bytes)
    )?;
    writeln!(
        s,
        "time per global iteration (largest rank, {} threads, ideal thread scaling, {}: {:.1} ns \
         per voxel per ICR pair; per star walk {}, of two tangents at one state {}, of four \
         states side by side {}; {:.2} ns per value per vector pass): {:.0} s",
        opts.threads_per_rank,
        if opts.no_timing {
            "reference kernel speeds (--no-timing)"
        } else {
            "kernels timed here"
        },
        speeds.voxel_s * 1e9,
        walk_figures(speeds.walk),
        walk_figures(speeds.pair_walk),
        walk_figures(speeds.quad_walk),
        speeds.vector_s * 1e9,
        t_iter
    )?;
    Ok(s)
}

/// A walk's costs as the plan prints them.
fn walk_figures(c: timing::WalkCosts) -> String {
    format!(
        "{:.2} ns per voxel, {:.1} ns per star and {:.2} ns per window entry",
        c.voxel_s * 1e9,
        c.star_s * 1e9,
        c.entry_s * 1e9
    )
}

/// Seconds to two significant figures at least (a coarse stage may take one).
fn seconds(t: f64) -> String {
    if t < 10.0 {
        format!("{t:.1}")
    } else {
        format!("{t:.0}")
    }
}

/// One line per schedule stage: its chart, stars, memory and time per iteration on the
/// largest rank (a coarse stage runs on its own chart, docs/model.md).
fn stage_lines(
    cfg: &Config,
    opts: &PlanOptions,
    rank: usize,
    speeds: KernelSpeeds,
) -> Result<String> {
    let chart = cfg.chart()?;
    let nside_dec = cfg.nside_dec()?;
    let d = decompose(&chart, nside_dec, opts, rank)?;
    let share = d.patches().len() as f64 / grid::npix(nside_dec) as f64;
    let mut s = String::from("per stage (largest rank, at each stage's CG caps):\n");
    for (i, sc) in cfg.inference.stage.iter().enumerate() {
        let k = sc.levels.unwrap_or(chart.levels).min(chart.levels);
        let c = chart.truncated(k);
        if opts.ranks > 1
            && !crate::sphere::decomp::last_refinement_distributed(&chart, k, nside_dec)
        {
            writeln!(
                s,
                "  stage {i}: {k} levels would end at nside {}: too coarse for nside_dec {nside_dec} \
                 on {} ranks (the fit refuses it)",
                c.nside_final(),
                opts.ranks
            )?;
            continue;
        }
        let geoms: Vec<LevelGeometry> =
            (0..k).map(|l| LevelGeometry::new(chart.nside(l))).collect();
        let (kept, win_bytes) = stage_windows(cfg, &c, sc);
        let stars = opts.stars * share * kept * sc.star_fraction;
        let f = rank_figures(cfg, &c, &d, &geoms, (stars, win_bytes), sc.sample_pairs);
        let t = iteration_seconds(cfg, sc, &f, win_bytes, speeds) / opts.threads_per_rank as f64;
        writeln!(
            s,
            "  stage {i}: {k} levels, nside {} x {} shells, {:.3e} voxels, {:.3e} stars, {:.2} GB, \
             {} s per iteration (at most {} iterations)",
            c.nside_final(),
            c.n_kept(),
            f.voxels as f64,
            f.stars,
            f.total() / 1e9,
            seconds(t),
            sc.iterations
        )?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_problem_fits_16_gb_per_rank_on_64_ranks() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/paper.toml");
        let (cfg, _) = Config::from_file(&path).unwrap();
        let opts = PlanOptions {
            no_timing: true,
            ..Default::default()
        };
        let (f, win) = largest_rank(&cfg, &opts).unwrap();
        // 786,432 pixels × 772 chart shells over 64 ranks; the paper's 54 M stars
        assert_eq!(f.pixels, 12288);
        assert_eq!(f.voxels, 12288 * 772);
        assert!((f.stars - 54e6 / 64.0).abs() < 1.0);
        assert!(win > 100.0 && win < 10_000.0, "{win} B per star");
        let total = f.total();
        assert!(total < 16e9 && total > 4e9, "{total:e} B per rank");
        // the same problem on 16 ranks needs about four times as much
        let (f16, _) = largest_rank(&cfg, &PlanOptions { ranks: 16, ..opts }).unwrap();
        let r = f16.total() / total;
        assert!((3.0..4.5).contains(&r), "16 vs 64 ranks: {r}");
    }

    #[test]
    fn a_device_size_says_whether_the_ranks_sharing_it_fit() {
        let opts = |gb, n| PlanOptions {
            device_gb: Some(gb),
            ranks_per_device: n,
            ..Default::default()
        };
        // 3.7 GB per rank (the paper's grid on 64 ranks, f64)
        let fits = device_fit_line(&opts(80.0, 4), 3.7e9, Precision::F64).unwrap();
        assert!(
            fits.contains("fits a 80 GB device with 4 rank(s)"),
            "{fits}"
        );
        let not = device_fit_line(&opts(16.0, 4), 3.7e9, Precision::F64).unwrap();
        assert!(
            not.contains("does NOT fit") && not.contains("14.80 GB"),
            "{not}"
        );
        assert!(device_fit_line(&PlanOptions::default(), 3.7e9, Precision::F64).is_none());
    }

    #[test]
    fn every_stage_is_planned_on_its_own_chart() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.toml");
        let (cfg, _) = Config::from_file(&path).unwrap();
        let opts = PlanOptions {
            ranks: 1,
            stars: 20_000.0,
            threads_per_rank: 2,
            no_timing: true,
            ..Default::default()
        };
        let text = run(&cfg, &opts).unwrap();
        assert!(
            text.contains("stage 0: 1 levels, nside 4 x 12 shells"),
            "{text}"
        );
        assert!(
            text.contains("stage 1: 2 levels, nside 8 x 24 shells"),
            "{text}"
        );
        // on more ranks than the coarse chart's patches allow for its last refinement
        let mut cfg4 = cfg;
        cfg4.parallel.nside_dec = Some(4);
        let text = run(&cfg4, &PlanOptions { ranks: 4, ..opts }).unwrap();
        assert!(
            text.contains("stage 0: 1 levels would end at nside 4: too coarse"),
            "{text}"
        );
    }
}
