//! OpenCL offload (ocl crate): device selection and program building. Kernels live in
//! `opencl/*.cl` and are compiled at run time for the chosen device, in f64 where the device
//! supports it (`cl_khr_fp64`) and f32 otherwise or on request.
//!
//! The ICR prior operator ([`icr::GpuIcr`]) and the likelihood stages (`backend::OpenCl`:
//! exp/scale, per-pixel columns and star moments, their JVP and VJP) run on the device;
//! [`backend::attach`] puts them behind a model's [`crate::likelihood::backend::Backend`]
//! when the configuration asks for `backend.kind = "opencl"`.

pub mod backend;
mod buffers;
mod exchange;
pub mod icr;
pub mod memory;
mod metric;
pub mod model;
mod space;

use anyhow::{bail, Context, Result};
use ocl::enums::{DeviceInfo, DeviceInfoResult};
use ocl::{Device, Platform};

pub use crate::base::precision::Precision;

/// Which OpenCL device to use: platform and device by index or by (case-insensitive)
/// substring of their names; `None` means the first one.
#[derive(Clone, Debug, Default)]
pub struct DeviceSpec {
    /// Platform index or name substring.
    pub platform: Option<String>,
    /// Device index or name substring.
    pub device: Option<String>,
    /// One device per node-local rank: rank r takes entry r mod len (indices or names).
    pub devices: Vec<String>,
    /// This process's node-local rank when it is one of several MPI ranks: with no device
    /// named, it takes device `slot` mod (devices on the platform).
    pub slot: Option<usize>,
}

impl DeviceSpec {
    /// From the environment: `DUST3D_OPENCL_PLATFORM`, `DUST3D_OPENCL_DEVICE` (one device,
    /// or a comma-separated list shared out by node-local rank).
    pub fn from_env() -> Self {
        let device = std::env::var("DUST3D_OPENCL_DEVICE").ok();
        let (device, devices) = match device {
            Some(d) if d.contains(',') => (None, split_list(&d)),
            d => (d, Vec::new()),
        };
        Self {
            platform: std::env::var("DUST3D_OPENCL_PLATFORM").ok(),
            device,
            devices,
            slot: None,
        }
    }

    /// The device this spec picks among `n` present: the one it names (for its slot, from a
    /// list), else the slot's index mod `n`, else None (the first).
    fn wanted(&self, n: usize) -> Option<String> {
        if !self.devices.is_empty() {
            let k = self.slot.unwrap_or(0) % self.devices.len();
            return Some(self.devices[k].clone());
        }
        self.device
            .clone()
            .or_else(|| self.slot.map(|r| (r % n).to_string()))
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect()
}

/// This process's rank among the ranks on its node, from the launcher's environment (Open
/// MPI, Slurm, PMI/Hydra as in MPICH and Intel MPI, MVAPICH); None when no launcher says.
pub fn node_local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
        "PMI_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "MV2_COMM_WORLD_LOCAL_RANK",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// An OpenCL context with one device and an in-order queue.
pub struct Gpu {
    /// The context.
    pub context: ocl::Context,
    /// Its only queue.
    pub queue: ocl::Queue,
    /// The device.
    pub device: Device,
    /// "platform / device" for logs and benchmark output.
    pub name: String,
    /// Whether the device does double precision.
    pub fp64: bool,
    /// The device's index on its platform.
    pub index: usize,
}

/// Why no usable OpenCL device could be had.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The ICD loader found no platform at all.
    #[error(
        "no OpenCL platform found: install a driver (ICD), e.g. PoCL for CPUs \
         (apt-get install pocl-opencl-icd) or the GPU vendor's OpenCL runtime"
    )]
    NoPlatform,
    /// An index beyond the platforms or devices present.
    #[error("OpenCL {what} index {index} does not exist ({listing})")]
    NoSuchIndex {
        /// "platform" or "device".
        what: &'static str,
        /// The index asked for.
        index: usize,
        /// What there is, "index: name; …".
        listing: String,
    },
    /// No platform or device name contains the requested text.
    #[error("no OpenCL {what} matches {want:?} ({listing})")]
    NoMatch {
        /// "platform" or "device".
        what: &'static str,
        /// The requested name substring.
        want: String,
        /// What there is, "index: name; …".
        listing: String,
    },
    /// Double precision asked of a device without `cl_khr_fp64`.
    #[error("OpenCL device {device} has no double precision (cl_khr_fp64): use f32")]
    NoFp64 {
        /// The device's name.
        device: String,
    },
}

fn pick<T: Clone>(
    items: &[T],
    names: &[String],
    want: Option<&str>,
    what: &'static str,
) -> Result<T> {
    let listing = || {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}: {n}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let i = match want {
        None => 0,
        Some(w) => match w.parse::<usize>() {
            Ok(i) if i < items.len() => i,
            Ok(index) => Err(DeviceError::NoSuchIndex {
                what,
                index,
                listing: listing(),
            })?,
            Err(_) => names
                .iter()
                .position(|n| n.to_lowercase().contains(&w.to_lowercase()))
                .ok_or_else(|| DeviceError::NoMatch {
                    what,
                    want: w.to_string(),
                    listing: listing(),
                })?,
        },
    };
    Ok(items[i].clone())
}

/// All (platform, device, fp64) names visible to the OpenCL ICD loader.
pub fn list_devices() -> Result<Vec<(String, String, bool)>> {
    let mut out = Vec::new();
    for p in platforms()? {
        for d in Device::list_all(p).unwrap_or_default() {
            out.push((p.name()?, d.name()?, has_fp64(&d)));
        }
    }
    Ok(out)
}

fn platforms() -> Result<Vec<Platform>> {
    // `Platform::list` panics when the ICD loader finds no platform; ask the core API
    let list: Vec<Platform> = ocl::core::get_platform_ids()
        .unwrap_or_default()
        .into_iter()
        .map(Platform::new)
        .collect();
    if list.is_empty() {
        return Err(DeviceError::NoPlatform.into());
    }
    Ok(list)
}

fn has_fp64(d: &Device) -> bool {
    match d.info(DeviceInfo::DoubleFpConfig) {
        Ok(DeviceInfoResult::DoubleFpConfig(flags)) => !flags.is_empty(),
        _ => false,
    }
}

impl Gpu {
    /// Open the device chosen by `spec`.
    pub fn open(spec: &DeviceSpec) -> Result<Self> {
        // some ICDs (PoCL 3.1) can report no devices to a second thread enumerating
        // concurrently during their first initialisation
        static ENUMERATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = ENUMERATE.lock().unwrap_or_else(|e| e.into_inner());
        let plats = platforms()?;
        let pnames: Vec<String> = plats.iter().map(|p| p.name().unwrap_or_default()).collect();
        let platform = pick(&plats, &pnames, spec.platform.as_deref(), "platform")?;
        let devs = Device::list_all(platform).context("cannot list OpenCL devices")?;
        if devs.is_empty() {
            bail!("OpenCL platform {:?} has no devices", platform.name()?);
        }
        let dnames: Vec<String> = devs.iter().map(|d| d.name().unwrap_or_default()).collect();
        let want = spec.wanted(devs.len());
        let device = pick(&devs, &dnames, want.as_deref(), "device")?;
        let index = devs.iter().position(|d| *d == device).unwrap_or(0);
        let context = ocl::Context::builder()
            .platform(platform)
            .devices(device)
            .build()
            .context("cannot create an OpenCL context")?;
        let queue =
            ocl::Queue::new(&context, device, None).context("cannot create an OpenCL queue")?;
        let name = format!("{} / {}", platform.name()?, device.name()?.trim());
        Ok(Self {
            index,
            fp64: has_fp64(&device),
            context,
            queue,
            device,
            name,
        })
    }

    /// Build `source` with the REAL/MAT type definitions for `precision`.
    pub fn program(
        &self,
        source: &str,
        precision: Precision,
        mat_f64: bool,
    ) -> Result<ocl::Program> {
        if (precision == Precision::F64 || mat_f64) && !self.fp64 {
            return Err(DeviceError::NoFp64 {
                device: self.name.clone(),
            }
            .into());
        }
        let real = if precision == Precision::F64 {
            "double"
        } else {
            "float"
        };
        let mat = if mat_f64 { "double" } else { "float" };
        let mut opts = format!("-DREAL={real} -DREAL2={real}2 -DMAT={mat}");
        if precision == Precision::F64 || mat_f64 {
            opts += " -DUSE_FP64";
        }
        ocl::Program::builder()
            .src(source)
            .devices(self.device)
            .cmplr_opt(opts)
            .build(&self.context)
            .with_context(|| format!("OpenCL kernels do not build on {}", self.name))
    }
}

#[cfg(test)]
mod tests;
