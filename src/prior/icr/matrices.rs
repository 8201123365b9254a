//! Refinement matrices of one ICR site: `R = K_fc K_cc⁻¹` (8×27) and `√D` (8×8, lower
//! Cholesky factor of `D = K_ff − K_fc K_cc⁻¹ K_cf`), computed in f64 with faer.

use anyhow::{bail, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use crate::sphere::covariance::Kernel;

/// Values stored per site: Rᵀ (27×8: `[k * 8 + o] = R[o][k]`) then √Dᵀ (8×8:
/// `[216 + q * 8 + o] = √D[o][q]`), so that the 8 outputs of a site are one SIMD-friendly
/// contiguous row per input.
pub const SITE_LEN: usize = 8 * 27 + 64;

/// Lower Cholesky factor of a symmetric positive-definite matrix (row-major, n×n); adds
/// growing jitter (relative 1e-12 … 1e-8 of the mean diagonal) only if the plain factorisation
/// fails, and reports failure beyond that.
pub fn cholesky_lower(a: &Mat<f64>) -> Result<Mat<f64>> {
    let n = a.nrows();
    let mean_diag = (0..n).map(|i| a[(i, i)]).sum::<f64>() / n as f64;
    for jitter in [0.0, 1e-12, 1e-10, 1e-8] {
        let mut m = a.clone();
        for i in 0..n {
            m[(i, i)] += jitter * mean_diag;
        }
        if let Ok(llt) = m.llt(Side::Lower) {
            return Ok(llt.L().to_owned());
        }
    }
    bail!("covariance matrix ({n}×{n}) is not positive definite")
}

/// Refinement matrices of one site from the 35 positions' pairwise kernel values.
///
/// `coarse_r[dj]` are the radii (pc) of the 3 coarse shells, `fine_r[t]` of the 2 fine
/// shells, `gram` the 13×13 Gram matrix (9 window directions, then 4 children).
pub fn site_matrices(
    kernel: &dyn Kernel,
    gram: &[f64; 169],
    coarse_r: [f64; 3],
    fine_r: [f64; 2],
    out: &mut [f64],
) -> Result<()> {
    // position list: coarse (a, dj) → a*3+dj with direction a; fine (c, t) → 27 + c*2 + t
    let mut dir = [0usize; 35];
    let mut rad = [0.0; 35];
    for a in 0..9 {
        for dj in 0..3 {
            dir[a * 3 + dj] = a;
            rad[a * 3 + dj] = coarse_r[dj];
        }
    }
    for c in 0..4 {
        for t in 0..2 {
            dir[27 + c * 2 + t] = 9 + c;
            rad[27 + c * 2 + t] = fine_r[t];
        }
    }
    let k = |i: usize, j: usize| {
        let g = gram[dir[i] * 13 + dir[j]];
        let d2 = rad[i] * rad[i] + rad[j] * rad[j] - 2.0 * rad[i] * rad[j] * g;
        kernel.cov(d2.max(0.0).sqrt())
    };
    let kcc = Mat::from_fn(27, 27, k);
    let kcf = Mat::from_fn(27, 8, |i, j| k(i, 27 + j));
    let kff = Mat::from_fn(8, 8, |i, j| k(27 + i, 27 + j));
    let llt = match kcc.llt(Side::Lower) {
        Ok(l) => l,
        Err(_) => bail!("coarse covariance K_cc of a refinement site is not positive definite"),
    };
    // X = K_cc⁻¹ K_cf (27×8), R = Xᵀ
    let x = llt.solve(&kcf);
    let d = &kff - kcf.transpose() * &x;
    let d = Mat::from_fn(8, 8, |i, j| 0.5 * (d[(i, j)] + d[(j, i)]));
    let sqrt_d = cholesky_lower(&d)?;
    for o in 0..8 {
        for c in 0..27 {
            out[c * 8 + o] = x[(c, o)];
        }
        for q in 0..8 {
            out[216 + q * 8 + o] = sqrt_d[(o, q)];
        }
    }
    Ok(())
}
