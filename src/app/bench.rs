//! `dust3d bench`: timings of the hot kernels on the presets W1 and W2 (the same
//! model sizes as a NIFTy.re benchmark of the same model; see docs/performance.md).

use anyhow::{bail, Result};
use rand::Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Map, Value};
use std::time::Instant;

use crate::app::config::{Config, Precision};
use crate::app::roofline;
use crate::likelihood::model::Model;
use crate::prior::icr::Icr;
use crate::sphere::covariance::{Matern, Nu};
use crate::sphere::grid::Chart;

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

/// Peak resident set size of this process in bytes (Linux VmHWM), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Median wall time in seconds of `reps` calls of `f` after two warm-up calls.
pub fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    median_after(reps, |_| {}, f)
}

/// Bytes streamed through before each run of [`median_time_cold`]: beyond the last-level
/// cache of the servers dust3d runs on (this project's machine has a 480 MiB L3).
const EVICT_BYTES: usize = 640 << 20;

/// [`median_time`] with the caches evicted before each run (a pass writing and reading
/// 640 MiB): the operation's matrices and vectors start in memory, as they do inside
/// an MGVI iteration, where the star walks and other vectors pass between two ICR calls.
pub fn median_time_cold(reps: usize, f: impl FnMut()) -> f64 {
    use rayon::prelude::*;
    let mut evict = vec![0u64; EVICT_BYTES / 8];
    let evict_caches = |r: usize| {
        evict
            .par_iter_mut()
            .with_min_len(1 << 16)
            .for_each(|v| *v = v.wrapping_add(r as u64 + 1));
        std::hint::black_box(evict.par_iter().with_min_len(1 << 16).sum::<u64>());
    };
    median_after(reps, evict_caches, f)
}

/// Median wall time of `reps` calls of `f`, each after an untimed `before(repetition)`.
fn median_after(reps: usize, mut before: impl FnMut(usize), mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|r| {
            before(r);
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
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

fn bench_model(
    p: &Preset,
    what: &str,
    opts: BenchOptions,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    let mut cfg = preset_config(p);
    if opts.opencl {
        cfg.backend.kind = crate::app::config::BackendKind::Opencl;
        cfg.backend.precision = opts.device_precision;
    }
    let t0 = Instant::now();
    let sim = crate::app::simulate::run(&cfg, "")?;
    let t_sim = t0.elapsed().as_secs_f64();
    // keep only what a fit would hold: the truth map and the raw catalog go
    let mut catalog = sim.catalog;
    drop(sim.truth);
    catalog.extra.clear();
    let t0 = Instant::now();
    let mut icr = Icr::new(&p.chart, &p.kernel, opts.precision)?;
    let mut x = crate::app::simulate::prior_excitations(cfg.seed, icr.n_xi());
    let mut pc = catalog.into_pixel_layout(p.chart.nside_final());
    if let Some(k) = opts.levels {
        if k > p.chart.levels {
            bail!("--levels {k}: the preset has {} levels", p.chart.levels);
        }
        // a coarse stage's chart: the truth's first excitations, the stars re-pixelised
        icr = icr.truncated(k)?;
        x.truncate(icr.n_xi());
        pc = pc.coarsened(icr.chart.nside_final());
        extra.insert("levels".into(), json!(k));
    }
    x.extend([0.0, 0.0]);
    let chart = icr.chart.clone();
    let model = crate::app::build::model(&cfg, std::sync::Arc::new(icr), &pc)?;
    drop(pc);
    ops.push(("setup_s", t0.elapsed().as_secs_f64()));
    match what {
        "likelihood" => bench_likelihood(&model, &x, opts.reps, ops, extra)?,
        "mgvi" => bench_mgvi(&model, opts, ops, extra)?,
        _ => bench_metric(&model, &x, opts, ops, extra)?,
    }
    if !opts.opencl && what != "mgvi" {
        let icr = roofline::icr_bytes(&chart, model.icr.n_xi(), model.icr.matrix_bytes());
        let bytes = roofline::likelihood_bytes(&chart, icr, model.data.windows.bytes());
        let op = if what == "likelihood" {
            "value_grad_s"
        } else {
            "metric_s"
        };
        roofline_figures(ops, extra, &[(op, bytes)]);
    }
    if let Some(t) = model.device_traffic() {
        device_figures(&t, what == "likelihood", ops, extra);
    }
    extra.insert("simulate_s".into(), json!(t_sim));
    extra.insert("n_stars".into(), json!(model.data.len()));
    extra.insert("window_bytes".into(), json!(model.data.windows.bytes()));
    extra.insert("matrix_bytes".into(), json!(model.icr.matrix_bytes()));
    Ok(())
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

/// [`median_time`] of an operation that can fail: the first error is returned.
pub fn try_median_time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut err = Ok(());
    let t = median_time(reps, || {
        if err.is_ok() {
            err = f();
        }
    });
    err.map(|()| t)
}

/// `bench likelihood`: value + gradient at the truth, with χ²/star sanity figures.
fn bench_likelihood(
    model: &Model,
    x: &[f64],
    reps: usize,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    let xs = vec![0.0; model.data.len()];
    let mut w = model.workspace();
    let (mut gx, mut gs) = (vec![0.0; model.n_params()], vec![0.0; model.data.len()]);
    let mut st = model.state(x, &xs, &mut w)?;
    // cross-checks against the reference's sanity numbers (χ²/star at the truth and at 0)
    let chi2 = |st: &crate::likelihood::model::State| {
        let d = &model.data;
        (0..d.len())
            .map(|i| (d.a_obs[i] - st.abar[i]).powi(2) / st.var[i])
            .sum::<f64>()
            / d.len() as f64
    };
    extra.insert("chi2_per_star_at_truth".into(), json!(chi2(&st)));
    extra.insert(
        "neg_log_joint_at_truth".into(),
        json!(model.energy(&st, x, &xs)),
    );
    let zero = vec![0.0; model.n_params()];
    let st0 = model.state(&zero, &xs, &mut w)?;
    extra.insert("chi2_per_star_at_zero".into(), json!(chi2(&st0)));
    drop(st0);
    let t = try_median_time(reps, || {
        let v = model.value_grad(x, &xs, &mut st, &mut gx, &mut gs, &mut w)?;
        std::hint::black_box(v);
        Ok(())
    })?;
    ops.push(("value_grad_s", t));
    Ok(())
}

/// `bench mgvi`: one global iteration as in the reference: 2 antithetic pairs, exactly 20
/// sampling-CG iterations, 3 Newton steps of ≤ 10 CG iterations, from ξ = 0.
fn bench_mgvi(
    model: &Model,
    opts: BenchOptions,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    let settings = crate::inference::mgvi::IterationSettings {
        sample_pairs: 2,
        sample_cg_iterations: 20,
        sample_cg_tolerance: 0.0,
        newton_steps: 3,
        newton_cg_iterations: 10,
        // 0.1 by default; a tiny forcing runs exactly 10 inner CG iterations per Newton
        // step, the reference's work
        newton_forcing: opts.newton_forcing,
        mode: crate::inference::mgvi::SampleMode::Mgvi,
        sample_nsigma: false,
        // the reference's treatment (and its work)
        scale_update: crate::inference::mgvi::ScaleUpdate::Joint,
    };
    let mask = crate::likelihood::mask::Mask::all_free();
    let mut state = crate::inference::mgvi::MgviState::start(model.n_params());
    state.xsig = vec![0.0; model.data.len()];
    let streams = crate::inference::mgvi::Streams {
        seed: 0,
        stage: 0,
        iteration: 0,
    };
    let t = Instant::now();
    let rep =
        crate::inference::mgvi::global_iteration(model, &settings, &mask, &mut state, streams)?;
    ops.push(("mgvi_iteration_s", t.elapsed().as_secs_f64()));
    extra.insert("kl".into(), json!(rep.kl));
    extra.insert("newton_steps".into(), json!(rep.newton.steps));
    extra.insert("newton_cg".into(), json!(rep.newton.cg_iterations));
    extra.insert("sample_cg".into(), json!(rep.sample_cg));
    extra.insert("kl_evaluations".into(), json!(rep.newton.evaluations));
    Ok(())
}

/// `bench metric`: one metric-vector product at the truth; on a device also ten CG
/// iterations with every vector resident there.
fn bench_metric(
    model: &Model,
    x: &[f64],
    opts: BenchOptions,
    ops: &mut Vec<(&str, f64)>,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    let xs = vec![0.0; model.data.len()];
    let mut w = model.workspace();
    let mut gx = vec![0.0; model.n_params()];
    let st = model.state(x, &xs, &mut w)?;
    let mut rng = crate::base::rng::stream(1, crate::base::rng::streams::BENCH);
    let v: Vec<f64> = (0..model.n_params())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    let t = try_median_time(opts.reps, || model.metric(&st, &v, &mut gx, &mut w))?;
    ops.push(("metric_s", t));
    // the lockstep sampling solves' product: two vectors at once
    let v2: Vec<f64> = (0..model.n_params())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    let mut gx2 = vec![0.0; model.n_params()];
    let t = try_median_time(opts.reps, || {
        model.metric_pair(&st, [&v, &v2], [&mut gx, &mut gx2], &mut w)
    })?;
    ops.push(("metric_pair_s", t));
    // the Newton steps' product: the metric averaged over 2 sample pairs' 4 states (here
    // four copies of one), with the ξ_σ block
    let states = vec![st.clone(); 4];
    let mask = crate::likelihood::mask::Mask::all_free();
    let vp: Vec<f64> = v.iter().copied().chain(xs.iter().map(|_| 0.5)).collect();
    let mut gp = vec![0.0; vp.len()];
    let t = try_median_time(opts.reps, || {
        model.averaged_metric(&states, &mask, &vp, &mut gp, &mut w)
    })?;
    ops.push(("metric_averaged_4_states_s", t));
    drop(states);
    if !opts.opencl {
        return Ok(());
    }
    // CG with every vector resident on the device: 10 iterations of the sampling metric
    // (one metric product, two dot products, three vector updates each)
    let mask = crate::likelihood::mask::Mask::all_free();
    let settings = crate::num::cg::CgSettings {
        rel_tol: 0.0,
        max_iter: 10,
        ..Default::default()
    };
    let t = try_median_time(opts.reps, || {
        let mut x = vec![0.0; model.n_params()];
        model.solve_metric(&[&st], &mask, false, &v, &mut x, &settings)?;
        Ok(())
    })?;
    ops.push(("device_cg_10_iterations_s", t));
    let n = model.n_params();
    let chunks = n.div_ceil(8192);
    extra.insert(
        "device_cg_host_bytes_per_iteration".into(),
        json!(8 * (6 + 2 * model.npix().div_ceil(8192) + 2 * chunks)),
    );
    extra.insert(
        "device_cg_host_bytes_per_solve_in_out".into(),
        json!(8 * 2 * n),
    );
    Ok(())
}

/// Bytes a device call moves and the access rate they imply.
fn device_figures(
    t: &crate::likelihood::backend::Traffic,
    likelihood: bool,
    ops: &[(&str, f64)],
    extra: &mut Map<String, Value>,
) {
    let (dev, host) = if likelihood { t.value_grad } else { t.metric };
    extra.insert("device".into(), json!(t.device));
    extra.insert("device_bytes_accessed_per_call".into(), json!(dev));
    extra.insert("host_transfer_bytes_per_call".into(), json!(host));
    if let Some((_, secs)) = ops
        .iter()
        .find(|(k, _)| *k == "value_grad_s" || *k == "metric_s")
    {
        extra.insert(
            "device_access_rate_gbytes_per_second".into(),
            json!(dev as f64 / secs / 1e9),
        );
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
    let b = roofline::icr_bytes(&p.chart, icr.n_xi(), icr.matrix_bytes());
    let moved = ["forward_s", "adjoint_s", "forward_cold_s", "adjoint_cold_s"];
    roofline_figures(ops, extra, &moved.map(|op| (op, b)));
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
