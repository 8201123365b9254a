//! Multi-rank runs under `mpirun` (docs/architecture.md): every distributed operation and a whole
//! fit give the same numbers on 1, 2 and 4 ranks (oversubscribed on 2 cores) as a plain
//! process; killing one rank ends the job, and `--resume` continues from the last
//! checkpoint every rank has. Skipped without `mpirun` unless DUST3D_REQUIRE_MPI is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dust3d::app::config::Config;
use dust3d::products::mapfile::DustMap;

fn mpirun_available() -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("DUST3D_REQUIRE_MPI").is_none(),
            "DUST3D_REQUIRE_MPI is set but mpirun is missing"
        );
        eprintln!("mpirun not found: MPI tests skipped");
    }
    ok
}

/// `mpirun -n n` (as root, oversubscribed, unbound, one thread per rank) of `args`.
fn mpirun(n: usize, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &n.to_string(), "--bind-to", "none", "--oversubscribe"])
        .args(["-x", "RAYON_NUM_THREADS=1", "-x", "DUST3D_LOG=warn"])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("examples").join(name)
}

fn relative_difference(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (k, va) in a {
        let (va, vb) = (va.as_array().unwrap(), b[k].as_array().unwrap());
        assert_eq!(va.len(), vb.len(), "{k}: lengths differ");
        let f = |v: &serde_json::Value| v.as_f64().unwrap();
        let scale = va
            .iter()
            .map(|v| f(v).abs())
            .fold(0.0, f64::max)
            .max(1e-300);
        for (x, y) in va.iter().zip(vb) {
            let d = (f(x) - f(y)).abs() / scale;
            assert!(d <= 1e-10, "{k}: {} vs {} ({d:e})", f(x), f(y));
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn operations_agree_on_every_rank_count() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = example("mpi_ops");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    for nside_dec in ["1", "2"] {
        let plain = dir.path().join(format!("plain{nside_dec}.json"));
        let st = Command::new(&exe)
            .arg(&plain)
            .arg(nside_dec)
            .status()
            .unwrap();
        assert!(st.success());
        let reference = read(&plain);
        for n in [1, 2, 4] {
            let out = dir.path().join(format!("n{n}_{nside_dec}.json"));
            let st = mpirun(n, &[exe.as_os_str(), out.as_os_str(), nside_dec.as_ref()])
                .status()
                .unwrap();
            assert!(st.success(), "mpi_ops on {n} ranks failed");
            let d = relative_difference(&reference, &read(&out));
            eprintln!("nside_dec {nside_dec}, {n} ranks: max relative difference {d:e}");
        }
    }
}

fn small_fit_config(dir: &Path) -> (PathBuf, PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.toml");
    let (mut cfg, _) = Config::from_file(&path).unwrap();
    cfg.simulate.n_stars = 6000;
    cfg.inference.stage[0].iterations = 1;
    cfg.inference.stage[1].iterations = 2;
    // nside 2 patches: the first refinement gathers, the second exchanges halos
    cfg.parallel.nside_dec = Some(2);
    let cfg_path = dir.join("cfg.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let sim = dust3d::app::simulate::run(&cfg, "").unwrap();
    let cat = dir.join("cat.csv");
    dust3d::data::catalog::write_catalog(&sim.catalog, &cat).unwrap();
    (cfg_path, cat)
}

fn fit_args<'a>(cfg: &'a Path, cat: &'a Path, out: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    vec![
        env!("CARGO_BIN_EXE_dust3d").as_ref(),
        "fit".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--catalog".as_ref(),
        cat.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]
}

/// A plain (non-MPI) process fit, quiet.
fn plain_fit(cfg: &Path, cat: &Path, out: &Path) {
    let args = fit_args(cfg, cat, out);
    let st = Command::new(args[0])
        .args(&args[1..])
        .env("DUST3D_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());
}

type Arrays = (Vec<f64>, Vec<f64>, Vec<Vec<f64>>, Vec<f64>, Vec<u32>);

fn arrays(path: &Path) -> Arrays {
    let m = DustMap::read(path).unwrap();
    (m.mean, m.std, m.samples, m.inner_mean, m.star_count)
}

/// Fit `(config, catalog)` on `n` ranks into `dir/<stem>.nc` and assert that its map and
/// star table equal the reference's, bit for bit.
fn assert_ranks_reproduce(
    dir: &Path,
    cfg: &Path,
    cat: &Path,
    stem: &str,
    n: usize,
    reference: &Arrays,
    stars: &[u8],
) {
    let out = dir.join(format!("{stem}.nc"));
    let o = mpirun(n, &fit_args(cfg, cat, &out)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        arrays(&out) == *reference,
        "map {stem} on {n} ranks differs"
    );
    let s = std::fs::read(dir.join(format!("{stem}_stars.csv"))).unwrap();
    assert!(s == stars, "star table {stem} on {n} ranks differs");
}

#[test]
fn fit_is_identical_on_one_two_and_four_ranks() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, cat) = small_fit_config(dir.path());
    let plain = dir.path().join("plain.nc");
    plain_fit(&cfg, &cat, &plain);
    let reference = arrays(&plain);
    let stars = std::fs::read(dir.path().join("plain_stars.csv")).unwrap();
    for n in [1, 2, 4] {
        let stem = format!("n{n}");
        assert_ranks_reproduce(dir.path(), &cfg, &cat, &stem, n, &reference, &stars);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ckpt"))
            .collect();
        assert!(leftovers.is_empty(), "checkpoints left: {leftovers:?}");
    }
}

#[test]
fn ranks_without_stars_and_coarse_stage_refusal() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, cat) = small_fit_config(dir.path());
    // only the northern sky has stars: the southern ranks fit the prior alone
    let text = std::fs::read_to_string(&cat).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let b = header.split(',').position(|h| h == "b").unwrap();
    let north: Vec<&str> = lines
        .filter(|l| l.split(',').nth(b).unwrap().parse::<f64>().unwrap() > 30.0)
        .collect();
    let north_cat = dir.path().join("north.csv");
    std::fs::write(&north_cat, format!("{header}\n{}\n", north.join("\n"))).unwrap();
    let plain = dir.path().join("plain.nc");
    plain_fit(&cfg, &north_cat, &plain);
    let out = dir.path().join("n4.nc");
    assert!(mpirun(4, &fit_args(&cfg, &north_cat, &out))
        .status()
        .unwrap()
        .success());
    assert!(
        arrays(&out) == arrays(&plain),
        "north-only map on 4 ranks differs"
    );
    // a coarse stage whose chart ends before the patches are distributed: refused before
    // the first iteration, naming the stage, and nothing written
    let (mut c, _) = Config::from_file(&cfg).unwrap();
    c.parallel.nside_dec = Some(4);
    let coarse_cfg = dir.path().join("coarse.toml");
    std::fs::write(&coarse_cfg, toml::to_string(&c).unwrap()).unwrap();
    let refused = dir.path().join("refused.nc");
    let o = mpirun(2, &fit_args(&coarse_cfg, &north_cat, &refused))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("inference.stage[0].levels = 1"), "{err}");
    assert!(err.contains("parallel.nside_dec = 4"), "{err}");
    assert!(!refused.exists());
}

fn opencl_available() -> bool {
    match dust3d::backend::opencl::Gpu::open(&Default::default()) {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var_os("DUST3D_REQUIRE_OPENCL").is_none(), "{e:#}");
            eprintln!("no OpenCL device ({e:#}): MPI + OpenCL test skipped");
            false
        }
    }
}

/// `cfg` with `backend.kind = "opencl"` written next to it as `ocl_<name>`.
fn on_opencl(cfg: &Config, dir: &Path, name: &str) -> PathBuf {
    let mut c = cfg.clone();
    c.backend.kind = dust3d::app::config::BackendKind::Opencl;
    let path = dir.join(format!("ocl_{name}"));
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    path
}

#[test]
fn opencl_fit_on_one_two_and_three_ranks_equals_one_device_and_the_cpu() {
    if !mpirun_available() || !opencl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, cat) = small_fit_config(dir.path());
    let (mut cfg, _) = Config::from_file(&cfg_path).unwrap();
    // the demo's schedule (a coarse stage on its own chart, then the full one; nside 2
    // patches: replicated, gathered and halo steps) on 1, 2 and 3 ranks with one device each
    let two_stages = on_opencl(&cfg, dir.path(), "two.toml");
    let one = dir.path().join("one.nc");
    plain_fit(&two_stages, &cat, &one);
    let reference = arrays(&one);
    let stars = std::fs::read(dir.path().join("one_stars.csv")).unwrap();
    for n in [1, 2, 3] {
        // the same sums in the same patch order on any rank count: bit for bit (measured)
        let stem = format!("ocl{n}");
        assert_ranks_reproduce(dir.path(), &two_stages, &cat, &stem, n, &reference, &stars);
    }
    // Against the CPU on 2 ranks: the last stage alone, one Newton step, fixed CG lengths.
    // The KL minimisation amplifies the backends' rounding differences (exp, operation
    // order; ~1e-13) about 100-fold per Newton step, adaptive CG stopping turns them into
    // different iteration counts, and a stage started from a coarse stage's state with
    // capped CG amplifies them to the posterior's width (measured on the CPU alone:
    // extinctions perturbed by 1e-13 move that two-stage map by 13 σ), so only a short fit
    // compares the backends rather than the optimiser's sensitivity
    cfg.inference.stage.remove(0);
    let st = &mut cfg.inference.stage[0];
    st.iterations = 1;
    (st.sample_cg_iterations, st.sample_cg_tolerance) = (8, 1e-300);
    (st.newton_steps, st.newton_cg_iterations, st.newton_forcing) = (1, 5, 1e-300);
    let cpu_cfg = dir.path().join("cpu_short.toml");
    std::fs::write(&cpu_cfg, toml::to_string(&cfg).unwrap()).unwrap();
    let short = on_opencl(&cfg, dir.path(), "short.toml");
    let (cpu, ocl) = (dir.path().join("cpu2.nc"), dir.path().join("ocl3.nc"));
    for (c, out, n) in [(&cpu_cfg, &cpu, 2), (&short, &ocl, 3)] {
        let o = mpirun(n, &fit_args(c, &cat, out)).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (c, o) = (DustMap::read(&cpu).unwrap(), DustMap::read(&ocl).unwrap());
    let worst = c
        .mean
        .iter()
        .zip(&o.mean)
        .zip(&c.std)
        .map(|((a, b), s)| (a - b).abs() / s)
        .fold(0.0, f64::max);
    eprintln!("OpenCL on 3 ranks vs CPU on 2 ranks: means differ by ≤ {worst:.1e} posterior std");
    assert!(worst <= 1e-2, "OpenCL and CPU maps differ by {worst:e} σ");
    // a rank whose device does not exist ends the job naming the rank and the devices
    let bad = dir.path().join("bad.nc");
    let o = mpirun(2, &fit_args(&short, &cat, &bad))
        .env("DUST3D_OPENCL_DEVICE", "0,99")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1 of 2") && err.contains("device index 99"),
        "{err}"
    );
    assert!(!bad.exists());
}

#[test]
fn a_growing_schedule_where_some_ranks_gain_no_stars() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg_path, cat) = small_fit_config(dir.path());
    // only the northern polar cap (b > 45°) has stars beyond 150 pc: when the second stage
    // admits every distance, the ranks of the rest of the sky gain no star while the
    // northern one does; n_σ must restart everywhere, as in one process
    let text = std::fs::read_to_string(&cat).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let col = |name: &str| header.split(',').position(|h| h == name).unwrap();
    let (b, plx) = (col("b"), col("parallax"));
    let kept: Vec<&str> = lines
        .filter(|l| {
            let f: Vec<f64> = l.split(',').map(|v| v.parse().unwrap_or(0.0)).collect();
            f[b] > 45.0 || f[plx] > 1000.0 / 150.0
        })
        .collect();
    let grown = dir.path().join("grown.csv");
    std::fs::write(&grown, format!("{header}\n{}\n", kept.join("\n"))).unwrap();
    let (mut cfg, _) = Config::from_file(&cfg_path).unwrap();
    cfg.inference.stage[0].max_distance_pc = Some(200.0);
    cfg.inference.stage[1].max_distance_pc = None;
    cfg.noise.infer_nsigma = true;
    // and the scale in its own factor, from the samples' moment in the first stage and at
    // the evidence's fixed point in the second (both sum over every rank's excitations, the
    // second also solves with the metric), the first without the distance variance
    cfg.inference.stage[0].scale_update = dust3d::app::config::ScaleUpdateName::Marginal;
    cfg.inference.stage[1].scale_update = dust3d::app::config::ScaleUpdateName::Evidence;
    cfg.inference.stage[0].distance_variance = false;
    let grown_cfg = dir.path().join("grown.toml");
    std::fs::write(&grown_cfg, toml::to_string(&cfg).unwrap()).unwrap();
    let plain = dir.path().join("plain.nc");
    plain_fit(&grown_cfg, &grown, &plain);
    let out = dir.path().join("n4.nc");
    assert!(mpirun(4, &fit_args(&grown_cfg, &grown, &out))
        .status()
        .unwrap()
        .success());
    assert!(
        arrays(&out) == arrays(&plain),
        "growing schedule on 4 ranks differs from one process"
    );
    let a = std::fs::read(dir.path().join("plain_stars.csv")).unwrap();
    let b = std::fs::read(dir.path().join("n4_stars.csv")).unwrap();
    assert!(a == b, "star tables differ");
}

#[test]
fn a_bad_row_names_the_file_row_and_ends_every_rank() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, cat) = small_fit_config(dir.path());
    let text = std::fs::read_to_string(&cat).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    // data row 3001 is line 3002 (after the header): make its parallax error negative
    let mut fields: Vec<String> = lines[3001].split(',').map(str::to_owned).collect();
    let j = lines[0]
        .split(',')
        .position(|h| h == "parallax_error")
        .unwrap();
    fields[j] = "-0.1".into();
    lines[3001] = fields.join(",");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("bad.nc");
    let t0 = Instant::now();
    let o = mpirun(4, &fit_args(&cfg, &bad, &out)).output().unwrap();
    assert!(!o.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("row 3001") && err.contains("parallax_error") && err.contains("bad.csv"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Pids of the processes whose command line mentions `needle` (the dust3d ranks).
fn ranks_of(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && cmd.contains("dust3d") && !cmd.contains("mpirun") {
            pids.push(pid);
        }
    }
    pids
}

fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            child.kill().ok();
            panic!("the job did not end within {limit:?} after a rank was killed: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killing_one_rank_ends_the_job_and_resume_on_four_ranks_continues() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, cat) = small_fit_config(dir.path());
    let full = dir.path().join("full.nc");
    assert!(mpirun(2, &fit_args(&cfg, &cat, &full))
        .status()
        .unwrap()
        .success());

    let killed = dir.path().join("killed.nc");
    let ck = |r: usize| dir.path().join(format!("killed.r{r}of2.ckpt"));
    let mut job = mpirun(2, &fit_args(&cfg, &cat, &killed))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(ck(0).exists() && ck(1).exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoints appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let pids = ranks_of(killed.to_str().unwrap());
    assert_eq!(pids.len(), 2, "expected two ranks, found {pids:?}");
    Command::new("kill")
        .args(["-KILL", &pids[1].to_string()])
        .status()
        .unwrap();
    let t_kill = Instant::now();
    let status = wait_bounded(&mut job, Duration::from_secs(60));
    eprintln!(
        "job ended {:.2} s after SIGKILL of rank 1",
        t_kill.elapsed().as_secs_f64()
    );
    assert!(!status.success(), "the job survived the loss of a rank");
    assert!(
        !killed.exists(),
        "the fit finished before the kill: the test proves nothing"
    );
    assert!(
        ranks_of(killed.to_str().unwrap()).is_empty(),
        "a rank survived"
    );
    // without --resume the checkpoints are not overwritten silently, on any rank count
    let again = mpirun(2, &fit_args(&cfg, &cat, &killed)).output().unwrap();
    assert!(!again.status.success());
    let again4 = mpirun(4, &fit_args(&cfg, &cat, &killed)).output().unwrap();
    assert!(!again4.status.success());
    assert!(
        String::from_utf8_lossy(&again4.stderr).contains("another rank count"),
        "{}",
        String::from_utf8_lossy(&again4.stderr)
    );
    // resume on 4 ranks: each assembles its patches from the 2-rank checkpoints
    let mut resume = fit_args(&cfg, &cat, &killed);
    resume.push("--resume".as_ref());
    assert!(mpirun(4, &resume).status().unwrap().success());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ckpt"))
        .collect();
    assert!(left.is_empty(), "checkpoints left: {left:?}");
    // the history shows where the run changed hands: iterations on 2 ranks, then on 4
    let hist = std::fs::read_to_string(dir.path().join("killed_history.csv")).unwrap();
    let ranks: Vec<&str> = hist
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(11).unwrap())
        .collect();
    assert!(
        ranks.first() == Some(&"2") && ranks.last() == Some(&"4"),
        "not resumed mid-run: ranks per iteration {ranks:?}"
    );
    assert!(arrays(&full) == arrays(&killed), "resumed map differs");
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_and_resume_is_identical() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, cat) = small_fit_config(dir.path());
    let full = dir.path().join("full.nc");
    assert!(mpirun(2, &fit_args(&cfg, &cat, &full))
        .status()
        .unwrap()
        .success());
    let stopped = dir.path().join("stopped.nc");
    let ck = |r: usize| dir.path().join(format!("stopped.r{r}of2.ckpt"));
    let mut job = mpirun(2, &fit_args(&cfg, &cat, &stopped))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(ck(0).exists() && ck(1).exists()) {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoints");
        std::thread::sleep(Duration::from_millis(2));
    }
    let pids = ranks_of(stopped.to_str().unwrap());
    assert_eq!(pids.len(), 2, "expected two ranks, found {pids:?}");
    // one rank only: the safe points are collective, so the other stops with it
    unsafe { libc::kill(pids[1] as i32, libc::SIGTERM) };
    let status = wait_bounded(&mut job, Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "job status {status:?}");
    assert!(
        !stopped.exists(),
        "the fit finished first: the test proves nothing"
    );
    assert!(
        ranks_of(stopped.to_str().unwrap()).is_empty(),
        "a rank survived"
    );
    let mut resume = fit_args(&cfg, &cat, &stopped);
    resume.push("--resume".as_ref());
    assert!(mpirun(2, &resume).status().unwrap().success());
    assert!(arrays(&full) == arrays(&stopped), "resumed map differs");
}
