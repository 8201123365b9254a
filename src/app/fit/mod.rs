//! `dust3d fit`: from a catalog to a posterior map. Runs the MGVI schedule stage by stage,
//! checkpoints after every global iteration, and writes the map (samples, mean, std, the
//! inner-region integral), the per-star predictions and the convergence history.

mod diagnostics;
mod preflight;
mod products;
mod resume;
mod selection;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::app::checkpoint::{self, FitState, HistoryRow, RunId};
use crate::app::config::Config;
use crate::base::comm::{self, process_cpu_seconds};
use crate::base::provenance::sha256_file;
use crate::data::catalog::{read_distributed, PixelCatalog};
use crate::inference::mgvi;
use crate::prior::icr::Icr;
use crate::sphere::grid::Chart;
pub use products::map_from_samples;
use products::write_products;
use resume::{checkpoint_dir_stem, resume_point, save_checkpoint};
use selection::split_holdout;
pub use selection::{stage_mask, stage_stars};

/// Paths written by a fit next to the map.
pub struct FitPaths {
    /// The map (netCDF).
    pub map: PathBuf,
    /// Per-star predicted extinctions (CSV).
    pub stars: PathBuf,
    /// Convergence history (CSV).
    pub history: PathBuf,
    /// Scores of the held-out stars (JSON).
    pub validation: PathBuf,
    /// This rank's checkpoint (`<stem>.ckpt` on one process, `<stem>.r<r>of<n>.ckpt` on n
    /// ranks).
    pub checkpoint: PathBuf,
    /// The checkpoint before it (kept until the next one is on disk, so that a job killed
    /// while ranks were writing still finds one position every rank has).
    pub previous: PathBuf,
}

impl FitPaths {
    /// Paths for output map `out` (checkpoint in `checkpoint_dir` if given) on one process.
    pub fn new(out: &Path, checkpoint_dir: Option<&str>) -> Self {
        Self::for_rank(out, checkpoint_dir, 0, 1)
    }

    /// Paths of rank `rank` of `size`.
    pub fn for_rank(out: &Path, checkpoint_dir: Option<&str>, rank: usize, size: usize) -> Self {
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "map".into());
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        let ck_dir = checkpoint_dir
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.clone());
        let ck = if size == 1 {
            stem.clone()
        } else {
            format!("{stem}.r{rank}of{size}")
        };
        Self {
            map: out.to_path_buf(),
            stars: dir.join(format!("{stem}_stars.csv")),
            history: dir.join(format!("{stem}_history.csv")),
            validation: dir.join(format!("{stem}_validation.json")),
            checkpoint: ck_dir.join(format!("{ck}.ckpt")),
            previous: ck_dir.join(format!("{ck}.prev.ckpt")),
        }
    }
}

/// What a fit works with on this rank.
struct Setup {
    chart: Chart,
    icr: Arc<Icr>,
    /// This rank's stars (its pixel range of the final level), held-out ones excluded.
    stars: PixelCatalog,
    /// This rank's held-out stars, scored against the finished map.
    holdout: PixelCatalog,
    /// Identity of the run.
    id: RunId,
    /// This rank's part, as checkpoints record it.
    part: checkpoint::Part,
    /// Resumed from another rank count's checkpoints, still on disk until the first save.
    resharded: std::cell::Cell<bool>,
}

/// Read the catalog, split the sky over the ranks and build this rank's ICR operator.
fn setup(cfg: &Config, config_text: &str, catalog: &Path) -> Result<Setup> {
    let chart = cfg.chart()?;
    let id = RunId {
        seed: cfg.seed,
        // the held-out set is part of the run: `fit --holdout` may override the file
        config_sha256: Sha256::digest(
            format!(
                "{config_text}\n# holdout_fraction = {}",
                cfg.validation.holdout_fraction
            )
            .as_bytes(),
        )
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect(),
        catalog_sha256: sha256_file(catalog)?,
    };
    let nside = chart.nside_final();
    let nside_dec = cfg.nside_dec()?;
    let (decomp, cat) = read_distributed(&cfg.catalog, nside_dec, &chart, catalog)?;
    let part = checkpoint::Part {
        rank: decomp.rank,
        size: decomp.size(),
        patches: (decomp.patches().start, decomp.patches().end),
        nside_dec,
        patch_stars: Vec::new(),
    };
    let t0 = Instant::now();
    let icr = Arc::new(crate::app::build::icr(cfg, decomp)?);
    let (stars, holdout) = split_holdout(
        cat.into_pixel_range(nside, icr.final_pixels()),
        cfg.validation.holdout_fraction,
        cfg.seed,
    );
    // collectives outside the log macros: they skip their arguments where filtered out
    let n_stars = comm::sum_u64(stars.stars.len() as u64);
    tracing::info!(
        stars = n_stars,
        nside,
        shells = chart.n_kept(),
        ranks = comm::size(),
        "catalog read"
    );
    tracing::info!(
        seconds = t0.elapsed().as_secs_f64(),
        matrix_mb = icr.matrix_bytes() as f64 / 1e6,
        classes = ?icr.class_counts(),
        "ICR prior ready"
    );
    Ok(Setup {
        chart,
        icr,
        stars,
        holdout,
        id,
        part,
        resharded: std::cell::Cell::new(false),
    })
}

/// Run (or resume) a fit; on several ranks, this rank's part of it.
pub fn run(
    cfg: &Config,
    config_text: &str,
    catalog: &Path,
    out: &Path,
    resume: bool,
) -> Result<()> {
    let (rank, size) = (comm::rank(), comm::size());
    let paths = FitPaths::for_rank(out, cfg.inference.checkpoint_dir.as_deref(), rank, size);
    let chart = cfg.chart()?;
    preflight::check_memory(cfg, &chart)?;
    preflight::check_disk(cfg, &chart, &paths)?;
    crate::base::stop::install();
    let su = setup(cfg, config_text, catalog)?;
    let mut st = match resume_point(&paths, &su, resume)? {
        Some(s) => s,
        None => FitState {
            stage: 0,
            iteration: 0,
            vi: mgvi::MgviState::start(su.icr.n_xi() + 2),
            history: vec![],
        },
    };
    run_schedule(cfg, &su, &paths, &mut st)?;
    crate::base::stop::check()?;
    write_products(cfg, config_text, &su, &paths, &st)?;
    // the products are complete on every rank: the checkpoints have served their purpose
    comm::barrier();
    std::fs::remove_file(&paths.checkpoint).ok();
    std::fs::remove_file(&paths.previous).ok();
    if comm::is_root() && su.resharded.get() {
        let (dir, stem) = checkpoint_dir_stem(&paths);
        crate::app::reshard::remove_other_sets(&dir, &stem, size)?;
    }
    Ok(())
}

fn run_schedule(cfg: &Config, su: &Setup, paths: &FitPaths, st: &mut FitState) -> Result<()> {
    let stages = &cfg.inference.stage;
    // a coarse chart the decomposition cannot run stops the job now, not stages later
    for (i, sc) in stages.iter().enumerate() {
        if let Some(k) = sc.levels.filter(|&k| k < su.icr.chart.levels) {
            su.icr
                .check_truncation(k)
                .with_context(|| format!("inference.stage[{i}].levels = {k}"))?;
        }
    }
    let total: usize = stages.iter().map(|s| s.iterations).sum();
    let done: usize = stages[..st.stage.min(stages.len())]
        .iter()
        .map(|s| s.iterations)
        .sum::<usize>()
        + st.iteration;
    let pb = crate::base::logging::progress(total as u64, "MGVI");
    pb.set_position(done as u64);
    while st.stage < stages.len() {
        let sc = &stages[st.stage];
        let stage = StageRun::new(cfg, su, st)?;
        while st.iteration < sc.iterations {
            let (row, sample_cg) = stage.iterate(cfg.seed, st)?;
            let converged = row.converged;
            pb.suspend(|| log_row(&row, &sample_cg));
            st.history.push(row);
            save_checkpoint(paths, su, st, &stage.part)?;
            injected_failure(st.history.len());
            pb.inc(1);
            if converged {
                pb.inc((sc.iterations - st.iteration) as u64);
                break;
            }
        }
        st.stage += 1;
        st.iteration = 0;
        save_checkpoint(paths, su, st, &stage.part)?;
    }
    pb.finish_and_clear();
    Ok(())
}

/// What to do when a fit's density overflows.
const OVERFLOW_HINT: &str = "typically a spike grown where only the tails of distance windows \
     reach; no map written. Leaving σ_a² out of the earlier stages (distance_variance = false) \
     prevents it";

/// Why the first iteration from the prior median can meet an overflow.
const PRIOR_OVERFLOW_HINT: &str = "the first iteration, from the prior median: usually \
     ρ = exp(scale · s + prior.offset_mean) is far from the data's units there; check \
     prior.offset_mean (ln ρ; -6.91, ρ ≈ 1e-3 E per pc, in the paper) and prior.scale_mean; no \
     map written";

/// One stage of the schedule, ready to iterate: its stars, model, free entries and settings.
struct StageRun {
    model: crate::likelihood::model::Model,
    mask: crate::likelihood::mask::Mask,
    settings: mgvi::IterationSettings,
    convergence: mgvi::Convergence,
    /// This rank's part with the stage's stars per patch, as checkpoints record it.
    part: checkpoint::Part,
    /// Stars of the stage on all ranks.
    n_stars: usize,
    /// On a coarse stage's own chart: its excitations, then all of the full chart's.
    cut: Option<(usize, usize)>,
}

/// The chart a stage runs on, its ICR, its stars pixelised for it, and for a coarse chart
/// (its excitations, all excitations).
struct StageChart {
    icr: Arc<Icr>,
    stars: PixelCatalog,
    cut: Option<(usize, usize)>,
}

/// With `levels` below the grid's, the chart ended at that level (its pixels, shells and
/// stars pixelised there), so the stage costs what that chart costs; else the full one.
fn stage_chart(
    su: &Setup,
    sc: &crate::app::config::StageConfig,
    stage: usize,
    stars: PixelCatalog,
) -> Result<StageChart> {
    let full = su.icr.chart.levels;
    let Some(k) = sc.levels.filter(|&k| k < full) else {
        return Ok(StageChart {
            icr: su.icr.clone(),
            stars,
            cut: None,
        });
    };
    let icr = su
        .icr
        .truncated(k)
        .with_context(|| format!("inference.stage[{stage}].levels = {k}"))?;
    Ok(StageChart {
        stars: stars.coarsened(icr.chart.nside_final()),
        cut: Some((icr.n_xi(), su.icr.n_xi())),
        icr: Arc::new(icr),
    })
}

impl StageRun {
    /// Select the stage's stars and build its model; n_σ restarts from its prior median when
    /// the star set changed.
    fn new(cfg: &Config, su: &Setup, st: &mut FitState) -> Result<Self> {
        let sc = &cfg.inference.stage[st.stage];
        let stars = stage_stars(&su.stars, sc, cfg.seed);
        let n_stars = comm::sum_u64(stars.stars.len() as u64) as usize;
        if n_stars == 0 {
            bail!(
                "inference.stage[{}] selects no stars (max_distance_pc / star_fraction)",
                st.stage
            );
        }
        let StageChart { icr, stars, cut } = stage_chart(su, sc, st.stage, stars)?;
        let model = crate::app::build::stage_model(cfg, st.stage, icr, &stars)?;
        let mask = mgvi::free_mask();
        let mut part = su.part.clone();
        part.patch_stars = model.dom.stars.patch.iter().map(|r| r[0].len()).collect();
        // a new data set: n_σ starts again from its prior median (paper §5). Decided on all
        // ranks together: a rank whose own stars did not change resets too, as one process
        // holding every star would
        let changed = u64::from(st.vi.xsig.len() != model.data.len());
        if comm::sum_u64(changed) > 0 {
            st.vi.xsig = vec![0.0; model.data.len()];
        }
        Ok(Self {
            model,
            mask,
            settings: sc.iteration_settings(&cfg.noise),
            convergence: sc.convergence(),
            part,
            n_stars,
            cut,
        })
    }

    /// One global iteration; returns its history row and the CG iterations of each
    /// residual draw.
    fn iterate(&self, seed: u64, st: &mut FitState) -> Result<(HistoryRow, Vec<usize>)> {
        let (t, cpu0) = (Instant::now(), process_cpu_seconds());
        let (bytes0, mpi0) = (comm::bytes_sent(), comm::mpi_cpu_seconds());
        let streams = mgvi::Streams {
            seed,
            stage: st.stage,
            iteration: st.iteration,
        };
        // a held update of the scale's own factor keeps the factor's last spread, not the
        // samples' (all at the held scale)
        let held_std = (st.history.last())
            .filter(|r| r.stage == st.stage)
            .map_or(f64::NAN, |r| r.scale_std);
        let mut coarse = self.cut.map(|(n, full)| st.vi.restricted(n, full));
        let vi = coarse.as_mut().unwrap_or(&mut st.vi);
        let nonzero = vi.x.iter().chain(&vi.xsig).any(|&x| x != 0.0);
        let at_prior_centre = comm::sum_u64(u64::from(nonzero)) == 0;
        let at = format!(
            "inference.stage[{}] iteration {}",
            st.stage,
            st.iteration + 1
        );
        let rep = mgvi::global_iteration(&self.model, &self.settings, &self.mask, vi, streams)
            .map_err(|e| iteration_error(e, &at, at_prior_centre))?;
        if !rep.kl.is_finite() {
            // nothing can move from an infinite energy: stop with the reason, not a map
            bail!(
                "{at}: the KL is {} — the density overflowed (ln ρ beyond 709) where stars see \
                 it; {OVERFLOW_HINT}",
                rep.kl
            );
        }
        let [scale_mean, scale_std] = match rep.scale {
            Some(f) => [f.scale, f.std],
            None if self.settings.scale_update != mgvi::scale::ScaleUpdate::Joint => {
                [sample_scale(&self.model, vi)[0], held_std]
            }
            None => sample_scale(&self.model, vi),
        };
        if let (Some(c), Some((n, full))) = (coarse, self.cut) {
            st.vi.absorb(c, n, full);
        }
        st.iteration += 1;
        let converged = self.convergence.met_by(&rep.change);
        let row = HistoryRow {
            stage: st.stage,
            iteration: st.iteration,
            n_stars: self.n_stars,
            kl: rep.kl,
            newton_steps: rep.newton.steps,
            newton_cg: rep.newton.cg_iterations.iter().sum(),
            sample_cg: rep.sample_cg.iter().sum(),
            grad_norm: rep.newton.grad_norms.last().copied().unwrap_or(f64::NAN),
            step: rep.newton.step_norms.last().copied().unwrap_or(f64::NAN),
            seconds: t.elapsed().as_secs_f64(),
            peak_rss_bytes: comm::max_f64(crate::app::bench::peak_rss_bytes() as f64) as u64,
            ranks: comm::size(),
            cpu_seconds: sum_f64(process_cpu_seconds() - cpu0),
            mpi_cpu_seconds: sum_f64(comm::mpi_cpu_seconds() - mpi0),
            mpi_bytes: comm::sum_u64(comm::bytes_sent() - bytes0),
            kl_change: rep.change.kl_relative,
            step_rms: rep.change.step_rms,
            map_change: rep.change.map_z_rms,
            sample_cg_capped: rep.sample_cg_capped,
            newton_cg_capped: rep.newton.cg_capped,
            converged,
            scale_mean,
            scale_std,
        };
        warn_capped(&self.settings, &rep, at_prior_centre);
        Ok((row, rep.sample_cg))
    }
}

/// An iteration's error in the words of where it happened (`at`), with the hint for a
/// density that overflowed.
fn iteration_error(e: anyhow::Error, at: &str, at_prior_centre: bool) -> anyhow::Error {
    let overflow = e
        .chain()
        .any(|c| c.is::<crate::inference::newton::NonFiniteObjective>());
    match overflow {
        // from the prior median nothing has grown yet: the prior itself overflows
        true if at_prior_centre => e.context(format!("{at} ({PRIOR_OVERFLOW_HINT})")),
        true => e.context(format!("{at} ({OVERFLOW_HINT})")),
        false => e.context(at.to_string()),
    }
}

/// A warning for every CG of the iteration that stopped at its cap with its tolerance unmet
/// (the samples or the Newton steps are then less accurate than configured). Samples drawn
/// about the prior's centre (ξ = 0, the first iteration of a fresh fit) only steer that
/// iteration's steps: every later iteration draws its own, and the metric there (a flat
/// field, every star's column far from its data) is the worst-conditioned of the fit, so a
/// capped CG there is reported at info level.
fn warn_capped(
    settings: &mgvi::IterationSettings,
    rep: &mgvi::IterationReport,
    at_prior_centre: bool,
) {
    if rep.sample_cg_capped > 0 {
        let worst = rep
            .sample_cg_residuals
            .iter()
            .fold(0.0f64, |m, &r| m.max(r));
        let (capped, of) = (rep.sample_cg_capped, rep.sample_cg.len());
        let (cap, tolerance) = (settings.sample_cg_iterations, settings.sample_cg_tolerance);
        let worst_rel_residual = format!("{worst:.2e}");
        if at_prior_centre {
            tracing::info!(
                capped,
                of,
                cap,
                tolerance,
                worst_rel_residual,
                "sampling CG about the prior's centre stopped at its cap (these first samples \
                 only steer the first iteration; later iterations draw their own)"
            );
        } else {
            tracing::warn!(
                capped,
                of,
                cap,
                tolerance,
                worst_rel_residual,
                "sampling CG stopped at its cap (raise sample_cg_iterations)"
            );
        }
    }
    if rep.newton.cg_capped > 0 {
        let worst = rep
            .newton
            .cg_residuals
            .iter()
            .fold(0.0f64, |m, &r| m.max(r));
        tracing::warn!(
            capped = rep.newton.cg_capped,
            of = rep.newton.cg_iterations.len(),
            cap = settings.newton_cg_iterations,
            forcing = settings.newton_forcing,
            worst_rel_residual = format!("{worst:.2e}"),
            "Newton CG stopped at its cap (raise newton_cg_iterations)"
        );
    }
}

/// Mean and standard deviation of the field's scale over the samples of `vi` (its latent
/// entry is replicated on every rank).
fn sample_scale(model: &crate::likelihood::model::Model, vi: &mgvi::MgviState) -> [f64; 2] {
    let nxi = model.icr.n_xi();
    let values: Vec<f64> = (0..vi.n_samples())
        .map(|j| model.scale.value(vi.sample_entry(j, nxi)))
        .collect();
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    [mean, var.sqrt()]
}

/// One log line per global iteration.
fn log_row(row: &HistoryRow, sample_cg: &[usize]) {
    tracing::info!(
        stage = row.stage,
        iteration = row.iteration,
        stars = row.n_stars,
        kl = row.kl,
        grad_norm = format!("{:.3e}", row.grad_norm),
        step = format!("{:.3e}", row.step),
        newton_steps = row.newton_steps,
        newton_cg = row.newton_cg,
        sample_cg = ?sample_cg,
        seconds = format!("{:.2}", row.seconds),
        rss_mb = row.peak_rss_bytes / (1 << 20),
        mpi_mb = format!("{:.1}", row.mpi_bytes as f64 / 1e6),
        kl_change = format!("{:.2e}", row.kl_change),
        step_rms = format!("{:.2e}", row.step_rms),
        map_change = format!("{:.2e}", row.map_change),
        converged = row.converged,
        scale = format!("{:.3} ± {:.3}", row.scale_mean, row.scale_std),
        "MGVI iteration"
    )
}

/// Fault injection for the resilience tests of the batch scripts: with
/// `DUST3D_TEST_FAIL_AFTER=k` and `DUST3D_TEST_FAIL_MARKER=file`, the last rank aborts (as a
/// failed node would) right after its k-th checkpoint, once: the marker records that it did.
fn injected_failure(iterations_done: usize) {
    let (Ok(k), Ok(marker)) = (
        std::env::var("DUST3D_TEST_FAIL_AFTER"),
        std::env::var("DUST3D_TEST_FAIL_MARKER"),
    ) else {
        return;
    };
    let last = comm::rank() + 1 == comm::size();
    if last && k.parse() == Ok(iterations_done) && !Path::new(&marker).exists() {
        let _ = std::fs::write(&marker, "failed once\n");
        eprintln!(
            "DUST3D_TEST_FAIL_AFTER: rank {} aborts after checkpoint {k}",
            comm::rank()
        );
        std::process::abort();
    }
}

/// Sum over ranks of a float, in rank order (exact reproducibility is not needed here).
fn sum_f64(v: f64) -> f64 {
    let size = comm::size();
    comm::all_gather_f64(&[v], &vec![1; size]).iter().sum()
}
