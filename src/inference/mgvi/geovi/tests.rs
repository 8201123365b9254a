use super::*;
use crate::inference::mgvi::tests::{normals, tiny_model};
use crate::sphere::decomp::Serial;
use rand::Rng;
use rand_distr::StandardNormal;

/// d = f(x) + n with x ~ N(0, I) and n ~ N(0, σ²): T(x) = f(x)/σ for a toy f.
struct Toy {
    f: fn(&[f64]) -> Vec<f64>,
    jac: fn(&[f64]) -> Vec<Vec<f64>>,
    sigma: f64,
    xbar: Vec<f64>,
}

struct ToyPoint {
    t: Vec<f64>,
    jac: Vec<Vec<f64>>,
}

impl Coordinates for Toy {
    type Point = ToyPoint;
    fn dim(&self) -> usize {
        self.xbar.len()
    }
    fn n_data(&self) -> usize {
        (self.f)(&self.xbar).len()
    }
    fn space(&self) -> Arc<dyn Space> {
        Arc::new(Serial)
    }
    fn eval(&self, delta: &[f64]) -> Result<ToyPoint> {
        let x: Vec<f64> = self.xbar.iter().zip(delta).map(|(a, b)| a + b).collect();
        Ok(ToyPoint {
            t: (self.f)(&x).iter().map(|v| v / self.sigma).collect(),
            jac: (self.jac)(&x),
        })
    }
    fn t(&self, p: &ToyPoint, out: &mut [f64]) {
        out.copy_from_slice(&p.t);
    }
    fn jvp(&self, p: &ToyPoint, u: &[f64], out: &mut [f64]) -> Result<()> {
        for (o, row) in out.iter_mut().zip(&p.jac) {
            *o = row.iter().zip(u).map(|(a, b)| a * b).sum::<f64>() / self.sigma;
        }
        Ok(())
    }
    fn vjp(&self, p: &ToyPoint, w: &[f64], out: &mut [f64]) -> Result<()> {
        out.iter_mut().for_each(|o| *o = 0.0);
        for (wi, row) in w.iter().zip(&p.jac) {
            for (o, a) in out.iter_mut().zip(row) {
                *o += wi * a / self.sigma;
            }
        }
        Ok(())
    }
}

/// M̄ = I + J̄ᵀ J̄/σ² of the toy at x̄, dense.
fn metric_at(toy: &Toy) -> Vec<Vec<f64>> {
    let j = (toy.jac)(&toy.xbar);
    let n = toy.dim();
    (0..n)
        .map(|a| {
            (0..n)
                .map(|b| {
                    let jj: f64 = j.iter().map(|r| r[a] * r[b]).sum();
                    jj / (toy.sigma * toy.sigma) + if a == b { 1.0 } else { 0.0 }
                })
                .collect()
        })
        .collect()
}

fn solve2(m: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    // 2 × 2 (the toys are at most 2-D)
    if m.len() == 1 {
        return vec![y[0] / m[0][0]];
    }
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    vec![
        (m[1][1] * y[0] - m[0][1] * y[1]) / det,
        (m[0][0] * y[1] - m[1][0] * y[0]) / det,
    ]
}

#[test]
fn on_a_linear_model_geovi_is_mgvi() {
    let toy = Toy {
        f: |x| vec![2.0 * x[0] - x[1], 0.5 * x[0] + 3.0 * x[1], x[1]],
        jac: |_| vec![vec![2.0, -1.0], vec![0.5, 3.0], vec![0.0, 1.0]],
        sigma: 0.7,
        xbar: vec![0.3, -1.2],
    };
    let m = metric_at(&toy);
    let y = vec![1.3, -0.4];
    let lin = solve2(&m, &y);
    // from the exact linear residual nothing moves; from a bad start the solve reaches it
    for start in [lin.clone(), vec![0.0, 0.0]] {
        let (even, odd, reps) = refine_pair(&toy, &y, &start, &GeoSettings::default()).unwrap();
        for k in 0..2 {
            assert!(even[k].abs() < 1e-9, "shift {even:?}");
            assert!((odd[k] - lin[k]).abs() < 1e-9, "{odd:?} vs {lin:?}");
        }
        assert!(reps.iter().all(|r| r.misfit < 1e-9), "{:?}", reps[0].misfit);
    }
}

#[test]
fn the_coordinate_equation_has_exact_derivatives() {
    let toy = Toy {
        f: |x| vec![x[0].exp() + x[1], (x[0] * x[1]).sin()],
        jac: |x| {
            vec![
                vec![x[0].exp(), 1.0],
                vec![x[1] * (x[0] * x[1]).cos(), x[0] * (x[0] * x[1]).cos()],
            ]
        },
        sigma: 0.4,
        xbar: vec![0.2, -0.5],
    };
    let y = vec![0.8, 1.1];
    let eq = Equation::new(&toy, &y).unwrap();
    let d = vec![0.3, 0.25];
    let mut g = vec![0.0; 2];
    let v0 = eq.value_grad(&d, &mut g).unwrap();
    let u = vec![0.6, -0.8];
    let h = 1e-6;
    let at = |s: f64| {
        let p: Vec<f64> = d.iter().zip(&u).map(|(a, b)| a + s * b).collect();
        eq.value_grad(&p, &mut [0.0; 2]).unwrap()
    };
    let fd = (at(h) - at(-h)) / (2.0 * h);
    let an = g[0] * u[0] + g[1] * u[1];
    assert!(
        (fd - an).abs() < 1e-7 * an.abs().max(1.0),
        "{fd} vs {an} at {v0}"
    );
    // the metric is Gᵀ G: symmetric, and Gᵀ G u = Gᵀ (G u) with G by finite differences of g
    let (mut mu, mut mv) = (vec![0.0; 2], vec![0.0; 2]);
    let v = vec![-0.1, 0.9];
    eq.metric(&d, &u, &mut mu).unwrap();
    eq.metric(&d, &v, &mut mv).unwrap();
    let (l, r) = (mu[0] * v[0] + mu[1] * v[1], mv[0] * u[0] + mv[1] * u[1]);
    assert!((l - r).abs() < 1e-12 * l.abs().max(1.0), "{l} vs {r}");
    let gfun = |p: &[f64]| -> Vec<f64> {
        let pt = eq.c.eval(p).unwrap();
        let mut r = eq.residual(p, &pt).unwrap();
        r.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        r
    };
    let gu: Vec<f64> = {
        let (pp, pm): (Vec<f64>, Vec<f64>) = (
            d.iter().zip(&u).map(|(a, b)| a + h * b).collect(),
            d.iter().zip(&u).map(|(a, b)| a - h * b).collect(),
        );
        gfun(&pp)
            .iter()
            .zip(gfun(&pm))
            .map(|(a, b)| (a - b) / (2.0 * h))
            .collect()
    };
    let mut gu_an = vec![0.0; 2];
    eq.g_apply(&eq.c.eval(&d).unwrap(), &u, &mut gu_an).unwrap();
    for k in 0..2 {
        assert!((gu[k] - gu_an[k]).abs() < 1e-7, "{gu:?} vs {gu_an:?}");
    }
}

/// Posterior of x with prior N(0, 1) and d = eˣ + n, n ~ N(0, σ²): mean and variance by
/// quadrature.
fn exact_moments(d: f64, sigma: f64) -> (f64, f64) {
    let (lo, hi, n) = (-8.0, 4.0, 200_000);
    let h = (hi - lo) / n as f64;
    let (mut z, mut m1, mut m2) = (0.0, 0.0, 0.0);
    for i in 0..=n {
        let x = lo + i as f64 * h;
        let r = d - x.exp();
        let p = (-0.5 * x * x - 0.5 * r * r / (sigma * sigma)).exp();
        z += p;
        m1 += p * x;
        m2 += p * x * x;
    }
    let mean = m1 / z;
    (mean, m2 / z - mean * mean)
}

/// The variance of the VI posterior of the 1-D toy (prior N(0, 1), d = eˣ + n) as a fit
/// finds it: alternately draw 1,000 pairs at the expansion point e (geoVI-refined or
/// linear) and move e to the minimum of the sample-averaged energy, 12 times.
fn vi_variance(d: f64, sigma: f64, geo: bool) -> f64 {
    let energy = |x: f64| 0.5 * x * x + 0.5 * (d - x.exp()).powi(2) / (sigma * sigma);
    let mut e = 0.0;
    let mut samples = Vec::new();
    for it in 0..12 {
        let toy = Toy {
            f: |x| vec![x[0].exp()],
            jac: |x| vec![vec![x[0].exp()]],
            sigma,
            xbar: vec![e],
        };
        let m = metric_at(&toy)[0][0];
        let mut rng = crate::base::rng::stream(11, it);
        samples.clear();
        for _ in 0..1000 {
            let y = vec![m.sqrt() * rng.sample::<f64, _>(StandardNormal)];
            let lin = vec![y[0] / m];
            let (c, dd) = if geo {
                let (c, dd, _) = refine_pair(&toy, &y, &lin, &GeoSettings::default()).unwrap();
                (c[0], dd[0])
            } else {
                (0.0, lin[0])
            };
            samples.push(c + dd);
            samples.push(c - dd);
        }
        // golden-section search of the averaged energy over the shift of e
        let kl = |t: f64| samples.iter().map(|r| energy(t + r)).sum::<f64>();
        let (mut a, mut b) = (e - 2.0, e + 2.0);
        let phi = 0.5 * (5f64.sqrt() - 1.0);
        for _ in 0..80 {
            let (c1, c2) = (b - phi * (b - a), a + phi * (b - a));
            if kl(c1) < kl(c2) {
                b = c2;
            } else {
                a = c1;
            }
        }
        e = 0.5 * (a + b);
    }
    let ns = samples.len() as f64;
    let sm = samples.iter().sum::<f64>() / ns;
    samples.iter().map(|s| (s - sm).powi(2)).sum::<f64>() / (ns - 1.0)
}

#[test]
fn on_a_nonlinear_posterior_geovi_variance_is_closer_than_mgvi() {
    // a datum as uncertain as the signal: the posterior is skewed (a long tail to small x)
    let (d, sigma) = (1.0, 1.0);
    let (_, var) = exact_moments(d, sigma);
    let (var_geo, var_mgvi) = (vi_variance(d, sigma, true), vi_variance(d, sigma, false));
    // sampling error of a variance from 2,000 near-Gaussian samples: √(2/2000) of it
    let se = var * (2.0f64 / 2000.0).sqrt();
    let (err_geo, err_mgvi) = ((var_geo - var).abs(), (var_mgvi - var).abs());
    assert!(
        err_geo + 3.0 * se < err_mgvi,
        "true variance {var:.4}: geoVI {var_geo:.4}, MGVI {var_mgvi:.4} (± {se:.4})"
    );
}

#[test]
fn dust_coordinates_have_exact_and_adjoint_jacobians() {
    let model = tiny_model(300);
    let (np, ns) = (model.n_params(), model.data.len());
    let mut g = normals(5);
    let (xbar, xsig) = (g(np, 0.5), g(ns, 0.5));
    let mask = crate::likelihood::mask::Mask::holding([3]);
    let bar = model.state(&xbar, &xsig, &mut model.workspace()).unwrap();
    let c = DustCoordinates::new(&model, &bar, &xbar, &xsig, &mask, false);
    let (delta, u, w) = (g(np, 0.3), g(np, 1.0), g(2 * ns, 1.0));
    let p = c.eval(&delta).unwrap();
    let mut ju = vec![0.0; 2 * ns];
    c.jvp(&p, &u, &mut ju).unwrap();
    // finite differences of T along u (central, h = 1e-5)
    let h = 1e-5;
    let t_at = |s: f64| {
        let d: Vec<f64> = delta.iter().zip(&u).map(|(a, b)| a + s * b).collect();
        let mut t = vec![0.0; 2 * ns];
        c.t(&c.eval(&d).unwrap(), &mut t);
        t
    };
    let (tp, tm) = (t_at(h), t_at(-h));
    let scale = ju.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for i in 0..2 * ns {
        let fd = (tp[i] - tm[i]) / (2.0 * h);
        assert!(
            (fd - ju[i]).abs() < 1e-6 * scale,
            "T[{i}]: {fd} vs {}",
            ju[i]
        );
    }
    // adjoint: ⟨w, J u⟩ = ⟨Jᵀ w, u⟩, and held entries neither enter nor leave
    let mut jtw = vec![0.0; np];
    c.vjp(&p, &w, &mut jtw).unwrap();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (l, r) = (dot(&w, &ju), dot(&jtw, &u));
    assert!((l - r).abs() < 1e-10 * l.abs().max(r.abs()), "{l} vs {r}");
    assert_eq!(jtw[3], 0.0);
    // at δ = 0 the coordinate metric is MGVI's: G = I + J̄_Tᵀ J̄_T = M̄ (on free entries)
    let y = g(np, 1.0);
    let eq = Equation::new(&c, &y).unwrap();
    let mut gu = vec![0.0; np];
    eq.g_apply(&eq.bar, &u, &mut gu).unwrap();
    let lin = crate::inference::mgvi::ModelAt::new(&model, &bar, &mask);
    let mut mu = vec![0.0; np];
    crate::inference::mgvi::Fisher::metric(&lin, &u, &mut mu).unwrap();
    for i in 0..np {
        if mask.is_free(i) {
            assert!(
                (gu[i] - mu[i]).abs() < 1e-10 * mu[i].abs().max(1.0),
                "{i}: {} vs {}",
                gu[i],
                mu[i]
            );
        }
    }
}
