//! Interpolation of a map onto regular boxes (the release's interp2box / interp2lbd):
//! heliocentric Galactic Cartesian boxes (x towards l = 0, y towards l = 90°, z towards the
//! north Galactic pole; pc) or (l, b, d) boxes (deg, deg, pc), endpoints included. The box is
//! computed and written in slabs along its first axis, so memory stays at one slab however
//! large the box; output is netCDF-4 or FITS by extension, written atomically.

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;

use crate::base::atomic::write_atomically;
use crate::products::query::Interpolator;

/// Kind of box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoxKind {
    /// Heliocentric Galactic Cartesian x, y, z in pc.
    Cartesian,
    /// Galactic longitude (deg), latitude (deg), distance (pc).
    Lbd,
}

impl BoxKind {
    /// Axis names.
    pub fn axes(self) -> [&'static str; 3] {
        match self {
            BoxKind::Cartesian => ["x", "y", "z"],
            BoxKind::Lbd => ["l", "b", "distance"],
        }
    }

    fn units(self) -> [&'static str; 3] {
        match self {
            BoxKind::Cartesian => ["pc", "pc", "pc"],
            BoxKind::Lbd => ["deg", "deg", "pc"],
        }
    }
}

/// A regular box: `n[i]` points from `lo[i]` to `hi[i]` inclusive on each axis.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxSpec {
    /// Cartesian or (l, b, d).
    pub kind: BoxKind,
    /// Points per axis.
    pub n: [usize; 3],
    /// First value per axis.
    pub lo: [f64; 3],
    /// Last value per axis.
    pub hi: [f64; 3],
}

fn parse_tuple(s: &str, what: &str, spec: &str) -> Result<Vec<String>> {
    let inner = s
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| anyhow!("box {spec:?}: {what} must be in parentheses"))?;
    Ok(inner.split(',').map(str::to_owned).collect())
}

impl BoxSpec {
    /// Parse `'(nx,ny,nz)::((x0,x1),(y0,y1),(z0,z1))'`.
    pub fn parse(spec: &str, kind: BoxKind) -> Result<Self> {
        let s: String = spec.chars().filter(|c| !c.is_whitespace()).collect();
        let help = "expected '(n1,n2,n3)::((a1,b1),(a2,b2),(a3,b3))'";
        let (counts, ranges) = s
            .split_once("::")
            .ok_or_else(|| anyhow!("box {spec:?}: {help}"))?;
        let counts = parse_tuple(counts, "the point counts", spec)?;
        if counts.len() != 3 {
            bail!(
                "box {spec:?}: need 3 point counts, got {}; {help}",
                counts.len()
            );
        }
        let mut n = [0usize; 3];
        for (k, c) in counts.iter().enumerate() {
            n[k] = c.parse().ok().filter(|&v: &usize| v > 0).ok_or_else(|| {
                anyhow!("box {spec:?}: point count {c:?} is not a positive integer")
            })?;
        }
        let inner = ranges
            .strip_prefix("((")
            .and_then(|t| t.strip_suffix("))"))
            .ok_or_else(|| anyhow!("box {spec:?}: ranges must read ((a1,b1),(a2,b2),(a3,b3))"))?;
        let parts: Vec<&str> = inner.split("),(").collect();
        if parts.len() != 3 {
            bail!("box {spec:?}: need 3 ranges, got {}; {help}", parts.len());
        }
        let (mut lo, mut hi) = ([0.0; 3], [0.0; 3]);
        for (k, p) in parts.iter().enumerate() {
            let v: Vec<f64> = p
                .split(',')
                .map(|x| x.parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| anyhow!("box {spec:?}: range {p:?} is not two numbers"))?;
            if v.len() != 2 || !v.iter().all(|x| x.is_finite()) || v[1] < v[0] {
                bail!("box {spec:?}: range ({p}) must be two finite numbers, low ≤ high");
            }
            (lo[k], hi[k]) = (v[0], v[1]);
        }
        if n.iter()
            .try_fold(1usize, |acc, &v| acc.checked_mul(v))
            .is_none()
        {
            bail!(
                "box {spec:?}: {} × {} × {} points is more than this machine can count",
                n[0],
                n[1],
                n[2]
            );
        }
        let b = BoxSpec { kind, n, lo, hi };
        if kind == BoxKind::Lbd && (lo[1] < -90.0 || hi[1] > 90.0 || lo[2] < 0.0) {
            bail!("box {spec:?}: latitudes must lie in [-90, 90] and distances be ≥ 0");
        }
        Ok(b)
    }

    /// Coordinate values of axis `a`.
    pub fn axis(&self, a: usize) -> Vec<f64> {
        let n = self.n[a];
        (0..n)
            .map(|i| {
                if n == 1 {
                    self.lo[a]
                } else {
                    self.lo[a] + (self.hi[a] - self.lo[a]) * i as f64 / (n - 1) as f64
                }
            })
            .collect()
    }

    /// Galactic (l deg, b deg, d pc) of the point with coordinates `c`.
    pub fn lbd(&self, c: [f64; 3]) -> (f64, f64, f64) {
        match self.kind {
            BoxKind::Lbd => (c[0], c[1], c[2]),
            BoxKind::Cartesian => {
                let d = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
                if d == 0.0 {
                    return (0.0, 0.0, 0.0);
                }
                let l = c[1].atan2(c[0]).to_degrees().rem_euclid(360.0);
                let b = (c[2] / d).clamp(-1.0, 1.0).asin().to_degrees();
                (l, b, d)
            }
        }
    }

    /// Total number of points.
    pub fn len(&self) -> usize {
        self.n.iter().product()
    }

    /// An error unless the box has at most `max_points` points; names the size of the
    /// output (mean and std, float32) it would write.
    pub fn check_size(&self, max_points: usize) -> Result<()> {
        let n = self.len();
        if n > max_points {
            bail!(
                "the box has {n} points ({:.3e}; output about {:.1} GB), more than --max-points \
                 {max_points}: raise --max-points to write it",
                n as f64,
                8.0 * n as f64 / 1e9
            );
        }
        Ok(())
    }

    /// True if the box has no points (never, after parsing).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Values of one slab (first-axis index `i`): (mean, std) per point, axis 2 fastest.
fn slab(
    spec: &BoxSpec,
    mean: &Interpolator,
    std: Option<&Interpolator>,
    i: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (x, y, z) = (spec.axis(0)[i], spec.axis(1), spec.axis(2));
    let pts: Vec<(f64, f64, f64)> = y
        .iter()
        .flat_map(|&b| z.iter().map(move |&c| (b, c)))
        .map(|(b, c)| spec.lbd([x, b, c]))
        .collect();
    pts.par_iter()
        .map(|&(l, b, d)| {
            let m = mean.mean(l, b, d) as f32;
            let s = std.map_or(f64::NAN, |q| q.std(l, b, d).unwrap_or(f64::NAN)) as f32;
            (m, s)
        })
        .unzip()
}

/// Interpolate onto `spec` and write `out` (.nc or .fits): the mean, and the std where
/// `std` is given. `what` is the long name of the quantity (units in `units`).
pub fn write_box(
    spec: &BoxSpec,
    mean: &Interpolator,
    std: Option<&Interpolator>,
    units: &str,
    what: &str,
    out: &Path,
) -> Result<()> {
    let name = out.to_string_lossy().to_ascii_lowercase();
    let fits = name.ends_with(".fits") || name.ends_with(".fit");
    if !fits && !name.ends_with(".nc") {
        bail!("{}: output must be .nc (netCDF) or .fits", out.display());
    }
    let pb = crate::base::logging::progress(spec.n[0] as u64, "interp");
    let mut report = |i: usize| {
        pb.set_position(i as u64 + 1);
        if (i + 1).is_multiple_of((spec.n[0] / 10).max(1)) {
            tracing::info!("interp: slab {}/{}", i + 1, spec.n[0]);
        }
    };
    write_atomically(out, |tmp| {
        if fits {
            write_fits(spec, mean, std, units, tmp, &mut report)
        } else {
            write_netcdf(spec, mean, std, units, what, tmp, &mut report)
        }
    })
    .with_context(|| format!("cannot write {}", out.display()))?;
    pb.finish_and_clear();
    Ok(())
}

fn write_netcdf(
    spec: &BoxSpec,
    mean: &Interpolator,
    std: Option<&Interpolator>,
    units: &str,
    what: &str,
    tmp: &Path,
    report: &mut dyn FnMut(usize),
) -> Result<()> {
    let axes = spec.kind.axes();
    let mut nc = netcdf::create(tmp)?;
    for a in 0..3 {
        nc.add_dimension(axes[a], spec.n[a])?;
    }
    nc.add_attribute("title", "dust3d map interpolated onto a box")?;
    nc.add_attribute(
        "frame",
        "heliocentric Galactic; x to l = 0, y to l = 90 deg, z to the north Galactic pole",
    )?;
    for a in 0..3 {
        let mut v = nc.add_variable::<f64>(axes[a], &[axes[a]])?;
        v.put_attribute("units", spec.kind.units()[a])?;
        v.put_values(&spec.axis(a), ..)?;
    }
    let names: &[&str] = if std.is_some() {
        &["mean", "std"]
    } else {
        &["mean"]
    };
    for n in names {
        let mut v = nc.add_variable::<f32>(n, &axes)?;
        v.put_attribute("units", units)?;
        v.put_attribute("long_name", format!("{what} ({n})"))?;
        v.put_attribute("_FillValue", f32::NAN)?;
    }
    for i in 0..spec.n[0] {
        let (m, s) = slab(spec, mean, std, i);
        nc.variable_mut("mean")
            .expect("defined")
            .put_values(&m, (i, .., ..))?;
        if std.is_some() {
            nc.variable_mut("std")
                .expect("defined")
                .put_values(&s, (i, .., ..))?;
        }
        report(i);
    }
    Ok(nc.close()?)
}

fn write_fits(
    spec: &BoxSpec,
    mean: &Interpolator,
    std: Option<&Interpolator>,
    units: &str,
    tmp: &Path,
    report: &mut dyn FnMut(usize),
) -> Result<()> {
    use fitsio::images::{ImageDescription, ImageType};
    let mut f = fitsio::FitsFile::create(tmp).open()?;
    let desc = ImageDescription {
        data_type: ImageType::Float,
        dimensions: &spec.n,
    };
    let names: &[&str] = if std.is_some() {
        &["MEAN", "STD"]
    } else {
        &["MEAN"]
    };
    let mut hdus = Vec::new();
    for n in names {
        let hdu = f.create_image(*n, &desc)?;
        hdu.write_key(&mut f, "BUNIT", units)?;
        // FITS axis 1 is the fastest (numpy's last) axis
        for a in 0..3 {
            let fa = 3 - a;
            let step = if spec.n[a] > 1 {
                (spec.hi[a] - spec.lo[a]) / (spec.n[a] - 1) as f64
            } else {
                0.0
            };
            hdu.write_key(&mut f, &format!("CTYPE{fa}"), spec.kind.axes()[a])?;
            hdu.write_key(&mut f, &format!("CUNIT{fa}"), spec.kind.units()[a])?;
            hdu.write_key(&mut f, &format!("CRPIX{fa}"), 1.0)?;
            hdu.write_key(&mut f, &format!("CRVAL{fa}"), spec.lo[a])?;
            hdu.write_key(&mut f, &format!("CDELT{fa}"), step)?;
        }
        hdus.push(hdu);
    }
    let plane = spec.n[1] * spec.n[2];
    for i in 0..spec.n[0] {
        let (m, s) = slab(spec, mean, std, i);
        hdus[0].write_section(&mut f, i * plane, (i + 1) * plane, &m)?;
        if let Some(h) = hdus.get(1) {
            h.write_section(&mut f, i * plane, (i + 1) * plane, &s)?;
        }
        report(i);
    }
    crate::data::table::close_fits(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::products::mapfile::DustMap;
    use crate::products::query::{Convention, Quantity};
    use crate::sphere::grid::Shells;

    #[test]
    fn huge_boxes_are_refused_before_any_work() {
        let b = BoxSpec::parse(
            "(100000,100000,100000)::((-1,1),(-1,1),(-1,1))",
            BoxKind::Cartesian,
        )
        .unwrap();
        let e = format!("{:#}", b.check_size(200_000_000).unwrap_err());
        assert!(
            e.contains("1000000000000000 points") && e.contains("--max-points"),
            "{e}"
        );
        assert!(b.check_size(usize::MAX).is_ok());
        let e = BoxSpec::parse(
            "(10000000000,10000000000,1000)::((-1,1),(-1,1),(-1,1))",
            BoxKind::Cartesian,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("more than this machine can count"));
    }

    #[test]
    fn box_strings_parse_and_reject_nonsense() {
        let b = BoxSpec::parse("(3, 2,1)::((-10,10),(0,5),(7,7))", BoxKind::Cartesian).unwrap();
        assert_eq!(b.n, [3, 2, 1]);
        assert_eq!(b.axis(0), [-10.0, 0.0, 10.0]);
        assert_eq!(b.axis(2), [7.0]);
        for bad in [
            "",
            "(3,2)::((0,1),(0,1),(0,1))",
            "(3,2,0)::((0,1),(0,1),(0,1))",
            "(3,2,x)::((0,1),(0,1),(0,1))",
            "(3,2,1)::((0,1),(0,1))",
            "(3,2,1)::((1,0),(0,1),(0,1))",
            "(3,2,1)::((0,nan),(0,1),(0,1))",
            "(3,2,1)((0,1),(0,1),(0,1))",
        ] {
            let e = BoxSpec::parse(bad, BoxKind::Cartesian)
                .unwrap_err()
                .to_string();
            assert!(e.contains("box"), "{bad}: {e}");
        }
        assert!(BoxSpec::parse("(1,1,1)::((0,1),(-95,0),(0,1))", BoxKind::Lbd).is_err());
    }

    #[test]
    fn cartesian_points_map_to_galactic_coordinates() {
        let b = BoxSpec::parse("(1,1,1)::((0,0),(0,0),(0,0))", BoxKind::Cartesian).unwrap();
        let (l, bb, d) = b.lbd([0.0, 100.0, 0.0]);
        assert!((l - 90.0).abs() < 1e-12 && bb.abs() < 1e-12 && (d - 100.0).abs() < 1e-12);
        let (_, bb, _) = b.lbd([0.0, 0.0, -5.0]);
        assert!((bb + 90.0).abs() < 1e-12);
        let (l, _, _) = b.lbd([-1.0, -1.0, 0.0]);
        assert!((l - 225.0).abs() < 1e-12);
    }

    #[test]
    fn radial_density_is_reproduced_on_a_box_and_outside_is_nan() {
        // ρ depends on r only and is exactly log-linear in r: reproduced at any point
        let sh = Shells::log_uniform(20.0, 400.0, 40).unwrap();
        let m = DustMap::from_fn(4, sh, "E per pc", |r, _| 1e-3 * (-r / 150.0).exp());
        let q = Interpolator::new(&m, Quantity::Differential, Convention::Native, false).unwrap();
        let spec = BoxSpec::parse(
            "(9,9,9)::((-400,400),(-400,400),(-400,400))",
            BoxKind::Cartesian,
        )
        .unwrap();
        let (mut inside, mut outside) = (0, 0);
        for i in 0..9 {
            let (vals, _) = slab(&spec, &q, None, i);
            for (j, v) in vals.iter().enumerate() {
                let c = [spec.axis(0)[i], spec.axis(1)[j / 9], spec.axis(2)[j % 9]];
                let (_, _, d) = spec.lbd(c);
                let centres = &m.centres_pc;
                if d < m.shells.edges_pc[0] || d > 400.0 {
                    assert!(v.is_nan(), "{c:?}");
                    outside += 1;
                } else if d >= centres[0] && d <= centres[centres.len() - 1] {
                    let want = 1e-3 * (-d / 150.0).exp();
                    assert!(
                        (*v as f64 / want - 1.0).abs() < 1e-6,
                        "{c:?}: {v} vs {want}"
                    );
                    inside += 1;
                }
            }
        }
        assert!(inside > 100 && outside > 100);
    }
}
