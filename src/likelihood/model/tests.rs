use super::*;
use crate::app::config::Config;
use crate::app::config::Precision;
use crate::app::simulate;
use crate::likelihood::response::{finish_vjp, inner_columns, star_jvp, star_moments, star_vjp};
use crate::likelihood::windows::Windows;
use rand::Rng;
use rand_distr::StandardNormal;

/// A small simulated sky with a prior-draw truth and the model built on it.
fn setup(n_stars: usize, infer_nsigma: bool, distances: &str) -> (Model, Vec<f64>, Config) {
    let mut cfg = Config::tiny(5, 2);
    cfg.kernel.length_pc = 80.0;
    cfg.noise.infer_nsigma = infer_nsigma;
    cfg.simulate.n_stars = n_stars;
    cfg.simulate.truth = "prior".into();
    cfg.simulate.outlier_fraction = 0.0;
    cfg.simulate.star_distances = distances.into();
    let sim = simulate::run(&cfg, "").unwrap();
    let chart = cfg.chart().unwrap();
    // the prior operator the mock was drawn from (variance correction included)
    let decomp = crate::sphere::decomp::Decomp::single(cfg.nside_dec().unwrap());
    let icr = crate::app::build::icr(&cfg, decomp).unwrap();
    let mut x = simulate::prior_excitations(cfg.seed, icr.n_xi());
    x.extend([0.0, 0.0]);
    let pc = sim.catalog.into_pixel_layout(chart.nside_final());
    let model = crate::app::build::model(&cfg, std::sync::Arc::new(icr), &pc).unwrap();
    (model, x, cfg)
}

/// [`setup`]'s sky and truth with n_σ integrated out of the likelihood.
fn setup_marginal(n_stars: usize) -> (Model, Vec<f64>) {
    let (m, x, mut cfg) = setup(n_stars, true, "volume");
    cfg.noise.marginalise_nsigma = true;
    let sim = simulate::run(&cfg, "").unwrap();
    let pc = sim
        .catalog
        .into_pixel_layout(cfg.chart().unwrap().nside_final());
    let model = crate::app::build::model(&cfg, m.icr.clone(), &pc).unwrap();
    assert!(model.marginal.is_some() && !model.infer_nsigma);
    (model, x)
}

fn gauss(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut r = crate::base::rng::stream(seed, 77);
    (0..n)
        .map(|_| scale * r.sample::<f64, _>(StandardNormal))
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(x: &[f64], h: f64, u: &[f64]) -> Vec<f64> {
    x.iter().zip(u).map(|(a, b)| a + h * b).collect()
}

/// Central difference with Richardson extrapolation (error O(h⁴)).
fn richardson(mut f: impl FnMut(f64) -> f64, h: f64) -> f64 {
    let d1 = (f(h) - f(-h)) / (2.0 * h);
    let d2 = (f(h / 2.0) - f(-h / 2.0)) / h;
    (4.0 * d2 - d1) / 3.0
}

/// The truth with every 5th finest-level excitation set to ±3 and the scale and offset
/// latents at +0.8 / −1.5: large |ξ| while the energy stays within what double-precision
/// differences resolve (with every ξ 2.5σ out, ρ reaches e^10 per pc and the energy 1e15).
fn large_point(m: &Model, x_true: &[f64]) -> Vec<f64> {
    let mut x = x_true.to_vec();
    let n = x.len();
    let start = m.icr.levels.last().unwrap().xi_off;
    for (i, v) in x.iter_mut().enumerate().take(n - 2).skip(start).step_by(5) {
        *v = if i % 10 < 5 { 3.0 } else { -3.0 };
    }
    x[n - 2] = 0.8;
    x[n - 1] = -1.5;
    x
}

#[test]
fn gradient_matches_finite_differences() {
    let (m, x_true, _) = setup(400, true, "volume");
    let mut w = m.workspace();
    let n = m.data.len();
    // the truth, a random point, and a point with large |ξ| (incl. the scale and offset)
    let points = [
        (x_true.clone(), vec![0.0; n]),
        (
            axpy(&x_true, 0.2, &gauss(m.n_params(), 1, 1.0)),
            gauss(n, 2, 1.0),
        ),
        (large_point(&m, &x_true), gauss(n, 4, 2.5)),
    ];
    for (pi, (x, xs)) in points.iter().enumerate() {
        let st = m.state(x, xs, &mut w).unwrap();
        let mut gx = vec![0.0; m.n_params()];
        let mut gs = vec![0.0; n];
        m.gradient(&st, x, xs, &mut gx, &mut gs, &mut w).unwrap();
        for dir in 0..4 {
            let u = gauss(m.n_params(), 10 + dir, 1.0);
            let us = gauss(n, 20 + dir, 1.0);
            let mut w2 = m.workspace();
            let e = |h: f64| {
                let (xp, sp) = (axpy(x, h, &u), axpy(xs, h, &us));
                let s = m.state(&xp, &sp, &mut w2).unwrap();
                m.energy(&s, &xp, &sp)
            };
            let an = dot(&gx, &u) + dot(&gs, &us);
            let mut e = e;
            // the finite-difference error is V-shaped in h (truncation vs rounding): take
            // its minimum; a wrong derivative has no h at which it agrees
            let rel = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4]
                .iter()
                .map(|&h| (richardson(&mut e, h) - an).abs() / an.abs().max(1e-300))
                .fold(f64::INFINITY, f64::min);
            let fd = an;
            assert!(
                rel < 1e-6,
                "point {pi} dir {dir}: fd {fd} analytic {an} rel {rel:e}"
            );
        }
    }
}

#[test]
fn jvp_matches_finite_differences_and_vjp() {
    let (m, x_true, _) = setup(400, true, "volume");
    let mut w = m.workspace();
    let n = m.data.len();
    for (pi, x) in [x_true.clone(), gauss(m.n_params(), 5, 2.0)]
        .iter()
        .enumerate()
    {
        let xs = gauss(n, 6, 1.0);
        let st = m.state(x, &xs, &mut w).unwrap();
        let u = gauss(m.n_params(), 7, 1.0);
        let (mut da, mut dv) = (vec![0.0; n], vec![0.0; n]);
        m.jvp(&st, &u, &mut da, &mut dv, &mut w).unwrap();
        let mut w2 = m.workspace();
        // relative error of the tangent vectors (norm over stars)
        let h = 1e-3;
        let plus = m.state(&axpy(x, h, &u), &xs, &mut w2).unwrap();
        let minus = m.state(&axpy(x, -h, &u), &xs, &mut w2).unwrap();
        let plus2 = m.state(&axpy(x, h / 2.0, &u), &xs, &mut w2).unwrap();
        let minus2 = m.state(&axpy(x, -h / 2.0, &u), &xs, &mut w2).unwrap();
        let rich = |a: &[f64], b: &[f64], c: &[f64], d: &[f64], i: usize| {
            (4.0 * (c[i] - d[i]) / h - (a[i] - b[i]) / (2.0 * h)) / 3.0
        };
        let (mut ea, mut na, mut ev, mut nv) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..n {
            ea += (rich(&plus.abar, &minus.abar, &plus2.abar, &minus2.abar, i) - da[i]).powi(2);
            na += da[i] * da[i];
            ev += (rich(&plus.var, &minus.var, &plus2.var, &minus2.var, i) - dv[i]).powi(2);
            nv += dv[i] * dv[i];
        }
        let (ra, rv) = ((ea / na).sqrt(), (ev / nv).sqrt());
        assert!(
            ra < 1e-6 && rv < 1e-6,
            "point {pi}: relative JVP error ā {ra:e}, v {rv:e}"
        );
        // dot-product test ⟨J u, c⟩ = ⟨u, Jᵀ c⟩
        let (ca, cv) = (gauss(n, 8, 1.0), gauss(n, 9, 1.0));
        let mut g = vec![0.0; m.n_params()];
        m.vjp(&st, &ca, &cv, &mut g, &mut w).unwrap();
        let (l, r) = (dot(&da, &ca) + dot(&dv, &cv), dot(&u, &g));
        assert!(
            (l - r).abs() <= 1e-10 * (l.abs() + r.abs()),
            "point {pi}: {l} vs {r}"
        );
    }
}

#[test]
fn metric_is_spd_and_equals_dense_jt_f_j() {
    let mut cfg_small = setup(150, true, "volume");
    // a tiny grid so the dense Jacobian fits: level 0 and one refinement only
    cfg_small.2.grid.levels = 1;
    let cfg = cfg_small.2.clone();
    let sim = simulate::run(&cfg, "").unwrap();
    let chart = cfg.chart().unwrap();
    let icr = Icr::new(&chart, cfg.kernel.build().unwrap().as_ref(), Precision::F64).unwrap();
    let m = crate::app::build::model(
        &cfg,
        std::sync::Arc::new(icr),
        &sim.catalog.into_pixel_layout(chart.nside_final()),
    )
    .unwrap();
    let np = m.n_params();
    let n = m.data.len();
    let mut w = m.workspace();
    let x = gauss(np, 31, 1.0);
    let xs = gauss(n, 32, 1.0);
    let st = m.state(&x, &xs, &mut w).unwrap();
    // dense J (2n × np) column by column
    let mut jac = vec![vec![0.0; 2 * n]; np];
    let mut e = vec![0.0; np];
    let (mut da, mut dv) = (vec![0.0; n], vec![0.0; n]);
    for k in 0..np {
        e[k] = 1.0;
        m.jvp(&st, &e, &mut da, &mut dv, &mut w).unwrap();
        jac[k][..n].copy_from_slice(&da);
        jac[k][n..].copy_from_slice(&dv);
        e[k] = 0.0;
    }
    let fisher: Vec<f64> = (0..2 * n)
        .map(|r| {
            if r < n {
                1.0 / st.var[r]
            } else {
                0.5 / (st.var[r - n] * st.var[r - n])
            }
        })
        .collect();
    let mut col = vec![0.0; np];
    for k in (0..np).step_by(5) {
        e[k] = 1.0;
        m.metric(&st, &e, &mut col, &mut w).unwrap();
        e[k] = 0.0;
        for l in 0..np {
            let dense: f64 = (0..2 * n)
                .map(|r| jac[l][r] * fisher[r] * jac[k][r])
                .sum::<f64>()
                + if l == k { 1.0 } else { 0.0 };
            assert!(
                (col[l] - dense).abs() <= 1e-10 * dense.abs().max(1.0),
                "M[{l},{k}] {} vs {dense}",
                col[l]
            );
        }
    }
    // symmetric and positive definite on random vectors
    for t in 0..5 {
        let (a, b) = (gauss(np, 40 + t, 1.0), gauss(np, 50 + t, 1.0));
        let (mut ma, mut mb) = (vec![0.0; np], vec![0.0; np]);
        m.metric(&st, &a, &mut ma, &mut w).unwrap();
        m.metric(&st, &b, &mut mb, &mut w).unwrap();
        let (l, r) = (dot(&ma, &b), dot(&a, &mb));
        assert!((l - r).abs() <= 1e-10 * (l.abs() + r.abs()));
        assert!(dot(&a, &ma) >= dot(&a, &a));
    }
}

#[test]
fn chi2_at_the_truth_is_one_within_sampling_error() {
    // distances uniform in parallax: the parallax likelihood is then the exact posterior of
    // 1/d, so (A − ā)² / v has expectation 1 per star
    let (m, x, _) = setup(20_000, false, "parallax");
    let mut w = m.workspace();
    let n = m.data.len();
    let st = m.state(&x, &vec![0.0; n], &mut w).unwrap();
    let chi2: f64 = (0..n)
        .map(|i| (m.data.a_obs[i] - st.abar[i]).powi(2) / st.var[i])
        .sum::<f64>()
        / n as f64;
    // sd of the mean of χ²₁ variables is sqrt(2/n); allow 4 sd
    let tol = 4.0 * (2.0 / n as f64).sqrt();
    assert!(
        (chi2 - 1.0).abs() < tol,
        "chi2/star {chi2}, tolerance {tol}"
    );
}

#[test]
fn distance_variance_vanishes_with_parallax_error() {
    let shells = crate::sphere::grid::Shells::log_uniform(50.0, 800.0, 40).unwrap();
    let rw: Vec<f64> = shells
        .widths_pc()
        .iter()
        .enumerate()
        .map(|(k, w)| w * 1e-3 * (1.2 + (k as f64).cos()))
        .collect();
    let mut cum = vec![0.0; 41];
    inner_columns(&rw, &mut cum);
    let mut last = f64::INFINITY;
    let mut first = 0.0;
    for err in [0.5, 0.1, 0.02, 0.004, 1e-4] {
        let wdw = Windows::new(&shells, &[3.7], &[err]);
        let (_, var) = star_moments(wdw.of(0), &rw, &cum);
        assert!(var <= last && var >= -1e-15, "err {err}: var {var}");
        if first == 0.0 {
            first = var;
        }
        last = var;
    }
    // σ_a² ∝ σ_ω² as σ_ω → 0: five thousand times smaller error, 2.5e7 times smaller variance
    assert!(last < 1e-7 * first, "{last} vs {first}");
}

#[test]
fn response_stage_derivatives() {
    // the per-star stage alone: FD of (ā, σ_a²) in rw = ρΔr and the JVP/VJP dot-product test
    let shells = crate::sphere::grid::Shells::log_uniform(50.0, 800.0, 30).unwrap();
    let wdw = Windows::new(
        &shells,
        &[4.0, 1.5, 12.0, 0.9, -0.2, 25.0],
        &[0.3, 0.2, 0.05, 0.5, 0.3, 0.1],
    );
    let rw: Vec<f64> = shells
        .widths_pc()
        .iter()
        .enumerate()
        .map(|(k, w)| w * 2e-3 * (1.1 + (0.7 * k as f64).sin()))
        .collect();
    let drw = gauss(30, 3, 1e-2);
    let mut cum = vec![0.0; 31];
    let mut dcum = vec![0.0; 31];
    inner_columns(&rw, &mut cum);
    inner_columns(&drw, &mut dcum);
    for i in 0..wdw.len() {
        let (a, _) = star_moments(wdw.of(i), &rw, &cum);
        let (da, dv) = star_jvp(wdw.of(i), &rw, &drw, &cum, &dcum, a);
        let f = |h: f64, which: usize| {
            let r = axpy(&rw, h, &drw);
            let mut c = vec![0.0; 31];
            inner_columns(&r, &mut c);
            let m = star_moments(wdw.of(i), &r, &c);
            if which == 0 {
                m.0
            } else {
                m.1
            }
        };
        assert!(
            (richardson(|h| f(h, 0), 1e-2) - da).abs() <= 1e-9 * da.abs().max(1e-12),
            "star {i} ā"
        );
        let fdv = richardson(|h| f(h, 1), 1e-2);
        // σ² = m − ā² cancels: the difference quotient carries rounding ~ε ā² / h
        assert!(
            (fdv - dv).abs() <= 1e-8 * dv.abs() + 1e-12 * a * a,
            "star {i} σ²: fd {fdv} vs {dv}"
        );
        let (ga, gv) = (0.7, -1.3);
        let (mut rb, mut cb) = (vec![0.0; 30], vec![0.0; 31]);
        star_vjp(wdw.of(i), &rw, &cum, a, ga, gv, &mut rb, &mut cb);
        finish_vjp(&cb, &mut rb);
        let (l, r) = (ga * da + gv * dv, dot(&rb, &drw));
        assert!(
            (l - r).abs() <= 1e-12 * (l.abs() + r.abs()),
            "star {i}: {l} vs {r}"
        );
    }
}

#[test]
fn fused_value_grad_equals_separate_passes() {
    let (m, x_true, _) = setup(400, true, "volume");
    let mut w = m.workspace();
    let n = m.data.len();
    let x = axpy(&x_true, 0.3, &gauss(m.n_params(), 61, 1.0));
    let xs = gauss(n, 62, 1.0);
    let st = m.state(&x, &xs, &mut w).unwrap();
    let e = m.energy(&st, &x, &xs);
    let (mut gx, mut gs) = (vec![0.0; m.n_params()], vec![0.0; n]);
    m.gradient(&st, &x, &xs, &mut gx, &mut gs, &mut w).unwrap();
    let mut st2 = m
        .state(&vec![0.0; m.n_params()], &vec![0.0; n], &mut w)
        .unwrap();
    let (mut gx2, mut gs2) = (vec![0.0; m.n_params()], vec![0.0; n]);
    let e2 = m
        .value_grad(&x, &xs, &mut st2, &mut gx2, &mut gs2, &mut w)
        .unwrap();
    assert!((e - e2).abs() <= 1e-12 * e.abs());
    let rel = |a: &[f64], b: &[f64]| {
        let num: f64 = a.iter().zip(b).map(|(p, q)| (p - q).powi(2)).sum();
        (num / b.iter().map(|q| q * q).sum::<f64>()).sqrt()
    };
    assert!(rel(&gx2, &gx) < 1e-12 && rel(&gs2, &gs) < 1e-12);
    assert_eq!(st2.abar, st.abar);
}

/// Relative error of the directional derivative `an` of the energy at (x, ξ_σ) along
/// (u, u_σ) against Richardson-extrapolated central differences (best of four steps).
fn fd_error(m: &Model, x: &[f64], xs: &[f64], u: &[f64], us: &[f64], an: f64) -> f64 {
    let mut w = m.workspace();
    let mut e = |h: f64| {
        let (xp, sp) = (axpy(x, h, u), axpy(xs, h, us));
        let s = m.state(&xp, &sp, &mut w).unwrap();
        m.energy(&s, &xp, &sp)
    };
    [1e-2, 3e-3, 1e-3, 3e-4]
        .iter()
        .map(|&h| (richardson(&mut e, h) - an).abs() / an.abs().max(1e-300))
        .fold(f64::INFINITY, f64::min)
}

/// vᵀ M v at `st` and the tangents (δā, δσ_a²) of `v`.
fn metric_form(m: &Model, st: &State, v: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
    let (np, n) = (m.n_params(), m.data.len());
    let mut w = m.workspace();
    let mut mv = vec![0.0; np];
    m.metric(st, v, &mut mv, &mut w).unwrap();
    let (mut da, mut dv) = (vec![0.0; n], vec![0.0; n]);
    m.jvp(st, v, &mut da, &mut dv, &mut w).unwrap();
    (dot(v, &mv), da, dv)
}

#[test]
fn marginal_nsigma_gradient_and_metric_are_exact() {
    // the n_σ-marginal likelihood: value + gradient against finite differences of the
    // energy, and the metric against the dense Jᵀ F J with F its Fisher weights
    let (m, x_true) = setup_marginal(300);
    let mut w = m.workspace();
    let (np, n) = (m.n_params(), m.data.len());
    let xs = vec![0.0; n];
    for (pi, x) in [x_true.clone(), axpy(&x_true, 0.3, &gauss(np, 5, 1.0))]
        .iter()
        .enumerate()
    {
        let mut st = m.state(x, &xs, &mut w).unwrap();
        let (mut gx, mut gs) = (vec![0.0; np], vec![0.0; n]);
        let e0 = m
            .value_grad(x, &xs, &mut st, &mut gx, &mut gs, &mut w)
            .unwrap();
        assert!(
            (e0 - m.energy(&st, x, &xs)).abs() <= 1e-9 * e0.abs(),
            "fused energy"
        );
        assert!(gs.iter().all(|g| *g == 0.0), "no per-star parameter");
        for dir in 0..3 {
            let u = gauss(np, 60 + dir, 1.0);
            let rel = fd_error(&m, x, &xs, &u, &vec![0.0; n], dot(&gx, &u));
            assert!(rel < 1e-6, "point {pi} dir {dir}: rel {rel:e}");
        }
        let v = gauss(np, 70 + pi as u64, 1.0);
        let (l, da, dv) = metric_form(&m, &st, &v);
        let quad: f64 = (0..n)
            .map(|i| {
                let (fa, fv) = m
                    .marginal
                    .as_ref()
                    .unwrap()
                    .fisher(st.var[i], m.data.a_err[i] * m.data.a_err[i]);
                fa * da[i] * da[i] + fv * dv[i] * dv[i]
            })
            .sum();
        let r = dot(&v, &v) + quad;
        assert!(
            (l - r).abs() <= 1e-10 * r,
            "vᵀMv {l} vs |v|² + Σ F (Jv)² {r}"
        );
    }
}

#[test]
fn without_distance_variance_gradient_and_metric_are_exact() {
    // v = (n_σ σ_A)² alone: the variance holds no σ_a², value + gradient (over x and ξ_σ)
    // match finite differences of the energy, and the metric equals |v|² + Σ (Jv)_ā² / v
    let (full, x_true, cfg) = setup(300, true, "volume");
    let sim = simulate::run(&cfg, "").unwrap();
    let pc = sim
        .catalog
        .into_pixel_layout(cfg.chart().unwrap().nside_final());
    let params = ModelParams {
        distance_variance: false,
        ..cfg.model_params()
    };
    let m = Model::new(&params, full.icr.clone(), &pc).unwrap();
    let mut w = m.workspace();
    let (np, n) = (m.n_params(), m.data.len());
    let xs = gauss(n, 3, 0.5);
    for (pi, x) in [x_true.clone(), axpy(&x_true, 0.3, &gauss(np, 5, 1.0))]
        .iter()
        .enumerate()
    {
        let mut st = m.state(x, &xs, &mut w).unwrap();
        for i in 0..n {
            let ns = st.nsig[i] * m.data.a_err[i];
            assert_eq!(st.var[i], ns * ns, "star {i}: no distance variance");
        }
        let (mut gx, mut gs) = (vec![0.0; np], vec![0.0; n]);
        let e0 = m
            .value_grad(x, &xs, &mut st, &mut gx, &mut gs, &mut w)
            .unwrap();
        assert!((e0 - m.energy(&st, x, &xs)).abs() <= 1e-9 * e0.abs());
        for dir in 0..3 {
            let (u, us) = (gauss(np, 60 + dir, 1.0), gauss(n, 90 + dir, 1.0));
            let rel = fd_error(&m, x, &xs, &u, &us, dot(&gx, &u) + dot(&gs, &us));
            assert!(rel < 1e-6, "point {pi} dir {dir}: rel {rel:e}");
        }
        let v = gauss(np, 70 + pi as u64, 1.0);
        let (l, da, dv) = metric_form(&m, &st, &v);
        assert!(dv.iter().all(|t| *t == 0.0), "no σ_a² tangent");
        let quad: f64 = (0..n).map(|i| da[i] * da[i] / st.var[i]).sum();
        let r = dot(&v, &v) + quad;
        assert!((l - r).abs() <= 1e-10 * r, "vᵀMv {l} vs {r}");
    }
}

/// Six sample points x ± δ_k (three antithetic pairs) as the KL writes them, and the
/// residuals: each point [x | ξ_σ], ξ_σ shared by all when `share`.
fn sample_points(m: &Model, x: &[f64], share: bool) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let (n, np) = (m.data.len(), m.n_params());
    let residuals: Vec<Vec<f64>> = (0..3).map(|k| gauss(np, 30 + k, 0.3)).collect();
    let points = (0..6)
        .map(|j| {
            let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
            let mut p: Vec<f64> = x
                .iter()
                .zip(&residuals[j / 2])
                .map(|(a, d)| a + sign * d)
                .collect();
            p.extend(gauss(n, if share { 40 } else { 40 + j as u64 }, 1.0));
            p
        })
        .collect();
    (points, residuals)
}

/// The KL's sample states from their fields (the ICR forward of the point plus each
/// residual's), four at a time in one walk of the stars (the CPU backend), give the bits of
/// one at a time: states, the sums of energies and latent cotangents, the summed field
/// cotangent and ξ_σ gradient; six states (a walk of four and two alone), with n_σ shared
/// from the first state and not.
#[test]
fn states_walked_together_equal_one_at_a_time() {
    let (m, x_true, _) = setup(400, true, "volume");
    assert!(m.takes_fields() && m.backend.walks_states_together(&m.core));
    let (n, nxi, nf) = (m.data.len(), m.icr.n_xi(), m.icr.n_field());
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for share in [false, true] {
        let (points, residuals) = sample_points(&m, &x_true, share);
        let tails: Vec<&[f64]> = points.iter().map(|p| &p[nxi..]).collect();
        let mut tail = |j: usize, b: &mut Vec<f64>| {
            b.clear();
            b.extend_from_slice(tails[j]);
        };
        let mut w = m.workspace();
        let fields = m.sample_fields(&residuals, &[], &mut w);
        let mut together: Vec<State> = (0..6).map(|_| m.empty_state()).collect();
        let (mut tbuf, mut gs) = (Vec::new(), vec![0.0; n]);
        let (mut bar, mut g_sig) = (vec![0.0; nf], vec![0.0; n]);
        let sums = m
            .with_point_field(&x_true, &mut w, |at, w| {
                let walk = (&mut together[..], share, (&fields, at));
                m.walk_samples(
                    walk,
                    &mut tail,
                    (&mut tbuf, &mut gs),
                    (&mut bar, &mut g_sig),
                    w,
                )
            })
            .unwrap();
        let mut at = vec![0.0; nf];
        m.with_point_field(&x_true, &mut w, |pt, _| at.copy_from_slice(pt));
        let mut one: Vec<State> = (0..6).map(|_| m.empty_state()).collect();
        let (mut w1, mut bar1, mut g_sig1) = (m.workspace(), vec![0.0; nf], vec![0.0; n]);
        let mut sums1 = (0.0, [0.0; 2]);
        for (j, t) in tails.iter().enumerate() {
            let (done, rest) = one.split_at_mut(j);
            let (same, st) = (done.first().filter(|_| share), &mut rest[0]);
            let field = fields.of(&at, j);
            m.update_state_field(t, same, field, st, &mut w1).unwrap();
            let xs = &t[2..];
            let [lik, g_scl, g_off] = (m.backend)
                .value_grad_field(&m.core, field, xs, st, &mut gs, &mut bar1, &mut w1)
                .unwrap();
            let [a, b] = m.chain().cotangent(st.dscl, [g_scl, g_off]);
            sums1.0 += lik + m.sig_prior_energy(xs);
            sums1.1 = [sums1.1[0] + a, sums1.1[1] + b];
            g_sig1.iter_mut().zip(&gs).for_each(|(o, v)| *o += v);
            let (a, b) = (&together[j], &one[j]);
            for (u, v, what) in [
                (&a.s, &b.s, "s"),
                (&a.rw, &b.rw, "rw"),
                (&a.abar, &b.abar, "abar"),
                (&a.var, &b.var, "var"),
                (&a.nsig, &b.nsig, "nsig"),
            ] {
                assert_eq!(bits(u), bits(v), "state {j}: {what}");
            }
            assert_eq!([a.scl, a.off, a.dscl], [b.scl, b.off, b.dscl]);
        }
        assert_eq!(sums.0.to_bits(), sums1.0.to_bits(), "energy, share {share}");
        assert_eq!(
            bits(&sums.1),
            bits(&sums1.1),
            "latent cotangents, share {share}"
        );
        assert_eq!(bits(&bar), bits(&bar1), "field cotangent, share {share}");
        assert_eq!(bits(&g_sig), bits(&g_sig1), "ξ_σ gradient, share {share}");
    }
}

/// The samples' mean energy and gradient from their fields (one ICR forward of the point
/// and one per residual, one adjoint of the summed cotangents, the prior's mean in closed
/// form) are those of each sample point evaluated on its own, to the rounding of the ICR's
/// sums: the fields (|s| ≤ 6 here) to 1e-13, a few units of their last place; the energy
/// to 1e-10 relative and the gradient to 1e-10 of its norm, as the stars' σ_a² = m − κ ā²
/// cancels (by up to 10³ at these points, where the fields' ~4e-15 gave up to 3e-12 in a
/// sample's energy).
#[test]
fn sample_fields_give_the_samples_values_and_gradients() {
    let (m, x_true, _) = setup(400, true, "volume");
    let (n, np, nxi) = (m.data.len(), m.n_params(), m.icr.n_xi());
    let (points, residuals) = sample_points(&m, &x_true, true);
    let p: Vec<f64> = x_true.iter().chain(&points[0][np..]).copied().collect();
    let mut w = m.workspace();
    let fields = m.sample_fields(&residuals, &[], &mut w);
    let mut states: Vec<State> = (0..6).map(|_| m.empty_state()).collect();
    let mut tail = |j: usize, b: &mut Vec<f64>| {
        b.clear();
        b.extend_from_slice(&points[j][nxi..]);
    };
    let (mut tbuf, mut gs, mut g) = (Vec::new(), vec![0.0; n], vec![0.0; np + n]);
    let bufs = (&mut tbuf, &mut gs[..]);
    let value = m
        .samples_value_grad(
            (&mut states, true),
            (&fields, &p),
            &mut tail,
            bufs,
            &mut g,
            &mut w,
        )
        .unwrap();
    let (mut v_ref, mut g_ref, mut gx) = (0.0, vec![0.0; np + n], vec![0.0; np]);
    let mut first: Option<State> = None;
    for (j, pt) in points.iter().enumerate() {
        let (x, xs) = pt.split_at(np);
        let mut st = m.empty_state();
        let sharing = (&mut st, first.as_ref());
        v_ref += m
            .value_grad_sharing(x, xs, sharing, &mut gx, &mut gs, &mut w)
            .unwrap()
            / 6.0;
        let ds = states[j].s.iter().zip(&st.s).map(|(a, b)| (a - b).abs());
        assert!(ds.fold(0.0, f64::max) <= 1e-13, "state {j}: ln ρ");
        let gj = gx.iter().chain(&gs);
        g_ref.iter_mut().zip(gj).for_each(|(a, b)| *a += b / 6.0);
        first.get_or_insert(st);
    }
    assert!(
        (value - v_ref).abs() <= 1e-10 * v_ref.abs(),
        "{value} against {v_ref}"
    );
    let err: f64 = g.iter().zip(&g_ref).map(|(a, b)| (a - b).powi(2)).sum();
    assert!(
        err.sqrt() <= 1e-10 * dot(&g_ref, &g_ref).sqrt(),
        "gradient: {}",
        err.sqrt()
    );
    // sizes that do not fit are errors, not panics or a mean over no sample
    let bufs = (&mut tbuf, &mut gs[..]);
    let sts = (&mut states[..], true);
    let short = m.samples_value_grad(sts, (&fields, &p), &mut tail, bufs, &mut g[1..], &mut w);
    assert!(format!("{:#}", short.unwrap_err()).contains("a gradient of"));
    let bufs = (&mut tbuf, &mut gs[..]);
    let none = m.samples_value_grad(
        (&mut [], true),
        (&fields, &p),
        &mut tail,
        bufs,
        &mut g,
        &mut w,
    );
    assert!(format!("{:#}", none.unwrap_err()).contains("0 sample states"));
}

#[test]
fn states_sharing_n_sigma_give_the_averaged_metric_of_states_that_do_not() {
    // the KL's states copy n_σ from the first (`State::sig_id` equal), and the four-state
    // walk then reads it once per star: the product must keep the bits of the walk that
    // reads each state's copy
    let (m, x_true, _) = setup(400, true, "volume");
    let (n, np) = (m.data.len(), m.n_params());
    let xsig = gauss(n, 50, 1.0);
    let mut w = m.workspace();
    let mut shared: Vec<State> = Vec::new();
    for j in 0..4 {
        let x = axpy(&x_true, 0.3, &gauss(np, 60 + j, 1.0));
        let mut st = m.empty_state();
        m.update_state_sharing(&x, &xsig, shared.first(), &mut st, &mut w)
            .unwrap();
        shared.push(st);
    }
    assert!(shared.iter().all(|s| s.sig_id == shared[0].sig_id));
    let mut apart = shared.clone();
    for (j, st) in apart.iter_mut().enumerate() {
        st.sig_id = 1000 + j as u64;
    }
    let v = gauss(np + n, 70, 1.0);
    let mask = Mask::holding([4]);
    let product = |states: &[State]| {
        let mut out = vec![0.0; np + n];
        m.averaged_metric(states, &mask, &v, &mut out, &mut m.workspace())
            .unwrap();
        out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(product(&shared), product(&apart));
    // and n_σ does enter the product: it differs with another ξ_σ for the last state
    let mut other = shared.clone();
    let x3 = axpy(&x_true, 0.3, &gauss(np, 63, 1.0));
    m.update_state(&x3, &gauss(n, 51, 1.0), &mut other[3], &mut w)
        .unwrap();
    assert_ne!(product(&shared), product(&other));
}

#[test]
fn handed_back_states_and_workspaces_are_given_out_again_as_new() {
    let (m, x_true, _) = setup(300, true, "volume");
    let n = m.data.len();
    let xs = gauss(n, 71, 1.0);
    let (mut w, fresh) = (m.workspace(), m.empty_state());
    let st = m.state(&x_true, &xs, &mut w).unwrap();
    let (e, mut g) = (m.energy(&st, &x_true, &xs), vec![0.0; m.n_params()]);
    m.gradient(&st, &x_true, &xs, &mut g, &mut vec![0.0; n], &mut w)
        .unwrap();
    let (s_at, w_at) = (st.s.as_ptr(), w.field.as_ptr());
    m.recycle(vec![st], vec![w]);
    // the same buffers, reset to a new state's values
    let again = m.empty_state();
    assert_eq!(again.s.as_ptr(), s_at);
    for (a, b) in [
        (&again.s, &fresh.s),
        (&again.rw, &fresh.rw),
        (&again.abar, &fresh.abar),
        (&again.var, &fresh.var),
        (&again.nsig, &fresh.nsig),
        (&again.dnsig, &fresh.dnsig),
    ] {
        assert_eq!(a, b);
    }
    assert!(again.id != fresh.id && again.fields_on_host);
    let mut w2 = m.workspace();
    assert_eq!(w2.field.as_ptr(), w_at);
    // and they compute what new ones do, bit for bit
    let st2 = m.state(&x_true, &xs, &mut w2).unwrap();
    let mut g2 = vec![0.0; m.n_params()];
    m.gradient(&st2, &x_true, &xs, &mut g2, &mut vec![0.0; n], &mut w2)
        .unwrap();
    assert_eq!(m.energy(&st2, &x_true, &xs).to_bits(), e.to_bits());
    assert_eq!(g2, g);
}
