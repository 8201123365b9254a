//! Map products: the map file, point queries, regridding, per-star predictions, comparison
//! with a reference map, the dustmaps export and figures.

pub mod compare;
pub mod dustmaps;
pub mod mapfile;
pub mod plot;
pub mod predict;
pub mod query;
pub mod regrid;
pub mod validation;
