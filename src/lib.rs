//! dust3d: Bayesian 3D dust mapping of the Milky Way (Edenhofer et al. 2024, A&A 685, A82).
//!
//! A log-normal Gaussian process over HEALPix NESTED pixels × log-spaced distance shells,
//! realised by iterative charted refinement (ICR). The `dust3d` binary is a thin driver of
//! this library; see README.md for the command line, docs/model.md for the mathematics and
//! docs/architecture.md for the layers of this library.

// Index loops mirror the formulas (sums over shells, sites, window slots) in numerical code.
#![allow(clippy::needless_range_loop)]
#![warn(missing_docs)]

// The layers, bottom up; each may use only the layers listed before it (docs/architecture.md,
// checked by tests/architecture.rs).

// Layer 0: files, MPI, logging, provenance, precision, random streams.
pub mod base;

// Layer 1: HEALPix × shells, MPI patches, covariance kernels, prior transforms.
pub mod sphere;

// Layer 2: generic solvers (conjugate gradients).
pub mod num;

// Layer 2: star catalogs and tables.
pub mod data;

// Layer 3: the Gaussian-process prior (ICR).
pub mod prior;

// Layer 4: the likelihood, the model and its CPU backend.
pub mod likelihood;

// Layer 5: device backends (OpenCL).
pub mod backend;

// Layer 6: MGVI and the Newton-CG minimiser.
pub mod inference;

// Layer 7: map files and products.
pub mod products;

// Layer 8: configuration schema and workflows.
pub mod app;

// Layer 9: the command line.
pub mod cli;
