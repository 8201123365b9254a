//! Seeded mutation fuzzing of every reader, through the command that reads each format:
//! catalogs (CSV, CSV.gz, FITS, netCDF) through `info`, maps (netCDF: bytes mutated, and
//! written with structural faults; the release FITS layout) and query tables through `query`, checkpoints through
//! `info`, configurations through `config`. Every case must end with success, or with an
//! error message and a non-zero exit code — never a panic, a signal (crash), a hang beyond
//! 10 s, or a partial output file. The counts are printed.
//!
//! `DUST3D_FUZZ_CASES` sets the cases per format (default 400); `DUST3D_FUZZ_SEED` the seed.
//! A failing case's input is kept under `target/tmp/fuzz-failures/` (format index-case).
//! Whether the netCDF/HDF5 library crashes on a damaged file, or only fails, can depend on
//! the process's memory layout (the lengths of its path and environment), so a case may end
//! differently on another machine: each case runs under a file name of its own length, and
//! a crash on one machine is a crash to catch on all.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dust3d::app::checkpoint::{self, FitState, RunId};
use dust3d::app::config::Config;
use dust3d::inference::mgvi::MgviState;
use dust3d::products::mapfile::DustMap;

const LIMIT: Duration = Duration::from_secs(10);

/// Tokens that text mutations insert: the values readers choke on.
const TOKENS: &[&str] = &[
    "",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e999",
    "-1",
    "0",
    "-0",
    "abc",
    "\"",
    ",",
    ",,",
    "\n",
    "\0",
    "99999999999999999999999",
    "1.5.3",
    "[",
    "]",
    "=",
    "é",
    "\t",
    " ",
    "true",
    "[[inference.stage]]",
    "[grid]",
    "4294967296",
    "-9223372036854775809",
    "0x10",
    "1e-400",
];

/// How one case ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Success,
    Error,
    /// The netCDF/HDF5 C library crashed or looped on the file; dust3d caught it and ended
    /// with its message and exit code 1.
    LibraryFault,
    Panic(String),
    Crash(String),
    Hang,
    Partial(String),
}

/// One mutation of text: a field replaced by a token, a token inserted, a line deleted or
/// duplicated, a byte changed, a range deleted, or the end cut off.
fn mutate_text(rng: &mut ChaCha8Rng, s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    if v.is_empty() {
        return b"x".to_vec();
    }
    let at = rng.random_range(0..v.len());
    match rng.random_range(0..7) {
        0 => {
            // the field around `at`: between separators
            let sep = |c: u8| matches!(c, b',' | b'\n' | b'=' | b' ');
            let start = v[..at].iter().rposition(|&c| sep(c)).map_or(0, |p| p + 1);
            let end = v[at..]
                .iter()
                .position(|&c| sep(c))
                .map_or(v.len(), |p| at + p);
            let tok = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
            v.splice(start..end, tok.iter().copied());
        }
        1 => {
            let tok = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
            v.splice(at..at, tok.iter().copied());
        }
        2 | 3 => {
            let start = v[..at]
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |p| p + 1);
            let end = v[at..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(v.len(), |p| at + p + 1);
            let line: Vec<u8> = v[start..end].to_vec();
            if rng.random_bool(0.5) {
                v.drain(start..end);
            } else {
                v.splice(start..start, line);
            }
        }
        4 => v[at] = rng.random(),
        5 => {
            let end = (at + rng.random_range(1..40)).min(v.len());
            v.drain(at..end);
        }
        _ => v.truncate(at),
    }
    v
}

/// One mutation of binary data: bits flipped, a block zeroed or set to 0xFF, random bytes
/// inserted, a range deleted, or the end cut off.
fn mutate_bytes(rng: &mut ChaCha8Rng, s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    if v.is_empty() {
        return vec![0];
    }
    let at = rng.random_range(0..v.len());
    match rng.random_range(0..6) {
        0 | 1 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        2 => {
            let end = (at + rng.random_range(1..64)).min(v.len());
            let fill = if rng.random_bool(0.5) { 0 } else { 0xFF };
            v[at..end].iter_mut().for_each(|b| *b = fill);
        }
        3 => {
            let n = rng.random_range(1..64);
            let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            v.splice(at..at, ins);
        }
        4 => {
            let end = (at + rng.random_range(1..256)).min(v.len());
            v.drain(at..end);
        }
        _ => v.truncate(at),
    }
    v
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Run `args` (with `{}` replaced by `input`) and classify the ending; `output`, if given,
/// must not exist after a failure.
fn run_case(args: &[String], input: &Path, output: Option<&Path>) -> Outcome {
    if let Some(o) = output {
        let _ = std::fs::remove_file(o);
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{}", input.to_str().unwrap()))
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dust3d"))
        .args(&args)
        .env("DUST3D_LOG", "error")
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > LIMIT {
            child.kill().ok();
            child.wait().ok();
            return Outcome::Hang;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    if err.contains("panicked") || status.code() == Some(101) {
        return Outcome::Panic(err);
    }
    match status.code() {
        Some(0) => Outcome::Success,
        None => Outcome::Crash(format!("{status:?}: {err}")),
        Some(_) => {
            if !err.contains("error") {
                return Outcome::Crash(format!("no message: {status:?}: {err}"));
            }
            match output {
                Some(o) if o.exists() => Outcome::Partial(err),
                _ if err.contains("library crashed") || err.contains("library is stuck") => {
                    Outcome::LibraryFault
                }
                _ => Outcome::Error,
            }
        }
    }
}

/// A format to fuzz: its valid bytes, the file extension, how to mutate, what reads it.
struct Target {
    name: &'static str,
    valid: Vec<u8>,
    ext: &'static str,
    text: bool,
    /// Also mutate the text before compressing (for .csv.gz).
    gz_text: Option<Vec<u8>>,
    /// Instead of mutating bytes, write this map with its structure altered.
    structure: Option<DustMap>,
    args: Vec<String>,
    output: Option<PathBuf>,
}

fn seed_inputs(dir: &Path) -> Vec<Target> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg_text = std::fs::read_to_string(root.join("configs/demo.toml")).unwrap();
    let (mut cfg, _) = Config::from_file(&root.join("configs/demo.toml")).unwrap();
    cfg.simulate.n_stars = 60;
    cfg.grid.levels = 1;
    let sim = dust3d::app::simulate::run(&cfg, "").unwrap();
    let csv = dir.join("seed.csv");
    dust3d::data::catalog::write_catalog(&sim.catalog, &csv).unwrap();
    let fits = dir.join("seed.fits");
    dust3d::data::catalog::write_catalog(&sim.catalog, &fits).unwrap();
    let cat_nc = dir.join("seed.nc");
    dust3d::data::catalog::write_catalog(&sim.catalog, &cat_nc).unwrap();
    // a posterior-like map: std and two samples, so that every query mode reads something
    let mut m = sim.truth.clone();
    m.std = m.mean.iter().map(|v| 0.1 * v).collect();
    m.samples = [0.9, 1.1]
        .iter()
        .map(|f| m.mean.iter().map(|v| f * v).collect())
        .collect();
    m.inner_std = m.inner_mean.iter().map(|v| 0.1 * v).collect();
    m.inner_samples = vec![m.inner_mean.clone(); 2];
    let map = dir.join("good.nc");
    m.write(&map).unwrap();
    let release = dir.join("release");
    std::fs::create_dir_all(&release).unwrap();
    let files = dust3d::products::dustmaps::export(&m, &release).unwrap();
    let release_mean = files
        .iter()
        .find(|f| f.to_string_lossy().contains("mean"))
        .expect("a mean-and-std file")
        .clone();
    let coords = dir.join("coords.csv");
    std::fs::write(
        &coords,
        "l,b,d,name\n10,5,100,a\n200,-30,350.5,b\n0,90,60,c\n",
    )
    .unwrap();
    let ck = dir.join("seed.ckpt");
    let id = RunId {
        seed: 1,
        config_sha256: "c".into(),
        catalog_sha256: "d".into(),
    };
    let st = FitState {
        stage: 1,
        iteration: 2,
        vi: MgviState {
            x: (0..40).map(|i| i as f64 * 0.1).collect(),
            xsig: vec![0.5; 5],
            residuals: vec![vec![1.0; 40]],
            shifts: Vec::new(),
        },
        history: vec![],
    };
    checkpoint::save(&ck, &id, &st).unwrap();
    let out = dir.join("out.csv");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let strings = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let csv_bytes = std::fs::read(&csv).unwrap();
    let query_map = |input: &str| {
        let mut a = strings(&["query", "--map", input, "--coords"]);
        a.extend([s(&coords), "--integrated".into(), "--mode".into()]);
        a.extend(["mean,std,samples".into(), "--out".into(), s(&out)]);
        a
    };
    vec![
        Target {
            name: "catalog CSV",
            valid: csv_bytes.clone(),
            ext: "csv",
            text: true,
            gz_text: None,
            structure: None,
            args: strings(&["info", "{}"]),
            output: None,
        },
        Target {
            name: "catalog CSV.gz",
            valid: gzip(&csv_bytes),
            ext: "csv.gz",
            text: false,
            gz_text: Some(csv_bytes),
            structure: None,
            args: strings(&["info", "{}"]),
            output: None,
        },
        Target {
            name: "catalog FITS",
            valid: std::fs::read(&fits).unwrap(),
            ext: "fits",
            text: false,
            gz_text: None,
            structure: None,
            args: strings(&["info", "{}"]),
            output: None,
        },
        Target {
            name: "catalog netCDF",
            valid: std::fs::read(&cat_nc).unwrap(),
            ext: "nc",
            text: false,
            gz_text: None,
            structure: None,
            args: strings(&["info", "{}"]),
            output: None,
        },
        Target {
            name: "catalog Parquet",
            // written by pyarrow (tests/python/make_parquet_fixture.py)
            valid: std::fs::read(root.join("tests/fixtures/pyarrow_catalog.parquet")).unwrap(),
            ext: "parquet",
            text: false,
            gz_text: None,
            structure: None,
            args: strings(&["info", "{}"]),
            output: None,
        },
        Target {
            name: "map netCDF",
            valid: std::fs::read(&map).unwrap(),
            ext: "nc",
            text: false,
            gz_text: None,
            structure: None,
            args: query_map("{}"),
            output: Some(out.clone()),
        },
        Target {
            name: "map structure",
            valid: Vec::new(),
            ext: "nc",
            text: false,
            gz_text: None,
            structure: Some(DustMap::read(&map).unwrap()),
            args: query_map("{}"),
            output: Some(out.clone()),
        },
        Target {
            name: "map release FITS",
            valid: std::fs::read(&release_mean).unwrap(),
            ext: "fits",
            text: false,
            gz_text: None,
            structure: None,
            args: {
                let mut a = strings(&["query", "--map", "{}", "--coords"]);
                a.extend([s(&coords), "--mode".into(), "mean,std".into()]);
                a.extend(["--out".into(), s(&out)]);
                a
            },
            output: Some(out.clone()),
        },
        Target {
            name: "query table CSV",
            valid: std::fs::read(&coords).unwrap(),
            ext: "csv",
            text: true,
            gz_text: None,
            structure: None,
            args: {
                let mut a = strings(&["query", "--map"]);
                a.extend([
                    s(&map),
                    "--coords".into(),
                    "{}".into(),
                    "--out".into(),
                    s(&out),
                ]);
                a
            },
            output: Some(out.clone()),
        },
        Target {
            name: "checkpoint",
            valid: std::fs::read(&ck).unwrap(),
            ext: "ckpt",
            text: false,
            gz_text: None,
            structure: None,
            args: strings(&["info", "{}"]),
            output: None,
        },
        Target {
            name: "config TOML",
            valid: cfg_text.into_bytes(),
            ext: "toml",
            text: true,
            gz_text: None,
            structure: None,
            args: strings(&["config", "{}"]),
            output: None,
        },
    ]
}

#[test]
fn mutated_inputs_end_in_success_or_a_clear_error() {
    let cases: usize = std::env::var("DUST3D_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seed: u64 = std::env::var("DUST3D_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261202);
    let dir = tempfile::tempdir().unwrap();
    let targets = seed_inputs(dir.path());
    let mut failures = Vec::new();
    let t0 = Instant::now();
    eprintln!("fuzz: seed {seed}, {cases} cases per format");
    for (ti, t) in targets.iter().enumerate() {
        let (ok, err, bad) = fuzz_target(dir.path(), ti, t, cases, seed, &mut failures);
        eprintln!(
            "fuzz: {:<16} {cases} cases: {ok} succeeded, {err} clear errors, {bad} panics/crashes/hangs/partial outputs",
            t.name
        );
    }
    eprintln!("fuzz: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{} bad endings, first: {:#?}",
        failures.len(),
        failures.iter().take(3).collect::<Vec<_>>()
    );
}

/// Run `cases` mutations of one target on two workers; returns (successes, errors, bad).
fn fuzz_target(
    dir: &Path,
    ti: usize,
    t: &Target,
    cases: usize,
    seed: u64,
    failures: &mut Vec<(String, usize, Outcome)>,
) -> (usize, usize, usize) {
    let results: Vec<(usize, Outcome)> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    let wdir = dir.join(format!("w{ti}-{w}"));
                    std::fs::create_dir_all(&wdir).unwrap();
                    for case in (w..cases).step_by(2) {
                        let mut rng =
                            ChaCha8Rng::seed_from_u64(seed ^ ((ti as u64) << 32) ^ case as u64);
                        // a path whose length varies with the case: how the C libraries fail
                        // on a damaged file (an error, a crash or an abort) can depend on the
                        // process's memory layout, and with it on the length of its arguments
                        let pad = "_".repeat(case % 24);
                        let input = wdir.join(format!("case{pad}.{}", t.ext));
                        let bytes = match &t.structure {
                            Some(map) => {
                                altered_map(&mut rng, map, &input);
                                std::fs::read(&input).unwrap()
                            }
                            None => mutated(&mut rng, t),
                        };
                        std::fs::write(&input, &bytes).unwrap();
                        // outputs per worker: the two must not share one
                        let output = t.output.as_ref().map(|_| wdir.join("out.csv"));
                        let args: Vec<String> = t
                            .args
                            .iter()
                            .map(|a| match (&t.output, &output) {
                                (Some(o), Some(w)) if Path::new(a) == o => {
                                    w.to_str().unwrap().to_string()
                                }
                                _ => a.clone(),
                            })
                            .collect();
                        let o = run_case(&args, &input, output.as_deref());
                        if matches!(
                            o,
                            Outcome::Panic(_)
                                | Outcome::Crash(_)
                                | Outcome::Hang
                                | Outcome::Partial(_)
                        ) {
                            // kept in the build area for a closer look
                            let keep_dir =
                                Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
                            std::fs::create_dir_all(&keep_dir).ok();
                            let keep = keep_dir.join(format!("{ti}-{case}.{}", t.ext));
                            std::fs::write(&keep, &bytes).ok();
                        }
                        let _ = std::fs::remove_file(&input);
                        out.push((case, o));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let (mut ok, mut err, mut bad) = (0, 0, 0);
    let mut faults = 0;
    for (case, o) in results {
        match o {
            Outcome::Success => ok += 1,
            Outcome::Error => err += 1,
            Outcome::LibraryFault => {
                err += 1;
                faults += 1;
            }
            other => {
                bad += 1;
                failures.push((t.name.to_string(), case, other));
            }
        }
    }
    if faults > 0 {
        eprintln!("fuzz: {:<16} of the errors, {faults} caught crashes or hangs of the netCDF/HDF5 library", t.name);
    }
    (ok, err, bad)
}

/// One to three mutations of a target's valid input.
fn mutated(rng: &mut ChaCha8Rng, t: &Target) -> Vec<u8> {
    let n = rng.random_range(1..=3);
    if let Some(text) = &t.gz_text {
        if rng.random_bool(0.5) {
            let mut v = text.clone();
            for _ in 0..n {
                v = mutate_text(rng, &v);
            }
            return gzip(&v);
        }
    }
    let mut v = t.valid.clone();
    for _ in 0..n {
        v = if t.text {
            mutate_text(rng, &v)
        } else {
            mutate_bytes(rng, &v)
        };
    }
    v
}

/// A variable of a map file as the structural fuzzer writes it.
struct Var {
    name: &'static str,
    dims: Vec<&'static str>,
    /// 0: f32, 1: f64, 2: i32, 3: u8.
    kind: u8,
    data: Vec<f64>,
}

/// Write `map` in the dust3d layout with one or two structural faults: a variable or
/// attribute missing, of the wrong type, shape or size, non-finite or unordered values, a
/// wrong nside or ordering.
fn altered_map(rng: &mut ChaCha8Rng, map: &DustMap, path: &Path) {
    let (npix, nr, ns) = (map.npix(), map.n_r(), map.samples.len());
    let mut dims: Vec<(&str, usize)> = vec![
        ("radius", nr),
        ("radius_edge", nr + 1),
        ("pixel", npix),
        ("sample", ns),
    ];
    let flat = |v: &[Vec<f64>]| v.iter().flatten().copied().collect::<Vec<f64>>();
    let mut vars = vec![
        Var {
            name: "radius",
            dims: vec!["radius"],
            kind: 1,
            data: map.centres_pc.clone(),
        },
        Var {
            name: "radius_edges",
            dims: vec!["radius_edge"],
            kind: 1,
            data: map.shells.edges_pc.clone(),
        },
        Var {
            name: "mean",
            dims: vec!["radius", "pixel"],
            kind: 0,
            data: map.mean.clone(),
        },
        Var {
            name: "std",
            dims: vec!["radius", "pixel"],
            kind: 0,
            data: map.std.clone(),
        },
        Var {
            name: "inner_integrated_mean",
            dims: vec!["pixel"],
            kind: 0,
            data: map.inner_mean.clone(),
        },
        Var {
            name: "inner_integrated_std",
            dims: vec!["pixel"],
            kind: 0,
            data: map.inner_std.clone(),
        },
        Var {
            name: "samples",
            dims: vec!["sample", "radius", "pixel"],
            kind: 0,
            data: flat(&map.samples),
        },
        Var {
            name: "inner_integrated_samples",
            dims: vec!["sample", "pixel"],
            kind: 0,
            data: flat(&map.inner_samples),
        },
    ];
    let mut nside: Option<netcdf::AttributeValue> =
        Some(netcdf::AttributeValue::Int(map.nside as i32));
    let mut ordering = Some("NESTED".to_string());
    let mut units = Some(map.units.clone());
    for _ in 0..rng.random_range(1..=2) {
        let k = rng.random_range(0..vars.len().max(1));
        match rng.random_range(0..9) {
            0 if !vars.is_empty() => {
                vars.remove(k);
            }
            1 => match rng.random_range(0..3) {
                0 => nside = None,
                1 => ordering = None,
                _ => units = None,
            },
            2 => {
                use netcdf::AttributeValue as A;
                let choices = [
                    A::Int(0),
                    A::Int(-4),
                    A::Int(3),
                    A::Int(1 << 30),
                    A::Str("abc".into()),
                    A::Double(4.0),
                    A::Int(map.nside as i32 * 2),
                    A::Ints(vec![4, 4]),
                ];
                nside = Some(choices[rng.random_range(0..choices.len())].clone());
            }
            3 if !vars.is_empty() => {
                let shapes: [&[&str]; 5] = [
                    &[],
                    &["pixel"],
                    &["radius"],
                    &["radius_edge", "pixel"],
                    &["sample", "pixel"],
                ];
                let shape = shapes[rng.random_range(0..shapes.len())].to_vec();
                let n: usize = shape
                    .iter()
                    .map(|d| dims.iter().find(|x| x.0 == *d).unwrap().1)
                    .product();
                vars[k].data.resize(n, 1.0);
                vars[k].dims = shape;
            }
            4 if !vars.is_empty() => vars[k].kind = rng.random_range(0..4),
            5 if !vars.is_empty() && !vars[k].data.is_empty() => {
                let bad = [f64::NAN, f64::INFINITY, -1.0, 1e38, 0.0, -1e300];
                let n = vars[k].data.len();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..n);
                    vars[k].data[i] = bad[rng.random_range(0..bad.len())];
                }
            }
            6 => {
                if let Some(v) = vars.iter_mut().find(|v| v.name == "radius_edges") {
                    v.data.reverse();
                }
            }
            7 => {
                // a dimension of another size, the variables on it resized to match
                let d = rng.random_range(0..dims.len());
                let new =
                    [0, 1, dims[d].1.saturating_sub(1), dims[d].1 + 1][rng.random_range(0..4)];
                dims[d].1 = new;
                for v in &mut vars {
                    let n: usize = v
                        .dims
                        .iter()
                        .map(|x| dims.iter().find(|y| y.0 == *x).unwrap().1)
                        .product();
                    v.data.resize(n, 0.5);
                }
            }
            _ => ordering = Some(["RING", "", "nested"][rng.random_range(0..3)].to_string()),
        }
    }
    let mut nc = netcdf::create(path).unwrap();
    for (d, n) in &dims {
        nc.add_dimension(d, *n).unwrap();
    }
    if let Some(v) = nside {
        nc.add_attribute("nside", v).unwrap();
    }
    if let Some(o) = ordering {
        nc.add_attribute("ordering", o.as_str()).unwrap();
    }
    if let Some(u) = units {
        nc.add_attribute("units", u.as_str()).unwrap();
    }
    for v in &vars {
        match v.kind {
            0 => {
                let d: Vec<f32> = v.data.iter().map(|&x| x as f32).collect();
                nc.add_variable::<f32>(v.name, &v.dims)
                    .unwrap()
                    .put_values(&d, ..)
                    .unwrap();
            }
            1 => {
                nc.add_variable::<f64>(v.name, &v.dims)
                    .unwrap()
                    .put_values(&v.data, ..)
                    .unwrap();
            }
            2 => {
                let d: Vec<i32> = v.data.iter().map(|&x| x as i32).collect();
                nc.add_variable::<i32>(v.name, &v.dims)
                    .unwrap()
                    .put_values(&d, ..)
                    .unwrap();
            }
            _ => {
                let d: Vec<u8> = v.data.iter().map(|&x| x as u8).collect();
                nc.add_variable::<u8>(v.name, &v.dims)
                    .unwrap()
                    .put_values(&d, ..)
                    .unwrap();
            }
        }
    }
    nc.close().unwrap();
}
