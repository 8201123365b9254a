//! Point queries of a map: differential (per pc) or integrated extinction at Galactic
//! (l, b, distance), for the mean, std or samples.
//!
//! In angle every query uses the HEALPix ring interpolation of healpy's
//! `get_interp_weights` (the four nearest pixel centres on the two rings around the point),
//! which is what `dustmaps` uses, so both give the same numbers on the same map. In distance
//! there are two conventions ([`Convention`]):
//!
//! * `Native` (default): differential values are interpolated linearly in ln ρ between shell
//!   centres and held constant in the outer half of the first and last shells, so every point
//!   between the inner and outer edge has a value; integrated extinction is the exact integral
//!   of the piecewise-constant voxel density (plus the inner map) to the queried distance, the
//!   quantity the likelihood fitted.
//! * `Dustmaps`: exactly what `dustmaps.edenhofer2023` computes. Values are interpolated in ln
//!   between shell *centres* only (NaN at or below the first centre and beyond the last), and
//!   the integrated value placed at a shell's centre is the integral to its *far edge*, so it
//!   exceeds the true integral at that distance by about half a shell's extinction.

use anyhow::{bail, Result};
use cdshealpix::nested::Layer;
use rand::Rng;

use crate::products::mapfile::DustMap;

/// Differential (per pc) or integrated (from the Sun) extinction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// Extinction per pc at the point.
    Differential,
    /// Extinction integrated from the Sun to the point (inner map included).
    Integrated,
}

/// Radial interpolation convention (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// dust3d's own: exact integral of the voxel density, full radial range.
    Native,
    /// Bit-for-bit the scheme of `dustmaps.edenhofer2023`.
    Dustmaps,
}

impl std::str::FromStr for Convention {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Self::Native),
            "dustmaps" => Ok(Self::Dustmaps),
            _ => bail!("convention must be 'native' or 'dustmaps', got {s:?}"),
        }
    }
}

/// Four NESTED pixels and their weights (summing to 1) interpolating at a sky position.
pub type AngularWeights = ([usize; 4], [f64; 4]);

/// Pixel range, pixel count, colatitude (rad) and shift flag of a 1-based HEALPix ring.
fn ring_info(nside: u64, ring: u64) -> (u64, u64, f64, bool) {
    let npix = 12 * nside * nside;
    let north = if ring > 2 * nside {
        4 * nside - ring
    } else {
        ring
    };
    let (mut theta, ringpix, shifted, mut start);
    if north < nside {
        let tmp = (north * north) as f64 * 4.0 / npix as f64;
        theta = (tmp * (2.0 - tmp)).sqrt().atan2(1.0 - tmp);
        ringpix = 4 * north;
        shifted = true;
        start = 2 * north * (north - 1);
    } else {
        theta = ((2 * nside - north) as f64 * 2.0 / (3.0 * nside as f64)).acos();
        ringpix = 4 * nside;
        shifted = (north - nside).is_multiple_of(2);
        start = 2 * nside * (nside - 1) + (north - nside) * ringpix;
    }
    if north != ring {
        theta = std::f64::consts::PI - theta;
        start = npix - start - ringpix;
    }
    (start, ringpix, theta, shifted)
}

/// The ring at or north of cos(colatitude) = z (0 = above the first ring).
fn ring_above(nside: u64, z: f64) -> u64 {
    let n = nside as f64;
    let az = z.abs();
    if az <= 2.0 / 3.0 {
        return (n * (2.0 - 1.5 * z)) as u64;
    }
    let iring = (n * (3.0 * (1.0 - az)).sqrt()) as u64;
    if z > 0.0 {
        iring
    } else {
        4 * nside - iring - 1
    }
}

/// The two pixels of `ring` bracketing longitude `phi` (rad) and the weight of the second.
fn ring_pair(nside: u64, ring: u64, phi: f64) -> ([u64; 2], f64, f64) {
    let (start, nr, theta, shifted) = ring_info(nside, ring);
    let shift = if shifted { 0.5 } else { 0.0 };
    let dphi = std::f64::consts::TAU / nr as f64;
    let tmp = phi / dphi - shift;
    let i1 = tmp.floor() as i64;
    let w1 = (phi - (i1 as f64 + shift) * dphi) / dphi;
    let i2 = (i1 + 1).rem_euclid(nr as i64) as u64;
    let i1 = i1.rem_euclid(nr as i64) as u64;
    ([start + i1, start + i2], w1, theta)
}

/// Interpolation weights at Galactic (l, b) in degrees over the NESTED pixels of `layer`
/// (healpy `get_interp_weights` semantics, including the polar caps).
///
/// ```
/// use dust3d::products::query::angular_weights;
/// let layer = cdshealpix::nested::get(3); // nside 8
/// let (pixels, weights) = angular_weights(layer, 123.4, -56.7);
/// assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
/// assert!(pixels.iter().all(|&p| p < 768));
/// // at a pixel centre the weight sits on that pixel
/// let (l, b) = dust3d::sphere::grid::pix2ang(8, 100);
/// let (pixels, weights) = angular_weights(layer, l, b);
/// let w: f64 = pixels.iter().zip(&weights).filter(|(p, _)| **p == 100).map(|(_, w)| w).sum();
/// assert!((w - 1.0).abs() < 1e-9);
/// ```
pub fn angular_weights(layer: &Layer, l_deg: f64, b_deg: f64) -> AngularWeights {
    let nside = 1u64 << layer.depth();
    let npix = 12 * nside * nside;
    let theta = (90.0 - b_deg).to_radians().clamp(0.0, std::f64::consts::PI);
    let phi = l_deg.to_radians().rem_euclid(std::f64::consts::TAU);
    let ir1 = ring_above(nside, theta.cos());
    let ir2 = ir1 + 1;
    let (mut pix, mut wgt) = ([0u64; 4], [0.0f64; 4]);
    let mut theta1 = 0.0;
    let mut theta2 = std::f64::consts::PI;
    if ir1 > 0 {
        let (p, w, t) = ring_pair(nside, ir1, phi);
        (pix[0], pix[1], wgt[0], wgt[1], theta1) = (p[0], p[1], 1.0 - w, w, t);
    }
    if ir2 < 4 * nside {
        let (p, w, t) = ring_pair(nside, ir2, phi);
        (pix[2], pix[3], wgt[2], wgt[3], theta2) = (p[0], p[1], 1.0 - w, w, t);
    }
    if ir1 == 0 {
        // above the first ring: the far pixels of the same ring stand in for the pole
        let wt = theta / theta2;
        let fac = (1.0 - wt) * 0.25;
        wgt = [fac, fac, wgt[2] * wt + fac, wgt[3] * wt + fac];
        pix[0] = (pix[2] + 2) & 3;
        pix[1] = (pix[3] + 2) & 3;
    } else if ir2 == 4 * nside {
        let wt = (theta - theta1) / (std::f64::consts::PI - theta1);
        let fac = wt * 0.25;
        wgt = [
            wgt[0] * (1.0 - wt) + fac,
            wgt[1] * (1.0 - wt) + fac,
            fac,
            fac,
        ];
        pix[2] = ((pix[0] + 2) & 3) + npix - 4;
        pix[3] = ((pix[1] + 2) & 3) + npix - 4;
    } else {
        let wt = (theta - theta1) / (theta2 - theta1);
        for (k, w) in wgt.iter_mut().enumerate() {
            *w *= if k < 2 { 1.0 - wt } else { wt };
        }
    }
    (pix.map(|p| layer.from_ring(p) as usize), wgt)
}

/// Radial bracket: value = (1 − w)·v[k0] + w·v[k1].
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bracket {
    k0: usize,
    k1: usize,
    w: f64,
}

/// Interpolates one map at arbitrary points; build once, query many times (thread-safe).
pub struct Interpolator<'m> {
    map: &'m DustMap,
    layer: &'static Layer,
    npix: usize,
    centres: Vec<f64>,
    quantity: Quantity,
    convention: Convention,
    /// Integrated extinction of the mean map to every edge, [edge][pixel] (integrated only).
    cum_mean: Vec<f64>,
    /// The same per sample (integrated queries of samples only).
    cum_samples: Vec<Vec<f64>>,
}

/// Integrated extinction to each of the `n_r + 1` edges, [edge][pixel].
fn edge_columns(map: &DustMap, rho: &[f64], inner: &[f64]) -> Vec<f64> {
    let npix = map.npix();
    let widths = map.shells.widths_pc();
    let mut cum = Vec::with_capacity((widths.len() + 1) * npix);
    cum.extend_from_slice(inner);
    for (k, w) in widths.iter().enumerate() {
        for p in 0..npix {
            let prev = cum[k * npix + p];
            cum.push(prev + rho[k * npix + p] * w);
        }
    }
    cum
}

impl<'m> Interpolator<'m> {
    /// Prepare queries of `quantity` on `map`; `with_samples` also prepares per-sample
    /// integrated columns (memory: one map per sample).
    pub fn new(
        map: &'m DustMap,
        quantity: Quantity,
        convention: Convention,
        with_samples: bool,
    ) -> Result<Self> {
        map.check()?;
        let depth = crate::sphere::grid::depth_of_nside(map.nside)?;
        let (cum_mean, cum_samples) = if quantity == Quantity::Integrated {
            let cm = edge_columns(map, &map.mean, &map.inner_mean);
            let cs = if with_samples {
                if map.inner_samples.len() != map.samples.len() {
                    bail!("the map's samples have no inner integrated samples");
                }
                map.samples
                    .iter()
                    .zip(&map.inner_samples)
                    .map(|(s, i)| edge_columns(map, s, i))
                    .collect()
            } else {
                Vec::new()
            };
            (cm, cs)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self {
            map,
            layer: cdshealpix::nested::get(depth),
            npix: map.npix(),
            centres: map.centres_pc.clone(),
            quantity,
            convention,
            cum_mean,
            cum_samples,
        })
    }

    /// Angular weights at (l, b) in degrees.
    pub fn angular(&self, l_deg: f64, b_deg: f64) -> AngularWeights {
        angular_weights(self.layer, l_deg, b_deg)
    }

    /// Distance range (pc) over which queries have values; NaN outside.
    pub fn range_pc(&self) -> (f64, f64) {
        let e = &self.map.shells.edges_pc;
        let c = &self.centres;
        match self.convention {
            Convention::Native => (e[0], e[e.len() - 1]),
            Convention::Dustmaps => (c[0], c[c.len() - 1]),
        }
    }

    /// Centre bracket of `d_pc` for differential / dustmaps-integrated values.
    fn centre_bracket(&self, d: f64) -> Option<Bracket> {
        let c = &self.centres;
        let n = c.len();
        let hi = c.partition_point(|&x| x < d);
        if hi == 0 || hi >= n {
            if self.convention == Convention::Dustmaps || d.is_nan() {
                // dustmaps masks d ≤ first centre and d > last centre
                return None;
            }
            let e = &self.map.shells.edges_pc;
            if hi == 0 && d >= e[0] {
                return Some(Bracket {
                    k0: 0,
                    k1: 0,
                    w: 0.0,
                });
            }
            if hi >= n && d <= e[n] {
                return Some(Bracket {
                    k0: n - 1,
                    k1: n - 1,
                    w: 0.0,
                });
            }
            return None;
        }
        let (c0, c1) = (c[hi - 1], c[hi]);
        Some(Bracket {
            k0: hi - 1,
            k1: hi,
            w: (d - c0) / (c1 - c0),
        })
    }

    /// exp of the interpolated ln of `field(k, p)`; zero-weight terms are skipped so a zero
    /// voxel next to the point does not poison it with 0·(−∞).
    fn log_interp(
        &self,
        ang: &AngularWeights,
        b: Bracket,
        field: impl Fn(usize, usize) -> f64,
    ) -> f64 {
        let mut acc = 0.0;
        for (&p, &wa) in ang.0.iter().zip(&ang.1) {
            for (k, wr) in [(b.k0, 1.0 - b.w), (b.k1, b.w)] {
                let w = wa * wr;
                if w != 0.0 {
                    acc += w * field(k, p).ln();
                }
            }
        }
        acc.exp()
    }

    fn lin_interp(
        &self,
        ang: &AngularWeights,
        b: Bracket,
        field: impl Fn(usize, usize) -> f64,
    ) -> f64 {
        let mut acc = 0.0;
        for (&p, &wa) in ang.0.iter().zip(&ang.1) {
            acc += wa * ((1.0 - b.w) * field(b.k0, p) + b.w * field(b.k1, p));
        }
        acc
    }

    /// Integral of the voxel density `rho` (with edge columns `cum`) to `d_pc`, interpolated.
    fn native_integral(&self, ang: &AngularWeights, d: f64, rho: &[f64], cum: &[f64]) -> f64 {
        let e = &self.map.shells.edges_pc;
        let n = e.len() - 1;
        if !(d >= e[0] && d <= e[n]) {
            return f64::NAN;
        }
        let k = (e.partition_point(|&x| x <= d) - 1).min(n - 1);
        let dr = d - e[k];
        let np = self.npix;
        let mut acc = 0.0;
        for (&p, &wa) in ang.0.iter().zip(&ang.1) {
            acc += wa * (cum[k * np + p] + rho[k * np + p] * dr);
        }
        acc
    }

    /// Value of one field (the mean map or sample `s`) at a point.
    fn value(&self, ang: &AngularWeights, d: f64, sample: Option<usize>) -> f64 {
        let np = self.npix;
        let rho: &[f64] = match sample {
            Some(s) => &self.map.samples[s],
            None => &self.map.mean,
        };
        match (self.quantity, self.convention) {
            (Quantity::Differential, _) => match self.centre_bracket(d) {
                Some(b) => self.log_interp(ang, b, |k, p| rho[k * np + p]),
                None => f64::NAN,
            },
            (Quantity::Integrated, conv) => {
                let cum: &[f64] = match sample {
                    Some(s) => &self.cum_samples[s],
                    None => &self.cum_mean,
                };
                if conv == Convention::Native {
                    return self.native_integral(ang, d, rho, cum);
                }
                match self.centre_bracket(d) {
                    // value at centre k is the integral to edge k + 1
                    Some(b) => self.log_interp(ang, b, |k, p| cum[(k + 1) * np + p]),
                    None => f64::NAN,
                }
            }
        }
    }

    /// Mean-map value at (l, b) deg and distance `d_pc`.
    pub fn mean(&self, l_deg: f64, b_deg: f64, d_pc: f64) -> f64 {
        self.value(&self.angular(l_deg, b_deg), d_pc, None)
    }

    /// Mean-map value with precomputed angular weights (many distances on one sightline).
    pub fn mean_at(&self, ang: &AngularWeights, d_pc: f64) -> f64 {
        self.value(ang, d_pc, None)
    }

    /// Value of sample `s` at (l, b) deg and distance `d_pc`.
    pub fn sample(&self, s: usize, l_deg: f64, b_deg: f64, d_pc: f64) -> f64 {
        self.value(&self.angular(l_deg, b_deg), d_pc, Some(s))
    }

    /// Values of all samples at a point, written to `out` (one per sample).
    pub fn samples(&self, l_deg: f64, b_deg: f64, d_pc: f64, out: &mut [f64]) {
        let ang = self.angular(l_deg, b_deg);
        for (s, o) in out.iter_mut().enumerate() {
            *o = self.value(&ang, d_pc, Some(s));
        }
    }

    /// Number of samples available to sample-based modes.
    pub fn n_samples(&self) -> usize {
        match self.quantity {
            Quantity::Differential => self.map.samples.len(),
            Quantity::Integrated => self.cum_samples.len(),
        }
    }

    /// Standard deviation at a point: differential from the std map (variance interpolated
    /// linearly, as dustmaps does); integrated from the samples (1/N, as numpy), or, for a map
    /// stored without samples, from its per-edge integrated std interpolated linearly in r.
    pub fn std(&self, l_deg: f64, b_deg: f64, d_pc: f64) -> Result<f64> {
        let ang = self.angular(l_deg, b_deg);
        let np = self.npix;
        if self.quantity == Quantity::Differential {
            let sd = &self.map.std;
            if sd.is_empty() {
                bail!("the map was read without its std");
            }
            return Ok(match self.centre_bracket(d_pc) {
                Some(b) => self
                    .lin_interp(&ang, b, |k, p| sd[k * np + p].powi(2))
                    .sqrt(),
                None => f64::NAN,
            });
        }
        let ns = self.cum_samples.len();
        if ns > 0 {
            // Welford's one-pass mean and variance: no allocation per queried point
            let (mut m, mut m2) = (0.0, 0.0);
            for (k, s) in (0..ns).enumerate() {
                let v = self.value(&ang, d_pc, Some(s));
                let delta = v - m;
                m += delta / (k + 1) as f64;
                m2 += delta * (v - m);
            }
            return Ok((m2 / ns as f64).sqrt());
        }
        if self.map.integrated_std.is_empty() {
            bail!("the std of integrated extinction needs samples or a stored integrated std, and this map has neither");
        }
        Ok(self.stored_integrated_std(&ang, d_pc))
    }

    fn stored_integrated_std(&self, ang: &AngularWeights, d: f64) -> f64 {
        let (np, m) = (self.npix, self.map);
        let at_edge = |j: usize, p: usize| {
            if j == 0 {
                m.inner_std[p]
            } else {
                m.integrated_std[(j - 1) * np + p]
            }
        };
        match self.convention {
            Convention::Native => {
                let e = &m.shells.edges_pc;
                let n = e.len() - 1;
                if !(d >= e[0] && d <= e[n]) {
                    return f64::NAN;
                }
                let k = (e.partition_point(|&x| x <= d) - 1).min(n - 1);
                let b = Bracket {
                    k0: k,
                    k1: k + 1,
                    w: (d - e[k]) / (e[k + 1] - e[k]),
                };
                self.lin_interp(ang, b, at_edge)
            }
            Convention::Dustmaps => match self.centre_bracket(d) {
                Some(b) => self.lin_interp(ang, b, |k, p| at_edge(k + 1, p)),
                None => f64::NAN,
            },
        }
    }

    /// A random sample index (for `random-sample` queries).
    pub fn random_sample_index<R: Rng>(&self, rng: &mut R) -> Result<usize> {
        let n = self.n_samples();
        if n == 0 {
            bail!("this map has no samples");
        }
        Ok(rng.random_range(0..n))
    }
}

#[cfg(test)]
mod tests;
