//! Truncated Newton-CG as an argmin `Solver`: the Hessian is a matrix-free metric (for MGVI
//! the sample-averaged Fisher metric), the inner CG stops at a relative residual of
//! `forcing` (not argmin's NewtonCG rule, which degrades to steepest descent once |g| < 1),
//! measured against the gradient without the components the objective names
//! ([`MetricObjective::forcing_excluded2`]) and capped at `cg_max_iter`; the step length comes
//! from argmin's More–Thuente line search run by argmin's Executor.

use argmin::core::{
    CostFunction, Error, Executor, Gradient, IterState, LineSearch, Problem, Solver, State,
    TerminationReason, TerminationStatus, KV,
};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin_math::{ArgminDot, ArgminScaledAdd};
use rayon::prelude::*;
use std::sync::Arc;

use crate::base::util::PAR_MIN_LEN;
use crate::num::cg::{self, CgSettings};
use crate::sphere::decomp::{Serial, Space};

/// An objective with value, gradient and a positive-definite metric (Hessian stand-in).
pub trait MetricObjective {
    /// Value at `p` and gradient into `g`.
    fn value_grad(&self, p: &[f64], g: &mut [f64]) -> Result<f64, Error>;
    /// `out = M(p) v`.
    fn metric(&self, p: &[f64], v: &[f64], out: &mut [f64]) -> Result<(), Error>;
    /// How parameter vectors are distributed (inner products, shared decisions).
    fn space(&self) -> Arc<dyn Space> {
        Arc::new(Serial)
    }
    /// Squared norm of the components of the gradient `g` that the inner CG's `forcing` is
    /// not measured against (default: none). An objective whose few coordinates carry most
    /// of the gradient leaves them out, so that a CG does not stop as soon as those few are
    /// resolved. They must be held alike on every rank (no reduction is made).
    fn forcing_excluded2(&self, _g: &[f64]) -> f64 {
        0.0
    }
    /// Solve `M(p) x = b` by CG from the guess in `x` (on the host unless overridden).
    fn solve(
        &self,
        p: &[f64],
        b: &[f64],
        x: &mut [f64],
        settings: &CgSettings,
    ) -> Result<cg::CgReport, Error> {
        let space = self.space();
        let op = (cg::Operator::Whole, |v: &[f64], out: &mut [f64]| {
            self.metric(p, v, out)
        });
        cg::try_solve_with(&*space, op, b, x, settings)
    }
}

/// A parameter-sized vector, shared rather than copied: argmin keeps the current, previous
/// and best points and gradients of a search, the solver its start and direction, and the
/// cache the last point. On the paper's grid one such vector is ~0.5 GB per rank.
pub type Values = Arc<[f64]>;

/// A parameter vector as argmin sees it: this rank's part and the space whose inner
/// product sums over ranks (so More–Thuente decides alike on every rank). Cloning it
/// shares the values.
#[derive(Clone)]
pub struct DVec {
    /// Local values.
    pub v: Values,
    space: Arc<dyn Space>,
}

impl ArgminDot<DVec, f64> for DVec {
    fn dot(&self, other: &DVec) -> f64 {
        self.space.dot(&self.v, &other.v)
    }
}

impl ArgminScaledAdd<DVec, f64, DVec> for DVec {
    fn scaled_add(&self, factor: &f64, vec: &DVec) -> DVec {
        DVec {
            v: par_values(self.v.len(), |i| self.v[i] + factor * vec.v[i]),
            space: self.space.clone(),
        }
    }
}

/// `n` zeros, allocated once (an `Arc<[f64]>` from a `Vec` would copy it).
fn zeros(n: usize) -> Values {
    par_values(n, |_| 0.0)
}

/// The values `f(0), …, f(n − 1)`, computed on the rayon pool straight into their shared
/// allocation: parameter-sized (133 MB on W2), they would otherwise be computed, and their
/// pages first touched, on one thread.
fn par_values(n: usize, f: impl Fn(usize) -> f64 + Sync) -> Values {
    let mut a = Arc::<[f64]>::new_uninit_slice(n);
    Arc::get_mut(&mut a)
        .expect("a new allocation is not shared")
        .par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .enumerate()
        .for_each(|(i, x)| {
            x.write(f(i));
        });
    // SAFETY: the loop above wrote every element
    unsafe { a.assume_init() }
}

/// A point with its value and gradient.
type Evaluated = (Values, f64, Values);

/// Adapter giving argmin's cost and gradient traits to a [`MetricObjective`]. argmin asks
/// for the cost and the gradient at the same point separately; both come from one
/// `value_grad` call, cached for the last point.
pub struct ArgminObjective<'a, T: MetricObjective> {
    obj: &'a T,
    space: Arc<dyn Space>,
    last: std::sync::Mutex<Option<Evaluated>>,
    evaluations: std::sync::atomic::AtomicUsize,
}

impl<'a, T: MetricObjective> ArgminObjective<'a, T> {
    /// Wrap `obj`.
    pub fn new(obj: &'a T) -> Self {
        Self {
            obj,
            space: obj.space(),
            last: std::sync::Mutex::new(None),
            evaluations: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// `v` as an argmin parameter.
    fn wrap(&self, v: Values) -> DVec {
        DVec {
            v,
            space: self.space.clone(),
        }
    }

    /// Value and gradient at `p` (from the cache when `p` was the last point on every rank).
    pub fn value_grad(&self, p: &Values) -> Result<(f64, Values), Error> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let hit = last
            .as_ref()
            .is_some_and(|(q, _, _)| Arc::ptr_eq(q, p) || **q == **p);
        if self.space.all(hit) {
            if let Some((_, v, g)) = last.as_ref() {
                return Ok((*v, g.clone()));
            }
        }
        // the old point's gradient goes before the new one is computed
        *last = None;
        let mut g = zeros(p.len());
        let v = self
            .obj
            .value_grad(p, Arc::get_mut(&mut g).expect("not shared yet"))?;
        self.evaluations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *last = Some((p.clone(), v, g.clone()));
        Ok((v, g))
    }
}

impl<T: MetricObjective> CostFunction for ArgminObjective<'_, T> {
    type Param = DVec;
    type Output = f64;
    fn cost(&self, p: &DVec) -> Result<f64, Error> {
        Ok(self.value_grad(&p.v)?.0)
    }
}

impl<T: MetricObjective> Gradient for ArgminObjective<'_, T> {
    type Param = DVec;
    type Gradient = DVec;
    fn gradient(&self, p: &DVec) -> Result<DVec, Error> {
        Ok(self.wrap(self.value_grad(&p.v)?.1))
    }
}

type St = IterState<DVec, DVec, (), (), (), f64>;

/// Settings of the truncated Newton solver.
#[derive(Clone, Copy, Debug)]
pub struct NewtonSettings {
    /// Relative residual at which the inner CG stops.
    pub forcing: f64,
    /// Inner CG iteration cap.
    pub cg_max_iter: usize,
    /// Stop when the relative decrease of the objective in one step is below this.
    pub rel_tol: f64,
    /// Largest first trial step in any coordinate (standardized units).
    pub max_step: f64,
    /// The step-length search along each Newton direction.
    pub line_search: LineSearchParams,
}

/// The step-length search: More–Thuente with the strong Wolfe conditions, and Armijo
/// backtracking when it meets a non-finite value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LineSearchParams {
    /// Sufficient-decrease constant c₁ (Armijo) of both searches.
    pub c1: f64,
    /// Curvature constant c₂ of More–Thuente (0 < c₁ < c₂ < 1).
    pub c2: f64,
    /// Iteration cap of More–Thuente.
    pub max_iters: u64,
    /// Halvings of the backtracking fallback.
    pub max_halvings: usize,
}

impl Default for LineSearchParams {
    /// c₁ = 1e-4, c₂ = 0.9, 20 More–Thuente iterations, 40 halvings.
    fn default() -> Self {
        Self {
            c1: 1e-4,
            c2: 0.9,
            max_iters: 20,
            max_halvings: 40,
        }
    }
}

impl Default for NewtonSettings {
    fn default() -> Self {
        Self {
            forcing: 0.1,
            cg_max_iter: 50,
            rel_tol: 1e-9,
            max_step: 2.0,
            line_search: LineSearchParams::default(),
        }
    }
}

/// The solver.
#[derive(Clone)]
pub struct TruncatedNewton {
    settings: NewtonSettings,
    /// The configured line search, never given a direction (each step searches a copy).
    linesearch: MoreThuenteLineSearch<DVec, DVec, f64>,
    /// Inner CG iterations of every step taken.
    pub cg_iterations: Vec<usize>,
    /// Gradient norm at the start of every step.
    pub grad_norms: Vec<f64>,
    /// Length |Δp| of every step taken.
    pub step_norms: Vec<f64>,
    /// Objective at the start, before the first step.
    pub initial_value: Option<f64>,
    /// Residual of every step's inner CG relative to the gradient's norm as the forcing measures it.
    pub cg_residuals: Vec<f64>,
    /// Steps whose inner CG stopped at its cap above the forcing residual.
    pub cg_capped: usize,
}

/// The objective or its gradient is not finite where the minimisation stands, so no step
/// can be judged (an exponential model overflowed).
#[derive(Debug, thiserror::Error)]
#[error(
    "the objective is {value} with a {} gradient at the current point: the density \
     overflowed (ln ρ beyond 709) where stars or the prior see it",
    if *gradient_finite { "finite" } else { "non-finite" }
)]
pub struct NonFiniteObjective {
    /// The objective's value there.
    pub value: f64,
    /// Whether its gradient was finite.
    pub gradient_finite: bool,
}

impl TruncatedNewton {
    /// New solver with the given settings.
    pub fn new(settings: NewtonSettings) -> Result<Self, Error> {
        let ls = settings.line_search;
        let linesearch = MoreThuenteLineSearch::new().with_c(ls.c1, ls.c2)?;
        Ok(Self {
            settings,
            linesearch,
            cg_iterations: Vec::new(),
            grad_norms: Vec::new(),
            step_norms: Vec::new(),
            initial_value: None,
            cg_residuals: Vec::new(),
            cg_capped: 0,
        })
    }
}

impl<T: MetricObjective> Solver<ArgminObjective<'_, T>, St> for TruncatedNewton {
    fn name(&self) -> &str {
        "truncated Newton-CG (metric Hessian)"
    }

    fn next_iter(
        &mut self,
        problem: &mut Problem<ArgminObjective<'_, T>>,
        mut state: St,
    ) -> Result<(St, Option<KV>), Error> {
        // a safe point: nothing of this step has been computed yet
        crate::base::stop::check()?;
        let param = state
            .take_param()
            .ok_or_else(|| Error::msg("truncated Newton needs an initial parameter"))?
            .v;
        let wrapped = problem
            .problem
            .as_ref()
            .ok_or_else(|| Error::msg("objective missing"))?;
        let space = wrapped.space.clone();
        let (cost, grad) = wrapped.value_grad(&param)?;
        let g2 = space.dot(&grad, &grad);
        if !(cost.is_finite() && g2.is_finite()) {
            // no step can be judged from here: stop with the reason, not a line-search error
            return Err(Error::new(NonFiniteObjective {
                value: cost,
                gradient_finite: g2.is_finite(),
            }));
        }
        self.initial_value.get_or_insert(cost);
        self.grad_norms.push(g2.sqrt());
        let (dir, rep) = self.direction(wrapped, &param, &grad, g2)?;
        let dir_norm = space.dot(&dir, &dir).sqrt();
        let (new_param, new_cost) = self.step(wrapped, &param, cost, &grad, dir)?;
        let diff = par_values(param.len(), |i| new_param[i] - param[i]);
        let step_norm = space.dot(&diff, &diff).sqrt();
        self.step_norms.push(step_norm);
        // the step taken as a fraction of the full Newton step (1: the full step)
        let length = if dir_norm > 0.0 {
            step_norm / dir_norm
        } else {
            0.0
        };
        tracing::debug!(
            step = self.step_norms.len(),
            value = new_cost,
            decrease = cost - new_cost,
            cg_iterations = rep.iterations,
            length,
            "Newton step"
        );
        let kv = argmin::kv!("cg_iterations" => rep.iterations as u64; "cg_rel_residual" => rep.rel_residual;);
        let new = DVec {
            v: new_param,
            space,
        };
        Ok((state.param(new).cost(new_cost), Some(kv)))
    }

    fn terminate(&mut self, state: &St) -> TerminationStatus {
        let (c, p) = (state.get_cost(), state.get_prev_cost());
        if state.get_iter() > 0 && (p - c).abs() <= self.settings.rel_tol * c.abs().max(1.0) {
            TerminationStatus::Terminated(TerminationReason::SolverConverged)
        } else {
            TerminationStatus::NotTerminated
        }
    }
}

impl TruncatedNewton {
    /// The Newton direction: the metric solve `M d = −g` by CG, stopped once its residual is
    /// below `forcing` times the norm of the gradient (squared norm `g2`) without the
    /// components [`MetricObjective::forcing_excluded2`] names. Where that is not a descent
    /// direction (a CG stopped on garbage, a metric that is not positive definite), the
    /// steepest descent −g instead.
    fn direction<T: MetricObjective>(
        &mut self,
        wrapped: &ArgminObjective<'_, T>,
        param: &[f64],
        grad: &[f64],
        g2: f64,
    ) -> Result<(Values, cg::CgReport), Error> {
        let space = &wrapped.space;
        let rhs = par_values(grad.len(), |i| -grad[i]);
        let mut dir = zeros(param.len());
        // CG's tolerance is relative to |g| itself: rescale it to the norm the forcing names
        // (the whole gradient where that part is zero)
        let named2 = g2 - wrapped.obj.forcing_excluded2(grad);
        let share = if g2 > 0.0 && named2 > 0.0 {
            (named2 / g2).sqrt()
        } else {
            1.0
        };
        let settings = CgSettings {
            rel_tol: self.settings.forcing * share,
            max_iter: self.settings.cg_max_iter,
            ..Default::default()
        };
        let x = Arc::get_mut(&mut dir).expect("not shared yet");
        let rep = wrapped.obj.solve(param, &rhs, x, &settings)?;
        self.cg_iterations.push(rep.iterations);
        // reported against the norm the forcing is measured in, as the forcing itself is
        self.cg_residuals.push(rep.rel_residual / share);
        if rep.stopped_at_cap(&settings) {
            self.cg_capped += 1;
        }
        let slope = space.dot(&dir, grad);
        if !(slope < 0.0 && slope.is_finite()) {
            tracing::warn!(
                slope,
                "the Newton direction is no descent direction: steepest descent"
            );
            return Ok((rhs, rep));
        }
        Ok((dir, rep))
    }

    /// The step along `dir` from `param` (value `cost`, gradient `grad`): More–Thuente from a
    /// first trial step capped at `max_step` in any coordinate, then Armijo backtracking if
    /// it fails or does not improve on the start. The point returned is never worse than
    /// `param`; with no decrease found it is `param` itself.
    fn step<T: MetricObjective>(
        &mut self,
        wrapped: &ArgminObjective<'_, T>,
        param: &Values,
        cost: f64,
        grad: &Values,
        dir: Values,
    ) -> Result<(Values, f64), Error> {
        let space = wrapped.space.clone();
        let slope = space.dot(&dir, grad);
        if slope == 0.0 {
            // a zero gradient (or direction): nothing to gain here
            return Ok((param.clone(), cost));
        }
        // bound the first trial step: far from the optimum a full Newton step of an
        // exponential model can overflow (ρ = e^{…}). The accepted step is not lengthened
        // towards the full Newton step afterwards: with deep CG directions that grew isolated
        // density spikes (single voxels at ρ up to 1e35 on W0; docs/model.md)
        let max_abs = space.max(
            dir.par_iter()
                .with_min_len(PAR_MIN_LEN)
                .map(|v| v.abs())
                .reduce(|| 0.0, f64::max),
        );
        let alpha0 = if max_abs > self.settings.max_step {
            self.settings.max_step / max_abs
        } else {
            1.0
        };
        let wrap = |v: Values| DVec {
            v,
            space: space.clone(),
        };
        // a fresh search from the configured one: a direction kept in the solver between
        // steps would hold one more parameter-sized vector for the whole minimisation
        let mut search = self.linesearch.clone();
        search.search_direction(wrap(dir.clone()));
        search.initial_step_length(alpha0)?;
        let ls = self.settings.line_search;
        let run = Executor::new(Shared(wrapped), search)
            .configure(|s| {
                s.param(wrap(param.clone()))
                    .gradient(wrap(grad.clone()))
                    .cost(cost)
                    .max_iters(ls.max_iters)
            })
            .ctrlc(false)
            .run();
        let found = run.ok().and_then(|mut r| {
            let c = r.state.get_cost();
            r.state.take_param().map(|p| (p.v, c))
        });
        // every rank takes the same branch: the cost is a global sum
        match found {
            Some((p, c)) if c.is_finite() && c <= cost => Ok((p, c)),
            _ => {
                tracing::debug!("More–Thuente failed or did not improve: Armijo backtracking");
                backtrack(wrapped, param, cost, (&dir, slope), alpha0, ls)
            }
        }
    }
}

/// The line search's view of the objective: the same objective and cache as the solver's,
/// borrowed, so that the solver still holds it when the search fails.
struct Shared<'b, 'a, T: MetricObjective>(&'b ArgminObjective<'a, T>);

impl<T: MetricObjective> CostFunction for Shared<'_, '_, T> {
    type Param = DVec;
    type Output = f64;
    /// A non-finite value ends the search: More–Thuente's interval updates compare values,
    /// and with NaN it spends its whole budget without progress (20 evaluations on a coarse
    /// W2 stage, where an extrapolated trial overflowed). Armijo backtracking takes over.
    fn cost(&self, p: &DVec) -> Result<f64, Error> {
        let v = self.0.cost(p)?;
        if !v.is_finite() {
            return Err(Error::msg(
                "non-finite objective at a line-search trial point",
            ));
        }
        Ok(v)
    }
}

impl<T: MetricObjective> Gradient for Shared<'_, '_, T> {
    type Param = DVec;
    type Gradient = DVec;
    fn gradient(&self, p: &DVec) -> Result<DVec, Error> {
        self.0.gradient(p)
    }
}

/// Armijo backtracking from `alpha0` (halving, at most 40 times); returns the start point if
/// no finite decrease is found. Evaluations go through the solver's cache, so the next step
/// starts from the accepted point's value without computing it again.
fn backtrack<T: MetricObjective>(
    obj: &ArgminObjective<'_, T>,
    p: &Values,
    f0: f64,
    (dir, slope): (&[f64], f64),
    alpha0: f64,
    ls: LineSearchParams,
) -> Result<(Values, f64), Error> {
    let mut alpha = alpha0;
    for _ in 0..ls.max_halvings {
        let trial = par_values(p.len(), |i| p[i] + alpha * dir[i]);
        let (f, _) = obj.value_grad(&trial)?;
        if f.is_finite() && f <= f0 + ls.c1 * alpha * slope {
            return Ok((trial, f));
        }
        alpha *= 0.5;
    }
    Ok((p.clone(), f0))
}

/// Outcome of [`minimize`].
#[derive(Clone, Debug)]
pub struct NewtonReport {
    /// Final objective value.
    pub value: f64,
    /// Newton steps taken.
    pub steps: u64,
    /// Inner CG iterations per step.
    pub cg_iterations: Vec<usize>,
    /// Gradient norm at the start of each step.
    pub grad_norms: Vec<f64>,
    /// Step lengths.
    pub step_norms: Vec<f64>,
    /// Evaluations of value and gradient (line searches included).
    pub evaluations: usize,
    /// Objective at the start point.
    pub initial_value: f64,
    /// Residual of each step's inner CG relative to the gradient's norm as the forcing measures it.
    pub cg_residuals: Vec<f64>,
    /// Steps whose inner CG stopped at its cap above the forcing residual.
    pub cg_capped: usize,
}

/// Minimise `obj` from `p0` with at most `max_steps` Newton steps.
pub fn minimize<T: MetricObjective>(
    obj: &T,
    p0: Vec<f64>,
    max_steps: u64,
    settings: NewtonSettings,
) -> Result<(Vec<f64>, NewtonReport), Error> {
    let solver = TruncatedNewton::new(settings)?;
    let wrapped = ArgminObjective::new(obj);
    let p0 = wrapped.wrap(p0.into());
    let res = Executor::new(wrapped, solver)
        .configure(|s| s.param(p0).max_iters(max_steps))
        .ctrlc(false)
        .run()?;
    let steps = res.state.get_iter();
    let evaluations = res.problem.problem.as_ref().map_or(0, |o| {
        o.evaluations.load(std::sync::atomic::Ordering::Relaxed)
    });
    let solver = res.solver;
    let mut state = res.state;
    let value = state.get_best_cost();
    let p = state
        .take_best_param()
        .or_else(|| state.take_param())
        .ok_or_else(|| Error::msg("no result"))?
        .v;
    // the cache and the states let go of their vectors before the result is copied out
    drop((state, res.problem));
    Ok((
        p.to_vec(),
        NewtonReport {
            value,
            steps,
            cg_iterations: solver.cg_iterations,
            grad_norms: solver.grad_norms,
            step_norms: solver.step_norms,
            evaluations,
            initial_value: solver.initial_value.unwrap_or(value),
            cg_residuals: solver.cg_residuals,
            cg_capped: solver.cg_capped,
        },
    ))
}

#[cfg(test)]
mod tests;
