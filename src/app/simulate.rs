//! Mock skies: an analytic truth density (Gaussian clouds plus an exponential disk) or a
//! prior draw, and a star catalog observed through it with the noise model of the paper.

use anyhow::{bail, Result};
use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::app::config::{invalid, Config};
use crate::base::provenance::Provenance;
use crate::base::rng;
use crate::data::catalog::Catalog;
use crate::products::mapfile::DustMap;
use crate::sphere::grid::integrate_to;
use crate::sphere::grid::{self, Shells};

/// `[simulate]`: the mock sky of `dust3d simulate`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateConfig {
    /// Number of stars.
    pub n_stars: usize,
    /// Star distances ∝ r² between these limits, pc (defaults: the grid range).
    pub star_r_min_pc: Option<f64>,
    /// Outer limit of star distances, pc.
    pub star_r_max_pc: Option<f64>,
    /// Distance distribution: "volume" (∝ r², uniform in space) or "parallax" (uniform in
    /// 1/d, for which the parallax likelihood is an exactly calibrated posterior).
    pub star_distances: String,
    /// Sky distribution of stars: "uniform" or "disk" (∝ exp(−|z|/h_star)).
    pub star_sky: String,
    /// Scale height of the "disk" star distribution, pc.
    pub star_scale_height_pc: f64,
    /// Range of parallax uncertainties, mas (uniform).
    pub parallax_error_mas: [f64; 2],
    /// Range of extinction uncertainties, catalog units (uniform).
    pub extinction_error: [f64; 2],
    /// Fraction of stars whose extinction noise is `outlier_factor` times the quoted error.
    pub outlier_fraction: f64,
    /// Noise inflation of outliers.
    pub outlier_factor: f64,
    /// Truth: "clouds" (analytic clouds + disk) or "prior" (a draw from the ICR prior).
    pub truth: String,
    /// How a star's true extinction is integrated: "grid" (the truth map, piecewise
    /// constant on the fit's voxels, in the star's pixel: the fit's own model) or "ray" (the
    /// analytic clouds along the star's exact direction from the inner grid edge, off the
    /// fit's grid; clouds only).
    pub star_extinction: String,
    /// The true inflation of each star's extinction error: "one" (the quoted errors are
    /// right) or "prior" (drawn per star from the `[noise]` inverse-gamma prior the fit
    /// assumes, so a prior-draw truth makes the model exactly right, with `[distances]`
    /// matching `star_distances`).
    pub star_nsigma: String,
    /// Diffuse disk: density at z = 0, catalog units per pc.
    pub disk_density: f64,
    /// Diffuse disk scale height, pc.
    pub disk_scale_height_pc: f64,
    /// Analytic clouds (`[[simulate.cloud]]`).
    pub cloud: Vec<CloudConfig>,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        Self {
            n_stars: 20_000,
            star_r_min_pc: None,
            star_r_max_pc: None,
            star_distances: "volume".into(),
            star_sky: "uniform".into(),
            star_scale_height_pc: 300.0,
            parallax_error_mas: [0.02, 0.3],
            extinction_error: [0.02, 0.1],
            outlier_fraction: 0.01,
            outlier_factor: 10.0,
            truth: "clouds".into(),
            star_extinction: "grid".into(),
            star_nsigma: "one".into(),
            disk_density: 2e-4,
            disk_scale_height_pc: 100.0,
            cloud: default_clouds(),
        }
    }
}

/// One Gaussian ellipsoidal cloud of the mock truth.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Galactic longitude of the centre, deg.
    pub l_deg: f64,
    /// Galactic latitude of the centre, deg.
    pub b_deg: f64,
    /// Distance of the centre, pc.
    pub d_pc: f64,
    /// Gaussian 1σ semi-axes along Galactic x, y, z, pc.
    pub sigma_pc: [f64; 3],
    /// Peak density, catalog units per pc.
    pub peak_density: f64,
}

fn default_clouds() -> Vec<CloudConfig> {
    let c = |l_deg, b_deg, d_pc, s: f64, peak_density| CloudConfig {
        l_deg,
        b_deg,
        d_pc,
        sigma_pc: [s, s, 0.6 * s],
        peak_density,
    };
    vec![
        c(160.0, -15.0, 300.0, 40.0, 0.004),
        c(210.0, -19.0, 420.0, 50.0, 0.003),
        c(350.0, 15.0, 140.0, 20.0, 0.006),
        c(80.0, 0.0, 700.0, 80.0, 0.002),
        c(290.0, -5.0, 550.0, 60.0, 0.0025),
    ]
}

impl SimulateConfig {
    /// Semantic checks; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if s.n_stars == 0 {
            return Err(invalid("simulate.n_stars", "simulate.n_stars must be ≥ 1"));
        }
        for (key, r) in [
            ("simulate.parallax_error_mas", s.parallax_error_mas),
            ("simulate.extinction_error", s.extinction_error),
        ] {
            if !(r[0] > 0.0 && r[1] >= r[0]) {
                return Err(invalid(
                    key.to_string(),
                    format!("{key} must be [lo, hi] with 0 < lo ≤ hi, got {r:?}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&s.outlier_fraction) {
            return Err(invalid(
                "simulate.outlier_fraction",
                format!(
                    "simulate.outlier_fraction must be in [0, 1], got {}",
                    s.outlier_fraction
                ),
            ));
        }
        if !matches!(s.truth.as_str(), "clouds" | "prior") {
            return Err(invalid(
                "simulate.truth",
                format!(
                    "simulate.truth must be \"clouds\" or \"prior\", got {:?}",
                    s.truth
                ),
            ));
        }
        if !matches!(s.star_distances.as_str(), "volume" | "parallax") {
            return Err(invalid(
                "simulate.star_distances",
                format!(
                    "simulate.star_distances must be \"volume\" or \"parallax\", got {:?}",
                    s.star_distances
                ),
            ));
        }
        if !matches!(s.star_nsigma.as_str(), "one" | "prior") {
            return Err(invalid(
                "simulate.star_nsigma",
                format!(
                    "simulate.star_nsigma must be \"one\" or \"prior\", got {:?}",
                    s.star_nsigma
                ),
            ));
        }
        let ray_ok = s.truth == "clouds" || s.star_extinction != "ray";
        if !matches!(s.star_extinction.as_str(), "grid" | "ray") || !ray_ok {
            return Err(invalid(
                "simulate.star_extinction",
                format!(
                    "simulate.star_extinction must be \"grid\" or \"ray\" (\"ray\" with \
                     truth = \"clouds\"), got {:?}",
                    s.star_extinction
                ),
            ));
        }
        if !matches!(s.star_sky.as_str(), "uniform" | "disk") {
            return Err(invalid(
                "simulate.star_sky",
                format!(
                    "simulate.star_sky must be \"uniform\" or \"disk\", got {:?}",
                    s.star_sky
                ),
            ));
        }
        Ok(())
    }
}

/// One star's random draws: position, errors, outlier flag and the two noise normals.
struct StarDraw {
    l: f64,
    b: f64,
    d: f64,
    sw: f64,
    sa: f64,
    outlier: bool,
    nw: f64,
    na: f64,
}

impl StarDraw {
    /// Draw in a fixed order from `rng`.
    fn new<R: Rng>(sim: &SimulateConfig, r_lo: f64, r_hi: f64, rng: &mut R) -> Self {
        let (l, b, d) = draw_position(sim, r_lo, r_hi, rng);
        let sw: f64 = rng.random_range(sim.parallax_error_mas[0]..=sim.parallax_error_mas[1]);
        let sa: f64 = rng.random_range(sim.extinction_error[0]..=sim.extinction_error[1]);
        let outlier = rng.random::<f64>() < sim.outlier_fraction;
        let nw: f64 = rng.sample(StandardNormal);
        let na: f64 = rng.sample(StandardNormal);
        Self {
            l,
            b,
            d,
            sw,
            sa,
            outlier,
            nw,
            na,
        }
    }
}

/// A simulated sky: the catalog and the truth map it was observed through.
pub struct Simulation {
    /// Observed stars; extra columns `true_distance_pc`, `true_extinction`, `outlier` (and
    /// `true_nsigma` with `simulate.star_nsigma = "prior"`).
    pub catalog: Catalog,
    /// The truth, piecewise constant on the reconstruction grid.
    pub truth: DustMap,
}

/// Analytic density (catalog units per pc) at heliocentric Galactic Cartesian `x` in pc.
pub fn cloud_density(sim: &SimulateConfig, x: [f64; 3]) -> f64 {
    let mut rho = sim.disk_density * (-x[2].abs() / sim.disk_scale_height_pc).exp();
    for c in &sim.cloud {
        let u = grid::lonlat_to_vec(c.l_deg.to_radians(), c.b_deg.to_radians());
        let mut q = 0.0;
        for k in 0..3 {
            let d = (x[k] - c.d_pc * u[k]) / c.sigma_pc[k];
            q += d * d;
        }
        rho += c.peak_density * (-0.5 * q).exp();
    }
    rho
}

/// Analytic truth sampled at voxel centres, `[radius][pixel]`.
pub fn cloud_truth(sim: &SimulateConfig, nside: u32, shells: &Shells) -> Vec<f64> {
    let npix = grid::npix(nside);
    let dirs: Vec<[f64; 3]> = (0..npix as u64).map(|p| grid::pix2vec(nside, p)).collect();
    let mut out = Vec::with_capacity(npix * shells.len());
    for r in shells.centres_pc() {
        out.extend(
            dirs.iter()
                .map(|u| cloud_density(sim, [r * u[0], r * u[1], r * u[2]])),
        );
    }
    out
}

/// The analytic truth integrated along the ray to Galactic (l, b) deg from `r0_pc` to
/// `d_pc` (composite Simpson rule, steps ≤ 0.25 pc: clouds are ≥ 10 pc wide).
pub fn ray_extinction(sim: &SimulateConfig, l_deg: f64, b_deg: f64, r0_pc: f64, d_pc: f64) -> f64 {
    if d_pc <= r0_pc {
        return 0.0;
    }
    let u = grid::lonlat_to_vec(l_deg.to_radians(), b_deg.to_radians());
    let rho = |r: f64| cloud_density(sim, [r * u[0], r * u[1], r * u[2]]);
    let n = (2.0 * ((d_pc - r0_pc) / 0.5).ceil()) as usize;
    let h = (d_pc - r0_pc) / n as f64;
    let mut acc = rho(r0_pc) + rho(d_pc);
    for j in 1..n {
        acc += if j % 2 == 1 { 4.0 } else { 2.0 } * rho(r0_pc + j as f64 * h);
    }
    acc * h / 3.0
}

/// Draw a star position: (l, b) in deg and distance in pc.
fn draw_position<R: Rng>(
    sim: &SimulateConfig,
    r_lo: f64,
    r_hi: f64,
    rng: &mut R,
) -> (f64, f64, f64) {
    loop {
        let z: f64 = rng.random_range(-1.0..1.0);
        let lon: f64 = rng.random_range(0.0..std::f64::consts::TAU);
        let u: f64 = rng.random();
        let r = if sim.star_distances == "parallax" {
            1000.0 / (1000.0 / r_hi + u * (1000.0 / r_lo - 1000.0 / r_hi))
        } else {
            // density ∝ r² between r_lo and r_hi
            (r_lo.powi(3) + u * (r_hi.powi(3) - r_lo.powi(3))).cbrt()
        };
        let keep = sim.star_sky != "disk"
            || rng.random::<f64>() < (-(r * z).abs() / sim.star_scale_height_pc).exp();
        if keep {
            return (lon.to_degrees(), z.asin().to_degrees(), r);
        }
    }
}

/// Simulate a mock sky from the configuration; `truth_field` overrides the analytic truth
/// (used for prior draws), as `[radius][pixel]` on the kept shells at the final nside.
pub fn simulate(
    cfg: &Config,
    config_text: &str,
    truth_field: Option<Vec<f64>>,
) -> Result<Simulation> {
    let chart = cfg.chart()?;
    let sim = &cfg.simulate;
    let nside = chart.nside_final();
    let shells = chart.kept_shells();
    let npix = grid::npix(nside);
    let field = match truth_field {
        Some(f) => f,
        None if sim.truth == "clouds" => cloud_truth(sim, nside, &shells),
        None => bail!("simulate.truth = {:?} needs a prior draw", sim.truth),
    };
    let r_lo = sim.star_r_min_pc.unwrap_or(shells.edges_pc[0]);
    let r_hi = sim.star_r_max_pc.unwrap_or(shells.edges_pc[shells.len()]);
    if !(r_lo > 0.0 && r_hi > r_lo) {
        return Err(invalid(
            "simulate.star_r_min_pc",
            format!(
                "simulate.star_r_min_pc / star_r_max_pc: need 0 < min < max, got {r_lo}, {r_hi}"
            ),
        ));
    }
    let mut rng = rng::stream(cfg.seed, rng::streams::SIMULATE_STARS);
    let n = sim.n_stars;
    // draws first, in the stream's order; extinctions after, in parallel
    let draws: Vec<StarDraw> = (0..n)
        .map(|_| StarDraw::new(sim, r_lo, r_hi, &mut rng))
        .collect();
    let true_a: Vec<f64> = draws
        .par_iter()
        .map(|s| {
            if sim.star_extinction == "ray" {
                ray_extinction(sim, s.l, s.b, shells.edges_pc[0], s.d)
            } else {
                let p = grid::ang2pix(nside, s.l, s.b) as usize;
                integrate_to(&shells, |k| field[k * npix + p], s.d)
            }
        })
        .collect();
    let nsigma = true_nsigma(cfg, n)?;
    let mut cat = Catalog::default();
    let (mut true_d, mut outlier) = (vec![], vec![]);
    for (i, (s, &a_true)) in draws.iter().zip(&true_a).enumerate() {
        let inflate = if s.outlier {
            sim.outlier_factor
        } else {
            nsigma[i]
        };
        cat.source_id.push(i as i64);
        cat.l_deg.push(s.l);
        cat.b_deg.push(s.b);
        cat.parallax_mas.push(1000.0 / s.d + s.sw * s.nw);
        cat.parallax_error_mas.push(s.sw);
        cat.extinction.push(a_true + s.sa * inflate * s.na);
        cat.extinction_error.push(s.sa);
        true_d.push(s.d);
        outlier.push(if s.outlier { 1.0 } else { 0.0 });
    }
    cat.extra = vec![
        ("true_distance_pc".into(), true_d),
        ("true_extinction".into(), true_a),
        ("outlier".into(), outlier),
    ];
    if sim.star_nsigma == "prior" {
        cat.extra.push(("true_nsigma".into(), nsigma));
    }
    let truth = DustMap {
        provenance: Provenance::current(config_text, cfg.seed, ""),
        ..DustMap::truth(nside, shells, &cfg.output.units, field)
    };
    Ok(Simulation {
        catalog: cat,
        truth,
    })
}

/// Each star's true error inflation: 1, or drawn from the `[noise]` prior InvGamma(shape,
/// scale) as scale / Gamma(shape, 1) from its own stream (the star draws are unchanged).
fn true_nsigma(cfg: &Config, n: usize) -> Result<Vec<f64>> {
    if cfg.simulate.star_nsigma != "prior" {
        return Ok(vec![1.0; n]);
    }
    let gamma = rand_distr::Gamma::new(cfg.noise.nsigma_shape, 1.0)
        .map_err(|e| invalid("noise.nsigma_shape", format!("noise.nsigma_shape: {e}")))?;
    let mut rng = rng::stream(cfg.seed, rng::streams::SIMULATE_NSIGMA);
    Ok((0..n)
        .map(|_| cfg.noise.nsigma_scale / rng.sample(gamma))
        .collect())
}

/// The ICR excitations of the prior-draw truth of seed `seed` (scale and offset latents are 0).
pub fn prior_excitations(seed: u64, n_xi: usize) -> Vec<f64> {
    let mut rng = rng::stream(seed, rng::streams::SIMULATE_PRIOR);
    (0..n_xi).map(|_| rng.sample(StandardNormal)).collect()
}

/// A draw from the prior on the kept shells, `[radius][pixel]`: s = ICR(ξ) with ξ from the
/// seed's prior stream, ρ = exp(scale · s + offset) at the prior medians of scale and offset.
pub fn prior_truth(cfg: &Config) -> Result<Vec<f64>> {
    let chart = cfg.chart()?;
    // the fit's prior operator, variance correction included, on one process
    let decomp = crate::sphere::decomp::Decomp::single(cfg.nside_dec()?);
    let icr = crate::app::build::icr(cfg, decomp)?;
    let mut rng = rng::stream(cfg.seed, rng::streams::SIMULATE_PRIOR);
    let xi: Vec<f64> = (0..icr.n_xi())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    let mut work = icr.workspace();
    icr.forward(&xi, &mut work);
    let s = &work.fields[chart.levels];
    let p = &cfg.prior;
    // median of LogNormal(mean m, std σ) is m / sqrt(1 + σ²/m²)
    let scale = p.scale_mean / (1.0 + (p.scale_std / p.scale_mean).powi(2)).sqrt();
    let (nr, npix, pad) = (
        chart.n_r(chart.levels),
        chart.npix(chart.levels),
        chart.padding,
    );
    let nk = chart.n_kept();
    let mut out = vec![0.0; nk * npix];
    for pix in 0..npix {
        for k in 0..nk {
            out[k * npix + pix] = (scale * s[pix * nr + pad + k] + p.offset_mean).exp();
        }
    }
    Ok(out)
}

/// Simulate with the truth kind chosen by `simulate.truth`.
pub fn run(cfg: &Config, config_text: &str) -> Result<Simulation> {
    let truth = match cfg.simulate.truth.as_str() {
        "prior" => Some(prior_truth(cfg)?),
        _ => None,
    };
    simulate(cfg, config_text, truth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ray_integral_of_a_gaussian_cloud_is_exact() {
        // one isotropic cloud on the ray: ∫ peak exp(−(r − d0)²/2σ²) dr = peak σ √(2π)
        let sim = SimulateConfig {
            disk_density: 0.0,
            cloud: vec![CloudConfig {
                l_deg: 40.0,
                b_deg: 10.0,
                d_pc: 300.0,
                sigma_pc: [12.0; 3],
                peak_density: 0.004,
            }],
            ..Default::default()
        };
        let full = ray_extinction(&sim, 40.0, 10.0, 100.0, 500.0);
        let exact = 0.004 * 12.0 * (2.0 * std::f64::consts::PI).sqrt();
        assert!((full - exact).abs() < 1e-9 * exact, "{full} vs {exact}");
        // to the centre: half of it; off the ray by 2σ: e^{−2} of it
        let half = ray_extinction(&sim, 40.0, 10.0, 100.0, 300.0);
        assert!((half - exact / 2.0).abs() < 1e-9 * exact);
        let off = (24.0f64 / 300.0).atan().to_degrees();
        let side = ray_extinction(&sim, 40.0, 10.0 + off, 100.0, 500.0);
        assert!(
            (side / exact - (-2.0f64).exp()).abs() < 0.01,
            "{}",
            side / exact
        );
        assert_eq!(ray_extinction(&sim, 40.0, 10.0, 100.0, 90.0), 0.0);
    }

    #[test]
    fn integral_of_piecewise_constant_column() {
        let s = Shells {
            edges_pc: vec![10.0, 20.0, 40.0, 80.0],
        };
        let rho = [1.0, 2.0, 3.0];
        let f = |d| integrate_to(&s, |k| rho[k], d);
        assert_eq!(f(5.0), 0.0);
        assert!((f(15.0) - 5.0).abs() < 1e-12);
        assert!((f(30.0) - (10.0 + 20.0)).abs() < 1e-12);
        assert!((f(1000.0) - (10.0 + 40.0 + 120.0)).abs() < 1e-12);
    }

    #[test]
    fn simulation_is_reproducible_and_consistent() {
        let mut cfg = Config::default();
        cfg.simulate.n_stars = 500;
        let a = simulate(&cfg, "", None).unwrap();
        let b = simulate(&cfg, "", None).unwrap();
        assert_eq!(a.catalog, b.catalog);
        let t = &a.truth;
        // the recorded true extinction is the column integral to the true distance
        let npix = t.npix();
        for i in 0..50 {
            let p = grid::ang2pix(t.nside, a.catalog.l_deg[i], a.catalog.b_deg[i]) as usize;
            let d = a.catalog.extra[0].1[i];
            let want = integrate_to(&t.shells, |k| t.mean[k * npix + p], d);
            assert!((a.catalog.extra[1].1[i] - want).abs() < 1e-12);
        }
        cfg.seed = 7;
        let c = simulate(&cfg, "", None).unwrap();
        assert_ne!(a.catalog.l_deg, c.catalog.l_deg);
    }
}
