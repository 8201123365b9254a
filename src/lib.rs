//! dust3d: Bayesian 3D dust mapping of the Milky Way (Edenhofer et al. 2024, A&A 685, A82).
//!
//! A log-normal Gaussian process over HEALPix NESTED pixels × log-spaced distance shells,
//! realised by iterative charted refinement (ICR). The `dust3d` binary is a thin driver of
//! this library; see README.md for the command line, docs/model.md for the mathematics and
//! docs/architecture.md for the layers of this library.

// Index loops mirror the formulas (sums over shells, sites, window slots) in numerical code.
#![allow(clippy::needless_range_loop)]

pub mod app;
pub mod backend;
pub mod base;
pub mod cli;
pub mod data;
pub mod inference;
pub mod likelihood;
pub mod num;
pub mod prior;
pub mod products;
pub mod sphere;
