//! Run configuration (TOML). Every section has defaults; unknown keys are rejected with
//! their name and position, and semantic checks name the offending key.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::base::precision::Precision;
/// `[catalog]` is the catalog module's own parameter struct (column names, selection cuts).
pub use crate::data::catalog::{CatalogParams as CatalogConfig, ColumnNames};
pub use crate::sphere::covariance::KernelKind;
use crate::sphere::covariance::KernelParams;
use crate::sphere::grid::Chart;

/// The whole run configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Master seed of every random stream (simulation, prior draws, MGVI samples).
    pub seed: u64,
    /// Reconstruction grid and ICR chart.
    pub grid: GridConfig,
    /// Prior covariance kernel of the log-density.
    pub kernel: KernelConfig,
    /// Priors of the global scale and offset of the log-density.
    pub prior: PriorConfig,
    /// Per-star noise inflation (outlier) model.
    pub noise: NoiseConfig,
    /// Catalog column names and selection cuts.
    pub catalog: CatalogConfig,
    /// MGVI schedule.
    pub inference: InferenceConfig,
    /// Output products.
    pub output: OutputConfig,
    /// Compute backend.
    pub backend: BackendConfig,
    /// Distribution over MPI ranks.
    pub parallel: ParallelConfig,
    /// Mock-sky simulator.
    pub simulate: SimulateConfig,
}

/// `[grid]`: HEALPix × log-radius chart (docs/model.md).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GridConfig {
    /// nside of ICR level 0 (power of two).
    pub nside0: u32,
    /// Radial shells of ICR level 0.
    pub n_r0: usize,
    /// Number of refinement levels; final nside = nside0 · 2^levels.
    pub levels: usize,
    /// Prior-only chart shells at either radial end of the final level.
    pub padding: usize,
    /// Inner edge of the shells the likelihood sees, pc.
    pub r_min_pc: f64,
    /// Outer edge of the shells the likelihood sees, pc.
    pub r_max_pc: f64,
    /// Storage precision of the refinement matrices: "f64" or "f32".
    pub matrix_precision: Precision,
}

impl Default for GridConfig {
    fn default() -> Self {
        Self {
            nside0: 2,
            n_r0: 12,
            levels: 2,
            padding: 2,
            r_min_pc: 40.0,
            r_max_pc: 2000.0,
            matrix_precision: Precision::F64,
        }
    }
}

/// `[kernel]`: stationary isotropic covariance of ln ρ.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// "matern12", "matern32", "matern52" or "spectrum".
    pub kind: KernelKind,
    /// Prior standard deviation of the log-density (dimensionless).
    pub std: f64,
    /// Matérn length scale, pc.
    pub length_pc: f64,
    /// For kind = "spectrum": two-column text file `k [1/pc]  P(k) [pc^3]`.
    pub spectrum_file: Option<String>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            kind: KernelKind::Matern32,
            std: 1.5,
            length_pc: 30.0,
            spectrum_file: None,
        }
    }
}

impl KernelConfig {
    /// The kernel's parameters.
    pub fn params(&self) -> KernelParams {
        KernelParams {
            kind: self.kind,
            std: self.std,
            length_pc: self.length_pc,
            spectrum_file: self.spectrum_file.as_ref().map(Into::into),
        }
    }

    /// The kernel itself.
    pub fn build(&self) -> Result<Box<dyn crate::sphere::covariance::Kernel>> {
        crate::sphere::covariance::from_params(&self.params())
    }
}

/// `[prior]`: ρ = exp(scale · s + offset).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PriorConfig {
    /// Mean of the log-normal prior of the scale.
    pub scale_mean: f64,
    /// Standard deviation of the log-normal prior of the scale.
    pub scale_std: f64,
    /// Mean of the normal prior of the offset (ln of catalog units per pc).
    pub offset_mean: f64,
    /// Standard deviation of the normal prior of the offset.
    pub offset_std: f64,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            scale_mean: 1.0,
            scale_std: 0.5,
            offset_mean: -6.91,
            offset_std: 1.0,
        }
    }
}

/// `[noise]`: per-star inverse-gamma error inflation n_σ.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseConfig {
    /// Shape of the inverse-gamma prior.
    pub nsigma_shape: f64,
    /// Scale of the inverse-gamma prior.
    pub nsigma_scale: f64,
    /// Whether n_σ is inferred (MAP) or fixed at 1.
    pub infer_nsigma: bool,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self {
            nsigma_shape: 3.0,
            nsigma_scale: 4.0,
            infer_nsigma: true,
        }
    }
}

/// `[inference]`: the MGVI schedule, a list of stages run in order.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Stages of the schedule (`[[inference.stage]]`).
    pub stage: Vec<StageConfig>,
    /// Directory for checkpoints; next to the output map if absent.
    pub checkpoint_dir: Option<String>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            stage: vec![StageConfig::default()],
            checkpoint_dir: None,
        }
    }
}

/// One stage of the MGVI schedule.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StageConfig {
    /// ICR levels active in this stage (≤ grid.levels); missing = all.
    pub levels: Option<usize>,
    /// Use stars whose 1/ω is below this distance, pc; missing = all.
    pub max_distance_pc: Option<f64>,
    /// Fraction of the selected stars used (random subset, nested across stages).
    pub star_fraction: f64,
    /// Number of antithetic sample pairs.
    pub sample_pairs: usize,
    /// Global MGVI iterations in this stage.
    pub iterations: usize,
    /// Cap of conjugate-gradient iterations when drawing a sample.
    pub sample_cg_iterations: usize,
    /// Relative residual tolerance of the sampling CG.
    pub sample_cg_tolerance: f64,
    /// Newton steps of the KL minimisation per global iteration.
    pub newton_steps: usize,
    /// Cap of CG iterations inside one Newton step.
    pub newton_cg_iterations: usize,
    /// Relative residual at which a Newton step's inner CG stops.
    pub newton_forcing: f64,
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            levels: None,
            max_distance_pc: None,
            star_fraction: 1.0,
            sample_pairs: 2,
            iterations: 5,
            sample_cg_iterations: 100,
            sample_cg_tolerance: 1e-3,
            newton_steps: 5,
            newton_cg_iterations: 50,
            newton_forcing: 0.1,
        }
    }
}

impl StageConfig {
    /// The settings of one global iteration in this stage.
    pub fn iteration_settings(&self) -> crate::inference::mgvi::IterationSettings {
        crate::inference::mgvi::IterationSettings {
            sample_pairs: self.sample_pairs,
            sample_cg_iterations: self.sample_cg_iterations,
            sample_cg_tolerance: self.sample_cg_tolerance,
            newton_steps: self.newton_steps,
            newton_cg_iterations: self.newton_cg_iterations,
            newton_forcing: self.newton_forcing,
        }
    }
}

/// `[output]`: what goes into the map file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Product shells start here, pc; the integral inside goes to the inner map (paper: 69).
    pub r_min_pc: Option<f64>,
    /// Product shells end here, pc (paper: 1250).
    pub r_max_pc: Option<f64>,
    /// Write the posterior samples into the map file.
    pub samples: bool,
    /// Unit string of ρ written into the files.
    pub units: String,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            r_min_pc: None,
            r_max_pc: None,
            samples: true,
            units: "E (ZGR23) / pc".into(),
        }
    }
}

/// `[backend]`: where the heavy kernels run.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// "cpu" or "opencl".
    pub kind: BackendKind,
    /// Worker threads for `fit` (0 = all cores); `--threads` and DUST3D_THREADS override it.
    pub threads: usize,
    /// OpenCL arithmetic: "f64" (needs cl_khr_fp64) or "f32" (relative error ~1e-6 per
    /// operation; the fit then agrees with f64 to about 1e-5).
    pub precision: Precision,
    /// OpenCL platform: index or name substring (default the first; env
    /// DUST3D_OPENCL_PLATFORM overrides).
    pub platform: Option<String>,
    /// OpenCL device: index or name substring (default the first; env DUST3D_OPENCL_DEVICE
    /// overrides).
    pub device: Option<String>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::Cpu,
            threads: 0,
            precision: Precision::F64,
            platform: None,
            device: None,
        }
    }
}

impl BackendConfig {
    /// The OpenCL device choice: environment first, then the configuration.
    pub fn device_spec(&self) -> crate::backend::opencl::DeviceSpec {
        let env = crate::backend::opencl::DeviceSpec::from_env();
        crate::backend::opencl::DeviceSpec {
            platform: env.platform.or_else(|| self.platform.clone()),
            device: env.device.or_else(|| self.device.clone()),
        }
    }
}

/// Where the likelihood's voxel and star stages run (`backend.kind`, `fit --backend`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Rust on the CPU cores (rayon threads).
    #[default]
    Cpu,
    /// An OpenCL device (GPU, or a CPU through PoCL).
    Opencl,
}

/// `[parallel]`: how `mpirun -n N dust3d fit` splits the sky (docs/architecture.md).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// nside of the patches ranks own (power of two, 12·nside_dec² ≥ ranks, at most the
    /// nside where the last refinement starts). Default: 8, or that nside if coarser.
    /// Results are bit-identical for any rank count at a fixed nside_dec.
    pub nside_dec: Option<u32>,
}

impl Config {
    /// The decomposition nside: configured, or the default for the chart.
    pub fn nside_dec(&self) -> Result<u32> {
        let chart = self.chart()?;
        Ok(self
            .parallel
            .nside_dec
            .unwrap_or_else(|| crate::sphere::decomp::default_nside_dec(&chart)))
    }
}

/// `[simulate]`: the mock sky of `dust3d simulate`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
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
            disk_density: 2e-4,
            disk_scale_height_pc: 100.0,
            cloud: default_clouds(),
        }
    }
}

/// One Gaussian ellipsoidal cloud of the mock truth.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
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

impl Config {
    /// Parse a TOML string; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: Config =
            toml::from_str(text).with_context(|| format!("{origin}: invalid configuration"))?;
        cfg.validate()
            .with_context(|| format!("{origin}: invalid configuration"))?;
        Ok(cfg)
    }

    /// Read and check a configuration file.
    pub fn from_file(path: &Path) -> Result<(Self, String)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let cfg = Self::from_toml(&text, &path.display().to_string())?;
        Ok((cfg, text))
    }

    /// A small grid for tests: nside0 1 with `levels` refinements, 6 level-0 shells, one
    /// padding shell, kept range 50–800 pc.
    #[cfg(test)]
    pub(crate) fn tiny(seed: u64, levels: usize) -> Self {
        let mut cfg = Config {
            seed,
            ..Default::default()
        };
        cfg.grid = GridConfig {
            nside0: 1,
            n_r0: 6,
            levels,
            padding: 1,
            r_min_pc: 50.0,
            r_max_pc: 800.0,
            ..cfg.grid
        };
        cfg
    }

    /// The model's priors and noise model (`[prior]`, `[noise]`).
    pub fn model_params(&self) -> crate::likelihood::model::ModelParams {
        let p = &self.prior;
        crate::likelihood::model::ModelParams {
            scale: crate::sphere::transforms::LogNormal::from_mean_std(p.scale_mean, p.scale_std),
            offset: crate::sphere::transforms::Normal {
                mean: p.offset_mean,
                std: p.offset_std,
            },
            nsigma: crate::sphere::transforms::InvGamma::new(
                self.noise.nsigma_shape,
                self.noise.nsigma_scale,
            ),
            infer_nsigma: self.noise.infer_nsigma,
        }
    }

    /// The ICR chart described by `[grid]`.
    pub fn chart(&self) -> Result<Chart> {
        let g = &self.grid;
        Chart::new(
            g.nside0, g.n_r0, g.levels, g.padding, g.r_min_pc, g.r_max_pc,
        )
    }

    /// Semantic checks; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.chart().context("key [grid]")?;
        let k = &self.kernel;
        if !(k.std > 0.0 && k.std.is_finite()) {
            bail!("kernel.std must be > 0, got {}", k.std);
        }
        if !(k.length_pc > 0.0 && k.length_pc.is_finite()) {
            bail!("kernel.length_pc must be > 0, got {}", k.length_pc);
        }
        if k.kind == KernelKind::Spectrum && k.spectrum_file.is_none() {
            bail!("kernel.kind = \"spectrum\" needs kernel.spectrum_file");
        }
        let p = &self.prior;
        if !(p.scale_mean > 0.0 && p.scale_std > 0.0 && p.offset_std > 0.0) {
            bail!("prior.scale_mean, prior.scale_std and prior.offset_std must be > 0");
        }
        let n = &self.noise;
        if !(n.nsigma_shape > 0.0 && n.nsigma_scale > 0.0) {
            bail!("noise.nsigma_shape and noise.nsigma_scale must be > 0");
        }
        self.validate_catalog()?;
        self.validate_inference()?;
        if let Some(n) = self.parallel.nside_dec {
            let chart = self.chart()?;
            if !n.is_power_of_two() || n > chart.nside_final() {
                bail!(
                    "parallel.nside_dec must be a power of two ≤ the map nside {}, got {n}",
                    chart.nside_final()
                );
            }
        }
        self.validate_simulate()?;
        Ok(())
    }

    fn validate_catalog(&self) -> Result<()> {
        let c = &self.catalog;
        if c.quality_below.is_some() && c.columns.quality.is_none() {
            bail!("catalog.quality_below needs catalog.columns.quality");
        }
        for (key, v) in [
            ("catalog.d_max_pc", c.d_max_pc),
            ("catalog.d_min_pc", c.d_min_pc),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    bail!("{key} must be > 0, got {v}");
                }
            }
        }
        if let (Some(lo), Some(hi)) = (c.d_min_pc, c.d_max_pc) {
            if lo >= hi {
                bail!("catalog.d_min_pc ({lo}) must be below catalog.d_max_pc ({hi})");
            }
        }
        Ok(())
    }

    fn validate_inference(&self) -> Result<()> {
        if self.inference.stage.is_empty() {
            bail!("inference.stage: the schedule needs at least one stage");
        }
        for (i, s) in self.inference.stage.iter().enumerate() {
            let key = format!("inference.stage[{i}]");
            if let Some(l) = s.levels {
                if l > self.grid.levels {
                    bail!(
                        "{key}.levels = {l} exceeds grid.levels = {}",
                        self.grid.levels
                    );
                }
            }
            if !(s.star_fraction > 0.0 && s.star_fraction <= 1.0) {
                bail!(
                    "{key}.star_fraction must be in (0, 1], got {}",
                    s.star_fraction
                );
            }
            if !(s.newton_forcing > 0.0 && s.newton_forcing < 1.0) {
                bail!(
                    "{key}.newton_forcing must be in (0, 1), got {}",
                    s.newton_forcing
                );
            }
            if s.sample_pairs == 0 || s.iterations == 0 {
                bail!("{key}: sample_pairs and iterations must be ≥ 1");
            }
        }
        Ok(())
    }

    fn validate_simulate(&self) -> Result<()> {
        let s = &self.simulate;
        if s.n_stars == 0 {
            bail!("simulate.n_stars must be ≥ 1");
        }
        for (key, r) in [
            ("simulate.parallax_error_mas", s.parallax_error_mas),
            ("simulate.extinction_error", s.extinction_error),
        ] {
            if !(r[0] > 0.0 && r[1] >= r[0]) {
                bail!("{key} must be [lo, hi] with 0 < lo ≤ hi, got {r:?}");
            }
        }
        if !(0.0..=1.0).contains(&s.outlier_fraction) {
            bail!(
                "simulate.outlier_fraction must be in [0, 1], got {}",
                s.outlier_fraction
            );
        }
        if !matches!(s.truth.as_str(), "clouds" | "prior") {
            bail!(
                "simulate.truth must be \"clouds\" or \"prior\", got {:?}",
                s.truth
            );
        }
        if !matches!(s.star_distances.as_str(), "volume" | "parallax") {
            bail!(
                "simulate.star_distances must be \"volume\" or \"parallax\", got {:?}",
                s.star_distances
            );
        }
        if !matches!(s.star_sky.as_str(), "uniform" | "disk") {
            bail!(
                "simulate.star_sky must be \"uniform\" or \"disk\", got {:?}",
                s.star_sky
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn unknown_key_named_with_line() {
        let err = Config::from_toml("seed = 1\n[grid]\nnsid0 = 4\n", "x.toml").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("nsid0"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn semantic_error_names_key() {
        let err = Config::from_toml("[kernel]\nstd = -1.0\n", "y.toml").unwrap_err();
        assert!(format!("{err:#}").contains("kernel.std"));
        let err = Config::from_toml("[[inference.stage]]\nlevels = 9\n", "y.toml").unwrap_err();
        assert!(format!("{err:#}").contains("inference.stage[0].levels"));
    }

    #[test]
    fn shipped_configs_parse() {
        for f in ["configs/demo.toml", "configs/paper.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::from_file(&path).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        }
    }
}
