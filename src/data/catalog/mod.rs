//! Star catalogs: reading (CSV, CSV.gz, FITS binary table, netCDF-4/HDF5), row validation,
//! the paper's selection cuts, and the (pixel, distance) layout every solver uses.

mod columns;
mod distribute;
mod error;
mod formats;
#[cfg(feature = "parquet")]
mod parquet;

pub use distribute::{balance, read_distributed};
pub use error::CatalogError;

pub use columns::{RowPart, Table};
pub use formats::{array_column, read_columns, read_columns_part, write_catalog, Format};

use anyhow::{bail, Result};
use std::path::Path;

use crate::sphere::grid;

/// How to read a catalog: column names, the HDU, and the selection cuts (paper §2); the
/// `[catalog]` section of a configuration.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogParams {
    /// Column names in the input file.
    pub columns: ColumnNames,
    /// Sky frame of the positions: "auto" (Galactic l, b if present, else ICRS ra, dec),
    /// "galactic" or "icrs".
    pub frame: Frame,
    /// Name of the HDU (FITS) to read; the first binary table if absent.
    pub hdu: Option<String>,
    /// Keep stars with quality < this value (needs `columns.quality`); paper: 8.
    pub quality_below: Option<f64>,
    /// Keep stars with 1/(ω − σ_ω) < this distance, pc; paper: 1800.
    pub d_max_pc: Option<f64>,
    /// Keep stars with 1/(ω + σ_ω) > this distance, pc; paper: 40.
    pub d_min_pc: Option<f64>,
}

/// The sky frame of a catalog's positions (`catalog.frame`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Frame {
    /// Galactic `columns.l`, `columns.b` when the file has them, else ICRS `columns.ra`,
    /// `columns.dec` (logged).
    #[default]
    Auto,
    /// Galactic longitude and latitude, deg.
    Galactic,
    /// ICRS right ascension and declination, deg, converted to Galactic on reading.
    Icrs,
}

/// `[catalog.columns]`: the input file's name for each quantity; any may be one component
/// of a 2-D dataset of an HDF5/netCDF file, written `name[:, k]`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnNames {
    /// Galactic longitude, deg.
    pub l: String,
    /// Galactic latitude, deg.
    pub b: String,
    /// ICRS right ascension, deg (read when the frame is ICRS).
    pub ra: String,
    /// ICRS declination, deg (read when the frame is ICRS).
    pub dec: String,
    /// Parallax, mas.
    pub parallax: String,
    /// Parallax uncertainty, mas.
    pub parallax_error: String,
    /// Extinction, catalog units.
    pub extinction: String,
    /// Extinction uncertainty, catalog units.
    pub extinction_error: String,
    /// Optional integer star identifier.
    pub source_id: Option<String>,
    /// Optional quality flag (used with `quality_below`).
    pub quality: Option<String>,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            l: "l".into(),
            b: "b".into(),
            ra: "ra".into(),
            dec: "dec".into(),
            parallax: "parallax".into(),
            parallax_error: "parallax_error".into(),
            extinction: "extinction".into(),
            extinction_error: "extinction_error".into(),
            source_id: Some("source_id".into()),
            quality: None,
        }
    }
}

/// Stars as a structure of arrays; one entry per star in every vector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// Integer identifier (row number if the file has none).
    pub source_id: Vec<i64>,
    /// Galactic longitude, deg.
    pub l_deg: Vec<f64>,
    /// Galactic latitude, deg.
    pub b_deg: Vec<f64>,
    /// Parallax, mas.
    pub parallax_mas: Vec<f64>,
    /// Parallax uncertainty, mas.
    pub parallax_error_mas: Vec<f64>,
    /// Extinction, catalog units.
    pub extinction: Vec<f64>,
    /// Extinction uncertainty, catalog units.
    pub extinction_error: Vec<f64>,
    /// Further columns carried along (written, not read back by [`Catalog::read`]).
    pub extra: Vec<(String, Vec<f64>)>,
}

/// The names the catalog quantities have in [`Catalog`] and in files written by dust3d.
pub const CORE_COLUMNS: [&str; 6] = [
    "l",
    "b",
    "parallax",
    "parallax_error",
    "extinction",
    "extinction_error",
];

impl Catalog {
    /// Number of stars.
    pub fn len(&self) -> usize {
        self.l_deg.len()
    }

    /// True if there are no stars.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read and validate a catalog file; every bad value is an error naming file, row, column.
    pub fn read(path: &Path, cfg: &CatalogParams) -> Result<Self> {
        let (cat, _, rows) = Self::read_part_rows(path, cfg, RowPart::ALL)?;
        if cat.is_empty() {
            bail!("{}", no_star_message(path, rows, cfg));
        }
        Ok(cat)
    }

    /// Read, validate and select the rows of `part` (one MPI rank's share of the file);
    /// returns the stars, the file row of each (for a rank-independent order) and the number
    /// of rows read. The caller decides whether an empty result is an error.
    pub fn read_part_rows(
        path: &Path,
        cfg: &CatalogParams,
        part: RowPart,
    ) -> Result<(Self, Vec<u64>, usize)> {
        if cfg.frame != Frame::Auto {
            return Self::read_in_frame(path, cfg, part, cfg.frame);
        }
        let c = &cfg.columns;
        let lacks = |e: &anyhow::Error, cols: [&String; 2]| {
            matches!(e.downcast_ref::<CatalogError>(),
                Some(CatalogError::MissingColumn { column, .. })
                    if cols.iter().any(|c| array_column(c).is_ok_and(|(n, _)| n == column)))
        };
        match Self::read_in_frame(path, cfg, part, Frame::Galactic) {
            Err(e) if lacks(&e, [&c.l, &c.b]) => {
                match Self::read_in_frame(path, cfg, part, Frame::Icrs) {
                    Err(e2) if lacks(&e2, [&c.ra, &c.dec]) => Err(e.context(format!(
                        "no positions: neither Galactic '{}', '{}' nor ICRS '{}', '{}' columns",
                        c.l, c.b, c.ra, c.dec
                    ))),
                    Ok(r) => {
                        if crate::base::comm::is_root() && part.rank == 0 {
                            tracing::info!(
                                file = %path.display(),
                                "no Galactic '{}', '{}' columns: reading ICRS '{}', '{}' and \
                                 converting to Galactic (catalog.frame = \"icrs\" says so)",
                                c.l, c.b, c.ra, c.dec
                            );
                        }
                        Ok(r)
                    }
                    Err(e2) => Err(e2),
                }
            }
            r => r,
        }
    }

    /// [`Catalog::read_part_rows`] with the positions in `frame` (not `Auto`).
    fn read_in_frame(
        path: &Path,
        cfg: &CatalogParams,
        part: RowPart,
        frame: Frame,
    ) -> Result<(Self, Vec<u64>, usize)> {
        let c = &cfg.columns;
        let (lon, lat) = match frame {
            Frame::Icrs => (&c.ra, &c.dec),
            _ => (&c.l, &c.b),
        };
        let mut names: Vec<&str> = vec![
            lon,
            lat,
            &c.parallax,
            &c.parallax_error,
            &c.extinction,
            &c.extinction_error,
        ];
        if let Some(q) = &c.quality {
            names.push(q);
        }
        let mut table = read_columns_part(
            path,
            &names,
            c.source_id.as_deref(),
            cfg.hdu.as_deref(),
            part,
        )?;
        let columns = std::mem::take(&mut table.columns);
        let ids = table.source_id.take();
        let row: Vec<u64> = table
            .row_index
            .clone()
            .unwrap_or_else(|| (0..table.rows as u64).collect());
        let mut cols = columns.into_iter();
        let mut next = || cols.next().expect("reader returns every requested column");
        let cat = Catalog {
            source_id: ids.unwrap_or_else(|| row.iter().map(|&r| r as i64).collect()),
            l_deg: next(),
            b_deg: next(),
            parallax_mas: next(),
            parallax_error_mas: next(),
            extinction: next(),
            extinction_error: next(),
            extra: Vec::new(),
        };
        let quality = c.quality.as_ref().map(|_| next());
        let file = path.display().to_string();
        let row_name = |i: usize| table.row_label(i);
        let mut cat = cat;
        cat.validate(&file, [lon, lat], c, &row_name)?;
        if frame == Frame::Icrs {
            crate::sphere::frames::icrs_to_galactic_in_place(&mut cat.l_deg, &mut cat.b_deg);
        }
        let mut keep: Vec<bool> = match (&quality, cfg.quality_below) {
            (Some(q), Some(lim)) => q.iter().map(|&v| v < lim).collect(),
            _ => vec![true; cat.len()],
        };
        for (i, k) in keep.iter_mut().enumerate() {
            *k = *k && passes_distance_cuts(cat.parallax_mas[i], cat.parallax_error_mas[i], cfg);
        }
        let rows_kept = row
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(&r, _)| r)
            .collect();
        Ok((cat.subset(&keep), rows_kept, table.rows))
    }

    /// Check every row: finite values, positive errors, |b| ≤ 90°.
    fn validate(
        &self,
        file: &str,
        [lon, lat]: [&str; 2],
        names: &ColumnNames,
        row: &dyn Fn(usize) -> String,
    ) -> Result<()> {
        let cols: [(&str, &Vec<f64>); 6] = [
            (lon, &self.l_deg),
            (lat, &self.b_deg),
            (&names.parallax, &self.parallax_mas),
            (&names.parallax_error, &self.parallax_error_mas),
            (&names.extinction, &self.extinction),
            (&names.extinction_error, &self.extinction_error),
        ];
        for (k, (name, v)) in cols.iter().enumerate() {
            for (i, &x) in v.iter().enumerate() {
                let problem = if !x.is_finite() {
                    Some("is not a finite number")
                } else if (k == 3 || k == 5) && x <= 0.0 {
                    Some("must be > 0")
                } else if k == 1 && x.abs() > 90.0 {
                    Some("must lie in [-90, 90] deg")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(CatalogError::BadValue {
                        file: file.to_string(),
                        row: row(i),
                        column: name.to_string(),
                        value: x,
                        problem,
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Keep the stars whose entry in `keep` is true.
    pub fn subset(&self, keep: &[bool]) -> Self {
        let pick = |v: &Vec<f64>| -> Vec<f64> {
            v.iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(x, _)| *x)
                .collect()
        };
        Catalog {
            source_id: self
                .source_id
                .iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(x, _)| *x)
                .collect(),
            l_deg: pick(&self.l_deg),
            b_deg: pick(&self.b_deg),
            parallax_mas: pick(&self.parallax_mas),
            parallax_error_mas: pick(&self.parallax_error_mas),
            extinction: pick(&self.extinction),
            extinction_error: pick(&self.extinction_error),
            extra: self
                .extra
                .iter()
                .map(|(n, v)| (n.clone(), pick(v)))
                .collect(),
        }
    }

    /// Reorder the stars by `order` (a permutation of 0..len).
    pub fn permute(&self, order: &[usize]) -> Self {
        let take = |v: &Vec<f64>| -> Vec<f64> { order.iter().map(|&i| v[i]).collect() };
        Catalog {
            source_id: order.iter().map(|&i| self.source_id[i]).collect(),
            l_deg: take(&self.l_deg),
            b_deg: take(&self.b_deg),
            parallax_mas: take(&self.parallax_mas),
            parallax_error_mas: take(&self.parallax_error_mas),
            extinction: take(&self.extinction),
            extinction_error: take(&self.extinction_error),
            extra: self
                .extra
                .iter()
                .map(|(n, v)| (n.clone(), take(v)))
                .collect(),
        }
    }

    /// Assign stars to NESTED pixels at `nside` and sort by (pixel, distance).
    pub fn into_pixel_layout(self, nside: u32) -> PixelCatalog {
        let pix: Vec<u64> = (0..self.len())
            .map(|i| grid::ang2pix(nside, self.l_deg[i], self.b_deg[i]))
            .collect();
        self.into_layout_with(nside, pix, 0..grid::npix(nside))
    }

    /// The stars of this catalog inside the NESTED pixel range `pixels` (one rank's part
    /// of the sky), laid out like [`Catalog::into_pixel_layout`] with offsets relative to
    /// `pixels.start`.
    pub fn into_pixel_range(self, nside: u32, pixels: std::ops::Range<usize>) -> PixelCatalog {
        let pix: Vec<u64> = (0..self.len())
            .map(|i| grid::ang2pix(nside, self.l_deg[i], self.b_deg[i]))
            .collect();
        let keep: Vec<bool> = pix
            .iter()
            .map(|&p| pixels.contains(&(p as usize)))
            .collect();
        let pix = pix
            .into_iter()
            .filter(|&p| pixels.contains(&(p as usize)))
            .collect();
        self.subset(&keep).into_layout_with(nside, pix, pixels)
    }

    fn into_layout_with(
        self,
        nside: u32,
        pix: Vec<u64>,
        pixels: std::ops::Range<usize>,
    ) -> PixelCatalog {
        let mut order: Vec<usize> = (0..self.len()).collect();
        // larger parallax = nearer; ties broken by input order for determinism
        order.sort_by(|&i, &j| {
            pix[i]
                .cmp(&pix[j])
                .then(self.parallax_mas[j].total_cmp(&self.parallax_mas[i]))
                .then(i.cmp(&j))
        });
        let pixel: Vec<u64> = order.iter().map(|&i| pix[i]).collect();
        let stars = self.permute(&order);
        PixelCatalog {
            nside,
            stars,
            offsets: pixel_offsets(&pixel, &pixels),
            pixel,
            first_pixel: pixels.start,
        }
    }
}

/// Star ranges per pixel of `pixels` for stars sorted by pixel (`pixels.len() + 1` offsets).
fn pixel_offsets(pixel: &[u64], pixels: &std::ops::Range<usize>) -> Vec<usize> {
    let mut offsets = vec![0usize; pixels.len() + 1];
    for &p in pixel {
        offsets[p as usize - pixels.start + 1] += 1;
    }
    for k in 1..offsets.len() {
        offsets[k] += offsets[k - 1];
    }
    offsets
}

/// The error of a selection that keeps no star of `rows` rows read.
pub fn no_star_message(path: &Path, rows: usize, cfg: &CatalogParams) -> String {
    format!(
        "{}: no star passes the selection ({rows} rows read; cuts: quality < {:?}, \
         1/(ω−σ) < {:?} pc, 1/(ω+σ) > {:?} pc)",
        path.display(),
        cfg.quality_below,
        cfg.d_max_pc,
        cfg.d_min_pc
    )
}

/// Whether a star with parallax ω ± σ (mas) passes the configured distance cuts.
pub fn passes_distance_cuts(parallax_mas: f64, error_mas: f64, cfg: &CatalogParams) -> bool {
    if let Some(dmax) = cfg.d_max_pc {
        // 1/(ω−σ) < d_max ⇔ ω−σ > 1000/d_max (and ω−σ > 0)
        if parallax_mas - error_mas <= 1000.0 / dmax {
            return false;
        }
    }
    if let Some(dmin) = cfg.d_min_pc {
        let hi = parallax_mas + error_mas;
        if !(hi > 0.0 && hi < 1000.0 / dmin) {
            return false;
        }
    }
    true
}

/// A catalog sorted by (NESTED pixel, distance): pixel `p` owns stars
/// `offsets[p]..offsets[p+1]`, so a contiguous block of pixels owns a contiguous block of stars.
#[derive(Clone, Debug)]
pub struct PixelCatalog {
    /// nside of the pixelisation.
    pub nside: u32,
    /// The stars, sorted.
    pub stars: Catalog,
    /// NESTED pixel of each star.
    pub pixel: Vec<u64>,
    /// Star ranges per pixel of the covered range, `pixels + 1` entries.
    pub offsets: Vec<usize>,
    /// First NESTED pixel covered (0 unless this is one rank's part of the sky).
    pub first_pixel: usize,
}

impl PixelCatalog {
    /// Star index range of pixel `p` (relative to `first_pixel`).
    pub fn stars_of(&self, p: usize) -> std::ops::Range<usize> {
        self.offsets[p]..self.offsets[p + 1]
    }

    /// The pixel range covered.
    pub fn pixels(&self) -> std::ops::Range<usize> {
        self.first_pixel..self.first_pixel + self.offsets.len() - 1
    }

    /// The same stars in the same order, pixelised at the coarser `nside` (NESTED parents
    /// of their pixels; the covered range must be whole parents): a coarse stage's view,
    /// whose per-star arrays line up with this one's.
    ///
    /// ```
    /// use dust3d::data::catalog::Catalog;
    /// let cat = Catalog {
    ///     source_id: vec![1, 2],
    ///     l_deg: vec![10.0, 200.0],
    ///     b_deg: vec![5.0, -40.0],
    ///     parallax_mas: vec![2.0, 3.0],
    ///     parallax_error_mas: vec![0.1, 0.1],
    ///     extinction: vec![0.5, 0.2],
    ///     extinction_error: vec![0.05, 0.05],
    ///     extra: vec![],
    /// };
    /// let fine = cat.into_pixel_range(4, 0..192);
    /// let coarse = fine.clone().coarsened(2);
    /// assert_eq!(coarse.stars.source_id, fine.stars.source_id);
    /// assert_eq!(coarse.pixel, fine.pixel.iter().map(|p| p >> 2).collect::<Vec<_>>());
    /// assert_eq!(*coarse.offsets.last().unwrap(), 2);
    /// ```
    pub fn coarsened(self, nside: u32) -> PixelCatalog {
        let shift = 2 * (self.nside.trailing_zeros() - nside.trailing_zeros());
        let fine = self.pixels();
        assert!(
            nside <= self.nside
                && fine.start.is_multiple_of(1 << shift)
                && fine.end.is_multiple_of(1 << shift),
            "coarsening pixels {fine:?} of nside {} to nside {nside}",
            self.nside
        );
        let pixels = fine.start >> shift..fine.end >> shift;
        let pixel: Vec<u64> = self.pixel.iter().map(|p| p >> shift).collect();
        PixelCatalog {
            nside,
            stars: self.stars,
            offsets: pixel_offsets(&pixel, &pixels),
            pixel,
            first_pixel: pixels.start,
        }
    }

    /// Stars per patch of `nside_dec` (the pixels must cover whole patches).
    pub fn patch_counts(&self, nside_dec: u32) -> Vec<u64> {
        let k = ((self.nside / nside_dec) as usize).pow(2);
        self.offsets
            .iter()
            .step_by(k)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| (w[1] - w[0]) as u64)
            .collect()
    }

    /// Number of pixels holding at least one star.
    pub fn occupied_pixels(&self) -> usize {
        self.offsets.windows(2).filter(|w| w[1] > w[0]).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_errors_say_which_file_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.csv");
        let text = "l,b,parallax,parallax_error,extinction,extinction_error\n\
                    10,5,2.0,0.1,0.3,0.05\n\
                    20,95,2.0,0.1,0.3,0.05\n";
        std::fs::write(&path, text).unwrap();
        let err = Catalog::read(&path, &CatalogParams::default()).unwrap_err();
        match err.downcast_ref::<CatalogError>() {
            Some(CatalogError::BadValue { row, column, .. }) => {
                assert_eq!(row, "row 2 (line 3)");
                assert_eq!(column, "b");
            }
            other => panic!("expected a bad value, got {other:?}"),
        }
        std::fs::write(&path, text.replace("parallax_error", "plx_err")).unwrap();
        let err = Catalog::read(&path, &CatalogParams::default()).unwrap_err();
        match err.downcast_ref::<CatalogError>() {
            Some(CatalogError::MissingColumn { column, .. }) => {
                assert_eq!(column, "parallax_error")
            }
            other => panic!("expected a missing column, got {other:?}"),
        }
    }

    fn tiny() -> Catalog {
        Catalog {
            source_id: vec![1, 2, 3, 4],
            l_deg: vec![10.0, 190.0, 10.0, 300.0],
            b_deg: vec![5.0, -60.0, 5.0, 89.0],
            parallax_mas: vec![2.0, 10.0, 5.0, 0.1],
            parallax_error_mas: vec![0.1; 4],
            extinction: vec![0.1; 4],
            extinction_error: vec![0.05; 4],
            extra: vec![],
        }
    }

    #[test]
    fn pixel_layout_is_sorted_and_contiguous() {
        let pc = tiny().into_pixel_layout(4);
        assert!(pc.pixel.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pc.offsets.last().unwrap(), 4);
        for p in 0..grid::npix(4) {
            for i in pc.stars_of(p) {
                assert_eq!(pc.pixel[i], p as u64);
            }
        }
        // the two stars sharing a pixel are ordered nearest first
        let p = grid::ang2pix(4, 10.0, 5.0) as usize;
        let r = pc.stars_of(p);
        assert_eq!(r.len(), 2);
        assert_eq!(pc.stars.source_id[r.start], 3);
    }

    #[test]
    fn distance_cuts_follow_the_paper() {
        let cfg = CatalogParams {
            d_max_pc: Some(1800.0),
            d_min_pc: Some(40.0),
            ..Default::default()
        };
        assert!(passes_distance_cuts(2.0, 0.1, &cfg)); // ~500 pc
        assert!(!passes_distance_cuts(0.6, 0.1, &cfg)); // 1/(0.5 mas) = 2 kpc > 1.8 kpc
        assert!(!passes_distance_cuts(30.0, 1.0, &cfg)); // 1/(31 mas) = 32 pc < 40 pc
        assert!(!passes_distance_cuts(-0.5, 0.1, &cfg));
    }
}
