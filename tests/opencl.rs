//! The OpenCL ICR kernels (PoCL on CI) against the Rust kernels: forward and adjoint to
//! 1e-12 relative in f64 and 1e-5 in f32, and the adjoint dot-product test on the device.

use dust3d::config::Precision;
use dust3d::gpu::icr::GpuIcr;
use dust3d::gpu::{DeviceSpec, Gpu, GpuPrecision};
use dust3d::grid::Chart;
use dust3d::icr::Icr;
use dust3d::kernel::{Matern, Nu};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn gpu() -> Option<Gpu> {
    match Gpu::open(&DeviceSpec::from_env()) {
        Ok(g) => Some(g),
        Err(e) => {
            // scripts/test installs PoCL and requires a device
            assert!(std::env::var("DUST3D_REQUIRE_OPENCL").is_err(), "{e:#}");
            eprintln!("no OpenCL device ({e:#}): skipping");
            None
        }
    }
}

fn icr(precision: Precision) -> Icr {
    let chart = Chart::new(1, 10, 3, 2, 40.0, 800.0).unwrap();
    let k = Matern {
        nu: Nu::ThreeHalves,
        std: 1.5,
        length_pc: 60.0,
    };
    Icr::new(&chart, &k, precision).unwrap()
}

fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.sample(StandardNormal)).collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn icr_kernels_match_the_cpu_and_are_adjoint_on_the_device() {
    let Some(gpu) = gpu() else { return };
    for (mp, gp, tol) in [
        (Precision::F64, GpuPrecision::F64, 1e-12),
        (Precision::F32, GpuPrecision::F64, 1e-12),
        (Precision::F64, GpuPrecision::F32, 1e-5),
    ] {
        if gp == GpuPrecision::F64 && !gpu.fp64 {
            continue;
        }
        let cpu = icr(mp);
        let dev = GpuIcr::new(&cpu, &gpu, gp).unwrap();
        let xi = randn(cpu.n_xi(), 1);
        let sb = randn(cpu.n_field(), 2);
        let mut w = cpu.workspace();
        cpu.forward(&xi, &mut w);
        let s_cpu = w.fields.last().unwrap().clone();
        let mut xb_cpu = vec![0.0; cpu.n_xi()];
        cpu.adjoint(&sb, &mut xb_cpu, &mut w);
        let s_dev = dev.forward_host(&xi).unwrap();
        let xb_dev = dev.adjoint_host(&sb).unwrap();
        let (ef, ea) = (rel(&s_dev, &s_cpu), rel(&xb_dev, &xb_cpu));
        println!("{mp:?} matrices, {gp:?} device: forward {ef:.1e}, adjoint {ea:.1e}");
        assert!(
            ef <= tol && ea <= tol,
            "{mp:?} matrices, {gp:?} device: forward {ef:e}, adjoint {ea:e}"
        );
        // <S ξ, s̄> = <ξ, Sᵀ s̄> with both products from the device
        let (lhs, rhs) = (dot(&s_dev, &sb), dot(&xi, &xb_dev));
        let scale = (dot(&s_dev, &s_dev) * dot(&sb, &sb)).sqrt();
        assert!((lhs - rhs).abs() <= tol * scale, "{gp:?}: {lhs} vs {rhs}");
    }
}

#[test]
fn bad_device_choices_are_clear_errors() {
    if gpu().is_none() {
        return;
    }
    let e = Gpu::open(&DeviceSpec {
        platform: Some("no such platform".into()),
        device: None,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no OpenCL platform matches"), "{e}");
    let e = Gpu::open(&DeviceSpec {
        platform: None,
        device: Some("99".into()),
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("device index 99"), "{e}");
}
