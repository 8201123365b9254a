//! The scripted comparison with the published map (validation/) on small synthetic files in
//! the release layout: checksum verification, `validation/compare.sh` end to end.

use dust3d::products::mapfile::DustMap;
use dust3d::sphere::grid::Shells;
use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("DUST3D_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn reference(dir: &Path) {
    // a "published" map: inner radius 69 pc as in the release, dust in a disc
    let mut m = DustMap::from_fn(
        8,
        Shells::log_uniform(69.0, 400.0, 24).unwrap(),
        "E (ZGR23) / pc",
        |r, u| 1e-3 * (-(u[2] * r / 80.0).powi(2)).exp() + 1e-5,
    );
    m.inner_mean = vec![0.01; m.npix()];
    m.inner_std = vec![0.002; m.npix()];
    m.std = m.mean.iter().map(|v| 0.2 * v).collect();
    dust3d::products::dustmaps::export(&m, dir).unwrap();
}

#[test]
fn compare_script_runs_on_release_layout_files_and_checksums_are_verified() {
    let dir = tempfile::tempdir().unwrap();
    let refdir = dir.path().join("zenodo");
    reference(&refdir);
    let root = env!("CARGO_MANIFEST_DIR");
    // fetch.py --verify: good checksums pass, a changed byte fails
    let file = refdir.join("mean_and_std_healpix.fits");
    let sum = Command::new("sha256sum").arg(&file).output().unwrap();
    let hex = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    std::fs::write(
        refdir.join("SHA256SUMS"),
        format!("{hex}  mean_and_std_healpix.fits\n"),
    )
    .unwrap();
    let verify = || {
        Command::new(python())
            .args([
                &format!("{root}/validation/fetch.py"),
                "--verify",
                refdir.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let o = verify();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // a map to validate: the reference scaled by 1.1
    let mut map = dust3d::products::dustmaps::import(&file).unwrap();
    map.mean.iter_mut().for_each(|v| *v *= 1.1);
    map.inner_mean.iter_mut().for_each(|v| *v *= 1.1);
    let map_path = dir.path().join("fit.nc");
    map.write(&map_path).unwrap();
    let out = dir.path().join("validation");
    let o = Command::new("bash")
        .args([
            &format!("{root}/validation/compare.sh"),
            map_path.to_str().unwrap(),
            refdir.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .env("DUST3D", env!("CARGO_BIN_EXE_dust3d"))
        .env("NSIDE", "8")
        .env("STEP", "5")
        .env("DUST3D_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("median map/reference 1.1000"), "{text}");
    for f in [
        "compare/compare_hist.png",
        "compare/compare_quantiles.csv",
        "compare/compare_summary.json",
        "reference_sky.png",
        "map_sky.png",
        "reference_xyz.png",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // a corrupted reference is refused before any comparison
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    assert!(!verify().status.success());
    let o = Command::new("bash")
        .args([
            &format!("{root}/validation/compare.sh"),
            map_path.to_str().unwrap(),
            refdir.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .env("DUST3D", env!("CARGO_BIN_EXE_dust3d"))
        .output()
        .unwrap();
    assert!(!o.status.success());
}
