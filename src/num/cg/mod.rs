//! Matrix-free conjugate gradients for symmetric positive-definite operators (the MGVI
//! metric), with relative-residual and energy-change stopping, an iteration cap and
//! periodic recomputation of the residual. Dot products are summed in a fixed order, so the
//! iterates do not depend on the thread count.
//!
//! CG is the Lanczos process in disguise: its step lengths α and ratios β define the
//! tridiagonal T_k of A on the Krylov space of b, and bᵀf(A)b ≈ |b|² e₁ᵀf(T_k)e₁ (Gauss
//! quadrature; Golub and Meurant, *Matrices, Moments and Quadrature*). Every solve reports
//! this for f(λ) = λ⁻¹, λ⁻², λ⁻³ at no extra operator application (for the starting
//! residual, which is b from a zero start), so a caller that needs bᵀA⁻²b or bᵀA⁻³b for the
//! b it solved with does not solve again.

use crate::sphere::decomp::{Serial, Space};

/// Stopping rules of [`solve`].
#[derive(Clone, Copy, Debug)]
pub struct CgSettings {
    /// Stop when |r| ≤ tol · |b|.
    pub rel_tol: f64,
    /// Stop when the decrease of the quadratic energy ½xᵀAx − bᵀx in one iteration is below
    /// this fraction of its total decrease so far (0 disables).
    pub energy_tol: f64,
    /// Iteration cap.
    pub max_iter: usize,
    /// Recompute r = b − A x every this many iterations (limits drift).
    pub recompute_every: usize,
}

impl Default for CgSettings {
    fn default() -> Self {
        Self {
            rel_tol: 1e-3,
            energy_tol: 0.0,
            max_iter: 200,
            recompute_every: 50,
        }
    }
}

/// What the operator given to a solve writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    /// `A v` itself.
    Whole,
    /// `B v`, for `A = I + B` (a metric: identity plus the likelihood's part). CG adds `v` in
    /// the pass that takes `vᵀ A v` ([`CgSpace::add_dot`]), with the bits of an operator that
    /// added it itself (`B v + v`): two parameter-sized streams less per iteration.
    IdentityPlus,
}

/// Outcome of a CG solve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CgReport {
    /// Iterations done (operator applications after the initial residual).
    pub iterations: usize,
    /// Final |r| / |b|.
    pub rel_residual: f64,
    /// Gauss-quadrature estimates of r₀ᵀA⁻¹r₀, r₀ᵀA⁻²r₀ and r₀ᵀA⁻³r₀ for the starting
    /// residual r₀ = b − Ax₀ (b itself for a zero start) from the iterations done (exact once
    /// the Krylov space holds A⁻¹r₀; the first then equals bᵀx for a zero start).
    pub inverse_moments: [f64; 3],
}

impl CgReport {
    /// Whether the solve stopped at its iteration cap with its tolerance unmet.
    pub fn stopped_at_cap(&self, s: &CgSettings) -> bool {
        self.iterations >= s.max_iter && self.rel_residual > s.rel_tol
    }
}

/// The vector operations CG needs, so the same iteration runs on host vectors and on
/// device-resident ones (where only the scalars of these calls cross the bus).
pub trait CgSpace {
    /// A vector.
    type V;
    /// A new vector holding a copy of `x`.
    fn clone_of(&mut self, x: &Self::V) -> Self::V;
    /// xᵀy, summed in a fixed order.
    fn dot(&mut self, x: &Self::V, y: &Self::V) -> f64;
    /// y += a x.
    fn axpy(&mut self, a: f64, x: &Self::V, y: &mut Self::V);
    /// y = x + b y.
    fn xpay(&mut self, x: &Self::V, b: f64, y: &mut Self::V);
    /// r = b − ap.
    fn sub(&mut self, b: &Self::V, ap: &Self::V, r: &mut Self::V);
    /// x = 0.
    fn zero(&mut self, x: &mut Self::V);
    /// y += a x, then yᵀy: [`CgSpace::axpy`] and [`CgSpace::dot`], in one pass where the
    /// space can (the same bits).
    fn axpy_norm(&mut self, a: f64, x: &Self::V, y: &mut Self::V) -> f64 {
        self.axpy(a, x, y);
        self.dot(y, y)
    }
    /// x += a p, then p = r + b p: [`CgSpace::axpy`] and [`CgSpace::xpay`], in one pass
    /// where the space can (the same bits).
    fn step_and_turn(&mut self, a: f64, p: &mut Self::V, x: &mut Self::V, r: &Self::V, b: f64) {
        self.axpy(a, p, x);
        self.xpay(r, b, p);
    }
    /// y += x, then xᵀy: the identity part of an operator `I + B` added to its product
    /// `B x` in `y` ([`CgSpace::axpy`] with a = 1), and the inner product CG takes next
    /// ([`CgSpace::dot`]), in one pass where the space can (the same bits).
    fn add_dot(&mut self, x: &Self::V, y: &mut Self::V) -> f64 {
        self.axpy(1.0, x, y);
        self.dot(x, y)
    }
    /// Whether every entry of `x` is zero on every rank (false when not cheap to tell: the
    /// solve then applies the operator to its start as to any other).
    fn is_zero(&mut self, _x: &Self::V) -> bool {
        false
    }
}

/// Solve `A x = b` from the initial guess in `x` on one process; `apply(v, out)` writes
/// `A v`.
pub fn solve(
    apply: impl FnMut(&[f64], &mut [f64]),
    b: &[f64],
    x: &mut [f64],
    s: &CgSettings,
) -> CgReport {
    solve_with(&Serial, apply, b, x, s)
}

/// [`solve_with`] for an operator `(op, apply)` that can fail (`op` says what `apply`
/// writes): the first error is returned (the remaining iterations run on zeros and are
/// discarded).
pub fn try_solve_with(
    space: &dyn Space,
    (op, mut apply): (
        Operator,
        impl FnMut(&[f64], &mut [f64]) -> anyhow::Result<()>,
    ),
    b: &[f64],
    x: &mut [f64],
    s: &CgSettings,
) -> anyhow::Result<CgReport> {
    let mut err = None;
    let rep = solve_host(
        space,
        op,
        |v, out| {
            if err.is_some() {
                out.iter_mut().for_each(|o| *o = 0.0);
            } else if let Err(e) = apply(v, out) {
                err = Some(e);
            }
        },
        b,
        x,
        s,
    );
    match err {
        Some(e) => Err(e),
        None => Ok(rep),
    }
}

/// [`solve_pair_in`] on host vectors distributed as `space` says, for an operator
/// `(op, apply)` that can fail: `apply(pairs)` writes `A v` (or what `op` says) into `out` for
/// each `(v, out)` of `pairs` (one or two); the first error is returned (the remaining
/// iterations run on zeros and are discarded).
pub fn try_solve_pair_with(
    space: &dyn Space,
    (op, mut apply): (
        Operator,
        impl FnMut(&mut [(&[f64], &mut [f64])]) -> anyhow::Result<()>,
    ),
    [b0, b1]: [&[f64]; 2],
    [x0, x1]: [&mut [f64]; 2],
    s: &CgSettings,
) -> anyhow::Result<[CgReport; 2]> {
    let mut err = None;
    let (b0, b1) = (HostVec::Ref(b0), HostVec::Ref(b1));
    let (mut x0, mut x1) = (HostVec::Mut(x0), HostVec::Mut(x1));
    let reps = solve_pair_in(
        &mut Host(space, std::marker::PhantomData),
        op,
        |pairs: &mut [(&HostVec, &mut HostVec)]| {
            let mut pairs: Vec<(&[f64], &mut [f64])> =
                pairs.iter_mut().map(|(v, o)| (&***v, &mut ***o)).collect();
            if err.is_some() {
                pairs.iter_mut().for_each(|(_, o)| o.fill(0.0));
            } else if let Err(e) = apply(&mut pairs) {
                err = Some(e);
            }
        },
        [&b0, &b1],
        [&mut x0, &mut x1],
        s,
    );
    match err {
        Some(e) => Err(e),
        None => Ok(reps),
    }
}

/// [`solve`] for vectors distributed as `space` says (inner products summed over ranks).
pub fn solve_with(
    space: &dyn Space,
    apply: impl FnMut(&[f64], &mut [f64]),
    b: &[f64],
    x: &mut [f64],
    s: &CgSettings,
) -> CgReport {
    solve_host(space, Operator::Whole, apply, b, x, s)
}

/// [`solve_op_in`] on host vectors distributed as `space` says, the caller's `b` and `x`
/// borrowed.
fn solve_host(
    space: &dyn Space,
    op: Operator,
    mut apply: impl FnMut(&[f64], &mut [f64]),
    b: &[f64],
    x: &mut [f64],
    s: &CgSettings,
) -> CgReport {
    let (bv, mut xv) = (HostVec::Ref(b), HostVec::Mut(x));
    solve_op_in(
        &mut Host(space, std::marker::PhantomData),
        op,
        |v: &HostVec, o: &mut HostVec| apply(v, o),
        &bv,
        &mut xv,
        s,
    )
}

/// [`solve`] in any [`CgSpace`]: `apply(space, v, out)` writes `A v`.
pub fn solve_in<S: CgSpace>(
    space: &mut S,
    apply: impl FnMut(&S::V, &mut S::V),
    b: &S::V,
    x: &mut S::V,
    s: &CgSettings,
) -> CgReport {
    solve_op_in(space, Operator::Whole, apply, b, x, s)
}

/// [`solve_in`] with the operator given as `op` says.
pub fn solve_op_in<S: CgSpace>(
    space: &mut S,
    op: Operator,
    mut apply: impl FnMut(&S::V, &mut S::V),
    b: &S::V,
    x: &mut S::V,
    s: &CgSettings,
) -> CgReport {
    let mut run = match Run::new(space, op, b, x, s) {
        Ok(run) => run,
        Err(rep) => return rep,
    };
    while let Some((v, out)) = run.wanted() {
        apply(v, out);
        run.advance(space, s);
    }
    run.report()
}

/// Two solves `A x₀ = b₀`, `A x₁ = b₁` with the same operator in lockstep: while both
/// iterate, `apply` gets both products of an iteration at once (operators whose cost is
/// mostly shared between vectors, such as a walk of every star, do the shared part once);
/// once one stops, the other's alone. Each solve does [`solve_in`]'s operations in its
/// order, so with an `apply` that gives each vector the bits of a product on its own, the
/// results are bit for bit those of two [`solve_op_in`] calls. `apply(pairs)` writes `A v`
/// (or what `op` says) into `out` for each `(v, out)` of `pairs` (one or two).
pub fn solve_pair_in<S: CgSpace>(
    space: &mut S,
    op: Operator,
    mut apply: impl FnMut(&mut [(&S::V, &mut S::V)]),
    [b0, b1]: [&S::V; 2],
    [x0, x1]: [&mut S::V; 2],
    s: &CgSettings,
) -> [CgReport; 2] {
    let mut runs = [
        Run::new(space, op, b0, x0, s),
        Run::new(space, op, b1, x1, s),
    ];
    loop {
        let [r0, r1] = &mut runs;
        let mut pairs: Vec<(&S::V, &mut S::V)> = [r0, r1]
            .into_iter()
            .filter_map(|r| r.as_mut().ok().and_then(Run::wanted))
            .collect();
        if pairs.is_empty() {
            break;
        }
        apply(&mut pairs);
        drop(pairs);
        for run in runs.iter_mut().filter_map(|r| r.as_mut().ok()) {
            if run.phase != Phase::Done {
                run.advance(space, s);
            }
        }
    }
    runs.map(|r| match r {
        Ok(run) => run.report(),
        Err(rep) => rep,
    })
}

/// What a [`Run`] does with the product it asked for next.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// r₀ = b − A x₀ (a start other than zero).
    Start,
    /// A step along p.
    Step,
    /// The periodic r = b − A x.
    Recompute,
    /// Stopped.
    Done,
}

/// One CG solve between operator applications: [`Run::wanted`] names the product it needs
/// next, [`Run::advance`] takes it up, so that a caller can apply the operator to the
/// vectors of several solves at once.
struct Run<'a, S: CgSpace> {
    op: Operator,
    b: &'a S::V,
    x: &'a mut S::V,
    ap: S::V,
    r: S::V,
    /// The search direction, from the first residual on.
    p: Option<S::V>,
    phase: Phase,
    bnorm: f64,
    rr: f64,
    rr0: f64,
    /// The last step's energy decrease, and the total so far.
    dec: f64,
    total_decrease: f64,
    it: usize,
    /// The Lanczos coefficients of the iterations done.
    alphas: Vec<f64>,
    betas: Vec<f64>,
}

impl<'a, S: CgSpace> Run<'a, S> {
    /// A solve of `A x = b` from the guess in `x`, or its report when `b` is zero.
    fn new(
        space: &mut S,
        op: Operator,
        b: &'a S::V,
        x: &'a mut S::V,
        s: &CgSettings,
    ) -> Result<Self, CgReport> {
        let bnorm = space.dot(b, b).sqrt();
        if bnorm == 0.0 {
            space.zero(x);
            return Err(CgReport {
                iterations: 0,
                rel_residual: 0.0,
                inverse_moments: [0.0; 3],
            });
        }
        let (ap, r) = (space.clone_of(b), space.clone_of(b));
        let mut run = Run {
            op,
            b,
            x,
            ap,
            r,
            p: None,
            phase: Phase::Start,
            bnorm,
            rr: 0.0,
            rr0: 0.0,
            dec: 0.0,
            total_decrease: 0.0,
            it: 0,
            alphas: Vec::new(),
            betas: Vec::new(),
        };
        // from a zero start (every caller's) r₀ = b: A·0 is zero, up to signs of zeros, and
        // costs a whole product (a metric product: ICR forward, star walks, ICR adjoint)
        if space.is_zero(run.x) {
            run.begin(space, s);
        }
        Ok(run)
    }

    /// The vector the next product is of, and where it goes; `None` once stopped.
    fn wanted(&mut self) -> Option<(&S::V, &mut S::V)> {
        let Run {
            x, p, ap, phase, ..
        } = self;
        match phase {
            Phase::Start | Phase::Recompute => Some((&**x, ap)),
            Phase::Step => p.as_ref().map(|p| (p, ap)),
            Phase::Done => None,
        }
    }

    /// Takes up the product [`Run::wanted`] asked for.
    fn advance(&mut self, space: &mut S, s: &CgSettings) {
        match self.phase {
            Phase::Start => {
                self.add_identity(space);
                space.sub(self.b, &self.ap, &mut self.r);
                self.begin(space, s);
            }
            Phase::Step => self.step(space, s),
            Phase::Recompute => {
                self.add_identity(space);
                space.sub(self.b, &self.ap, &mut self.r);
                let rr_new = space.dot(&self.r, &self.r);
                self.update_direction(space, s, rr_new, None);
            }
            Phase::Done => {}
        }
    }

    /// A x from the operator's product of x: x added for [`Operator::IdentityPlus`].
    fn add_identity(&mut self, space: &mut S) {
        if self.op == Operator::IdentityPlus {
            space.axpy(1.0, self.x, &mut self.ap);
        }
    }

    /// The first direction p = r₀.
    fn begin(&mut self, space: &mut S, s: &CgSettings) {
        self.p = Some(space.clone_of(&self.r));
        self.rr = space.dot(&self.r, &self.r);
        self.rr0 = self.rr;
        self.phase = if self.goes_on(s) {
            Phase::Step
        } else {
            Phase::Done
        };
    }

    /// r moved along p by the product A p in `ap`, and x with it (at once before a
    /// recomputed residual, else with the next direction).
    fn step(&mut self, space: &mut S, s: &CgSettings) {
        let Some(p) = self.p.as_ref() else { return };
        let pap = match self.op {
            Operator::Whole => space.dot(p, &self.ap),
            Operator::IdentityPlus => space.add_dot(p, &mut self.ap),
        };
        if pap.is_nan() || pap <= 0.0 {
            // not positive definite along p (or not finite): keep what we have
            self.phase = Phase::Done;
            return;
        }
        let alpha = self.rr / pap;
        self.alphas.push(alpha);
        self.it += 1;
        // energy decrease of this step: ½ α² pᵀAp = ½ α rr
        self.dec = 0.5 * alpha * self.rr;
        self.total_decrease += self.dec;
        if s.recompute_every > 0 && self.it.is_multiple_of(s.recompute_every) {
            space.axpy(alpha, p, self.x);
            self.phase = Phase::Recompute;
            return;
        }
        let rr_new = space.axpy_norm(-alpha, &self.ap, &mut self.r);
        self.update_direction(space, s, rr_new, Some(alpha));
    }

    /// The next direction from the new residual (|r|² = `rr_new`), unless the energy rule,
    /// the tolerance or the cap stops the solve; x takes its step `alpha` along the old
    /// direction here when it has not yet (in the same pass as the new direction, which
    /// saves CG two of its twelve vector streams per iteration).
    fn update_direction(&mut self, space: &mut S, s: &CgSettings, rr_new: f64, alpha: Option<f64>) {
        let energy_stop = s.energy_tol > 0.0 && self.dec < s.energy_tol * self.total_decrease;
        let beta = rr_new / self.rr;
        if !energy_stop {
            self.betas.push(beta);
        }
        self.rr = rr_new;
        let go_on = !energy_stop && self.goes_on(s);
        let (x, r) = (&mut *self.x, &self.r);
        if let Some(p) = self.p.as_mut() {
            match (go_on, alpha) {
                (true, Some(a)) => space.step_and_turn(a, p, x, r, beta),
                (true, None) => space.xpay(r, beta, p),
                (false, Some(a)) => space.axpy(a, p, x),
                (false, None) => {}
            }
        }
        self.phase = if go_on { Phase::Step } else { Phase::Done };
    }

    /// Whether another step is due: the tolerance unmet and the cap not reached.
    fn goes_on(&self, s: &CgSettings) -> bool {
        self.it < s.max_iter && self.rr.sqrt() > s.rel_tol * self.bnorm
    }

    /// The outcome.
    fn report(&self) -> CgReport {
        let m = lanczos_inverse_moments(&self.alphas, &self.betas);
        CgReport {
            iterations: self.it,
            rel_residual: self.rr.sqrt() / self.bnorm,
            inverse_moments: m.map(|v| v * self.rr0),
        }
    }
}

/// e₁ᵀT⁻ᵖe₁ for p = 1, 2, 3, with T the Lanczos tridiagonal of CG's step lengths `alphas`
/// and residual ratios `betas` (T₀₀ = 1/α₀, Tⱼⱼ = 1/αⱼ + βⱼ₋₁/αⱼ₋₁, Tⱼ,ⱼ₊₁ = √βⱼ/αⱼ; the
/// off-diagonal's sign does not change these forms). T is positive definite when A is, so
/// its tridiagonal solves need no pivoting.
fn lanczos_inverse_moments(alphas: &[f64], betas: &[f64]) -> [f64; 3] {
    let k = alphas.len();
    if k == 0 {
        return [0.0; 3];
    }
    let diag: Vec<f64> = (0..k)
        .map(|j| {
            1.0 / alphas[j]
                + if j > 0 {
                    betas[j - 1] / alphas[j - 1]
                } else {
                    0.0
                }
        })
        .collect();
    let off: Vec<f64> = (0..k - 1).map(|j| betas[j].sqrt() / alphas[j]).collect();
    let mut e1 = vec![0.0; k];
    e1[0] = 1.0;
    let u = tridiagonal_solve(&diag, &off, &e1);
    let w = tridiagonal_solve(&diag, &off, &u);
    let uu: f64 = u.iter().map(|v| v * v).sum();
    let uw: f64 = u.iter().zip(&w).map(|(a, b)| a * b).sum();
    [u[0], uu, uw]
}

/// x solving T x = rhs for the symmetric tridiagonal T (diagonal `diag`, off-diagonal `off`),
/// by elimination without pivoting (T positive definite).
fn tridiagonal_solve(diag: &[f64], off: &[f64], rhs: &[f64]) -> Vec<f64> {
    let k = diag.len();
    let (mut c, mut x) = (vec![0.0; k], rhs.to_vec());
    let mut piv = diag[0];
    x[0] /= piv;
    for j in 1..k {
        c[j - 1] = off[j - 1] / piv;
        piv = diag[j] - off[j - 1] * c[j - 1];
        x[j] = (x[j] - off[j - 1] * x[j - 1]) / piv;
    }
    for j in (0..k - 1).rev() {
        x[j] -= c[j] * x[j + 1];
    }
    x
}

mod host;
pub use host::{Host, HostVec};

#[cfg(test)]
mod tests;
