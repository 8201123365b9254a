//! The likelihood: star distance windows and line-of-sight response, the model state, and
//! the composed model (energy, gradient, JVP/VJP, MGVI metric) over a compute backend.

pub mod backend;
pub mod core;
pub mod cpu;
pub mod distance;
mod lanes;
pub mod mask;
pub mod model;
pub mod noise;
mod quad;
pub mod response;
pub mod state;
pub mod windows;
