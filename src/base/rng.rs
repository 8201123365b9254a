//! Reproducible random streams: every consumer gets its own ChaCha stream derived from the
//! master seed and a fixed stream id, so results do not depend on thread or rank count and a
//! checkpoint only needs (seed, stream id, position) to resume.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Stream ids of the consumers of randomness.
pub mod streams {
    /// Star positions and noise of the mock sky.
    pub const SIMULATE_STARS: u64 = 1;
    /// Prior draw used as mock truth.
    pub const SIMULATE_PRIOR: u64 = 2;
    /// Benchmarks' synthetic data.
    pub const BENCH: u64 = 3;
    /// Prior draws of `dust3d prior-check`.
    pub const PRIOR_CHECK: u64 = 4;
    /// Per-star error inflation n_σ of the mock sky (`simulate.star_nsigma = "prior"`).
    pub const SIMULATE_NSIGMA: u64 = 5;
    /// Prior draws of the ICR variance correction (used with seed 0 whatever a run's seed).
    pub const ICR_VARIANCE: u64 = 6;
}

/// The random stream `stream` of master seed `seed`.
pub fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}
