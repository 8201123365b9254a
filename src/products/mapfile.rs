//! The dust3d map file (netCDF-4): posterior mean, std and samples of the differential
//! extinction ρ on NESTED pixels × radial shells, the integrated inner-region map, and
//! provenance. Arrays are stored as float32 (like the published release), radii as float64.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

use crate::base::atomic::Staged;
use crate::base::provenance::Provenance;
use crate::likelihood::distance::DistancePrior;
use crate::sphere::grid::{self, Shells};

/// Which optional parts of a map file to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// The std map.
    pub std: bool,
    /// The samples (and inner samples).
    pub samples: bool,
    /// The stored integrated mean and std.
    pub integrated: bool,
}

impl Load {
    /// Everything.
    pub const ALL: Load = Load {
        std: true,
        samples: true,
        integrated: true,
    };
    /// The mean (and inner maps) only.
    pub const MEAN: Load = Load {
        std: false,
        samples: false,
        integrated: false,
    };
}

/// A 3D dust map: arrays are `[radius][pixel]` (pixel fastest), NESTED ordering.
#[derive(Clone, Debug, PartialEq)]
pub struct DustMap {
    /// HEALPix nside (NESTED).
    pub nside: u32,
    /// Radial shells, pc.
    pub shells: Shells,
    /// Shell centres used for interpolation, pc (geometric means of the edges for dust3d's
    /// own maps; whatever a foreign file says for imported ones).
    pub centres_pc: Vec<f64>,
    /// Mean differential extinction per pc, `[radius][pixel]`.
    pub mean: Vec<f64>,
    /// Standard deviation, `[radius][pixel]` (zeros for a truth map).
    pub std: Vec<f64>,
    /// Samples, each `[radius][pixel]`; may be empty.
    pub samples: Vec<Vec<f64>>,
    /// Mean integrated extinction inside the inner shell edge, per pixel.
    pub inner_mean: Vec<f64>,
    /// Standard deviation of the inner integrated extinction, per pixel.
    pub inner_std: Vec<f64>,
    /// Inner integrated extinction per sample, each per pixel; empty if no samples.
    pub inner_samples: Vec<Vec<f64>>,
    /// Posterior mean of the integrated extinction to the far edge of each shell (including
    /// the inner map), `[radius][pixel]`; empty if not computed.
    pub integrated_mean: Vec<f64>,
    /// Posterior std of the integrated extinction, `[radius][pixel]`; empty if not computed.
    pub integrated_std: Vec<f64>,
    /// Number of stars the fit used per pixel (empty if unknown, e.g. for a truth map).
    pub star_count: Vec<u32>,
    /// Unit of ρ.
    pub units: String,
    /// "truth" or "posterior".
    pub kind: String,
    /// Where the map came from.
    pub provenance: Provenance,
    /// The stars' distance prior of the fit (how `predict` and `validate` read parallaxes).
    pub distance_prior: DistancePrior,
}

impl DustMap {
    /// A truth map of the voxel densities `mean` (`[radius][pixel]`): zero std, no samples and
    /// no dust inside the inner edge (the model has none there).
    pub fn truth(nside: u32, shells: Shells, units: &str, mean: Vec<f64>) -> Self {
        let npix = grid::npix(nside);
        DustMap {
            nside,
            centres_pc: shells.centres_pc(),
            star_count: vec![],
            std: vec![0.0; mean.len()],
            mean,
            samples: vec![],
            inner_mean: vec![0.0; npix],
            inner_std: vec![0.0; npix],
            inner_samples: vec![],
            integrated_mean: vec![],
            integrated_std: vec![],
            units: units.into(),
            kind: "truth".into(),
            provenance: Provenance::default(),
            distance_prior: DistancePrior::Parallax,
            shells,
        }
    }

    /// A truth-like map (zero std, no samples, no inner dust) with density `rho(r_pc, unit
    /// vector)` evaluated at every voxel centre (geometric shell centre, pixel centre).
    pub fn from_fn(
        nside: u32,
        shells: Shells,
        units: &str,
        rho: impl Fn(f64, [f64; 3]) -> f64,
    ) -> Self {
        let npix = grid::npix(nside);
        let centres_pc = shells.centres_pc();
        let dirs: Vec<[f64; 3]> = (0..npix as u64).map(|p| grid::pix2vec(nside, p)).collect();
        let mean: Vec<f64> = centres_pc
            .iter()
            .flat_map(|&r| dirs.iter().map(move |&u| (r, u)))
            .map(|(r, u)| rho(r, u))
            .collect();
        Self::truth(nside, shells, units, mean)
    }

    /// Number of pixels.
    pub fn npix(&self) -> usize {
        grid::npix(self.nside)
    }

    /// Number of radial shells.
    pub fn n_r(&self) -> usize {
        self.shells.len()
    }

    /// Check array sizes against the grid.
    pub fn check(&self) -> Result<()> {
        let n = self.npix() * self.n_r();
        // an empty std is a map read without it (see `Load`)
        if self.mean.len() != n || (self.std.len() != n && !self.std.is_empty()) {
            bail!(
                "map arrays have {} / {} values, grid needs {n}",
                self.mean.len(),
                self.std.len()
            );
        }
        if !self.integrated_mean.is_empty()
            && (self.integrated_mean.len() != n || self.integrated_std.len() != n)
        {
            bail!("integrated maps must have {n} values");
        }
        if self.samples.iter().any(|s| s.len() != n) {
            bail!("a sample has the wrong size (grid needs {n})");
        }
        if self.centres_pc.len() != self.n_r()
            || self
                .centres_pc
                .iter()
                .zip(self.shells.edges_pc.windows(2))
                .any(|(c, e)| !(*c >= e[0] && *c <= e[1]))
        {
            bail!("shell centres must lie inside their shells, one per shell");
        }
        if !self.star_count.is_empty() && self.star_count.len() != self.npix() {
            bail!(
                "star counts must have one value per pixel ({})",
                self.npix()
            );
        }
        if self.inner_mean.len() != self.npix() || self.inner_std.len() != self.npix() {
            bail!("inner maps must have one value per pixel ({})", self.npix());
        }
        if !self.inner_samples.is_empty() && self.inner_samples.len() != self.samples.len() {
            bail!("inner samples must match the samples in number");
        }
        Ok(())
    }

    /// Write the map atomically to `path` (netCDF-4).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut set = Staged::default();
        self.write_staged(&mut set, path)?;
        set.commit()
    }

    /// Write the map to `path` within a staged set (see [`Staged`]).
    pub fn write_staged(&self, set: &mut Staged, path: &Path) -> Result<()> {
        self.check()?;
        set.write(path, |tmp| self.write_netcdf(tmp))
            .with_context(|| format!("cannot write map {}", path.display()))
    }

    fn write_netcdf(&self, tmp: &Path) -> Result<()> {
        let mut nc = self.define(tmp, self.npix())?;
        self.put_block(&mut nc, 0)?;
        // closing flushes the buffers: its error (a full disk) must not be dropped
        Ok(nc.close()?)
    }

    /// Write a map that is held in pixel blocks (one per MPI rank, never all at once):
    /// `self` is the block starting at pixel 0 and carries the metadata; `next()` yields
    /// the following blocks with their first pixel, until `None`. Staged in `set`: the file
    /// appears under `path` when the set is committed.
    pub fn write_blocks(
        &self,
        set: &mut Staged,
        path: &Path,
        npix_total: usize,
        mut next: impl FnMut() -> Result<Option<(usize, DustMap)>>,
    ) -> Result<()> {
        set.write(path, |tmp| {
            let mut nc = self.define(tmp, npix_total)?;
            self.put_block(&mut nc, 0)?;
            while let Some((p0, b)) = next()? {
                b.put_block(&mut nc, p0)?;
            }
            Ok(nc.close()?)
        })
        .with_context(|| format!("cannot write map {}", path.display()))
    }

    /// The arrays of a pixel block as one vector (for sending to the writing rank).
    pub fn block_to_vec(&self) -> Vec<f64> {
        let mut v = Vec::new();
        for a in [
            &self.mean,
            &self.std,
            &self.integrated_mean,
            &self.integrated_std,
            &self.inner_mean,
            &self.inner_std,
        ] {
            v.extend_from_slice(a);
        }
        v.extend(self.star_count.iter().map(|&c| c as f64));
        for s in self.samples.iter().chain(&self.inner_samples) {
            v.extend_from_slice(s);
        }
        v
    }

    /// A block of `nb` pixels from [`DustMap::block_to_vec`]; `like` is a block of the same
    /// map (same shells, sample count and metadata).
    pub fn block_from_vec(like: &DustMap, nb: usize, v: &[f64]) -> Result<DustMap> {
        let nr = like.n_r();
        let mut at = 0;
        let mut take = |n: usize| -> Result<Vec<f64>> {
            let s = v.get(at..at + n).context("map block message too short")?;
            at += n;
            Ok(s.to_vec())
        };
        let integ = if like.integrated_mean.is_empty() {
            0
        } else {
            nr * nb
        };
        let sc = if like.star_count.is_empty() { 0 } else { nb };
        let mut b = like.clone();
        b.mean = take(nr * nb)?;
        b.std = take(nr * nb)?;
        b.integrated_mean = take(integ)?;
        b.integrated_std = take(integ)?;
        b.inner_mean = take(nb)?;
        b.inner_std = take(nb)?;
        b.star_count = take(sc)?.into_iter().map(|c| c as u32).collect();
        b.samples = (0..like.samples.len())
            .map(|_| take(nr * nb))
            .collect::<Result<_>>()?;
        b.inner_samples = (0..like.inner_samples.len())
            .map(|_| take(nb))
            .collect::<Result<_>>()?;
        if at != v.len() {
            bail!("map block message has {} values, expected {at}", v.len());
        }
        Ok(b)
    }

    /// Create the file for `npix_total` pixels: dimensions, metadata, radii, variables.
    fn define(&self, tmp: &Path, npix_total: usize) -> Result<netcdf::FileMut> {
        let (npix, nr, ns) = (npix_total, self.n_r(), self.samples.len());
        let mut nc = netcdf::create(tmp)?;
        nc.add_dimension("radius", nr)?;
        nc.add_dimension("radius_edge", nr + 1)?;
        nc.add_dimension("pixel", npix)?;
        if ns > 0 {
            nc.add_dimension("sample", ns)?;
        }
        self.write_attributes(&mut nc)?;
        let mut v = nc.add_variable::<f64>("radius", &["radius"])?;
        v.put_attribute("units", "pc")?;
        v.put_attribute("long_name", "shell centre (geometric mean of edges)")?;
        v.put_values(&self.centres_pc, ..)?;
        let mut v = nc.add_variable::<f64>("radius_edges", &["radius_edge"])?;
        v.put_attribute("units", "pc")?;
        v.put_values(&self.shells.edges_pc, ..)?;
        for (name, what) in [
            ("mean", "posterior mean of differential extinction"),
            (
                "std",
                "posterior standard deviation of differential extinction",
            ),
        ] {
            let mut v = nc.add_variable::<f32>(name, &["radius", "pixel"])?;
            v.put_attribute("units", self.units.as_str())?;
            v.put_attribute("long_name", what)?;
        }
        if !self.integrated_mean.is_empty() {
            for (name, what) in [
                (
                    "integrated_mean",
                    "posterior mean of extinction integrated to the shell's far edge",
                ),
                (
                    "integrated_std",
                    "posterior std of extinction integrated to the shell's far edge",
                ),
            ] {
                let mut v = nc.add_variable::<f32>(name, &["radius", "pixel"])?;
                v.put_attribute("long_name", what)?;
            }
        }
        let inner = format!("{} pc", self.shells.edges_pc[0]);
        for name in ["inner_integrated_mean", "inner_integrated_std"] {
            let mut v = nc.add_variable::<f32>(name, &["pixel"])?;
            v.put_attribute("long_name", format!("integrated extinction inside {inner}"))?;
        }
        if !self.star_count.is_empty() {
            let mut v = nc.add_variable::<i32>("star_count", &["pixel"])?;
            v.put_attribute("long_name", "number of stars the fit used in the pixel")?;
        }
        if ns > 0 {
            let mut v = nc.add_variable::<f32>("samples", &["sample", "radius", "pixel"])?;
            v.put_attribute("units", self.units.as_str())?;
            if !self.inner_samples.is_empty() {
                nc.add_variable::<f32>("inner_integrated_samples", &["sample", "pixel"])?;
            }
        }
        Ok(nc)
    }

    /// Write this block's arrays at pixels `p0..p0 + npix()` of a file from [`DustMap::define`].
    fn put_block(&self, nc: &mut netcdf::FileMut, p0: usize) -> Result<()> {
        let nb = self.mean.len() / self.n_r().max(1);
        let px = p0..p0 + nb;
        let f32s = |x: &[f64]| -> Vec<f32> { x.iter().map(|&v| v as f32).collect() };
        fn var<'f>(nc: &'f mut netcdf::FileMut, name: &str) -> Result<netcdf::VariableMut<'f>> {
            nc.variable_mut(name)
                .ok_or_else(|| anyhow!("map variable {name} not defined"))
        }
        let planes = [
            ("mean", &self.mean),
            ("std", &self.std),
            ("integrated_mean", &self.integrated_mean),
            ("integrated_std", &self.integrated_std),
        ];
        for (name, data) in planes {
            if !data.is_empty() {
                var(nc, name)?.put_values(&f32s(data), (.., px.clone()))?;
            }
        }
        for (name, data) in [
            ("inner_integrated_mean", &self.inner_mean),
            ("inner_integrated_std", &self.inner_std),
        ] {
            var(nc, name)?.put_values(&f32s(data), px.clone())?;
        }
        if !self.star_count.is_empty() {
            let c: Vec<i32> = self.star_count.iter().map(|&c| c as i32).collect();
            var(nc, "star_count")?.put_values(&c, px.clone())?;
        }
        for (k, s) in self.samples.iter().enumerate() {
            var(nc, "samples")?.put_values(&f32s(s), (k, .., px.clone()))?;
        }
        for (k, s) in self.inner_samples.iter().enumerate() {
            var(nc, "inner_integrated_samples")?.put_values(&f32s(s), (k, px.clone()))?;
        }
        Ok(())
    }

    fn write_attributes(&self, nc: &mut netcdf::FileMut) -> Result<()> {
        let p = &self.provenance;
        nc.add_attribute("title", "dust3d 3D dust extinction map")?;
        nc.add_attribute("Conventions", "dust3d-map-1")?;
        nc.add_attribute("map_kind", self.kind.as_str())?;
        nc.add_attribute("nside", self.nside as i32)?;
        nc.add_attribute("ordering", "NESTED")?;
        nc.add_attribute("coordinate_frame", "Galactic, heliocentric")?;
        nc.add_attribute("units", self.units.as_str())?;
        nc.add_attribute("distance_prior", self.distance_prior.to_text())?;
        nc.add_attribute("inner_radius_pc", self.shells.edges_pc[0])?;
        nc.add_attribute("dust3d_version", p.version.as_str())?;
        nc.add_attribute("git_commit", p.git_commit.as_str())?;
        nc.add_attribute("config", p.config.as_str())?;
        nc.add_attribute("seed", p.seed.to_string())?;
        nc.add_attribute("command_line", p.command_line.as_str())?;
        nc.add_attribute("catalog_sha256", p.catalog_sha256.as_str())?;
        nc.add_attribute("created", p.created.as_str())?;
        if !p.schedule.is_empty() {
            nc.add_attribute("schedule", p.schedule.as_str())?;
        }
        if !p.validation.is_empty() {
            nc.add_attribute("validation", p.validation.as_str())?;
        }
        if !p.warnings.is_empty() {
            nc.add_attribute("warnings", p.warnings.as_str())?;
        }
        Ok(())
    }

    /// Read a dust3d map file; errors say what is missing.
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_with(path, Load::ALL)
    }

    /// Read the parts of a dust3d map file that `load` asks for (the mean, inner maps and
    /// radii always); what is left out stays empty, so a command on a paper-size map holds
    /// only what it uses (the 12 samples alone are 39 GB in f64 at nside 256 × 516 shells).
    pub fn read_with(path: &Path, load: Load) -> Result<Self> {
        crate::data::guard::reading(path, "netCDF map", || Self::read_netcdf(path, load))
    }

    fn read_netcdf(path: &Path, load: Load) -> Result<Self> {
        let r = Reader::open(path)?;
        let file = &r.file;
        let nside = r.nside()?;
        let ordering = r.attr_str("ordering")?;
        if ordering != "NESTED" {
            bail!("{file}: ordering is '{ordering}', dust3d maps are NESTED");
        }
        let edges_pc = r.f64s("radius_edges")?;
        if edges_pc.len() < 2 || edges_pc.windows(2).any(|w| w[1] <= w[0] || w[1].is_nan()) {
            bail!("{file}: radius_edges must be strictly increasing with ≥ 2 values");
        }
        let shells = Shells { edges_pc };
        let centres_pc = match r.nc.variable("radius") {
            Some(_) => r.f64s("radius")?,
            None => shells.centres_pc(),
        };
        let optional = |name: &str, wanted: bool| -> Result<Vec<f64>> {
            match r.nc.variable(name) {
                Some(_) if wanted => r.f64s(name),
                _ => Ok(Vec::new()),
            }
        };
        let map = DustMap {
            nside,
            centres_pc,
            star_count: r.star_count()?,
            mean: r.f64s("mean")?,
            std: if load.std { r.f64s("std")? } else { Vec::new() },
            samples: r.per_sample("samples", load.samples)?,
            inner_mean: r.f64s("inner_integrated_mean")?,
            inner_std: r.f64s("inner_integrated_std")?,
            inner_samples: r.per_sample("inner_integrated_samples", load.samples)?,
            integrated_mean: optional("integrated_mean", load.integrated)?,
            integrated_std: optional("integrated_std", load.integrated)?,
            units: r.attr_str("units")?,
            kind: r.attr_str("map_kind").unwrap_or_else(|_| "unknown".into()),
            provenance: r.provenance(),
            distance_prior: match r.attr_str("distance_prior") {
                // maps written before the attribute existed used the paper's prior
                Err(_) => DistancePrior::Parallax,
                Ok(t) => DistancePrior::from_text(&t).map_err(|e| anyhow!("{file}: {e}"))?,
            },
            shells,
        };
        map.check()
            .with_context(|| format!("{file}: inconsistent map"))?;
        Ok(map)
    }

    /// Integrated extinction from the inner edge to the far edge of every shell, one
    /// pixel's column of `field` (`[radius][pixel]`); plus the inner map.
    pub fn integrate_column(&self, field: &[f64], inner: &[f64], pixel: usize) -> Vec<f64> {
        let widths = self.shells.widths_pc();
        let npix = self.npix();
        let mut acc = inner[pixel];
        widths
            .iter()
            .enumerate()
            .map(|(k, w)| {
                acc += field[k * npix + pixel] * w;
                acc
            })
            .collect()
    }
}

/// Number of samples a dust3d map file holds (0 if none or unreadable).
pub fn sample_count(path: &Path) -> usize {
    // an unreadable file is an error inside the guard, so that it counts as a failed read
    crate::data::guard::reading(path, "netCDF file", || {
        Ok(netcdf::open(path)?
            .dimension("sample")
            .map_or(0, |d| d.len()))
    })
    .unwrap_or(0)
}

/// True if `path` looks like a dust3d map (a netCDF file with a `mean` and `nside`).
pub fn is_map_file(path: &Path) -> bool {
    crate::data::guard::reading(path, "netCDF file", || {
        let nc = netcdf::open(path)?;
        Ok(nc.variable("mean").is_some() && nc.attribute("nside").is_some())
    })
    .unwrap_or(false)
}

/// An open netCDF map file and its name for error messages.
struct Reader {
    nc: netcdf::File,
    file: String,
}

impl Reader {
    fn open(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let nc = netcdf::open(path).with_context(|| format!("{file}: cannot open as netCDF"))?;
        Ok(Self { nc, file })
    }

    /// A global attribute as text (non-text values in their debug form).
    fn attr_str(&self, name: &str) -> Result<String> {
        let file = &self.file;
        let a = self
            .nc
            .attribute(name)
            .ok_or_else(|| anyhow!("{file}: missing attribute '{name}'"))?;
        match a.value()? {
            netcdf::AttributeValue::Str(s) => Ok(s),
            other => Ok(format!("{other:?}")),
        }
    }

    /// The `nside` attribute, checked to be a power of two.
    fn nside(&self) -> Result<u32> {
        let file = &self.file;
        let nside = match self.nc.attribute("nside").map(|a| a.value()).transpose()? {
            Some(netcdf::AttributeValue::Int(n)) if n > 0 => n as u32,
            Some(other) => bail!("{file}: attribute 'nside' is not a positive integer: {other:?}"),
            None => bail!("{file}: missing attribute 'nside' (not a dust3d map file?)"),
        };
        grid::depth_of_nside(nside).with_context(|| format!("{file}: attribute 'nside'"))?;
        Ok(nside)
    }

    fn var(&self, name: &str) -> Result<netcdf::Variable<'_>> {
        let file = &self.file;
        self.nc
            .variable(name)
            .ok_or_else(|| anyhow!("{file}: missing variable '{name}'"))
    }

    /// A whole variable as f64.
    fn f64s(&self, name: &str) -> Result<Vec<f64>> {
        self.var(name)?
            .get_values::<f64, _>(..)
            .with_context(|| format!("{}: variable '{name}'", self.file))
    }

    /// Stars per pixel the fit used (absent in truth maps).
    fn star_count(&self) -> Result<Vec<u32>> {
        Ok(match self.nc.variable("star_count") {
            Some(v) => v
                .get_values::<i32, _>(..)?
                .into_iter()
                .map(|c| c.max(0) as u32)
                .collect(),
            None => Vec::new(),
        })
    }

    /// A per-sample variable (sample first), one sample at a time; empty unless `wanted`.
    fn per_sample(&self, name: &str, wanted: bool) -> Result<Vec<Vec<f64>>> {
        let Some(v) = self.nc.variable(name).filter(|_| wanted) else {
            return Ok(Vec::new());
        };
        let dims = v.dimensions();
        let Some(ns) = dims.first().map(|d| d.len()) else {
            bail!("{}: variable '{name}' has no sample dimension", self.file);
        };
        (0..ns)
            .map(|k| {
                let r: Vec<f64> = if dims.len() == 3 {
                    v.get_values((k, .., ..))?
                } else {
                    v.get_values((k, ..))?
                };
                Ok(r)
            })
            .collect::<Result<_>>()
            .with_context(|| format!("{}: variable '{name}'", self.file))
    }

    /// The provenance attributes (empty where absent).
    fn provenance(&self) -> Provenance {
        let get = |name: &str| self.attr_str(name).unwrap_or_default();
        Provenance {
            version: get("dust3d_version"),
            git_commit: get("git_commit"),
            config: get("config"),
            seed: get("seed").parse().unwrap_or(0),
            command_line: get("command_line"),
            catalog_sha256: get("catalog_sha256"),
            created: get("created"),
            schedule: get("schedule"),
            validation: get("validation"),
            warnings: get("warnings"),
        }
    }
}
