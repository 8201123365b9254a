//! `dust3d prior-check`: how well a configuration's ICR chart reproduces its kernel's
//! variance, shell by shell (paper §3: ICR's approximation error grows where the chart's
//! spacing is close to the kernel length).

use anyhow::{bail, Result};
use std::fmt::Write;

use crate::app::config::Config;
use crate::base::rng::streams::PRIOR_CHECK;
use crate::sphere::decomp::Decomp;

/// The table: per kept shell its radius, the ICR variance of s over the kernel's k(0) with
/// its standard error — uncorrected, then with the variance correction a fit applies
/// (`grid.variance_correction`), measured by independent draws — and the range and the
/// shells more than 10 % off.
pub fn run(cfg: &Config, draws: usize) -> Result<String> {
    if draws < 2 {
        bail!("--draws must be ≥ 2, got {draws}");
    }
    let chart = cfg.chart()?;
    let k0 = cfg.kernel.build()?.cov(0.0);
    let build = |correct: bool| {
        let mut c = cfg.clone();
        c.grid.variance_correction = correct;
        crate::app::build::icr(&c, Decomp::single(cfg.nside_dec()?))
    };
    let raw = build(false)?.variance_by_shell(draws, cfg.seed, PRIOR_CHECK);
    let fixed = cfg
        .grid
        .variance_correction
        .then(|| build(true).map(|i| i.variance_by_shell(draws, cfg.seed, PRIOR_CHECK)))
        .transpose()?;
    let radii = chart.radii_pc(chart.levels);
    let pad = chart.padding;
    let kept = pad..radii.len() - pad;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ICR marginal variance against the kernel's k(0) = {k0:.4}, {draws} prior draws, \
         nside {} x {} kept shells",
        chart.nside_final(),
        kept.len()
    );
    let _ = match fixed {
        Some(_) => writeln!(s, "  radius_pc   var/k(0)   std_err   corrected   std_err"),
        None => writeln!(
            s,
            "  radius_pc   var/k(0)   std_err   (grid.variance_correction = false)"
        ),
    };
    for i in kept.clone() {
        let _ = write!(
            s,
            "  {:9.1}   {:8.3}   {:7.3}",
            radii[i],
            raw.mean[i] / k0,
            raw.std_err[i] / k0
        );
        if let Some(f) = &fixed {
            let _ = write!(s, "   {:9.3}   {:7.3}", f.mean[i] / k0, f.std_err[i] / k0);
        }
        s.push('\n');
    }
    summary(&mut s, "uncorrected", &raw, k0, &radii, kept.clone());
    if let Some(f) = &fixed {
        summary(&mut s, "corrected", f, k0, &radii, kept);
    }
    Ok(s)
}

/// One line: the range of var/k(0) over the kept shells and the shells more than 10 % off
/// beyond 2 standard errors.
fn summary(
    s: &mut String,
    what: &str,
    v: &crate::prior::icr::variance::ShellVariance,
    k0: f64,
    radii: &[f64],
    kept: std::ops::Range<usize>,
) {
    let (lo, hi, _) = v.kept_range(kept.clone(), k0);
    let n = kept.len();
    let off: Vec<f64> = kept
        .filter(|&i| (v.mean[i] / k0 - 1.0).abs() > 0.1 + 2.0 * v.std_err[i] / k0)
        .map(|i| radii[i])
        .collect();
    let _ = writeln!(
        s,
        "{what}: {lo:.3} – {hi:.3} over the kept shells; {} of {n} shells more than 10 % off \
         (beyond 2 standard errors){}",
        off.len(),
        match (off.first(), off.last()) {
            (Some(a), Some(b)) => format!(", between {a:.0} and {b:.0} pc"),
            _ => String::new(),
        }
    );
}
