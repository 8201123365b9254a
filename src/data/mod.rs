//! Star catalogs and tabular files: readers, writers, validation, selection cuts, the pixel
//! layout the likelihood reads, and the distribution of stars over MPI ranks.

pub mod catalog;
pub mod guard;
pub mod table;
