//! `dust3d fit`: from a catalog to a posterior map. Runs the MGVI schedule stage by stage,
//! checkpoints after every global iteration, and writes the map (samples, mean, std, the
//! inner-region integral), the per-star predictions and the convergence history.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::atomic::write_atomically;
use crate::catalog::{Catalog, PixelCatalog};
use crate::checkpoint::{self, FitState, HistoryRow, RunId};
use crate::comm;
use crate::config::{Config, StageConfig};
use crate::decomp::Decomp;
use crate::grid::{self, Chart, Shells};
use crate::icr::Icr;
use crate::mapfile::DustMap;
use crate::mgvi;
use crate::model::Model;
use crate::provenance::{sha256_file, Provenance};

/// Paths written by a fit next to the map.
pub struct FitPaths {
    /// The map (netCDF).
    pub map: PathBuf,
    /// Per-star predicted extinctions (CSV).
    pub stars: PathBuf,
    /// Convergence history (CSV).
    pub history: PathBuf,
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
            checkpoint: ck_dir.join(format!("{ck}.ckpt")),
            previous: ck_dir.join(format!("{ck}.prev.ckpt")),
        }
    }
}

/// Uniform number in [0, 1) fixed per (seed, star): nested star subsets across stages.
fn star_uniform(seed: u64, i: u64) -> f64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The stars a stage uses: nearer than `max_distance_pc` (by 1/ω) and in the stage's fraction.
pub fn stage_stars(all: &PixelCatalog, stage: &StageConfig, seed: u64) -> PixelCatalog {
    let s = &all.stars;
    let keep: Vec<bool> = (0..s.len())
        .map(|i| {
            let near = stage
                .max_distance_pc
                .is_none_or(|d| s.parallax_mas[i] > 1000.0 / d);
            near && star_uniform(seed, s.source_id[i] as u64) < stage.star_fraction
        })
        .collect();
    s.subset(&keep).into_pixel_range(all.nside, all.pixels())
}

/// What a fit works with on this rank.
struct Setup {
    chart: Chart,
    icr: Arc<Icr>,
    /// This rank's stars (its pixel range of the final level).
    stars: PixelCatalog,
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
        config_sha256: Sha256::digest(config_text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        catalog_sha256: sha256_file(catalog)?,
    };
    let nside = chart.nside_final();
    let nside_dec = cfg.nside_dec()?;
    let (decomp, cat) = read_distributed(cfg, &chart, catalog)?;
    let part = checkpoint::Part {
        rank: decomp.rank,
        size: decomp.size(),
        patches: (decomp.patches().start, decomp.patches().end),
        nside_dec,
        patch_stars: Vec::new(),
    };
    let t0 = Instant::now();
    let kernel = crate::kernel::from_config(&cfg.kernel)?;
    let icr = Arc::new(Icr::distributed(
        &chart,
        kernel.as_ref(),
        cfg.grid.matrix_precision,
        Arc::new(decomp),
    )?);
    let stars = cat.into_pixel_range(nside, icr.final_pixels()); // collectives outside the log macros: they skip their arguments where filtered out
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
        id,
        part,
        resharded: std::cell::Cell::new(false),
    })
}

/// Every rank reads its share of the file's rows (a block of a FITS or netCDF table, every
/// n-th row of a CSV), validates and selects them, counts stars per patch for the balance,
/// and sends each star to the rank that owns its pixel. Returns the decomposition and this
/// rank's stars in file-row order (so that every rank count sees the same order).
fn read_distributed(cfg: &Config, chart: &Chart, path: &Path) -> Result<(Decomp, Catalog)> {
    let (rank, size) = (comm::rank(), comm::size());
    let part = crate::catalog::RowPart { rank, size };
    let (cat, rows, n_read) = Catalog::read_part_rows(path, &cfg.catalog, part)?;
    let total = comm::sum_u64(cat.len() as u64);
    if total == 0 {
        let read = comm::sum_u64(n_read as u64) as usize;
        bail!(
            "{}",
            crate::catalog::no_star_message(path, read, &cfg.catalog)
        );
    }
    let nside = chart.nside_final();
    let pix: Vec<usize> = (0..cat.len())
        .map(|i| grid::ang2pix(nside, cat.l_deg[i], cat.b_deg[i]) as usize)
        .collect();
    let n_patch = grid::npix(cfg.nside_dec()?);
    let per_patch = grid::npix(nside) / n_patch;
    let mut counts = vec![0u64; n_patch];
    for &p in &pix {
        counts[p / per_patch] += 1;
    }
    let all = comm::all_gather_u64(&counts, &vec![n_patch; size]);
    let counts: Vec<u64> = (0..n_patch)
        .map(|q| (0..size).map(|r| all[r * n_patch + q]).sum())
        .collect();
    let decomp = balance_counts(cfg, chart, &counts)?;
    if size == 1 {
        return Ok((decomp, cat));
    }
    // [row, source_id, l, b, ω, σ_ω, A, σ_A] per star, bit-exact through f64 slots
    const W: usize = 8;
    let mut by_dest: Vec<Vec<f64>> = vec![Vec::new(); size];
    for i in 0..cat.len() {
        let v = &mut by_dest[decomp.owner(nside, pix[i])];
        v.extend([
            f64::from_bits(rows[i]),
            f64::from_bits(cat.source_id[i] as u64),
            cat.l_deg[i],
            cat.b_deg[i],
            cat.parallax_mas[i],
            cat.parallax_error_mas[i],
            cat.extinction[i],
            cat.extinction_error[i],
        ]);
    }
    drop(cat);
    let send_counts: Vec<usize> = by_dest.iter().map(Vec::len).collect();
    let sc: Vec<f64> = send_counts.iter().map(|&c| c as f64).collect();
    let ones = vec![1; size];
    let recv_counts: Vec<usize> = comm::all_to_all_f64(&sc, &ones, &ones)
        .iter()
        .map(|&c| c as usize)
        .collect();
    let send: Vec<f64> = by_dest.concat();
    drop(by_dest);
    let recv = comm::all_to_all_f64(&send, &send_counts, &recv_counts);
    drop(send);
    let mut recs: Vec<&[f64]> = recv.chunks_exact(W).collect();
    recs.sort_by_key(|r| r[0].to_bits());
    let mut mine = Catalog::default();
    for r in recs {
        mine.source_id.push(r[1].to_bits() as i64);
        mine.l_deg.push(r[2]);
        mine.b_deg.push(r[3]);
        mine.parallax_mas.push(r[4]);
        mine.parallax_error_mas.push(r[5]);
        mine.extinction.push(r[6]);
        mine.extinction_error.push(r[7]);
    }
    Ok((decomp, mine))
}

/// Decomposition for stars per patch `counts` (see [`balance`]).
fn balance_counts(cfg: &Config, chart: &Chart, counts: &[u64]) -> Result<Decomp> {
    let per_patch = grid::npix(chart.nside_final()) / counts.len();
    let work: Vec<f64> = counts
        .iter()
        .map(|&c| (per_patch * chart.n_kept()) as f64 + 4.0 * c as f64)
        .collect();
    Decomp::balanced(cfg.nside_dec()?, comm::rank(), comm::size(), &work)
}

/// This process's share of the sky: patches at `parallel.nside_dec` in contiguous runs of
/// about equal work (a patch's voxels plus 4 per star: a star costs about four voxels).
pub fn balance(cfg: &Config, chart: &Chart, cat: &Catalog) -> Result<Decomp> {
    let nside = chart.nside_final();
    let n_patch = grid::npix(cfg.nside_dec()?);
    let per_patch = grid::npix(nside) / n_patch;
    let mut counts = vec![0u64; n_patch];
    for i in 0..cat.len() {
        counts[grid::ang2pix(nside, cat.l_deg[i], cat.b_deg[i]) as usize / per_patch] += 1;
    }
    balance_counts(cfg, chart, &counts)
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
    let su = setup(cfg, config_text, catalog)?;
    let mut st = match resume_point(&paths, &su, resume)? {
        Some(s) => s,
        None => FitState {
            stage: 0,
            iteration: 0,
            x: vec![0.0; su.icr.n_xi() + 2],
            xsig: vec![],
            residuals: vec![],
            history: vec![],
        },
    };
    run_schedule(cfg, &su, &paths, &mut st)?;
    write_products(cfg, config_text, &su, &paths, &st)?;
    // the products are complete on every rank: the checkpoints have served their purpose
    comm::barrier();
    std::fs::remove_file(&paths.checkpoint).ok();
    std::fs::remove_file(&paths.previous).ok();
    if comm::is_root() && su.resharded.get() {
        let (dir, stem) = checkpoint_dir_stem(&paths);
        crate::reshard::remove_other_sets(&dir, &stem, size)?;
    }
    Ok(())
}

/// The state to continue from: the newest position every rank has a checkpoint of.
fn resume_point(paths: &FitPaths, su: &Setup, resume: bool) -> Result<Option<FitState>> {
    let mine: Vec<(u64, &PathBuf)> = [&paths.checkpoint, &paths.previous]
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| Ok((checkpoint::position(p)?, p)))
        .collect::<Result<_>>()?;
    let none_anywhere = comm::all(mine.is_empty());
    if none_anywhere {
        let (dir, stem) = checkpoint_dir_stem(paths);
        if crate::reshard::has_other_sets(&dir, &stem, comm::size())? {
            if !resume {
                bail!(
                    "{} holds checkpoints of this fit written with another rank count: pass \
                     --resume to continue it on {} ranks, or delete them to start over",
                    dir.display(),
                    comm::size()
                );
            }
            let x = su.icr.x_layout();
            let s = crate::reshard::load(&dir, &stem, &su.id, &su.part, &x)?
                .context("no checkpoint of another rank count could be read")?;
            tracing::info!(
                stage = s.stage,
                iteration = s.iteration,
                ranks = comm::size(),
                "resuming from checkpoints written with another rank count"
            );
            su.resharded.set(true);
            return Ok(Some(s));
        }
        if resume {
            tracing::info!(checkpoint = %paths.checkpoint.display(), "no checkpoint to resume from: starting afresh");
        }
        return Ok(None);
    }
    if !resume {
        bail!(
            "checkpoint {} exists: pass --resume to continue that run, or delete it to start over",
            paths.checkpoint.display()
        );
    }
    if !comm::all(!mine.is_empty()) {
        bail!(
            "some ranks have no checkpoint ({} is missing on at least one): the checkpoint \
             set is incomplete; delete it to start over",
            paths.checkpoint.display()
        );
    }
    let newest = mine.iter().map(|m| m.0).max().unwrap_or(0);
    let target = comm::min_u64(newest);
    let pick = mine.iter().find(|m| m.0 == target);
    if !comm::all(pick.is_some()) {
        bail!("checkpoints of the ranks share no position: the set is inconsistent");
    }
    let path = pick.expect("checked on every rank").1;
    let s = checkpoint::load_part(path, &su.id, &su.part)?;
    tracing::info!(
        stage = s.stage,
        iteration = s.iteration,
        "resuming from checkpoint"
    );
    Ok(Some(s))
}

/// The checkpoint directory and the stem of the fit's files.
fn checkpoint_dir_stem(paths: &FitPaths) -> (PathBuf, String) {
    let dir = paths
        .checkpoint
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let stem = paths
        .map
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, stem)
}

/// Save this rank's checkpoint, keeping the previous one.
fn save_checkpoint(
    paths: &FitPaths,
    su: &Setup,
    st: &FitState,
    part: &checkpoint::Part,
) -> Result<()> {
    if paths.checkpoint.exists() {
        // keep the current one as the previous (a second name, so that a checkpoint exists
        // under the current name at every moment), then replace the current atomically
        std::fs::remove_file(&paths.previous).ok();
        std::fs::hard_link(&paths.checkpoint, &paths.previous)
            .or_else(|_| std::fs::copy(&paths.checkpoint, &paths.previous).map(|_| ()))
            .with_context(|| format!("cannot keep {} as previous", paths.checkpoint.display()))?;
    }
    checkpoint::save_part(&paths.checkpoint, &su.id, st, part)?;
    if su.resharded.get() {
        // the new set is on disk on every rank: the old one has served its purpose
        comm::barrier();
        if comm::is_root() {
            let (dir, stem) = checkpoint_dir_stem(paths);
            crate::reshard::remove_other_sets(&dir, &stem, comm::size())?;
        }
        su.resharded.set(false);
    }
    Ok(())
}

use crate::comm::process_cpu_seconds;

fn run_schedule(cfg: &Config, su: &Setup, paths: &FitPaths, st: &mut FitState) -> Result<()> {
    let stages = &cfg.inference.stage;
    let total: usize = stages.iter().map(|s| s.iterations).sum();
    let done: usize = stages[..st.stage.min(stages.len())]
        .iter()
        .map(|s| s.iterations)
        .sum::<usize>()
        + st.iteration;
    let pb = crate::logging::progress(total as u64, "MGVI");
    pb.set_position(done as u64);
    while st.stage < stages.len() {
        let sc = &stages[st.stage];
        let stars = stage_stars(&su.stars, sc, cfg.seed);
        let n_stars = comm::sum_u64(stars.stars.len() as u64) as usize;
        if n_stars == 0 {
            bail!(
                "inference.stage[{}] selects no stars (max_distance_pc / star_fraction)",
                st.stage
            );
        }
        let model = Model::new(cfg, su.icr.clone(), &stars)?;
        let mask = mgvi::level_mask(&model, sc.levels);
        let mut part = su.part.clone();
        part.patch_stars = model.dom.stars.patch.iter().map(|r| r[0].len()).collect();
        if st.xsig.len() != model.data.len() {
            // a new data set: n_σ starts again from its prior median (paper §5)
            st.xsig = vec![0.0; model.data.len()];
        }
        while st.iteration < sc.iterations {
            let (t, cpu0) = (Instant::now(), process_cpu_seconds());
            let (bytes0, mpi0) = (comm::bytes_sent(), comm::mpi_cpu_seconds());
            let rep = mgvi::global_iteration(
                &model,
                sc,
                &mask,
                cfg.seed,
                (st.stage, st.iteration),
                &mut st.x,
                &mut st.xsig,
                &mut st.residuals,
            )?;
            st.iteration += 1;
            let row = HistoryRow {
                stage: st.stage,
                iteration: st.iteration,
                n_stars,
                kl: rep.kl,
                newton_steps: rep.newton.steps,
                newton_cg: rep.newton.cg_iterations.iter().sum(),
                sample_cg: rep.sample_cg.iter().sum(),
                grad_norm: rep.newton.grad_norms.last().copied().unwrap_or(f64::NAN),
                step: rep.newton.step_norms.last().copied().unwrap_or(f64::NAN),
                seconds: t.elapsed().as_secs_f64(),
                peak_rss_bytes: comm::max_f64(crate::bench::peak_rss_bytes() as f64) as u64,
                ranks: comm::size(),
                cpu_seconds: sum_f64(process_cpu_seconds() - cpu0),
                mpi_cpu_seconds: sum_f64(comm::mpi_cpu_seconds() - mpi0),
                mpi_bytes: comm::sum_u64(comm::bytes_sent() - bytes0),
            };
            pb.suspend(|| {
                tracing::info!(
                    stage = row.stage,
                    iteration = row.iteration,
                    stars = row.n_stars,
                    kl = row.kl,
                    grad_norm = format!("{:.3e}", row.grad_norm),
                    step = format!("{:.3e}", row.step),
                    newton_steps = row.newton_steps,
                    newton_cg = row.newton_cg,
                    sample_cg = ?rep.sample_cg,
                    seconds = format!("{:.2}", row.seconds),
                    rss_mb = row.peak_rss_bytes / (1 << 20),
                    mpi_mb = format!("{:.1}", row.mpi_bytes as f64 / 1e6),
                    "MGVI iteration"
                )
            });
            st.history.push(row);
            save_checkpoint(paths, su, st, &part)?;
            injected_failure(st.history.len());
            pb.inc(1);
        }
        st.stage += 1;
        st.iteration = 0;
        save_checkpoint(paths, su, st, &part)?;
    }
    pb.finish_and_clear();
    Ok(())
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

/// Shell range [lo, hi) of `shells` inside the product cut, and the cut radius.
fn product_range(shells: &Shells, cfg: &Config) -> (usize, usize) {
    let e = &shells.edges_pc;
    let n = shells.len();
    let lo = cfg
        .output
        .r_min_pc
        .map_or(0, |r| e.partition_point(|&x| x < r * (1.0 - 1e-9)).min(n));
    let hi = cfg.output.r_max_pc.map_or(n, |r| {
        e.partition_point(|&x| x <= r * (1.0 + 1e-9))
            .saturating_sub(1)
            .max(lo + 1)
    });
    (lo, hi.min(n))
}

/// Build the map from per-sample `rw` fields (pixel-major, kept shells).
pub fn map_from_samples(
    cfg: &Config,
    chart: &Chart,
    samples_rw: &[Vec<f64>],
    provenance: Provenance,
) -> Result<DustMap> {
    let shells = chart.kept_shells();
    let (lo, hi) = product_range(&shells, cfg);
    let widths = shells.widths_pc();
    let n = shells.len();
    // all pixels, or one rank's block of them
    let npix = samples_rw.first().map_or(0, |s| s.len() / n);
    let out_shells = Shells {
        edges_pc: shells.edges_pc[lo..=hi].to_vec(),
    };
    let nr = hi - lo;
    let mut samples = Vec::with_capacity(samples_rw.len());
    let mut inner = Vec::with_capacity(samples_rw.len());
    for rw in samples_rw {
        let mut rho = vec![0.0; nr * npix];
        let mut inn = vec![0.0; npix];
        for p in 0..npix {
            let col = &rw[p * n..(p + 1) * n];
            inn[p] = col[..lo].iter().sum();
            for k in lo..hi {
                rho[(k - lo) * npix + p] = col[k] / widths[k];
            }
        }
        samples.push(rho);
        inner.push(inn);
    }
    let (mean, std) = crate::util::mean_std(&samples);
    let (inner_mean, inner_std) = crate::util::mean_std(&inner);
    // integrated extinction to each shell's far edge, per sample
    let integrated: Vec<Vec<f64>> = samples
        .iter()
        .zip(&inner)
        .map(|(rho, inn)| {
            let mut out = vec![0.0; nr * npix];
            for p in 0..npix {
                let mut acc = inn[p];
                for k in 0..nr {
                    acc += rho[k * npix + p] * widths[lo + k];
                    out[k * npix + p] = acc;
                }
            }
            out
        })
        .collect();
    let (integrated_mean, integrated_std) = crate::util::mean_std(&integrated);
    let map = DustMap {
        nside: chart.nside_final(),
        centres_pc: out_shells.centres_pc(),
        star_count: vec![],
        shells: out_shells,
        mean,
        std,
        samples: if cfg.output.samples { samples } else { vec![] },
        inner_mean,
        inner_std,
        inner_samples: if cfg.output.samples { inner } else { vec![] },
        integrated_mean,
        integrated_std,
        units: cfg.output.units.clone(),
        kind: "posterior".into(),
        provenance,
    };
    if npix == grid::npix(chart.nside_final()) {
        map.check()?;
    }
    Ok(map)
}

/// Samples of this rank's part of the map and its stars' predictions.
struct LocalProducts {
    samples_rw: Vec<Vec<f64>>,
    abar: Vec<Vec<f64>>,
    sig_a: Vec<Vec<f64>>,
}

fn local_products(cfg: &Config, su: &Setup, st: &FitState) -> Result<LocalProducts> {
    let model = Model::new(cfg, su.icr.clone(), &su.stars)?;
    let mut w = model.workspace();
    let xsig0 = vec![0.0; model.data.len()];
    let mut out = LocalProducts {
        samples_rw: Vec::new(),
        abar: Vec::new(),
        sig_a: Vec::new(),
    };
    for d in &st.residuals {
        for sign in [1.0, -1.0] {
            let x: Vec<f64> = st.x.iter().zip(d).map(|(a, b)| a + sign * b).collect();
            let s = model.state(&x, &xsig0, &mut w);
            out.abar.push(s.abar.clone());
            // v − (n_σ σ_A)² with n_σ = 1 here: the distance-marginalisation variance
            out.sig_a.push(
                s.var
                    .iter()
                    .zip(&model.data.a_err)
                    .map(|(v, e)| (v - e * e).max(0.0).sqrt())
                    .collect::<Vec<_>>(),
            );
            out.samples_rw.push(s.rw);
        }
    }
    Ok(out)
}

fn write_products(
    cfg: &Config,
    config_text: &str,
    su: &Setup,
    paths: &FitPaths,
    st: &FitState,
) -> Result<()> {
    if st.residuals.is_empty() {
        bail!("the fit has no samples: the schedule ran no iteration");
    }
    let lp = local_products(cfg, su, st)?;
    let mut prov = Provenance::current(config_text, cfg.seed, &su.id.catalog_sha256);
    prov.catalog_sha256 = su.id.catalog_sha256.clone();
    let mut map = map_from_samples(cfg, &su.chart, &lp.samples_rw, prov)?;
    drop(lp.samples_rw);
    map.star_count = su
        .stars
        .offsets
        .windows(2)
        .map(|w| (w[1] - w[0]) as u32)
        .collect();
    write_map_blocks(&map, su, &paths.map)?;
    drop(map);
    // n_σ of the last stage's stars, by source id
    let last = cfg.inference.stage.last().expect("at least one stage");
    let last_stars = stage_stars(&su.stars, last, cfg.seed);
    let tf = crate::transforms::InvGamma::new(cfg.noise.nsigma_shape, cfg.noise.nsigma_scale);
    let nsig: HashMap<i64, f64> =
        if cfg.noise.infer_nsigma && st.xsig.len() == last_stars.stars.len() {
            last_stars
                .stars
                .source_id
                .iter()
                .zip(&st.xsig)
                .map(|(&i, &z)| (i, tf.value(z)))
                .collect()
        } else {
            HashMap::new()
        };
    let rows = star_prediction_rows(&su.stars, &lp.abar, &lp.sig_a, &nsig)?;
    write_star_predictions(&paths.stars, rows)?;
    if comm::is_root() {
        write_history(&paths.history, &st.history)?;
    }
    tracing::info!(map = %paths.map.display(), stars = %paths.stars.display(), history = %paths.history.display(), "fit products written");
    Ok(())
}

/// Rank 0 writes the map block by block as the ranks' pixel ranges arrive (its own, then
/// one other rank's at a time): no rank ever holds the whole map.
fn write_map_blocks(map: &DustMap, su: &Setup, path: &Path) -> Result<()> {
    let size = comm::size();
    if size == 1 {
        return map.write(path);
    }
    if !comm::is_root() {
        comm::send_f64(0, &map.block_to_vec());
        return Ok(());
    }
    let d = &su.icr.decomp;
    let nside = su.chart.nside_final();
    let mut r = 0;
    map.write_blocks(path, grid::npix(nside), || {
        r += 1;
        if r == size {
            return Ok(None);
        }
        let px = d.pixels_of(r, nside);
        let v = comm::recv_f64(r);
        Ok(Some((
            px.start,
            DustMap::block_from_vec(map, px.len(), &v)?,
        )))
    })
}

/// This rank's rows of the star-prediction table (CSV text, no header).
fn star_prediction_rows(
    all: &PixelCatalog,
    abar: &[Vec<f64>],
    sig_a: &[Vec<f64>],
    nsig: &HashMap<i64, f64>,
) -> Result<Vec<u8>> {
    let s = &all.stars;
    let (a_m, a_s) = crate::util::mean_std(abar);
    let (sa_m, _) = crate::util::mean_std(sig_a);
    let mut f = Vec::new();
    for i in 0..s.len() {
        let ns = nsig.get(&s.source_id[i]).copied().unwrap_or(f64::NAN);
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            s.source_id[i],
            s.l_deg[i],
            s.b_deg[i],
            s.parallax_mas[i],
            s.parallax_error_mas[i],
            s.extinction[i],
            s.extinction_error[i],
            all.pixel[i],
            a_m.get(i).copied().unwrap_or(f64::NAN),
            a_s.get(i).copied().unwrap_or(f64::NAN),
            sa_m.get(i).copied().unwrap_or(f64::NAN),
            ns
        )?;
    }
    Ok(f)
}

/// Rank 0 writes the table: its rows, then every other rank's in rank (= pixel) order.
fn write_star_predictions(path: &Path, rows: Vec<u8>) -> Result<()> {
    if !comm::is_root() {
        comm::send_bytes(0, &rows);
        return Ok(());
    }
    write_atomically(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(
            f,
            "source_id,l,b,parallax,parallax_error,extinction,extinction_error,pixel,predicted_extinction,predicted_extinction_std,distance_marginal_std,nsigma"
        )?;
        f.write_all(&rows)?;
        for r in 1..comm::size() {
            f.write_all(&comm::recv_bytes(r))?;
        }
        f.flush()?;
        Ok(())
    })
    .with_context(|| format!("cannot write {}", path.display()))
}

fn write_history(path: &Path, rows: &[HistoryRow]) -> Result<()> {
    write_atomically(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(
            f,
            "stage,iteration,n_stars,kl,grad_norm,step,newton_steps,newton_cg,sample_cg,seconds,peak_rss_bytes,ranks,cpu_seconds,mpi_cpu_seconds,mpi_bytes"
        )?;
        for r in rows {
            writeln!(
                f,
                "{},{},{},{},{},{},{},{},{},{:.3},{},{},{:.3},{:.3},{}",
                r.stage,
                r.iteration,
                r.n_stars,
                r.kl,
                r.grad_norm,
                r.step,
                r.newton_steps,
                r.newton_cg,
                r.sample_cg,
                r.seconds,
                r.peak_rss_bytes,
                r.ranks,
                r.cpu_seconds,
                r.mpi_cpu_seconds,
                r.mpi_bytes
            )?;
        }
        f.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_cut_moves_inner_shells_into_the_inner_map() {
        let mut cfg = Config::tiny(0, 1);
        let chart = cfg.chart().unwrap();
        let shells = chart.kept_shells(); // 6 shells
        cfg.output.r_min_pc = Some(shells.edges_pc[2]);
        cfg.output.r_max_pc = Some(shells.edges_pc[5]);
        let npix = grid::npix(chart.nside_final());
        let n = shells.len();
        let rw: Vec<Vec<f64>> = (0..2)
            .map(|s| {
                (0..npix * n)
                    .map(|i| 1.0 + (i % n) as f64 + s as f64)
                    .collect()
            })
            .collect();
        let map = map_from_samples(&cfg, &chart, &rw, Provenance::default()).unwrap();
        assert_eq!(map.n_r(), 3);
        assert_eq!(map.shells.edges_pc, shells.edges_pc[2..=5].to_vec());
        // inner map: mean over the two samples of rw[0] + rw[1] = (1+2) and (2+3)
        assert!((map.inner_mean[7] - 4.0).abs() < 1e-12);
        assert!((map.inner_std[7] - 1.0).abs() < 1e-12);
        // ρ = rw / Δr and the integrated map ends at inner + Σ rw of the kept shells
        let w = shells.widths_pc();
        assert!((map.mean[npix + 3] - 4.5 / w[3]).abs() < 1e-12);
        let last = map.integrated_mean[2 * npix + 3];
        assert!((last - (4.0 + 3.5 + 4.5 + 5.5)).abs() < 1e-9, "{last}");
    }
}
