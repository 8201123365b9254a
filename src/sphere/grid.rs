//! The reconstruction grid: HEALPix NESTED pixels × log-spaced radial shells, and the
//! ICR radial chart that maps every refinement level onto physical radii.
//!
//! All HEALPix arithmetic goes through `cdshealpix`; angles handed to it are Galactic
//! (l, b) in radians, so "longitude" is l and "latitude" is b.

use anyhow::{bail, Result};
use cdshealpix::compass_point::MainWind;

/// Compass order of the 8 neighbours in a 9-pixel ICR window (after the centre pixel).
pub const WINDOW_WINDS: [MainWind; 8] = [
    MainWind::SW,
    MainWind::W,
    MainWind::NW,
    MainWind::N,
    MainWind::NE,
    MainWind::E,
    MainWind::SE,
    MainWind::S,
];

/// Return the HEALPix depth (order) of `nside`, or an error if it is not a power of two.
pub fn depth_of_nside(nside: u32) -> Result<u8> {
    if nside == 0 || !nside.is_power_of_two() || nside > (1 << 29) {
        bail!("nside must be a power of two between 1 and 2^29, got {nside}");
    }
    Ok(nside.trailing_zeros() as u8)
}

/// Number of HEALPix pixels for `nside`.
pub fn npix(nside: u32) -> usize {
    12 * (nside as usize) * (nside as usize)
}

/// NESTED pixel index containing Galactic (l, b) in degrees at `nside`.
///
/// ```
/// use dust3d::sphere::grid::{ang2pix, npix, pix2ang};
/// let nside = 16;
/// let p = ang2pix(nside, 210.0, -19.0);
/// assert!((p as usize) < npix(nside));
/// let (l, b) = pix2ang(nside, p);
/// assert_eq!(ang2pix(nside, l, b), p);
/// // longitudes wrap
/// assert_eq!(ang2pix(nside, 210.0 - 360.0, -19.0), p);
/// ```
pub fn ang2pix(nside: u32, l_deg: f64, b_deg: f64) -> u64 {
    let depth = nside.trailing_zeros() as u8;
    let lon = l_deg.to_radians().rem_euclid(std::f64::consts::TAU);
    cdshealpix::nested::get(depth).hash(lon, b_deg.to_radians())
}

/// Galactic (l, b) in degrees of the centre of NESTED pixel `pix` at `nside`.
pub fn pix2ang(nside: u32, pix: u64) -> (f64, f64) {
    let depth = nside.trailing_zeros() as u8;
    let (lon, lat) = cdshealpix::nested::get(depth).center(pix);
    (lon.to_degrees(), lat.to_degrees())
}

/// Unit vector (heliocentric Galactic Cartesian: x to l = 0, z to b = 90°) of a pixel centre.
pub fn pix2vec(nside: u32, pix: u64) -> [f64; 3] {
    let depth = nside.trailing_zeros() as u8;
    let (lon, lat) = cdshealpix::nested::get(depth).center(pix);
    lonlat_to_vec(lon, lat)
}

/// Unit vector of (longitude, latitude) in radians.
pub fn lonlat_to_vec(lon: f64, lat: f64) -> [f64; 3] {
    let (sl, cl) = lon.sin_cos();
    let (sb, cb) = lat.sin_cos();
    [cb * cl, cb * sl, sb]
}

/// The 8 HEALPix neighbours of `pix` in [`WINDOW_WINDS`] order; `None` where HEALPix has none
/// (the 24 pixels per nside next to a base-pixel corner miss one).
pub fn neighbours(nside: u32, pix: u64) -> [Option<u64>; 8] {
    let depth = nside.trailing_zeros() as u8;
    let map = cdshealpix::nested::get(depth).neighbours(pix, false);
    let mut out = [None; 8];
    for (o, w) in out.iter_mut().zip(WINDOW_WINDS) {
        *o = map.get(w).copied();
    }
    out
}

/// Log-spaced radial shells: `edges_pc[k]..edges_pc[k+1]` is shell k.
#[derive(Clone, Debug, PartialEq)]
pub struct Shells {
    /// Shell edges in pc, strictly increasing, `n + 1` values.
    pub edges_pc: Vec<f64>,
}

/// Exact integral of a piecewise-constant column (`rho[k]` on shell k, per pc) from the inner
/// edge out to `d_pc` (0 inside, the whole column beyond the outer edge).
///
/// ```
/// use dust3d::sphere::grid::{integrate_to, Shells};
/// let shells = Shells::log_uniform(100.0, 1000.0, 10).unwrap();
/// let rho = |_k: usize| 1e-3; // extinction per pc
/// assert!((integrate_to(&shells, rho, 500.0) - 0.4).abs() < 1e-12);
/// assert_eq!(integrate_to(&shells, rho, 50.0), 0.0);
/// assert!((integrate_to(&shells, rho, 5000.0) - 0.9).abs() < 1e-12);
/// ```
pub fn integrate_to(shells: &Shells, rho: impl Fn(usize) -> f64, d_pc: f64) -> f64 {
    let e = &shells.edges_pc;
    let mut acc = 0.0;
    for k in 0..shells.len() {
        if d_pc <= e[k] {
            break;
        }
        acc += rho(k) * (d_pc.min(e[k + 1]) - e[k]);
    }
    acc
}

impl Shells {
    /// `n` shells with log-uniform edges from `r_min_pc` to `r_max_pc`.
    ///
    /// ```
    /// use dust3d::sphere::grid::Shells;
    /// let s = Shells::log_uniform(40.0, 2000.0, 4).unwrap();
    /// assert_eq!(s.len(), 4);
    /// let ratio = s.edges_pc[1] / s.edges_pc[0];
    /// assert!((s.edges_pc[4] / s.edges_pc[3] - ratio).abs() < 1e-12);
    /// assert_eq!(s.shell_of(100.0), Some(0)); // edges 40, 106, 283, 752, 2000 pc
    /// assert_eq!(s.shell_of(200.0), Some(1));
    /// assert!(Shells::log_uniform(100.0, 40.0, 4).is_err());
    /// ```
    pub fn log_uniform(r_min_pc: f64, r_max_pc: f64, n: usize) -> Result<Self> {
        if !(r_min_pc > 0.0 && r_max_pc > r_min_pc && n > 0) {
            bail!("need 0 < r_min_pc < r_max_pc and n > 0 (got {r_min_pc}, {r_max_pc}, {n})");
        }
        let dlog = (r_max_pc / r_min_pc).ln() / n as f64;
        let mut edges_pc: Vec<f64> = (0..=n)
            .map(|k| r_min_pc * (dlog * k as f64).exp())
            .collect();
        // exact end points, so that cuts at r_max behave as the user wrote them
        edges_pc[0] = r_min_pc;
        edges_pc[n] = r_max_pc;
        Ok(Self { edges_pc })
    }

    /// Number of shells.
    pub fn len(&self) -> usize {
        self.edges_pc.len() - 1
    }

    /// True if there are no shells.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shell centres in pc (geometric mean of the edges).
    pub fn centres_pc(&self) -> Vec<f64> {
        self.edges_pc
            .windows(2)
            .map(|w| (w[0] * w[1]).sqrt())
            .collect()
    }

    /// Shell widths Δr in pc.
    pub fn widths_pc(&self) -> Vec<f64> {
        self.edges_pc.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Index of the shell containing `r_pc`, or `None` outside `[r_min, r_max)`.
    pub fn shell_of(&self, r_pc: f64) -> Option<usize> {
        let e = &self.edges_pc;
        if !(r_pc >= e[0] && r_pc < e[e.len() - 1]) {
            return None;
        }
        Some(e.partition_point(|&x| x <= r_pc) - 1)
    }
}

/// Geometry of the ICR chart: angular and radial resolution of every refinement level, and
/// the log-radial coordinate `r = exp(a u + b)` (docs/model.md).
///
/// Level `l` has nside `nside0 · 2^l` and `n_r(l)` shells, `n_r(l+1) = 2 (n_r(l) − 2)`;
/// its radial index `i` sits at `u = off_l + i / 2^l`, `off_l = 1.5 (1 − 2^−l)`. At the
/// final level the central shells (all but `padding` at either end) are log-uniform over
/// `[r_min_pc, r_max_pc]`; those are the shells the likelihood sees.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    /// nside of level 0.
    pub nside0: u32,
    /// Radial shells of level 0.
    pub n_r0: usize,
    /// Number of refinement levels after level 0.
    pub levels: usize,
    /// Chart shells dropped at either radial end of the final level (prior-only padding).
    pub padding: usize,
    /// Inner edge of the kept final shells, pc.
    pub r_min_pc: f64,
    /// Outer edge of the kept final shells, pc.
    pub r_max_pc: f64,
    /// Slope of ln r in the chart coordinate u.
    pub a: f64,
    /// Intercept of ln r (r in pc) in the chart coordinate u.
    pub b: f64,
}

/// A chart parameter that is not allowed: which `[grid]` field, and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ChartError {
    /// The field of [`Chart::new`] (and key of `[grid]`): `nside0`, `levels`, `n_r0`,
    /// `r_min_pc`, `r_max_pc` or `padding`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl Chart {
    /// Build the chart; fails with a [`ChartError`] if a parameter is out of range or the
    /// shell recursion runs out of shells.
    pub fn new(
        nside0: u32,
        n_r0: usize,
        levels: usize,
        padding: usize,
        r_min_pc: f64,
        r_max_pc: f64,
    ) -> Result<Self> {
        Self::check_inputs(nside0, n_r0, levels, (r_min_pc, r_max_pc))?;
        let fail = |field: &'static str, message: String| -> anyhow::Error {
            ChartError { field, message }.into()
        };
        let mut n = n_r0;
        for l in 0..levels {
            if n < 3 {
                return Err(fail(
                    "n_r0",
                    format!("grid: level {l} has only {n} shells; increase grid.n_r0 ({n_r0})"),
                ));
            }
            n = 2 * (n - 2);
        }
        if n <= 2 * padding {
            return Err(fail(
                "padding",
                format!(
                    "grid: the final level has {n} shells, not more than 2 × padding ({padding})"
                ),
            ));
        }
        let n_kept = n - 2 * padding;
        let scale = (1u64 << levels) as f64;
        let dlog = (r_max_pc / r_min_pc).ln() / n_kept as f64;
        let a = scale * dlog;
        // centre of kept shell 0 (final index `padding`) is at ln r_min + dlog/2
        let u0 = Self::offset(levels) + padding as f64 / scale;
        let b = r_min_pc.ln() + 0.5 * dlog - a * u0;
        Ok(Self {
            nside0,
            n_r0,
            levels,
            padding,
            r_min_pc,
            r_max_pc,
            a,
            b,
        })
    }

    /// [`Chart::new`]'s arguments one by one: a HEALPix nside0, a final nside within
    /// HEALPix's range, at least 3 level-0 shells, and 0 < r_min < r_max, finite.
    fn check_inputs(
        nside0: u32,
        n_r0: usize,
        levels: usize,
        (r_min_pc, r_max_pc): (f64, f64),
    ) -> Result<()> {
        let fail = |field: &'static str, message: String| -> anyhow::Error {
            ChartError { field, message }.into()
        };
        if depth_of_nside(nside0).is_err() {
            return Err(fail(
                "nside0",
                format!("grid.nside0 must be a power of two between 1 and 2^29, got {nside0}"),
            ));
        }
        let final_nside = u32::try_from(levels)
            .ok()
            .and_then(|l| (nside0 as u64).checked_shl(l))
            .filter(|&n| levels < 64 && n <= 1 << 29);
        if final_nside.is_none() {
            return Err(fail(
                "levels",
                format!(
                    "grid.levels = {levels} from nside0 = {nside0}: the final nside nside0 · \
                     2^levels would exceed HEALPix's 2^29"
                ),
            ));
        }
        if n_r0 < 3 {
            return Err(fail(
                "n_r0",
                format!(
                    "grid.n_r0 must be at least 3 (a refinement window spans 3 shells), got {n_r0}"
                ),
            ));
        }
        if !(r_min_pc > 0.0 && r_min_pc.is_finite()) {
            return Err(fail(
                "r_min_pc",
                format!("grid.r_min_pc must be a finite number > 0, got {r_min_pc}"),
            ));
        }
        if !(r_max_pc > r_min_pc && r_max_pc.is_finite()) {
            return Err(fail(
                "r_max_pc",
                format!(
                    "grid.r_max_pc must be finite and above grid.r_min_pc ({r_min_pc}), got \
                     {r_max_pc}"
                ),
            ));
        }
        Ok(())
    }

    /// The same chart ended at level `k ≤ levels` (a coarse stage's chart): identical
    /// coordinates, so every level up to `k` has the same shells, and as padding the level-`k`
    /// cells wholly outside [r_min, r_max]; the kept cells at either end are clipped there.
    ///
    /// ```
    /// use dust3d::sphere::grid::Chart;
    /// let full = Chart::new(2, 10, 2, 2, 40.0, 600.0).unwrap();
    /// let coarse = full.truncated(1);
    /// assert_eq!(coarse.nside_final(), 4);
    /// assert_eq!(coarse.radii_pc(1), full.radii_pc(1));
    /// let shells = coarse.kept_shells();
    /// assert_eq!((shells.edges_pc[0], *shells.edges_pc.last().unwrap()), (40.0, 600.0));
    /// ```
    pub fn truncated(&self, k: usize) -> Chart {
        assert!(
            k <= self.levels,
            "truncated({k}) of a chart with {} levels",
            self.levels
        );
        let cells = (1u64 << k) as f64;
        // position of r_min in level-k cell units; a boundary within rounding counts as one
        let x = ((self.r_min_pc.ln() - self.b) / self.a - Self::offset(k)) * cells + 0.5;
        let first = if (x - x.round()).abs() < 1e-9 {
            x.round()
        } else {
            x.floor()
        };
        // the levels share their centre, so the cells outside r_max mirror those below r_min
        Chart {
            levels: k,
            padding: first.max(0.0) as usize,
            ..self.clone()
        }
    }

    /// Chart offset `off_l = 1.5 (1 − 2^−l)` of level `l`.
    pub fn offset(level: usize) -> f64 {
        1.5 * (1.0 - 0.5f64.powi(level as i32))
    }

    /// nside of level `l`.
    pub fn nside(&self, level: usize) -> u32 {
        self.nside0 << level
    }

    /// Number of radial chart shells of level `l`.
    pub fn n_r(&self, level: usize) -> usize {
        (0..level).fold(self.n_r0, |n, _| 2 * (n - 2))
    }

    /// Number of pixels of level `l`.
    pub fn npix(&self, level: usize) -> usize {
        npix(self.nside(level))
    }

    /// Voxels (pixels × radial shells) of level `l`.
    pub fn voxels(&self, level: usize) -> usize {
        self.npix(level) * self.n_r(level)
    }

    /// Chart coordinate u of radial index `i` (may be fractional) of level `l`.
    pub fn u(&self, level: usize, i: f64) -> f64 {
        Self::offset(level) + i / (1u64 << level) as f64
    }

    /// Radius in pc of (possibly fractional) radial index `i` of level `l`.
    pub fn radius_pc(&self, level: usize, i: f64) -> f64 {
        (self.a * self.u(level, i) + self.b).exp()
    }

    /// Radii in pc of all shell positions of level `l`.
    pub fn radii_pc(&self, level: usize) -> Vec<f64> {
        (0..self.n_r(level))
            .map(|i| self.radius_pc(level, i as f64))
            .collect()
    }

    /// Final-level nside.
    pub fn nside_final(&self) -> u32 {
        self.nside(self.levels)
    }

    /// Number of final shells seen by the likelihood (chart shells minus padding).
    pub fn n_kept(&self) -> usize {
        self.n_r(self.levels) - 2 * self.padding
    }

    /// The kept final shells (edges halfway in log r between chart positions).
    pub fn kept_shells(&self) -> Shells {
        let n = self.n_kept();
        let lvl = self.levels;
        let mut edges_pc: Vec<f64> = (0..=n)
            .map(|k| self.radius_pc(lvl, self.padding as f64 + k as f64 - 0.5))
            .collect();
        edges_pc[0] = self.r_min_pc;
        edges_pc[n] = self.r_max_pc;
        Shells { edges_pc }
    }

    /// All final chart shells including padding (edges in pc).
    pub fn chart_shells(&self) -> Shells {
        let n = self.n_r(self.levels);
        let lvl = self.levels;
        Shells {
            edges_pc: (0..=n)
                .map(|k| self.radius_pc(lvl, k as f64 - 0.5))
                .collect(),
        }
    }

    /// Total number of standardized ICR excitations (level 0 plus 8 per refinement site).
    pub fn n_excitations(&self) -> usize {
        let mut n = self.npix(0) * self.n_r0;
        for l in 0..self.levels {
            n += self.npix(l) * (self.n_r(l) - 2) * 8;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w1_chart_matches_reference_coordinate() {
        // The peer benchmark's W1 chart: log r(u) = 2.955375140596 + 0.489002875679 u.
        let c = Chart::new(2, 12, 4, 2, 40.0, 2000.0).unwrap();
        assert!((c.a - 0.489002875679).abs() < 1e-11, "a = {}", c.a);
        assert!((c.b - 2.955375140596).abs() < 1e-11, "b = {}", c.b);
        let counts: Vec<usize> = (0..=4).map(|l| c.n_r(l)).collect();
        assert_eq!(counts, vec![12, 20, 36, 68, 132]);
        assert_eq!(c.n_kept(), 128);
        assert_eq!(c.n_excitations(), 1_862_976);
        // reference: final chart centres span 38.2-2093.8 pc
        assert!((c.radius_pc(4, 0.0) - 38.2).abs() < 0.05);
        assert!((c.radius_pc(4, 131.0) - 2093.8).abs() < 0.05);
    }

    #[test]
    fn kept_shells_are_log_uniform_and_cover_range() {
        let c = Chart::new(1, 7, 8, 2, 24.13, 1800.0).unwrap();
        assert_eq!(c.n_r(8), 772);
        let s = c.kept_shells();
        assert_eq!(s.len(), 768);
        let ratio0 = s.edges_pc[1] / s.edges_pc[0];
        for w in s.edges_pc.windows(2) {
            assert!((w[1] / w[0] / ratio0 - 1.0).abs() < 1e-9);
        }
        // chart centres coincide with the geometric centres of the kept shells
        let centres = s.centres_pc();
        for (k, ctr) in centres.iter().enumerate() {
            let r = c.radius_pc(8, (k + 2) as f64);
            assert!((r / ctr - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn fine_positions_sit_at_quarter_offsets_of_coarse() {
        let c = Chart::new(2, 12, 3, 2, 40.0, 2000.0).unwrap();
        for l in 0..3 {
            for j in 0..c.n_r(l) - 2 {
                let lo = c.u(l, j as f64 + 0.75);
                let hi = c.u(l, j as f64 + 1.25);
                assert!((c.u(l + 1, (2 * j) as f64) - lo).abs() < 1e-13);
                assert!((c.u(l + 1, (2 * j + 1) as f64) - hi).abs() < 1e-13);
            }
        }
    }

    #[test]
    fn shells_lookup() {
        let s = Shells::log_uniform(10.0, 1000.0, 4).unwrap();
        assert_eq!(s.shell_of(10.0), Some(0));
        assert_eq!(s.shell_of(999.0), Some(3));
        assert_eq!(s.shell_of(1000.0), None);
        assert_eq!(s.shell_of(5.0), None);
        assert!((s.edges_pc[2] - 100.0).abs() < 1e-9);
    }

    #[test]
    fn bad_nside_rejected() {
        assert!(depth_of_nside(3).is_err());
        assert!(Chart::new(2, 4, 3, 2, 40.0, 2000.0).is_err());
    }

    #[test]
    fn truncated_charts_keep_the_coordinates_and_cover_the_kept_range() {
        // demo, W1, the paper's mini chart and an odd padding
        for full in [
            Chart::new(2, 10, 2, 2, 40.0, 600.0).unwrap(),
            Chart::new(2, 12, 4, 2, 40.0, 2000.0).unwrap(),
            Chart::new(1, 7, 4, 6, 24.13, 1800.0).unwrap(),
            Chart::new(1, 9, 3, 3, 50.0, 900.0).unwrap(),
        ] {
            assert_eq!(full.truncated(full.levels), full);
            for k in 0..=full.levels {
                let c = full.truncated(k);
                for l in 0..=k {
                    assert_eq!(c.radii_pc(l), full.radii_pc(l));
                }
                let e = c.kept_shells().edges_pc;
                assert_eq!((e[0], e[e.len() - 1]), (full.r_min_pc, full.r_max_pc));
                assert!(e.windows(2).all(|w| w[1] > w[0] * (1.0 + 1e-9)), "{e:?}");
                // no kept cell lies wholly outside the range: the first and last inner
                // edges are inside it
                if e.len() > 2 {
                    assert!(e[1] > full.r_min_pc && e[e.len() - 2] < full.r_max_pc);
                }
                // the padding is symmetric: the last kept cell holds r_max
                let top = c.radius_pc(k, (c.n_r(k) - c.padding) as f64 - 0.5);
                assert!(top >= full.r_max_pc * (1.0 - 1e-9), "k {k}: {top}");
                let below = c.radius_pc(k, (c.n_r(k) - c.padding) as f64 - 1.5);
                assert!(below < full.r_max_pc, "k {k}: {below}");
            }
        }
    }
}
