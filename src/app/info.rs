//! `dust3d info`: human-readable summaries of map and catalog files.

use anyhow::Result;
use std::fmt::Write;
use std::path::Path;

use crate::app::config::Config;
use crate::data::catalog::Catalog;
use crate::products::mapfile::{self, DustMap};

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let (mut lo, mut hi, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
    for &x in v {
        lo = lo.min(x);
        hi = hi.max(x);
        sum += x;
    }
    (lo, hi, sum / v.len().max(1) as f64)
}

/// Summary of a map file (`n_samples`: how many samples the file holds).
pub fn map_summary(path: &Path, map: &DustMap, n_samples: usize) -> String {
    let mut s = String::new();
    let e = &map.shells.edges_pc;
    let (lo, hi, mean) = stats(&map.mean);
    let p = &map.provenance;
    let _ = writeln!(s, "{}: dust3d map ({})", path.display(), map.kind);
    let _ = writeln!(
        s,
        "  grid      nside {} NESTED, {} pixels x {} shells",
        map.nside,
        map.npix(),
        map.n_r()
    );
    let _ = writeln!(
        s,
        "  radii     {:.2} - {:.2} pc (log-spaced, ratio {:.5})",
        e[0],
        e[e.len() - 1],
        e[1] / e[0]
    );
    let _ = writeln!(s, "  samples   {n_samples}");
    let _ = writeln!(
        s,
        "  mean rho  min {lo:.4e} max {hi:.4e} avg {mean:.4e} [{}]",
        map.units
    );
    let _ = writeln!(
        s,
        "  inner     integrated inside {:.2} pc: avg {:.4e}",
        e[0],
        stats(&map.inner_mean).2
    );
    if map.kind != "truth" {
        let _ = writeln!(
            s,
            "  distances {} (the stars' distance prior: how predict and validate read parallaxes)",
            map.distance_prior.to_text()
        );
    }
    let _ = writeln!(
        s,
        "  made by   dust3d {} (commit {}), seed {}, {}",
        p.version, p.git_commit, p.seed, p.created
    );
    let _ = writeln!(s, "  command   {}", p.command_line);
    if !p.catalog_sha256.is_empty() {
        let _ = writeln!(s, "  catalog   sha256 {}", p.catalog_sha256);
    }
    for line in p.schedule.lines() {
        let _ = writeln!(s, "  schedule  {line}");
    }
    for line in p.validation.lines() {
        let _ = writeln!(s, "  held out  {line}");
    }
    for line in p.warnings.lines() {
        let _ = writeln!(s, "  warning   {line}");
    }
    s
}

/// Summary of a catalog after validation and selection.
pub fn catalog_summary(path: &Path, cat: &Catalog, nside: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: star catalog, {} stars pass validation and selection",
        path.display(),
        cat.len()
    );
    for (name, v) in [
        ("l [deg]", &cat.l_deg),
        ("b [deg]", &cat.b_deg),
        ("parallax [mas]", &cat.parallax_mas),
        ("parallax_error", &cat.parallax_error_mas),
        ("extinction", &cat.extinction),
        ("extinction_err", &cat.extinction_error),
    ] {
        let (lo, hi, mean) = stats(v);
        let _ = writeln!(
            s,
            "  {name:<15} min {lo:>11.4} max {hi:>11.4} mean {mean:>11.4}"
        );
    }
    let pc = cat.clone().into_pixel_layout(nside);
    let _ = writeln!(
        s,
        "  sky       {} of {} pixels at nside {nside} hold stars (max {} per pixel)",
        pc.occupied_pixels(),
        crate::sphere::grid::npix(nside),
        pc.offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    );
    s
}

/// Print the summary of a map, checkpoint or catalog file.
pub fn run(path: &Path, cfg: &Config) -> Result<String> {
    if crate::app::checkpoint::is_checkpoint(path) {
        return crate::app::checkpoint::summary(path);
    }
    if mapfile::is_map_file(path) {
        // the mean suffices for the summary; samples are counted, not read
        let map = DustMap::read_with(path, mapfile::Load::MEAN)?;
        return Ok(map_summary(path, &map, mapfile::sample_count(path)));
    }
    let cat = Catalog::read(path, &cfg.catalog)?;
    Ok(catalog_summary(path, &cat, cfg.chart()?.nside_final()))
}
