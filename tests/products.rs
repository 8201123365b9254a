//! End-to-end tests of the map products: export to the release layout and the dustmaps
//! round trip (Python, in the build virtualenv), query, interp, predict, plot and compare on
//! the command line, including clear failures on malformed maps and box strings.

use dust3d::products::mapfile::DustMap;
use dust3d::sphere::grid::Shells;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::path::{Path, PathBuf};
mod common;
use common::dust3d;
use std::process::{Command, Output};

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "dust3d failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails_with(o: &Output, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure containing {needle:?}"
    );
    assert!(e.contains(needle), "stderr lacks {needle:?}: {e}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A posterior-like map: log-normal field with 4 log-normal samples around it, positive
/// inner map, nside 4 × 16 shells in 50–500 pc.
fn posterior_map(seed: u64) -> DustMap {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let sh = Shells::log_uniform(50.0, 500.0, 16).unwrap();
    let mut m = DustMap::from_fn(4, sh, "E (ZGR23) / pc", |_, _| 0.0);
    let (n, npix) = (m.mean.len(), m.npix());
    let base: Vec<f64> = (0..n)
        .map(|_| 1e-3 * (0.8 * rng.sample::<f64, _>(StandardNormal)).exp())
        .collect();
    let inner_base: Vec<f64> = (0..npix)
        .map(|_| 0.02 + 0.01 * rng.random::<f64>())
        .collect();
    for _ in 0..4 {
        m.samples.push(
            base.iter()
                .map(|v| v * (0.3 * rng.sample::<f64, _>(StandardNormal)).exp())
                .collect(),
        );
        m.inner_samples.push(
            inner_base
                .iter()
                .map(|v| v * (0.3 * rng.sample::<f64, _>(StandardNormal)).exp())
                .collect(),
        );
    }
    let mean_std = |rows: &[Vec<f64>]| -> (Vec<f64>, Vec<f64>) {
        let k = rows.len() as f64;
        let len = rows[0].len();
        let mean: Vec<f64> = (0..len)
            .map(|i| rows.iter().map(|r| r[i]).sum::<f64>() / k)
            .collect();
        let std = (0..len)
            .map(|i| (rows.iter().map(|r| (r[i] - mean[i]).powi(2)).sum::<f64>() / k).sqrt())
            .collect();
        (mean, std)
    };
    (m.mean, m.std) = mean_std(&m.samples);
    (m.inner_mean, m.inner_std) = mean_std(&m.inner_samples);
    m.kind = "posterior".into();
    m
}

/// Random query points, some outside the radial range, as a CSV with an extra column.
fn points(path: &Path, n: usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut text = String::from("id,l,b,d\n");
    for i in 0..n {
        let l: f64 = rng.random_range(0.0..360.0);
        let b = rng.random_range(-1.0f64..1.0).asin().to_degrees();
        let d: f64 = rng.random_range(30.0..540.0);
        text.push_str(&format!("{i},{l},{b},{d}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn python() -> Option<PathBuf> {
    match std::env::var("DUST3D_PYTHON") {
        Ok(p) => Some(PathBuf::from(p)),
        Err(_) => {
            // scripts/test always sets it; a bare `cargo test` may lack the virtualenv
            assert!(
                std::env::var("DUST3D_REQUIRE_PYTHON").is_err(),
                "DUST3D_PYTHON must point at the build virtualenv's python"
            );
            None
        }
    }
}

#[test]
fn export_then_dustmaps_reads_what_dust3d_query_answers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let map = d.join("post.nc");
    posterior_map(11).write(&map).unwrap();
    let exp = d.join("export");
    let out = ok(&dust3d(&[
        "export",
        "--map",
        s(&map),
        "--format",
        "dustmaps",
        "--out",
        s(&exp),
    ]));
    assert!(out.contains("mean_and_std_healpix.fits") && out.contains("samples_healpix.fits"));
    let pts = d.join("points.csv");
    points(&pts, 1500);
    let q = d.join("q");
    std::fs::create_dir_all(&q).unwrap();
    let mean_fits = exp.join("mean_and_std_healpix.fits");
    for (m, extra, name) in [
        (&map, &["--mode", "mean,std"][..], "differential.csv"),
        (
            &mean_fits,
            &["--mode", "mean,std"][..],
            "differential_from_fits.csv",
        ),
        (&map, &["--mode", "samples"][..], "differential_samples.csv"),
        (
            &map,
            &["--integrated", "--mode", "mean,std,samples"][..],
            "integrated.csv",
        ),
    ] {
        let mut args = vec![
            "query",
            "--map",
            s(m),
            "--coords",
            s(&pts),
            "--convention",
            "dustmaps",
        ];
        args.extend_from_slice(extra);
        let o = q.join(name);
        args.extend_from_slice(&["--out", s(&o)]);
        ok(&dust3d(&args));
    }
    // the carried-through column survives
    let text = std::fs::read_to_string(q.join("differential.csv")).unwrap();
    assert!(text.starts_with("id,l,b,d,differential_mean,differential_std"));
    let Some(py) = python() else {
        eprintln!(
            "DUST3D_PYTHON not set: skipping the dustmaps cross-check (scripts/test runs it)"
        );
        return;
    };
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/dustmaps_roundtrip.py"
    );
    let o = Command::new(py)
        .args([script, s(&exp), s(&q)])
        .output()
        .expect("run python");
    let report = String::from_utf8_lossy(&o.stdout);
    println!("{report}");
    assert!(
        o.status.success(),
        "dustmaps disagrees with dust3d:\n{report}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(report.matches("ok  ").count() >= 13, "{report}");
}

#[test]
fn query_single_point_fits_output_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let map = d.join("post.nc");
    posterior_map(3).write(&map).unwrap();
    let out = ok(&dust3d(&[
        "query",
        "--map",
        s(&map),
        "--lbd",
        "120,-10.5,200",
        "--integrated",
        "--mode",
        "mean,std",
    ]));
    assert!(
        out.contains("integrated_mean = ") && out.contains("integrated_std = "),
        "{out}"
    );
    // a coordinate file without --out prints CSV
    let two = d.join("two.csv");
    std::fs::write(&two, "l,b,d,name\n10,5,100,a\n200,-3,300,b\n").unwrap();
    let out = ok(&dust3d(&[
        "query",
        "--map",
        s(&map),
        "--coords",
        s(&two),
        "--mode",
        "mean,std",
    ]));
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.starts_with("l,b,d,name,differential_mean,differential_std\n10,5,100,a,"),
        "{out}"
    );
    // outside the radial range → NaN
    let out = ok(&dust3d(&[
        "query",
        "--map",
        s(&map),
        "--lbd",
        "120,-10.5,900",
    ]));
    assert!(out.contains("differential_mean = NaN"), "{out}");
    let pts = d.join("points.fits");
    let csv = d.join("points.csv");
    points(&csv, 50);
    // CSV in, FITS out, FITS in again
    ok(&dust3d(&[
        "query",
        "--map",
        s(&map),
        "--coords",
        s(&csv),
        "--out",
        s(&pts),
    ]));
    let o2 = d.join("again.csv");
    ok(&dust3d(&[
        "query",
        "--map",
        s(&map),
        "--coords",
        s(&pts),
        "--mode",
        "random-sample",
        "--out",
        s(&o2),
    ]));
    let text = std::fs::read_to_string(&o2).unwrap();
    assert!(
        text.starts_with("id,l,b,d,differential_mean,differential_random_sample"),
        "{text}"
    );
    // bad inputs
    fails_with(
        &dust3d(&["query", "--map", s(&map), "--lbd", "1,2"]),
        "expected three numbers",
    );
    fails_with(
        &dust3d(&["query", "--map", s(&map), "--lbd", "1,95,100"]),
        "not a sky position",
    );
    fails_with(
        &dust3d(&[
            "query",
            "--map",
            s(&map),
            "--lbd",
            "1,2,3",
            "--mode",
            "median",
        ]),
        "--mode",
    );
    fails_with(&dust3d(&["query", "--map", s(&map)]), "exactly one of");
    let bad = d.join("bad.csv");
    std::fs::write(&bad, "l,b,d\n1,2,3\n4,north,5\n").unwrap();
    fails_with(
        &dust3d(&["query", "--map", s(&map), "--coords", s(&bad)]),
        "row 2, column 'b'",
    );
    let garbage = d.join("garbage.nc");
    std::fs::write(&garbage, "not a map").unwrap();
    for cmd in [
        vec!["query", "--map", s(&garbage), "--lbd", "1,2,100"],
        vec!["export", "--map", s(&garbage), "--out", s(d)],
        vec![
            "interp",
            "box",
            "--map",
            s(&garbage),
            "-b",
            "(2,2,2)::((0,1),(0,1),(0,1))",
            "--out",
            "x.nc",
        ],
        vec!["plot", "--map", s(&garbage), "--out", "x.png"],
        vec![
            "compare",
            "--map",
            s(&garbage),
            "--reference",
            s(&map),
            "--out",
            s(d),
        ],
    ] {
        fails_with(&dust3d(&cmd), "garbage.nc");
    }
    let no_file = d.join("missing.nc");
    fails_with(
        &dust3d(&["query", "--map", s(&no_file), "--lbd", "1,2,3"]),
        "no such file",
    );
    // a map without samples cannot give samples
    let truth = d.join("truth.nc");
    DustMap::from_fn(
        2,
        Shells::log_uniform(50.0, 500.0, 8).unwrap(),
        "E",
        |_, _| 1e-3,
    )
    .write(&truth)
    .unwrap();
    fails_with(
        &dust3d(&[
            "query",
            "--map",
            s(&truth),
            "--lbd",
            "1,2,100",
            "--mode",
            "samples",
        ]),
        "no samples",
    );
}

#[test]
fn interp_box_reproduces_a_radial_truth_and_rejects_bad_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let map = d.join("radial.nc");
    // ln ρ linear in r: log-linear radial interpolation is exact
    DustMap::from_fn(
        8,
        Shells::log_uniform(20.0, 300.0, 30).unwrap(),
        "E / pc",
        |r, _| 2e-3 * (-r / 100.0).exp(),
    )
    .write(&map)
    .unwrap();
    for (ext, fits) in [("nc", false), ("fits", true)] {
        let out = d.join(format!("box.{ext}"));
        ok(&dust3d(&[
            "interp",
            "box",
            "--map",
            s(&map),
            "-b",
            "(11,11,5)::((-300,300),(-300,300),(-40,40))",
            "--out",
            s(&out),
        ]));
        let (vals, std): (Vec<f32>, Vec<f32>) = if fits {
            let mut f = fitsio::FitsFile::open(&out).unwrap();
            let m = f.hdu("MEAN").unwrap().read_image(&mut f).unwrap();
            let s = f.hdu("STD").unwrap().read_image(&mut f).unwrap();
            (m, s)
        } else {
            let nc = netcdf::open(&out).unwrap();
            (
                nc.variable("mean")
                    .unwrap()
                    .get_values::<f32, _>(..)
                    .unwrap(),
                nc.variable("std")
                    .unwrap()
                    .get_values::<f32, _>(..)
                    .unwrap(),
            )
        };
        assert_eq!(vals.len(), 11 * 11 * 5);
        let (mut inside, mut nan) = (0, 0);
        for (k, v) in vals.iter().enumerate() {
            let (i, j, l) = (k / 55, (k / 5) % 11, k % 5);
            let (x, y, z) = (
                -300.0 + 60.0 * i as f64,
                -300.0 + 60.0 * j as f64,
                -40.0 + 20.0 * l as f64,
            );
            let r = (x * x + y * y + z * z).sqrt();
            if !(20.0..=300.0).contains(&r) {
                assert!(v.is_nan(), "({x},{y},{z}) r {r}: {v}");
                nan += 1;
            } else if r > 22.0 && r < 290.0 {
                let want = 2e-3 * (-r / 100.0).exp();
                assert!(
                    (*v as f64 / want - 1.0).abs() < 1e-5,
                    "({x},{y},{z}): {v} vs {want}"
                );
                assert_eq!(std[k], 0.0);
                inside += 1;
            }
        }
        assert!(inside > 200 && nan > 100, "{inside} {nan}");
    }
    let out = d.join("lbd.nc");
    ok(&dust3d(&[
        "interp",
        "lbd",
        "--map",
        s(&map),
        "-b",
        "(4,3,5)::((0,270),(-60,60),(50,250))",
        "--out",
        s(&out),
    ]));
    let nc = netcdf::open(&out).unwrap();
    let v: Vec<f32> = nc.variable("mean").unwrap().get_values(..).unwrap();
    let dist: Vec<f64> = nc.variable("distance").unwrap().get_values(..).unwrap();
    assert_eq!(dist, [50.0, 100.0, 150.0, 200.0, 250.0]);
    for (k, val) in v.iter().enumerate() {
        let want = 2e-3 * (-dist[k % 5] / 100.0).exp();
        assert!((*val as f64 / want - 1.0).abs() < 1e-5);
    }
    for bad in [
        "(2,2)::((0,1),(0,1),(0,1))",
        "(2,2,2)::((1,0),(0,1),(0,1))",
        "2,2,2::0,1",
        "(2,2,-1)::((0,1),(0,1),(0,1))",
    ] {
        fails_with(
            &dust3d(&[
                "interp",
                "box",
                "--map",
                s(&map),
                "-b",
                bad,
                "--out",
                s(&d.join("x.nc")),
            ]),
            "box",
        );
        assert!(!d.join("x.nc").exists());
    }
    fails_with(
        &dust3d(&[
            "interp",
            "lbd",
            "--map",
            s(&map),
            "-b",
            "(2,2,2)::((0,1),(-100,1),(0,1))",
            "--out",
            s(&d.join("x.nc")),
        ]),
        "latitudes",
    );
    fails_with(
        &dust3d(&[
            "interp",
            "box",
            "--map",
            s(&map),
            "-b",
            "(2,2,2)::((0,1),(0,1),(0,1))",
            "--out",
            s(&d.join("x.txt")),
        ]),
        ".nc",
    );
}

#[test]
fn predict_plot_and_compare_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let map = d.join("post.nc");
    posterior_map(7).write(&map).unwrap();
    let cat = d.join("stars.csv");
    std::fs::write(
        &cat,
        "name,l,b,parallax,parallax_error\nA,10,5,4.0,0.1\nB,200,-30,2.5,0.5\nC,300,60,1000,1\n",
    )
    .unwrap();
    let out = d.join("pred.fits");
    ok(&dust3d(&[
        "predict",
        "--map",
        s(&map),
        "--catalog",
        s(&cat),
        "--out",
        s(&out),
    ]));
    let t = dust3d::data::table::Table::read(&out).unwrap();
    let p = t.f64_column("predicted_extinction").unwrap();
    let sd = t.f64_column("predicted_extinction_std").unwrap();
    assert_eq!(t.rows, 3);
    assert!(p[0] > 0.0 && p[1] > p[0] * 0.1 && sd.iter().all(|v| *v >= 0.0));
    // a star at 1 pc lies inside the inner edge: no extinction
    assert_eq!(p[2], 0.0);
    std::fs::write(&cat, "l,b,parallax,parallax_error\n10,5,4.0,0\n").unwrap();
    fails_with(
        &dust3d(&[
            "predict",
            "--map",
            s(&map),
            "--catalog",
            s(&cat),
            "--out",
            s(&out),
        ]),
        "row 1: parallax error",
    );
    let overlay = d.join("yso.csv");
    std::fs::write(
        &overlay,
        "name,l,b,d,d_err\nOrion,209,-19,400,20\nTaurus,172,-15,140,10\n",
    )
    .unwrap();
    for kind in ["sky", "xyz", "uncertainty"] {
        let png = d.join(format!("{kind}.png"));
        ok(&dust3d(&[
            "plot",
            "--map",
            s(&map),
            "--kind",
            kind,
            "--overlay",
            s(&overlay),
            "--out",
            s(&png),
        ]));
        assert!(std::fs::metadata(&png).unwrap().len() > 10_000, "{kind}");
    }
    fails_with(
        &dust3d(&[
            "plot",
            "--map",
            s(&map),
            "--kind",
            "stars",
            "--out",
            s(&d.join("s.png")),
        ]),
        "--catalog",
    );
    ok(&dust3d(&[
        "plot",
        "--map",
        s(&map),
        "--kind",
        "stars",
        "--catalog",
        s(&overlay),
        "--out",
        s(&d.join("s.png")),
    ]));
    fails_with(
        &dust3d(&[
            "plot",
            "--map",
            s(&map),
            "--kind",
            "pie",
            "--out",
            s(&d.join("p.png")),
        ]),
        "--kind",
    );
    let cmp = d.join("cmp");
    let out = ok(&dust3d(&[
        "compare",
        "--map",
        s(&map),
        "--reference",
        s(&map),
        "--out",
        s(&cmp),
        "--nside",
        "8",
        "--step",
        "5",
    ]));
    assert!(out.contains("median map/reference 1.0000"), "{out}");
    let q = std::fs::read_to_string(cmp.join("compare_quantiles.csv")).unwrap();
    assert!(q.starts_with("given,bin_centre,q16,q50,q84") && q.lines().count() > 10);
    assert!(cmp.join("compare_hist.png").exists() && cmp.join("compare_summary.json").exists());
}

#[test]
fn a_map_keeps_its_distance_prior_and_predictions_read_parallaxes_with_it() {
    use dust3d::likelihood::distance::DistancePrior;
    use dust3d::products::predict::predict;
    let dir = tempfile::tempdir().unwrap();
    let mut map = posterior_map(5);
    let volume = DistancePrior::Volume {
        min_pc: 60.0,
        max_pc: 480.0,
    };
    map.distance_prior = volume;
    let path = dir.path().join("m.nc");
    map.write(&path).unwrap();
    let back = DustMap::read(&path).unwrap();
    assert_eq!(back.distance_prior, volume);
    // a poor parallax (3 ± 1.5 mas): the volume prior moves the star outwards, so its
    // expected extinction grows; a precise one does not care
    let (l, b) = ([30.0, 30.0], [10.0, 10.0]);
    let (par, err) = ([3.0, 3.0], [1.5, 0.003]);
    let with = predict(&back, &l, &b, &par, &err).unwrap();
    let mut paper = back.clone();
    paper.distance_prior = DistancePrior::Parallax;
    let without = predict(&paper, &l, &b, &par, &err).unwrap();
    assert!(
        with.mean[0] > 1.02 * without.mean[0],
        "{:?} vs {:?}",
        with.mean,
        without.mean
    );
    assert!((with.mean[1] - without.mean[1]).abs() < 1e-4 * without.mean[1]);
}
