//! Will the model fit the device? An estimate of the global memory the OpenCL backend
//! allocates, checked against what the device reports before anything is allocated:
//! OpenCL allocates lazily, so without it a model too large for the device fails at the
//! first kernel launch with an opaque `CL_MEM_OBJECT_ALLOCATION_FAILURE`.

use anyhow::{bail, Result};
use ocl::enums::{DeviceInfo, DeviceInfoResult};

use super::Gpu;

/// Device bytes of a model, by item.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceBytes {
    /// Refinement matrices and level-0 factor, in the device precision.
    pub matrices: f64,
    /// Star windows (probabilities and their starts).
    pub windows: f64,
    /// Fields of every level for the forward, adjoint and tangent passes.
    pub fields: f64,
    /// Per-star arrays and the vectors of a device-resident CG.
    pub vectors: f64,
}

impl DeviceBytes {
    /// The estimate for a model: `matrix_bytes` and `window_bytes` as the host holds them
    /// (f64 probabilities), `level_voxels` of every ICR level, `n_stars`, `n_params`, in
    /// `scalar` bytes per value on the device (8 or 4; matrices stored in f32 stay f32).
    pub fn estimate(
        matrix_bytes: usize,
        matrices_f32: bool,
        window_bytes: usize,
        level_voxels: &[usize],
        n_stars: usize,
        n_params: usize,
        scalar: usize,
    ) -> Self {
        let s = scalar as f64;
        let matrices = if matrices_f32 || scalar == 8 {
            matrix_bytes as f64
        } else {
            matrix_bytes as f64 / 2.0
        };
        // probabilities shrink with the scalar; the 12 bytes of starts and offsets stay
        let windows = window_bytes as f64 * s / 8.0 + 4.0 * n_stars as f64;
        let fields = 4.0 * s * level_voxels.iter().sum::<usize>() as f64;
        let vectors = s * (12.0 * n_stars as f64 + 6.0 * n_params as f64);
        Self {
            matrices,
            windows,
            fields,
            vectors,
        }
    }

    /// Their sum.
    pub fn total(&self) -> f64 {
        self.matrices + self.windows + self.fields + self.vectors
    }
}

/// The device's global memory and its largest single allocation, bytes.
pub fn device_memory(gpu: &Gpu) -> (f64, f64) {
    let global = match gpu.device.info(DeviceInfo::GlobalMemSize) {
        Ok(DeviceInfoResult::GlobalMemSize(b)) => b as f64,
        _ => f64::INFINITY,
    };
    let alloc = match gpu.device.info(DeviceInfo::MaxMemAllocSize) {
        Ok(DeviceInfoResult::MaxMemAllocSize(b)) => b as f64,
        _ => f64::INFINITY,
    };
    (global, alloc)
}

/// Refuse a model whose estimate, times the `sharing` MPI ranks that use the same device,
/// exceeds 90 % of the device's global memory (the rest is the runtime's), naming the
/// device, the figures and what to change. `DUST3D_SKIP_DEVICE_MEMORY_CHECK=1` skips it.
pub fn check(device: &str, need: &DeviceBytes, global: f64, sharing: usize) -> Result<()> {
    let sharing = sharing.max(1);
    if std::env::var_os("DUST3D_SKIP_DEVICE_MEMORY_CHECK").is_some()
        || need.total() * sharing as f64 <= 0.9 * global
    {
        return Ok(());
    }
    let gb = |b: f64| b / 1e9;
    let shared = if sharing > 1 {
        format!(" per rank, and {sharing} ranks of this node share the device")
    } else {
        String::new()
    };
    bail!(
        "OpenCL device {device} has {:.2} GB of global memory; this model needs about {:.2} GB \
         on it{shared} (matrices {:.2}, windows {:.2}, fields {:.2}, vectors {:.2} GB): use \
         backend.precision = \"f32\", grid.matrix_precision = \"f32\", more ranks or devices, \
         or a coarser grid (DUST3D_SKIP_DEVICE_MEMORY_CHECK=1 skips this check)",
        gb(global),
        gb(need.total()),
        gb(need.matrices),
        gb(need.windows),
        gb(need.fields),
        gb(need.vectors)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_beyond_the_device_is_refused_with_the_figures() {
        // W1-like: 62 MB of f64 matrices, 59 MB of windows, two levels of 1,000 and 8,000
        // voxels, 200,000 stars, 2,000,000 excitations; device scalars of 8 or 4 bytes
        let estimate = |scalar| {
            DeviceBytes::estimate(
                62_000_000,
                false,
                59_000_000,
                &[1000, 8000],
                200_000,
                2_000_000,
                scalar,
            )
        };
        let need = estimate(8);
        assert_eq!(need.matrices, 62e6);
        assert_eq!(need.fields, 4.0 * 8.0 * 9000.0);
        let f32 = estimate(4);
        assert_eq!(f32.matrices, 31e6);
        assert!(check("GPU", &need, 16e9, 1).is_ok());
        let e = check("Tiny GPU", &need, 0.1e9, 1).unwrap_err().to_string();
        assert!(
            e.contains("Tiny GPU has 0.10 GB") && e.contains("needs about"),
            "{e}"
        );
        // 0.24 GB per rank fits a 0.3 GB device alone, not with a second rank on it
        assert!((need.total() - 0.237e9).abs() < 0.001e9, "{}", need.total());
        assert!(check("Small GPU", &need, 0.3e9, 1).is_ok());
        let e = check("Small GPU", &need, 0.3e9, 2).unwrap_err().to_string();
        assert!(e.contains("2 ranks of this node share the device"), "{e}");
    }
}
