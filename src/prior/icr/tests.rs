use super::*;
use crate::sphere::covariance::{Matern, Nu};
use rand::Rng;
use rand_distr::StandardNormal;

fn gauss(n: usize, seed: u64) -> Vec<f64> {
    let mut r = crate::base::rng::stream(seed, 99);
    (0..n).map(|_| r.sample(StandardNormal)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

const K: Matern = Matern {
    nu: Nu::ThreeHalves,
    std: 1.5,
    length_pc: 30.0,
};

#[test]
fn adjoint_dot_product_every_level() {
    // four level-0 shells too: columns shorter than the kernels' prefetch distances
    for (levels, n_r0) in (0..=3).map(|l| (l, 8)).chain([(1, 4), (2, 4)]) {
        let chart = Chart::new(1, n_r0, levels, 1, 40.0, 600.0).unwrap();
        for (prec, correct) in [
            (Precision::F64, false),
            (Precision::F32, false),
            (Precision::F64, true),
        ] {
            let mut icr = Icr::new(&chart, &K, prec).unwrap();
            if correct {
                let p = variance::VarianceParams {
                    rel_tol: 1.0,
                    max_draws: 16,
                };
                icr.correct_variance(K.cov(0.0), &p);
            }
            let mut w = icr.workspace();
            let x = gauss(icr.n_xi(), 1 + levels as u64);
            let y = gauss(icr.n_field(), 100 + levels as u64);
            icr.forward(&x, &mut w);
            let sx = w.fields[levels].clone();
            let mut sty = vec![0.0; icr.n_xi()];
            icr.adjoint(&y, &mut sty, &mut w);
            let (a, b) = (dot(&sx, &y), dot(&x, &sty));
            let rel = (a - b).abs() / (a.abs() + b.abs());
            assert!(
                rel < 1e-12,
                "levels {levels} {prec:?} corrected {correct}: <Sx,y> {a} vs <x,S^T y> {b}"
            );
        }
    }
}

#[test]
fn single_level_adjoint_is_exact_transpose() {
    // column-by-column check of one refinement against its transpose on a tiny chart
    let chart = Chart::new(1, 5, 1, 1, 50.0, 300.0).unwrap();
    let icr = Icr::new(&chart, &K, Precision::F64).unwrap();
    let mut w = icr.workspace();
    let n = icr.n_xi();
    let m = icr.n_field();
    let mut dense = vec![0.0; n * m];
    let mut e = vec![0.0; n];
    for i in 0..n {
        e[i] = 1.0;
        icr.forward(&e, &mut w);
        for (j, v) in w.fields[1].iter().enumerate() {
            dense[j * n + i] = *v;
        }
        e[i] = 0.0;
    }
    let mut f = vec![0.0; m];
    let mut xb = vec![0.0; n];
    for j in (0..m).step_by(7) {
        f[j] = 1.0;
        icr.adjoint(&f, &mut xb, &mut w);
        for i in 0..n {
            assert!((xb[i] - dense[j * n + i]).abs() < 1e-14);
        }
        f[j] = 0.0;
    }
}

#[test]
fn every_site_has_positive_definite_coarse_covariance() {
    // Icr::new factorises K_cc of every (class, radial) site and fails otherwise; a chart
    // reaching nside 16 covers all base-pixel corner configurations several times.
    let chart = Chart::new(1, 6, 4, 2, 40.0, 2000.0).unwrap();
    let icr = Icr::new(&chart, &K, Precision::F64).unwrap();
    assert_eq!(icr.levels.len(), 4);
    assert!(icr.matrix_bytes() > 0);
}

/// Empirical covariance of prior draws, binned by separation, against the kernel.
#[test]
fn prior_draws_reproduce_the_kernel() {
    // a chart that resolves the kernel at every level (spacing ≲ length): there ICR's
    // approximation error is small; at marginal resolution it grows (see README)
    let k = Matern {
        nu: Nu::ThreeHalves,
        std: 1.5,
        length_pc: 100.0,
    };
    let chart = Chart::new(4, 20, 2, 2, 100.0, 300.0).unwrap();
    let icr = Icr::new(&chart, &k, Precision::F64).unwrap();
    let lvl = chart.levels;
    let nside = chart.nside(lvl);
    let nr = chart.n_r(lvl);
    let radii = chart.radii_pc(lvl);
    // voxel pairs: a fixed set of reference voxels against all voxels of the grid
    let pos = |idx: usize| {
        let (p, i) = (idx / nr, idx % nr);
        let u = grid::pix2vec(nside, p as u64);
        [radii[i] * u[0], radii[i] * u[1], radii[i] * u[2]]
    };
    let n_field = icr.n_field();
    let refs: Vec<usize> = (0..n_field).filter(|i| i % 997 == 5).collect();
    let bin_w = 20.0;
    let nbins = 10; // 0..200 pc
    let mut pairs: Vec<Vec<(usize, usize)>> = vec![Vec::new(); nbins];
    let mut kern = vec![0.0; nbins];
    for &a in &refs {
        let xa = pos(a);
        for b in (a % 37..n_field).step_by(37) {
            let xb = pos(b);
            let d = (0..3).map(|k| (xa[k] - xb[k]).powi(2)).sum::<f64>().sqrt();
            let bin = (d / bin_w) as usize;
            if bin < nbins && pairs[bin].len() < 3000 {
                pairs[bin].push((a, b));
                kern[bin] += k.cov(d);
            }
        }
        pairs[0].push((a, a));
        kern[0] += k.cov(0.0);
    }
    for b in 0..nbins {
        kern[b] /= pairs[b].len() as f64;
    }
    let n_draws = 2000;
    let mut w = icr.workspace();
    let mut rng = crate::base::rng::stream(2024, 7);
    let mut q = vec![vec![0.0; n_draws]; nbins];
    let mut xi = vec![0.0; icr.n_xi()];
    for d in 0..n_draws {
        xi.iter_mut().for_each(|x| *x = rng.sample(StandardNormal));
        icr.forward(&xi, &mut w);
        let s = &w.fields[lvl];
        for b in 0..nbins {
            q[b][d] =
                pairs[b].iter().map(|&(i, j)| s[i] * s[j]).sum::<f64>() / pairs[b].len() as f64;
        }
    }
    let var0 = k.cov(0.0);
    for b in 0..nbins {
        let mean = q[b].iter().sum::<f64>() / n_draws as f64;
        let sd =
            (q[b].iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n_draws - 1) as f64).sqrt();
        let se = sd / (n_draws as f64).sqrt();
        let err = (mean - kern[b]).abs();
        // ICR approximation error of a few percent of the variance, plus 4 standard errors
        let tol = 0.04 * var0 + 4.0 * se;
        eprintln!(
            "bin {b}: emp {mean:.4} kernel {:.4} err/var {:.4} se/var {:.4}",
            kern[b],
            err / var0,
            se / var0
        );
        assert!(
            err < tol,
            "bin {}-{} pc: empirical {mean} vs kernel {} (tol {tol})",
            b * 20,
            b * 20 + 20,
            kern[b]
        );
    }
}

#[test]
fn a_truncated_operator_is_the_full_one_up_to_its_level() {
    let chart = Chart::new(1, 8, 3, 1, 40.0, 600.0).unwrap();
    let mut full = Icr::new(&chart, &K, Precision::F64).unwrap();
    let p = variance::VarianceParams {
        rel_tol: 1.0,
        max_draws: 16,
    };
    full.correct_variance(K.cov(0.0), &p);
    let x = gauss(full.n_xi(), 5);
    let mut wf = full.workspace();
    full.forward(&x, &mut wf);
    for k in 0..=3 {
        let t = full.truncated(k).unwrap();
        assert_eq!(t.n_xi(), full.n_xi_upto(k));
        assert_eq!(t.chart.nside_final(), chart.nside(k));
        let mut wt = t.workspace();
        t.forward(&x[..t.n_xi()], &mut wt);
        // the same arithmetic on the same values: equal bit for bit
        assert_eq!(wt.fields[k], wf.fields[k][..t.n_field()], "level {k}");
        // and its transpose is exact
        let y = gauss(t.n_field(), 50 + k as u64);
        let a = dot(&wt.fields[k], &y);
        let mut sty = vec![0.0; t.n_xi()];
        t.adjoint(&y, &mut sty, &mut wt);
        let b = dot(&x[..t.n_xi()], &sty);
        assert!(
            (a - b).abs() <= 1e-12 * (a.abs() + b.abs()),
            "level {k}: {a} vs {b}"
        );
    }
}

#[test]
fn the_adjoint_site_products_are_the_same_with_and_without_vector_dots() {
    // a CPU without AVX2 runs the portable dots: the whole level pass must give the same bits
    let chart = Chart::new(1, 8, 2, 1, 40.0, 600.0).unwrap();
    for prec in [Precision::F64, Precision::F32] {
        let icr = Icr::new(&chart, &K, prec).unwrap();
        let level = icr.levels.last().unwrap();
        let fine_bar = gauss(4 * level.npix_c() * level.n_f, 7);
        let run = |vector: bool| {
            let mut xb = vec![0.0; level.n_xi()];
            let mut t = vec![0.0; level.scatter_len()];
            let (m, f) = (&level.mats, &fine_bar);
            let d = site::Portable;
            #[cfg(target_arch = "x86_64")]
            if let (true, Some(v3)) = (vector, pulp::x86::V3::try_new()) {
                let d = site::avx2::Dots(v3);
                match m {
                    Matrices::F64(m) => {
                        kernels::scatter_with(d, level, m, [f], [&mut xb], [&mut t])
                    }
                    Matrices::F32(m) => {
                        kernels::scatter_with(d, level, m, [f], [&mut xb], [&mut t])
                    }
                }
                return (xb, t);
            }
            match m {
                Matrices::F64(m) => kernels::scatter_with(d, level, m, [f], [&mut xb], [&mut t]),
                Matrices::F32(m) => kernels::scatter_with(d, level, m, [f], [&mut xb], [&mut t]),
            }
            (xb, t)
        };
        let (a, b) = (run(true), run(false));
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0), "excitation cotangents ({prec:?})");
        assert_eq!(bits(&a.1), bits(&b.1), "window chunks ({prec:?})");
        assert!(a.0.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn f32_matrices_move_a_prior_draw_by_under_1e_6_of_the_prior_std() {
    // the stated error of `grid.matrix_precision = "f32"` (W1's chart): the matrices'
    // rounding (2⁻²⁴ relative) carried through four refinements, 5e-8 rms and 5e-7 at most
    let chart = Chart::new(2, 12, 4, 2, 40.0, 2000.0).unwrap();
    let (i64, i32) = (
        Icr::new(&chart, &K, Precision::F64).unwrap(),
        Icr::new(&chart, &K, Precision::F32).unwrap(),
    );
    let (mut w64, mut w32) = (i64.workspace(), i32.workspace());
    let x = gauss(i64.n_xi(), 7);
    i64.forward(&x, &mut w64);
    i32.forward(&x, &mut w32);
    let (a, b) = (&w64.fields[4], &w32.fields[4]);
    let worst = a
        .iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max);
    let rms = (a.iter().zip(b).map(|(p, q)| (p - q).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    println!("f32 matrices: field differs by {rms:.2e} rms, {worst:.2e} at most (prior std 1.5)");
    assert!(worst < 1e-6 * K.std && worst > 0.0, "{worst:e}");
}

#[test]
fn a_pair_of_adjoints_has_the_bits_of_each_alone() {
    let chart = Chart::new(2, 8, 2, 1, 40.0, 600.0).unwrap();
    for prec in [Precision::F64, Precision::F32] {
        let icr = Icr::new(&chart, &K, prec).unwrap();
        let (y0, y1) = (gauss(icr.n_field(), 5), gauss(icr.n_field(), 6));
        let (mut a0, mut a1) = (icr.workspace(), icr.workspace());
        let (mut g0, mut g1) = (vec![0.0; icr.n_xi()], vec![0.0; icr.n_xi()]);
        icr.adjoint(&y0, &mut g0, &mut a0);
        icr.adjoint(&y1, &mut g1, &mut a1);
        let (mut b0, mut b1) = (icr.workspace(), icr.workspace());
        let (mut h0, mut h1) = (vec![1.0; icr.n_xi()], vec![1.0; icr.n_xi()]);
        icr.adjoint_pair([&y0, &y1], [&mut h0, &mut h1], [&mut b0, &mut b1]);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&g0), bits(&h0), "adjoint 0 ({prec:?})");
        assert_eq!(bits(&g1), bits(&h1), "adjoint 1 ({prec:?})");
        assert_ne!(bits(&g0), bits(&g1));
    }
}
