//! Mollweide sky maps of per-pixel values.

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use std::path::Path;

use super::{colour, colour_bar, inverse_mollweide, limits, png, OverlayPoint};
use crate::products::mapfile::DustMap;
use crate::products::query::{Convention, Interpolator, Quantity};
use crate::sphere::grid;

/// What a sky map shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkyField {
    /// Integrated extinction (mean) to a distance, log scale.
    Integrated,
    /// Posterior std over mean of the integrated extinction to a distance, linear scale.
    RelativeUncertainty,
    /// Stars per square degree that the fit used, log scale.
    StarDensity,
}

/// Per-pixel values of `field` for `map` at distance `d_pc` (star counts for StarDensity).
pub fn sky_values(
    map: &DustMap,
    field: SkyField,
    d_pc: f64,
    counts: Option<&[u32]>,
) -> Result<Vec<f64>> {
    let npix = map.npix();
    Ok(match field {
        SkyField::Integrated => super::integrated_to(map, d_pc),
        SkyField::RelativeUncertainty => {
            let q = Interpolator::new(
                map,
                Quantity::Integrated,
                Convention::Native,
                !map.samples.is_empty(),
            )?;
            let d = d_pc.min(*map.shells.edges_pc.last().expect("shells"));
            (0..npix)
                .map(|p| {
                    let (l, b) = grid::pix2ang(map.nside, p as u64);
                    Ok(q.std(l, b, d)? / q.mean(l, b, d))
                })
                .collect::<Result<_>>()?
        }
        SkyField::StarDensity => {
            let c = counts.ok_or_else(|| {
                anyhow!("no star counts: the map does not record them; pass --catalog")
            })?;
            if c.len() != npix {
                bail!("star counts have {} pixels, the map {npix}", c.len());
            }
            let area_deg2 =
                4.0 * std::f64::consts::PI * (180.0 / std::f64::consts::PI).powi(2) / npix as f64;
            c.iter().map(|&n| n as f64 / area_deg2).collect()
        }
    })
}

/// Mollweide (x, y) of Galactic (l, b) in degrees, l = 0 at the centre increasing leftwards.
fn mollweide(l_deg: f64, b_deg: f64) -> (f64, f64) {
    let lon = -((l_deg + 180.0).rem_euclid(360.0) - 180.0).to_radians();
    let phi = b_deg.to_radians();
    let target = std::f64::consts::PI * phi.sin();
    let mut t = phi;
    for _ in 0..50 {
        let f = 2.0 * t + (2.0 * t).sin() - target;
        let df = 2.0 + 2.0 * (2.0 * t).cos();
        if df.abs() < 1e-12 {
            break;
        }
        t -= f / df;
    }
    let s2 = std::f64::consts::SQRT_2;
    (
        2.0 * s2 / std::f64::consts::PI * lon * t.cos(),
        s2 * t.sin(),
    )
}

/// Draw per-pixel `vals` (NESTED, nside of their length) as a Mollweide PNG with a colour bar
/// (`log` scale or linear, over `range` or the values' own) and optional overlay points.
pub fn sky(
    vals: &[f64],
    (log, range): (bool, Option<(f64, f64)>),
    unit: &str,
    title: &str,
    overlay: &[OverlayPoint],
    out: &Path,
) -> Result<()> {
    let nside = ((vals.len() / 12) as f64).sqrt().round() as u32;
    grid::depth_of_nside(nside)?;
    let (lo, hi) = range.unwrap_or_else(|| limits(vals, log));
    let (mw, mh, left, top) = (960u32, 480u32, 20i32, 50i32);
    let s2 = std::f64::consts::SQRT_2;
    png(out, (1000, 620), |root| {
        for py in 0..mh {
            for px in 0..mw {
                let x = (px as f64 + 0.5) / mw as f64 * 4.0 * s2 - 2.0 * s2;
                let y = s2 - (py as f64 + 0.5) / mh as f64 * 2.0 * s2;
                if let Some((l, b)) = inverse_mollweide(x, y) {
                    let v = vals[grid::ang2pix(nside, l, b) as usize];
                    let c = if v.is_finite() {
                        colour(v, lo, hi, log)
                    } else {
                        RGBColor(200, 200, 200)
                    };
                    root.draw_pixel((px as i32 + left, py as i32 + top), &c)?;
                }
            }
        }
        let to_px = |l: f64, b: f64| {
            let (x, y) = mollweide(l, b);
            (
                left + ((x + 2.0 * s2) / (4.0 * s2) * mw as f64) as i32,
                top + ((s2 - y) / (2.0 * s2) * mh as f64) as i32,
            )
        };
        graticule(root, &to_px)?;
        let font = ("sans-serif", 14).into_font().color(&RED);
        for p in overlay {
            let c = to_px(p.l_deg, p.b_deg);
            root.draw(&Circle::new(c, 5, RED.stroke_width(2)))?;
            if !p.label.is_empty() {
                root.draw(&Text::new(
                    p.label.clone(),
                    (c.0 + 7, c.1 - 7),
                    font.clone(),
                ))?;
            }
        }
        root.draw(&Text::new(
            title.to_string(),
            (20, 12),
            ("sans-serif", 22).into_font(),
        ))?;
        root.draw(&Text::new(
            "Galactic; l = 0 at centre, increasing to the left".to_string(),
            (20, top + mh as i32 - 15),
            ("sans-serif", 16).into_font(),
        ))?;
        colour_bar(
            root,
            (150, top + mh as i32 + 25, 700, 18),
            (lo, hi, log),
            unit,
        )
    })
}

/// Lines of constant latitude every 30° and longitude every 60°, with longitude labels on
/// the equator.
fn graticule<DB: DrawingBackend<ErrorType: 'static>>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    to_px: &dyn Fn(f64, f64) -> (i32, i32),
) -> Result<()> {
    let grey = RGBColor(255, 255, 255).mix(0.45);
    for b in [-60.0, -30.0, 0.0, 30.0, 60.0] {
        // l runs from just left of the right edge (l = 180 + ε) round to the left edge
        let pts: Vec<(i32, i32)> = (0..=360)
            .map(|i| to_px(180.001 + i as f64 * 0.99999, b))
            .collect();
        root.draw(&PathElement::new(pts, grey))?;
    }
    for l in [0.0, 60.0, 120.0, 240.0, 300.0] {
        let pts: Vec<(i32, i32)> = (0..=180).map(|i| to_px(l, -90.0 + i as f64)).collect();
        root.draw(&PathElement::new(pts, grey))?;
    }
    let font = ("sans-serif", 13).into_font().color(&WHITE);
    for l in [0.0, 60.0, 120.0, 240.0, 300.0] {
        let (x, y) = to_px(l, 0.0);
        root.draw(&Text::new(format!("{l:.0}°"), (x + 3, y + 3), font.clone()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mollweide_inverts() {
        for (l, b) in [(0.0, 0.0), (30.0, 10.0), (300.0, -45.0), (179.0, 80.0)] {
            let (x, y) = mollweide(l, b);
            let (l2, b2) = inverse_mollweide(x, y).unwrap();
            assert!(
                (l2 - l).abs() < 1e-6 && (b2 - b).abs() < 1e-6,
                "{l} {b}: {l2} {b2}"
            );
        }
    }
}
