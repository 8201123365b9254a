//! The Gaussian-process prior of the log-density: iterative charted refinement (ICR) and its
//! exact adjoint, on one process or distributed over MPI patches.

pub mod icr;
