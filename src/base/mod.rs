//! Base layer: services every other layer may use and that know nothing of dust — atomic
//! file writes, MPI, logging, provenance records, seeded random streams, small helpers.

pub mod allocator;
pub mod atomic;
pub mod comm;
pub mod logging;
pub mod precision;
pub mod provenance;
pub mod rng;
pub mod simd;
pub mod stop;
pub(crate) mod util;
pub mod vexp;
