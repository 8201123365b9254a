//! `dust3d prior-check`: how well a configuration's ICR chart reproduces its kernel's
//! variance, shell by shell (paper §3: ICR's approximation error grows where the chart's
//! spacing is close to the kernel length).

use anyhow::{bail, Result};
use std::fmt::Write;

use crate::app::config::Config;
use crate::prior::icr::Icr;
use crate::sphere::decomp::Decomp;

/// The table: per kept shell its radius, the ICR variance of s over the kernel's k(0) with
/// its standard error, then the range and the shells more than 10 % off.
pub fn run(cfg: &Config, draws: usize) -> Result<String> {
    if draws < 2 {
        bail!("--draws must be ≥ 2, got {draws}");
    }
    let chart = cfg.chart()?;
    let kernel = cfg.kernel.build()?;
    let icr = Icr::distributed(
        &chart,
        kernel.as_ref(),
        cfg.grid.matrix_precision,
        std::sync::Arc::new(Decomp::single(chart.nside_final())),
    )?;
    let v = icr.variance_by_shell(draws, cfg.seed);
    let k0 = kernel.cov(0.0);
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
    let _ = writeln!(s, "  radius_pc   var/k(0)   std_err");
    let mut off = Vec::new();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for i in kept.clone() {
        let (r, e) = (v.mean[i] / k0, v.std_err[i] / k0);
        let _ = writeln!(s, "  {:9.1}   {r:8.3}   {e:7.3}", radii[i]);
        (lo, hi) = (lo.min(r), hi.max(r));
        if (r - 1.0).abs() > 0.1 + 2.0 * e {
            off.push(radii[i]);
        }
    }
    let _ = writeln!(
        s,
        "range over the kept shells: {lo:.3} – {hi:.3}; {} of {} shells more than 10 % off \
         (beyond 2 standard errors){}",
        off.len(),
        kept.len(),
        match (off.first(), off.last()) {
            (Some(a), Some(b)) => format!(", between {a:.0} and {b:.0} pc"),
            _ => String::new(),
        }
    );
    Ok(s)
}
