//! Stationary isotropic covariance kernels of the log-density, k(|x − y|) with the
//! separation in pc: Matérn ν = 1/2, 3/2, 5/2, and a kernel from a tabulated isotropic
//! power spectrum P(k) via the 3D Hankel transform.

use anyhow::{bail, Context, Result};
use rustfft::{num_complex::Complex, FftPlanner};
use std::path::Path;

/// A stationary isotropic covariance function.
pub trait Kernel: Send + Sync {
    /// Covariance at 3D separation `r_pc` (pc).
    fn cov(&self, r_pc: f64) -> f64;
}

/// Matérn smoothness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nu {
    /// ν = 1/2 (exponential kernel).
    Half,
    /// ν = 3/2.
    ThreeHalves,
    /// ν = 5/2.
    FiveHalves,
}

/// Matérn kernel with standard deviation `std` and length `length_pc`.
#[derive(Clone, Copy, Debug)]
pub struct Matern {
    /// Smoothness.
    pub nu: Nu,
    /// Marginal standard deviation.
    pub std: f64,
    /// Length scale, pc.
    pub length_pc: f64,
}

impl Kernel for Matern {
    fn cov(&self, r_pc: f64) -> f64 {
        let v = self.std * self.std;
        let x = r_pc.abs() / self.length_pc;
        match self.nu {
            Nu::Half => v * (-x).exp(),
            Nu::ThreeHalves => {
                let s = 3f64.sqrt() * x;
                v * (1.0 + s) * (-s).exp()
            }
            Nu::FiveHalves => {
                let s = 5f64.sqrt() * x;
                v * (1.0 + s + s * s / 3.0) * (-s).exp()
            }
        }
    }
}

impl Matern {
    /// The Matérn's 3D power spectrum P(k) (pc³), with C(r) = ∫ d³k/(2π)³ P(k) e^{ik·r}.
    pub fn spectrum(&self, k: f64) -> f64 {
        let (nu, g_ratio) = match self.nu {
            // Γ(ν + 3/2) / Γ(ν)
            Nu::Half => (0.5, 1.0 / std::f64::consts::PI.sqrt()),
            Nu::ThreeHalves => (1.5, 2.0 / (0.5 * std::f64::consts::PI.sqrt())),
            Nu::FiveHalves => (2.5, 6.0 / (0.75 * std::f64::consts::PI.sqrt())),
        };
        let l = self.length_pc;
        let a2 = 2.0 * nu / (l * l);
        self.std * self.std * 8.0 * std::f64::consts::PI.powf(1.5) * g_ratio * (2.0 * nu).powf(nu)
            / l.powf(2.0 * nu)
            * (a2 + k * k).powf(-(nu + 1.5))
    }
}

/// A kernel tabulated on a uniform grid in r, computed from a power spectrum.
#[derive(Clone, Debug)]
pub struct Tabulated {
    dr_pc: f64,
    values: Vec<f64>,
}

impl Kernel for Tabulated {
    fn cov(&self, r_pc: f64) -> f64 {
        // linear interpolation on a grid of spacing π/k_max, finer than the kernel's features
        let x = r_pc.abs() / self.dr_pc;
        let i = x.floor() as usize;
        if i + 1 >= self.values.len() {
            return *self.values.last().unwrap_or(&0.0);
        }
        let t = x - i as f64;
        self.values[i] * (1.0 - t) + self.values[i + 1] * t
    }
}

impl Tabulated {
    /// The kernel of power spectrum `p(k)` (k in 1/pc, P in pc³) for k in (0, k_max]:
    /// C(r) = 1/(2π² r) ∫ P(k) k sin(kr) dk, evaluated for all r_m = m π / k_max at once by
    /// one FFT of length 2n (a discrete sine transform), C(0) = 1/(2π²) ∫ P k² dk.
    pub fn from_spectrum(p: impl Fn(f64) -> f64, k_max: f64, n: usize) -> Self {
        let dk = k_max / n as f64;
        let dr = std::f64::consts::PI / k_max;
        let mut buf: Vec<Complex<f64>> = vec![Complex::new(0.0, 0.0); 2 * n];
        let mut c0 = 0.0;
        for (j, b) in buf.iter_mut().enumerate().take(n).skip(1) {
            let k = j as f64 * dk;
            let f = p(k) * k;
            *b = Complex::new(f, 0.0);
            c0 += f * k;
        }
        FftPlanner::new().plan_fft_forward(2 * n).process(&mut buf);
        let norm = dk / (2.0 * std::f64::consts::PI.powi(2));
        let mut values = Vec::with_capacity(n);
        values.push(c0 * norm);
        for (m, b) in buf.iter().enumerate().take(n).skip(1) {
            // Σ_j f_j sin(π j m / n) = −Im X_m
            values.push(-b.im * norm / (m as f64 * dr));
        }
        Self { dr_pc: dr, values }
    }

    /// Kernel from a two-column text file `k [1/pc]  P(k) [pc³]` (`#` starts a comment);
    /// log-log interpolation inside the table, P(k_min) below it, 0 above it.
    pub fn from_spectrum_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read power spectrum {}", path.display()))?;
        let mut ks = Vec::new();
        let mut ps = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace().map(str::parse::<f64>);
            match (it.next(), it.next()) {
                (Some(Ok(k)), Some(Ok(p))) if k > 0.0 && p > 0.0 => {
                    if ks.last().is_some_and(|&l| k <= l) {
                        bail!("{}: line {}: k must increase", path.display(), i + 1);
                    }
                    ks.push(k);
                    ps.push(p);
                }
                _ => bail!(
                    "{}: line {}: expected two positive numbers 'k P(k)'",
                    path.display(),
                    i + 1
                ),
            }
        }
        if ks.len() < 2 {
            bail!("{}: need at least two (k, P) rows", path.display());
        }
        let (lk, lp): (Vec<f64>, Vec<f64>) =
            ks.iter().zip(&ps).map(|(k, p)| (k.ln(), p.ln())).unzip();
        let k_max = *ks.last().unwrap();
        let interp = move |k: f64| -> f64 {
            if k <= ks[0] {
                return ps[0];
            }
            if k > k_max {
                return 0.0;
            }
            let x = k.ln();
            let i = lk.partition_point(|&v| v <= x).clamp(1, lk.len() - 1);
            let t = (x - lk[i - 1]) / (lk[i] - lk[i - 1]);
            (lp[i - 1] + t * (lp[i] - lp[i - 1])).exp()
        };
        Ok(Self::from_spectrum(interp, k_max, 1 << 16))
    }
}

/// Kernel families.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    /// Matérn ν = 1/2 (exponential).
    Matern12,
    /// Matérn ν = 3/2.
    #[default]
    Matern32,
    /// Matérn ν = 5/2.
    Matern52,
    /// Tabulated power spectrum via the 3D Hankel transform.
    Spectrum,
}

/// What defines the prior covariance of ln ρ.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelParams {
    /// Kernel family.
    pub kind: KernelKind,
    /// Prior standard deviation of the log-density (dimensionless).
    pub std: f64,
    /// Matérn length scale, pc.
    pub length_pc: f64,
    /// For [`KernelKind::Spectrum`]: two-column text file `k [1/pc]  P(k) [pc^3]`.
    pub spectrum_file: Option<std::path::PathBuf>,
}

impl Default for KernelParams {
    /// Matérn-3/2 with std 1.5 and length 30 pc.
    fn default() -> Self {
        Self {
            kind: KernelKind::Matern32,
            std: 1.5,
            length_pc: 30.0,
            spectrum_file: None,
        }
    }
}

/// Build the kernel described by `params`.
pub fn from_params(cfg: &KernelParams) -> Result<Box<dyn Kernel>> {
    let matern = |nu| Matern {
        nu,
        std: cfg.std,
        length_pc: cfg.length_pc,
    };
    Ok(match cfg.kind {
        KernelKind::Matern12 => Box::new(matern(Nu::Half)),
        KernelKind::Matern32 => Box::new(matern(Nu::ThreeHalves)),
        KernelKind::Matern52 => Box::new(matern(Nu::FiveHalves)),
        KernelKind::Spectrum => {
            let f = cfg
                .spectrum_file
                .as_ref()
                .context("a tabulated spectrum kernel needs its spectrum file")?;
            Box::new(Tabulated::from_spectrum_file(f)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matern_limits() {
        for nu in [Nu::Half, Nu::ThreeHalves, Nu::FiveHalves] {
            let k = Matern {
                nu,
                std: 1.5,
                length_pc: 30.0,
            };
            assert!((k.cov(0.0) - 2.25).abs() < 1e-14);
            assert!(k.cov(30.0) < 2.25 && k.cov(300.0) < 1e-3);
        }
    }

    #[test]
    fn hankel_transform_reproduces_matern_from_its_spectrum() {
        for nu in [Nu::ThreeHalves, Nu::FiveHalves] {
            let m = Matern {
                nu,
                std: 1.5,
                length_pc: 30.0,
            };
            let t = Tabulated::from_spectrum(|k| m.spectrum(k), 200.0 / 30.0, 1 << 16);
            for r in [0.0, 0.7, 5.0, 17.3, 30.0, 60.0, 100.0, 200.0] {
                let err = (t.cov(r) - m.cov(r)).abs();
                assert!(
                    err < 2e-3 * m.cov(0.0),
                    "nu {nu:?} r {r}: {} vs {}",
                    t.cov(r),
                    m.cov(r)
                );
            }
        }
    }

    #[test]
    fn spectrum_file_round_trip() {
        let m = Matern {
            nu: Nu::ThreeHalves,
            std: 1.0,
            length_pc: 40.0,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pk.txt");
        let mut text = String::from("# k P(k)\n");
        for i in 0..400 {
            let k = 1e-4 * (1.0f64 + 0.04).powi(i);
            text += &format!("{k} {}\n", m.spectrum(k));
        }
        std::fs::write(&path, text).unwrap();
        let t = Tabulated::from_spectrum_file(&path).unwrap();
        for r in [0.0, 10.0, 40.0, 120.0] {
            assert!(
                (t.cov(r) - m.cov(r)).abs() < 5e-3,
                "r {r}: {} vs {}",
                t.cov(r),
                m.cov(r)
            );
        }
        std::fs::write(&path, "1 2\nx y\n").unwrap();
        let e = Tabulated::from_spectrum_file(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
