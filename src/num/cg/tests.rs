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

/// The SPD test operator `out = diag(d) x + Σ_v v (vᵀ x)`: the spectrum of `d` lifted by a
/// low-rank term.
fn diag_plus_low_rank<'a>(
    d: &'a [f64],
    vs: &'a [Vec<f64>],
) -> impl Fn(&[f64], &mut [f64]) + Copy + 'a {
    move |x, out| {
        for i in 0..d.len() {
            out[i] = d[i] * x[i];
        }
        for v in vs {
            let dot: f64 = v.iter().zip(x).map(|(a, b)| a * b).sum();
            out.iter_mut().zip(v).for_each(|(o, vi)| *o += dot * vi);
        }
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
    let diag = vec![1.0; n];
    let apply = diag_plus_low_rank(&diag, &vs);
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
    let diag: Vec<f64> = (0..n)
        .map(|i| 1.0 + 40.0 * (i as f64 / n as f64).powi(2))
        .collect();
    let apply = diag_plus_low_rank(&diag, &vs);
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

#[test]
fn two_solves_in_lockstep_give_the_bits_of_two_alone() {
    // A = diag(1 + 30 (i/n)²) + a rank-2 term; the right-hand sides need different numbers
    // of iterations, so one solve goes on alone after the other stops
    let n = 70;
    let vs: Vec<Vec<f64>> = (0..2)
        .map(|k| {
            // supported on the first 12 entries: a right-hand side there stays there
            (0..n)
                .map(|i| {
                    if i < 12 {
                        ((i * (k + 2)) as f64 * 0.61).sin()
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let diag: Vec<f64> = (0..n)
        .map(|i| 1.0 + 30.0 * (i as f64 / n as f64).powi(2))
        .collect();
    let apply = diag_plus_low_rank(&diag, &vs);
    let rough: Vec<f64> = (0..n).map(|i| (i as f64 * 0.9).cos()).collect();
    // on the first 12 entries only
    let smooth: Vec<f64> = (0..n)
        .map(|i| if i < 12 { 1.0 + 0.1 * i as f64 } else { 0.0 })
        .collect();
    let zero = vec![0.0; n];
    for (rhs, s) in [
        (
            [&rough, &smooth],
            CgSettings {
                rel_tol: 1e-6,
                max_iter: 60,
                recompute_every: 7,
                ..Default::default()
            },
        ),
        (
            [&smooth, &rough],
            CgSettings {
                rel_tol: 1e-12,
                max_iter: 25,
                recompute_every: 0,
                energy_tol: 1e-9,
            },
        ),
        ([&zero, &rough], CgSettings::default()),
    ] {
        let alone = rhs.map(|b| {
            let mut x = vec![0.0; n];
            let rep = solve(apply, b, &mut x, &s);
            (x, rep)
        });
        let (mut x0, mut x1) = (vec![0.0; n], vec![0.0; n]);
        let (mut products, mut together) = (0, 0);
        let reps = {
            let (b0, b1) = (HostVec::Ref(rhs[0]), HostVec::Ref(rhs[1]));
            let (mut v0, mut v1) = (HostVec::Mut(&mut x0), HostVec::Mut(&mut x1));
            let mut host = Host(&Serial, std::marker::PhantomData);
            solve_pair_in(
                &mut host,
                Operator::Whole,
                |pairs: &mut [(&HostVec, &mut HostVec)]| {
                    products += pairs.len();
                    together += usize::from(pairs.len() == 2);
                    for (v, out) in pairs.iter_mut() {
                        apply(v, out);
                    }
                },
                [&b0, &b1],
                [&mut v0, &mut v1],
                &s,
            )
        };
        for ((x, rep), (y, got)) in alone.iter().zip([(&x0, reps[0]), (&x1, reps[1])]) {
            assert_eq!(*rep, got);
            assert!(x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let its = [alone[0].1.iterations, alone[1].1.iterations];
        let recomputes = |k: usize| k.checked_div(s.recompute_every).unwrap_or(0);
        assert_eq!(
            products,
            its[0] + its[1] + recomputes(its[0]) + recomputes(its[1])
        );
        assert!(
            its[0] != its[1],
            "{its:?}: the test wants one solve to go on alone"
        );
        assert_eq!(
            together,
            its[0].min(its[1]) + recomputes(its[0].min(its[1]))
        );
    }
}

/// Fused vector passes (a space's `axpy_norm`, `step_and_turn`, `add_dot`) against the
/// separate ones, and an operator `I + B` given as `B` ([`Operator::IdentityPlus`]) against
/// the same operator given whole (`B v + v`): the same bits, on the serial space and on patch
/// layouts whose ranges cover the vector or not.
#[test]
fn fused_vector_passes_give_the_bits_of_separate_ones() {
    use crate::sphere::decomp::{Decomp, VecLayout};
    // long enough for several of the serial dot's chunks; a start other than zero, so that
    // both spaces apply the operator to it
    let n = 20_000;
    let vs: Vec<Vec<f64>> = (0..3)
        .map(|k| {
            (0..n)
                .map(|i| ((i * (k + 1)) as f64 * 0.37).sin() * 0.05)
                .collect()
        })
        .collect();
    let diag: Vec<f64> = (0..n)
        .map(|i| 1.0 + (i as f64 * 0.013).sin().abs() * 40.0)
        .collect();
    let apply_b = diag_plus_low_rank(&diag, &vs);
    let whole = |v: &[f64], o: &mut [f64]| {
        apply_b(v, o);
        o.iter_mut().zip(v).for_each(|(o, v)| *o += v);
    };
    let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.21).cos() + 0.1).collect();
    let start: Vec<f64> = (0..n).map(|i| 1e-3 * (i % 7) as f64).collect();
    // the 12 patches of nside_dec 1 own interleaved ranges after a replicated head; the
    // second layout leaves entry n - 1 out of every range (the fused pass must fall back)
    let layout = |cover: usize| {
        let patch = (0..12)
            .map(|q| {
                let (a, b) = (100 + q * 800, 100 + 9600 + q * 800);
                vec![a..a + 800, b..(b + 800).min(cover)]
            })
            .collect();
        VecLayout {
            decomp: std::sync::Arc::new(Decomp::single(1)),
            rep: vec![0..100, 19_300..cover.max(19_300)],
            patch,
            len: n,
        }
    };
    let (full, holed) = (layout(n), layout(n - 1));
    let spaces: [&dyn Space; 3] = [&Serial, &full, &holed];
    for space in spaces {
        for s in [
            CgSettings {
                rel_tol: 1e-10,
                max_iter: 40,
                recompute_every: 6,
                ..Default::default()
            },
            CgSettings {
                rel_tol: 1e-14,
                max_iter: 60,
                recompute_every: 0,
                energy_tol: 1e-7,
            },
            CgSettings {
                rel_tol: 1e-3,
                ..Default::default()
            },
        ] {
            let run = |fused: bool, kind: Operator| {
                let mut x = start.clone();
                let (bv, mut xv) = (HostVec::Ref(&b), HostVec::Mut(&mut x));
                let host = Host(space, std::marker::PhantomData);
                let op = |v: &HostVec, o: &mut HostVec| match kind {
                    Operator::Whole => whole(v, o),
                    Operator::IdentityPlus => apply_b(v, o),
                };
                let rep = if fused {
                    solve_op_in(&mut { host }, kind, op, &bv, &mut xv, &s)
                } else {
                    solve_op_in(&mut Unchecked(host), kind, op, &bv, &mut xv, &s)
                };
                (x, rep)
            };
            let (x0, r0) = run(false, Operator::Whole);
            assert!(r0.iterations > 2, "{r0:?}");
            for (fused, kind) in [
                (true, Operator::Whole),
                (false, Operator::IdentityPlus),
                (true, Operator::IdentityPlus),
            ] {
                let (x1, r1) = run(fused, kind);
                assert_eq!(r1, r0, "{fused} {kind:?}");
                assert!(x1.iter().zip(&x0).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}
