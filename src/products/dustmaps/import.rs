//! Reading the published release's FITS layout (see the parent module) into a [`DustMap`]:
//! the published map itself, as a comparison reference, or a dust3d export.

use anyhow::{anyhow, bail, Context, Result};
use fitsio::hdu::{FitsHdu, HduInfo};
use fitsio::FitsFile;
use std::path::Path;

use super::{is_fits, BOUNDS_COL, CENTRES_COL};
use crate::base::provenance::Provenance;
use crate::products::mapfile::{DustMap, Load};
use crate::sphere::grid::{self, Shells};

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
    // fitsio panics when the HDU is not a table: say so instead
    if !matches!(hdu.info, HduInfo::TableInfo { .. }) {
        bail!("{file}: HDU '{name}' is not a table (a column '{col}' was expected)");
    }
    hdu.read_col::<f64>(f, col)
        .with_context(|| format!("{file}: table '{name}' has no numeric column '{col}'"))
}

/// Parse "<prefix> <R> pc" into R.
pub(super) fn inner_radius(ctype: &str, prefix: &str) -> Option<f64> {
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
        // a FITS export keeps no config, schedule, validation or warnings
        ..Default::default()
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
    let mut p = read_parts(path, load)?;
    let (nside, shells, centres_pc) = radial_axis(&file, &mut p)?;
    let (npix, nr) = (grid::npix(nside), shells.len());
    let (mean, std, samples) = voxel_arrays(&file, &mut p, nr, npix)?;
    let (inner_mean, inner_std, inner_samples) = inner_arrays(&file, &mut p, npix, samples.len())?;
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
        // the paper's windows: its parallaxes read as posteriors in 1/d
        distance_prior: crate::likelihood::distance::DistancePrior::Parallax,
    };
    map.check()
        .with_context(|| format!("{file}: inconsistent map"))?;
    Ok(map)
}

/// An error unless `img` has `shape`.
fn expect_shape(file: &str, img: &Image, what: &str, shape: &[usize]) -> Result<()> {
    if img.shape != shape {
        bail!(
            "{file}: {what} has shape {:?}, expected {shape:?}",
            img.shape
        );
    }
    Ok(())
}

/// nside, shells and shell centres of the release's tables, checked against each other and
/// against the inner map's radius.
fn radial_axis(file: &str, p: &mut Parts) -> Result<(u32, Shells, Vec<f64>)> {
    let nside = p
        .nside
        .ok_or_else(|| anyhow!("{file}: no MEAN or SAMPLES image HDU"))?;
    let edges = p
        .edges
        .take()
        .ok_or_else(|| anyhow!("{file}: no 'RADIAL PIXEL BOUNDARIES' table"))?;
    let centres_pc = p
        .centres
        .take()
        .ok_or_else(|| anyhow!("{file}: no 'RADIAL PIXEL CENTERS' table"))?;
    if edges.len() < 2
        || edges
            .windows(2)
            .any(|w| w[1].partial_cmp(&w[0]) != Some(std::cmp::Ordering::Greater))
    {
        bail!("{file}: radial pixel boundaries must increase strictly");
    }
    let shells = Shells { edges_pc: edges };
    if let Some((r, _)) = &p.inner {
        if (r - shells.edges_pc[0]).abs() > 1e-3 * r.max(1.0) {
            bail!(
                "{file}: inner map is integrated within {r} pc but the first boundary is {} pc",
                shells.edges_pc[0]
            );
        }
    }
    Ok((nside, shells, centres_pc))
}

/// Mean, std and samples (each `[radius][pixel]`).
type VoxelArrays = (Vec<f64>, Vec<f64>, Vec<Vec<f64>>);

/// Mean, std and samples of the voxels: from the samples when the file has them, else from
/// the MEAN and STD. images.
fn voxel_arrays(file: &str, p: &mut Parts, nr: usize, npix: usize) -> Result<VoxelArrays> {
    if let Some(s) = &p.samples {
        let ns = s.shape.first().copied().unwrap_or(0);
        expect_shape(file, s, "SAMPLES", &[ns, nr, npix])?;
        let (m, sd) = sample_moments(&s.data, nr * npix);
        let samples = s.data.chunks(nr * npix).map(<[f64]>::to_vec).collect();
        return Ok((m, sd, samples));
    }
    let m = p
        .mean
        .take()
        .ok_or_else(|| anyhow!("{file}: no MEAN image"))?;
    expect_shape(file, &m, "MEAN", &[nr, npix])?;
    let sd = match p.std.take() {
        Some(s) => {
            expect_shape(file, &s, "STD.", &[nr, npix])?;
            s.data
        }
        None => vec![0.0; nr * npix],
    };
    Ok((m.data, sd, Vec::new()))
}

/// Mean, std and samples of the inner integrated map (zeros when the file has none).
fn inner_arrays(file: &str, p: &mut Parts, npix: usize, n_samples: usize) -> Result<VoxelArrays> {
    Ok(match &p.inner {
        Some((_, img)) if n_samples > 0 => {
            expect_shape(
                file,
                img,
                "the inner integrated samples",
                &[n_samples, npix],
            )?;
            let (m, s) = sample_moments(&img.data, npix);
            (m, s, img.data.chunks(npix).map(<[f64]>::to_vec).collect())
        }
        Some((_, img)) => {
            expect_shape(file, img, "the inner integrated mean", &[npix])?;
            let s = p.inner_std.take().map_or(vec![0.0; npix], |s| s.data);
            (img.data.clone(), s, Vec::new())
        }
        None => (vec![0.0; npix], vec![0.0; npix], Vec::new()),
    })
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
