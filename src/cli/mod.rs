//! Command-line interface: argument parsing and dispatch to the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

use crate::app::config::{BackendKind, Config, Precision};
use crate::data::catalog::write_catalog;

mod products;

/// dust3d: Bayesian 3D dust mapping (HEALPix × log-radius GP via ICR, MGVI).
#[derive(Parser, Debug)]
#[command(name = "dust3d", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads (default: all cores, or DUST3D_THREADS / RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate a mock sky: a truth map and a star catalog observed through it.
    Simulate(SimulateArgs),
    /// Fit a posterior map to a catalog (MGVI), with checkpoints after every iteration.
    Fit(FitArgs),
    /// Recovery metrics of a fit of a simulated sky against its truth.
    Recovery(RecoveryArgs),
    /// Draw a figure of a map (PNG): sky (Mollweide of integrated extinction), xyz (X–Y,
    /// X–Z, Y–Z slab projections), uncertainty (relative std of integrated extinction) or
    /// stars (sky density of the stars the fit used).
    Plot(products::PlotArgs),
    /// Extinction at points: differential or integrated, mean, std or samples.
    Query(products::QueryArgs),
    /// Export a map in the published release's FITS layout (readable by dustmaps).
    Export(products::ExportArgs),
    /// Interpolate a map onto a Cartesian (box) or (l, b, d) (lbd) grid.
    Interp {
        #[command(subcommand)]
        kind: products::InterpKind,
    },
    /// Predicted extinction to the stars of any catalog (with its parallax uncertainty).
    Predict(products::PredictArgs),
    /// Compare a map with a reference map (paper Fig. 10): 2D histogram and quantiles.
    Compare(products::CompareArgs),
    /// Score a map against the measured extinctions of any catalog: z-score quantiles,
    /// 1σ/2σ coverage, χ²/star and Pearson r, overall and by extinction level.
    Validate(ValidateArgs),
    /// Summarise a map, fit checkpoint or catalog file (catalogs are validated and selected as
    /// in a fit).
    Info(InfoArgs),
    /// Check a configuration file and print it with all defaults filled in.
    Config(ConfigArgs),
    /// How well the configuration's ICR chart reproduces its kernel's variance, shell by
    /// shell (prior draws).
    PriorCheck(PriorCheckArgs),
    /// Memory and time per rank of a distributed fit, before running it.
    Plan(PlanArgs),
    /// Benchmarks of the hot kernels on the shared presets W1/W2.
    Bench(BenchArgs),
}

/// Arguments of `dust3d simulate`.
#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Run configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Catalog to write (.csv, .csv.gz, .fits, .nc).
    #[arg(long)]
    pub out_catalog: PathBuf,
    /// Truth map to write (netCDF).
    #[arg(long)]
    pub out_truth: PathBuf,
    /// Override the seed of the configuration.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Arguments of `dust3d fit`.
#[derive(clap::Args, Debug)]
pub struct FitArgs {
    /// Run configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Star catalog (.csv, .csv.gz, .fits, .nc).
    #[arg(long)]
    pub catalog: PathBuf,
    /// Output map (netCDF); `<stem>_stars.csv`, `<stem>_history.csv` and the checkpoint
    /// `<stem>.ckpt` go next to it.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the checkpoint of an interrupted run.
    #[arg(long)]
    pub resume: bool,
    /// Directory for the checkpoints (overrides `inference.checkpoint_dir`; e.g. a
    /// scratch file system in batch jobs).
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// Compute backend, overriding `backend.kind`: cpu or opencl (device from
    /// `backend.platform` / `backend.device` or DUST3D_OPENCL_PLATFORM / _DEVICE; under
    /// mpirun one device per rank, by node-local rank from `backend.devices` or
    /// DUST3D_OPENCL_DEVICE=0,1,…, else rank mod devices present).
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<BackendKind>,
    /// Fraction of the stars held out of the fit and scored against its map (overrides
    /// `validation.holdout_fraction`; 0: none).
    #[arg(long)]
    pub holdout: Option<f64>,
}

/// Arguments of `dust3d recovery`.
#[derive(clap::Args, Debug)]
pub struct RecoveryArgs {
    /// Fitted map.
    #[arg(long)]
    pub map: PathBuf,
    /// Truth map written by `dust3d simulate`.
    #[arg(long)]
    pub truth: PathBuf,
    /// The simulated catalog (with its true_distance_pc column).
    #[arg(long)]
    pub catalog: PathBuf,
    /// Configuration (column names).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Arguments of `dust3d info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Map (.nc), checkpoint (.ckpt) or catalog file.
    pub file: PathBuf,
    /// Configuration giving column names and cuts (defaults otherwise).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Arguments of `dust3d config`.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// Run configuration (TOML).
    pub file: PathBuf,
}

/// Arguments of `dust3d plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Run configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// MPI ranks.
    #[arg(long, default_value_t = 64)]
    pub ranks: usize,
    /// Stars after the selection cuts (default: the paper's 54 million).
    #[arg(long, default_value_t = 54e6)]
    pub stars: f64,
    /// Threads per rank, for the time estimate.
    #[arg(long, default_value_t = 16)]
    pub threads_per_rank: usize,
    /// Do not time the kernels here (use fixed reference speeds).
    #[arg(long)]
    pub no_timing: bool,
    /// Global memory of each OpenCL device, GB: say whether the ranks sharing one fit on it
    /// (in `backend.precision`).
    #[arg(long)]
    pub device_gb: Option<f64>,
    /// MPI ranks sharing one OpenCL device (with --device-gb).
    #[arg(long, default_value_t = 1)]
    pub ranks_per_device: usize,
}

/// Arguments of `dust3d bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to time: icr, likelihood (value + gradient), metric (metric-vector product),
    /// mgvi (one global MGVI iteration), query (point queries of a map on the preset grid),
    /// or stream (this machine's memory bandwidth, the triad; icr, likelihood and metric
    /// report their bytes and fraction of it too).
    pub what: String,
    /// Preset: w1 or w2.
    #[arg(long, default_value = "w1")]
    pub preset: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Timed repetitions after warm-up.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Compute backend: cpu, or opencl (device from DUST3D_OPENCL_PLATFORM /
    /// DUST3D_OPENCL_DEVICE, index or name).
    #[arg(long, value_parser = parse_backend, default_value = "cpu")]
    pub backend: BackendKind,
    /// Arithmetic precision on an OpenCL device: f64 or f32.
    #[arg(long, value_enum, default_value_t = Precision::F64)]
    pub device_precision: Precision,
    /// Storage precision of the refinement matrices: f64 or f32.
    #[arg(long, value_enum, default_value_t = Precision::F64)]
    pub precision: Precision,
    /// mgvi: relative residual at which each Newton step's CG stops (1e-12 runs the
    /// full 10 iterations, the reference's work).
    #[arg(long, default_value_t = 0.1)]
    pub newton_forcing: f64,
    /// likelihood, metric, mgvi: run on the preset's chart ended at this ICR level, as a
    /// schedule stage with `levels` below the grid's does (default: all levels).
    #[arg(long)]
    pub levels: Option<usize>,
}

pub(crate) fn load_config(path: Option<&Path>) -> Result<(Config, String)> {
    match path {
        Some(p) => Config::from_file(p),
        None => Ok((Config::default(), String::new())),
    }
}

/// The global thread pool: `n` threads (else `DUST3D_THREADS`, else rayon's default), each
/// with the main thread's stack size, since the command itself runs on one of them.
fn set_threads(n: Option<usize>) -> Result<()> {
    let n = n.or_else(|| {
        std::env::var("DUST3D_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
    });
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(MAIN_STACK_BYTES);
    if let Some(n) = n {
        pool = pool.num_threads(n);
    }
    match pool.build_global() {
        Ok(()) => Ok(()),
        Err(e) if n.is_some() => Err(e).context("cannot configure the thread pool"),
        // already built (a second run in one process): its threads serve as they are
        Err(_) => Ok(()),
    }
}

/// Stack of the pool's threads: what Linux gives a main thread.
const MAIN_STACK_BYTES: usize = 8 << 20;

/// `f` run on a thread of the global pool, the caller waiting. Every parallel loop of the
/// command then starts from inside the pool: from outside, each one wakes the pool and
/// puts the caller to sleep and back, and in between the pool's threads spin and yield —
/// a fifth of a small fit's time (a prior-draw.toml fit 68.6 s against 54.0 s, the same
/// bits). Under MPI only where the library takes calls from any thread.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if crate::base::comm::calls_from_any_thread() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// `--backend` of `fit` and `bench`: the values of `backend.kind`.
fn parse_backend(s: &str) -> std::result::Result<BackendKind, String> {
    <BackendKind as clap::ValueEnum>::from_str(s, true)
        .map_err(|_| format!("backend.kind must be cpu or opencl, got {s:?}"))
}

/// Parse the command line and run the chosen command.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    set_threads(cli.threads)?;
    let distributed = matches!(cli.command, Command::Fit(_));
    if crate::base::comm::size() > 1 && !distributed {
        anyhow::bail!(
            "only `dust3d fit` runs on several MPI ranks; run this command without mpirun"
        );
    }
    on_pool(|| dispatch(cli.command))
}

/// Run the command `c`.
fn dispatch(c: Command) -> Result<()> {
    match c {
        Command::Simulate(a) => simulate(a),
        Command::Fit(a) => fit(a),
        Command::Recovery(a) => recovery(a),
        Command::Plot(a) => products::plot(a),
        Command::Query(a) => products::query(a),
        Command::Export(a) => products::export(a),
        Command::Interp { kind } => products::interp(kind),
        Command::Predict(a) => products::predict(a),
        Command::Compare(a) => products::compare(a),
        Command::Validate(a) => validate(a),
        Command::Info(a) => {
            let (cfg, _) = load_config(a.config.as_deref())?;
            print!("{}", crate::app::info::run(&a.file, &cfg)?);
            Ok(())
        }
        Command::Config(a) => {
            let (cfg, _) = load_config(Some(&a.file))?;
            let text = toml::to_string_pretty(&cfg).context("cannot print configuration")?;
            print!("{text}");
            Ok(())
        }
        Command::Plan(a) => plan(a),
        Command::PriorCheck(a) => {
            let (cfg, _) = load_config(Some(&a.config))?;
            print!("{}", crate::app::prior_check::run(&cfg, a.draws)?);
            Ok(())
        }
        Command::Bench(a) => bench(a),
    }
}

/// `dust3d simulate`.
fn simulate(a: SimulateArgs) -> Result<()> {
    let (mut cfg, text) = load_config(Some(&a.config))?;
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if crate::data::catalog::Format::of(&a.out_catalog)? == crate::data::catalog::Format::Parquet {
        anyhow::bail!(
            "{}: simulate writes catalogs as CSV, FITS or netCDF (.csv, .csv.gz, .fits, .nc); \
             Parquet is read only",
            a.out_catalog.display()
        );
    }
    let sim = crate::app::simulate::run(&cfg, &text)?;
    write_catalog(&sim.catalog, &a.out_catalog)?;
    sim.truth.write(&a.out_truth)?;
    tracing::info!(
        stars = sim.catalog.len(),
        catalog = %a.out_catalog.display(),
        truth = %a.out_truth.display(),
        "simulated mock sky"
    );
    Ok(())
}

/// `dust3d fit`.
fn fit(a: FitArgs) -> Result<()> {
    let (mut cfg, text) = load_config(Some(&a.config))?;
    if let Some(d) = a.checkpoint_dir {
        cfg.inference.checkpoint_dir = Some(d);
    }
    if let Some(b) = a.backend {
        cfg.backend.kind = b;
    }
    if let Some(h) = a.holdout {
        cfg.validation.holdout_fraction = h;
        cfg.validate()?;
    }
    crate::app::fit::run(&cfg, &text, &a.catalog, &a.out, a.resume)
}

/// Arguments of `dust3d prior-check`.
#[derive(clap::Args, Debug)]
pub struct PriorCheckArgs {
    /// Run configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Prior draws (the standard error of each shell's ratio falls as 1/√draws).
    #[arg(long, default_value_t = 100)]
    pub draws: usize,
}

/// Arguments of `dust3d validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Map (dust3d netCDF or the release's FITS layout).
    #[arg(long)]
    pub map: PathBuf,
    /// Stars with measured extinctions (any catalog format).
    #[arg(long)]
    pub catalog: PathBuf,
    /// Configuration giving column names and cuts (defaults otherwise).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The star's column: "pixel" (its own pixel, as the fit sees it) or "interpolated"
    /// (the four-pixel interpolation of `query` and dustmaps).
    #[arg(long, default_value = "pixel")]
    pub angular: crate::products::predict::Angular,
    /// Also write the scores as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `dust3d validate`.
fn validate(a: ValidateArgs) -> Result<()> {
    let (cfg, _) = load_config(a.config.as_deref())?;
    let map = crate::products::dustmaps::open_map(&a.map)?;
    let cat = crate::data::catalog::Catalog::read(&a.catalog, &cfg.catalog)?;
    let stars = crate::products::validation::predicted_from_map(&map, &cat, a.angular)?;
    let v = crate::products::validation::validate(&stars);
    print!("{}", v.summary());
    if let Some(out) = &a.out {
        let json = serde_json::to_string_pretty(&v)?;
        crate::base::atomic::write_atomically(out, |tmp| {
            std::fs::write(tmp, &json)?;
            Ok(())
        })
        .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// `dust3d recovery`.
fn recovery(a: RecoveryArgs) -> Result<()> {
    let (cfg, _) = load_config(a.config.as_deref())?;
    let fit = crate::products::mapfile::DustMap::read(&a.map)?;
    let tru = crate::products::mapfile::DustMap::read(&a.truth)?;
    let r = crate::app::recovery::evaluate(&fit, &tru, &a.catalog, &cfg)?;
    println!(
        "recovery: Pearson r of integrated extinction at {} true star positions = {:.4}; \
         {:.1} % of {} constrained truth voxels inside mean ± 1σ",
        r.n_stars,
        r.pearson_integrated,
        100.0 * r.coverage_1sigma,
        r.n_voxels
    );
    println!(
        "integrated extinction at the true star positions, truth against the posterior:\n\
         in the star's pixel (as fitted):\n{}through query (interpolated):\n{}",
        r.at_stars_pixel.summary(),
        r.at_stars_query.summary()
    );
    println!(
        "a calibrated posterior puts {:.3} / {:.3} inside ±1σ / ±2σ with σ estimated from {} \
         antithetic sample pairs (Student's t with {} degrees of freedom; 0.683 / 0.954 only \
         for many pairs)",
        r.calibrated[0], r.calibrated[1], r.pairs, r.pairs
    );
    Ok(())
}

/// `dust3d plan`.
fn plan(a: PlanArgs) -> Result<()> {
    let (cfg, _) = load_config(Some(&a.config))?;
    anyhow::ensure!(
        a.ranks >= 1 && a.threads_per_rank >= 1,
        "--ranks and --threads-per-rank must be ≥ 1"
    );
    let opts = crate::app::plan::PlanOptions {
        ranks: a.ranks,
        stars: a.stars,
        threads_per_rank: a.threads_per_rank,
        no_timing: a.no_timing,
        device_gb: a.device_gb,
        ranks_per_device: a.ranks_per_device,
    };
    print!("{}", crate::app::plan::run(&cfg, &opts)?);
    Ok(())
}

/// `dust3d bench`.
fn bench(a: BenchArgs) -> Result<()> {
    let opts = crate::app::bench::BenchOptions {
        reps: a.reps,
        precision: a.precision,
        newton_forcing: a.newton_forcing,
        device_precision: a.device_precision,
        opencl: a.backend == BackendKind::Opencl,
        levels: a.levels,
    };
    let out = crate::app::bench::run(&a.what, &a.preset, opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&out.json)?);
    } else {
        print!("{}", out.text);
    }
    Ok(())
}
