//! The ICR prior operator on an OpenCL device: refinement matrices, windows and every
//! level's field stay resident, so a forward or adjoint pass moves nothing over the bus;
//! excitations and fields cross only when the caller uploads or downloads them.

use anyhow::{Context, Result};
use ocl::{Buffer, Kernel};

use super::buffers::{buffer, zeros, Real};
use super::exchange::{DeviceExchange, Staging};
use super::{Gpu, Precision};
use crate::prior::icr::{Icr, Matrices};

static SOURCE: &str = include_str!("../../../opencl/icr.cl");

/// The kernels of one refinement level, bound to their buffers.
struct LevelKernels {
    refine: Kernel,
    adjoint_xi: Kernel,
    adjoint_scatter: Kernel,
    adjoint_gather: Kernel,
    /// How the step is distributed over MPI ranks, and what crosses the bus for it.
    exchange: DeviceExchange,
    /// Global memory bytes each pass reads and writes (matrices, fields, excitations).
    forward_bytes: usize,
    adjoint_bytes: usize,
}

/// What every refinement kernel starts with: program, queue, (npix_c, n_c) arguments.
struct Header<'a> {
    prog: &'a ocl::Program,
    queue: &'a ocl::Queue,
    np: usize,
    n_c: usize,
}

impl<'a> Header<'a> {
    fn build(
        &self,
        name: &str,
        n: usize,
        args: impl FnOnce(&mut ocl::builders::KernelBuilder<'a>),
    ) -> Result<Kernel> {
        let mut kb = Kernel::builder();
        kb.program(self.prog)
            .name(name)
            .queue(self.queue.clone())
            .global_work_size(n);
        kb.arg(self.np as u32).arg(self.n_c as u32);
        args(&mut kb);
        kb.build().with_context(|| format!("kernel {name}"))
    }
}

/// Device-resident state for one arithmetic type.
pub(crate) struct Resident<T: Real> {
    pub(crate) xi: Buffer<T>,
    pub(crate) xi_bar: Buffer<T>,
    pub(crate) fields: Vec<Buffer<T>>,
    level0_forward: Kernel,
    level0_adjoint: Kernel,
    levels: Vec<LevelKernels>,
    n0: usize,
    matrix_bytes: usize,
    /// The adjoint's window chunks (local, then received or all-gathered ones).
    scatter: Buffer<T>,
    /// The device send buffer and host staging of the MPI exchanges.
    staging: Staging<T>,
    /// Buffers the kernels read, kept alive with them.
    _keep: (Vec<LevelStatics>, Buffer<T>),
}

/// A level's geometry and matrices on the device: window, class, reverse map, its offsets,
/// matrices, and the local indices of the rows (forward) and chunks (adjoint) it sends.
struct LevelStatics {
    window: Buffer<u32>,
    class: Buffer<u32>,
    rev: Buffer<u32>,
    rev_off: Buffer<u32>,
    mats: MatBuf,
    halo_send: Buffer<u32>,
    back_send: Buffer<u32>,
}

/// Refinement matrices on the device in their storage precision.
enum MatBuf {
    F64(Buffer<f64>),
    F32(Buffer<f32>),
}

impl MatBuf {
    fn arg<'a>(&'a self, kb: &mut ocl::builders::KernelBuilder<'a>) {
        match self {
            MatBuf::F64(b) => {
                kb.arg(b);
            }
            MatBuf::F32(b) => {
                kb.arg(b);
            }
        }
    }
    fn value_bytes(&self) -> usize {
        match self {
            MatBuf::F64(_) => 8,
            MatBuf::F32(_) => 4,
        }
    }
    fn bytes(&self) -> usize {
        match self {
            MatBuf::F64(b) => b.len() * 8,
            MatBuf::F32(b) => b.len() * 4,
        }
    }
}

/// Every level's geometry and matrices uploaded, with the matrices' bytes on the device.
fn level_statics(icr: &Icr, gpu: &Gpu, mat_f64: bool) -> Result<(Vec<LevelStatics>, usize)> {
    let u32buf = |v: &[u32]| -> Result<Buffer<u32>> {
        let one = [0u32];
        let v = if v.is_empty() { &one[..] } else { v };
        Ok(Buffer::builder()
            .queue(gpu.queue.clone())
            .len(v.len())
            .copy_host_slice(v)
            .build()?)
    };
    let mut bytes = 0;
    let mut statics = Vec::new();
    for lev in &icr.levels {
        let window: Vec<u32> = lev.geom.window.iter().flatten().copied().collect();
        let mats = match (&lev.mats, mat_f64) {
            (Matrices::F64(m), true) => MatBuf::F64(buffer(gpu, m)?),
            (Matrices::F64(m), false) => MatBuf::F32(buffer(
                gpu,
                &m.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            )?),
            (Matrices::F32(m), _) => MatBuf::F32(buffer(gpu, m)?),
        };
        bytes += mats.bytes();
        statics.push(LevelStatics {
            window: u32buf(&window)?,
            class: u32buf(&lev.geom.class)?,
            rev: u32buf(&lev.rev)?,
            rev_off: u32buf(&lev.rev_off)?,
            mats,
            halo_send: u32buf(&lev.ex.halo_send)?,
            back_send: u32buf(&lev.ex.back_send)?,
        });
    }
    Ok((statics, bytes))
}

/// The program, queue and field buffers every level's kernels take.
struct LevelBuffers<'a, T: Real> {
    prog: &'a ocl::Program,
    queue: &'a ocl::Queue,
    xi: &'a Buffer<T>,
    xi_bar: &'a Buffer<T>,
    fields: &'a [Buffer<T>],
    scatter: &'a Buffer<T>,
    staging: &'a Staging<T>,
}

/// The forward and adjoint kernels of refinement level `l` and the bytes they move.
fn level_kernels<T: Real>(
    b: &LevelBuffers<'_, T>,
    l: usize,
    lev: &crate::prior::icr::Level,
    statics: &LevelStatics,
) -> Result<LevelKernels> {
    let ts = std::mem::size_of::<T>();
    let (np, n_c, n_f, ns) = (lev.npix_c(), lev.n_c, lev.n_f, lev.n_c - 2);
    let LevelStatics {
        window,
        class,
        rev,
        rev_off,
        mats,
        halo_send,
        back_send,
    } = statics;
    let (coarse, fine) = (&b.fields[l], &b.fields[l + 1]);
    let hdr = Header {
        prog: b.prog,
        queue: b.queue,
        np,
        n_c,
    };
    let with_rows = |np: usize| Header {
        prog: b.prog,
        queue: b.queue,
        np,
        n_c,
    };
    let refine = hdr.build("refine", np * ns, |kb| {
        kb.arg(n_f as u32).arg(window).arg(class);
        mats.arg(kb);
        kb.arg(coarse).arg(b.xi).arg(lev.xi_off as u64).arg(fine);
    })?;
    let adjoint_xi = hdr.build("refine_adjoint_xi", np * ns, |kb| {
        kb.arg(n_f as u32).arg(class);
        mats.arg(kb);
        kb.arg(fine).arg(b.xi_bar).arg(lev.xi_off as u64);
    })?;
    let adjoint_scatter = hdr.build("refine_adjoint_scatter", np * 9, |kb| {
        kb.arg(n_f as u32).arg(class);
        mats.arg(kb);
        kb.arg(fine).arg(b.scatter);
    })?;
    let n_out = lev.n_cotangent_pixels();
    let adjoint_gather = with_rows(n_out).build("refine_adjoint_gather", n_out * n_c, |kb| {
        kb.arg(rev_off).arg(rev).arg(b.scatter).arg(coarse);
    })?;
    let exchange = DeviceExchange::new(
        (b.prog, b.queue),
        lev,
        (halo_send, back_send),
        (coarse, b.scatter, &b.staging.send),
    )?;
    // per site: its matrix (an upper bound: sites of one class share it), 27 coarse and 8
    // excitation reads, 8 writes, the window; the adjoint reads the matrix twice and writes
    // and rereads the 9-slot scatter rows
    let sites = np * ns;
    let mat = crate::prior::icr::matrices::SITE_LEN * mats.value_bytes();
    Ok(LevelKernels {
        refine,
        adjoint_xi,
        adjoint_scatter,
        adjoint_gather,
        exchange,
        forward_bytes: sites * (mat + (27 + 8 + 8) * ts + 9 * 4),
        adjoint_bytes: sites * (2 * mat + 16 * ts) + 3 * 9 * np * n_c * ts,
    })
}

impl<T: Real> Resident<T> {
    pub(crate) fn new(icr: &Icr, gpu: &Gpu, precision: Precision) -> Result<Self> {
        let mat_f64 = icr
            .levels
            .iter()
            .any(|l| matches!(l.mats, Matrices::F64(_)))
            && precision == Precision::F64;
        let prog = gpu.program(SOURCE, precision, mat_f64)?;
        let c = &icr.chart;
        let conv = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let (l0, n0) = icr.level0_factor_rows();
        let l0_buf = buffer(gpu, &conv(l0))?;
        let xi = zeros::<T>(gpu, icr.n_xi())?;
        let xi_bar = zeros::<T>(gpu, icr.n_xi())?;
        let fields = (0..=c.levels)
            .map(|l| zeros::<T>(gpu, icr.field_len(l)))
            .collect::<Result<Vec<_>>>()?;
        let q = gpu.queue.clone();
        let k0 = |name: &str, a: &Buffer<T>, b: &Buffer<T>| {
            Kernel::builder()
                .program(&prog)
                .name(name)
                .queue(q.clone())
                .global_work_size(n0)
                .arg(n0 as u32)
                .arg(&l0_buf)
                .arg(a)
                .arg(b)
                .build()
                .with_context(|| format!("kernel {name}"))
        };
        let level0_forward = k0("level0_forward", &xi, &fields[0])?;
        let level0_adjoint = k0("level0_adjoint", &fields[0], &xi_bar)?;
        let scatter_len = icr.level_max(|l| l.scatter_len().max(l.gathered_len()));
        let scatter = zeros::<T>(gpu, scatter_len)?;
        let staging = Staging::new(zeros::<T>(gpu, icr.level_max(|l| l.send_len()))?);
        let (statics, mats_bytes) = level_statics(icr, gpu, mat_f64)?;
        let matrix_bytes = l0.len() * std::mem::size_of::<T>() + mats_bytes;
        let bufs = LevelBuffers {
            prog: &prog,
            queue: &q,
            xi: &xi,
            xi_bar: &xi_bar,
            fields: &fields,
            scatter: &scatter,
            staging: &staging,
        };
        let levels = icr
            .levels
            .iter()
            .enumerate()
            .map(|(l, lev)| level_kernels(&bufs, l, lev, &statics[l]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            xi,
            xi_bar,
            fields,
            level0_forward,
            level0_adjoint,
            levels,
            n0,
            matrix_bytes,
            scatter,
            staging,
            _keep: (statics, l0_buf),
        })
    }

    pub(crate) fn forward(&self) -> Result<()> {
        // SAFETY: every kernel's arguments are buffers sized for its global work size
        unsafe { self.level0_forward.enq()? };
        for (l, lev) in self.levels.iter().enumerate() {
            lev.exchange.forward(&self.staging, &self.fields[l])?;
            // SAFETY: as above; the queue is in order, so the halo is in place
            unsafe { lev.refine.enq()? };
        }
        Ok(())
    }

    pub(crate) fn adjoint(&self) -> Result<()> {
        for lev in self.levels.iter().rev() {
            // SAFETY: as in `forward`; the queue is in order, so each level's gather
            // finishes before the next coarser level reads its field
            unsafe {
                lev.adjoint_xi.enq()?;
                lev.adjoint_scatter.enq()?;
            }
            lev.exchange.adjoint(&self.staging, &self.scatter)?;
            // SAFETY: as above
            unsafe { lev.adjoint_gather.enq()? };
        }
        // SAFETY: as above
        unsafe { self.level0_adjoint.enq()? };
        Ok(())
    }

    /// Bytes accessed by one forward and one adjoint pass (see [`GpuIcr::traffic_bytes`]).
    pub(crate) fn traffic_bytes(&self) -> (usize, usize) {
        let ts = std::mem::size_of::<T>();
        let l0 = self.n0 * (self.n0 + 1) / 2 * ts;
        (
            l0 + self.levels.iter().map(|l| l.forward_bytes).sum::<usize>(),
            l0 + self.levels.iter().map(|l| l.adjoint_bytes).sum::<usize>(),
        )
    }

    pub(crate) fn write(buf: &Buffer<T>, host: &[f64]) -> Result<()> {
        let v: Vec<T> = host.iter().map(|&x| T::from_f64(x)).collect();
        buf.write(&v).enq()?;
        Ok(())
    }

    pub(crate) fn read(buf: &Buffer<T>, host: &mut [f64]) -> Result<()> {
        let mut v = vec![T::default(); host.len()];
        buf.read(&mut v).enq()?;
        for (h, x) in host.iter_mut().zip(v) {
            *h = x.to_f64();
        }
        Ok(())
    }
}

enum AnyResident {
    F64(Resident<f64>),
    F32(Resident<f32>),
}

/// ICR forward and adjoint on an OpenCL device.
pub struct GpuIcr {
    state: AnyResident,
    queue: ocl::Queue,
    n_xi: usize,
    n_field: usize,
    /// Device name.
    pub device: String,
}

macro_rules! on {
    ($self:expr, $r:ident => $body:expr) => {
        match &$self.state {
            AnyResident::F64($r) => $body,
            AnyResident::F32($r) => $body,
        }
    };
}

impl GpuIcr {
    /// Upload `icr`'s matrices and allocate every level's field on `gpu`.
    pub fn new(icr: &Icr, gpu: &Gpu, precision: Precision) -> Result<Self> {
        let state = match precision {
            Precision::F64 => AnyResident::F64(Resident::new(icr, gpu, precision)?),
            Precision::F32 => AnyResident::F32(Resident::new(icr, gpu, precision)?),
        };
        Ok(Self {
            state,
            queue: gpu.queue.clone(),
            n_xi: icr.n_xi(),
            n_field: icr.n_field(),
            device: gpu.name.clone(),
        })
    }

    /// Copy excitations to the device.
    pub fn upload_xi(&self, xi: &[f64]) -> Result<()> {
        assert_eq!(xi.len(), self.n_xi);
        on!(self, r => Resident::write(&r.xi, xi))
    }

    /// Copy a final-level cotangent to the device.
    pub fn upload_field_bar(&self, s_bar: &[f64]) -> Result<()> {
        assert_eq!(s_bar.len(), self.n_field);
        on!(self, r => Resident::write(r.fields.last().expect("levels"), s_bar))
    }

    /// `s = S ξ` on the device (enqueued; reads block until done).
    pub fn forward(&self) -> Result<()> {
        on!(self, r => r.forward())
    }

    /// `ξ̄ = Sᵀ s̄` on the device; overwrites the final field buffer's coarser levels.
    pub fn adjoint(&self) -> Result<()> {
        on!(self, r => r.adjoint())
    }

    /// Copy the final field to the host.
    pub fn download_field(&self, out: &mut [f64]) -> Result<()> {
        on!(self, r => Resident::read(r.fields.last().expect("levels"), out))
    }

    /// Copy ξ̄ to the host.
    pub fn download_xi_bar(&self, out: &mut [f64]) -> Result<()> {
        on!(self, r => Resident::read(&r.xi_bar, out))
    }

    /// Wait for everything enqueued.
    pub fn finish(&self) -> Result<()> {
        self.queue.finish()?;
        Ok(())
    }

    /// `S ξ` from and to the host.
    pub fn forward_host(&self, xi: &[f64]) -> Result<Vec<f64>> {
        self.upload_xi(xi)?;
        self.forward()?;
        let mut s = vec![0.0; self.n_field];
        self.download_field(&mut s)?;
        Ok(s)
    }

    /// `Sᵀ s̄` from and to the host.
    pub fn adjoint_host(&self, s_bar: &[f64]) -> Result<Vec<f64>> {
        self.upload_field_bar(s_bar)?;
        self.adjoint()?;
        let mut x = vec![0.0; self.n_xi];
        self.download_xi_bar(&mut x)?;
        Ok(x)
    }

    /// Estimated global-memory bytes read and written by one forward and one adjoint pass.
    pub fn traffic_bytes(&self) -> (usize, usize) {
        on!(self, r => r.traffic_bytes())
    }

    /// Bytes of matrices resident on the device.
    pub fn matrix_bytes(&self) -> usize {
        on!(self, r => r.matrix_bytes)
    }
}
