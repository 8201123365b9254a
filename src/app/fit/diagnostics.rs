//! What a finished fit warns about its map: densities its float32 storage cannot hold, and
//! stars whose predicted extinction no catalog star supports — both the mark of a density
//! spike grown where only the tails of distance windows see it (docs/model.md,
//! "Calibration").

use crate::base::comm;
use crate::data::catalog::Catalog;

/// Voxels (shell-major over `npix` pixels) where some sample's density does not fit the
/// map's float32 storage, and the shell centre of the first (pc).
pub(super) fn unstorable_voxels(
    samples: &[Vec<f64>],
    centres_pc: &[f64],
    npix: usize,
) -> (usize, f64) {
    let n = samples.first().map_or(0, Vec::len);
    let bad = |i: usize| {
        samples
            .iter()
            .any(|s| s[i].is_nan() || s[i].abs() > f64::from(f32::MAX))
    };
    let voxels: Vec<usize> = (0..n).filter(|&i| bad(i)).collect();
    let first_pc = voxels
        .first()
        .map_or(f64::NAN, |&i| centres_pc[i / npix.max(1)]);
    (voxels.len(), first_pc)
}

/// Warn when densities do not fit the map's float32 storage (they read back as infinite):
/// a density spike grown where no star's column sees it (docs/model.md, "Calibration").
pub(super) fn warn_unstorable(samples: &[Vec<f64>], centres_pc: &[f64], npix: usize) {
    let (count, r_pc) = unstorable_voxels(samples, centres_pc, npix);
    if count > 0 {
        tracing::warn!(
            voxels = count,
            first_at_pc = format!("{r_pc:.0}"),
            "densities beyond float32 in some samples: these voxels read back as infinite \
             (a density spike where no star's column sees it; mask them, or refit with \
             distance_variance = false in a first stage)"
        );
    }
}

/// How many of the stars are predicted (mean over the samples `abar`, per sample one value
/// per star) above `factor` times `a_ceiling`, and the largest such ratio (0 without any).
pub(super) fn spiked_stars(abar: &[Vec<f64>], a_ceiling: f64, factor: f64) -> (usize, f64) {
    let (mean, _) = crate::base::util::mean_std(abar);
    let mut count = 0;
    let mut worst = 0.0f64;
    for ratio in mean.iter().map(|m| m / a_ceiling) {
        // a non-finite prediction is a spike too
        if ratio.is_nan() || ratio > factor {
            count += 1;
            worst = worst.max(if ratio.is_nan() { f64::INFINITY } else { ratio });
        }
    }
    (count, worst)
}

/// Prediction above this many times the catalog's largest extinction (plus 3σ): no star's
/// column supports it, whatever the map's geometry.
const SPIKE_FACTOR: f64 = 10.0;

/// Warn (on the root rank, counts over all ranks) when stars are predicted above
/// [`SPIKE_FACTOR`] times the largest measured extinction of the fitted and held-out stars
/// (A + 3σ_A): their windows reach a density spike, and correlations of the map with any
/// truth are then meaningless there. Returns the one-line summary the map records (on
/// every rank), or "" when no star is.
pub(super) fn warn_spiked_stars(abar: &[Vec<f64>], fitted: &Catalog, held_out: &Catalog) -> String {
    let ceiling = |c: &Catalog| {
        c.extinction
            .iter()
            .zip(&c.extinction_error)
            .map(|(a, e)| a + 3.0 * e)
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let a_ceiling = comm::max_f64(ceiling(fitted).max(ceiling(held_out)));
    let (count, worst) = if a_ceiling > 0.0 {
        spiked_stars(abar, a_ceiling, SPIKE_FACTOR)
    } else {
        (0, 0.0)
    };
    let count = comm::sum_u64(count as u64);
    let worst = comm::max_f64(worst);
    if count == 0 {
        return String::new();
    }
    if comm::is_root() {
        tracing::warn!(
            stars = count,
            worst_ratio = format!("{worst:.3e}"),
            catalog_max = format!("{a_ceiling:.3}"),
            "stars predicted above {SPIKE_FACTOR} times the largest extinction any catalog \
             star measures (A + 3σ_A): a density spike in their distance windows (usually \
             the outermost shells, where a window's tail meets a misfit); treat the map \
             there with suspicion, or refit with distance_variance = false in a first stage"
        );
    }
    format!(
        "{count} stars predicted above {SPIKE_FACTOR} times the catalog's largest A + 3σ_A \
         ({a_ceiling:.3}), the worst {worst:.3e} times: density spikes in their windows"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densities_beyond_float32_are_found_per_voxel() {
        // 2 shells × 3 pixels, shell-major; voxel 4 (shell 1) overflows in one sample, voxel
        // 5 is infinite in both
        let ok = vec![1e-3; 6];
        let mut a = ok.clone();
        a[4] = 1e39;
        a[5] = f64::INFINITY;
        let mut b = ok.clone();
        b[5] = f64::NAN;
        assert_eq!(
            unstorable_voxels(&[ok.clone(), a, b], &[50.0, 80.0], 3),
            (2, 80.0)
        );
        let (none, _) = unstorable_voxels(&[ok.clone(), ok], &[50.0, 80.0], 3);
        assert_eq!(none, 0);
    }

    #[test]
    fn stars_predicted_beyond_any_measured_extinction_are_counted() {
        // 2 samples × 4 stars: star 1 at 12× the ceiling on average, star 3 infinite in one
        // sample; star 2 at 9× is a misfit, not a spike
        let abar = vec![
            vec![1.0, 20.0, 9.0, 1.0],
            vec![1.0, 4.0, 9.0, f64::INFINITY],
        ];
        let (count, worst) = spiked_stars(&abar, 1.0, 10.0);
        assert_eq!(count, 2);
        assert!(worst.is_infinite());
        let (count, worst) = spiked_stars(&abar[..1], 1.0, 10.0);
        assert_eq!((count, worst), (1, 20.0));
        assert_eq!(spiked_stars(&[], 1.0, 10.0), (0, 0.0));
    }

    #[test]
    fn the_map_records_spiked_stars_and_nothing_otherwise() {
        let cat = |a: Vec<f64>| Catalog {
            source_id: (0..a.len() as i64).collect(),
            l_deg: vec![0.0; a.len()],
            b_deg: vec![0.0; a.len()],
            parallax_mas: vec![1.0; a.len()],
            parallax_error_mas: vec![0.1; a.len()],
            extinction_error: vec![0.1; a.len()],
            extinction: a,
            extra: vec![],
        };
        // catalog ceiling: 2.0 + 3 × 0.1 = 2.3 (the held-out star's)
        let fitted = cat(vec![1.0, 0.5]);
        let held = cat(vec![2.0]);
        let line = warn_spiked_stars(&[vec![1.0, 30.0]], &fitted, &held);
        assert!(
            line.starts_with("1 stars predicted above 10 times"),
            "{line}"
        );
        assert!(line.contains("(2.300)"), "{line}");
        assert_eq!(warn_spiked_stars(&[vec![1.0, 20.0]], &fitted, &held), "");
    }
}
