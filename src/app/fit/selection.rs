//! Which stars a fit uses: the held-out subset and each stage's selection, both fixed by
//! the seed and the stars' source ids (the same on any rank count).

use crate::app::config::StageConfig;
use crate::data::catalog::PixelCatalog;

/// Uniform number in [0, 1) fixed per (seed, star): nested star subsets across stages.
fn star_uniform(seed: u64, i: u64) -> f64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Salt of the held-out selection's random numbers (independent of the stages' subsets).
const HOLDOUT_SALT: u64 = 0x005E_ED0F_4E1D_0047;

/// Split stars into those fitted and a fixed random `fraction` held out, by source id and
/// seed (the same on any rank count).
pub(super) fn split_holdout(
    all: PixelCatalog,
    fraction: f64,
    seed: u64,
) -> (PixelCatalog, PixelCatalog) {
    let s = &all.stars;
    let held: Vec<bool> = (0..s.len())
        .map(|i| star_uniform(seed ^ HOLDOUT_SALT, s.source_id[i] as u64) < fraction)
        .collect();
    let kept: Vec<bool> = held.iter().map(|h| !h).collect();
    let pixels = all.pixels();
    (
        s.subset(&kept).into_pixel_range(all.nside, pixels.clone()),
        s.subset(&held).into_pixel_range(all.nside, pixels),
    )
}

/// The stars a stage uses: with at least a `selection_sigma` chance of lying nearer than
/// `max_distance_pc` (ω + k σ_ω > 1/d) and in the stage's fraction.
pub fn stage_stars(all: &PixelCatalog, stage: &StageConfig, seed: u64) -> PixelCatalog {
    let keep = stage_mask(all, stage, seed);
    all.stars
        .subset(&keep)
        .into_pixel_range(all.nside, all.pixels())
}

/// Which of `all`'s stars a stage uses; [`stage_stars`] keeps them in the same order.
pub fn stage_mask(all: &PixelCatalog, stage: &StageConfig, seed: u64) -> Vec<bool> {
    let s = &all.stars;
    let k = stage.selection_sigma;
    (0..s.len())
        .map(|i| {
            let near = stage
                .max_distance_pc
                .is_none_or(|d| s.parallax_mas[i] + k * s.parallax_error_mas[i] > 1000.0 / d);
            near && star_uniform(seed, s.source_id[i] as u64) < stage.star_fraction
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::catalog::Catalog;

    #[test]
    fn stages_select_stars_by_their_chance_of_lying_inside_the_radius() {
        // 1/ω = 500 pc, 800 pc ± (2σ reaching 500 pc), 800 pc ± small
        let cat = Catalog {
            source_id: vec![1, 2, 3],
            l_deg: vec![10.0, 20.0, 30.0],
            b_deg: vec![0.0; 3],
            parallax_mas: vec![2.0, 1.25, 1.25],
            parallax_error_mas: vec![0.1, 0.4, 0.05],
            extinction: vec![0.1; 3],
            extinction_error: vec![0.05; 3],
            extra: vec![],
        };
        let all = cat.into_pixel_layout(4);
        let mut stage = StageConfig {
            max_distance_pc: Some(600.0),
            ..Default::default()
        };
        let ids = |st: &StageConfig| {
            let mut v = stage_stars(&all, st, 0).stars.source_id;
            v.sort();
            v
        };
        // ω + 2σ > 1/600 pc = 1.667 mas: stars 1 (2.2) and 2 (2.05), not 3 (1.35)
        assert_eq!(ids(&stage), [1, 2]);
        stage.selection_sigma = 0.0;
        assert_eq!(ids(&stage), [1]);
        stage.max_distance_pc = None;
        assert_eq!(ids(&stage), [1, 2, 3]);
    }
}
