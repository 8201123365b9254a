//! Geometric variational inference (geoVI; Frank, Leike & Enßlin 2021): each linear MGVI
//! residual is refined by solving the nonlinear coordinate equation
//!
//! ```text
//!     g(δ) = δ + J̄_Tᵀ (T(x̄ + δ) − T(x̄)) = y,     y ~ N(0, M̄),  M̄ = I + J̄_Tᵀ J̄_T,
//! ```
//!
//! where T maps parameters to coordinates in which the likelihood's Fisher metric is the
//! identity and J̄_T is its Jacobian at the expansion point x̄. Linearised, g(δ) = M̄ δ, so
//! the MGVI residual M̄⁻¹ y is the first-order solution and the start of the solve; the
//! antithetic partner solves g(δ) = −y, which is no longer −δ. The equation is solved by
//! Gauss–Newton-CG on ½|g(δ) − y|² with the metric Gᵀ G, G = ∂g/∂δ = I + J̄_Tᵀ J_T(x̄ + δ),
//! with exact Jacobian-vector products throughout.
//!
//! For the dust likelihood (a Gaussian in ā with variance v per star) T is, per star,
//! (ā / √v̄, ln v / √2) with v̄ the variance at x̄: its Jacobian at x̄ is exactly F̄^{1/2} J̄,
//! so the linearisation is MGVI's; away from x̄ the ā part keeps x̄'s noise scale (no
//! coordinates make a Gaussian with a varying variance flat, and this choice keeps the map
//! from (ā, v) to T one-to-one).

use anyhow::{Context, Result};
use std::sync::{Arc, Mutex};

use crate::inference::newton::{self, MetricObjective, NewtonReport, NewtonSettings};
use crate::likelihood::mask::Mask;
use crate::likelihood::model::{Model, ModelWork, State};
use crate::sphere::decomp::Space;

/// A model as geoVI's coordinate equation sees it: parameters relative to the expansion
/// point, the flattening transformation T and its Jacobian.
pub trait Coordinates {
    /// What an evaluation at one point keeps for the Jacobian products.
    type Point;
    /// Number of parameters.
    fn dim(&self) -> usize;
    /// Length of the vectors in T's coordinates (on this rank).
    fn n_data(&self) -> usize;
    /// How parameter vectors are distributed.
    fn space(&self) -> Arc<dyn Space>;
    /// The model at x̄ + δ.
    fn eval(&self, delta: &[f64]) -> Result<Self::Point>;
    /// T at a point.
    fn t(&self, p: &Self::Point, out: &mut [f64]);
    /// `out = J_T(p) u`.
    fn jvp(&self, p: &Self::Point, u: &[f64], out: &mut [f64]) -> Result<()>;
    /// `out = J_T(p)ᵀ w`.
    fn vjp(&self, p: &Self::Point, w: &[f64], out: &mut [f64]) -> Result<()>;
}

/// How far each coordinate equation is solved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeoSettings {
    /// Gauss–Newton steps per sample (0: the linear MGVI residual is kept).
    pub newton_steps: usize,
    /// Cap of CG iterations inside one step.
    pub cg_max_iter: usize,
    /// Relative residual at which a step's inner CG stops.
    pub forcing: f64,
}

impl Default for GeoSettings {
    /// 5 steps of at most 50 CG iterations to relative residual 0.1.
    fn default() -> Self {
        Self {
            newton_steps: 5,
            cg_max_iter: 50,
            forcing: 0.1,
        }
    }
}

/// The last δ evaluated and the model there.
type Evaluated<C> = (Vec<f64>, Arc<<C as Coordinates>::Point>);

/// ½|g(δ) − y|² over δ, with its gradient Gᵀ(g − y) and Gauss–Newton metric Gᵀ G.
struct Equation<'a, C: Coordinates> {
    c: &'a C,
    y: &'a [f64],
    bar: C::Point,
    t_bar: Vec<f64>,
    space: Arc<dyn Space>,
    cache: Mutex<Option<Evaluated<C>>>,
    /// Scratch of the Jacobian products: a vector in T's coordinates, one over δ.
    t_buf: Mutex<Vec<f64>>,
    z_buf: Mutex<Vec<f64>>,
}

impl<'a, C: Coordinates> Equation<'a, C> {
    fn new(c: &'a C, y: &'a [f64]) -> Result<Self> {
        let bar = c.eval(&vec![0.0; c.dim()])?;
        let mut t_bar = vec![0.0; c.n_data()];
        c.t(&bar, &mut t_bar);
        Ok(Self {
            c,
            y,
            bar,
            t_bar,
            space: c.space(),
            cache: Mutex::new(None),
            t_buf: Mutex::new(Vec::new()),
            z_buf: Mutex::new(Vec::new()),
        })
    }

    /// The model at x̄ + δ (kept for the metric products at the same δ).
    fn point(&self, delta: &[f64]) -> Result<Arc<C::Point>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache.as_ref().is_some_and(|(at, _)| at.as_slice() == delta);
        // every rank must take the same branch: an evaluation communicates
        if self.space.all(hit) {
            if let Some((_, p)) = cache.as_ref() {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(self.c.eval(delta)?);
        *cache = Some((delta.to_vec(), p.clone()));
        Ok(p)
    }

    /// `out = u + J_T(second)ᵀ J_T(first) u`: G at p is (first, second) = (p, x̄), Gᵀ is
    /// (x̄, p).
    fn plus_jt_j(
        &self,
        first: &C::Point,
        second: &C::Point,
        u: &[f64],
        out: &mut [f64],
    ) -> Result<()> {
        let mut t = self.t_buf.lock().unwrap_or_else(|e| e.into_inner());
        t.resize(self.c.n_data(), 0.0);
        self.c.jvp(first, u, &mut t)?;
        self.c.vjp(second, &t, out)?;
        out.iter_mut().zip(u).for_each(|(o, a)| *o += a);
        Ok(())
    }

    /// G at p applied to u: `u + J̄_Tᵀ (J_T(p) u)`.
    fn g_apply(&self, p: &C::Point, u: &[f64], out: &mut [f64]) -> Result<()> {
        self.plus_jt_j(p, &self.bar, u, out)
    }

    /// Gᵀ at p applied to z: `z + J_T(p)ᵀ (J̄_T z)`.
    fn gt_apply(&self, p: &C::Point, z: &[f64], out: &mut [f64]) -> Result<()> {
        self.plus_jt_j(&self.bar, p, z, out)
    }

    /// g(δ) − y.
    fn residual(&self, delta: &[f64], p: &C::Point) -> Result<Vec<f64>> {
        let mut t = vec![0.0; self.c.n_data()];
        self.c.t(p, &mut t);
        t.iter_mut().zip(&self.t_bar).for_each(|(a, b)| *a -= b);
        let mut r = vec![0.0; delta.len()];
        self.c.vjp(&self.bar, &t, &mut r)?;
        r.iter_mut()
            .zip(delta.iter().zip(self.y))
            .for_each(|(o, (d, y))| *o += d - y);
        Ok(r)
    }
}

impl<C: Coordinates> MetricObjective for Equation<'_, C> {
    fn value_grad(&self, delta: &[f64], g: &mut [f64]) -> Result<f64> {
        let p = self.point(delta)?;
        let r = self.residual(delta, &p)?;
        let value = 0.5 * self.space.dot(&r, &r);
        if !value.is_finite() {
            // a trial point past an overflow: the line search backs off from +∞
            g.iter_mut().for_each(|v| *v = 0.0);
            return Ok(f64::INFINITY);
        }
        self.gt_apply(&p, &r, g)?;
        Ok(value)
    }

    fn metric(&self, delta: &[f64], v: &[f64], out: &mut [f64]) -> Result<()> {
        let p = self.point(delta)?;
        let mut z = self.z_buf.lock().unwrap_or_else(|e| e.into_inner());
        z.resize(v.len(), 0.0);
        self.g_apply(&p, v, &mut z)?;
        self.gt_apply(&p, &z, out)?;
        Ok(())
    }

    fn space(&self) -> Arc<dyn Space> {
        self.space.clone()
    }
}

/// What refining one residual did.
#[derive(Clone, Debug)]
pub struct Refinement {
    /// |g(δ) − y| / |y| at the linear start.
    pub start_misfit: f64,
    /// |g(δ) − y| / |y| at the refined residual.
    pub misfit: f64,
    /// The Gauss–Newton solve.
    pub newton: NewtonReport,
}

/// The geoVI residual solving g(δ) = y, starting from the linear residual `start`
/// (`M̄⁻¹ y`): never worse, in |g(δ) − y|, than the start.
pub fn refine<C: Coordinates>(
    c: &C,
    y: &[f64],
    start: Vec<f64>,
    settings: &GeoSettings,
) -> Result<(Vec<f64>, Refinement)> {
    let eq = Equation::new(c, y)?;
    let y_norm = eq.space.dot(y, y).sqrt().max(f64::MIN_POSITIVE);
    let misfit = |d: &[f64]| -> Result<f64> {
        let p = eq.point(d)?;
        let r = eq.residual(d, &p)?;
        Ok(eq.space.dot(&r, &r).sqrt() / y_norm)
    };
    let start_misfit = misfit(&start)?;
    let newton_settings = NewtonSettings {
        forcing: settings.forcing,
        cg_max_iter: settings.cg_max_iter,
        rel_tol: 1e-12,
        ..Default::default()
    };
    let (delta, newton) =
        newton::minimize(&eq, start, settings.newton_steps as u64, newton_settings)
            .context("geoVI coordinate equation")?;
    let misfit = misfit(&delta)?;
    Ok((
        delta,
        Refinement {
            start_misfit,
            misfit,
            newton,
        },
    ))
}

/// The dust model in geoVI's coordinates at an expansion point: T = (ā/√v̄, ln v/√2) per
/// star, over x (ξ_σ held at the expansion point's) or over p = [x | ξ_σ], restricted to
/// the free entries of `mask`.
pub struct DustCoordinates<'a> {
    model: &'a Model,
    xbar: &'a [f64],
    xsig: &'a [f64],
    mask: &'a Mask,
    with_sig: bool,
    /// 1/√v̄ per star.
    inv_sd_bar: Vec<f64>,
    work: Mutex<ModelWork>,
    /// Scratch: the masked tangent, the two star cotangents.
    scratch: Mutex<[Vec<f64>; 3]>,
}

impl<'a> DustCoordinates<'a> {
    /// The model's coordinates about (x̄, ξ_σ), whose state is `bar`; over p when
    /// `with_sig`.
    pub fn new(
        model: &'a Model,
        bar: &State,
        xbar: &'a [f64],
        xsig: &'a [f64],
        mask: &'a Mask,
        with_sig: bool,
    ) -> Self {
        Self {
            model,
            xbar,
            xsig,
            mask,
            with_sig,
            inv_sd_bar: bar.var.iter().map(|v| 1.0 / v.sqrt()).collect(),
            work: Mutex::new(model.workspace()),
            scratch: Mutex::new([Vec::new(), Vec::new(), Vec::new()]),
        }
    }

    fn n_stars(&self) -> usize {
        self.inv_sd_bar.len()
    }

    /// ∂v/∂ξ_σ of star i at `p`: 2 n_σ σ_A² dn_σ/dξ_σ.
    fn dv_dsig(&self, p: &State, i: usize) -> f64 {
        let e = self.model.data.a_err[i];
        2.0 * p.nsig[i] * e * e * p.dnsig[i]
    }
}

impl Coordinates for DustCoordinates<'_> {
    type Point = State;

    fn dim(&self) -> usize {
        self.model.n_params() + if self.with_sig { self.n_stars() } else { 0 }
    }

    fn n_data(&self) -> usize {
        2 * self.n_stars()
    }

    fn space(&self) -> Arc<dyn Space> {
        let dom = &self.model.dom;
        Arc::new(if self.with_sig {
            dom.p.clone()
        } else {
            dom.x.clone()
        })
    }

    fn eval(&self, delta: &[f64]) -> Result<State> {
        let np = self.model.n_params();
        let mut x: Vec<f64> = self.xbar.iter().zip(delta).map(|(a, d)| a + d).collect();
        for &h in self.mask.held() {
            x[h] = self.xbar[h] + 0.0 * delta[h];
        }
        let xsig: Vec<f64> = if self.with_sig {
            self.xsig
                .iter()
                .zip(&delta[np..])
                .map(|(a, d)| a + d)
                .collect()
        } else {
            self.xsig.to_vec()
        };
        let mut w = self.work.lock().unwrap_or_else(|e| e.into_inner());
        self.model.state(&x, &xsig, &mut w)
    }

    fn t(&self, p: &State, out: &mut [f64]) {
        let (ta, tv) = out.split_at_mut(self.n_stars());
        for i in 0..ta.len() {
            ta[i] = p.abar[i] * self.inv_sd_bar[i];
            tv[i] = p.var[i].ln() / std::f64::consts::SQRT_2;
        }
    }

    fn jvp(&self, p: &State, u: &[f64], out: &mut [f64]) -> Result<()> {
        let np = self.model.n_params();
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let um = self.mask.masked(&u[..np], &mut scratch[0]);
        let (da, dv) = out.split_at_mut(self.n_stars());
        let mut w = self.work.lock().unwrap_or_else(|e| e.into_inner());
        self.model.jvp(p, um, da, dv, &mut w)?;
        for i in 0..da.len() {
            if self.with_sig {
                dv[i] += self.dv_dsig(p, i) * u[np + i];
            }
            da[i] *= self.inv_sd_bar[i];
            dv[i] /= std::f64::consts::SQRT_2 * p.var[i];
        }
        Ok(())
    }

    fn vjp(&self, p: &State, wv: &[f64], out: &mut [f64]) -> Result<()> {
        let (n, np) = (self.n_stars(), self.model.n_params());
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let [_, ca, cv] = &mut *scratch;
        ca.clear();
        ca.extend((0..n).map(|i| wv[i] * self.inv_sd_bar[i]));
        cv.clear();
        cv.extend((0..n).map(|i| wv[n + i] / (std::f64::consts::SQRT_2 * p.var[i])));
        let (ox, os) = out.split_at_mut(np);
        let mut w = self.work.lock().unwrap_or_else(|e| e.into_inner());
        self.model.vjp(p, ca, cv, ox, &mut w)?;
        self.mask.apply(ox);
        for (i, o) in os.iter_mut().enumerate() {
            *o = self.dv_dsig(p, i) * cv[i];
        }
        Ok(())
    }
}

/// The antithetic geoVI pair of metric sample `y` with linear residual `lin` (= M̄⁻¹ y):
/// δ⁺ solving g(δ) = y from `lin` and δ⁻ solving g(δ) = −y from −`lin`, returned as their
/// even part c = (δ⁺ + δ⁻)/2, odd part d = (δ⁺ − δ⁻)/2 (samples x̄ + c ± d) and the two
/// refinements.
pub fn refine_pair<C: Coordinates>(
    c: &C,
    y: &[f64],
    lin: &[f64],
    settings: &GeoSettings,
) -> Result<(Vec<f64>, Vec<f64>, [Refinement; 2])> {
    let (plus, rp) = refine(c, y, lin.to_vec(), settings)?;
    let neg_y: Vec<f64> = y.iter().map(|v| -v).collect();
    let (minus, rm) = refine(c, &neg_y, lin.iter().map(|v| -v).collect(), settings)?;
    let even = plus
        .iter()
        .zip(&minus)
        .map(|(a, b)| 0.5 * (a + b))
        .collect();
    let odd = plus
        .iter()
        .zip(&minus)
        .map(|(a, b)| 0.5 * (a - b))
        .collect();
    Ok((even, odd, [rp, rm]))
}

#[cfg(test)]
mod tests;
