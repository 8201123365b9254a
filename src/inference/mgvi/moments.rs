//! The posterior's moments of ln ρ per voxel (sample mean and standard deviation) and the
//! change of a map measured in them: what a global iteration reports and a stage's
//! convergence rule reads.

use rayon::prelude::*;

use super::sample_point;
use crate::likelihood::model::Model;
use crate::likelihood::state::State;

/// The sample mean and standard deviation of ln ρ = scale · s + offset over the samples
/// x + c_k ± δ_k on this rank's kept voxels, pixel-major (ICR forwards only: no star is
/// evaluated; the samples' fields formed as the KL forms them, [`crate::likelihood::model::SampleFields`]).
pub(super) fn log_density_moments(
    model: &Model,
    x: &[f64],
    residuals: &[Vec<f64>],
    shifts: &[Vec<f64>],
) -> [Vec<f64>; 2] {
    let (nxi, n) = (model.icr.n_xi(), model.n_r());
    let (nc, pad) = (model.n_chart(), model.padding());
    let mut w = model.workspace();
    let fields = model.sample_fields(residuals, shifts, &mut w);
    let mut m = Moments::new(model.npix() * n, 2 * residuals.len());
    let (mut xs, mut field) = (x.to_vec(), Vec::new());
    model.with_point_field(x, &mut w, |at, _| {
        for j in 0..2 * residuals.len() {
            sample_point(x, residuals, shifts, j, &mut xs);
            fields.fill(at, j, &mut field);
            let scl = model.scale.value(xs[nxi]);
            let off = model.offset.value(xs[nxi + 1]);
            m.add(n, scl, off, |p| &field[p * nc + pad..p * nc + pad + n]);
        }
    });
    model.recycle(Vec::new(), vec![w]);
    m.finish()
}

/// [`log_density_moments`] from the samples' states (their kept log-density, scale and
/// offset), in sample order: the same numbers without the ICR forwards.
pub(super) fn log_density_moments_of(model: &Model, states: &[State]) -> [Vec<f64>; 2] {
    let n = model.n_r();
    let mut m = Moments::new(model.npix() * n, states.len());
    for st in states {
        m.add(n, st.scl, st.off, |p| &st.s[p * n..(p + 1) * n]);
    }
    m.finish()
}

/// Running sample mean and mean square of ln ρ per kept voxel.
struct Moments {
    m1: Vec<f64>,
    m2: Vec<f64>,
    count: f64,
}

impl Moments {
    fn new(voxels: usize, samples: usize) -> Self {
        Self {
            m1: vec![0.0; voxels],
            m2: vec![0.0; voxels],
            count: samples as f64,
        }
    }

    /// Adds one sample, ln ρ = `scl` · s + `off` with pixel p's kept s (`n` shells) `s_of(p)`.
    fn add<'a>(&mut self, n: usize, scl: f64, off: f64, s_of: impl Fn(usize) -> &'a [f64] + Sync) {
        let count = self.count;
        self.m1
            .par_chunks_mut(n)
            .zip(self.m2.par_chunks_mut(n))
            .enumerate()
            .for_each(|(p, (a, b))| {
                for (k, s) in s_of(p).iter().enumerate() {
                    let v = scl * s + off;
                    a[k] += v / count;
                    b[k] += v * v / count;
                }
            });
    }

    /// The mean and the standard deviation.
    fn finish(self) -> [Vec<f64>; 2] {
        let std = self
            .m1
            .par_iter()
            .zip(&self.m2)
            .map(|(a, b)| (b - a * a).max(0.0).sqrt())
            .collect();
        [self.m1, std]
    }
}

/// Smallest standard deviation of ln ρ a map change is measured in: 5 % in ρ. Voxels the
/// samples do not move (e.g. where a coarse stage holds the finer levels) would otherwise
/// turn rounding into a huge change.
const STD_FLOOR: f64 = 0.05;

/// RMS over all ranks' kept voxels of the change `b − a` of the mean of ln ρ in units of its
/// posterior standard deviation `std` (so a voxel the data do not constrain counts no more
/// than one they pin down).
pub(super) fn z_rms_change(model: &Model, a: &[f64], b: &[f64], std: &[f64]) -> f64 {
    let n = model.n_r();
    let per_pixel: Vec<f64> = (0..a.len() / n.max(1))
        .map(|p| {
            (p * n..(p + 1) * n)
                .map(|i| ((b[i] - a[i]) / std[i].max(STD_FLOOR)).powi(2))
                .sum()
        })
        .collect();
    let voxels = model.icr.chart.npix(model.icr.chart.levels) * n;
    (model.dom.pixel_sum(&per_pixel) / voxels.max(1) as f64).sqrt()
}
