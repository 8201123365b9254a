//! Figures: a Mollweide sky map of integrated extinction (Galactic, l = 0 at the centre and
//! increasing to the left). Text uses an embedded DejaVu Sans, so no system fonts are needed.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::Path;

use crate::grid;
use crate::mapfile::DustMap;

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
                + crate::simulate::integrate_to(&map.shells, |k| map.mean[k * npix + p], d_pc)
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

/// Draw the integrated extinction of `map` to `d_pc`, times `factor` (e.g. A_V = 2.8 E), as a
/// Mollweide PNG with a logarithmic colour bar.
pub fn sky(
    map: &DustMap,
    d_pc: f64,
    factor: f64,
    unit: &str,
    title: &str,
    out: &Path,
) -> Result<()> {
    register_font();
    let vals: Vec<f64> = integrated_to(map, d_pc)
        .iter()
        .map(|v| v * factor)
        .collect();
    let pos: Vec<f64> = vals
        .iter()
        .copied()
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    let hi = pos.iter().copied().fold(f64::MIN, f64::max).max(1e-30);
    let lo = pos
        .iter()
        .copied()
        .fold(f64::MAX, f64::min)
        .max(hi * 1e-4)
        .min(hi * 0.999);
    let (w, h) = (1000u32, 620u32);
    let (mw, mh, top) = (960u32, 480u32, 50u32);
    let tmp = crate::atomic::temp_path(out).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let s2 = std::f64::consts::SQRT_2;
        let colour = |v: f64| {
            let t = ((v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln())).clamp(0.0, 1.0);
            ViridisRGB.get_color(t as f32)
        };
        for py in 0..mh {
            for px in 0..mw {
                let x = (px as f64 + 0.5) / mw as f64 * 4.0 * s2 - 2.0 * s2;
                let y = s2 - (py as f64 + 0.5) / mh as f64 * 2.0 * s2;
                if let Some((l, b)) = inverse_mollweide(x, y) {
                    let p = grid::ang2pix(map.nside, l, b) as usize;
                    root.draw_pixel((px as i32 + 20, (py + top) as i32), &colour(vals[p]))
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
        }
        let font = ("sans-serif", 22).into_font();
        root.draw(&Text::new(title.to_string(), (20, 12), font.clone()))
            .map_err(|e| anyhow!("{e}"))?;
        // colour bar
        let (bx, by, bw, bh) = (150i32, (top + mh + 25) as i32, 700i32, 18i32);
        for i in 0..bw {
            let t = i as f64 / (bw - 1) as f64;
            let v = (lo.ln() + t * (hi.ln() - lo.ln())).exp();
            root.draw(&Rectangle::new(
                [(bx + i, by), (bx + i + 1, by + bh)],
                colour(v).filled(),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
        let small = ("sans-serif", 16).into_font();
        for (t, v) in [(0.0, lo), (0.5, (lo * hi).sqrt()), (1.0, hi)] {
            let x = bx + (t * (bw - 1) as f64) as i32 - 20;
            root.draw(&Text::new(
                format!("{v:.3}"),
                (x, by + bh + 4),
                small.clone(),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
        root.draw(&Text::new(
            format!("{unit}, log scale"),
            (bx + bw / 2 - 60, by + bh + 24),
            small.clone(),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        root.draw(&Text::new(
            "l = 0 at centre, increasing to the left; Galactic".to_string(),
            (20, (top + mh + 5) as i32 - 20),
            small,
        ))
        .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
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
