//! The FITS layout of the published Edenhofer et al. (2024) release, which
//! `dustmaps.edenhofer2023.Edenhofer2023Query(map_fname=...)` reads: export of a dust3d map
//! into it, and import of files in it (the published map itself, as a comparison reference).
//!
//! `mean_and_std_healpix.fits`: empty primary (provenance in its header); images `MEAN` and
//! `STD.` of shape (n_r, n_pix) float32 with `NSIDE`, `ORDERING = 'NEST'`, `CUNIT`; one-column
//! binary tables `RADIAL PIXEL CENTERS` and `RADIAL PIXEL BOUNDARIES` (pc); images
//! `MEAN OF INTEGRATED INNER <R> PC` and `STD. OF INTEGRATED INNER <R> PC` (n_pix) whose
//! `CTYPE` reads "inner density integrated within `<R>` pc" (resp. "std. of inner density ...").
//! `samples_healpix.fits`: image `SAMPLES` (n_samples, n_r, n_pix), the two radial tables and
//! `INTEGRATED INNER <R> PC` (n_samples, n_pix). dustmaps rejects any other HDU, so there is
//! none, and the order above is the order it needs.

use anyhow::{bail, Context, Result};
use fitsio::hdu::FitsHdu;
use fitsio::images::{ImageDescription, ImageType};
use fitsio::tables::{ColumnDataType, ColumnDescription};
use fitsio::FitsFile;
use std::path::{Path, PathBuf};

use crate::base::atomic::write_atomically;
use crate::products::mapfile::DustMap;

mod import;
pub use import::{import, import_with, open_map, open_map_with};

/// File name of the mean-and-std file of the release.
pub const MEAN_FILE: &str = "mean_and_std_healpix.fits";
/// File name of the samples file of the release.
pub const SAMPLES_FILE: &str = "samples_healpix.fits";
const CENTRES_COL: &str = "radial pixel centers";
const BOUNDS_COL: &str = "radial pixel boundaries";

/// The inner radius as the release writes it in HDU names ("69", or "24.5").
fn radius_label(r_pc: f64) -> String {
    if (r_pc - r_pc.round()).abs() < 1e-9 {
        format!("{:.0}", r_pc)
    } else {
        format!("{r_pc}")
    }
}

/// Write `map` into `dir` in the release layout: the mean-and-std file always, the samples
/// file when the map has samples. Returns the paths written.
pub fn export(map: &DustMap, dir: &Path) -> Result<Vec<PathBuf>> {
    map.check()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut out = vec![dir.join(MEAN_FILE)];
    write_atomically(&out[0], |tmp| write_mean_file(map, tmp))
        .with_context(|| format!("cannot write {}", out[0].display()))?;
    if !map.samples.is_empty() {
        if map.inner_samples.len() != map.samples.len() {
            bail!("the map's samples lack their inner integrated samples");
        }
        let p = dir.join(SAMPLES_FILE);
        write_atomically(&p, |tmp| write_samples_file(map, tmp))
            .with_context(|| format!("cannot write {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
}

fn create(tmp: &Path, map: &DustMap) -> Result<FitsFile> {
    // fitsio writes an empty primary HDU by default, which is what dustmaps expects
    let mut f = FitsFile::create(tmp).overwrite().open()?;
    let prim = f.primary_hdu()?;
    write_provenance(&mut f, &prim, map)?;
    Ok(f)
}

fn write_provenance(f: &mut FitsFile, hdu: &FitsHdu, map: &DustMap) -> Result<()> {
    let p = &map.provenance;
    hdu.write_key(f, "ORIGIN", "dust3d")?;
    hdu.write_key(f, "D3DVERS", p.version.as_str())?;
    hdu.write_key(f, "D3DCOMIT", p.git_commit.as_str())?;
    hdu.write_key(f, "D3DKIND", map.kind.as_str())?;
    hdu.write_key(f, "D3DSEED", p.seed.to_string().as_str())?;
    hdu.write_key(f, "D3DCATSH", p.catalog_sha256.as_str())?;
    hdu.write_key(f, "D3DDATE", p.created.as_str())?;
    long_key(f, "D3DCMD", &p.command_line)?;
    for line in p.config.lines().filter(|l| !l.trim().is_empty()) {
        comment(f, &format!("dust3d config: {line}"))?;
    }
    Ok(())
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s.replace('\0', " ")).expect("no NUL left")
}

/// A string key of any length (cfitsio long-string convention).
fn long_key(f: &mut FitsFile, key: &str, value: &str) -> Result<()> {
    let (k, v, c) = (cstr(key), cstr(value), cstr(""));
    let mut status = 0;
    // SAFETY: the current HDU of `f` is the one just written to; the strings outlive the call
    unsafe {
        fitsio::sys::ffpkls(f.as_raw(), k.as_ptr(), v.as_ptr(), c.as_ptr(), &mut status);
    }
    if status != 0 {
        bail!("cfitsio error {status} writing key {key}");
    }
    Ok(())
}

fn comment(f: &mut FitsFile, text: &str) -> Result<()> {
    let t = cstr(text);
    let mut status = 0;
    // SAFETY: as in `long_key`
    unsafe {
        fitsio::sys::ffpcom(f.as_raw(), t.as_ptr(), &mut status);
    }
    if status != 0 {
        bail!("cfitsio error {status} writing a comment");
    }
    Ok(())
}

/// A float32 image filled row by row (`rows` of `npix` values), with the HEALPix keys.
fn write_image(
    f: &mut FitsFile,
    name: &str,
    shape: &[usize],
    map: &DustMap,
    rows: impl Iterator<Item = Vec<f32>>,
    extra: &[(&str, &str)],
) -> Result<()> {
    let desc = ImageDescription {
        data_type: ImageType::Float,
        dimensions: shape,
    };
    let hdu = f.create_image(name, &desc)?;
    hdu.write_key(f, "NSIDE", map.nside as i64)?;
    hdu.write_key(f, "ORDERING", "NEST")?;
    for (k, v) in extra {
        hdu.write_key(f, k, *v)?;
    }
    let npix = map.npix();
    for (i, row) in rows.enumerate() {
        hdu.write_section(f, i * npix, (i + 1) * npix, &row)?;
    }
    Ok(())
}

fn f32_rows<'a>(data: &'a [f64], npix: usize) -> impl Iterator<Item = Vec<f32>> + 'a {
    data.chunks(npix)
        .map(|c| c.iter().map(|&v| v as f32).collect())
}

fn write_radial_tables(f: &mut FitsFile, map: &DustMap) -> Result<()> {
    for (name, col, vals) in [
        ("RADIAL PIXEL CENTERS", CENTRES_COL, &map.centres_pc),
        ("RADIAL PIXEL BOUNDARIES", BOUNDS_COL, &map.shells.edges_pc),
    ] {
        let d = ColumnDescription::new(col)
            .with_type(ColumnDataType::Double)
            .create()?;
        let hdu = f.create_table(name, &[d])?;
        hdu.write_key(f, "TUNIT1", "pc")?;
        hdu.write_col(f, col, vals)?;
    }
    Ok(())
}

fn write_mean_file(map: &DustMap, tmp: &Path) -> Result<()> {
    let (npix, nr) = (map.npix(), map.n_r());
    let r = radius_label(map.shells.edges_pc[0]);
    let mut f = create(tmp, map)?;
    let cunit = [("CUNIT", map.units.as_str())];
    write_image(
        &mut f,
        "MEAN",
        &[nr, npix],
        map,
        f32_rows(&map.mean, npix),
        &cunit,
    )?;
    write_image(
        &mut f,
        "STD.",
        &[nr, npix],
        map,
        f32_rows(&map.std, npix),
        &cunit,
    )?;
    write_radial_tables(&mut f, map)?;
    let ctype = format!("inner density integrated within {r} pc");
    write_image(
        &mut f,
        &format!("MEAN OF INTEGRATED INNER {r} PC"),
        &[npix],
        map,
        f32_rows(&map.inner_mean, npix),
        &[("CTYPE", ctype.as_str())],
    )?;
    let ctype = format!("std. of inner density integrated within {r} pc");
    write_image(
        &mut f,
        &format!("STD. OF INTEGRATED INNER {r} PC"),
        &[npix],
        map,
        f32_rows(&map.inner_std, npix),
        &[("CTYPE", ctype.as_str())],
    )?;
    crate::data::table::close_fits(f)
}

fn write_samples_file(map: &DustMap, tmp: &Path) -> Result<()> {
    let (npix, nr, ns) = (map.npix(), map.n_r(), map.samples.len());
    let r = radius_label(map.shells.edges_pc[0]);
    let mut f = create(tmp, map)?;
    let rows = map.samples.iter().flat_map(|s| f32_rows(s, npix));
    let cunit = [("CUNIT", map.units.as_str())];
    write_image(&mut f, "SAMPLES", &[ns, nr, npix], map, rows, &cunit)?;
    write_radial_tables(&mut f, map)?;
    let ctype = format!("inner density integrated within {r} pc");
    let rows = map.inner_samples.iter().flat_map(|s| f32_rows(s, npix));
    write_image(
        &mut f,
        &format!("INTEGRATED INNER {r} PC"),
        &[ns, npix],
        map,
        rows,
        &[("CTYPE", ctype.as_str())],
    )?;
    crate::data::table::close_fits(f)
}

/// True if `path` is a FITS file (by its first bytes).
pub fn is_fits(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 6];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| &head == b"SIMPLE")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::import::inner_radius;
    use super::*;
    use crate::products::mapfile::Load;
    use crate::sphere::grid::Shells;

    #[test]
    fn radius_labels() {
        assert_eq!(radius_label(69.0), "69");
        assert_eq!(radius_label(24.125), "24.125");
        assert_eq!(
            inner_radius(
                "inner density integrated within 69 pc",
                "inner density integrated within"
            ),
            Some(69.0)
        );
        assert_eq!(
            inner_radius(
                "Inner density integrated within 24.5pc",
                "inner density integrated within"
            ),
            Some(24.5)
        );
        assert_eq!(
            inner_radius("something else", "inner density integrated within"),
            None
        );
    }

    #[test]
    fn export_import_round_trip_keeps_the_map_to_float32() {
        let sh = Shells::log_uniform(69.0, 300.0, 5).unwrap();
        let mut m = DustMap::from_fn(2, sh, "E per pc", |r, u| 1e-3 * (1.0 + u[2]) * r / 100.0);
        let n = m.mean.len();
        m.samples = vec![
            m.mean.iter().map(|v| v * 0.9).collect(),
            m.mean.iter().map(|v| v * 1.1).collect(),
        ];
        m.std = m.mean.iter().map(|v| 0.1 * v).collect();
        m.inner_mean = (0..m.npix()).map(|p| 0.01 + p as f64 * 1e-4).collect();
        m.inner_std = m.inner_mean.iter().map(|v| 0.1 * v).collect();
        m.inner_samples = vec![
            m.inner_mean.iter().map(|v| v * 0.9).collect(),
            m.inner_mean.iter().map(|v| v * 1.1).collect(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let files = export(&m, dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        let back = open_map(&files[0]).unwrap();
        assert_eq!(back.nside, 2);
        assert_eq!(back.shells, m.shells);
        assert_eq!(back.centres_pc, m.centres_pc);
        assert_eq!(back.units, "E per pc");
        let close = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-7 * y.abs())
        };
        assert!(close(&back.mean, &m.mean) && close(&back.std, &m.std));
        assert!(close(&back.inner_mean, &m.inner_mean) && close(&back.inner_std, &m.inner_std));
        let s = open_map(&files[1]).unwrap();
        assert_eq!(s.samples.len(), 2);
        assert!(close(&s.samples[1], &m.samples[1]) && close(&s.mean, &m.mean));
        assert!(close(&s.inner_samples[0], &m.inner_samples[0]));
        assert_eq!(s.mean.len(), n);
        // partial loads: what is left out stays empty, the rest is identical
        for f in &files {
            let part = import_with(f, Load::MEAN).unwrap();
            let full = import(f).unwrap();
            assert!(
                part.std.is_empty() && part.samples.is_empty() && part.inner_samples.is_empty()
            );
            assert_eq!(part.mean, full.mean);
            assert_eq!(part.inner_mean, full.inner_mean);
        }
        let nc = dir.path().join("m.nc");
        m.write(&nc).unwrap();
        let part = DustMap::read_with(&nc, Load::MEAN).unwrap();
        assert!(part.std.is_empty() && part.samples.is_empty());
        assert_eq!(part.mean, DustMap::read(&nc).unwrap().mean);
        let q = crate::products::query::Interpolator::new(
            &part,
            crate::products::query::Quantity::Differential,
            crate::products::query::Convention::Native,
            false,
        )
        .unwrap();
        assert!(q.std(10.0, 10.0, 100.0).is_err());
        let with = Load {
            samples: true,
            ..Load::MEAN
        };
        assert_eq!(DustMap::read_with(&nc, with).unwrap().samples.len(), 2);
    }

    #[test]
    fn foreign_hdus_and_missing_tables_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.fits");
        let mut f = FitsFile::create(&p).open().unwrap();
        let d = ColumnDescription::new("x")
            .with_type(ColumnDataType::Double)
            .create()
            .unwrap();
        f.create_table("EXTRA", &[d]).unwrap();
        drop(f);
        let e = import(&p).unwrap_err().to_string();
        assert!(e.contains("unrecognised HDU") && e.contains("EXTRA"), "{e}");
    }
}
