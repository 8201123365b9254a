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
use crate::config::{Config, StageConfig};
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
    /// Checkpoint.
    pub checkpoint: PathBuf,
}

impl FitPaths {
    /// Paths for output map `out` (checkpoint in `checkpoint_dir` if given).
    pub fn new(out: &Path, checkpoint_dir: Option<&str>) -> Self {
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "map".into());
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        let ck_dir = checkpoint_dir
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.clone());
        Self {
            map: out.to_path_buf(),
            stars: dir.join(format!("{stem}_stars.csv")),
            history: dir.join(format!("{stem}_history.csv")),
            checkpoint: ck_dir.join(format!("{stem}.ckpt")),
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
    s.subset(&keep).into_pixel_layout(all.nside)
}

/// Run (or resume) a fit.
pub fn run(
    cfg: &Config,
    config_text: &str,
    catalog: &Path,
    out: &Path,
    resume: bool,
) -> Result<()> {
    let paths = FitPaths::new(out, cfg.inference.checkpoint_dir.as_deref());
    let chart = cfg.chart()?;
    let cat = Catalog::read(catalog, &cfg.catalog)?;
    let id = RunId {
        seed: cfg.seed,
        config_sha256: Sha256::digest(config_text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        catalog_sha256: sha256_file(catalog)?,
    };
    let all = cat.into_pixel_layout(chart.nside_final());
    tracing::info!(
        stars = all.stars.len(),
        nside = chart.nside_final(),
        shells = chart.n_kept(),
        "catalog read"
    );
    let t0 = Instant::now();
    let kernel = crate::kernel::from_config(&cfg.kernel)?;
    let icr = Arc::new(Icr::new(
        &chart,
        kernel.as_ref(),
        cfg.grid.matrix_precision,
    )?);
    tracing::info!(
        seconds = t0.elapsed().as_secs_f64(),
        matrix_mb = icr.matrix_bytes() as f64 / 1e6,
        classes = ?icr.class_counts(),
        "ICR prior ready"
    );
    let mut st = if paths.checkpoint.exists() {
        if !resume {
            bail!(
                "checkpoint {} exists: pass --resume to continue that run, or delete it to start over",
                paths.checkpoint.display()
            );
        }
        let s = checkpoint::load(&paths.checkpoint, &id)?;
        tracing::info!(
            stage = s.stage,
            iteration = s.iteration,
            "resuming from checkpoint"
        );
        s
    } else {
        if resume {
            tracing::info!(checkpoint = %paths.checkpoint.display(), "no checkpoint to resume from: starting afresh");
        }
        FitState {
            stage: 0,
            iteration: 0,
            x: vec![0.0; icr.n_xi() + 2],
            xsig: vec![],
            residuals: vec![],
            history: vec![],
        }
    };
    run_schedule(cfg, &all, &icr, &id, &paths, &mut st)?;
    write_products(cfg, config_text, &chart, &all, &icr, &id, &paths, &st)?;
    // the products are complete: the checkpoint has served its purpose
    std::fs::remove_file(&paths.checkpoint).ok();
    Ok(())
}

fn run_schedule(
    cfg: &Config,
    all: &PixelCatalog,
    icr: &Arc<Icr>,
    id: &RunId,
    paths: &FitPaths,
    st: &mut FitState,
) -> Result<()> {
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
        let stars = stage_stars(all, sc, cfg.seed);
        if stars.stars.is_empty() {
            bail!(
                "inference.stage[{}] selects no stars (max_distance_pc / star_fraction)",
                st.stage
            );
        }
        let model = Model::new(cfg, icr.clone(), &stars)?;
        let mask = mgvi::level_mask(&model, sc.levels);
        if st.xsig.len() != model.data.len() {
            // a new data set: n_σ starts again from its prior median (paper §5)
            st.xsig = vec![0.0; model.data.len()];
        }
        while st.iteration < sc.iterations {
            let t = Instant::now();
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
                n_stars: model.data.len(),
                kl: rep.kl,
                newton_steps: rep.newton.steps,
                newton_cg: rep.newton.cg_iterations.iter().sum(),
                sample_cg: rep.sample_cg.iter().sum(),
                grad_norm: rep.newton.grad_norms.last().copied().unwrap_or(f64::NAN),
                step: rep.newton.step_norms.last().copied().unwrap_or(f64::NAN),
                seconds: t.elapsed().as_secs_f64(),
                peak_rss_bytes: crate::bench::peak_rss_bytes(),
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
                    "MGVI iteration"
                )
            });
            st.history.push(row);
            checkpoint::save(&paths.checkpoint, id, st)?;
            pb.inc(1);
        }
        st.stage += 1;
        st.iteration = 0;
        checkpoint::save(&paths.checkpoint, id, st)?;
    }
    pb.finish_and_clear();
    Ok(())
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
    let npix = grid::npix(chart.nside_final());
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
    map.check()?;
    Ok(map)
}

#[allow(clippy::too_many_arguments)]
fn write_products(
    cfg: &Config,
    config_text: &str,
    chart: &Chart,
    all: &PixelCatalog,
    icr: &Arc<Icr>,
    id: &RunId,
    paths: &FitPaths,
    st: &FitState,
) -> Result<()> {
    if st.residuals.is_empty() {
        bail!("the fit has no samples: the schedule ran no iteration");
    }
    let model = Model::new(cfg, icr.clone(), all)?;
    let mut w = model.workspace();
    let xsig0 = vec![0.0; model.data.len()];
    let mut samples_rw = Vec::new();
    let mut abar = Vec::new();
    let mut sig_a = Vec::new();
    for d in &st.residuals {
        for sign in [1.0, -1.0] {
            let x: Vec<f64> = st.x.iter().zip(d).map(|(a, b)| a + sign * b).collect();
            let s = model.state(&x, &xsig0, &mut w);
            abar.push(s.abar.clone());
            // v − (n_σ σ_A)² with n_σ = 1 here: the distance-marginalisation variance
            sig_a.push(
                s.var
                    .iter()
                    .zip(&model.data.a_err)
                    .map(|(v, e)| (v - e * e).max(0.0).sqrt())
                    .collect::<Vec<_>>(),
            );
            samples_rw.push(s.rw);
        }
    }
    let mut prov = Provenance::current(config_text, cfg.seed, &id.catalog_sha256);
    prov.catalog_sha256 = id.catalog_sha256.clone();
    let mut map = map_from_samples(cfg, chart, &samples_rw, prov)?;
    map.star_count = all
        .offsets
        .windows(2)
        .map(|w| (w[1] - w[0]) as u32)
        .collect();
    map.write(&paths.map)?;
    // n_σ of the last stage's stars, by source id
    let last = cfg.inference.stage.last().expect("at least one stage");
    let last_stars = stage_stars(all, last, cfg.seed);
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
    write_star_predictions(&paths.stars, all, &abar, &sig_a, &nsig)?;
    write_history(&paths.history, &st.history)?;
    tracing::info!(map = %paths.map.display(), stars = %paths.stars.display(), history = %paths.history.display(), "fit products written");
    Ok(())
}

fn write_star_predictions(
    path: &Path,
    all: &PixelCatalog,
    abar: &[Vec<f64>],
    sig_a: &[Vec<f64>],
    nsig: &HashMap<i64, f64>,
) -> Result<()> {
    let s = &all.stars;
    let (a_m, a_s) = crate::util::mean_std(abar);
    let (sa_m, _) = crate::util::mean_std(sig_a);
    write_atomically(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(
            f,
            "source_id,l,b,parallax,parallax_error,extinction,extinction_error,pixel,predicted_extinction,predicted_extinction_std,distance_marginal_std,nsigma"
        )?;
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
                a_m[i],
                a_s[i],
                sa_m[i],
                ns
            )?;
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
            "stage,iteration,n_stars,kl,grad_norm,step,newton_steps,newton_cg,sample_cg,seconds,peak_rss_bytes"
        )?;
        for r in rows {
            writeln!(
                f,
                "{},{},{},{},{},{},{},{},{},{:.3},{}",
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
                r.peak_rss_bytes
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
