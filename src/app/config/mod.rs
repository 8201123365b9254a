//! Run configuration (TOML). Every section has defaults; unknown keys are rejected with
//! their name and position, and the semantic checks (`validate.rs`) name the offending key
//! and its line.
//!
//! The whole schema stays in this one file so that a reader finds every key and its default
//! together; the modules own what the keys become.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::app::simulate::{CloudConfig, SimulateConfig};
pub use crate::base::precision::Precision;
/// `[catalog]` is the catalog module's own parameter struct (column names, selection cuts).
pub use crate::data::catalog::{CatalogParams as CatalogConfig, ColumnNames};
use crate::prior::icr::variance::VarianceParams;
pub use crate::sphere::covariance::KernelKind;
use crate::sphere::covariance::KernelParams;
use crate::sphere::grid::Chart;

/// A configuration value that is not allowed, with the key it belongs to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The dotted key, e.g. `kernel.std` or `inference.stage[1].levels`.
    pub key: String,
    /// What is wrong, naming the key.
    pub message: String,
}

/// A [`ConfigError`] for `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> anyhow::Error {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
    .into()
}

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
    /// The stars' distance prior in their distance windows.
    pub distances: DistanceConfig,
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
    /// Held-out stars scored against the finished map.
    pub validation: ValidationConfig,
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
    /// Scale the final field per shell so its prior variance is the kernel's k(0)
    /// (`prior::icr::variance`).
    pub variance_correction: bool,
    /// Target relative standard error of the correction's per-shell variance estimate.
    pub variance_rtol: f64,
    /// Most prior draws of the correction's estimate.
    pub variance_max_draws: usize,
}

impl GridConfig {
    /// The variance correction's estimate settings.
    pub fn variance_params(&self) -> VarianceParams {
        VarianceParams {
            rel_tol: self.variance_rtol,
            max_draws: self.variance_max_draws,
        }
    }
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
            variance_correction: true,
            variance_rtol: VarianceParams::default().rel_tol,
            variance_max_draws: VarianceParams::default().max_draws,
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
    /// The kernel module's defaults.
    fn default() -> Self {
        let p = KernelParams::default();
        Self {
            kind: p.kind,
            std: p.std,
            length_pc: p.length_pc,
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

/// `inference.stage.scale_update`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScaleUpdateName {
    /// One more MGVI coordinate.
    #[default]
    Joint,
    /// The scale's own factor.
    Marginal,
    /// The scale's own factor at the evidence's fixed point (`"evidence"`).
    Evidence,
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
    /// Whether n_σ is inferred or fixed at 1.
    pub infer_nsigma: bool,
    /// Whether the inferred n_σ are sampled with the map (their uncertainty enters the
    /// posterior) or are point estimates shared by every sample. Point estimates let each
    /// star inflate its error to fit its own residual, which pulls the field's scale down
    /// (see docs/model.md).
    pub sample_nsigma: bool,
    /// Whether n_σ is integrated out of each star's likelihood instead (no per-star
    /// parameter; `infer_nsigma` then has no effect; CPU backend and MGVI samples only).
    pub marginalise_nsigma: bool,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self {
            nsigma_shape: 3.0,
            nsigma_scale: 4.0,
            infer_nsigma: true,
            sample_nsigma: false,
            marginalise_nsigma: false,
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

impl InferenceConfig {
    /// The most sample pairs any stage draws (what sizes the memory and the checkpoints).
    pub fn max_sample_pairs(&self) -> usize {
        self.stage.iter().map(|s| s.sample_pairs).max().unwrap_or(1)
    }
}

/// One stage of the MGVI schedule.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StageConfig {
    /// ICR levels active in this stage (≤ grid.levels); missing = all.
    pub levels: Option<usize>,
    /// Use stars with at least a `selection_sigma` chance of lying nearer than this
    /// distance, pc (ω + k σ_ω > 1/d); missing = all.
    pub max_distance_pc: Option<f64>,
    /// k of the stage's distance selection: 2 keeps stars with a ≥ 2σ chance of lying
    /// inside `max_distance_pc` (paper §5); 0 keeps those with 1/ω inside it.
    pub selection_sigma: f64,
    /// Fraction of the selected stars used (random subset, nested across stages).
    pub star_fraction: f64,
    /// Number of antithetic sample pairs.
    pub sample_pairs: usize,
    /// Cap of global MGVI iterations in this stage; it ends earlier once an iteration meets
    /// `kl_rtol`, `step_tol`, `map_tol` and `scale_tol`.
    pub iterations: usize,
    /// Cap of conjugate-gradient iterations when drawing a sample.
    pub sample_cg_iterations: usize,
    /// Relative residual tolerance of the sampling CG.
    pub sample_cg_tolerance: f64,
    /// Newton steps of the KL minimisation per global iteration.
    pub newton_steps: usize,
    /// Cap of CG iterations inside one Newton step.
    pub newton_cg_iterations: usize,
    /// Relative residual at which a Newton step's inner CG stops, against the norm of the
    /// KL gradient without its scale and offset components (geoVI's coordinate equation:
    /// its whole gradient).
    pub newton_forcing: f64,
    /// The stage ends before `iterations` once an iteration changes the KL by at most this
    /// fraction, ...
    pub kl_rtol: f64,
    /// ... moves the expansion point by at most this RMS per parameter (standardized), ...
    pub step_tol: f64,
    /// ... and the sample mean of ln ρ by at most this RMS over the voxels, in units of the
    /// samples' standard deviation of ln ρ (0 in any of the three: always run
    /// `iterations`). The defaults stop a stage once an iteration moves the map by less
    /// than the sampling noise of 2 pairs (about 0.6–1 σ per iteration on the demo).
    pub map_tol: f64,
    /// With the scale in its own factor (`scale_update` "marginal" or "evidence"), the stage
    /// also waits until an update moves the scale by at most this many of its standard
    /// deviations (0: always run `iterations`).
    pub scale_tol: f64,
    /// How samples are drawn: "mgvi" (linear residuals, the paper's choice) or "geovi"
    /// (each refined by solving geoVI's coordinate equation).
    pub sample_mode: SampleModeName,
    /// geoVI only: Gauss–Newton steps per sample of the coordinate equation (its CG uses
    /// `newton_cg_iterations` and `newton_forcing`).
    pub geovi_newton_steps: usize,
    /// How the field's scale is inferred: "joint" (one more coordinate of MGVI's Gaussian,
    /// as in the paper; biased low), "marginal" (its own variational factor, updated from
    /// the samples' second moment after each iteration) or "evidence" (that factor at the
    /// evidence's fixed point in the directions the data determine; one more metric solve
    /// per iteration, and the samples' CG must converge).
    pub scale_update: ScaleUpdateName,
    /// Whether each star's variance includes the spread of its extinction over its distance
    /// uncertainty (σ_a²). `false` in the first stages fits the columns before the distance
    /// structure, so that no star is fitted by a density spike its distance window's tail
    /// reaches; the last stage must keep it.
    pub distance_variance: bool,
}

/// `sample_mode` of a stage.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SampleModeName {
    /// Metric Gaussian VI.
    #[default]
    Mgvi,
    /// Geometric VI.
    Geovi,
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            levels: None,
            max_distance_pc: None,
            selection_sigma: 2.0,
            star_fraction: 1.0,
            sample_pairs: 2,
            iterations: 5,
            sample_cg_iterations: 100,
            sample_cg_tolerance: 1e-3,
            newton_steps: 5,
            newton_cg_iterations: 50,
            newton_forcing: 0.1,
            kl_rtol: 1e-2,
            step_tol: 0.1,
            map_tol: 1.0,
            scale_tol: 0.5,
            sample_mode: SampleModeName::Mgvi,
            geovi_newton_steps: 5,
            scale_update: ScaleUpdateName::default(),
            distance_variance: true,
        }
    }
}

impl StageConfig {
    /// When the stage may end before its iteration cap.
    pub fn convergence(&self) -> crate::inference::mgvi::Convergence {
        crate::inference::mgvi::Convergence {
            kl_rtol: self.kl_rtol,
            step_tol: self.step_tol,
            map_tol: self.map_tol,
            scale_tol: self.scale_tol,
        }
    }

    /// The settings of one global iteration in this stage, with the noise model `noise`.
    pub fn iteration_settings(
        &self,
        noise: &NoiseConfig,
    ) -> crate::inference::mgvi::IterationSettings {
        use crate::inference::mgvi::ScaleUpdate;
        crate::inference::mgvi::IterationSettings {
            sample_nsigma: noise.sample_nsigma,
            scale_update: match self.scale_update {
                ScaleUpdateName::Marginal => ScaleUpdate::Marginal,
                ScaleUpdateName::Evidence => ScaleUpdate::Evidence,
                ScaleUpdateName::Joint => ScaleUpdate::Joint,
            },
            sample_pairs: self.sample_pairs,
            sample_cg_iterations: self.sample_cg_iterations,
            sample_cg_tolerance: self.sample_cg_tolerance,
            newton_steps: self.newton_steps,
            newton_cg_iterations: self.newton_cg_iterations,
            newton_forcing: self.newton_forcing,
            mode: match self.sample_mode {
                SampleModeName::Mgvi => crate::inference::mgvi::SampleMode::Mgvi,
                SampleModeName::Geovi => crate::inference::mgvi::SampleMode::GeoVi(
                    crate::inference::mgvi::geovi::GeoSettings {
                        newton_steps: self.geovi_newton_steps,
                        cg_max_iter: self.newton_cg_iterations,
                        forcing: self.newton_forcing,
                    },
                ),
            },
        }
    }
}

/// `[validation]`: stars kept out of the fit and scored against its map.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Fraction of the selected stars held out (a fixed random subset by source id and
    /// seed), 0 for none; `fit --holdout` overrides it.
    pub holdout_fraction: f64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            holdout_fraction: 0.05,
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
    /// OpenCL devices shared out over the MPI ranks of a node: node-local rank r takes entry
    /// r mod len (indices or name substrings; env DUST3D_OPENCL_DEVICE="0,1,…" overrides).
    /// Unset with several ranks: rank r takes device r mod (devices on the platform).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::Cpu,
            threads: 0,
            precision: Precision::F64,
            platform: None,
            device: None,
            devices: Vec::new(),
        }
    }
}

impl BackendConfig {
    /// The OpenCL device choice: environment first, then the configuration.
    pub fn device_spec(&self) -> crate::backend::opencl::DeviceSpec {
        let env = crate::backend::opencl::DeviceSpec::from_env();
        let from_env = env.device.is_some() || !env.devices.is_empty();
        crate::backend::opencl::DeviceSpec {
            platform: env.platform.or_else(|| self.platform.clone()),
            device: if from_env {
                env.device
            } else {
                self.device.clone()
            },
            devices: if from_env {
                env.devices
            } else {
                self.devices.clone()
            },
            slot: None,
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
    /// nside where the last refinement starts). Default: 8, or that nside if coarser, or
    /// where the coarsest stage's last refinement starts if coarser still.
    /// Results are bit-identical for any rank count at a fixed nside_dec.
    pub nside_dec: Option<u32>,
}

impl Config {
    /// The decomposition nside: configured, or the default for the chart and the schedule.
    pub fn nside_dec(&self) -> Result<u32> {
        let chart = self.chart()?;
        Ok(self.parallel.nside_dec.unwrap_or_else(|| {
            // a coarse stage's chart must be distributed too: its last refinement starts
            // at nside(k − 1)
            let coarsest = self.inference.stage.iter().filter_map(|s| s.levels).min();
            let default = crate::sphere::decomp::default_nside_dec(&chart);
            coarsest
                .filter(|&k| k < chart.levels)
                .map_or(default, |k| default.min(chart.nside(k.saturating_sub(1))))
        }))
    }
}

impl Config {
    /// Parse a TOML string; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: Config =
            toml::from_str(text).with_context(|| format!("{origin}: invalid configuration"))?;
        cfg.validate()
            .map_err(|e| validate::locate(e, text, origin))?;
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
            marginal_nsigma: self.noise.marginalise_nsigma,
            distance_variance: true,
            distance_prior: self.distance_prior(),
        }
    }

    /// The ICR chart described by `[grid]`.
    pub fn chart(&self) -> Result<Chart> {
        let g = &self.grid;
        Chart::new(
            g.nside0, g.n_r0, g.levels, g.padding, g.r_min_pc, g.r_max_pc,
        )
    }
}

mod distances;
pub use distances::{DistanceConfig, DistancePriorName};
#[cfg(test)]
mod tests;
mod validate;
pub use validate::key_line;
