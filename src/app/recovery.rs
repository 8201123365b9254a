//! Recovery of a known truth by a fit (mock skies): correlation of integrated extinction at
//! the stars' true positions, the coverage of truth voxels by mean ± 1σ, and the calibration
//! of the integrated extinction at the true star positions (z-scores of the truth against
//! the posterior mean and std over the samples), in the star's own pixel and through the
//! interpolating query, overall and by extinction level.

use anyhow::{bail, Result};
use std::path::Path;

use crate::app::config::Config;
use crate::data::catalog::read_columns;
use crate::products::mapfile::DustMap;
use crate::products::query::{Convention, Interpolator, Quantity};
use crate::products::validation::{calibrated_coverage, pearson, validate, Predicted, Validation};
use crate::sphere::grid;
use crate::sphere::grid::integrate_to;

/// Recovery metrics.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// Pearson correlation of fitted vs true integrated extinction at the true star positions.
    pub pearson_integrated: f64,
    /// Fraction of constrained truth voxels inside mean ± 1σ.
    pub coverage_1sigma: f64,
    /// Constrained voxels (≥ `min_stars` stars of the pixel lie beyond the voxel).
    pub n_voxels: usize,
    /// Stars used.
    pub n_stars: usize,
    /// Truth of the integrated extinction at the true positions against the posterior in
    /// the star's own pixel (the column the fit saw).
    pub at_stars_pixel: Validation,
    /// The same through `dust3d query` (angular bilinear, radial interpolation).
    pub at_stars_query: Validation,
    /// Antithetic sample pairs of the fitted map.
    pub pairs: usize,
    /// What a calibrated posterior with `pairs` pairs puts inside ±1σ and ±2σ
    /// ([`calibrated_coverage`]): the reference for the coverages above.
    pub calibrated: [f64; 2],
}

/// Stars needed beyond a voxel for it to count as constrained.
pub const MIN_STARS_BEYOND: usize = 5;

/// Compare a fitted map with the truth map of a simulated catalog (with `true_distance_pc`).
pub fn evaluate(fit: &DustMap, truth: &DustMap, catalog: &Path, cfg: &Config) -> Result<Recovery> {
    if fit.nside != truth.nside || fit.shells != truth.shells {
        bail!("fit and truth maps must share nside and shells (fit without a product cut)");
    }
    let c = &cfg.catalog.columns;
    let hdu = cfg.catalog.hdu.as_deref();
    let t = read_columns(catalog, &[&c.l, &c.b, "true_distance_pc"], None, hdu)?;
    let (l, b, d) = (&t.columns[0], &t.columns[1], &t.columns[2]);
    // the simulation's own integral (exact along the ray for off-grid mocks), if written
    let true_a = read_columns(catalog, &["true_extinction"], None, hdu)
        .ok()
        .map(|t| t.columns[0].clone());
    let npix = fit.npix();
    let nr = fit.n_r();
    let mut xs = Vec::with_capacity(d.len());
    let mut ys = Vec::with_capacity(d.len());
    let mut beyond = vec![vec![0usize; nr]; npix];
    for i in 0..d.len() {
        let p = grid::ang2pix(fit.nside, l[i], b[i]) as usize;
        xs.push(fit.inner_mean[p] + integrate_to(&fit.shells, |k| fit.mean[k * npix + p], d[i]));
        ys.push(
            truth.inner_mean[p] + integrate_to(&truth.shells, |k| truth.mean[k * npix + p], d[i]),
        );
        for k in 0..nr {
            if d[i] > fit.shells.edges_pc[k + 1] {
                beyond[p][k] += 1;
            }
        }
    }
    let (mut inside, mut total) = (0usize, 0usize);
    for p in 0..npix {
        for k in 0..nr {
            if beyond[p][k] >= MIN_STARS_BEYOND {
                let j = k * npix + p;
                total += 1;
                if (truth.mean[j] - fit.mean[j]).abs() <= fit.std[j] {
                    inside += 1;
                }
            }
        }
    }
    let truth_at = |i: usize| true_a.as_ref().map_or(ys[i], |a| a[i]);
    let (at_stars_pixel, at_stars_query) = star_calibration(fit, l, b, d, &truth_at)?;
    Ok(Recovery {
        pearson_integrated: pearson(&xs, &ys),
        coverage_1sigma: inside as f64 / total.max(1) as f64,
        n_voxels: total,
        n_stars: xs.len(),
        at_stars_pixel,
        at_stars_query,
        pairs: fit.samples.len() / 2,
        calibrated: calibrated_coverage(fit.samples.len() / 2),
    })
}

/// The truth at every star against the posterior of the integrated extinction there: over
/// the samples in the star's pixel, and through the query interpolator.
fn star_calibration(
    fit: &DustMap,
    l: &[f64],
    b: &[f64],
    d: &[f64],
    truth_at: &dyn Fn(usize) -> f64,
) -> Result<(Validation, Validation)> {
    if fit.samples.is_empty() {
        bail!("the fitted map has no samples: write it with output.samples = true");
    }
    let npix = fit.npix();
    let ns = fit.samples.len() as f64;
    let pixel: Vec<Predicted> = (0..d.len())
        .map(|i| {
            let p = grid::ang2pix(fit.nside, l[i], b[i]) as usize;
            let (mut m1, mut m2) = (0.0, 0.0);
            for (s, inner) in fit.samples.iter().zip(&fit.inner_samples) {
                let v = inner[p] + integrate_to(&fit.shells, |k| s[k * npix + p], d[i]);
                m1 += v / ns;
                m2 += v * v / ns;
            }
            Predicted {
                a_obs: truth_at(i),
                mean: m1,
                var: (m2 - m1 * m1).max(0.0),
            }
        })
        .collect();
    let q = Interpolator::new(fit, Quantity::Integrated, Convention::Native, true)?;
    let query = (0..d.len())
        .map(|i| {
            let s = q.std(l[i], b[i], d[i])?;
            Ok(Predicted {
                a_obs: truth_at(i),
                mean: q.mean(l[i], b[i], d[i]),
                var: s * s,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((validate(&pixel), validate(&query)))
}
