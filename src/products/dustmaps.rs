//! The FITS layout of the published Edenhofer et al. (2024) release, which
//! `dustmaps.edenhofer2023.Edenhofer2023Query(map_fname=...)` reads: export of a dust3d map
//! into it, and import of files in it (the published map itself, as a comparison reference).
//!
//! `mean_and_std_healpix.fits`: empty primary (provenance in its header); images `MEAN` and
//! `STD.` of shape (n_r, n_pix) float32 with `NSIDE`, `ORDERING = 'NEST'`, `CUNIT`; one-column
//! binary tables `RADIAL PIXEL CENTERS` and `RADIAL PIXEL BOUNDARIES` (pc); images
//! `MEAN OF INTEGRATED INNER <R> PC` and `STD. OF INTEGRATED INNER <R> PC` (n_pix) whose
//! `CTYPE` reads "inner density integrated within <R> pc" (resp. "std. of inner density ...").
//! `samples_healpix.fits`: image `SAMPLES` (n_samples, n_r, n_pix), the two radial tables and
//! `INTEGRATED INNER <R> PC` (n_samples, n_pix). dustmaps rejects any other HDU, so there is
//! none, and the order above is the order it needs.

use anyhow::{anyhow, bail, Context, Result};
use fitsio::hdu::{FitsHdu, HduInfo};
use fitsio::images::{ImageDescription, ImageType};
use fitsio::tables::{ColumnDataType, ColumnDescription};
use fitsio::FitsFile;
use std::path::{Path, PathBuf};

use crate::base::atomic::write_atomically;
use crate::base::provenance::Provenance;
use crate::products::mapfile::{DustMap, Load};
use crate::sphere::grid::{self, Shells};

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
    Ok(())
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
    Ok(())
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

/// One image HDU read as f64 in NESTED order, with its shape (numpy order).
struct Image {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// What an imported file held, before assembly into a map.
#[derive(Default)]
struct Parts {
    nside: Option<u32>,
    units: Option<String>,
    mean: Option<Image>,
    std: Option<Image>,
    samples: Option<Image>,
    centres: Option<Vec<f64>>,
    edges: Option<Vec<f64>>,
    inner: Option<(f64, Image)>,
    inner_std: Option<Image>,
    provenance: Provenance,
}

fn read_str_key(f: &mut FitsFile, hdu: &FitsHdu, key: &str) -> Option<String> {
    hdu.read_key::<String>(f, key).ok()
}

/// Read an image, converting RING to NESTED order when the header says RING.
fn read_image(f: &mut FitsFile, hdu: &FitsHdu, file: &str, name: &str) -> Result<Image> {
    let shape = match &hdu.info {
        HduInfo::ImageInfo { shape, .. } => shape.clone(),
        _ => bail!("{file}: HDU '{name}' is not an image"),
    };
    let nside: i64 = hdu
        .read_key(f, "NSIDE")
        .map_err(|_| anyhow!("{file}: HDU '{name}' has no NSIDE key"))?;
    let depth = grid::depth_of_nside(nside as u32)
        .with_context(|| format!("{file}: HDU '{name}': NSIDE"))?;
    let npix = grid::npix(nside as u32);
    if shape.last() != Some(&npix) {
        bail!("{file}: HDU '{name}' has shape {shape:?}, its last axis must be 12·NSIDE² = {npix}");
    }
    let ordering = read_str_key(f, hdu, "ORDERING")
        .unwrap_or_default()
        .to_ascii_uppercase();
    let ring = match ordering.as_str() {
        o if o.starts_with("NEST") => false,
        o if o.starts_with("RING") => true,
        o => bail!("{file}: HDU '{name}': ORDERING is {o:?}, expected NEST or RING"),
    };
    let layer = cdshealpix::nested::get(depth);
    let rows = shape.iter().product::<usize>() / npix;
    let mut data = Vec::with_capacity(rows * npix);
    for i in 0..rows {
        let row: Vec<f32> = hdu
            .read_section(f, i * npix, (i + 1) * npix)
            .with_context(|| format!("{file}: HDU '{name}'"))?;
        if ring {
            data.extend((0..npix as u64).map(|p| row[layer.to_ring(p) as usize] as f64));
        } else {
            data.extend(row.iter().map(|&v| v as f64));
        }
    }
    Ok(Image { shape, data })
}

fn read_column(
    f: &mut FitsFile,
    hdu: &FitsHdu,
    file: &str,
    name: &str,
    col: &str,
) -> Result<Vec<f64>> {
    hdu.read_col::<f64>(f, col)
        .with_context(|| format!("{file}: table '{name}' has no numeric column '{col}'"))
}

/// Parse "<prefix> <R> pc" into R.
fn inner_radius(ctype: &str, prefix: &str) -> Option<f64> {
    let rest = ctype.to_ascii_lowercase();
    let rest = rest.strip_prefix(prefix)?.trim();
    rest.strip_suffix("pc")?.trim().parse().ok()
}

fn read_parts(path: &Path, load: Load) -> Result<Parts> {
    let file = path.display().to_string();
    let mut f = FitsFile::open(path).with_context(|| format!("{file}: cannot open as FITS"))?;
    let mut parts = Parts::default();
    let prim = f.primary_hdu()?;
    parts.provenance = Provenance {
        version: read_str_key(&mut f, &prim, "D3DVERS").unwrap_or_default(),
        git_commit: read_str_key(&mut f, &prim, "D3DCOMIT").unwrap_or_default(),
        seed: read_str_key(&mut f, &prim, "D3DSEED")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        catalog_sha256: read_str_key(&mut f, &prim, "D3DCATSH").unwrap_or_default(),
        created: read_str_key(&mut f, &prim, "D3DDATE").unwrap_or_default(),
        command_line: format!("imported from {file}"),
        config: String::new(),
    };
    for i in 1.. {
        let Ok(hdu) = f.hdu(i) else { break };
        let name = read_str_key(&mut f, &hdu, "EXTNAME").unwrap_or_default();
        let lname = name.to_ascii_lowercase();
        match lname.as_str() {
            "std." if !load.std => {}
            n if n.starts_with("std. of integrated inner") && !load.std => {}
            "mean" | "samples" | "std." => {
                let img = read_image(&mut f, &hdu, &file, &name)?;
                let nside: i64 = hdu.read_key(&mut f, "NSIDE")?;
                parts.nside = Some(nside as u32);
                if lname != "std." {
                    parts.units = read_str_key(&mut f, &hdu, "CUNIT");
                }
                match lname.as_str() {
                    "mean" => parts.mean = Some(img),
                    "samples" => parts.samples = Some(img),
                    _ => parts.std = Some(img),
                }
            }
            "radial pixel centers" => {
                parts.centres = Some(read_column(&mut f, &hdu, &file, &name, CENTRES_COL)?)
            }
            "radial pixel boundaries" => {
                parts.edges = Some(read_column(&mut f, &hdu, &file, &name, BOUNDS_COL)?)
            }
            n if n.starts_with("mean of integrated inner") || n.starts_with("integrated inner") => {
                let ctype = read_str_key(&mut f, &hdu, "CTYPE").unwrap_or_default();
                let r = inner_radius(&ctype, "inner density integrated within").ok_or_else(|| {
                    anyhow!("{file}: HDU '{name}': CTYPE {ctype:?} does not read 'inner density integrated within <R> pc'")
                })?;
                parts.inner = Some((r, read_image(&mut f, &hdu, &file, &name)?));
            }
            n if n.starts_with("std. of integrated inner") => {
                parts.inner_std = Some(read_image(&mut f, &hdu, &file, &name)?);
            }
            _ => bail!("{file}: unrecognised HDU #{i} '{name}' (not in the release layout)"),
        }
    }
    Ok(parts)
}

/// Mean and std (1/N) over the rows of a (n_s, len) array.
fn sample_moments(data: &[f64], len: usize) -> (Vec<f64>, Vec<f64>) {
    let rows: Vec<Vec<f64>> = data.chunks(len).map(<[f64]>::to_vec).collect();
    crate::base::util::mean_std(&rows)
}

/// Read a file in the release layout (mean-and-std or samples file) as a map. A samples file
/// yields samples, with the mean and std computed from them.
pub fn import(path: &Path) -> Result<DustMap> {
    import_with(path, Load::ALL)
}

/// [`import`] of the parts `load` asks for (a samples file is read whole to form the mean,
/// then its samples are dropped unless asked for).
pub fn import_with(path: &Path, load: Load) -> Result<DustMap> {
    let file = path.display().to_string();
    let p = read_parts(path, load)?;
    let nside = p
        .nside
        .ok_or_else(|| anyhow!("{file}: no MEAN or SAMPLES image HDU"))?;
    let edges = p
        .edges
        .ok_or_else(|| anyhow!("{file}: no 'RADIAL PIXEL BOUNDARIES' table"))?;
    let centres_pc = p
        .centres
        .ok_or_else(|| anyhow!("{file}: no 'RADIAL PIXEL CENTERS' table"))?;
    if edges.len() < 2
        || edges
            .windows(2)
            .any(|w| w[1].partial_cmp(&w[0]) != Some(std::cmp::Ordering::Greater))
    {
        bail!("{file}: radial pixel boundaries must increase strictly");
    }
    let npix = grid::npix(nside);
    let nr = edges.len() - 1;
    let shells = Shells { edges_pc: edges };
    if let Some((r, _)) = &p.inner {
        if (r - shells.edges_pc[0]).abs() > 1e-3 * r.max(1.0) {
            bail!(
                "{file}: inner map is integrated within {r} pc but the first boundary is {} pc",
                shells.edges_pc[0]
            );
        }
    }
    let expect = |img: &Image, what: &str, shape: &[usize]| -> Result<()> {
        if img.shape != shape {
            bail!(
                "{file}: {what} has shape {:?}, expected {shape:?}",
                img.shape
            );
        }
        Ok(())
    };
    let (mean, std, samples) = if let Some(s) = &p.samples {
        let ns = s.shape[0];
        expect(s, "SAMPLES", &[ns, nr, npix])?;
        let (m, sd) = sample_moments(&s.data, nr * npix);
        (
            m,
            sd,
            s.data.chunks(nr * npix).map(<[f64]>::to_vec).collect(),
        )
    } else {
        let m = p.mean.ok_or_else(|| anyhow!("{file}: no MEAN image"))?;
        expect(&m, "MEAN", &[nr, npix])?;
        let sd = match p.std {
            Some(s) => {
                expect(&s, "STD.", &[nr, npix])?;
                s.data
            }
            None => vec![0.0; nr * npix],
        };
        (m.data, sd, Vec::new())
    };
    let (inner_mean, inner_std, inner_samples) = match (&p.inner, &samples.is_empty()) {
        (Some((_, img)), false) => {
            expect(img, "the inner integrated samples", &[samples.len(), npix])?;
            let (m, s) = sample_moments(&img.data, npix);
            (m, s, img.data.chunks(npix).map(<[f64]>::to_vec).collect())
        }
        (Some((_, img)), true) => {
            expect(img, "the inner integrated mean", &[npix])?;
            let s = p.inner_std.map_or(vec![0.0; npix], |s| s.data);
            (img.data.clone(), s, Vec::new())
        }
        (None, _) => (vec![0.0; npix], vec![0.0; npix], Vec::new()),
    };
    let (std, inner_std) = if load.std {
        (std, inner_std)
    } else {
        (Vec::new(), vec![0.0; npix])
    };
    let (samples, inner_samples) = if load.samples {
        (samples, inner_samples)
    } else {
        (Vec::new(), Vec::new())
    };
    let map = DustMap {
        nside,
        shells,
        centres_pc,
        star_count: vec![],
        mean,
        std,
        samples,
        inner_mean,
        inner_std,
        inner_samples,
        integrated_mean: vec![],
        integrated_std: vec![],
        units: p.units.unwrap_or_default(),
        kind: "imported".into(),
        provenance: p.provenance,
    };
    map.check()
        .with_context(|| format!("{file}: inconsistent map"))?;
    Ok(map)
}

/// Open a map in any format dust3d reads: its own netCDF map or the release's FITS layout.
pub fn open_map(path: &Path) -> Result<DustMap> {
    open_map_with(path, Load::ALL)
}

/// [`open_map`] of the parts `load` asks for.
pub fn open_map_with(path: &Path, load: Load) -> Result<DustMap> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    if is_fits(path) {
        import_with(path, load)
    } else {
        DustMap::read_with(path, load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
