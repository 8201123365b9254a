//! Timing and memory figures of the benchmarks: medians after warm-up calls, with the
//! caches evicted where an operation's data start in memory, and the peak resident set.

use anyhow::Result;
use std::time::Instant;

/// Peak resident set size of this process in bytes (Linux VmHWM), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Median wall time in seconds of `reps` calls of `f` after two warm-up calls.
pub fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    median_after(reps, |_| {}, f)
}

/// Bytes streamed through before each run of [`median_time_cold`]: beyond the last-level
/// cache of the servers dust3d runs on (this project's machine has a 480 MiB L3).
const EVICT_BYTES: usize = 640 << 20;

/// [`median_time`] with the caches evicted before each run (a pass writing and reading
/// 640 MiB): the operation's matrices and vectors start in memory, as they do inside
/// an MGVI iteration, where the star walks and other vectors pass between two ICR calls.
pub fn median_time_cold(reps: usize, f: impl FnMut()) -> f64 {
    use rayon::prelude::*;
    let mut evict = vec![0u64; EVICT_BYTES / 8];
    let evict_caches = |r: usize| {
        evict
            .par_iter_mut()
            .with_min_len(1 << 16)
            .for_each(|v| *v = v.wrapping_add(r as u64 + 1));
        std::hint::black_box(evict.par_iter().with_min_len(1 << 16).sum::<u64>());
    };
    median_after(reps, evict_caches, f)
}

/// Median wall time of `reps` calls of `f`, each after an untimed `before(repetition)`.
fn median_after(reps: usize, mut before: impl FnMut(usize), mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|r| {
            before(r);
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// [`median_time`] of an operation that can fail: the first error is returned.
pub fn try_median_time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut err = Ok(());
    let t = median_time(reps, || {
        if err.is_ok() {
            err = f();
        }
    });
    err.map(|()| t)
}
