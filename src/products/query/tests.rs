use super::*;
use crate::sphere::grid::{self, Shells};

fn shells() -> Shells {
    Shells::log_uniform(50.0, 400.0, 12).unwrap()
}

/// A map with ρ = f(r, p) and two samples ρ·(1 ± 0.2), inner map `inner`.
fn map_with_samples(nside: u32, f: impl Fn(f64, usize) -> f64, inner: f64) -> DustMap {
    let sh = shells();
    let npix = grid::npix(nside);
    let c = sh.centres_pc();
    let mean: Vec<f64> = (0..sh.len() * npix)
        .map(|i| f(c[i / npix], i % npix))
        .collect();
    let mut m = DustMap::from_fn(nside, sh, "E per pc", |_, _| 0.0);
    m.samples = [0.8, 1.2]
        .iter()
        .map(|a| mean.iter().map(|v| v * a).collect())
        .collect();
    m.std = mean.iter().map(|v| 0.2 * v).collect();
    m.mean = mean;
    m.inner_mean = vec![inner; npix];
    m.inner_samples = vec![vec![0.8 * inner; npix], vec![1.2 * inner; npix]];
    m
}

#[test]
fn weights_are_a_partition_of_unity_on_nearby_pixels() {
    for nside in [1u32, 2, 4, 16] {
        let layer = cdshealpix::nested::get(grid::depth_of_nside(nside).unwrap());
        for i in 0..400 {
            let l = (i as f64 * 37.7) % 360.0;
            let b = ((i as f64 * 0.618).fract() * 2.0 - 1.0).asin().to_degrees();
            let (pix, w) = angular_weights(layer, l, b);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(w.iter().all(|&x| (-1e-15..=1.0 + 1e-15).contains(&x)));
            // every pixel used is within ~2 pixel sizes of the point
            let u = grid::lonlat_to_vec(l.to_radians(), b.to_radians());
            let size = (4.0 * std::f64::consts::PI / grid::npix(nside) as f64).sqrt();
            for (&p, &wp) in pix.iter().zip(&w) {
                if wp > 0.0 {
                    let v = grid::pix2vec(nside, p as u64);
                    let ang = (u[0] * v[0] + u[1] * v[1] + u[2] * v[2])
                        .clamp(-1.0, 1.0)
                        .acos();
                    assert!(
                        ang < 2.5 * size,
                        "nside {nside} l {l} b {b}: pixel {p} at {ang}"
                    );
                }
            }
        }
    }
}

#[test]
fn pixel_centres_are_reproduced() {
    let nside = 8;
    let m = map_with_samples(nside, |r, p| 1e-3 * (1.0 + p as f64) * (r / 100.0), 0.0);
    let q = Interpolator::new(&m, Quantity::Differential, Convention::Native, false).unwrap();
    let npix = grid::npix(nside);
    for p in (0..npix).step_by(7) {
        let (l, b) = grid::pix2ang(nside, p as u64);
        for k in 0..m.n_r() {
            let want = m.mean[k * npix + p];
            let got = q.mean(l, b, m.centres_pc[k]);
            assert!(
                (got / want - 1.0).abs() < 1e-9,
                "pixel {p} shell {k}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn constant_density_gives_exact_integrals() {
    let (rho, inner) = (2e-3, 0.05);
    let m = map_with_samples(4, |_, _| rho, inner);
    let e = m.shells.edges_pc.clone();
    let nat = Interpolator::new(&m, Quantity::Integrated, Convention::Native, true).unwrap();
    let dm = Interpolator::new(&m, Quantity::Integrated, Convention::Dustmaps, true).unwrap();
    let diff = Interpolator::new(&m, Quantity::Differential, Convention::Native, true).unwrap();
    for (i, d) in [e[0], 55.0, 99.9, 250.0, e[e.len() - 1]]
        .into_iter()
        .enumerate()
    {
        let (l, b) = (i as f64 * 71.0, 40.0 - i as f64 * 20.0);
        let want = inner + rho * (d - e[0]);
        assert!((nat.mean(l, b, d) / want - 1.0).abs() < 1e-12);
        assert!((diff.mean(l, b, d) / rho - 1.0).abs() < 1e-12);
        // samples are 0.8× and 1.2× the mean: std is 0.2× the mean
        assert!((nat.std(l, b, d).unwrap() / (0.2 * want) - 1.0).abs() < 1e-10);
    }
    // dustmaps places the integral to the far edge at each centre
    for k in 1..m.n_r() {
        let want = inner + rho * (e[k + 1] - e[0]);
        let got = dm.mean(10.0, 10.0, m.centres_pc[k]);
        assert!((got / want - 1.0).abs() < 1e-12, "shell {k}");
    }
    for d in [e[0] - 1.0, e[e.len() - 1] + 1.0, f64::NAN] {
        assert!(nat.mean(0.0, 0.0, d).is_nan() && diff.mean(0.0, 0.0, d).is_nan());
    }
    // dustmaps: nothing at or below the first centre, nor beyond the last
    let c = &m.centres_pc;
    assert!(dm.mean(0.0, 0.0, c[0]).is_nan());
    assert!(dm.mean(0.0, 0.0, c[c.len() - 1] * 1.0001).is_nan());
    assert!(dm.mean(0.0, 0.0, c[c.len() - 1]).is_finite());
}

#[test]
fn log_radial_interpolation_is_exact_for_power_laws() {
    // ln ρ linear in r is reproduced exactly between centres
    let m = map_with_samples(2, |r, _| (-r / 80.0).exp(), 0.0);
    let q = Interpolator::new(&m, Quantity::Differential, Convention::Dustmaps, false).unwrap();
    let c = &m.centres_pc;
    for d in [c[0] + 0.3, (c[3] + c[4]) / 2.0, c[10] - 1e-3] {
        let got = q.mean(123.0, -33.0, d);
        assert!((got / (-d / 80.0f64).exp() - 1.0).abs() < 1e-12, "d {d}");
    }
}

#[test]
fn samples_modes_and_stored_std_fallback() {
    let m = map_with_samples(4, |r, p| 1e-3 + 1e-6 * p as f64 * r, 0.01);
    let q = Interpolator::new(&m, Quantity::Integrated, Convention::Native, true).unwrap();
    let mut out = vec![0.0; 2];
    q.samples(30.0, 5.0, 200.0, &mut out);
    let mean = q.mean(30.0, 5.0, 200.0);
    assert!((out[0] / mean - 0.8).abs() < 1e-12 && (out[1] / mean - 1.2).abs() < 1e-12);
    let mut rng = crate::base::rng::stream(1, 99);
    let s = q.random_sample_index(&mut rng).unwrap();
    assert_eq!(q.sample(s, 30.0, 5.0, 200.0), out[s]);
    // without samples, integrated std needs the stored integrated std
    let mut bare = m.clone();
    bare.samples.clear();
    bare.inner_samples.clear();
    let q = Interpolator::new(&bare, Quantity::Integrated, Convention::Native, false).unwrap();
    assert!(q.std(30.0, 5.0, 200.0).is_err());
    assert!(q.random_sample_index(&mut rng).is_err());
}
