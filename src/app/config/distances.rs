//! `[distances]`: the stars' distance prior, and its conversion into the likelihood's
//! [`DistancePrior`].

use serde::{Deserialize, Serialize};

use super::Config;
use crate::likelihood::distance::DistancePrior;

/// `[distances]`: the prior of a star's distance that its window combines with the parallax.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistanceConfig {
    /// "parallax" (uniform in parallax, the paper's: the window is the parallax likelihood),
    /// "volume" (∝ d², stars uniform in space) or "exponential" (∝ d² e^{−d/L}).
    pub prior: DistancePriorName,
    /// Distances the prior allows, [min, max] pc ("volume", "exponential"); default: the
    /// grid's range for "volume", [0, ∞) for "exponential".
    pub range_pc: Option<[f64; 2]>,
    /// L of "exponential", pc.
    pub length_pc: Option<f64>,
}

/// `distances.prior`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DistancePriorName {
    /// Uniform in parallax.
    #[default]
    Parallax,
    /// ∝ d² between the range's ends.
    Volume,
    /// ∝ d² e^{−d/L}.
    Exponential,
}

impl Config {
    /// The stars' distance prior described by `[distances]` (checked by `validate`).
    pub fn distance_prior(&self) -> DistancePrior {
        let d = &self.distances;
        match d.prior {
            DistancePriorName::Parallax => DistancePrior::Parallax,
            DistancePriorName::Volume => {
                let [min_pc, max_pc] = d
                    .range_pc
                    .unwrap_or([self.grid.r_min_pc, self.grid.r_max_pc]);
                DistancePrior::Volume { min_pc, max_pc }
            }
            DistancePriorName::Exponential => {
                let [min_pc, max_pc] = d.range_pc.unwrap_or([0.0, f64::INFINITY]);
                DistancePrior::Exponential {
                    length_pc: d.length_pc.unwrap_or(f64::NAN),
                    min_pc,
                    max_pc,
                }
            }
        }
    }
}
