//! From a configuration to the operators it describes: this rank's ICR prior and the model
//! with the backend `[backend]` asks for. Shared by `fit`, `plan`, `bench` and the examples.

use anyhow::Result;
use std::sync::Arc;

use super::config::{BackendKind, Config};
use crate::data::catalog::PixelCatalog;
use crate::likelihood::model::Model;
use crate::prior::icr::Icr;
use crate::sphere::decomp::Decomp;

/// This rank's ICR operator for the chart, kernel and matrix precision of `cfg`, its
/// variance corrected to the kernel's unless `grid.variance_correction = false`
/// (collective over ranks).
pub fn icr(cfg: &Config, decomp: Decomp) -> Result<Icr> {
    let kernel = cfg.kernel.build()?;
    let mut icr = Icr::distributed(
        &cfg.chart()?,
        kernel.as_ref(),
        cfg.grid.matrix_precision,
        Arc::new(decomp),
    )?;
    if cfg.grid.variance_correction {
        let t = std::time::Instant::now();
        let k0 = kernel.cov(0.0);
        let c = icr.correct_variance(k0, &cfg.grid.variance_params());
        let kept = &c.before.mean[cfg.grid.padding..c.before.mean.len() - cfg.grid.padding];
        let (lo, hi) = kept.iter().fold((f64::INFINITY, 0.0f64), |(a, b), v| {
            (a.min(v / k0), b.max(v / k0))
        });
        let worst = (cfg.grid.padding..c.before.mean.len() - cfg.grid.padding)
            .map(|k| c.before.std_err[k] / c.before.mean[k])
            .fold(0.0, f64::max);
        tracing::info!(
            "ICR variance corrected to the kernel's: uncorrected {lo:.3}–{hi:.3} of k(0) over the \
             kept shells ({} draws, relative standard error ≤ {worst:.3}, {:.1} s)",
            c.before.draws,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(icr)
}

/// The model of `cfg` over `icr` and pixel-sorted stars, on the backend `cfg` names.
pub fn model(cfg: &Config, icr: Arc<Icr>, stars: &PixelCatalog) -> Result<Model> {
    let mut model = Model::new(&cfg.model_params(), icr, stars)?;
    if cfg.backend.kind == BackendKind::Opencl {
        crate::backend::opencl::backend::attach(
            &mut model,
            &cfg.backend.device_spec(),
            cfg.backend.precision,
        )?;
    }
    Ok(model)
}
