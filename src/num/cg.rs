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

use crate::base::util::{par_zero, PAR_MIN_LEN};
use crate::sphere::decomp::{Serial, Space};
use rayon::prelude::*;

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
    /// Whether every entry of `x` is zero on every rank (false when not cheap to tell: the
    /// solve then applies the operator to its start as to any other).
    fn is_zero(&mut self, _x: &Self::V) -> bool {
        false
    }
}

/// Host vectors (this rank's part), with inner products from a [`Space`].
pub struct Host<'a, 'v>(pub &'a dyn Space, pub std::marker::PhantomData<&'v ()>);

/// A host vector of [`Host`]: one CG allocated, or the caller's right-hand side and
/// solution, borrowed rather than copied (each is parameter-sized: 133 MB on W2).
pub enum HostVec<'v> {
    /// A vector CG allocated.
    Owned(Vec<f64>),
    /// The caller's right-hand side, which CG only reads.
    Ref(&'v [f64]),
    /// The caller's solution vector.
    Mut(&'v mut [f64]),
}

impl std::ops::Deref for HostVec<'_> {
    type Target = [f64];
    fn deref(&self) -> &[f64] {
        match self {
            HostVec::Owned(v) => v,
            HostVec::Ref(v) => v,
            HostVec::Mut(v) => v,
        }
    }
}

impl std::ops::DerefMut for HostVec<'_> {
    fn deref_mut(&mut self) -> &mut [f64] {
        match self {
            HostVec::Owned(v) => v,
            HostVec::Mut(v) => v,
            // `solve_in` takes the right-hand side by shared reference
            HostVec::Ref(_) => unreachable!("CG never writes its right-hand side"),
        }
    }
}

impl<'v> CgSpace for Host<'_, 'v> {
    type V = HostVec<'v>;
    fn clone_of(&mut self, x: &HostVec<'v>) -> HostVec<'v> {
        // copied on the pool: a parameter-sized copy (and its pages' first touch) on one
        // thread would be the serial part of every solve
        let mut v = Vec::with_capacity(x.len());
        v.par_extend(x.par_iter().with_min_len(PAR_MIN_LEN).copied());
        HostVec::Owned(v)
    }
    fn dot(&mut self, x: &HostVec<'v>, y: &HostVec<'v>) -> f64 {
        self.0.dot(x, y)
    }
    fn axpy(&mut self, a: f64, x: &HostVec<'v>, y: &mut HostVec<'v>) {
        y.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(&**x)
            .for_each(|(yi, xi)| *yi += a * xi);
    }
    fn xpay(&mut self, x: &HostVec<'v>, b: f64, y: &mut HostVec<'v>) {
        y.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(&**x)
            .for_each(|(yi, xi)| *yi = xi + b * *yi);
    }
    fn sub(&mut self, b: &HostVec<'v>, ap: &HostVec<'v>, r: &mut HostVec<'v>) {
        r.par_iter_mut()
            .with_min_len(PAR_MIN_LEN)
            .zip(b.par_iter().zip(&**ap))
            .for_each(|(ri, (bi, ai))| *ri = bi - ai);
    }
    fn zero(&mut self, x: &mut HostVec<'v>) {
        par_zero(x);
    }
    fn is_zero(&mut self, x: &HostVec<'v>) -> bool {
        let here = x.par_iter().with_min_len(PAR_MIN_LEN).all(|v| *v == 0.0);
        self.0.all(here)
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

/// [`solve_with`] for an operator that can fail: the first error is returned (the remaining
/// iterations run on zeros and are discarded).
pub fn try_solve_with(
    space: &dyn Space,
    mut apply: impl FnMut(&[f64], &mut [f64]) -> anyhow::Result<()>,
    b: &[f64],
    x: &mut [f64],
    s: &CgSettings,
) -> anyhow::Result<CgReport> {
    let mut err = None;
    let rep = solve_with(
        space,
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

/// [`solve`] for vectors distributed as `space` says (inner products summed over ranks).
pub fn solve_with(
    space: &dyn Space,
    mut apply: impl FnMut(&[f64], &mut [f64]),
    b: &[f64],
    x: &mut [f64],
    s: &CgSettings,
) -> CgReport {
    let (bv, mut xv) = (HostVec::Ref(b), HostVec::Mut(x));
    solve_in(
        &mut Host(space, std::marker::PhantomData),
        |v: &HostVec, o: &mut HostVec| apply(v, o),
        &bv,
        &mut xv,
        s,
    )
}

/// [`solve`] in any [`CgSpace`]: `apply(space, v, out)` writes `A v`.
pub fn solve_in<S: CgSpace>(
    space: &mut S,
    mut apply: impl FnMut(&S::V, &mut S::V),
    b: &S::V,
    x: &mut S::V,
    s: &CgSettings,
) -> CgReport {
    let bnorm = space.dot(b, b).sqrt();
    if bnorm == 0.0 {
        space.zero(x);
        return CgReport {
            iterations: 0,
            rel_residual: 0.0,
            inverse_moments: [0.0; 3],
        };
    }
    let mut ap = space.clone_of(b);
    let mut r = space.clone_of(b);
    // from a zero start (every caller's) r₀ = b: A·0 is zero, up to signs of zeros, and
    // costs a whole product (a metric product: ICR forward, star walks, ICR adjoint)
    if !space.is_zero(x) {
        apply(x, &mut ap);
        space.sub(b, &ap, &mut r);
    }
    let mut p = space.clone_of(&r);
    let mut rr = space.dot(&r, &r);
    let rr0 = rr;
    let mut total_decrease = 0.0;
    let mut it = 0;
    // the Lanczos coefficients of the iterations done
    let (mut alphas, mut betas) = (Vec::new(), Vec::new());
    while it < s.max_iter && rr.sqrt() > s.rel_tol * bnorm {
        apply(&p, &mut ap);
        let pap = space.dot(&p, &ap);
        if pap.is_nan() || pap <= 0.0 {
            break; // not positive definite along p (or not finite): keep what we have
        }
        let alpha = rr / pap;
        space.axpy(alpha, &p, x);
        alphas.push(alpha);
        it += 1;
        // energy decrease of this step: ½ α² pᵀAp = ½ α rr
        let dec = 0.5 * alpha * rr;
        total_decrease += dec;
        if s.recompute_every > 0 && it % s.recompute_every == 0 {
            apply(x, &mut ap);
            space.sub(b, &ap, &mut r);
        } else {
            space.axpy(-alpha, &ap, &mut r);
        }
        let rr_new = space.dot(&r, &r);
        if s.energy_tol > 0.0 && dec < s.energy_tol * total_decrease {
            rr = rr_new;
            break;
        }
        let beta = rr_new / rr;
        betas.push(beta);
        space.xpay(&r, beta, &mut p);
        rr = rr_new;
    }
    let m = lanczos_inverse_moments(&alphas, &betas);
    CgReport {
        iterations: it,
        rel_residual: rr.sqrt() / bnorm,
        inverse_moments: m.map(|v| v * rr0),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Host`] with the zero-start check off: every solve applies the operator to its start.
    struct Unchecked<'a, 'v>(Host<'a, 'v>);

    impl<'v> CgSpace for Unchecked<'_, 'v> {
        type V = HostVec<'v>;
        fn clone_of(&mut self, x: &HostVec<'v>) -> HostVec<'v> {
            self.0.clone_of(x)
        }
        fn dot(&mut self, x: &HostVec<'v>, y: &HostVec<'v>) -> f64 {
            self.0.dot(x, y)
        }
        fn axpy(&mut self, a: f64, x: &HostVec<'v>, y: &mut HostVec<'v>) {
            self.0.axpy(a, x, y)
        }
        fn xpay(&mut self, x: &HostVec<'v>, b: f64, y: &mut HostVec<'v>) {
            self.0.xpay(x, b, y)
        }
        fn sub(&mut self, b: &HostVec<'v>, ap: &HostVec<'v>, r: &mut HostVec<'v>) {
            self.0.sub(b, ap, r)
        }
        fn zero(&mut self, x: &mut HostVec<'v>) {
            self.0.zero(x)
        }
    }

    #[test]
    fn a_zero_start_skips_the_product_with_it_and_changes_no_bit() {
        let n = 50;
        let apply = |x: &[f64], out: &mut [f64]| {
            for i in 0..n {
                let left = if i > 0 { x[i - 1] } else { 0.0 };
                let right = if i + 1 < n { x[i + 1] } else { 0.0 };
                out[i] = (3.0 + (i as f64 * 0.3).sin()) * x[i] - 0.9 * (left + right);
            }
        };
        let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.41).cos() - 0.2).collect();
        let s = CgSettings {
            rel_tol: 1e-9,
            max_iter: 15,
            ..Default::default()
        };
        let run = |checked: bool, start: f64| {
            let mut calls = 0;
            let mut x = vec![start; n];
            let (bv, mut xv) = (HostVec::Ref(&b), HostVec::Mut(&mut x));
            let host = Host(&Serial, std::marker::PhantomData);
            let op = |v: &HostVec, o: &mut HostVec| {
                calls += 1;
                apply(v, o)
            };
            let rep = if checked {
                solve_in(&mut { host }, op, &bv, &mut xv, &s)
            } else {
                solve_in(&mut Unchecked(host), op, &bv, &mut xv, &s)
            };
            (x, rep, calls)
        };
        let (x1, r1, c1) = run(true, 0.0);
        let (x0, r0, c0) = run(false, 0.0);
        assert_eq!((c1, c0), (r1.iterations, r1.iterations + 1));
        assert_eq!(r1, r0);
        assert!(x1.iter().zip(&x0).all(|(a, b)| a.to_bits() == b.to_bits()));
        // any other start still applies the operator to it first
        let (_, r2, c2) = run(true, 0.25);
        assert_eq!(c2, r2.iterations + 1);
    }

    #[test]
    fn a_non_finite_operator_leaves_the_start_where_it_was() {
        let b = vec![1.0; 8];
        let mut x = vec![0.0; 8];
        let rep = solve(|_, o| o.fill(f64::NAN), &b, &mut x, &CgSettings::default());
        assert_eq!(rep.iterations, 0);
        assert!(x.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn solves_spd_system_to_tolerance() {
        let n = 60;
        // A = I + Σ v vᵀ with a few random-ish vectors: SPD, condition ~1e3
        let vs: Vec<Vec<f64>> = (0..5)
            .map(|k| {
                (0..n)
                    .map(|i| ((i * (k + 3)) as f64 * 0.37).sin() * (k as f64 + 1.0) * 4.0)
                    .collect()
            })
            .collect();
        let apply = |x: &[f64], out: &mut [f64]| {
            out.copy_from_slice(x);
            for v in &vs {
                let d: f64 = v.iter().zip(x).map(|(a, b)| a * b).sum();
                for i in 0..n {
                    out[i] += d * v[i];
                }
            }
        };
        let b: Vec<f64> = (0..n).map(|i| (i as f64).cos()).collect();
        let mut x = vec![0.0; n];
        let rep = solve(
            apply,
            &b,
            &mut x,
            &CgSettings {
                rel_tol: 1e-12,
                max_iter: 500,
                ..Default::default()
            },
        );
        let mut ax = vec![0.0; n];
        apply(&x, &mut ax);
        let err: f64 = ax
            .iter()
            .zip(&b)
            .map(|(a, c)| (a - c).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(err < 1e-10, "residual {err}, {rep:?}");
        // rank-5 update of I: CG converges in at most 6 iterations in exact arithmetic
        assert!(rep.iterations <= 12, "{rep:?}");
    }

    #[test]
    fn the_reported_inverse_moments_are_those_of_the_solved_right_hand_side() {
        // A = diag(1 + 40 (i/n)²) + a rank-3 term: SPD with a spread spectrum, so that CG
        // needs many iterations and its quadrature is not trivially exact
        let n = 80;
        let vs: Vec<Vec<f64>> = (0..3)
            .map(|k| {
                (0..n)
                    .map(|i| ((i * (k + 2)) as f64 * 0.53).cos() * 2.0)
                    .collect()
            })
            .collect();
        let apply = |x: &[f64], out: &mut [f64]| {
            for i in 0..n {
                out[i] = (1.0 + 40.0 * (i as f64 / n as f64).powi(2)) * x[i];
            }
            for v in &vs {
                let d: f64 = v.iter().zip(x).map(|(a, b)| a * b).sum();
                out.iter_mut().zip(v).for_each(|(o, vi)| *o += d * vi);
            }
        };
        let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin() + 0.3).collect();
        let tight = CgSettings {
            rel_tol: 1e-13,
            max_iter: 1000,
            ..Default::default()
        };
        let solve_from_zero = |rhs: &[f64]| {
            let mut x = vec![0.0; n];
            let rep = solve(apply, rhs, &mut x, &tight);
            (x, rep)
        };
        let (x, rep) = solve_from_zero(&b);
        let (y, _) = solve_from_zero(&x);
        let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(p, q)| p * q).sum::<f64>();
        let exact = [dot(&b, &x), dot(&x, &x), dot(&x, &y)];
        for (got, want) in rep.inverse_moments.iter().zip(exact) {
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "{:?} vs {exact:?}",
                rep.inverse_moments
            );
        }
        // stopped early, the first moment is still bᵀx of the iterate (a zero start)
        let mut x5 = vec![0.0; n];
        let loose = CgSettings {
            max_iter: 5,
            ..tight
        };
        let rep5 = solve(apply, &b, &mut x5, &loose);
        assert_eq!(rep5.iterations, 5);
        let m1 = dot(&b, &x5);
        assert!(
            (rep5.inverse_moments[0] - m1).abs() <= 1e-10 * m1,
            "{rep5:?} vs {m1}"
        );
        assert!(rep5.inverse_moments[1] < exact[1] && rep5.inverse_moments[2] < exact[2]);
        // from a warm start they are the starting residual's: r₀ᵀA⁻¹r₀ = r₀ᵀ(x − x₀)
        let x0: Vec<f64> = (0..n).map(|i| 0.1 * (i as f64).cos()).collect();
        let mut ax0 = vec![0.0; n];
        apply(&x0, &mut ax0);
        let r0: Vec<f64> = b.iter().zip(&ax0).map(|(p, q)| p - q).collect();
        let mut xw = x0.clone();
        let repw = solve(apply, &b, &mut xw, &tight);
        let dx: Vec<f64> = xw.iter().zip(&x0).map(|(p, q)| p - q).collect();
        let want = dot(&r0, &dx);
        assert!(
            (repw.inverse_moments[0] - want).abs() <= 1e-9 * want,
            "{repw:?} vs {want}"
        );
    }
}
