//! End-to-end tests of the `dust3d` binary: simulate, info, configuration errors, and
//! clear failures (file, row, column; non-zero exit; nothing written) on bad catalogs.

use std::path::{Path, PathBuf};
mod common;
use common::{dust3d, stderr};

fn small_config(dir: &Path) -> PathBuf {
    let p = dir.join("small.toml");
    std::fs::write(
        &p,
        "seed = 3\n[grid]\nnside0 = 1\nn_r0 = 6\nlevels = 2\nr_min_pc = 50.0\nr_max_pc = 500.0\n\
         [simulate]\nn_stars = 300\n",
    )
    .unwrap();
    p
}

/// `dust3d simulate` with `cfg` into `dir`: the catalog (`cat.csv`) and truth (`truth.nc`).
fn simulate(dir: &Path, cfg: &Path) -> (PathBuf, PathBuf) {
    let (cat, truth) = (dir.join("cat.csv"), dir.join("truth.nc"));
    let o = dust3d(&[
        "simulate",
        "--config",
        cfg.to_str().unwrap(),
        "--out-catalog",
        cat.to_str().unwrap(),
        "--out-truth",
        truth.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (cat, truth)
}

#[test]
fn simulate_then_info_on_map_and_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let (cat, truth) = simulate(dir.path(), &cfg);
    let o = dust3d(&["info", truth.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("nside 4 NESTED") && out.contains("truth"),
        "{out}"
    );
    let o = dust3d(&[
        "info",
        cat.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("300 stars"));
    // no temporary files are left behind
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn prior_truth_simulation_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prior.toml");
    std::fs::write(
        &cfg,
        "[grid]\nnside0 = 1\nn_r0 = 6\nlevels = 2\nr_min_pc = 50.0\nr_max_pc = 500.0\n\
         [simulate]\nn_stars = 100\ntruth = \"prior\"\n",
    )
    .unwrap();
    let truth = dir.path().join("t.nc");
    let o = dust3d(&[
        "simulate",
        "--config",
        cfg.to_str().unwrap(),
        "--out-catalog",
        dir.path().join("c.fits").to_str().unwrap(),
        "--out-truth",
        truth.to_str().unwrap(),
        "--seed",
        "11",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let map = dust3d::products::mapfile::DustMap::read(&truth).unwrap();
    assert_eq!(map.provenance.seed, 11);
    assert!(map.mean.iter().all(|v| *v > 0.0));
}

#[test]
fn config_errors_name_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "seed = 1\n\n[kernel]\nlenght_pc = 3.0\n").unwrap();
    let out = dir.path().join("x.csv");
    let truth = dir.path().join("x.nc");
    let o = dust3d(&[
        "simulate",
        "--config",
        cfg.to_str().unwrap(),
        "--out-catalog",
        out.to_str().unwrap(),
        "--out-truth",
        truth.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bad.toml") && e.contains("lenght_pc") && e.contains("line 4"),
        "{e}"
    );
    assert!(!out.exists() && !truth.exists());
}

const HEADER: &str = "source_id,l,b,parallax,parallax_error,extinction,extinction_error\n";
const GOOD: &str = "1,10.0,5.0,2.0,0.1,0.3,0.05\n";

fn expect_failure(body: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.csv");
    std::fs::write(&path, format!("{HEADER}{GOOD}{body}")).unwrap();
    let o = dust3d(&["info", path.to_str().unwrap()]);
    assert!(!o.status.success(), "accepted {body:?}");
    let e = stderr(&o);
    assert!(e.contains("bad.csv"), "{e}");
    for n in needles {
        assert!(e.contains(n), "missing {n:?} in: {e}");
    }
}

#[test]
fn bad_catalog_rows_are_named() {
    expect_failure(
        "2,10.0,5.0,NaN,0.1,0.3,0.05\n",
        &["row 2", "line 3", "'parallax'", "finite"],
    );
    expect_failure(
        "2,10.0,5.0,1.0,inf,0.3,0.05\n",
        &["row 2", "'parallax_error'"],
    );
    expect_failure(
        "2,10.0,5.0,1.0,-0.1,0.3,0.05\n",
        &["row 2", "'parallax_error'", "> 0"],
    );
    expect_failure(
        "2,10.0,5.0,1.0,0.1,0.3,0\n",
        &["row 2", "'extinction_error'", "> 0"],
    );
    expect_failure(
        "2,10.0,95.0,1.0,0.1,0.3,0.05\n",
        &["row 2", "'b'", "[-90, 90]"],
    );
    expect_failure(
        "2,10.0,5.0,abc,0.1,0.3,0.05\n",
        &["row 2", "'parallax'", "cannot parse"],
    );
}

#[test]
fn missing_column_and_empty_selection_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nocol.csv");
    std::fs::write(
        &path,
        "l,b,parallax,parallax_error,extinction\n1,2,3,0.1,0.2\n",
    )
    .unwrap();
    let o = dust3d(&["info", path.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("missing column 'extinction_error'"),
        "{}",
        stderr(&o)
    );

    let cfg = dir.path().join("cut.toml");
    std::fs::write(&cfg, "[catalog]\nd_max_pc = 100.0\n").unwrap();
    let far = dir.path().join("far.csv");
    std::fs::write(&far, format!("{HEADER}1,10.0,5.0,1.0,0.1,0.3,0.05\n")).unwrap();
    let o = dust3d(&[
        "info",
        far.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no star passes the selection"),
        "{}",
        stderr(&o)
    );

    let o = dust3d(&["info", dir.path().join("absent.csv").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no such file"));
}

#[test]
fn impossible_grids_fail_at_once_with_the_figure() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    // an nside beyond HEALPix's addresses: refused when the configuration is read
    let cfg = dir.path().join("l33.toml");
    std::fs::write(&cfg, "[grid]\nlevels = 33\n").unwrap();
    let o = dust3d(&["config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("grid.levels = 33"), "{}", stderr(&o));
    // an addressable grid far beyond this machine's memory: refused before the catalog is read
    let cfg = dir.path().join("l11.toml");
    std::fs::write(&cfg, "[grid]\nnside0 = 2\nlevels = 11\n").unwrap();
    let out = dir.path().join("map.nc");
    let o = dust3d(&[
        "fit",
        "--config",
        cfg.to_str().unwrap(),
        "--catalog",
        "no-such-catalog.csv",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("GB per rank"), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
}

#[test]
fn unwritable_or_missing_output_directories_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let cat = dir.path().join("cat.csv");
    std::fs::write(&cat, format!("{HEADER}{GOOD}")).unwrap();
    let fit = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "fit",
            "--config",
            cfg.to_str().unwrap(),
            "--catalog",
            cat.to_str().unwrap(),
            "--out",
            out,
        ];
        a.extend_from_slice(extra);
        let t0 = std::time::Instant::now();
        let o = dust3d(&a);
        (o, t0.elapsed().as_secs_f64())
    };
    // /sys takes no new file, even for root
    for (out, extra, needle) in [
        (
            "/sys/dust3d-map.nc",
            &[][..],
            "output directory /sys takes no file",
        ),
        (
            "/no/such/dir/map.nc",
            &[][..],
            "output directory /no/such/dir does not exist",
        ),
        (
            dir.path().join("m.nc").to_str().unwrap(),
            &["--checkpoint-dir", "/sys"][..],
            "checkpoint directory /sys takes no file",
        ),
    ] {
        let (o, secs) = fit(out, extra);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        assert!(secs < 1.0, "took {secs} s");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(names.len(), 2, "something was written: {names:?}");
}

/// Run the `dust3d` binary under a file-size limit of `kib` KiB (what a full disk does to a
/// write: it fails part-way).
fn dust3d_limited(kib: u32, args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new("bash");
    c.arg("-c")
        .arg(format!("ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_dust3d"))
        .args(args)
        .env("DUST3D_LOG", "warn")
        .env("HDF5_USE_FILE_LOCKING", "FALSE");
    c.output().unwrap()
}

#[test]
fn a_write_failure_during_products_leaves_the_previous_files_and_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.toml");
    // many stars: the star table (~0.6 MB) outgrows the checkpoints (~0.1 MB)
    std::fs::write(
        &cfg,
        "seed = 3\n[grid]\nnside0 = 1\nn_r0 = 6\nlevels = 2\nr_min_pc = 50.0\n\
         r_max_pc = 500.0\n[simulate]\nn_stars = 3000\n",
    )
    .unwrap();
    let (cat, _) = simulate(dir.path(), &cfg);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("m.nc");
    let args = [
        "fit",
        "--config",
        &s(&cfg),
        "--catalog",
        &s(&cat),
        "--out",
        &s(&out),
    ];
    let o = dust3d(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let products = ["m.nc", "m_stars.csv", "m_history.csv", "m_validation.json"];
    let before: Vec<Vec<u8>> = products
        .iter()
        .map(|p| std::fs::read(dir.path().join(p)).unwrap())
        .collect();
    assert!(before[1].len() > 400 << 10 && before[0].len() < 300 << 10);

    let o = dust3d_limited(300, &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("m_stars.csv") && err.contains("File too large"),
        "{err}"
    );
    for (p, b) in products.iter().zip(&before) {
        assert!(
            &std::fs::read(dir.path().join(p)).unwrap() == b,
            "{p} changed"
        );
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    assert!(names.contains(&"m.ckpt".to_string()), "{names:?}");
    // the checkpoint holds the finished schedule: --resume only writes the products
    let mut resume = args.to_vec();
    resume.push("--resume");
    let o = dust3d(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(dir.path().join("m_stars.csv")).unwrap(),
        before[1]
    );
    assert!(!dir.path().join("m.ckpt").exists());
}

#[test]
fn oversized_boxes_and_comparisons_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let (_, truth) = simulate(dir.path(), &cfg);
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("box.nc");
    let t0 = std::time::Instant::now();
    // 10^15 points
    let o = dust3d(&[
        "interp",
        "box",
        "--map",
        &p(&truth),
        "--box",
        "(100000,100000,100000)::((-500,500),(-500,500),(-100,100))",
        "--out",
        &p(&out),
    ]);
    let secs = t0.elapsed().as_secs_f64();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("more than --max-points"),
        "{}",
        stderr(&o)
    );
    assert!(secs < 1.0 && !out.exists(), "{secs} s");
    // 12.9e12 sightlines at nside 2^20
    let cmp = dir.path().join("cmp");
    std::fs::create_dir(&cmp).unwrap();
    let t0 = std::time::Instant::now();
    let o = dust3d(&[
        "compare",
        "--map",
        &p(&truth),
        "--reference",
        &p(&truth),
        "--out",
        &p(&cmp),
        "--nside",
        "1048576",
    ]);
    let secs = t0.elapsed().as_secs_f64();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("more than --max-points"),
        "{}",
        stderr(&o)
    );
    assert!(secs < 1.0, "{secs} s");
    assert_eq!(std::fs::read_dir(&cmp).unwrap().count(), 0);
}
