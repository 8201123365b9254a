//! Variational inference: truncated Newton-CG for the KL and MGVI (residual sampling, their
//! geoVI refinement, the KL objective, one global iteration).

pub mod mgvi;
pub mod newton;
