//! Run-time choice of the vector instruction set for the hot per-star loops.
//!
//! A portable build targets the baseline of its architecture (SSE2 on x86-64), so loops
//! the compiler vectorises get two f64 lanes at most. [`dispatch`] runs a loop body
//! compiled a second time for AVX2 when the CPU has it (detected once per process), with
//! the baseline build as the fallback; on aarch64 the baseline already has NEON. The
//! arithmetic is the body's, in the body's order: no operation is fused or reassociated
//! by the wider build, so both paths give bit-identical results.

use std::sync::LazyLock;

pub use pulp::WithSimd;

/// The widest instruction set this CPU offers that the build can dispatch to.
static ARCH: LazyLock<pulp::Arch> = LazyLock::new(pulp::Arch::new);

/// Runs `op` compiled for the widest vector instruction set present (see the module doc).
///
/// ```
/// use dust3d::base::simd::{dispatch, WithSimd};
/// struct Sum<'a>(&'a [f64]);
/// impl WithSimd for Sum<'_> {
///     type Output = f64;
///     #[inline(always)]
///     fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
///         self.0.iter().sum()
///     }
/// }
/// assert_eq!(dispatch(Sum(&[1.0, 2.0, 3.5])), 6.5);
/// ```
#[inline(always)]
pub fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
    ARCH.dispatch(op)
}

/// The instruction set [`dispatch`] uses on this CPU, for logs and benchmarks.
pub fn describe() -> &'static str {
    struct Name;
    impl WithSimd for Name {
        type Output = &'static str;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> &'static str {
            match std::mem::size_of::<S::f64s>() {
                64 => "avx512",
                32 => "avx2",
                16 => "neon",
                _ => "baseline",
            }
        }
    }
    dispatch(Name)
}
