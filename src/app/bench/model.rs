//! The model benchmarks (`bench likelihood`, `metric`, `mgvi`): a preset's synthetic sky
//! simulated, the model built on it, and its operations timed with their roofline figures.

use anyhow::{bail, Result};
use rand::Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Map, Value};
use std::time::Instant;

use super::{preset_config, roofline_figures, try_median_time, BenchOptions, Preset};
use crate::app::roofline;
use crate::likelihood::model::Model;
use crate::prior::icr::Icr;

pub(super) fn bench_model(
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
    let start = state.clone();
    let t = Instant::now();
    let rep =
        crate::inference::mgvi::global_iteration(model, &settings, &mask, &mut state, streams)?;
    ops.push(("mgvi_iteration_s", t.elapsed().as_secs_f64()));
    extra.insert("kl".into(), json!(rep.kl));
    extra.insert("newton_steps".into(), json!(rep.newton.steps));
    extra.insert("newton_cg".into(), json!(rep.newton.cg_iterations));
    extra.insert("sample_cg".into(), json!(rep.sample_cg));
    extra.insert("kl_evaluations".into(), json!(rep.newton.evaluations));
    // where the iteration's time went: its two parts and what their operators took
    ops.extend(iteration_parts(false, &rep.timings));
    // the same iteration again (same start, same draws, the same bits): what each of a
    // fit's iterations costs once the process's memory is in use, without the first
    // touch of every buffer (the reference's "warm" figure is its second iteration)
    let mut again = start;
    let t = Instant::now();
    let warm =
        crate::inference::mgvi::global_iteration(model, &settings, &mask, &mut again, streams)?;
    ops.push(("warm_mgvi_iteration_s", t.elapsed().as_secs_f64()));
    ops.extend(iteration_parts(true, &warm.timings));
    extra.insert(
        "warm_identical".into(),
        json!(warm.kl.to_bits() == rep.kl.to_bits() && again.x == state.x),
    );
    Ok(())
}

/// The names of an iteration's parts, after a prefix.
macro_rules! part_names {
    ($prefix:literal) => {
        [
            concat!($prefix, "sampling_s"),
            concat!($prefix, "sampling_products_s"),
            concat!($prefix, "newton_s"),
            concat!($prefix, "newton_products_s"),
            concat!($prefix, "kl_evaluations_s"),
        ]
    };
}

/// An iteration's parts as named timings (the warm iteration's names begin with `warm_`).
fn iteration_parts(
    warm: bool,
    t: &crate::inference::mgvi::IterationTimings,
) -> [(&'static str, f64); 5] {
    let names = if warm {
        part_names!("warm_")
    } else {
        part_names!("")
    };
    let values = [
        t.sampling_s,
        t.sampling_products_s,
        t.newton_s,
        t.newton_products_s,
        t.kl_evaluations_s,
    ];
    std::array::from_fn(|i| (names[i], values[i]))
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
