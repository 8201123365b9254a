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
    Simulate {
        /// Run configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Catalog to write (.csv, .csv.gz, .fits, .nc).
        #[arg(long)]
        out_catalog: PathBuf,
        /// Truth map to write (netCDF).
        #[arg(long)]
        out_truth: PathBuf,
        /// Override the seed of the configuration.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Fit a posterior map to a catalog (MGVI), with checkpoints after every iteration.
    Fit {
        /// Run configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Star catalog (.csv, .csv.gz, .fits, .nc).
        #[arg(long)]
        catalog: PathBuf,
        /// Output map (netCDF); `<stem>_stars.csv`, `<stem>_history.csv` and the checkpoint
        /// `<stem>.ckpt` go next to it.
        #[arg(long)]
        out: PathBuf,
        /// Continue from the checkpoint of an interrupted run.
        #[arg(long)]
        resume: bool,
        /// Directory for the checkpoints (overrides `inference.checkpoint_dir`; e.g. a
        /// scratch file system in batch jobs).
        #[arg(long)]
        checkpoint_dir: Option<String>,
        /// Compute backend, overriding `backend.kind`: cpu or opencl (device from
        /// `backend.platform` / `backend.device` or DUST3D_OPENCL_PLATFORM / _DEVICE).
        #[arg(long, value_parser = parse_backend)]
        backend: Option<BackendKind>,
    },
    /// Recovery metrics of a fit of a simulated sky against its truth.
    Recovery {
        /// Fitted map.
        #[arg(long)]
        map: PathBuf,
        /// Truth map written by `dust3d simulate`.
        #[arg(long)]
        truth: PathBuf,
        /// The simulated catalog (with its true_distance_pc column).
        #[arg(long)]
        catalog: PathBuf,
        /// Configuration (column names).
        #[arg(long)]
        config: Option<PathBuf>,
    },
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
    /// Summarise a map, fit checkpoint or catalog file (catalogs are validated and selected as
    /// in a fit).
    Info {
        /// Map (.nc), checkpoint (.ckpt) or catalog file.
        file: PathBuf,
        /// Configuration giving column names and cuts (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and print it with all defaults filled in.
    Config {
        /// Run configuration (TOML).
        file: PathBuf,
    },
    /// Memory and time per rank of a distributed fit, before running it.
    Plan {
        /// Run configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// MPI ranks.
        #[arg(long, default_value_t = 64)]
        ranks: usize,
        /// Stars after the selection cuts (default: the paper's 54 million).
        #[arg(long, default_value_t = 54e6)]
        stars: f64,
        /// Threads per rank, for the time estimate.
        #[arg(long, default_value_t = 16)]
        threads_per_rank: usize,
        /// Do not time the kernels here (use fixed reference speeds).
        #[arg(long)]
        no_timing: bool,
    },
    /// Benchmarks of the hot kernels on the shared presets W1/W2.
    Bench {
        /// What to time: icr, likelihood (value + gradient), metric (metric-vector product) or
        /// mgvi (one global MGVI iteration), query (point queries of a map on the preset grid).
        what: String,
        /// Preset: w1 or w2.
        #[arg(long, default_value = "w1")]
        preset: String,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Timed repetitions after warm-up.
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// Compute backend: cpu, or opencl (device from DUST3D_OPENCL_PLATFORM /
        /// DUST3D_OPENCL_DEVICE, index or name).
        #[arg(long, value_parser = parse_backend, default_value = "cpu")]
        backend: BackendKind,
        /// Arithmetic precision on an OpenCL device: f64 or f32.
        #[arg(long, value_enum, default_value_t = Precision::F64)]
        device_precision: Precision,
        /// Storage precision of the refinement matrices: f64 or f32.
        #[arg(long, value_enum, default_value_t = Precision::F64)]
        precision: Precision,
        /// mgvi: relative residual at which each Newton step's CG stops (1e-12 runs the
        /// full 10 iterations, the reference's work).
        #[arg(long, default_value_t = 0.1)]
        newton_forcing: f64,
    },
}

pub(crate) fn load_config(path: Option<&Path>) -> Result<(Config, String)> {
    match path {
        Some(p) => Config::from_file(p),
        None => Ok((Config::default(), String::new())),
    }
}

fn set_threads(n: Option<usize>) -> Result<()> {
    let n = n.or_else(|| {
        std::env::var("DUST3D_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
    });
    if let Some(n) = n {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot configure the thread pool")?;
    }
    Ok(())
}

/// `--backend` of `fit` and `bench`: the values of `backend.kind`.
fn parse_backend(s: &str) -> std::result::Result<BackendKind, String> {
    <BackendKind as clap::ValueEnum>::from_str(s, true)
        .map_err(|_| format!("backend.kind must be cpu or opencl, got {s:?}"))
}

/// Parse the command line and run the chosen command.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    if cli.threads.is_some() || std::env::var("DUST3D_THREADS").is_ok() {
        set_threads(cli.threads)?;
    }
    let distributed = matches!(cli.command, Command::Fit { .. });
    if crate::base::comm::size() > 1 && !distributed {
        anyhow::bail!(
            "only `dust3d fit` runs on several MPI ranks; run this command without mpirun"
        );
    }
    match cli.command {
        Command::Simulate {
            config,
            out_catalog,
            out_truth,
            seed,
        } => simulate(&config, &out_catalog, &out_truth, seed),
        Command::Fit {
            config,
            catalog,
            out,
            resume,
            backend,
            checkpoint_dir,
        } => fit(&config, &catalog, &out, resume, backend, checkpoint_dir),
        Command::Recovery {
            map,
            truth,
            catalog,
            config,
        } => recovery(&map, &truth, &catalog, config.as_deref()),
        Command::Plot(a) => products::plot(a),
        Command::Query(a) => products::query(a),
        Command::Export(a) => products::export(a),
        Command::Interp { kind } => products::interp(kind),
        Command::Predict(a) => products::predict(a),
        Command::Compare(a) => products::compare(a),
        Command::Info { file, config } => {
            let (cfg, _) = load_config(config.as_deref())?;
            print!("{}", crate::app::info::run(&file, &cfg)?);
            Ok(())
        }
        Command::Plan {
            config,
            ranks,
            stars,
            threads_per_rank,
            no_timing,
        } => {
            let opts = crate::app::plan::PlanOptions {
                ranks,
                stars,
                threads_per_rank,
                no_timing,
            };
            plan(&config, &opts)
        }
        Command::Config { file } => {
            let (cfg, _) = load_config(Some(&file))?;
            let text = toml::to_string_pretty(&cfg).context("cannot print configuration")?;
            print!("{text}");
            Ok(())
        }
        Command::Bench {
            what,
            preset,
            json,
            reps,
            backend,
            precision,
            newton_forcing,
            device_precision,
        } => {
            let opts = crate::app::bench::BenchOptions {
                reps,
                precision,
                newton_forcing,
                device_precision,
                opencl: backend == BackendKind::Opencl,
            };
            bench(&what, &preset, backend, opts, json)
        }
    }
}

/// `dust3d simulate`.
fn simulate(config: &Path, out_catalog: &Path, out_truth: &Path, seed: Option<u64>) -> Result<()> {
    let (mut cfg, text) = load_config(Some(config))?;
    if let Some(s) = seed {
        cfg.seed = s;
    }
    crate::data::catalog::Format::of(out_catalog)?;
    let sim = crate::app::simulate::run(&cfg, &text)?;
    write_catalog(&sim.catalog, out_catalog)?;
    sim.truth.write(out_truth)?;
    tracing::info!(
        stars = sim.catalog.len(),
        catalog = %out_catalog.display(),
        truth = %out_truth.display(),
        "simulated mock sky"
    );
    Ok(())
}

/// `dust3d fit`.
fn fit(
    config: &Path,
    catalog: &Path,
    out: &Path,
    resume: bool,
    backend: Option<BackendKind>,
    checkpoint_dir: Option<String>,
) -> Result<()> {
    let (mut cfg, text) = load_config(Some(config))?;
    if let Some(d) = checkpoint_dir {
        cfg.inference.checkpoint_dir = Some(d);
    }
    if let Some(b) = backend {
        cfg.backend.kind = b;
    }
    crate::app::fit::run(&cfg, &text, catalog, out, resume)
}

/// `dust3d recovery`.
fn recovery(map: &Path, truth: &Path, catalog: &Path, config: Option<&Path>) -> Result<()> {
    let (cfg, _) = load_config(config)?;
    let fit = crate::products::mapfile::DustMap::read(map)?;
    let tru = crate::products::mapfile::DustMap::read(truth)?;
    let r = crate::app::recovery::evaluate(&fit, &tru, catalog, &cfg)?;
    println!(
        "recovery: Pearson r of integrated extinction at {} true star positions = {:.4}; \
         {:.1} % of {} constrained truth voxels inside mean ± 1σ",
        r.n_stars,
        r.pearson_integrated,
        100.0 * r.coverage_1sigma,
        r.n_voxels
    );
    Ok(())
}

/// `dust3d plan`.
fn plan(config: &Path, opts: &crate::app::plan::PlanOptions) -> Result<()> {
    let (cfg, _) = load_config(Some(config))?;
    anyhow::ensure!(
        opts.ranks >= 1 && opts.threads_per_rank >= 1,
        "--ranks and --threads-per-rank must be ≥ 1"
    );
    print!("{}", crate::app::plan::run(&cfg, opts)?);
    Ok(())
}

/// `dust3d bench`.
fn bench(
    what: &str,
    preset: &str,
    backend: BackendKind,
    opts: crate::app::bench::BenchOptions,
    json: bool,
) -> Result<()> {
    let backend = match backend {
        BackendKind::Cpu => "cpu",
        BackendKind::Opencl => "opencl",
    };
    let out = crate::app::bench::run(what, preset, backend, opts)?;
    if json {
        println!("{}", serde_json::to_string(&out.json)?);
    } else {
        print!("{}", out.text);
    }
    Ok(())
}
