//! Compute backends other than the CPU code in [`crate::likelihood`]: OpenCL devices.

pub mod opencl;
