//! Simulated catalogs round-trip unchanged through every input format; maps round-trip
//! through the netCDF map file.

use dust3d::app::config::{CatalogConfig, Config};
use dust3d::data::catalog::{read_columns, write_catalog, Catalog};

fn simulated() -> (Catalog, dust3d::products::mapfile::DustMap) {
    let mut cfg = Config::default();
    cfg.grid.levels = 1;
    cfg.simulate.n_stars = 2000;
    let sim = dust3d::app::simulate::run(&cfg, "seed = 0").unwrap();
    (sim.catalog, sim.truth)
}

#[test]
fn catalogs_round_trip_through_every_format() {
    let (cat, _) = simulated();
    let dir = tempfile::tempdir().unwrap();
    let cfg = CatalogConfig::default();
    for name in ["c.csv", "c.csv.gz", "c.fits", "c.nc"] {
        let path = dir.path().join(name);
        write_catalog(&cat, &path).unwrap();
        let back = Catalog::read(&path, &cfg).unwrap();
        let mut want = cat.clone();
        want.extra.clear();
        assert_eq!(back, want, "{name}");
        let extras = read_columns(
            &path,
            &["true_distance_pc", "true_extinction", "outlier"],
            None,
            None,
        )
        .unwrap();
        for (k, (_, v)) in cat.extra.iter().enumerate() {
            assert_eq!(&extras.columns[k], v, "{name}: extra column {k}");
        }
    }
}

#[test]
fn mapped_column_names_are_used() {
    let (cat, _) = simulated();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.csv");
    write_catalog(&cat, &path).unwrap();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("parallax_error", "plx_err", 1);
    std::fs::write(&path, text).unwrap();
    let mut cfg = CatalogConfig::default();
    assert!(Catalog::read(&path, &cfg).is_err());
    cfg.columns.parallax_error = "plx_err".into();
    assert_eq!(Catalog::read(&path, &cfg).unwrap().len(), cat.len());
}

#[test]
fn map_file_round_trips() {
    let (_, mut truth) = simulated();
    truth.samples = vec![
        truth.mean.clone(),
        truth.mean.iter().map(|v| 2.0 * v).collect(),
    ];
    truth.inner_samples = vec![vec![0.5; truth.npix()], vec![0.25; truth.npix()]];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.nc");
    truth.write(&path).unwrap();
    let back = dust3d::products::mapfile::DustMap::read(&path).unwrap();
    assert_eq!(back.nside, truth.nside);
    assert_eq!(back.shells, truth.shells);
    assert_eq!(back.samples.len(), 2);
    for (a, b) in back.mean.iter().zip(&truth.mean) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "float32 storage");
    }
    assert_eq!(back.provenance.config, truth.provenance.config);
    assert_eq!(back.provenance.version, env!("CARGO_PKG_VERSION"));
    assert!(dust3d::products::mapfile::is_map_file(&path));
}

#[test]
fn plain_hdf5_tables_from_h5py_are_read() {
    // tests/fixtures/h5py_catalog.h5: 20 rows written by h5py (no netCDF metadata)
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/h5py_catalog.h5");
    let cat = Catalog::read(&path, &CatalogConfig::default()).unwrap();
    assert_eq!(cat.len(), 20);
    assert_eq!(cat.source_id[0], 100);
    assert_eq!((cat.l_deg[0], cat.extinction[1]), (184.256, 0.007));
    assert!(cat.parallax_error_mas.iter().all(|&e| e == 0.1));
    assert!(cat.l_deg.iter().all(|&l| (0.0..360.0).contains(&l)));
}
