//! The OpenCL likelihood against the CPU model on the same sky: every stage and its adjoint
//! (PoCL on CI; skipped without a device unless DUST3D_REQUIRE_OPENCL is set).

use crate::app::config::{Config, Precision};
use crate::likelihood::model::{Model, State};
use crate::prior::icr::Icr;
use rand::Rng;
use rand_distr::StandardNormal;
use std::sync::Arc;

fn has_device() -> bool {
    match super::Gpu::open(&super::DeviceSpec::from_env()) {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var("DUST3D_REQUIRE_OPENCL").is_err(), "{e:#}");
            eprintln!("no OpenCL device ({e:#}): skipping");
            false
        }
    }
}

/// The same simulated sky as a CPU model and a device model, the stars' variance with or
/// without σ_a² (`distance_variance`).
fn models(precision: &str, distance_variance: bool) -> (Model, Model, Vec<f64>) {
    let mut cfg = Config::tiny(5, 2);
    cfg.inference.stage[0].distance_variance = distance_variance;
    cfg.kernel.length_pc = 80.0;
    cfg.noise.infer_nsigma = true;
    cfg.simulate.n_stars = 500;
    cfg.simulate.truth = "prior".into();
    let sim = crate::app::simulate::run(&cfg, "").unwrap();
    let chart = cfg.chart().unwrap();
    let kernel = cfg.kernel.build().unwrap();
    let icr = Arc::new(Icr::new(&chart, kernel.as_ref(), Precision::F64).unwrap());
    let mut x = crate::app::simulate::prior_excitations(cfg.seed, icr.n_xi());
    x.extend([0.3, -0.2]);
    let pc = sim.catalog.into_pixel_layout(chart.nside_final());
    let cpu = crate::app::build::stage_model(&cfg, 0, icr.clone(), &pc).unwrap();
    cfg.backend.kind = crate::app::config::BackendKind::Opencl;
    cfg.backend.precision = if precision == "f32" {
        Precision::F32
    } else {
        Precision::F64
    };
    let dev = crate::app::build::stage_model(&cfg, 0, icr, &pc).unwrap();
    (cpu, dev, x)
}

fn gauss(n: usize, seed: u64) -> Vec<f64> {
    let mut r = crate::base::rng::stream(seed, 91);
    (0..n).map(|_| r.sample::<f64, _>(StandardNormal)).collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Relative errors of the device against the CPU: `kernel` bounds the per-voxel and
/// per-star stages (state, JVP, VJP, dot-product test), `reduced` what is weighted by 1/v
/// (energy, gradients, metric products), which in f32 inherits the cancellation in
/// σ_a² = E[c²] − ā² for stars with σ_a ≪ ā.
fn check(precision: &str, distance_variance: bool, kernel: f64, reduced: f64) {
    let (cpu, dev, x) = models(precision, distance_variance);
    let (mut wc, mut wd) = (cpu.workspace(), dev.workspace());
    let (ns, np) = (cpu.data.len(), cpu.n_params());
    let xsig: Vec<f64> = gauss(ns, 3).iter().map(|v| 0.5 * v).collect();
    let mut errs: Vec<(String, f64, f64)> = Vec::new();
    let sc = cpu.state(&x, &xsig, &mut wc).unwrap();
    let sd = dev.state(&x, &xsig, &mut wd).unwrap();
    for (name, a, b) in [
        ("state s", &sd.s, &sc.s),
        ("state rw", &sd.rw, &sc.rw),
        ("state abar", &sd.abar, &sc.abar),
        ("state var", &sd.var, &sc.var),
    ] {
        errs.push((name.into(), rel(a, b), kernel));
    }
    let (mut gc, mut gd) = (vec![0.0; np], vec![0.0; np]);
    let (mut hc, mut hd) = (vec![0.0; ns], vec![0.0; ns]);
    let (mut tc, mut td) = (cpu.empty_state(), dev.empty_state());
    let ec = cpu
        .value_grad(&x, &xsig, &mut tc, &mut gc, &mut hc, &mut wc)
        .unwrap();
    let ed = dev
        .value_grad(&x, &xsig, &mut td, &mut gd, &mut hd, &mut wd)
        .unwrap();
    errs.push(("energy".into(), ((ed - ec) / ec).abs(), reduced));
    errs.push(("gradient x".into(), rel(&gd, &gc), reduced));
    // ∂/∂ξ_σ holds 0.5/v − 0.5 r²/v², which cancels for well-fitted stars and amplifies
    // the 1-ulp differences between the host's and the device's exp() tenfold
    errs.push(("gradient xi_sigma".into(), rel(&hd, &hc), 10.0 * reduced));
    let dx = gauss(np, 5);
    let (ca, cv) = (gauss(ns, 6), gauss(ns, 7));
    // at the value_grad state (resident on the device) and at a copy it must upload
    for (label, stc, std_) in [("resident", &tc, &td), ("uploaded", &sc, &clone_state(&sd))] {
        let (mut dac, mut dvc, mut dad, mut dvd) =
            (vec![0.0; ns], vec![0.0; ns], vec![0.0; ns], vec![0.0; ns]);
        cpu.jvp(stc, &dx, &mut dac, &mut dvc, &mut wc).unwrap();
        dev.jvp(std_, &dx, &mut dad, &mut dvd, &mut wd).unwrap();
        errs.push((format!("jvp abar ({label})"), rel(&dad, &dac), kernel));
        errs.push((format!("jvp var ({label})"), rel(&dvd, &dvc), kernel));
        let (mut oc, mut od) = (vec![0.0; np], vec![0.0; np]);
        cpu.vjp(stc, &ca, &cv, &mut oc, &mut wc).unwrap();
        dev.vjp(std_, &ca, &cv, &mut od, &mut wd).unwrap();
        errs.push((format!("vjp ({label})"), rel(&od, &oc), kernel));
        // dot-product test with both products from the device
        let (l, r) = (dot(&dad, &ca) + dot(&dvd, &cv), dot(&dx, &od));
        errs.push((
            format!("<Jv,c> - <v,J'c> ({label})"),
            (l - r).abs() / l.abs().max(r.abs()),
            kernel,
        ));
    }
    let v = gauss(np, 8);
    let (mut mc, mut md) = (vec![0.0; np], vec![0.0; np]);
    cpu.metric(&tc, &v, &mut mc, &mut wc).unwrap();
    dev.metric(&td, &v, &mut md, &mut wd).unwrap();
    errs.push(("metric".into(), rel(&md, &mc), reduced));
    let x2: Vec<f64> = x
        .iter()
        .zip(gauss(np, 9))
        .map(|(a, b)| a + 0.1 * b)
        .collect();
    let states_c = vec![tc, cpu.state(&x2, &xsig, &mut wc).unwrap()];
    let states_d = vec![td, dev.state(&x2, &xsig, &mut wd).unwrap()];
    let mask = crate::likelihood::mask::Mask::holding((0..np).filter(|i| i % 7 == 3));
    let vv = gauss(np + ns, 10);
    let (mut ac, mut ad) = (vec![0.0; np + ns], vec![0.0; np + ns]);
    cpu.averaged_metric(&states_c, &mask, &vv, &mut ac, &mut wc)
        .unwrap();
    dev.averaged_metric(&states_d, &mask, &vv, &mut ad, &mut wd)
        .unwrap();
    errs.push(("averaged metric".into(), rel(&ad, &ac), reduced));
    // CG with every vector on the device against CG on the host with the same (device)
    // operator, for the KL metric (two states, with ξ_σ) and the sampling metric (one
    // state); the operators themselves are compared with the CPU above
    let settings = crate::num::cg::CgSettings {
        rel_tol: 1e-300,
        max_iter: 15,
        ..Default::default()
    };
    let rc: Vec<&State> = states_c.iter().collect();
    let rd: Vec<&State> = states_d.iter().collect();
    assert!(cpu
        .solve_metric(&rc, &mask, true, &vv, &mut vec![0.0; np + ns], &settings)
        .unwrap()
        .is_none());
    // host CG with the models' own (patch-ordered) inner products
    let mut xc = vec![0.0; np + ns];
    crate::num::cg::solve_with(
        &dev.dom.p,
        |v, o| {
            dev.averaged_metric(&states_d, &mask, v, o, &mut wd)
                .unwrap()
        },
        &vv,
        &mut xc,
        &settings,
    );
    let mut xcpu = vec![0.0; np + ns];
    crate::num::cg::solve_with(
        &cpu.dom.p,
        |v, o| {
            cpu.averaged_metric(&states_c, &mask, v, o, &mut wc)
                .unwrap()
        },
        &vv,
        &mut xcpu,
        &settings,
    );
    let mut xd = vec![0.0; np + ns];
    let Some(rep) = dev
        .solve_metric(&rd, &mask, true, &vv, &mut xd, &settings)
        .unwrap()
    else {
        // single precision: CG stays on the host (f64) over the device's products
        assert_eq!(precision, "f32");
        report(precision, &errs);
        return;
    };
    assert_eq!(rep.iterations, 15);
    errs.push(("CG solve, KL metric".into(), rel(&xd, &xc), kernel));
    // against CG with the CPU operator: 15 iterations on this ill-conditioned metric (the
    // scale latent's diagonal is 7e5) amplify the operators' 1e-13 differences
    errs.push((
        "CG solve vs CPU operator".into(),
        rel(&xd, &xcpu),
        1e4 * reduced,
    ));
    let y = &vv[..np];
    let lin_d = crate::inference::mgvi::ModelAt::new(&dev, &states_d[0], &mask);
    use crate::inference::mgvi::Fisher;
    let (mut dc, mut dd) = (vec![0.0; np], vec![0.0; np]);
    let op = (
        crate::num::cg::Operator::Whole,
        |v: &[f64], o: &mut [f64]| lin_d.metric(v, o),
    );
    crate::num::cg::try_solve_with(&dev.dom.x, op, y, &mut dc, &settings).unwrap();
    lin_d.solve(y, &mut dd, &settings).unwrap();
    errs.push(("CG solve, sampling metric".into(), rel(&dd, &dc), kernel));
    report(precision, &errs);
}

fn report(precision: &str, errs: &[(String, f64, f64)]) {
    for (name, e, t) in errs {
        println!("{precision} {name:<32} {e:.1e} (tolerance {t:.0e})");
    }
    for (name, e, t) in errs {
        assert!(e <= t, "{precision} {name}: {e:e} > {t:e}");
    }
}

/// A copy with a fresh identity, so the device must upload it.
fn clone_state(s: &State) -> State {
    let mut c = s.clone();
    c.id = u64::MAX - s.id;
    c
}

#[test]
fn device_likelihood_matches_the_cpu_in_f64() {
    if has_device() {
        check("f64", true, 1e-12, 1e-12);
    }
}

#[test]
fn device_likelihood_without_the_distance_variance_matches_the_cpu() {
    if has_device() {
        check("f64", false, 1e-12, 1e-12);
    }
}

#[test]
fn device_likelihood_matches_the_cpu_in_f32() {
    if has_device() {
        check("f32", true, 1e-5, 1e-2);
    }
}
