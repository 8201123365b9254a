//! What a finished fit writes: the map (from per-sample ρΔr, gathered block by block from
//! the ranks), the per-star predictions and the convergence history.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

use super::{diagnostics, FitPaths, Setup};
use crate::app::checkpoint::{FitState, HistoryRow};
use crate::app::config::Config;
use crate::base::atomic::Staged;
use crate::base::comm;
use crate::base::provenance::Provenance;
use crate::data::catalog::PixelCatalog;
use crate::likelihood::model::{Model, State};
use crate::products::mapfile::DustMap;
use crate::products::validation::{validate, Predicted, Validation};
use crate::sphere::grid::{self, Chart, Shells};

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
    diagnostics::warn_unstorable(&samples, &out_shells.centres_pc(), npix);
    let (mean, std) = crate::base::util::mean_std(&samples);
    let (inner_mean, inner_std) = crate::base::util::mean_std(&inner);
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
    let (integrated_mean, integrated_std) = crate::base::util::mean_std(&integrated);
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
        distance_prior: cfg.distance_prior(),
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
    /// σ_a² per sample and star: the variance of the extinction from the distance
    /// uncertainty alone.
    sig_a2: Vec<Vec<f64>>,
}

fn local_products(cfg: &Config, su: &Setup, st: &FitState) -> Result<LocalProducts> {
    let model = crate::app::build::model(cfg, su.icr.clone(), &su.stars)?;
    let mut out = LocalProducts {
        samples_rw: Vec::new(),
        abar: Vec::new(),
        sig_a2: Vec::new(),
    };
    for_each_sample(&model, st, |s| {
        out.abar.push(s.abar.clone());
        out.sig_a2.push(distance_variance(&model, s));
        out.samples_rw.push(s.rw.clone());
    })?;
    Ok(out)
}

/// `f` of the model's state at every posterior sample x̄ + c_k ± δ_k (ξ_σ = 0: the products do not
/// depend on n_σ), in sample order.
fn for_each_sample(model: &Model, st: &FitState, mut f: impl FnMut(&State)) -> Result<()> {
    let mut w = model.workspace();
    let mut s = model.empty_state();
    let xsig0 = vec![0.0; model.data.len()];
    let mut x = st.vi.x.clone();
    for j in 0..st.vi.n_samples() {
        st.vi.sample_into(&st.vi.x, j, &mut x);
        model.update_state(&x, &xsig0, &mut s, &mut w)?;
        f(&s);
    }
    Ok(())
}

/// σ_a² per star, the variance from the distance uncertainty alone: v − (n_σ σ_A)² with
/// the n_σ the state was evaluated with.
fn distance_variance(model: &Model, s: &State) -> Vec<f64> {
    (0..s.var.len())
        .map(|i| {
            let ns = s.nsig[i] * model.data.a_err[i];
            (s.var[i] - ns * ns).max(0.0)
        })
        .collect()
}

pub(super) fn write_products(
    cfg: &Config,
    config_text: &str,
    su: &Setup,
    paths: &FitPaths,
    st: &FitState,
) -> Result<()> {
    if st.vi.residuals.is_empty() {
        bail!("the fit has no samples: the schedule ran no iteration");
    }
    let lp = local_products(cfg, su, st)?;
    let spikes = diagnostics::warn_spiked_stars(&lp.abar, &su.stars.stars, &su.holdout.stars);
    // every product on disk before any replaces its previous version
    let mut set = Staged::default();
    let mut prov = Provenance::current(config_text, cfg.seed, &su.id.catalog_sha256);
    prov.catalog_sha256 = su.id.catalog_sha256.clone();
    prov.schedule = schedule_summary(cfg, &st.history, &su.icr);
    prov.warnings = spikes;
    let holdout = score_holdout(cfg, su, st)?;
    if let Some(v) = &holdout {
        prov.validation = v.summary();
        for line in prov.validation.lines() {
            tracing::info!("held-out stars {line}");
        }
    }
    let mut map = map_from_samples(cfg, &su.chart, &lp.samples_rw, prov)?;
    drop(lp.samples_rw);
    map.star_count = su
        .stars
        .offsets
        .windows(2)
        .map(|w| (w[1] - w[0]) as u32)
        .collect();
    if let Some(v) = &holdout {
        let query = holdout_through_query(&map, su)?;
        if let Some(q) = &query {
            for line in q.summary().lines() {
                tracing::info!("held-out stars through query {line}");
            }
        }
        if comm::is_root() {
            write_validation(&mut set, &paths.validation, cfg, v, query.as_ref())?;
        }
    }
    write_map_blocks(&mut set, &map, su, &paths.map)?;
    drop(map);
    // n_σ of the last stage's stars, by position (source ids need not be unique): the last
    // stage's stars are `su.stars` where its mask holds, in the same order
    let last = cfg.inference.stage.last().expect("at least one stage");
    let used = super::stage_mask(&su.stars, last, cfg.seed);
    let tf =
        crate::sphere::transforms::InvGamma::new(cfg.noise.nsigma_shape, cfg.noise.nsigma_scale);
    let n_used = used.iter().filter(|&&u| u).count();
    let mut fitted = st.vi.xsig.iter();
    let nsig: Vec<f64> = used
        .iter()
        .map(|&u| match (u, cfg.noise.infer_nsigma) {
            (false, _) => f64::NAN,
            // marginalised n_σ has no per-star value
            (true, false) if cfg.noise.marginalise_nsigma => f64::NAN,
            (true, false) => 1.0,
            (true, true) if st.vi.xsig.len() == n_used => {
                fitted.next().map_or(f64::NAN, |&z| tf.value(z))
            }
            (true, true) => f64::NAN,
        })
        .collect();
    let rows = star_prediction_rows(&su.stars, &lp.abar, &lp.sig_a2, &nsig)?;
    write_star_predictions(&mut set, &paths.stars, rows)?;
    if comm::is_root() {
        write_history(&mut set, &paths.history, &st.history)?;
    }
    set.commit()?;
    tracing::info!(map = %paths.map.display(), stars = %paths.stars.display(), history = %paths.history.display(), "fit products written");
    Ok(())
}

/// The held-out stars against the posterior samples, on every rank together; the scores
/// (on every rank) or None when no star was held out.
fn score_holdout(cfg: &Config, su: &Setup, st: &FitState) -> Result<Option<Validation>> {
    let size = comm::size();
    let n_local = su.holdout.stars.len();
    let counts: Vec<usize> = comm::all_gather_u64(&[n_local as u64], &vec![1; size])
        .into_iter()
        .map(|c| c as usize)
        .collect();
    if counts.iter().sum::<usize>() == 0 {
        return Ok(None);
    }
    let model = crate::app::build::model(cfg, su.icr.clone(), &su.holdout)?;
    let ns = st.vi.n_samples() as f64;
    let (mut s1, mut s2, mut va) = (vec![0.0; n_local], vec![0.0; n_local], vec![0.0; n_local]);
    for_each_sample(&model, st, |s| {
        for (i, sa2) in distance_variance(&model, s).into_iter().enumerate() {
            s1[i] += s.abar[i] / ns;
            s2[i] += s.abar[i] * s.abar[i] / ns;
            va[i] += sa2 / ns;
        }
    })?;
    // [A, predictive mean, predictive variance] per star, gathered in rank order
    let local: Vec<f64> = (0..n_local)
        .flat_map(|i| {
            let e = model.data.a_err[i];
            let var = (s2[i] - s1[i] * s1[i]).max(0.0) + va[i] + e * e;
            [model.data.a_obs[i], s1[i], var]
        })
        .collect();
    let all = comm::all_gather_f64(&local, &counts.iter().map(|c| 3 * c).collect::<Vec<_>>());
    let stars: Vec<Predicted> = all
        .chunks_exact(3)
        .map(|v| Predicted {
            a_obs: v[0],
            mean: v[1],
            var: v[2],
        })
        .collect();
    Ok(Some(validate(&stars)))
}

/// The held-out stars scored against the finished map with the column `dust3d query`
/// interpolates (as a user reading the map sees it); one process with map samples only
/// (on many ranks no rank holds the neighbours of every held-out star: `dust3d validate
/// --angular interpolated` does it from the map file).
fn holdout_through_query(map: &DustMap, su: &Setup) -> Result<Option<Validation>> {
    if comm::size() > 1 || map.samples.is_empty() || su.holdout.stars.is_empty() {
        return Ok(None);
    }
    let stars = crate::products::validation::predicted_from_map(
        map,
        &su.holdout.stars,
        crate::products::predict::Angular::Interpolated,
    )?;
    Ok(Some(validate(&stars)))
}

/// `<stem>_validation.json`: the held-out fraction and the scores (in the star's pixel, and
/// through query's interpolation where computed).
fn write_validation(
    set: &mut Staged,
    path: &Path,
    cfg: &Config,
    v: &Validation,
    query: Option<&Validation>,
) -> Result<()> {
    let json = serde_json::json!({
        "holdout_fraction": cfg.validation.holdout_fraction,
        "predictive": "A ~ N(mean over samples of abar, var over samples of abar + mean sigma_a^2 + sigma_A^2), n_sigma = 1",
        "scores": v,
        "scores_through_query": query,
    });
    set.write(path, |tmp| {
        std::fs::write(tmp, serde_json::to_string_pretty(&json)?)?;
        Ok(())
    })
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Rank 0 writes the map block by block as the ranks' pixel ranges arrive (its own, then
/// one other rank's at a time): no rank ever holds the whole map.
fn write_map_blocks(set: &mut Staged, map: &DustMap, su: &Setup, path: &Path) -> Result<()> {
    let size = comm::size();
    if size == 1 {
        return map.write_staged(set, path);
    }
    if !comm::is_root() {
        comm::send_f64(0, &map.block_to_vec());
        return Ok(());
    }
    let d = &su.icr.decomp;
    let nside = su.chart.nside_final();
    let mut r = 0;
    map.write_blocks(set, path, grid::npix(nside), || {
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

/// This rank's rows of the star-prediction table (CSV text, no header): per star the
/// sample mean and spread of ā, √(mean σ_a²), the MAP n_σ, and the sample mean of
/// √((n_σ σ_A)² + σ_a²), the model's prediction of the measurement error (paper Fig. D.1b).
fn star_prediction_rows(
    all: &PixelCatalog,
    abar: &[Vec<f64>],
    sig_a2: &[Vec<f64>],
    nsig: &[f64],
) -> Result<Vec<u8>> {
    let s = &all.stars;
    let (a_m, a_s) = crate::base::util::mean_std(abar);
    let (sa2_m, _) = crate::base::util::mean_std(sig_a2);
    let n = sig_a2.len() as f64;
    let mut f = Vec::new();
    for i in 0..s.len() {
        let ns = nsig[i];
        let inflated = ns * s.extinction_error[i];
        let predicted_error = sig_a2
            .iter()
            .map(|v| (inflated * inflated + v[i]).sqrt() / n)
            .sum::<f64>();
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
            sa2_m.get(i).map_or(f64::NAN, |v| v.sqrt()),
            ns,
            predicted_error
        )?;
    }
    Ok(f)
}

/// Rank 0 writes the table: its rows, then every other rank's in rank (= pixel) order.
fn write_star_predictions(set: &mut Staged, path: &Path, rows: Vec<u8>) -> Result<()> {
    if !comm::is_root() {
        comm::send_bytes(0, &rows);
        return Ok(());
    }
    set.write(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(
            f,
            "source_id,l,b,parallax,parallax_error,extinction,extinction_error,pixel,predicted_extinction,predicted_extinction_std,distance_marginal_std,nsigma,predicted_extinction_error"
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

/// The prior's variance correction (when applied), then one line per stage: its chart if
/// coarser than the map's, iterations run against the cap, whether the stage converged, its last iteration's change measures
/// against the tolerances, the scale it ended with and how it was inferred, and whether its
/// likelihood left the distance variance out.
pub(super) fn schedule_summary(
    cfg: &Config,
    history: &[HistoryRow],
    icr: &crate::prior::icr::Icr,
) -> String {
    let mut out = String::new();
    if let Some(c) = &icr.correction {
        out += &format!("prior: {}\n", c.summary(icr.chart.padding));
    }
    for (k, sc) in cfg.inference.stage.iter().enumerate() {
        let rows: Vec<&HistoryRow> = history.iter().filter(|r| r.stage == k).collect();
        let Some(last) = rows.last() else {
            continue;
        };
        let how = if last.converged {
            "converged"
        } else {
            "stopped at its iteration cap, not converged"
        };
        let chart = match sc.levels.filter(|&l| l < icr.chart.levels) {
            Some(l) => {
                let c = icr.chart.truncated(l);
                format!(
                    " on its own chart (nside {} × {} shells),",
                    c.nside_final(),
                    c.n_kept()
                )
            }
            None => String::new(),
        };
        out += &format!(
            "stage {k}:{chart} {} of at most {} iterations, {how} (last: KL change {:.2e} / {:.0e}, \
             step {:.2e} / {:.0e}, mean ln ρ change {:.2e} σ / {:.0e} σ); scale {:.3} ± {:.3} \
             ({}){}\n",
            rows.len(),
            sc.iterations,
            last.kl_change,
            sc.kl_rtol,
            last.step_rms,
            sc.step_tol,
            last.map_change,
            sc.map_tol,
            last.scale_mean,
            last.scale_std,
            match sc.scale_update {
                crate::app::config::ScaleUpdateName::Joint => "joint with the map",
                crate::app::config::ScaleUpdateName::Marginal => "its own factor",
                crate::app::config::ScaleUpdateName::Evidence => "its own factor (evidence)",
            },
            if sc.distance_variance {
                ""
            } else {
                "; likelihood without the distance variance"
            }
        );
    }
    out
}

fn write_history(set: &mut Staged, path: &Path, rows: &[HistoryRow]) -> Result<()> {
    set.write(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(
            f,
            "stage,iteration,n_stars,kl,grad_norm,step,newton_steps,newton_cg,sample_cg,seconds,peak_rss_bytes,ranks,cpu_seconds,mpi_cpu_seconds,mpi_bytes,kl_change,step_rms,map_change,sample_cg_capped,newton_cg_capped,converged,scale_mean,scale_std"
        )?;
        for r in rows {
            writeln!(
                f,
                "{},{},{},{},{},{},{},{},{},{:.3},{},{},{:.3},{:.3},{},{},{},{},{},{},{},{},{}",
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
                r.mpi_bytes,
                r.kl_change,
                r.step_rms,
                r.map_change,
                r.sample_cg_capped,
                r.newton_cg_capped,
                u8::from(r.converged),
                r.scale_mean,
                r.scale_std
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
