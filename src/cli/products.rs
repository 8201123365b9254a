//! Commands that use a finished map: query, export, interp, predict, plot, compare.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rayon::prelude::*;
use std::path::PathBuf;

use crate::data::table::{Column, Table};
use crate::products::dustmaps::{open_map, open_map_with};
use crate::products::mapfile::DustMap;
use crate::products::mapfile::Load;
use crate::products::query::{Convention, Interpolator, Quantity};

/// `dust3d query`.
#[derive(Args, Debug)]
pub struct QueryArgs {
    /// Map: dust3d netCDF or a FITS file in the release layout.
    #[arg(long)]
    map: PathBuf,
    /// Integrated extinction from the Sun (default: differential, per pc).
    #[arg(long)]
    integrated: bool,
    /// What to return, comma-separated: mean, std, samples, random-sample.
    #[arg(long, default_value = "mean")]
    mode: String,
    /// One point: "l,b,d" in deg, deg, pc.
    #[arg(long, allow_hyphen_values = true, conflicts_with = "coords")]
    lbd: Option<String>,
    /// Many points: CSV or FITS table with columns l, b (deg), d (pc); other columns are
    /// carried through.
    #[arg(long)]
    coords: Option<PathBuf>,
    /// Output table (.csv, .csv.gz or .fits); default: print.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Radial convention: native (exact voxel integrals) or dustmaps (as dustmaps computes).
    #[arg(long, default_value = "native")]
    convention: Convention,
    /// Seed choosing the sample for random-sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// One requested output.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Mean,
    Std,
    Samples,
    RandomSample,
}

fn parse_modes(s: &str) -> Result<Vec<Mode>> {
    s.split(',')
        .map(|m| match m.trim() {
            "mean" => Ok(Mode::Mean),
            "std" => Ok(Mode::Std),
            "samples" => Ok(Mode::Samples),
            "random-sample" | "random_sample" => Ok(Mode::RandomSample),
            other => bail!("--mode {other:?}: expected mean, std, samples or random-sample"),
        })
        .collect()
}

fn parse_lbd(s: &str) -> Result<[f64; 3]> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--lbd {s:?}: expected three numbers 'l,b,d'"))?;
    if v.len() != 3 {
        bail!(
            "--lbd {s:?}: expected three numbers 'l,b,d', got {}",
            v.len()
        );
    }
    Ok([v[0], v[1], v[2]])
}

/// Check sky positions; errors name the source and row.
fn check_positions(src: &str, l: &[f64], b: &[f64]) -> Result<()> {
    for i in 0..l.len() {
        if !(l[i].is_finite() && b[i].is_finite() && b[i].abs() <= 90.0) {
            bail!(
                "{src}: row {}: (l, b) = ({}, {}) is not a sky position",
                i + 1,
                l[i],
                b[i]
            );
        }
    }
    Ok(())
}

/// Evaluate `modes` at the points, appending result columns to `t`.
fn evaluate(
    q: &Interpolator,
    modes: &[Mode],
    prefix: &str,
    pts: [&[f64]; 3],
    seed: u64,
    t: &mut Table,
) -> Result<()> {
    let [l, b, d] = pts;
    let n = l.len();
    let col =
        |f: &(dyn Fn(usize) -> f64 + Sync)| -> Vec<f64> { (0..n).into_par_iter().map(f).collect() };
    for &m in modes {
        match m {
            Mode::Mean => t.push(
                &format!("{prefix}_mean"),
                Column::F64(col(&|i| q.mean(l[i], b[i], d[i]))),
            ),
            Mode::Std => {
                q.std(0.0, 0.0, f64::NAN)?; // fail early if this map cannot give it
                t.push(
                    &format!("{prefix}_std"),
                    Column::F64(col(&|i| q.std(l[i], b[i], d[i]).unwrap_or(f64::NAN))),
                );
            }
            Mode::Samples => {
                if q.n_samples() == 0 {
                    bail!("--mode samples: this map has no samples");
                }
                for s in 0..q.n_samples() {
                    t.push(
                        &format!("{prefix}_sample_{s}"),
                        Column::F64(col(&|i| q.sample(s, l[i], b[i], d[i]))),
                    );
                }
            }
            Mode::RandomSample => {
                let s = q.random_sample_index(&mut crate::base::rng::stream(seed, 7))?;
                tracing::info!(
                    sample = s,
                    "random-sample uses one posterior sample for all points"
                );
                t.push(
                    &format!("{prefix}_random_sample"),
                    Column::F64(col(&|i| q.sample(s, l[i], b[i], d[i]))),
                );
            }
        }
    }
    Ok(())
}

/// Run `dust3d query`.
pub fn query(a: QueryArgs) -> Result<()> {
    let modes = parse_modes(&a.mode)?;
    let (mut table, single) = match (&a.lbd, &a.coords) {
        (Some(s), None) => {
            let [l, b, d] = parse_lbd(s)?;
            let mut t = Table {
                source: "--lbd".into(),
                ..Default::default()
            };
            for (n, v) in [("l", l), ("b", b), ("d", d)] {
                t.push(n, Column::F64(vec![v]));
            }
            (t, true)
        }
        (None, Some(p)) => (Table::read(p)?, false),
        _ => bail!("give exactly one of --lbd l,b,d or --coords FILE"),
    };
    let (l, b, d) = (
        table.f64_column("l")?,
        table.f64_column("b")?,
        table.f64_column("d")?,
    );
    check_positions(&table.source, &l, &b)?;
    let wants = |m: Mode| modes.contains(&m);
    let load = Load {
        std: wants(Mode::Std) && !a.integrated,
        samples: wants(Mode::Samples)
            || wants(Mode::RandomSample)
            || (a.integrated && wants(Mode::Std)),
        integrated: a.integrated && wants(Mode::Std),
    };
    let map = open_map_with(&a.map, load)?;
    let quantity = if a.integrated {
        Quantity::Integrated
    } else {
        Quantity::Differential
    };
    let need_samples = a.integrated && modes.iter().any(|m| *m != Mode::Mean);
    let q = Interpolator::new(
        &map,
        quantity,
        a.convention,
        need_samples && !map.samples.is_empty(),
    )?;
    let prefix = if a.integrated {
        "integrated"
    } else {
        "differential"
    };
    let t0 = std::time::Instant::now();
    evaluate(&q, &modes, prefix, [&l, &b, &d], a.seed, &mut table)?;
    tracing::debug!(
        points = l.len(),
        seconds = t0.elapsed().as_secs_f64(),
        "query evaluated"
    );
    match (&a.out, single) {
        (Some(out), _) => {
            table.write(out)?;
            tracing::info!(points = l.len(), out = %out.display(), "query written");
        }
        (None, true) => {
            let unit = if a.integrated {
                integrated_unit(&map.units)
            } else {
                map.units.clone()
            };
            for (n, c) in table.names.iter().zip(&table.columns).skip(3) {
                if let Column::F64(v) = c {
                    println!("{n} = {} {unit}", v[0]);
                }
            }
        }
        (None, false) => table.write_csv(std::io::stdout().lock())?,
    }
    Ok(())
}

/// The unit of integrated extinction: the map's unit without its "per pc".
fn integrated_unit(u: &str) -> String {
    let t = u.trim();
    for suffix in [" per pc", " / pc", "/pc", "/ pc", " pc^-1"] {
        if let Some(s) = t.strip_suffix(suffix) {
            return s.trim().to_string();
        }
    }
    format!("({t}) × pc")
}

/// `dust3d export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// dust3d map (netCDF).
    #[arg(long)]
    map: PathBuf,
    /// Target layout: dustmaps (the published release's FITS files).
    #[arg(long, default_value = "dustmaps")]
    format: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

/// Run `dust3d export`.
pub fn export(a: ExportArgs) -> Result<()> {
    if a.format != "dustmaps" {
        bail!(
            "--format {:?}: the only export format is 'dustmaps'",
            a.format
        );
    }
    let map = open_map(&a.map)?;
    for p in crate::products::dustmaps::export(&map, &a.out)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// `dust3d interp box|lbd`.
#[derive(Subcommand, Debug)]
pub enum InterpKind {
    /// Heliocentric Galactic Cartesian box (x to l = 0, z to the north Galactic pole), pc.
    Box(InterpArgs),
    /// (l, b, d) box in deg, deg, pc.
    Lbd(InterpArgs),
}

/// Arguments of `dust3d interp`.
#[derive(Args, Debug)]
pub struct InterpArgs {
    /// Map file.
    #[arg(long)]
    map: PathBuf,
    /// Box: '(n1,n2,n3)::((a1,b1),(a2,b2),(a3,b3))', endpoints included.
    #[arg(short = 'b', long = "box", allow_hyphen_values = true)]
    spec: String,
    /// Output (.nc or .fits).
    #[arg(long)]
    out: PathBuf,
    /// Integrated extinction instead of differential.
    #[arg(long)]
    integrated: bool,
    /// Radial convention (native or dustmaps).
    #[arg(long, default_value = "native")]
    convention: Convention,
    /// Largest box written, in points (the default, 2·10⁸, is a 1.6 GB output).
    #[arg(long, default_value_t = 200_000_000)]
    max_points: usize,
}

/// Run `dust3d interp`.
pub fn interp(kind: InterpKind) -> Result<()> {
    let (a, k) = match kind {
        InterpKind::Box(a) => (a, crate::products::regrid::BoxKind::Cartesian),
        InterpKind::Lbd(a) => (a, crate::products::regrid::BoxKind::Lbd),
    };
    let spec = crate::products::regrid::BoxSpec::parse(&a.spec, k)?;
    spec.check_size(a.max_points)?;
    let load = Load {
        std: !a.integrated,
        samples: a.integrated,
        integrated: a.integrated,
    };
    let map = open_map_with(&a.map, load)?;
    let quantity = if a.integrated {
        Quantity::Integrated
    } else {
        Quantity::Differential
    };
    let with_samples = a.integrated && !map.samples.is_empty();
    let q = Interpolator::new(&map, quantity, a.convention, with_samples)?;
    let has_std = q.std(0.0, 0.0, f64::NAN).is_ok();
    let what = if a.integrated {
        "integrated extinction"
    } else {
        "differential extinction"
    };
    crate::products::regrid::write_box(&spec, &q, has_std.then_some(&q), &map.units, what, &a.out)?;
    tracing::info!(points = spec.len(), out = %a.out.display(), "box written");
    Ok(())
}

/// `dust3d predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Map file.
    #[arg(long)]
    map: PathBuf,
    /// Catalog (CSV, CSV.gz or FITS) with l, b (deg), parallax and parallax_error (mas).
    #[arg(long)]
    catalog: PathBuf,
    /// Configuration whose [catalog.columns] names the columns.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output table (.csv, .csv.gz or .fits): the catalog plus predicted columns.
    #[arg(long)]
    out: PathBuf,
    /// The star's column: "pixel" (its own pixel, as the fit sees it) or "interpolated"
    /// (the four-pixel interpolation of `query` and dustmaps).
    #[arg(long, default_value = "pixel")]
    angular: crate::products::predict::Angular,
}

/// Run `dust3d predict`.
pub fn predict(a: PredictArgs) -> Result<()> {
    let (cfg, _) = super::load_config(a.config.as_deref())?;
    let c = &cfg.catalog.columns;
    let mut t = Table::read(&a.catalog)?;
    let cols = [&c.l, &c.b, &c.parallax, &c.parallax_error]
        .iter()
        .map(|n| t.f64_column(n))
        .collect::<Result<Vec<_>>>()?;
    let load = Load {
        samples: true,
        ..Load::MEAN
    };
    let map = open_map_with(&a.map, load)?;
    let p = crate::products::predict::predict_with(
        &map, &cols[0], &cols[1], &cols[2], &cols[3], a.angular,
    )
    .with_context(|| format!("{}", a.catalog.display()))?;
    t.push("predicted_extinction", Column::F64(p.mean));
    t.push("predicted_extinction_std", Column::F64(p.std));
    t.push("map_std", Column::F64(p.map_std));
    t.push("distance_std", Column::F64(p.distance_std));
    t.write(&a.out)?;
    tracing::info!(stars = t.rows, out = %a.out.display(), "predictions written");
    Ok(())
}

/// `dust3d plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Map file.
    #[arg(long)]
    map: PathBuf,
    /// Kind of figure: sky, xyz, uncertainty or stars.
    #[arg(long, default_value = "sky")]
    kind: String,
    /// sky/uncertainty: integrate to this distance; xyz: half-width of the panels (pc;
    /// default: the map's outer edge).
    #[arg(long)]
    max_distance: Option<f64>,
    /// xyz: half-thickness of the integrated slab, pc (default: a tenth of the half-width).
    #[arg(long)]
    slab: Option<f64>,
    /// Factor from map units to the plotted unit (A_V ≈ 2.8 E for ZGR23).
    #[arg(long, default_value_t = 2.8)]
    factor: f64,
    /// Name of the plotted unit.
    #[arg(long, default_value = "A_V [mag]")]
    unit: String,
    /// Points to draw over the figure: CSV/FITS with l, b (deg), optional d, d_err (pc), label.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Colour-scale range "lo,hi" in the plotted unit (e.g. to draw two maps alike).
    #[arg(long)]
    range: Option<String>,
    /// stars: catalog to count when the map does not record its star counts.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
}

/// Run `dust3d plot`.
pub fn plot(a: PlotArgs) -> Result<()> {
    use crate::products::plot::SkyField;
    let load = if a.kind == "uncertainty" {
        Load::ALL
    } else {
        Load::MEAN
    };
    let m = open_map_with(&a.map, load)?;
    let overlay = match &a.overlay {
        Some(p) => crate::products::plot::read_overlay(p)?,
        None => vec![],
    };
    let outer = *m.shells.edges_pc.last().expect("shells");
    let d = a.max_distance.unwrap_or(outer);
    if d.is_nan() || d <= 0.0 {
        bail!("--max-distance must be > 0, got {d}");
    }
    let range = a.range.as_deref().map(parse_range).transpose()?;
    let sky = |vals: Vec<f64>, log, unit: &str, title: String| {
        crate::products::plot::sky(&vals, (log, range), unit, &title, &overlay, &a.out)
    };
    match a.kind.as_str() {
        "sky" => {
            let v = crate::products::plot::sky_values(&m, SkyField::Integrated, d, None)?;
            let v = v.iter().map(|x| x * a.factor).collect();
            sky(
                v,
                true,
                &a.unit,
                format!("{} map: integrated extinction to {d:.0} pc", m.kind),
            )?;
        }
        "uncertainty" => {
            let v = crate::products::plot::sky_values(&m, SkyField::RelativeUncertainty, d, None)?;
            sky(
                v,
                false,
                "std / mean",
                format!("relative uncertainty of the extinction to {d:.0} pc"),
            )?;
        }
        "stars" => {
            let counts = star_counts(&m, a.catalog.as_ref())?;
            let v = crate::products::plot::sky_values(&m, SkyField::StarDensity, d, Some(&counts))?;
            let n: u64 = counts.iter().map(|&c| c as u64).sum();
            sky(
                v,
                true,
                "stars per deg²",
                format!("sky density of the {n} stars the fit used"),
            )?;
        }
        "xyz" => {
            let o = crate::products::plot::SliceOptions {
                extent_pc: d.min(outer),
                slab_pc: a.slab.unwrap_or(d.min(outer) / 10.0),
                factor: a.factor,
                unit: a.unit.clone(),
                pixels: 200,
                range,
            };
            if o.slab_pc.is_nan() || o.slab_pc <= 0.0 {
                bail!("--slab must be > 0");
            }
            let title = format!("{} map: heliocentric Galactic projections", m.kind);
            crate::products::plot::slices(&m, &o, &overlay, &title, &a.out)?;
        }
        other => bail!("--kind {other:?}: expected sky, xyz, uncertainty or stars"),
    }
    tracing::info!(out = %a.out.display(), "figure written");
    Ok(())
}

/// Parse "lo,hi" with lo < hi.
fn parse_range(s: &str) -> Result<(f64, f64)> {
    let v: Vec<f64> = s.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match v[..] {
        [lo, hi] if lo < hi && lo.is_finite() && hi.is_finite() => Ok((lo, hi)),
        _ => bail!("--range {s:?}: expected 'lo,hi' with lo < hi"),
    }
}

/// Star counts per pixel: recorded in the map, or counted from a catalog.
fn star_counts(m: &DustMap, catalog: Option<&PathBuf>) -> Result<Vec<u32>> {
    match catalog {
        Some(p) => {
            let t = Table::read(p)?;
            let (l, b) = (t.f64_column("l")?, t.f64_column("b")?);
            check_positions(&t.source, &l, &b)?;
            let mut c = vec![0u32; m.npix()];
            for i in 0..l.len() {
                c[crate::sphere::grid::ang2pix(m.nside, l[i], b[i]) as usize] += 1;
            }
            Ok(c)
        }
        None if !m.star_count.is_empty() => Ok(m.star_count.clone()),
        None => bail!(
            "the map does not record the stars of its fit (e.g. a truth map): pass --catalog FILE"
        ),
    }
}

/// `dust3d compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Map to compare (netCDF or release FITS).
    #[arg(long)]
    map: PathBuf,
    /// Reference map (netCDF or release FITS, e.g. the published mean_and_std_healpix.fits).
    #[arg(long)]
    reference: PathBuf,
    /// Output directory: compare_hist.png, compare_quantiles.csv, compare_summary.json.
    #[arg(long)]
    out: PathBuf,
    /// nside of the test-point sphere.
    #[arg(long, default_value_t = 64)]
    nside: u32,
    /// Distance step, pc.
    #[arg(long, default_value_t = 1.0)]
    step: f64,
    /// Lower end of the histogram (map units; the paper truncates at 1 mmag).
    #[arg(long, default_value_t = 1e-3)]
    min_value: f64,
    /// Radial convention of the integrals (native or dustmaps).
    #[arg(long, default_value = "native")]
    convention: Convention,
    /// Most test points (sightlines × distances) to evaluate; more is refused at once.
    #[arg(long, default_value_t = 200_000_000)]
    max_points: usize,
}

/// Run `dust3d compare`.
pub fn compare(a: CompareArgs) -> Result<()> {
    // means only: a paper-size array (516 shells × 786,432 pixels) is 3.2 GB in f64
    let map = open_map_with(&a.map, Load::MEAN)?;
    let reference = open_map_with(&a.reference, Load::MEAN)?;
    let o = crate::products::compare::CompareOptions {
        nside: a.nside,
        step_pc: a.step,
        min_value: a.min_value,
        convention: a.convention,
        max_points: a.max_points,
        ..Default::default()
    };
    let c = crate::products::compare::compare(&map, &reference, &o)?;
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let files = crate::products::compare::write_outputs(
        &c,
        o.bins,
        (&name(&a.map), &name(&a.reference)),
        &a.out,
    )?;
    println!(
        "compared at {} test points ({} sightlines × {} distances, {:.0}–{:.0} pc): median map/reference {:.4}, Pearson r of log values {:.4}",
        c.n_points,
        crate::sphere::grid::npix(a.nside),
        c.distances_pc.2,
        c.distances_pc.0,
        c.distances_pc.1,
        c.median_ratio,
        c.pearson_log
    );
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
