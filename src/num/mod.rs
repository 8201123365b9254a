//! Generic numerical solvers that know vectors and operators, not dust: conjugate gradients.

pub mod cg;
