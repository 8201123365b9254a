//! Map-to-map comparison (paper Fig. 10): integrated extinction of both maps at every pixel
//! centre of a HEALPix sphere (nside 64 by default) at 1 pc steps from the inner radius, as
//! a log–log 2D histogram with the 16/50/84 % quantiles of each map in bins of the other.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::base::atomic::write_atomically;
use crate::products::mapfile::DustMap;
use crate::products::query::{Convention, Interpolator, Quantity};
use crate::sphere::grid;

/// Options of a comparison.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// nside of the test-point sphere.
    pub nside: u32,
    /// Distance step, pc.
    pub step_pc: f64,
    /// Histogram range lower end (map units); the paper truncates at 1 mmag.
    pub min_value: f64,
    /// Log bins per axis.
    pub bins: usize,
    /// Radial convention of both maps' integrals.
    pub convention: Convention,
    /// Most test points (sightlines × distances) evaluated; more is refused before any work.
    pub max_points: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            nside: 64,
            step_pc: 1.0,
            min_value: 1e-3,
            bins: 120,
            convention: Convention::Native,
            max_points: 200_000_000,
        }
    }
}

/// Result of a comparison.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// Test points where both maps have a value.
    pub n_points: usize,
    /// Of those, points inside the histogram range on both axes.
    pub n_in_range: usize,
    /// Distances used: first, last (pc) and count per sightline.
    pub distances_pc: (f64, f64, usize),
    /// Histogram range.
    pub range: (f64, f64),
    /// Counts, [reference bin][map bin].
    pub counts: Vec<u64>,
    /// Median of map / reference over all points with both > 0.
    pub median_ratio: f64,
    /// Pearson correlation of ln values (both > 0).
    pub pearson_log: f64,
}

/// Quantiles (16, 50, 84 %) of the second axis in each bin of the first, from the counts
/// (linear in ln inside a bin); bins with fewer than `min_count` points are left out.
pub fn conditional_quantiles(
    counts: &[u64],
    bins: usize,
    (lo, hi): (f64, f64),
    transpose: bool,
    min_count: u64,
) -> Vec<(f64, f64, f64, f64)> {
    let w = (hi.ln() - lo.ln()) / bins as f64;
    let at = |i: usize, j: usize| {
        if transpose {
            counts[j * bins + i]
        } else {
            counts[i * bins + j]
        }
    };
    let mut out = Vec::new();
    for i in 0..bins {
        let tot: u64 = (0..bins).map(|j| at(i, j)).sum();
        if tot < min_count {
            continue;
        }
        let q = |f: f64| {
            let target = f * tot as f64;
            let mut cum = 0.0;
            for j in 0..bins {
                let c = at(i, j) as f64;
                if cum + c >= target && c > 0.0 {
                    return (lo.ln() + w * (j as f64 + (target - cum) / c)).exp();
                }
                cum += c;
            }
            hi
        };
        let centre = (lo.ln() + w * (i as f64 + 0.5)).exp();
        out.push((centre, q(0.16), q(0.5), q(0.84)));
    }
    out
}

/// Compare `map` against `reference` on the test points.
pub fn compare(map: &DustMap, reference: &DustMap, o: &CompareOptions) -> Result<Comparison> {
    grid::depth_of_nside(o.nside)?;
    if !(o.step_pc > 0.0 && o.min_value > 0.0 && o.bins >= 4) {
        bail!("step and minimum value must be > 0 and bins ≥ 4");
    }
    let qa = Interpolator::new(map, Quantity::Integrated, o.convention, false)?;
    let qb = Interpolator::new(reference, Quantity::Integrated, o.convention, false)?;
    let (d0, d1, nd) = shared_distances(&qa, &qb, o)?;
    let npix = grid::npix(o.nside);
    let hi_guess = (0..npix)
        .map(|p| {
            let (l, b) = grid::pix2ang(o.nside, p as u64);
            qa.mean(l, b, d1).max(qb.mean(l, b, d1))
        })
        .filter(|v| v.is_finite())
        .fold(o.min_value * 10.0, f64::max);
    let (lo, hi) = (o.min_value, hi_guess * 1.05);
    let bins = o.bins;
    let lw = (hi.ln() - lo.ln()) / bins as f64;
    let bin = |v: f64| ((v.ln() - lo.ln()) / lw).floor();
    // a bar on a terminal, ten log lines otherwise
    let pb = crate::base::logging::progress(npix as u64, "compare");
    let done = std::sync::atomic::AtomicUsize::new(0);
    let tick = || {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_multiple_of(256) || n == npix {
            pb.set_position(n as u64);
        }
        if n.is_multiple_of((npix / 10).max(1)) {
            tracing::info!("compare: {n}/{npix} sightlines");
        }
    };
    let t = (0..npix)
        .into_par_iter()
        .fold(
            || Tally::new(bins),
            |mut acc, p| {
                let (l, b) = grid::pix2ang(o.nside, p as u64);
                let (wa, wb) = (qa.angular(l, b), qb.angular(l, b));
                for k in 0..nd {
                    let d = d0 + k as f64 * o.step_pc;
                    let (va, vb) = (qa.mean_at(&wa, d), qb.mean_at(&wb, d));
                    acc.add(va, vb, p % 16 == 0, [bin(vb), bin(va)]);
                }
                tick();
                acc
            },
        )
        .reduce(|| Tally::new(bins), Tally::merge);
    pb.finish_and_clear();
    if t.points == 0 {
        bail!("the maps have no test point where both have a value");
    }
    let Tally {
        counts,
        points,
        mut ratios,
        sums,
        ..
    } = t;
    ratios.sort_by(f64::total_cmp);
    Ok(Comparison {
        n_points: points,
        n_in_range: counts.iter().sum::<u64>() as usize,
        distances_pc: (d0, d0 + (nd - 1) as f64 * o.step_pc, nd),
        range: (lo, hi),
        counts,
        median_ratio: ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN),
        pearson_log: pearson(&sums),
    })
}

/// The distance range both maps cover, `(first, last, count)` of the test distances in pc, or
/// an error when they share none or the test points would exceed `o.max_points`.
fn shared_distances(
    qa: &Interpolator<'_>,
    qb: &Interpolator<'_>,
    o: &CompareOptions,
) -> Result<(f64, f64, usize)> {
    let (a0, a1) = qa.range_pc();
    let (b0, b1) = qb.range_pc();
    let (d0, d1) = (a0.max(b0), a1.min(b1));
    if d1 <= d0 {
        bail!("the maps share no distance range ({a0:.1}–{a1:.1} pc vs {b0:.1}–{b1:.1} pc)");
    }
    let nd_f = ((d1 - d0) / o.step_pc).floor() + 1.0;
    let points = (grid::npix(o.nside) as f64) * nd_f;
    if points > o.max_points as f64 {
        bail!(
            "the comparison has {points:.3e} test points ({} sightlines × {nd_f:.0} distances), \
             more than --max-points {}: use a coarser --nside or --step, or raise --max-points",
            grid::npix(o.nside),
            o.max_points
        );
    }
    let nd = nd_f as usize;
    tracing::info!(
        points,
        sightlines = grid::npix(o.nside),
        distances = nd,
        "comparing"
    );
    Ok((d0, d1, nd))
}

/// One thread's share of the comparison: the 2D histogram of (reference, map) log bins, the
/// test points with both values finite, every 16th sightline's ratios, and the sums
/// `[n, Σx, Σy, Σx², Σy², Σxy]` of the log values (x the reference's).
struct Tally {
    bins: usize,
    counts: Vec<u64>,
    points: usize,
    ratios: Vec<f64>,
    sums: [f64; 6],
}

impl Tally {
    fn new(bins: usize) -> Self {
        Self {
            bins,
            counts: vec![0; bins * bins],
            points: 0,
            ratios: Vec::new(),
            sums: [0.0; 6],
        }
    }

    /// A test point's map value `va` and reference value `vb`, its ratio kept if `sample`,
    /// in histogram bin `[i, j]` (reference, map; out of range when outside `0..bins`).
    fn add(&mut self, va: f64, vb: f64, sample: bool, [i, j]: [f64; 2]) {
        if !(va.is_finite() && vb.is_finite()) {
            return;
        }
        self.points += 1;
        if va > 0.0 && vb > 0.0 {
            if sample {
                self.ratios.push(va / vb);
            }
            let (x, y) = (vb.ln(), va.ln());
            for (t, v) in self.sums.iter_mut().zip([1.0, x, y, x * x, y * y, x * y]) {
                *t += v;
            }
            let n = self.bins as f64;
            if (0.0..n).contains(&i) && (0.0..n).contains(&j) {
                self.counts[i as usize * self.bins + j as usize] += 1;
            }
        }
    }

    fn merge(mut self, b: Self) -> Self {
        self.counts
            .iter_mut()
            .zip(&b.counts)
            .for_each(|(x, y)| *x += y);
        self.ratios.extend(b.ratios);
        self.sums.iter_mut().zip(b.sums).for_each(|(x, y)| *x += y);
        self.points += b.points;
        self
    }
}

/// Pearson's correlation of the log values from their sums `[n, Σx, Σy, Σx², Σy², Σxy]`.
fn pearson(s: &[f64; 6]) -> f64 {
    let n = s[0].max(1.0);
    let cov = s[5] / n - s[1] / n * s[2] / n;
    let vx = s[3] / n - (s[1] / n).powi(2);
    let vy = s[4] / n - (s[2] / n).powi(2);
    cov / (vx * vy).sqrt()
}

/// Write the comparison into `dir`: `compare_hist.png`, `compare_quantiles.csv` and
/// `compare_summary.json`; returns the paths.
pub fn write_outputs(
    c: &Comparison,
    bins: usize,
    labels: (&str, &str),
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let map_given_ref = conditional_quantiles(&c.counts, bins, c.range, false, 20);
    let ref_given_map = conditional_quantiles(&c.counts, bins, c.range, true, 20);
    let png = dir.join("compare_hist.png");
    let title = format!("integrated extinction at {} test points", c.n_points);
    crate::products::plot::histogram2d(
        &c.counts,
        bins,
        c.range,
        &map_given_ref,
        &ref_given_map,
        (
            &format!("{} (reference)", labels.1),
            &format!("{} (map)", labels.0),
        ),
        &title,
        &png,
    )?;
    let csv = dir.join("compare_quantiles.csv");
    write_atomically(&csv, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(f, "given,bin_centre,q16,q50,q84")?;
        for (name, rows) in [("reference", &map_given_ref), ("map", &ref_given_map)] {
            for r in rows {
                writeln!(f, "{name},{},{},{},{}", r.0, r.1, r.2, r.3)?;
            }
        }
        f.flush()?;
        Ok(())
    })?;
    let json = dir.join("compare_summary.json");
    let summary = serde_json::json!({
        "map": labels.0,
        "reference": labels.1,
        "test_points": c.n_points,
        "test_points_in_histogram": c.n_in_range,
        "distance_first_pc": c.distances_pc.0,
        "distance_last_pc": c.distances_pc.1,
        "distances_per_sightline": c.distances_pc.2,
        "histogram_range": [c.range.0, c.range.1],
        "median_ratio_map_over_reference": c.median_ratio,
        "pearson_r_of_log_values": c.pearson_log,
    });
    write_atomically(&json, |tmp| {
        Ok(std::fs::write(
            tmp,
            serde_json::to_string_pretty(&summary)? + "\n",
        )?)
    })?;
    Ok(vec![png, csv, json])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sphere::grid::Shells;

    #[test]
    fn quantiles_of_a_point_mass_and_of_a_map_against_itself() {
        let bins = 10;
        let mut counts = vec![0u64; bins * bins];
        counts[3 * bins + 5] = 100;
        let q = conditional_quantiles(&counts, bins, (1e-3, 1e2), false, 1);
        assert_eq!(q.len(), 1);
        let w = (1e2f64.ln() - 1e-3f64.ln()) / bins as f64;
        let (lo5, hi5) = (
            (1e-3f64.ln() + 5.0 * w).exp(),
            (1e-3f64.ln() + 6.0 * w).exp(),
        );
        assert!(q[0].1 >= lo5 && q[0].3 <= hi5 && q[0].1 < q[0].2 && q[0].2 < q[0].3);
        let m = DustMap::from_fn(
            4,
            Shells::log_uniform(40.0, 300.0, 20).unwrap(),
            "E",
            |r, u| 1e-3 * (1.0 + u[0]) * r / 100.0,
        );
        let mut m2 = m.clone();
        m2.mean.iter_mut().for_each(|v| *v *= 2.0);
        let o = CompareOptions {
            nside: 4,
            step_pc: 5.0,
            ..Default::default()
        };
        let c = compare(&m, &m, &o).unwrap();
        assert!((c.median_ratio - 1.0).abs() < 1e-12 && (c.pearson_log - 1.0).abs() < 1e-9);
        // all mass on the diagonal of the histogram
        let off: u64 = (0..o.bins * o.bins)
            .filter(|k| k / o.bins != k % o.bins)
            .map(|k| c.counts[k])
            .sum();
        assert_eq!(off, 0);
        let c = compare(&m2, &m, &o).unwrap();
        assert!((c.median_ratio - 2.0).abs() < 1e-12);
        assert_eq!(c.distances_pc, (40.0, 300.0, 53));
    }
}
