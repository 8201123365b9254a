use super::*;
use crate::inference::newton::MetricObjective;
use crate::num::cg::CgSettings;
use anyhow::Result;
use faer::linalg::solvers::Solve;
use rand::Rng;
use rand_distr::StandardNormal;

/// The demo-like tiny model (nside 8 × 2 levels) over `n_stars` simulated stars, serial.
pub(super) fn tiny_model(n_stars: usize) -> crate::likelihood::model::Model {
    tiny_model_with(n_stars, |_| {})
}

/// [`tiny_model`] with its configuration changed by `tweak` first.
fn tiny_model_with(
    n_stars: usize,
    tweak: impl FnOnce(&mut crate::app::config::Config),
) -> crate::likelihood::model::Model {
    use crate::app::config::{Config, Precision};
    let mut cfg = Config::tiny(8, 2);
    cfg.simulate.n_stars = n_stars;
    tweak(&mut cfg);
    let sim = crate::app::simulate::run(&cfg, "").unwrap();
    let chart = cfg.chart().unwrap();
    let kernel = cfg.kernel.build().unwrap();
    let icr = crate::prior::icr::Icr::new(&chart, kernel.as_ref(), Precision::F64).unwrap();
    let stars = sim.catalog.into_pixel_layout(chart.nside_final());
    crate::app::build::model(&cfg, std::sync::Arc::new(icr), &stars).unwrap()
}

/// `g(n, s)`: n normals of standard deviation s from random stream (`seed`, `seed`).
pub(super) fn normals(seed: u64) -> impl FnMut(usize, f64) -> Vec<f64> {
    let mut rng = crate::base::rng::stream(seed, seed);
    move |n, s| {
        (0..n)
            .map(|_| s * rng.sample::<f64, _>(StandardNormal))
            .collect()
    }
}

/// Linear-Gaussian toy: d = R x + n, x ~ N(0, I), n ~ N(0, diag(noise)). Exact posterior:
/// covariance M⁻¹ with M = I + Rᵀ N⁻¹ R, mean M⁻¹ Rᵀ N⁻¹ d.
struct Linear {
    r: Vec<Vec<f64>>, // m × n
    noise: Vec<f64>,
    d: Vec<f64>,
}

impl Linear {
    fn new(m: usize, n: usize) -> Self {
        let mut rng = crate::base::rng::stream(9, 9);
        let r: Vec<Vec<f64>> = (0..m)
            .map(|_| {
                (0..n)
                    .map(|_| rng.sample::<f64, _>(StandardNormal) * 0.7)
                    .collect()
            })
            .collect();
        let noise: Vec<f64> = (0..m).map(|i| 0.5 + (i % 3) as f64).collect();
        let truth: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
        let d = (0..m)
            .map(|i| {
                (0..n).map(|j| r[i][j] * truth[j]).sum::<f64>()
                    + noise[i].sqrt() * rng.sample::<f64, _>(StandardNormal)
            })
            .collect();
        Self { r, noise, d }
    }
    fn resp(&self, x: &[f64]) -> Vec<f64> {
        self.r
            .iter()
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }
    fn resp_t(&self, y: &[f64], out: &mut [f64]) {
        out.iter_mut().for_each(|o| *o = 0.0);
        for (i, row) in self.r.iter().enumerate() {
            for (o, a) in out.iter_mut().zip(row) {
                *o += a * y[i];
            }
        }
    }
    fn dense_metric(&self) -> faer::Mat<f64> {
        let n = self.r[0].len();
        faer::Mat::from_fn(n, n, |a, b| {
            let s: f64 = (0..self.r.len())
                .map(|i| self.r[i][a] * self.r[i][b] / self.noise[i])
                .sum();
            s + if a == b { 1.0 } else { 0.0 }
        })
    }
}

impl Fisher for Linear {
    fn dim(&self) -> usize {
        self.r[0].len()
    }
    fn n_data(&self) -> usize {
        self.r.len()
    }
    fn sqrt_fisher_t(&self, eta_a: &[f64], _eta_v: &[f64], out: &mut [f64]) -> Result<()> {
        let y: Vec<f64> = eta_a
            .iter()
            .zip(&self.noise)
            .map(|(e, v)| e / v.sqrt())
            .collect();
        self.resp_t(&y, out);
        Ok(())
    }
    fn metric(&self, v: &[f64], out: &mut [f64]) -> Result<()> {
        let y: Vec<f64> = self
            .resp(v)
            .iter()
            .zip(&self.noise)
            .map(|(a, nv)| a / nv)
            .collect();
        self.resp_t(&y, out);
        for (o, x) in out.iter_mut().zip(v) {
            *o += x;
        }
        Ok(())
    }
}

/// KL of the toy: average over x̄ ± δ_k of the negative log posterior.
struct LinearKl<'a> {
    lin: &'a Linear,
    residuals: &'a [Vec<f64>],
}

impl MetricObjective for LinearKl<'_> {
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> Result<f64> {
        let n = p.len();
        g.iter_mut().for_each(|v| *v = 0.0);
        let mut val = 0.0;
        let k = 2.0 * self.residuals.len() as f64;
        let mut tmp = vec![0.0; n];
        for d in self.residuals {
            for sign in [1.0, -1.0] {
                let x: Vec<f64> = p.iter().zip(d).map(|(a, b)| a + sign * b).collect();
                let res: Vec<f64> = self
                    .lin
                    .resp(&x)
                    .iter()
                    .zip(&self.lin.d)
                    .map(|(a, b)| a - b)
                    .collect();
                val += (0.5 * x.iter().map(|v| v * v).sum::<f64>()
                    + 0.5
                        * res
                            .iter()
                            .zip(&self.lin.noise)
                            .map(|(r, v)| r * r / v)
                            .sum::<f64>())
                    / k;
                let y: Vec<f64> = res
                    .iter()
                    .zip(&self.lin.noise)
                    .map(|(r, v)| r / v)
                    .collect();
                self.lin.resp_t(&y, &mut tmp);
                for i in 0..n {
                    g[i] += (tmp[i] + x[i]) / k;
                }
            }
        }
        Ok(val)
    }
    fn metric(&self, _p: &[f64], v: &[f64], out: &mut [f64]) -> Result<()> {
        Fisher::metric(self.lin, v, out)
    }
}

#[test]
fn linear_gaussian_samples_match_exact_posterior() {
    let lin = Linear::new(40, 10);
    let n = 10;
    let m = lin.dense_metric();
    let cov = m
        .llt(faer::Side::Lower)
        .unwrap()
        .solve(faer::Mat::<f64>::identity(n, n));
    let mut rhs = vec![0.0; n];
    let nd: Vec<f64> = lin.d.iter().zip(&lin.noise).map(|(a, b)| a / b).collect();
    lin.resp_t(&nd, &mut rhs);
    let mean: Vec<f64> = (0..n)
        .map(|a| (0..n).map(|b| cov[(a, b)] * rhs[b]).sum())
        .collect();

    let pairs = 2000;
    let settings = CgSettings {
        rel_tol: 1e-12,
        max_iter: 100,
        ..Default::default()
    };
    let mut rng = crate::base::rng::stream(4, 4);
    let residuals: Vec<Vec<f64>> = (0..pairs)
        .map(|_| draw_residual(&lin, &mut rng, &settings).unwrap().0)
        .collect();
    // the KL minimum over x̄ with these residuals is the exact posterior mean
    let kl = LinearKl {
        lin: &lin,
        residuals: &residuals[..4],
    };
    let (xbar, _) = newton::minimize(
        &kl,
        vec![0.0; n],
        10,
        NewtonSettings {
            forcing: 1e-10,
            cg_max_iter: 50,
            rel_tol: 0.0,
            max_step: 1e3,
            ..Default::default()
        },
    )
    .unwrap();
    for a in 0..n {
        assert!(
            (xbar[a] - mean[a]).abs() < 1e-8,
            "mean[{a}]: {} vs {}",
            xbar[a],
            mean[a]
        );
    }
    // samples x̄ ± δ: covariance equals M⁻¹ within sampling error (4000 samples)
    let ns = 2.0 * pairs as f64;
    for a in 0..n {
        for b in 0..=a {
            let emp = residuals.iter().map(|d| 2.0 * d[a] * d[b]).sum::<f64>() / ns;
            let se = ((cov[(a, a)] * cov[(b, b)] + cov[(a, b)].powi(2)) / pairs as f64).sqrt();
            assert!(
                (emp - cov[(a, b)]).abs() < 5.0 * se,
                "cov[{a},{b}] {emp} vs {} (se {se})",
                cov[(a, b)]
            );
        }
    }
}

#[test]
fn averaged_metric_matches_per_sample_products_and_is_symmetric() {
    // 2, 4 and 6 states: one at a time, one block of four side by side, and a block and two
    for pairs in 1..=3 {
        averaged_metric_check(pairs);
    }
}

fn averaged_metric_check(pairs: usize) {
    let model = tiny_model(300);
    let (np, ns) = (model.n_params(), model.data.len());
    let mut g = normals(1);
    let residuals: Vec<Vec<f64>> = (0..pairs).map(|_| g(np, 0.3)).collect();
    let n_states = 2.0 * pairs as f64;
    let mask = Mask::holding([5]);
    let p: Vec<f64> = g(np, 0.5).into_iter().chain(g(ns, 1.0)).collect();
    let kl = Kl::new(&model, &residuals, &[], &mask);
    let (v, u) = (g(np + ns, 1.0), g(np + ns, 1.0));
    let (mut mv, mut mu) = (vec![0.0; np + ns], vec![0.0; np + ns]);
    kl.metric(&p, &v, &mut mv).unwrap();
    kl.metric(&p, &u, &mut mu).unwrap();
    // reference: the four sample states, one full JᵀFJ product each
    let mut w = model.workspace();
    let (x, xsig) = p.split_at(np);
    let vxm: Vec<f64> = (0..np).map(|i| v[i] * mask.factor(i)).collect();
    let mut want = vec![0.0; np + ns];
    for d in &residuals {
        for sign in [1.0, -1.0] {
            let xs: Vec<f64> = x.iter().zip(d).map(|(a, b)| a + sign * b).collect();
            let st = model.state(&xs, xsig, &mut w).unwrap();
            let (mut da, mut dv) = (vec![0.0; ns], vec![0.0; ns]);
            model.jvp(&st, &vxm, &mut da, &mut dv, &mut w).unwrap();
            for i in 0..ns {
                let dvds = 2.0 * st.nsig[i] * model.data.a_err[i].powi(2) * st.dnsig[i];
                dv[i] += dvds * v[np + i];
                da[i] /= st.var[i];
                dv[i] /= 2.0 * st.var[i] * st.var[i];
                want[np + i] += dvds * dv[i] / n_states;
            }
            let mut ox = vec![0.0; np];
            model.vjp(&st, &da, &dv, &mut ox, &mut w).unwrap();
            for i in 0..np {
                want[i] += mask.factor(i) * ox[i] / n_states;
            }
        }
    }
    for i in 0..np + ns {
        want[i] += v[i];
    }
    let err: f64 = mv
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let nrm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(
        err < 1e-12 * nrm,
        "{pairs} pairs: relative error {}",
        err / nrm
    );
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (l, r) = (dot(&mv, &u), dot(&v, &mu));
    assert!(
        (l - r).abs() < 1e-10 * l.abs().max(r.abs()),
        "{pairs} pairs: {l} vs {r}"
    );
}

/// The KL's gradient (its samples' fields by the ICR's linearity, their ICR gradients
/// through one adjoint, a held entry kept at zero) against central differences of its value
/// along a direction that leaves the held entry alone, Richardson-extrapolated; MGVI's
/// antithetic pairs and geoVI's shifted ones.
#[test]
fn kl_gradient_matches_finite_differences() {
    let model = tiny_model(300);
    let (np, ns) = (model.n_params(), model.data.len());
    let mut g = normals(3);
    let residuals: Vec<Vec<f64>> = (0..2).map(|_| g(np, 0.3)).collect();
    let shifts: Vec<Vec<f64>> = (0..2).map(|_| g(np, 0.1)).collect();
    let mask = Mask::holding([7]);
    let p: Vec<f64> = g(np, 0.5).into_iter().chain(g(ns, 1.0)).collect();
    let mut u = g(np + ns, 1.0);
    u[7] = 0.0;
    for shifted in [false, true] {
        let kl = Kl::new(
            &model,
            &residuals,
            if shifted { &shifts } else { &[] },
            &mask,
        );
        let mut grad = vec![0.0; np + ns];
        kl.value_grad(&p, &mut grad).unwrap();
        assert_eq!(grad[7].to_bits(), 0.0f64.to_bits(), "held entry");
        let f = |h: f64| {
            let q: Vec<f64> = p.iter().zip(&u).map(|(a, b)| a + h * b).collect();
            let (mut gq, h2) = (vec![0.0; np + ns], 2.0 * h);
            let plus = kl.value_grad(&q, &mut gq).unwrap();
            let q: Vec<f64> = p.iter().zip(&u).map(|(a, b)| a - h * b).collect();
            (plus - kl.value_grad(&q, &mut gq).unwrap()) / h2
        };
        let h = 1e-4;
        let fd = (4.0 * f(h / 2.0) - f(h)) / 3.0;
        let an: f64 = grad.iter().zip(&u).map(|(a, b)| a * b).sum();
        assert!(
            (fd - an).abs() <= 1e-6 * an.abs(),
            "shifted {shifted}: {an} against {fd}"
        );
    }
}

#[test]
fn sampling_over_nsigma_draws_from_its_metric() {
    // M = I + S Sᵀ on p = [x | ξ_σ] with S the map of `sqrt_fisher_t`: build S column by
    // column and compare M v with the metric product (held x entries: identity)
    let model = tiny_model(120);
    let (np, ns) = (model.n_params(), model.data.len());
    let mut g = normals(2);
    let (x, xsig) = (g(np, 0.5), g(ns, 0.7));
    let st = model.state(&x, &xsig, &mut model.workspace()).unwrap();
    let mask = Mask::holding([2]);
    let lin = ModelAt::with_nsigma(&model, &st, &mask);
    assert_eq!(lin.dim(), np + ns);
    let v = g(np + ns, 1.0);
    let mut mv = vec![0.0; np + ns];
    lin.metric(&v, &mut mv).unwrap();
    let mut want: Vec<f64> = v.clone();
    let mut col = vec![0.0; np + ns];
    let mut vm = v.clone();
    vm[2] = 0.0;
    for j in 0..2 * ns {
        let (mut ea, mut ev) = (vec![0.0; ns], vec![0.0; ns]);
        if j < ns {
            ea[j] = 1.0;
        } else {
            ev[j - ns] = 1.0;
        }
        lin.sqrt_fisher_t(&ea, &ev, &mut col).unwrap();
        let c: f64 = col.iter().zip(&vm).map(|(a, b)| a * b).sum();
        want.iter_mut().zip(&col).for_each(|(w, a)| *w += a * c);
    }
    let err: f64 = mv
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let nrm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(err < 1e-10 * nrm, "relative error {}", err / nrm);
    // a residual covers ξ_σ and solves M δ = y
    let settings = CgSettings {
        rel_tol: 1e-10,
        max_iter: 500,
        ..Default::default()
    };
    let (d, rep, y) = draw_residual_in(&lin, 3, 7, &settings).unwrap();
    assert_eq!(d.len(), np + ns);
    assert!(rep.rel_residual < 1e-9, "{rep:?}");
    let mut md = vec![0.0; np + ns];
    lin.metric(&d, &mut md).unwrap();
    let r: f64 = md
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(r < 1e-8 * y.iter().map(|b| b * b).sum::<f64>().sqrt());
}

#[test]
fn a_coarse_stage_state_round_trips_and_new_excitations_have_no_spread() {
    // 6 excitations of which 4 coarse, then the 2 globals and 3 sampled ξ_σ in the residuals
    let (nc, nf) = (4, 6);
    let full = MgviState {
        x: (0..8).map(|i| i as f64).collect(),
        xsig: vec![0.5; 3],
        residuals: vec![(0..11).map(|i| 10.0 + i as f64).collect()],
        shifts: vec![],
    };
    let c = full.restricted(nc, nf);
    assert_eq!(c.x, [0.0, 1.0, 2.0, 3.0, 6.0, 7.0]);
    assert_eq!(
        c.residuals[0],
        [10.0, 11.0, 12.0, 13.0, 16.0, 17.0, 18.0, 19.0, 20.0]
    );
    let mut moved = c.clone();
    moved.x.iter_mut().for_each(|v| *v += 100.0);
    moved.residuals[0].iter_mut().for_each(|v| *v = -*v);
    moved.xsig = vec![0.25; 3];
    let mut back = full.clone();
    back.absorb(moved, nc, nf);
    // coarse entries and everything after the excitations replaced, fine ones kept
    assert_eq!(back.x, [100.0, 101.0, 102.0, 103.0, 4.0, 5.0, 106.0, 107.0]);
    let r = &back.residuals[0];
    assert_eq!(r[..4], [-10.0, -11.0, -12.0, -13.0]);
    assert_eq!(r[4..6], [0.0, 0.0]);
    assert_eq!(r[6..], [-16.0, -17.0, -18.0, -19.0, -20.0]);
    assert_eq!(back.xsig, [0.25; 3]);
    // restricting what was absorbed gives the coarse state back
    assert_eq!(
        back.restricted(nc, nf).x,
        c.x.iter().map(|v| v + 100.0).collect::<Vec<_>>()
    );
}

#[test]
fn log_density_moments_from_the_kl_states_are_the_recomputed_ones() {
    let model = tiny_model(200);
    let (np, ns) = (model.n_params(), model.data.len());
    let mut g = normals(9);
    let residuals: Vec<Vec<f64>> = (0..2).map(|_| g(np, 0.3)).collect();
    let shifts: Vec<Vec<f64>> = (0..2).map(|_| g(np, 0.1)).collect();
    let mask = Mask::all_free();
    let p: Vec<f64> = g(np, 0.5).into_iter().chain(g(ns, 1.0)).collect();
    let kl = Kl::new(&model, &residuals, &shifts, &mask).recording_mean_at(&p);
    let mut grad = vec![0.0; np + ns];
    kl.value_grad(&p, &mut grad).unwrap();
    let from_states = kl
        .with_states_at(&p, |states| log_density_moments_of(&model, states))
        .expect("the states are p's");
    let recomputed = log_density_moments(&model, &p[..np], &residuals, &shifts);
    let recorded = kl.recorded_mean().expect("evaluated at the recorded point");
    let same = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits())
    };
    assert!(same(&from_states[0], &recomputed[0]) && same(&from_states[1], &recomputed[1]));
    assert!(same(&recorded, &recomputed[0]));
    assert!(kl.recorded_mean().is_none(), "handed over once");
    // at another point the states are not p's: no moments from them
    let q: Vec<f64> = p.iter().map(|v| v + 1e-3).collect();
    assert!(kl.with_states_at(&q, |_| ()).is_none());
}

#[test]
fn two_residuals_solved_together_are_those_drawn_alone() {
    // the lockstep solve's pair products walk the stars once for both vectors: each residual,
    // its CG report and its metric sample keep the bits of its own draw (a held entry, both
    // noise models, solves that stop at their tolerance and at the cap)
    for (marginal, rel_tol, max_iter) in [(false, 1e-6, 200), (true, 1e-12, 15)] {
        let model = tiny_model_with(300, |cfg| cfg.noise.marginalise_nsigma = marginal);
        let (np, ns) = (model.n_params(), model.data.len());
        let mut g = normals(5);
        let st = model
            .state(&g(np, 0.5), &g(ns, 0.7), &mut model.workspace())
            .unwrap();
        let mask = Mask::holding([3]);
        let lin = ModelAt::new(&model, &st, &mask);
        let settings = CgSettings {
            rel_tol,
            max_iter,
            ..Default::default()
        };
        let together = draw_residuals_in(&lin, 11, &[4, 9], &settings).unwrap();
        for ((d, rep, y), stream) in together.iter().zip([4, 9]) {
            let (d1, rep1, y1) = draw_residual_in(&lin, 11, stream, &settings).unwrap();
            assert_eq!(*rep, rep1, "stream {stream}");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(d), bits(&d1), "stream {stream}: residual");
            assert_eq!(bits(y), bits(&y1), "stream {stream}: metric sample");
        }
        assert!(together.iter().all(|(_, r, _)| r.iterations > 2));
    }
}

#[test]
fn an_iterations_timings_add_up() {
    // each part's products lie inside the part, the two parts inside the whole: the
    // stopwatches time disjoint sections, nested only as documented
    let model = tiny_model(300);
    let mut state = MgviState::start(model.n_params());
    state.xsig = vec![0.0; model.data.len()];
    let settings = IterationSettings {
        sample_pairs: 2,
        sample_cg_iterations: 10,
        newton_steps: 2,
        newton_cg_iterations: 5,
        ..Default::default()
    };
    let streams = Streams {
        seed: 3,
        stage: 0,
        iteration: 0,
    };
    let rep = global_iteration(&model, &settings, &free_mask(), &mut state, streams).unwrap();
    let t = rep.timings;
    assert!(
        t.sampling_products_s > 0.0 && t.newton_products_s > 0.0,
        "{t:?}"
    );
    assert!(t.kl_evaluations_s > 0.0, "{t:?}");
    assert!(t.sampling_products_s <= t.sampling_s, "{t:?}");
    assert!(
        t.newton_products_s + t.kl_evaluations_s <= t.newton_s,
        "{t:?}"
    );
    assert!(t.sampling_s + t.newton_s <= t.total_s, "{t:?}");
}
