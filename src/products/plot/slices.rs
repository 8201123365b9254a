//! Heliocentric Galactic X–Y, X–Z and Y–Z projections: the differential extinction
//! integrated through a slab |normal| ≤ slab around the Sun, on a shared log colour scale.

use anyhow::Result;
use plotters::prelude::*;
use rayon::prelude::*;
use std::path::Path;

use super::{colour, colour_bar, limits, png, OverlayPoint};
use crate::products::mapfile::DustMap;
use crate::products::query::{Convention, Interpolator, Quantity};

/// Options of the slab projections.
#[derive(Clone, Debug)]
pub struct SliceOptions {
    /// Half-width of each panel, pc.
    pub extent_pc: f64,
    /// Half-thickness of the integrated slab, pc.
    pub slab_pc: f64,
    /// Factor from map units to the plotted unit.
    pub factor: f64,
    /// Name of the plotted unit.
    pub unit: String,
    /// Pixels per panel side.
    pub pixels: usize,
    /// Colour-scale range (default: the values' own).
    pub range: Option<(f64, f64)>,
}

/// (horizontal axis, vertical axis, normal axis) of each panel, and axis names.
const PANELS: [(usize, usize, usize); 3] = [(0, 1, 2), (0, 2, 1), (1, 2, 0)];
const AXES: [&str; 3] = ["X", "Y", "Z"];
/// Midpoint samples through the slab.
const SLAB_STEPS: usize = 24;

/// Slab-integrated extinction of one panel, row-major from the top-left, NaN where the slab
/// misses the map entirely.
fn panel(q: &Interpolator, o: &SliceOptions, (h, v, n): (usize, usize, usize)) -> Vec<f64> {
    let np = o.pixels;
    let step = 2.0 * o.slab_pc / SLAB_STEPS as f64;
    (0..np * np)
        .into_par_iter()
        .map(|idx| {
            let (row, col) = (idx / np, idx % np);
            let mut c = [0.0; 3];
            c[h] = -o.extent_pc + (col as f64 + 0.5) / np as f64 * 2.0 * o.extent_pc;
            c[v] = o.extent_pc - (row as f64 + 0.5) / np as f64 * 2.0 * o.extent_pc;
            let (mut acc, mut hit) = (0.0, false);
            for s in 0..SLAB_STEPS {
                c[n] = -o.slab_pc + (s as f64 + 0.5) * step;
                let d = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
                let l = c[1].atan2(c[0]).to_degrees().rem_euclid(360.0);
                let b = if d > 0.0 {
                    (c[2] / d).asin().to_degrees()
                } else {
                    0.0
                };
                let r = q.mean(l, b, d);
                if r.is_finite() {
                    acc += r * step;
                    hit = true;
                }
            }
            if hit {
                acc * o.factor
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// Cartesian position (pc) of Galactic (l, b) deg at distance d pc.
fn cartesian(l: f64, b: f64, d: f64) -> [f64; 3] {
    let u = crate::sphere::grid::lonlat_to_vec(l.to_radians(), b.to_radians());
    [u[0] * d, u[1] * d, u[2] * d]
}

/// Draw the three projections of `map` side by side with a shared colour bar; overlay
/// points with a distance are drawn with their distance error bar along the line of sight.
pub fn slices(
    map: &DustMap,
    o: &SliceOptions,
    overlay: &[OverlayPoint],
    title: &str,
    out: &Path,
) -> Result<()> {
    let q = Interpolator::new(map, Quantity::Differential, Convention::Native, false)?;
    let panels: Vec<Vec<f64>> = PANELS.iter().map(|&p| panel(&q, o, p)).collect();
    let all: Vec<f64> = panels.iter().flatten().copied().collect();
    let (lo, hi) = o.range.unwrap_or_else(|| limits(&all, true));
    let np = o.pixels;
    let e = o.extent_pc;
    png(out, (1500, 680), |root| {
        root.draw(&Text::new(
            title.to_string(),
            (20, 10),
            ("sans-serif", 22).into_font(),
        ))?;
        let (body, bar) = root.margin(40, 0, 0, 0).split_vertically(540);
        for (k, area) in body.split_evenly((1, 3)).iter().enumerate() {
            let (h, v, n) = PANELS[k];
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(55)
                .caption(
                    format!(
                        "{}–{} (|{}| ≤ {:.0} pc)",
                        AXES[h], AXES[v], AXES[n], o.slab_pc
                    ),
                    ("sans-serif", 18),
                )
                .build_cartesian_2d(-e..e, -e..e)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(format!("{} [pc]", AXES[h]))
                .y_desc(format!("{} [pc]", AXES[v]))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .label_style(("sans-serif", 14))
                .draw()?;
            let px = 2.0 * e / np as f64;
            chart.draw_series(panels[k].iter().enumerate().map(|(idx, &val)| {
                let (row, col) = ((idx / np) as f64, (idx % np) as f64);
                let x0 = -e + col * px;
                let y1 = e - row * px;
                let c = if val.is_finite() {
                    colour(val, lo, hi, true)
                } else {
                    RGBColor(200, 200, 200)
                };
                Rectangle::new([(x0, y1 - px), (x0 + px, y1)], c.filled())
            }))?;
            for p in overlay.iter().filter(|p| p.d_pc.is_finite()) {
                let c = cartesian(p.l_deg, p.b_deg, p.d_pc);
                if c[n].abs() > o.slab_pc {
                    continue;
                }
                let de = if p.d_err_pc.is_finite() {
                    p.d_err_pc
                } else {
                    0.0
                };
                let (a, b) = (
                    cartesian(p.l_deg, p.b_deg, p.d_pc - de),
                    cartesian(p.l_deg, p.b_deg, p.d_pc + de),
                );
                chart.draw_series([PathElement::new(
                    vec![(a[h], a[v]), (b[h], b[v])],
                    RED.stroke_width(2),
                )])?;
                chart.draw_series([Circle::new((c[h], c[v]), 4, RED.filled())])?;
            }
            chart.draw_series([Cross::new((0.0, 0.0), 6, WHITE.stroke_width(2))])?;
        }
        colour_bar(
            &bar,
            (400, 10, 700, 18),
            (lo, hi, true),
            &format!("{} through the slab", o.unit),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sphere::grid::Shells;

    #[test]
    fn a_constant_density_integrates_to_its_slab_thickness() {
        let m = DustMap::from_fn(
            4,
            Shells::log_uniform(30.0, 300.0, 30).unwrap(),
            "E",
            |_, _| 2e-3,
        );
        let q = Interpolator::new(&m, Quantity::Differential, Convention::Native, false).unwrap();
        let o = SliceOptions {
            extent_pc: 200.0,
            slab_pc: 20.0,
            factor: 1.0,
            unit: "E".into(),
            pixels: 20,
            range: None,
        };
        let p = panel(&q, &o, PANELS[0]);
        // pixel (row 2, col 2) sits at (−170, 170): |r| < 300 for all of the slab
        let v = p[2 * 20 + 2];
        assert!((v / (2e-3 * 40.0) - 1.0).abs() < 1e-9, "{v}");
        // the centre pixel's slab lies inside the unmapped inner 30 pc: no value
        assert!(p[10 * 20 + 10].is_nan());
    }
}
