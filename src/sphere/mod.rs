//! Geometry and statistics on the sky × distance: HEALPix pixels and radial shells, the
//! decomposition of the sky into MPI patches, covariance kernels, prior transforms.

pub mod covariance;
pub mod decomp;
pub mod frames;
pub mod grid;
pub mod transforms;
