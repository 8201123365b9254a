//! dust3d: Bayesian 3D dust mapping of the Milky Way (Edenhofer et al. 2024, A&A 685, A82).
//!
//! A log-normal Gaussian process over HEALPix NESTED pixels × log-spaced distance shells,
//! realised by iterative charted refinement (ICR). The `dust3d` binary is a thin driver of
//! this library; see README.md for the command line and DESIGN.md for the mathematics.

// Index loops mirror the formulas (sums over shells, sites, window slots) in numerical code.
#![allow(clippy::needless_range_loop)]

pub mod atomic;
pub mod bench;
pub mod catalog;
pub mod cg;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod compare;
pub mod config;
pub mod decomp;
pub mod dustmaps;
pub mod fit;
pub mod gpu;
pub mod grid;
pub mod icr;
pub mod info;
pub mod kernel;
pub mod logging;
pub mod mapfile;
pub mod mgvi;
pub mod model;
pub mod newton;
pub mod plan;
pub mod plot;
pub mod predict;
pub mod provenance;
pub mod query;
pub mod recovery;
pub mod regrid;
pub mod reshard;
pub mod response;
pub mod rng;
pub mod simulate;
pub mod state;
pub mod table;
pub mod transforms;
mod util;
