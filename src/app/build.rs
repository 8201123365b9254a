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
        let c = icr.correct_variance(kernel.cov(0.0), &cfg.grid.variance_params());
        tracing::info!(
            "{} in {:.1} s",
            c.summary(cfg.grid.padding),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(icr)
}

/// The model of `cfg` over `icr` and pixel-sorted stars, on the backend `cfg` names.
pub fn model(cfg: &Config, icr: Arc<Icr>, stars: &PixelCatalog) -> Result<Model> {
    with_params(cfg, &cfg.model_params(), icr, stars)
}

/// The model of schedule stage `stage` (its likelihood settings applied) for `stars`.
pub fn stage_model(
    cfg: &Config,
    stage: usize,
    icr: Arc<Icr>,
    stars: &PixelCatalog,
) -> Result<Model> {
    let params = crate::likelihood::model::ModelParams {
        distance_variance: cfg.inference.stage[stage].distance_variance,
        ..cfg.model_params()
    };
    with_params(cfg, &params, icr, stars)
}

fn with_params(
    cfg: &Config,
    params: &crate::likelihood::model::ModelParams,
    icr: Arc<Icr>,
    stars: &PixelCatalog,
) -> Result<Model> {
    let mut model = Model::new(params, icr, stars)?;
    if cfg.backend.kind == BackendKind::Opencl {
        crate::backend::opencl::backend::attach(
            &mut model,
            &cfg.backend.device_spec(),
            cfg.backend.precision,
        )?;
    }
    Ok(model)
}
