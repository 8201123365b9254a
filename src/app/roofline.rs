//! The memory roofline: this machine's bandwidth (the STREAM triad) and the bytes each
//! benchmarked operation must move at the least, so that a time reads as a fraction of
//! what memory allows. The byte counts are lower bounds: every array an operation needs is
//! read or written once, caches hold nothing across calls, and a level's field is written
//! once and read once by the next level.

use rayon::prelude::*;
use std::time::Instant;

use crate::sphere::grid::Chart;

/// Sustained bandwidth of a parallel triad `a = b + s·c` over arrays of `mib` MiB each,
/// GB/s (STREAM's count: 24 bytes per element; the write-allocate read is not counted),
/// median of `reps` passes after one warm-up.
pub fn stream_triad_gbs(mib: usize, reps: usize) -> f64 {
    let n = (mib << 20) / 8;
    let b: Vec<f64> = (0..n).into_par_iter().map(|i| i as f64).collect();
    let c: Vec<f64> = (0..n).into_par_iter().map(|i| (n - i) as f64).collect();
    let mut a = vec![0.0f64; n];
    let chunk = (n / (4 * rayon::current_num_threads().max(1))).max(4096);
    let mut pass = |s: f64| {
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks(chunk).zip(c.par_chunks(chunk)))
            .for_each(|(a, (b, c))| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + s * c;
                }
            });
    };
    pass(3.0);
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|r| {
            let t0 = Instant::now();
            pass(1.0 + r as f64);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    std::hint::black_box(&a);
    t.sort_by(f64::total_cmp);
    24.0 * n as f64 / t[t.len() / 2] / 1e9
}

/// Voxels of every chart level, coarsest first.
fn level_voxels(chart: &Chart) -> Vec<f64> {
    (0..=chart.levels).map(|l| chart.voxels(l) as f64).collect()
}

/// Bytes an ICR forward (and its adjoint: the same arrays in reverse) must move: the
/// refinement matrices once, the excitations (f64) once, every intermediate level's field
/// written and read once, the final field once.
pub fn icr_bytes(chart: &Chart, n_xi: usize, matrix_bytes: usize) -> f64 {
    let v = level_voxels(chart);
    let (last, inner) = v.split_last().unwrap_or((&0.0, &[]));
    matrix_bytes as f64 + 8.0 * (n_xi as f64 + 2.0 * inner.iter().sum::<f64>() + last)
}

/// Bytes a likelihood value and gradient (or a metric product: a JVP and a VJP) must move:
/// one ICR forward and one adjoint, the star windows once, and four final-field arrays
/// (the field read, ρ written and read back, the gradient field written).
pub fn likelihood_bytes(chart: &Chart, icr: f64, window_bytes: usize) -> f64 {
    let last = level_voxels(chart).last().copied().unwrap_or(0.0);
    2.0 * icr + window_bytes as f64 + 4.0 * 8.0 * last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_triad_measures_a_positive_bandwidth_and_bytes_add_up() {
        let gbs = stream_triad_gbs(8, 3);
        assert!(gbs.is_finite() && gbs > 0.0, "{gbs}");
        let chart = Chart::new(1, 7, 1, 1, 50.0, 500.0).unwrap();
        // levels: 12 px × 7 shells, 48 px × 10 shells
        let b = icr_bytes(&chart, 100, 1000);
        assert_eq!(b, 1000.0 + 8.0 * (100.0 + 2.0 * 84.0 + 480.0));
        assert_eq!(
            likelihood_bytes(&chart, b, 64),
            2.0 * b + 64.0 + 32.0 * 480.0
        );
    }
}
