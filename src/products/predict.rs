//! Predicted extinction to stars from a finished map (paper Appendix D): for each star, the
//! expectation of the integrated extinction over its parallax-implied distance distribution
//! (the same windows and within-shell convention as the likelihood, `response`), averaged
//! over the map's samples, with its standard deviation split into the part due to the map's
//! uncertainty (spread over samples) and the part due to the star's distance uncertainty.
//!
//! The star sits in its NESTED pixel (no angular interpolation), as in the fit, or, with
//! [`Angular::Interpolated`], sees the column `dust3d query` interpolates. Stars nearer
//! than the map's inner edge get no extinction from the inner map (the likelihood's
//! convention: that bin holds no dust); beyond it the inner map is added.

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::likelihood::response::{inner_columns, star_moments};
use crate::likelihood::windows::Windows;
use crate::products::mapfile::DustMap;
use crate::products::query::{angular_weights, AngularWeights};
use crate::sphere::grid;

/// Per-star predictions, in input order (extinction in the catalog's units).
#[derive(Clone, Debug, Default)]
pub struct Prediction {
    /// Posterior mean of the expected extinction.
    pub mean: Vec<f64>,
    /// Total standard deviation: map and distance parts in quadrature.
    pub std: Vec<f64>,
    /// Standard deviation of the expected extinction over the map's samples (NaN for a map
    /// without samples).
    pub map_std: Vec<f64>,
    /// Standard deviation due to the star's distance uncertainty (sample-averaged variance).
    pub distance_std: Vec<f64>,
}

/// Check the star columns; errors name the row (1-based) and quantity.
fn validate(l: &[f64], b: &[f64], parallax: &[f64], err: &[f64]) -> Result<()> {
    for i in 0..l.len() {
        let row = i + 1;
        if !l[i].is_finite() || !b[i].is_finite() || b[i].abs() > 90.0 {
            bail!(
                "row {row}: (l, b) = ({}, {}) is not a valid sky position",
                l[i],
                b[i]
            );
        }
        if !parallax[i].is_finite() {
            bail!("row {row}: parallax {} is not finite", parallax[i]);
        }
        if !(err[i].is_finite() && err[i] > 0.0) {
            bail!(
                "row {row}: parallax error {} must be finite and > 0",
                err[i]
            );
        }
    }
    Ok(())
}

/// Where a star's column of dust is taken from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Angular {
    /// The star's own NESTED pixel, as the fit sees it.
    #[default]
    Pixel,
    /// The four-pixel ring interpolation of `dust3d query` (and of `dustmaps`).
    Interpolated,
}

impl std::str::FromStr for Angular {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pixel" => Ok(Self::Pixel),
            "interpolated" => Ok(Self::Interpolated),
            _ => bail!("angular must be 'pixel' or 'interpolated', got {s:?}"),
        }
    }
}

/// Predict the extinction to stars at (l, b) deg with parallax ± error (mas), each star in
/// its pixel.
pub fn predict(
    map: &DustMap,
    l_deg: &[f64],
    b_deg: &[f64],
    parallax_mas: &[f64],
    error_mas: &[f64],
) -> Result<Prediction> {
    predict_with(map, l_deg, b_deg, parallax_mas, error_mas, Angular::Pixel)
}

/// [`predict`] with the star's column taken as `angular` says: the interpolated column is
/// the weighted sum of the four pixels' columns, so its integral to any distance is what
/// `dust3d query` returns there.
pub fn predict_with(
    map: &DustMap,
    l_deg: &[f64],
    b_deg: &[f64],
    parallax_mas: &[f64],
    error_mas: &[f64],
    angular: Angular,
) -> Result<Prediction> {
    map.check()?;
    validate(l_deg, b_deg, parallax_mas, error_mas)?;
    let n_star = l_deg.len();
    let win = Windows::with_prior(&map.shells, parallax_mas, error_mas, &map.distance_prior);
    let layer = cdshealpix::nested::get(grid::depth_of_nside(map.nside)?);
    let weights: Vec<AngularWeights> = (0..n_star)
        .map(|i| match angular {
            Angular::Pixel => {
                let p = grid::ang2pix(map.nside, l_deg[i], b_deg[i]) as usize;
                ([p; 4], [1.0, 0.0, 0.0, 0.0])
            }
            Angular::Interpolated => angular_weights(layer, l_deg[i], b_deg[i]),
        })
        .collect();
    // stars that see the same column are evaluated together
    let key = |i: usize| (weights[i].0, weights[i].1.map(f64::to_bits));
    let mut order: Vec<usize> = (0..n_star).collect();
    order.sort_by_key(|&i| key(i));
    let groups: Vec<&[usize]> = order.chunk_by(|&a, &b| key(a) == key(b)).collect();
    let fields: Vec<(&[f64], &[f64])> = if map.samples.is_empty() {
        vec![(&map.mean, &map.inner_mean)]
    } else {
        map.samples
            .iter()
            .zip(&map.inner_samples)
            .map(|(s, i)| (s.as_slice(), i.as_slice()))
            .collect()
    };
    let ns = fields.len() as f64;
    let per_star: Vec<(usize, [f64; 3])> = groups
        .par_iter()
        .flat_map_iter(|stars| {
            let acc = group_sums(map, &fields, &win, weights[stars[0]], stars);
            stars.iter().copied().zip(acc).collect::<Vec<_>>()
        })
        .collect();
    Ok(Prediction::from_sums(
        n_star,
        per_star,
        ns,
        !map.samples.is_empty(),
    ))
}

/// Per star of `stars` (which see the same column: pixels and weights `(pix, wgt)`), the
/// sums over the map's `fields` (ρ and inner map per sample, or the mean) of the predicted
/// mean, its square and the distance variance.
fn group_sums(
    map: &DustMap,
    fields: &[(&[f64], &[f64])],
    win: &Windows,
    (pix, wgt): AngularWeights,
    stars: &[usize],
) -> Vec<[f64; 3]> {
    let widths = map.shells.widths_pc();
    let (npix, nr) = (map.npix(), map.n_r());
    let used: Vec<(usize, f64)> = pix.into_iter().zip(wgt).filter(|w| w.1 != 0.0).collect();
    let (mut rw, mut cum) = (vec![0.0; nr], vec![0.0; nr + 1]);
    let mut acc = vec![[0.0f64; 3]; stars.len()];
    for (rho, inner) in fields {
        for k in 0..nr {
            let col: f64 = used.iter().map(|&(p, w)| w * rho[k * npix + p]).sum();
            rw[k] = col * widths[k];
        }
        inner_columns(&rw, &mut cum);
        let i0: f64 = used.iter().map(|&(p, w)| w * inner[p]).sum();
        for (a, &s) in acc.iter_mut().zip(stars.iter()) {
            let w = win.of(s);
            let (m, v) = star_moments(w, &rw, &cum);
            // the inner map shifts every bin but "nearer than the inner edge"
            let p0 = if w.e0 == 0 { w.prob[0] as f64 } else { 0.0 };
            let m2 = v + m * m + 2.0 * i0 * m + i0 * i0 * (1.0 - p0);
            let mean = m + i0 * (1.0 - p0);
            a[0] += mean;
            a[1] += mean * mean;
            a[2] += (m2 - mean * mean).max(0.0);
        }
    }
    acc
}

impl Prediction {
    /// The prediction of `n_star` stars from each star's sums over `ns` fields ([`group_sums`]);
    /// without samples the map's part of the spread is unknown (NaN) and left out of `std`.
    fn from_sums(
        n_star: usize,
        per_star: Vec<(usize, [f64; 3])>,
        ns: f64,
        has_samples: bool,
    ) -> Self {
        let mut out = Prediction {
            mean: vec![0.0; n_star],
            std: vec![0.0; n_star],
            map_std: vec![0.0; n_star],
            distance_std: vec![0.0; n_star],
        };
        for (i, [s1, s2, v]) in per_star {
            let mean = s1 / ns;
            let map_var = (s2 / ns - mean * mean).max(0.0);
            let dist_var = v / ns;
            out.mean[i] = mean;
            out.distance_std[i] = dist_var.sqrt();
            out.map_std[i] = if has_samples {
                map_var.sqrt()
            } else {
                f64::NAN
            };
            out.std[i] = (dist_var + if has_samples { map_var } else { 0.0 }).sqrt();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sphere::grid::Shells;

    #[test]
    fn precise_parallaxes_recover_the_integral_and_samples_give_the_map_spread() {
        let rho = 1e-3;
        let mut m = DustMap::from_fn(
            2,
            Shells::log_uniform(50.0, 800.0, 40).unwrap(),
            "E",
            |_, _| rho,
        );
        let npix = m.npix();
        m.inner_mean = vec![0.02; npix];
        m.samples = vec![
            m.mean.iter().map(|v| v * 0.5).collect(),
            m.mean.iter().map(|v| v * 1.5).collect(),
        ];
        m.inner_samples = vec![vec![0.01; npix], vec![0.03; npix]];
        // a star at 400 pc with a 0.1 % parallax error
        let p = predict(&m, &[30.0], &[10.0], &[2.5], &[0.0025]).unwrap();
        let want = 0.02 + rho * (400.0 - 50.0);
        assert!(
            (p.mean[0] / want - 1.0).abs() < 2e-3,
            "{} vs {want}",
            p.mean[0]
        );
        // samples at 0.5× and 1.5×: spread is half the mean
        assert!((p.map_std[0] / (0.5 * want) - 1.0).abs() < 5e-3);
        assert!(p.distance_std[0] < 0.01 * want);
        // a 20 % parallax error spreads the extinction by about ρ σ_d
        let p = predict(&m, &[30.0], &[10.0], &[2.5], &[0.5]).unwrap();
        let sd = rho * 400.0 * 0.2;
        assert!(
            p.distance_std[0] > 0.6 * sd && p.distance_std[0] < 1.6 * sd,
            "{}",
            p.distance_std[0]
        );
        assert!(predict(&m, &[30.0], &[100.0], &[2.5], &[0.5]).is_err());
        assert!(predict(&m, &[30.0], &[10.0], &[2.5], &[0.0]).is_err());
    }

    #[test]
    fn interpolated_columns_integrate_to_what_query_returns() {
        // a density varying across the sky and with distance; a star with a precise parallax
        // sees, through the interpolated column, query's integrated extinction at its distance
        let mut m = DustMap::from_fn(
            4,
            Shells::log_uniform(50.0, 800.0, 30).unwrap(),
            "E",
            |r, x| 1e-3 * (1.0 + 0.5 * (3.0 * x[0] / r).sin() + 0.3 * x[2] / r),
        );
        let npix = m.npix();
        m.inner_mean = (0..npix).map(|p| 0.01 * (p % 7) as f64).collect();
        let q = crate::products::query::Interpolator::new(
            &m,
            crate::products::query::Quantity::Integrated,
            crate::products::query::Convention::Native,
            false,
        )
        .unwrap();
        let (l, b) = ([33.3, 201.7, 310.0], [12.5, -47.2, 71.0]);
        let d_pc = [180.0, 420.0, 640.0];
        let plx: Vec<f64> = d_pc.iter().map(|d| 1000.0 / d).collect();
        let err: Vec<f64> = plx.iter().map(|p| 1e-5 * p).collect();
        let p = predict_with(&m, &l, &b, &plx, &err, Angular::Interpolated).unwrap();
        let px = predict(&m, &l, &b, &plx, &err).unwrap();
        for i in 0..3 {
            let want = q.mean(l[i], b[i], d_pc[i]);
            assert!(
                (p.mean[i] / want - 1.0).abs() < 1e-4,
                "{i}: {} vs {want}",
                p.mean[i]
            );
            // away from pixel centres the pixel column differs from the interpolated one
            assert!(
                (px.mean[i] / want - 1.0).abs() > 1e-3,
                "{i}: {} vs {want}",
                px.mean[i]
            );
        }
        // at a pixel centre both conventions agree exactly
        let (lc, bc) = grid::pix2ang(4, 77);
        let a = predict_with(&m, &[lc], &[bc], &[2.0], &[0.3], Angular::Interpolated).unwrap();
        let c = predict(&m, &[lc], &[bc], &[2.0], &[0.3]).unwrap();
        assert!(
            (a.mean[0] - c.mean[0]).abs() <= 1e-8 * c.mean[0],
            "{} vs {}",
            a.mean[0],
            c.mean[0]
        );
    }
}
