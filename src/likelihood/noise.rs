//! A star's likelihood with its error inflation n_σ integrated out (`noise.marginalise_nsigma`):
//! `L(A | ā, w) = ∫ N(A; ā, w + n² σ_A²) p(n) dn`, w = σ_a² the distance part of the
//! variance, p the InvGamma prior of n_σ. A point estimate of n_σ per star (the default)
//! absorbs the map's own uncertainty at the star (its optimum is v ≈ (A − ā)² + Var(ā), where
//! the marginal's is v ≈ (A − ā)² − Var(ā)); the marginal has no per-star parameter.
//!
//! The integral runs over the standard-normal latent ξ of n = InvGamma(ξ) by the trapezoid
//! rule on a uniform grid (spectrally accurate for a Gaussian weight and an integrand analytic
//! in ξ); its far nodes reach n ~ 1e4, so a star hundreds of σ_A off is still an outlier the
//! model explains. The MGVI metric uses the marginal's Fisher information in (ā, w), which by
//! scale invariance depends only on q = w / σ_A²: `F_āā = f_a(q) / σ_A²`, `F_ww = f_w(q) / σ_A⁴`
//! and `F_āw = 0` (the energy is even in A − ā); f_a, f_w are tabulated in ln q once per model.

use rayon::prelude::*;

use crate::sphere::transforms::InvGamma;

/// Latent nodes ξ_j = −XI_MAX + j · XI_STEP.
const XI_MAX: f64 = 8.0;
const XI_STEP: f64 = 0.25;
/// Fisher table: ln q from Q_LN_MIN in steps of 1 / Q_PER_UNIT, Q_N entries.
const Q_LN_MIN: f64 = -16.0;
const Q_PER_UNIT: f64 = 4.0;
const Q_N: usize = 129;

/// The n_σ-marginal likelihood of one star, and its Fisher information.
#[derive(Clone, Debug)]
pub struct MarginalNsigma {
    /// n_j² at the quadrature nodes.
    n2: Vec<f64>,
    /// ln of the normalised quadrature weights.
    ln_w: Vec<f64>,
    /// (ln f_a, ln f_w) at ln q = Q_LN_MIN + k / Q_PER_UNIT.
    table: Vec<[f64; 2]>,
}

impl MarginalNsigma {
    /// The rule for prior `prior` of n_σ, with its Fisher table.
    pub fn new(prior: &InvGamma) -> Self {
        let n_nodes = (2.0 * XI_MAX / XI_STEP).round() as usize + 1;
        let xi: Vec<f64> = (0..n_nodes).map(|j| -XI_MAX + j as f64 * XI_STEP).collect();
        let phi: Vec<f64> = xi.iter().map(|x| (-0.5 * x * x).exp()).collect();
        let total: f64 = phi.iter().sum();
        let mut rule = Self {
            n2: xi.iter().map(|&x| prior.value(x).powi(2)).collect(),
            ln_w: phi.iter().map(|p| (p / total).ln()).collect(),
            table: Vec::new(),
        };
        rule.table = (0..Q_N)
            .into_par_iter()
            .map(|k| {
                let q = (Q_LN_MIN + k as f64 / Q_PER_UNIT).exp();
                let [fa, fw] = rule.fisher_exact(q);
                [fa.ln(), fw.ln()]
            })
            .collect();
        rule
    }

    /// Energy −ln L (without ½ ln 2π) and its partials (∂/∂ā, ∂/∂w) for residual
    /// `r` = A − ā, distance variance `w` ≥ 0 and measurement variance `s2` = σ_A² > 0.
    ///
    /// ```
    /// use dust3d::likelihood::noise::MarginalNsigma;
    /// use dust3d::sphere::transforms::InvGamma;
    /// let m = MarginalNsigma::new(&InvGamma::new(3.0, 4.0));
    /// let (e0, ca, _) = m.energy(0.0, 0.01, 1.0);
    /// let (e5, ca5, _) = m.energy(5.0, 0.01, 1.0);
    /// assert!(e5 > e0 && ca == 0.0 && ca5 < 0.0);
    /// // a far outlier costs little more than a near one: n_σ explains it
    /// let (e50, _, _) = m.energy(50.0, 0.01, 1.0);
    /// assert!(e50 - e5 < 10.0);
    /// ```
    pub fn energy(&self, r: f64, w: f64, s2: f64) -> (f64, f64, f64) {
        let mut top = f64::NEG_INFINITY;
        let (mut l, mut var) = ([0.0f64; 80], [0.0f64; 80]);
        let n = self.n2.len();
        debug_assert!(n <= l.len());
        for j in 0..n {
            let v = w + self.n2[j] * s2;
            var[j] = v;
            l[j] = self.ln_w[j] - 0.5 * r * r / v - 0.5 * v.ln();
            top = top.max(l[j]);
        }
        let (mut z, mut ga, mut gw) = (0.0, 0.0, 0.0);
        for j in 0..n {
            let v = var[j];
            let p = (l[j] - top).exp();
            z += p;
            ga -= p * r / v;
            gw += p * (0.5 / v - 0.5 * r * r / (v * v));
        }
        (-(top + z.ln()), ga / z, gw / z)
    }

    /// Fisher information (F_āā, F_ww) of the marginal at distance variance `w`, measurement
    /// variance `s2`, from the table (linear in ln q; beyond it the limits: constant below,
    /// the Gaussian's 1/q and 1/(2q²) scaling above).
    pub fn fisher(&self, w: f64, s2: f64) -> (f64, f64) {
        let q = (w / s2).max(0.0);
        let u = ((q.ln() - Q_LN_MIN) * Q_PER_UNIT).max(0.0);
        let last = (Q_N - 1) as f64;
        let [fa, fw] = if u >= last {
            let [a, b] = self.table[Q_N - 1];
            let qmax = (Q_LN_MIN + last / Q_PER_UNIT).exp();
            [a.exp() * qmax / q, b.exp() * (qmax / q).powi(2)]
        } else {
            let k = u as usize;
            let t = u - k as f64;
            let (a, b) = (self.table[k], self.table[k + 1]);
            [
                ((1.0 - t) * a[0] + t * b[0]).exp(),
                ((1.0 - t) * a[1] + t * b[1]).exp(),
            ]
        };
        (fa / s2, fw / (s2 * s2))
    }

    /// f_a(q), f_w(q) with σ_A = 1: the expectation of the squared partials over the
    /// marginal's own distribution of r (a mixture of N(0, q + n_j²) whose widths span many
    /// decades), by the trapezoid rule in ln |r| from 1e-4 of the narrowest component's width
    /// to 12 widths of the widest.
    fn fisher_exact(&self, q: f64) -> [f64; 2] {
        let v: Vec<f64> = self.n2.iter().map(|n2| q + n2).collect();
        let w: Vec<f64> = self.ln_w.iter().map(|l| l.exp()).collect();
        let lo = (1e-4 * v.iter().cloned().fold(f64::INFINITY, f64::min).sqrt()).ln();
        let hi = (12.0 * v.iter().cloned().fold(0.0, f64::max).sqrt()).ln();
        let h = 0.02;
        let steps = ((hi - lo) / h).ceil() as usize;
        let (mut fa, mut fw, mut mass) = (0.0, 0.0, 0.0);
        for i in 0..=steps {
            let r = (lo + i as f64 * h).exp();
            let dens: f64 = w
                .iter()
                .zip(&v)
                .map(|(wj, vj)| {
                    wj * (-0.5 * r * r / vj).exp() / (std::f64::consts::TAU * vj).sqrt()
                })
                .sum();
            // both signs of r, trapezoid end weights halved; dr = r d ln r
            let g = 2.0 * dens * r * h * if i == 0 || i == steps { 0.5 } else { 1.0 };
            let (_, ca, cw) = self.energy(r, q, 1.0);
            fa += g * ca * ca;
            fw += g * cw * cw;
            mass += g;
        }
        debug_assert!((mass - 1.0).abs() < 1e-3, "mixture mass {mass}");
        [fa / mass, fw / mass]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> MarginalNsigma {
        MarginalNsigma::new(&InvGamma::new(3.0, 4.0))
    }

    #[test]
    fn energy_matches_a_fine_integral_over_n_and_its_partials_their_differences() {
        let m = rule();
        let prior = InvGamma::new(3.0, 4.0);
        for &(r, w, s2) in &[
            (0.0, 0.0, 1.0),
            (0.3, 0.05, 0.04),
            (-2.0, 1.0, 0.5),
            (12.0, 0.2, 1.0),
            (300.0, 0.01, 1.0),
        ] {
            // brute force: trapezoid in ξ with step 0.005 over ±10
            let (mut num, mut den) = (0.0, 0.0);
            for i in -2000..=2000 {
                let x = i as f64 * 0.005;
                let g = (-0.5 * x * x).exp();
                let v = w + prior.value(x).powi(2) * s2;
                num += g * (-0.5 * r * r / v).exp() / v.sqrt();
                den += g;
            }
            let want = -(num / den).ln();
            let (e, ca, cw) = m.energy(r, w, s2);
            assert!(
                (e - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{r} {w}: {e} vs {want}"
            );
            let h = 1e-5 * (1.0 + r.abs());
            let fd_a = (m.energy(r - h, w, s2).0 - m.energy(r + h, w, s2).0) / (2.0 * h);
            let hw = 1e-6 * (1.0 + w);
            let fd_w = (m.energy(r, w + hw, s2).0 - m.energy(r, (w - hw).max(0.0), s2).0)
                / (w + hw - (w - hw).max(0.0));
            assert!(
                (ca - fd_a).abs() < 1e-6 * (1.0 + ca.abs()),
                "∂ā {ca} vs {fd_a}"
            );
            assert!(
                (cw - fd_w).abs() < 1e-5 * (1.0 + cw.abs()),
                "∂w {cw} vs {fd_w}"
            );
        }
    }

    #[test]
    fn fisher_is_the_variance_of_the_score_under_the_marginal() {
        // Monte Carlo with a fixed seed: draw n from the prior and A from N(ā, w + n² s2),
        // average the squared partials; 40,000 draws, 5 standard errors
        use rand::Rng;
        use rand_distr::StandardNormal;
        let m = rule();
        let prior = InvGamma::new(3.0, 4.0);
        let mut rng = crate::base::rng::stream(7, 41);
        for &(w, s2) in &[(0.01, 1.0), (0.5, 0.25), (30.0, 1.0)] {
            let n = 40_000;
            let (mut sa, mut sa2, mut sw, mut sw2) = (0.0, 0.0, 0.0, 0.0);
            for _ in 0..n {
                let x: f64 = rng.sample(StandardNormal);
                let z: f64 = rng.sample(StandardNormal);
                let r = z * (w + prior.value(x).powi(2) * s2).sqrt();
                let (_, ca, cw) = m.energy(r, w, s2);
                (sa, sa2) = (sa + ca * ca, sa2 + ca.powi(4));
                (sw, sw2) = (sw + cw * cw, sw2 + cw.powi(4));
            }
            let nf = n as f64;
            let (fa, fw) = m.fisher(w, s2);
            let (ma, mw) = (sa / nf, sw / nf);
            let (ea, ew) = (
                ((sa2 / nf - ma * ma) / nf).sqrt(),
                ((sw2 / nf - mw * mw) / nf).sqrt(),
            );
            assert!(
                (fa - ma).abs() < 5.0 * ea + 0.01 * ma,
                "w {w}: F_aa {fa} vs {ma} ± {ea}"
            );
            assert!(
                (fw - mw).abs() < 5.0 * ew + 0.01 * mw,
                "w {w}: F_ww {fw} vs {mw} ± {ew}"
            );
            // less informative than the plain Gaussian at n_σ = 1
            assert!(fa < 1.0 / (w + s2));
        }
    }
}
