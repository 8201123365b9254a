//! `dust3d bench`: timings of the hot kernels on the presets W1 and W2 (the same
//! model sizes as a NIFTy.re benchmark of the same model; see docs/performance.md).

mod model;
mod timing;

use anyhow::{bail, Result};
use rand::Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Map, Value};
use std::time::Instant;

use crate::app::config::{Config, Precision};
use crate::app::roofline;
use crate::prior::icr::Icr;
use crate::sphere::covariance::{Matern, Nu};
use crate::sphere::grid::Chart;
use model::bench_model;
pub use timing::{median_time, median_time_cold, peak_rss_bytes, try_median_time};

/// A benchmark preset.
#[derive(Clone, Debug)]
pub struct Preset {
    /// Name ("w1", "w2").
    pub name: &'static str,
    /// The ICR chart.
    pub chart: Chart,
    /// The prior kernel.
    pub kernel: Matern,
    /// Stars of the likelihood benchmarks.
    pub n_stars: usize,
}

/// The preset called `name`: W1 = nside 32 (nside0 2, 4 levels), W2 = nside 64 (5 levels);
/// 12 level-0 shells, inner shells log-uniform over 40–2000 pc, Matérn-3/2 (1.5, 30 pc).
pub fn preset(name: &str) -> Result<Preset> {
    let (levels, n_stars, name) = match name.to_ascii_lowercase().as_str() {
        "w1" => (4, 200_000, "w1"),
        "w2" => (5, 2_000_000, "w2"),
        other => bail!("unknown preset {other:?} (use w1 or w2)"),
    };
    Ok(Preset {
        name,
        chart: Chart::new(2, 12, levels, 2, 40.0, 2000.0)?,
        kernel: Matern {
            nu: Nu::ThreeHalves,
            std: 1.5,
            length_pc: 30.0,
        },
        n_stars,
    })
}

/// Benchmark result: one JSON object and a human-readable table.
pub struct BenchOut {
    /// `preset`, `threads`, `backend`, `<op>_s` medians, `matrix_bytes`, `peak_rss_bytes`.
    pub json: Value,
    /// The same as text.
    pub text: String,
}

/// The configuration of a preset's synthetic sky: prior-draw truth at the prior medians,
/// stars uniform on the sky with density ∝ r² over 40–2000 pc, no outliers.
pub fn preset_config(p: &Preset) -> Config {
    let mut cfg = Config::default();
    let c = &p.chart;
    cfg.seed = 42;
    cfg.grid.nside0 = c.nside0;
    cfg.grid.n_r0 = c.n_r0;
    cfg.grid.levels = c.levels;
    cfg.grid.padding = c.padding;
    cfg.grid.r_min_pc = c.r_min_pc;
    cfg.grid.r_max_pc = c.r_max_pc;
    cfg.kernel.std = p.kernel.std;
    cfg.kernel.length_pc = p.kernel.length_pc;
    cfg.simulate.n_stars = p.n_stars;
    cfg.simulate.truth = "prior".into();
    cfg.simulate.outlier_fraction = 0.0;
    // the reference's model: the plain ICR prior (the correction changes no timing, and its
    // draws would dominate the set-up of the larger presets)
    cfg.grid.variance_correction = false;
    cfg
}

/// Arrays of the bandwidth measurement, MiB each: far beyond any cache.
const STREAM_MIB: usize = 128;

/// For each (operation, bytes it must move): the bytes, the achieved GB/s and its fraction of
/// this machine's triad bandwidth, measured now on the same threads.
fn roofline_figures(ops: &[(&str, f64)], extra: &mut Map<String, Value>, moved: &[(&str, f64)]) {
    let gbs = roofline::stream_triad_gbs(STREAM_MIB, 5);
    extra.insert("stream_triad_gbs".into(), json!(gbs));
    for (op, bytes) in moved {
        let Some(&(_, t)) = ops.iter().find(|(k, _)| k == op) else {
            continue;
        };
        let name = op.trim_end_matches("_s");
        let achieved = bytes / t / 1e9;
        extra.insert(format!("{name}_min_bytes"), json!(bytes));
        extra.insert(format!("{name}_gbs"), json!(achieved));
        extra.insert(format!("{name}_of_stream"), json!(achieved / gbs));
    }
}

/// Options of [`run`].
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Timed repetitions after warm-up.
    pub reps: usize,
    /// Storage precision of the refinement matrices.
    pub precision: Precision,
    /// Inner-CG forcing of the Newton steps of `bench mgvi`.
    pub newton_forcing: f64,
    /// Arithmetic precision on an OpenCL device.
    pub device_precision: crate::backend::opencl::Precision,
    /// Run the model benchmarks on the chart ended at this level (a coarse stage's).
    pub levels: Option<usize>,
    /// Run the model benchmarks on the OpenCL device.
    pub opencl: bool,
}

/// ICR on the OpenCL device: device-only passes (inputs resident), and with the host
/// transfers; the global-memory bytes the kernels access (every load and store counted, a
/// site's matrix once per site although sites of one class share it, so an upper bound on
/// DRAM traffic) and the access rate that implies.
fn bench_icr_opencl(
    icr: &Icr,
    xi: &[f64],
    sb: &[f64],
    reps: usize,
    precision: crate::backend::opencl::Precision,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    use crate::backend::opencl::{icr::GpuIcr, DeviceSpec, Gpu};
    let gpu = Gpu::open(&DeviceSpec::from_env())?;
    let t0 = Instant::now();
    let dev = GpuIcr::new(icr, &gpu, precision)?;
    ops.push(("device_setup_s", t0.elapsed().as_secs_f64()));
    dev.upload_xi(xi)?;
    dev.upload_field_bar(sb)?;
    let run = |f: &dyn Fn() -> Result<()>| {
        median_time(reps, || {
            f().expect("OpenCL pass");
            dev.finish().expect("OpenCL finish");
        })
    };
    let tf = run(&|| dev.forward());
    let ta = run(&|| {
        dev.upload_field_bar(sb)?;
        dev.adjoint()
    });
    let tfh = run(&|| {
        dev.upload_xi(xi)?;
        dev.forward()?;
        dev.download_field(&mut vec![0.0; icr.n_field()])
    });
    ops.push(("forward_s", tf));
    ops.push(("adjoint_s", ta));
    ops.push(("forward_with_transfers_s", tfh));
    let (bf, ba) = dev.traffic_bytes();
    extra.insert("device".into(), json!(dev.device));
    extra.insert(
        "device_precision".into(),
        json!(format!("{precision:?}").to_lowercase()),
    );
    extra.insert("device_matrix_bytes".into(), json!(dev.matrix_bytes()));
    extra.insert("forward_bytes_accessed".into(), json!(bf));
    extra.insert("adjoint_bytes_accessed".into(), json!(ba));
    extra.insert(
        "forward_access_rate_gbytes_per_second".into(),
        json!(bf as f64 / tf / 1e9),
    );
    extra.insert(
        "adjoint_access_rate_gbytes_per_second".into(),
        json!(ba as f64 / ta / 1e9),
    );
    extra.insert(
        "host_transfer_bytes_forward".into(),
        json!(8 * (icr.n_xi() + icr.n_field())),
    );
    Ok(())
}

/// Point queries on a map of the preset's final grid: 10⁶ random points (l, b uniform on the
/// sky, d uniform over the radial range), mean of differential and integrated extinction, on
/// one thread (per-core rate) and on the whole pool.
fn bench_query(
    p: &Preset,
    reps: usize,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    use crate::products::query::{Convention, Interpolator, Quantity};
    use rayon::prelude::*;
    let shells = p.chart.kept_shells();
    let mut rng = crate::base::rng::stream(1, crate::base::rng::streams::BENCH);
    let mut map = crate::products::mapfile::DustMap::from_fn(
        p.chart.nside_final(),
        shells,
        "E / pc",
        |_, _| 0.0,
    );
    for v in map.mean.iter_mut() {
        *v = 1e-3 * (rng.sample::<f64, _>(StandardNormal)).exp();
    }
    let n = 1_000_000;
    let (r0, r1) = (
        map.shells.edges_pc[0],
        *map.shells.edges_pc.last().expect("shells"),
    );
    let pts: Vec<[f64; 3]> = (0..n)
        .map(|_| {
            let z: f64 = rng.random_range(-1.0..1.0);
            [
                rng.random_range(0.0..360.0),
                z.asin().to_degrees(),
                rng.random_range(r0..r1),
            ]
        })
        .collect();
    for (q, name1, name_all) in [
        (
            Quantity::Differential,
            "differential_1thread_s",
            "differential_pool_s",
        ),
        (
            Quantity::Integrated,
            "integrated_1thread_s",
            "integrated_pool_s",
        ),
    ] {
        let it = Interpolator::new(&map, q, Convention::Native, false)?;
        let t1 = median_time(reps, || {
            let s: f64 = pts.iter().map(|x| it.mean(x[0], x[1], x[2])).sum();
            std::hint::black_box(s);
        });
        let tp = median_time(reps, || {
            let s: f64 = pts.par_iter().map(|x| it.mean(x[0], x[1], x[2])).sum();
            std::hint::black_box(s);
        });
        ops.push((name1, t1));
        ops.push((name_all, tp));
        let key = name1.trim_end_matches("_1thread_s");
        extra.insert(
            format!("{key}_points_per_s_per_core"),
            json!((n as f64 / t1).round()),
        );
        extra.insert(
            format!("{key}_points_per_s_pool"),
            json!((n as f64 / tp).round()),
        );
    }
    extra.insert("points".into(), json!(n));
    extra.insert("map_voxels".into(), json!(map.mean.len()));
    Ok(())
}

/// Run benchmark `what` on preset `preset_name`.
pub fn run(what: &str, preset_name: &str, opts: BenchOptions) -> Result<BenchOut> {
    if opts.opencl && !matches!(what, "icr" | "likelihood" | "metric" | "mgvi") {
        bail!("--backend opencl runs icr, likelihood, metric and mgvi");
    }
    let p = preset(preset_name)?;
    let mut ops: Vec<(&str, f64)> = Vec::new();
    let mut extra = Map::new();
    match what {
        "icr" => bench_icr(&p, opts, &mut ops, &mut extra)?,
        "likelihood" | "metric" | "mgvi" => bench_model(&p, what, opts, &mut ops, &mut extra)?,
        "query" => bench_query(&p, opts.reps, &mut ops, &mut extra)?,
        "stream" => {
            let t0 = Instant::now();
            let gbs = roofline::stream_triad_gbs(STREAM_MIB, opts.reps.max(5));
            ops.push(("stream_s", t0.elapsed().as_secs_f64()));
            extra.insert("stream_triad_gbs".into(), json!(gbs));
            extra.insert("array_mib".into(), json!(STREAM_MIB));
        }
        other => {
            bail!(
                "unknown benchmark {other:?} (available: icr, likelihood, metric, mgvi, query, \
                 stream)"
            )
        }
    }
    Ok(report(what, &p, opts, &ops, extra))
}

/// The ICR's forward and adjoint (warm and, on the CPU, with cold caches), its matrices and
/// the roofline figures (`bench icr`).
fn bench_icr(
    p: &Preset,
    opts: BenchOptions,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    let reps = opts.reps;
    let t0 = Instant::now();
    let icr = Icr::new(&p.chart, &p.kernel, opts.precision)?;
    ops.push(("setup_s", t0.elapsed().as_secs_f64()));
    let mut rng = crate::base::rng::stream(0, crate::base::rng::streams::BENCH);
    let xi: Vec<f64> = (0..icr.n_xi())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    let mut w = icr.workspace();
    ops.push(("forward_s", median_time(reps, || icr.forward(&xi, &mut w))));
    let sb: Vec<f64> = (0..icr.n_field())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    let mut xb = vec![0.0; icr.n_xi()];
    ops.push((
        "adjoint_s",
        median_time(reps, || icr.adjoint(&sb, &mut xb, &mut w)),
    ));
    extra.insert("matrix_bytes".into(), json!(icr.matrix_bytes()));
    extra.insert("matrix_classes".into(), json!(icr.class_counts()));
    extra.insert("n_xi".into(), json!(icr.n_xi()));
    if opts.opencl {
        ops.clear();
        ops.push(("setup_s", t0.elapsed().as_secs_f64()));
        let (xi, sb) = (&xi[..], &sb[..]);
        return bench_icr_opencl(&icr, xi, sb, reps, opts.device_precision, ops, extra);
    }
    let cold = reps.min(5);
    let tf = median_time_cold(cold, || icr.forward(&xi, &mut w));
    let ta = median_time_cold(cold, || icr.adjoint(&sb, &mut xb, &mut w));
    ops.push(("forward_cold_s", tf));
    ops.push(("adjoint_cold_s", ta));
    // two cotangents at once, as the sampling solves' metric products run them
    let (mut w1, mut xb1) = (icr.workspace(), vec![0.0; icr.n_xi()]);
    let sb1: Vec<f64> = sb.iter().rev().copied().collect();
    let t = median_time(reps, || {
        icr.adjoint_pair([&sb, &sb1], [&mut xb, &mut xb1], [&mut w, &mut w1])
    });
    ops.push(("adjoint_pair_s", t));
    let t = median_time_cold(cold, || {
        icr.adjoint_pair([&sb, &sb1], [&mut xb, &mut xb1], [&mut w, &mut w1])
    });
    ops.push(("adjoint_pair_cold_s", t));
    let b = roofline::icr_bytes(&p.chart, icr.n_xi(), icr.matrix_bytes());
    let pair = 2.0 * b - icr.matrix_bytes() as f64;
    let moved = [
        ("forward_s", b),
        ("adjoint_s", b),
        ("forward_cold_s", b),
        ("adjoint_cold_s", b),
        ("adjoint_pair_s", pair),
        ("adjoint_pair_cold_s", pair),
    ];
    roofline_figures(ops, extra, &moved);
    Ok(())
}

/// The benchmark's JSON object (the run's settings, each operation's median seconds and the
/// extra figures, peak memory) and the same as a table.
fn report(
    what: &str,
    p: &Preset,
    opts: BenchOptions,
    ops: &[(&str, f64)],
    extra: Map<String, Value>,
) -> BenchOut {
    let backend = if opts.opencl { "opencl" } else { "cpu" };
    let precision = opts.precision;
    let mut obj = Map::new();
    obj.insert("preset".into(), json!(p.name));
    obj.insert("threads".into(), json!(rayon::current_num_threads()));
    obj.insert("backend".into(), json!(backend));
    obj.insert(
        "matrix_precision".into(),
        json!(format!("{precision:?}").to_lowercase()),
    );
    obj.insert("benchmark".into(), json!(what));
    // the instruction set the per-star walks were dispatched to
    obj.insert("simd".into(), json!(crate::base::simd::describe()));
    for (k, v) in ops {
        obj.insert((*k).into(), json!(v));
    }
    obj.extend(extra);
    obj.insert("peak_rss_bytes".into(), json!(peak_rss_bytes()));
    let mut text = format!(
        "dust3d bench {what} --preset {} ({} threads, backend {backend}, {precision:?} matrices, \
         {} walks)\n",
        p.name,
        rayon::current_num_threads(),
        crate::base::simd::describe()
    );
    for (k, v) in &obj {
        if k.ends_with("_s") {
            text += &format!("  {:<18} {:>10.4} s\n", k, v.as_f64().unwrap_or(f64::NAN));
        } else if !matches!(
            k.as_str(),
            "preset" | "threads" | "backend" | "benchmark" | "matrix_precision" | "simd"
        ) {
            text += &format!("  {k:<18} {v}\n");
        }
    }
    BenchOut {
        json: Value::Object(obj),
        text,
    }
}
