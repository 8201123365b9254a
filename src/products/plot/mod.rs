//! Figures (PNG): Mollweide sky maps (integrated extinction, relative uncertainty, star
//! density), heliocentric X–Y / X–Z / Y–Z slab projections, and the 2D comparison histogram.
//! Sky maps are Galactic with l = 0 at the centre, increasing to the left. Text uses an
//! embedded DejaVu Sans, so no system fonts are needed. Files are written atomically.

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::Path;

use crate::products::mapfile::DustMap;

mod hist;
mod sky;
mod slices;

pub use hist::histogram2d;
pub use sky::{sky, sky_values, SkyField};
pub use slices::{slices, SliceOptions};

/// A point drawn over a figure: sky position, optional distance ± error (pc), label.
#[derive(Clone, Debug, PartialEq)]
pub struct OverlayPoint {
    /// Galactic longitude, deg.
    pub l_deg: f64,
    /// Galactic latitude, deg.
    pub b_deg: f64,
    /// Distance, pc (NaN if unknown).
    pub d_pc: f64,
    /// Distance uncertainty, pc (NaN or 0 if none).
    pub d_err_pc: f64,
    /// Text drawn next to the point (may be empty).
    pub label: String,
}

/// Read overlay points from a CSV/FITS table with columns `l`, `b` (deg) and optionally
/// `d`, `d_err` (pc) and `label`/`name`.
pub fn read_overlay(path: &Path) -> Result<Vec<OverlayPoint>> {
    let t = crate::data::table::Table::read(path)?;
    let l = t.f64_column("l")?;
    let b = t.f64_column("b")?;
    let opt = |n: &str| -> Result<Vec<f64>> {
        if t.names.iter().any(|x| x == n) {
            t.f64_column(n)
        } else {
            Ok(vec![f64::NAN; t.rows])
        }
    };
    let (d, de) = (opt("d")?, opt("d_err")?);
    let labels: Vec<String> = match t.names.iter().position(|n| n == "label" || n == "name") {
        Some(j) => match &t.columns[j] {
            crate::data::table::Column::Str(v) => v.clone(),
            _ => vec![String::new(); t.rows],
        },
        None => vec![String::new(); t.rows],
    };
    for i in 0..t.rows {
        if !(l[i].is_finite() && b[i].is_finite() && b[i].abs() <= 90.0) {
            anyhow::bail!(
                "{}: row {}: invalid (l, b) = ({}, {})",
                path.display(),
                i + 1,
                l[i],
                b[i]
            );
        }
    }
    Ok((0..t.rows)
        .map(|i| OverlayPoint {
            l_deg: l[i],
            b_deg: b[i],
            d_pc: d[i],
            d_err_pc: de[i],
            label: labels[i].clone(),
        })
        .collect())
}

/// Map `v` to a colour on a log or linear scale over [lo, hi].
fn colour(v: f64, lo: f64, hi: f64, log: bool) -> RGBColor {
    let t = if log {
        (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln())
    } else {
        (v - lo) / (hi - lo)
    };
    ViridisRGB.get_color(t.clamp(0.0, 1.0) as f32)
}

/// Colour-scale limits of the finite values (positive ones on a log scale, at most 4 decades).
fn limits(vals: &[f64], log: bool) -> (f64, f64) {
    let ok: Vec<f64> = vals
        .iter()
        .copied()
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let hi = ok.iter().copied().fold(f64::MIN, f64::max);
    let lo = ok.iter().copied().fold(f64::MAX, f64::min);
    if ok.is_empty() {
        return (1e-3, 1.0);
    }
    if log {
        let hi = hi.max(1e-30);
        (lo.max(hi * 1e-4).min(hi * 0.999), hi)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

/// A horizontal colour bar with three tick labels and a caption.
fn colour_bar<DB: DrawingBackend<ErrorType: 'static>>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    (x, y, w, h): (i32, i32, i32, i32),
    (lo, hi, log): (f64, f64, bool),
    caption: &str,
) -> Result<()> {
    let at = |t: f64| {
        if log {
            (lo.ln() + t * (hi.ln() - lo.ln())).exp()
        } else {
            lo + t * (hi - lo)
        }
    };
    for i in 0..w {
        let c = colour(at(i as f64 / (w - 1) as f64), lo, hi, log);
        root.draw(&Rectangle::new(
            [(x + i, y), (x + i + 1, y + h)],
            c.filled(),
        ))?;
    }
    let small = ("sans-serif", 16).into_font();
    for t in [0.0, 0.5, 1.0] {
        let px = x + (t * (w - 1) as f64) as i32 - 20;
        root.draw(&Text::new(tick(at(t)), (px, y + h + 4), small.clone()))?;
    }
    let scale = if log { "log scale" } else { "linear scale" };
    root.draw(&Text::new(
        format!("{caption}, {scale}"),
        (x + w / 2 - 4 * caption.len() as i32 - 40, y + h + 24),
        small,
    ))?;
    Ok(())
}

/// Compact tick label.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Draw into a temporary PNG with `draw`, then move it to `out`.
fn png(
    out: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let tmp = crate::base::atomic::temp_path(out).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE)?;
        let r = draw(&root);
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return r;
        }
        root.present()?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // the embedded file is a valid TrueType font; failure would only lose the labels
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Integrated extinction (mean map plus inner map) from the inner edge to `d_pc`, per pixel.
pub fn integrated_to(map: &DustMap, d_pc: f64) -> Vec<f64> {
    let npix = map.npix();
    (0..npix)
        .map(|p| {
            map.inner_mean[p]
                + crate::sphere::grid::integrate_to(&map.shells, |k| map.mean[k * npix + p], d_pc)
        })
        .collect()
}

/// Galactic (l, b) in degrees at Mollweide coordinates (x, y) in [−2√2, 2√2] × [−√2, √2].
fn inverse_mollweide(x: f64, y: f64) -> Option<(f64, f64)> {
    let s2 = std::f64::consts::SQRT_2;
    if (x / (2.0 * s2)).powi(2) + (y / s2).powi(2) > 1.0 {
        return None;
    }
    let theta = (y / s2).asin();
    let lat = ((2.0 * theta + (2.0 * theta).sin()) / std::f64::consts::PI)
        .clamp(-1.0, 1.0)
        .asin();
    let lon = std::f64::consts::PI * x / (2.0 * s2 * theta.cos().max(1e-12));
    Some(((-lon.to_degrees()).rem_euclid(360.0), lat.to_degrees()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_mollweide_centre_and_edges() {
        let (l, b) = inverse_mollweide(0.0, 0.0).unwrap();
        assert!((l - 0.0).abs() < 1e-9 && b.abs() < 1e-9);
        let (_, b) = inverse_mollweide(0.0, std::f64::consts::SQRT_2 * 0.999_999).unwrap();
        assert!(b > 89.0);
        // left of centre is positive longitude
        let (l, _) = inverse_mollweide(-1.0, 0.0).unwrap();
        assert!(l > 0.0 && l < 180.0);
        assert!(inverse_mollweide(2.9, 0.0).is_none());
    }
}
