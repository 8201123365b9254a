//! The application layer: the TOML configuration schema and the workflows built from the
//! layers below — simulate, fit (schedule, checkpoints, resume, products), recovery, plan,
//! bench, info. Only this layer (and the CLI) knows the configuration schema.

pub mod bench;
pub mod build;
pub mod checkpoint;
pub mod config;
pub mod fit;
pub mod info;
pub mod plan;
pub mod prior_check;
pub mod recovery;
pub mod reshard;
pub mod roofline;
pub mod simulate;
