use super::*;

/// f(p) = Σ_i a_i (exp(p_i) − p_i) + ½|p − c|², metric = diag(a_i e^{p_i} + 1): convex,
/// badly scaled, minimum where a_i (e^{p_i} − 1) + p_i − c_i = 0.
struct Toy {
    a: Vec<f64>,
    c: Vec<f64>,
}

impl MetricObjective for Toy {
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> Result<f64, Error> {
        let mut f = 0.0;
        for i in 0..p.len() {
            f += self.a[i] * (p[i].exp() - p[i]) + 0.5 * (p[i] - self.c[i]).powi(2);
            g[i] = self.a[i] * (p[i].exp() - 1.0) + p[i] - self.c[i];
        }
        Ok(f)
    }
    fn metric(&self, p: &[f64], v: &[f64], out: &mut [f64]) -> Result<(), Error> {
        for i in 0..p.len() {
            out[i] = (self.a[i] * p[i].exp() + 1.0) * v[i];
        }
        Ok(())
    }
}

#[test]
fn converges_on_badly_scaled_convex_problem() {
    let n = 1000;
    let a: Vec<f64> = (0..n)
        .map(|i| 10f64.powf(4.0 * i as f64 / n as f64))
        .collect();
    let c: Vec<f64> = (0..n).map(|i| 3.0 * ((i as f64) * 0.1).sin()).collect();
    let toy = Toy { a, c };
    let (p, rep) = minimize(
        &toy,
        vec![0.0; n],
        30,
        NewtonSettings {
            forcing: 1e-8,
            // CG needs ≈ √κ ln(2/forcing) ≈ 700 iterations at κ ≈ 10⁴ to reach the forcing;
            // a budget below that leaves every direction at a 1e-2 residual, and how far
            // Newton then gets turns on the rounding of the sums
            cg_max_iter: 2000,
            rel_tol: 0.0,
            max_step: 1e3,
            ..Default::default()
        },
    )
    .unwrap();
    let mut g = vec![0.0; n];
    toy.value_grad(&p, &mut g).unwrap();
    let gn = g.iter().map(|v| v * v).sum::<f64>().sqrt();
    // |g|² can not drop below ~ε|f| (the line search compares values of size ~1e5)
    assert!(gn < 1e-5, "gradient norm {gn} after {} steps", rep.steps);
    assert_eq!(rep.cg_capped, 0, "every CG solve reached the forcing");
}

/// ½|p − c|² inside the ball |p| < radius, `wall` outside (think exp-overflow of ρ): +∞, or
/// NaN with a NaN gradient. The metric is the identity times `metric_scale` (negative: not
/// positive definite; above 1: Newton steps too short, so a line search extrapolates).
struct Walled {
    c: Vec<f64>,
    radius: f64,
    metric_scale: f64,
    wall: f64,
}

impl MetricObjective for Walled {
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> Result<f64, Error> {
        let r2: f64 = p.iter().map(|v| v * v).sum();
        let mut f = 0.0;
        for i in 0..p.len() {
            g[i] = p[i] - self.c[i];
            f += 0.5 * g[i] * g[i];
        }
        if r2.sqrt() < self.radius {
            return Ok(f);
        }
        if self.wall.is_nan() {
            // an overflow that reached the value reaches the gradient too
            g.fill(f64::NAN);
        }
        Ok(self.wall)
    }
    fn metric(&self, _p: &[f64], v: &[f64], out: &mut [f64]) -> Result<(), Error> {
        out.iter_mut()
            .zip(v)
            .for_each(|(o, x)| *o = self.metric_scale * x);
        Ok(())
    }
}

fn far_steps() -> NewtonSettings {
    NewtonSettings {
        forcing: 1e-10,
        cg_max_iter: 10,
        rel_tol: 0.0,
        max_step: 1e6,
        ..Default::default()
    }
}

#[test]
fn a_line_search_meeting_infinity_backtracks_and_finishes() {
    let n = 8;
    // the minimum lies at |c| = 8, outside the finite region |p| < 3
    let obj = Walled {
        c: vec![8.0 / (n as f64).sqrt(); n],
        radius: 3.0,
        metric_scale: 1.0,
        wall: f64::INFINITY,
    };
    let f0 = 0.5 * 64.0;
    let (p, rep) = minimize(&obj, vec![0.0; n], 6, far_steps()).unwrap();
    let r = p.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(r < 3.0, "ended outside the finite region: |p| = {r}");
    assert!(
        rep.value.is_finite() && rep.value < f0,
        "value {}",
        rep.value
    );
    // every step kept the value finite and never went up
    let mut g = vec![0.0; n];
    assert_eq!(obj.value_grad(&p, &mut g).unwrap(), rep.value);
}

#[test]
fn a_line_search_meeting_nan_falls_back_at_once() {
    let n = 8;
    // steps 100× too short: More–Thuente extrapolates (α = 1, 5, 21, …) into the NaN
    // region |p| ≥ 0.5 (α > 6) before its curvature condition holds (α > 10), and with NaN
    // its comparisons fail, so it would spend its whole budget
    let obj = Walled {
        c: vec![8.0 / (n as f64).sqrt(); n],
        radius: 0.5,
        metric_scale: 100.0,
        wall: f64::NAN,
    };
    let (p, rep) = minimize(&obj, vec![0.0; n], 1, far_steps()).unwrap();
    let mut g = vec![0.0; n];
    let value = obj.value_grad(&p, &mut g).unwrap();
    assert!(value.is_finite() && value < 32.0, "value {value}");
    assert_eq!(rep.value, value);
    // start + the search up to its NaN + one Armijo trial (the budget is 20)
    assert!(rep.evaluations <= 8, "{} evaluations", rep.evaluations);
}

#[test]
fn a_zero_gradient_is_a_fixed_point_and_a_bad_metric_falls_back_to_descent() {
    let n = 5;
    let c = vec![0.7; n];
    let at_min = Walled {
        c: c.clone(),
        radius: 1e9,
        metric_scale: 1.0,
        wall: f64::INFINITY,
    };
    let (p, rep) = minimize(&at_min, c.clone(), 3, far_steps()).unwrap();
    assert_eq!(p, c);
    assert_eq!(rep.value, 0.0);
    // a negative metric turns the Newton direction uphill: steepest descent instead
    let uphill = Walled {
        c,
        radius: 1e9,
        metric_scale: -1.0,
        wall: f64::INFINITY,
    };
    let (p, rep) = minimize(&uphill, vec![0.0; n], 3, far_steps()).unwrap();
    assert!(rep.value < 0.5 * 0.49 * n as f64, "value {}", rep.value);
    assert!(p.iter().all(|v| (v - 0.7).abs() < 0.7), "{p:?}");
}

#[test]
fn a_start_where_the_objective_is_not_finite_is_an_error_that_says_so() {
    let n = 4;
    let walled = Walled {
        c: vec![0.0; n],
        radius: 1.0,
        metric_scale: 1.0,
        wall: f64::INFINITY,
    };
    // outside the finite region from the start: nothing can be compared, so no step
    let e = minimize(&walled, vec![2.0; n], 3, far_steps()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("objective is inf") && msg.contains("overflowed"),
        "{msg}"
    );
}

/// ½ pᵀAp − bᵀp with A = diag(a) (the metric is the Hessian); `lead` coordinates are left
/// out of the forcing norm when `exclude_lead`.
struct Quadratic {
    a: Vec<f64>,
    b: Vec<f64>,
    lead: usize,
    exclude_lead: bool,
}

impl MetricObjective for Quadratic {
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> Result<f64, Error> {
        let mut f = 0.0;
        for i in 0..p.len() {
            g[i] = self.a[i] * p[i] - self.b[i];
            f += 0.5 * self.a[i] * p[i] * p[i] - self.b[i] * p[i];
        }
        Ok(f)
    }
    fn metric(&self, _p: &[f64], v: &[f64], out: &mut [f64]) -> Result<(), Error> {
        for i in 0..v.len() {
            out[i] = self.a[i] * v[i];
        }
        Ok(())
    }
    fn forcing_excluded2(&self, g: &[f64]) -> f64 {
        let lead = if self.exclude_lead { self.lead } else { 0 };
        g[..lead].iter().map(|v| v * v).sum()
    }
}

#[test]
fn the_forcing_is_measured_on_the_gradient_the_objective_names() {
    // two coordinates with a gradient 1000 times the rest's, which spread over a spectrum
    // that takes CG many iterations: measured on the whole gradient, one Newton step
    // resolves the two and leaves the rest; measured without them, the rest's gradient
    // falls below forcing times its start (the full step is taken on a quadratic)
    let n = 200;
    let lead = 2;
    let a: Vec<f64> = (0..n)
        .map(|i| if i < lead { 1.0 } else { 1.0 + i as f64 })
        .collect();
    let b: Vec<f64> = (0..n)
        .map(|i| {
            if i < lead {
                1e3
            } else {
                (i as f64 * 0.7).sin()
            }
        })
        .collect();
    let rest_norm = |g: &[f64]| g[lead..].iter().map(|v| v * v).sum::<f64>().sqrt();
    let forcing = 0.1;
    let one_step = |exclude_lead: bool| {
        let obj = Quadratic {
            a: a.clone(),
            b: b.clone(),
            lead,
            exclude_lead,
        };
        let settings = NewtonSettings {
            forcing,
            cg_max_iter: n,
            rel_tol: 0.0,
            max_step: 1e6,
            ..Default::default()
        };
        let (p, rep) = minimize(&obj, vec![0.0; n], 1, settings).unwrap();
        let mut g = vec![0.0; n];
        obj.value_grad(&p, &mut g).unwrap();
        (rest_norm(&g), rep.cg_iterations[0])
    };
    let start = rest_norm(&b);
    let (whole, cg_whole) = one_step(false);
    let (named, cg_named) = one_step(true);
    assert!(whole > forcing * start, "{whole} vs {start}, {cg_whole} CG");
    assert!(
        named <= forcing * start,
        "{named} vs {start}, {cg_named} CG"
    );
    assert!(cg_named > cg_whole, "{cg_named} vs {cg_whole}");
}
