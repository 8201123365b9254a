//! The comparison figure (paper Fig. 10): a log–log 2D histogram with quantile curves and
//! the bisector.

use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

use super::{colour, colour_bar, png};

/// Quantile curve: (bin centre, 16 %, 50 %, 84 %).
pub type Curve = Vec<(f64, f64, f64, f64)>;

/// Draw `counts` ([x bin][y bin], `bins`² log bins over [lo, hi] on both axes) with the
/// quantile curves of y in bins of x (orange) and of x in bins of y (blue), and y = x (red).
#[allow(clippy::too_many_arguments)]
pub fn histogram2d(
    counts: &[u64],
    bins: usize,
    (lo, hi): (f64, f64),
    y_given_x: &Curve,
    x_given_y: &Curve,
    (xlabel, ylabel): (&str, &str),
    title: &str,
    out: &Path,
) -> Result<()> {
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let edge = |i: usize| (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / bins as f64).exp();
    png(out, (760, 820), |root| {
        let (top, bar) = root.split_vertically(730);
        let mut chart = ChartBuilder::on(&top)
            .margin(20)
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(xlabel)
            .y_desc(ylabel)
            .label_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series((0..bins * bins).filter(|&k| counts[k] > 0).map(|k| {
            let (i, j) = (k / bins, k % bins);
            let c = colour(counts[k] as f64, 1.0, max, true);
            Rectangle::new([(edge(i), edge(j)), (edge(i + 1), edge(j + 1))], c.filled())
        }))?;
        chart.draw_series([PathElement::new(
            vec![(lo, lo), (hi, hi)],
            RED.stroke_width(2),
        )])?;
        let orange = RGBColor(255, 140, 0);
        for q in 1..4 {
            let pick = |r: &(f64, f64, f64, f64)| [r.1, r.2, r.3][q - 1];
            chart.draw_series([PathElement::new(
                y_given_x.iter().map(|r| (r.0, pick(r))).collect::<Vec<_>>(),
                orange.stroke_width(2),
            )])?;
            chart.draw_series([PathElement::new(
                x_given_y.iter().map(|r| (pick(r), r.0)).collect::<Vec<_>>(),
                BLUE.stroke_width(2),
            )])?;
        }
        colour_bar(&bar, (120, 20, 520, 18), (1.0, max, true), "points per bin")
    })
}
