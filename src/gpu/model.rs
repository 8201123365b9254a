//! The likelihood on an OpenCL device: star windows, observations and every buffer the
//! per-pixel kernels need stay resident; states (s, ρΔr, ā, v) are kept in a small cache on
//! the device keyed by [`crate::model::State::id`], so JVPs and VJPs at a state computed on
//! the device upload nothing but the tangent or cotangent. Host copies of every state are
//! kept complete, so the rest of dust3d sees the same `State` on either backend.

use anyhow::{Context, Result};
use ocl::{Buffer, Kernel, Program, Queue};

use super::icr::{buffer, Real, Resident};
use super::{Gpu, GpuPrecision};
use crate::icr::Icr;
use crate::model::StarData;

static SOURCE: &str = include_str!("../../opencl/likelihood.cl");

/// States kept on the device (two per antithetic sample pair of a typical KL, plus one).
const CACHE: usize = 13;

/// One state on the device.
struct DevState<T: Real> {
    s: Buffer<T>,
    rw: Buffer<T>,
    abar: Buffer<T>,
    var: Buffer<T>,
}

/// Shapes: pixels, kept shells, chart shells, padding, stars.
#[derive(Clone, Copy)]
struct Dims {
    npix: usize,
    n: usize,
    nc: usize,
    pad: usize,
    nstar: usize,
}

/// Star windows on the device.
struct Windows {
    offsets: Buffer<u64>,
    start: Buffer<u32>,
    woff: Buffer<u64>,
    prob: Buffer<f32>,
    frac: Buffer<u16>,
    spread: Buffer<u16>,
}

fn raw<P: ocl::OclPrm>(q: &Queue, v: &[P]) -> Result<Buffer<P>> {
    let one = [P::default()];
    let v = if v.is_empty() { &one[..] } else { v };
    Buffer::builder()
        .queue(q.clone())
        .len(v.len())
        .copy_host_slice(v)
        .build()
        .context("cannot allocate an OpenCL buffer")
}

/// Device state and kernels for one arithmetic type.
pub struct Inner<T: Real> {
    device: String,
    queue: Queue,
    prog: Program,
    icr: Resident<T>,
    d: Dims,
    widths: Buffer<T>,
    a_obs: Buffer<T>,
    a_err: Buffer<T>,
    win: Windows,
    cum: Buffer<T>,
    aux_c: Buffer<T>,
    aux_r: Buffer<T>,
    ds: Buffer<T>,
    partial: Buffer<T>,
    star: [Buffer<T>; 8],
    cache: Vec<(u64, DevState<T>)>,
    host_a: Vec<f64>,
}

/// Indices into `Inner::star`.
const NSIG: usize = 0;
const DNSIG: usize = 1;
const XSIG: usize = 2;
const GSIG: usize = 3;
const CA: usize = 4;
const CV: usize = 5;
const DA: usize = 6;
const DV: usize = 7;

/// Estimated bytes of one call: (device global-memory bytes accessed, host↔device bytes).
#[derive(Clone, Debug)]
pub struct Traffic {
    /// Device name.
    pub device: String,
    /// `value_grad`.
    pub value_grad: (usize, usize),
    /// `metric` (one JVP and one VJP with their ICR passes).
    pub metric: (usize, usize),
}

/// The Fisher weighting of state k's star tangents, in place (δā, δv).
pub type Weigh<'a> = dyn FnMut(usize, &mut [f64], &mut [f64]) + 'a;

/// Host views of a state's arrays, filled from the device.
pub struct HostState<'a> {
    /// Log-density on the kept shells.
    pub s: &'a mut [f64],
    /// ρΔr.
    pub rw: &'a mut [f64],
    /// ā per star.
    pub abar: &'a mut [f64],
    /// v per star.
    pub var: &'a mut [f64],
}

impl<T: Real> Inner<T> {
    fn new(
        icr: &Icr,
        data: &StarData,
        widths: &[f64],
        pad: usize,
        gpu: &Gpu,
        precision: GpuPrecision,
    ) -> Result<Self> {
        let prog = gpu.program(SOURCE, precision, false)?;
        let q = gpu.queue.clone();
        let c = &icr.chart;
        let d = Dims {
            npix: data.offsets.len() - 1,
            n: widths.len(),
            nc: c.n_r(c.levels),
            pad,
            nstar: data.len(),
        };
        let conv = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let w = &data.windows;
        let offsets: Vec<u64> = data.offsets.iter().map(|&o| o as u64).collect();
        let woff: Vec<u64> = w.offset.iter().map(|&o| o as u64).collect();
        let win = Windows {
            offsets: raw(&q, &offsets)?,
            start: raw(&q, &w.start)?,
            woff: raw(&q, &woff)?,
            prob: raw(&q, &w.prob)?,
            frac: raw(&q, &w.frac)?,
            spread: raw(&q, &w.spread)?,
        };
        let star = [(); 8].map(|_| zeros_q::<T>(&q, d.nstar));
        let [a, b, c2, e, f, g, h, i] = star;
        Ok(Self {
            icr: Resident::new(icr, gpu, precision)?,
            widths: buffer(gpu, &conv(widths))?,
            a_obs: buffer(gpu, &conv(&data.a_obs))?,
            a_err: buffer(gpu, &conv(&data.a_err))?,
            win,
            cum: zeros_q(&q, d.npix * (d.n + 1))?,
            aux_c: zeros_q(&q, d.npix * (d.n + 1))?,
            aux_r: zeros_q(&q, d.npix * d.n)?,
            ds: zeros_q(&q, d.npix * d.nc)?,
            partial: zeros_q(&q, 3 * d.npix)?,
            star: [a?, b?, c2?, e?, f?, g?, h?, i?],
            cache: Vec::new(),
            host_a: Vec::new(),
            device: gpu.name.clone(),
            queue: q,
            prog,
            d,
        })
    }

    /// Bytes per call (see [`Traffic`]): windows are read once per star pass (8 bytes per
    /// entry), columns and their scratch a few times per pass, plus the ICR passes.
    pub(crate) fn traffic(&self) -> Traffic {
        let d = self.d;
        let t = std::mem::size_of::<T>();
        let win = self.win.prob.len() * 8;
        let col = d.npix * d.n * t;
        let star = d.nstar * t;
        let (icr_f, icr_a) = self.icr.traffic_bytes();
        let value_grad = (
            icr_f + icr_a + 2 * win + 12 * col + 12 * star + d.npix * d.nc * t,
            (2 * self.xi_len() + 3 * d.nstar + 3 * d.nstar + 2 * d.npix * d.n + 3 * d.npix) * t,
        );
        let metric = (
            icr_f + icr_a + 2 * win + 14 * col + 8 * star + 2 * d.npix * d.nc * t,
            (2 * self.xi_len() + 4 * d.nstar + 2 * d.npix) * t,
        );
        Traffic {
            device: self.device.clone(),
            value_grad,
            metric,
        }
    }

    fn xi_len(&self) -> usize {
        self.icr.xi.len()
    }

    fn kernel(&self, name: &str, n: usize) -> ocl::builders::KernelBuilder<'_> {
        let mut kb = Kernel::builder();
        kb.program(&self.prog)
            .name(name)
            .queue(self.queue.clone())
            .global_work_size(n.max(1));
        kb.arg(self.d.npix as u32).arg(self.d.n as u32);
        kb
    }

    fn final_field(&self) -> &Buffer<T> {
        self.icr.fields.last().expect("levels")
    }

    /// A cache slot for state `id` (evicting the oldest), with its buffers.
    fn slot(&mut self, id: u64) -> Result<usize> {
        if let Some(i) = self.cache.iter().position(|(k, _)| *k == id) {
            return Ok(i);
        }
        let d = self.d;
        let st = if self.cache.len() >= CACHE {
            self.cache.remove(0).1
        } else {
            DevState {
                s: zeros_q(&self.queue, d.npix * d.n)?,
                rw: zeros_q(&self.queue, d.npix * d.n)?,
                abar: zeros_q(&self.queue, d.nstar)?,
                var: zeros_q(&self.queue, d.nstar)?,
            }
        };
        self.cache.push((id, st));
        Ok(self.cache.len() - 1)
    }

    fn upload(&self, buf: &Buffer<T>, host: &[f64]) -> Result<()> {
        Resident::write(buf, host)
    }

    fn download(&self, buf: &Buffer<T>, host: &mut [f64]) -> Result<()> {
        Resident::read(buf, host)
    }

    /// Run the ICR forward of `xi` and the exp/scale stage into cache slot `i`.
    fn columns(&mut self, xi: &[f64], scl: f64, off: f64, i: usize) -> Result<()> {
        self.upload(&self.icr.xi, xi)?;
        self.icr.forward()?;
        let d = self.d;
        let st = &self.cache[i].1;
        let k = self
            .kernel("columns", d.npix * d.n)
            .arg(d.nc as u32)
            .arg(d.pad as u32)
            .arg(&self.widths)
            .arg(self.final_field())
            .arg(T::from_f64(scl))
            .arg(T::from_f64(off))
            .arg(&st.s)
            .arg(&st.rw)
            .build()?;
        // SAFETY: buffers are sized npix·n (s, rw), npix·nc (field), n (widths)
        unsafe { k.enq()? };
        Ok(())
    }

    /// Make state `id` resident, uploading the host copy if the cache lost it.
    fn ensure(&mut self, id: u64, host: &crate::model::State) -> Result<usize> {
        if let Some(i) = self.cache.iter().position(|(k, _)| *k == id) {
            return Ok(i);
        }
        let i = self.slot(id)?;
        let st = &self.cache[i].1;
        self.upload(&st.s, &host.s)?;
        self.upload(&st.rw, &host.rw)?;
        self.upload(&st.abar, &host.abar)?;
        self.upload(&st.var, &host.var)?;
        Ok(i)
    }

    fn download_state(&self, i: usize, out: &mut HostState<'_>) -> Result<()> {
        let st = &self.cache[i].1;
        self.download(&st.s, out.s)?;
        self.download(&st.rw, out.rw)?;
        self.download(&st.abar, out.abar)?;
        self.download(&st.var, out.var)
    }

    /// Evaluate a state: ICR forward, exp/scale, moments of every star.
    pub(crate) fn state(
        &mut self,
        id: u64,
        xi: &[f64],
        nsig: &[f64],
        scl: f64,
        off: f64,
        out: &mut HostState<'_>,
    ) -> Result<()> {
        let i = self.slot(id)?;
        self.columns(xi, scl, off, i)?;
        self.upload(&self.star[NSIG], nsig)?;
        let st = &self.cache[i].1;
        let k = self
            .kernel("star_state", self.d.npix)
            .arg(&self.win.offsets)
            .arg(&self.win.start)
            .arg(&self.win.woff)
            .arg(&self.win.prob)
            .arg(&self.win.frac)
            .arg(&self.win.spread)
            .arg(&self.a_err)
            .arg(&self.star[NSIG])
            .arg(&st.rw)
            .arg(&self.cum)
            .arg(&st.abar)
            .arg(&st.var)
            .build()?;
        // SAFETY: per-pixel work-items touch their own star range and column scratch
        unsafe { k.enq()? };
        self.download_state(i, out)
    }

    /// Energy partials and gradient: fills the state, `gsig`, `gx_xi` (ICR part, no prior)
    /// and returns the pixel partials [energy, Σ s t, Σ t] summed in pixel order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn value_grad(
        &mut self,
        id: u64,
        xi: &[f64],
        sig: [&[f64]; 3],
        infer_nsigma: bool,
        (scl, off): (f64, f64),
        out: &mut HostState<'_>,
        gsig: &mut [f64],
        gx_xi: &mut [f64],
    ) -> Result<[f64; 3]> {
        let i = self.slot(id)?;
        self.columns(xi, scl, off, i)?;
        for (b, h) in [NSIG, DNSIG, XSIG].into_iter().zip(sig) {
            self.upload(&self.star[b], h)?;
        }
        let d = self.d;
        let st = &self.cache[i].1;
        let k = self
            .kernel("value_grad", d.npix)
            .arg(d.nc as u32)
            .arg(d.pad as u32)
            .arg(&self.win.offsets)
            .arg(&self.win.start)
            .arg(&self.win.woff)
            .arg(&self.win.prob)
            .arg(&self.win.frac)
            .arg(&self.win.spread)
            .arg(&self.a_obs)
            .arg(&self.a_err)
            .arg(&self.star[NSIG])
            .arg(&self.star[DNSIG])
            .arg(&self.star[XSIG])
            .arg(i32::from(infer_nsigma))
            .arg(T::from_f64(scl))
            .arg(&st.s)
            .arg(&st.rw)
            .arg(&self.cum)
            .arg(&self.aux_c)
            .arg(&self.aux_r)
            .arg(&st.abar)
            .arg(&st.var)
            .arg(&self.star[GSIG])
            .arg(self.final_field())
            .arg(&self.partial)
            .build()?;
        // SAFETY: as in `state`; the field cotangent goes to the final ICR field buffer
        unsafe { k.enq()? };
        self.icr.adjoint()?;
        self.download(&self.icr.xi_bar, gx_xi)?;
        self.download(&self.star[GSIG], gsig)?;
        self.download_state(i, out)?;
        self.sum_partials(3)
    }

    /// Sum the per-pixel partials (`width` per pixel) in pixel order.
    fn sum_partials(&mut self, width: usize) -> Result<[f64; 3]> {
        let mut h = std::mem::take(&mut self.host_a);
        h.resize(width * self.d.npix, 0.0);
        Resident::read(&self.partial, &mut h)?;
        let mut acc = [0.0; 3];
        for p in h.chunks(width) {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += v;
            }
        }
        self.host_a = h;
        Ok(acc)
    }

    /// Star tangents (δā, δσ_a²) at a state for the chart-field tangent in `field`.
    #[allow(clippy::too_many_arguments)]
    fn jvp_kernel(
        &self,
        i: usize,
        field: &Buffer<T>,
        scl: f64,
        dscl: f64,
        doff: f64,
    ) -> Result<()> {
        let d = self.d;
        let st = &self.cache[i].1;
        let k = self
            .kernel("jvp", d.npix)
            .arg(d.nc as u32)
            .arg(d.pad as u32)
            .arg(&self.win.offsets)
            .arg(&self.win.start)
            .arg(&self.win.woff)
            .arg(&self.win.prob)
            .arg(&self.win.frac)
            .arg(&self.win.spread)
            .arg(T::from_f64(scl))
            .arg(T::from_f64(dscl))
            .arg(T::from_f64(doff))
            .arg(&st.s)
            .arg(&st.rw)
            .arg(&st.abar)
            .arg(field)
            .arg(&self.aux_r)
            .arg(&self.cum)
            .arg(&self.aux_c)
            .arg(&self.star[DA])
            .arg(&self.star[DV])
            .build()?;
        // SAFETY: as in `state`
        unsafe { k.enq()? };
        Ok(())
    }

    /// Field cotangent of star cotangents in CA/CV at state slot `i` into the final field.
    fn vjp_kernel(&self, i: usize, scl: f64, weight: f64, accumulate: bool) -> Result<()> {
        let d = self.d;
        let st = &self.cache[i].1;
        let k = self
            .kernel("vjp", d.npix)
            .arg(d.nc as u32)
            .arg(d.pad as u32)
            .arg(&self.win.offsets)
            .arg(&self.win.start)
            .arg(&self.win.woff)
            .arg(&self.win.prob)
            .arg(&self.win.frac)
            .arg(&self.win.spread)
            .arg(T::from_f64(scl))
            .arg(&st.s)
            .arg(&st.rw)
            .arg(&st.abar)
            .arg(&self.star[CA])
            .arg(&self.star[CV])
            .arg(T::from_f64(weight))
            .arg(i32::from(accumulate))
            .arg(&self.cum)
            .arg(&self.aux_c)
            .arg(&self.aux_r)
            .arg(self.final_field())
            .arg(&self.partial)
            .build()?;
        // SAFETY: as in `state`
        unsafe { k.enq()? };
        Ok(())
    }

    /// JVP at a state: `dxi` the ICR tangent, `dscl`, `doff` the value tangents.
    pub(crate) fn jvp(
        &mut self,
        st: &crate::model::State,
        dxi: &[f64],
        dscl: f64,
        doff: f64,
        da: &mut [f64],
        dv: &mut [f64],
    ) -> Result<()> {
        let i = self.ensure(st.id, st)?;
        self.upload(&self.icr.xi, dxi)?;
        self.icr.forward()?;
        self.jvp_kernel(i, self.final_field(), st.scl, dscl, doff)?;
        self.download(&self.star[DA], da)?;
        self.download(&self.star[DV], dv)
    }

    /// VJP at a state: writes the ICR part of `Jᵀ c` to `g_xi`, returns [Σ s t, Σ t].
    pub(crate) fn vjp(
        &mut self,
        st: &crate::model::State,
        ca: &[f64],
        cv: &[f64],
        g_xi: &mut [f64],
    ) -> Result<[f64; 2]> {
        let i = self.ensure(st.id, st)?;
        self.upload(&self.star[CA], ca)?;
        self.upload(&self.star[CV], cv)?;
        self.vjp_kernel(i, st.scl, 1.0, false)?;
        self.icr.adjoint()?;
        self.download(&self.icr.xi_bar, g_xi)?;
        let s = self.sum_partials(2)?;
        Ok([s[0], s[1]])
    }

    /// The sample-averaged metric's device part: one ICR forward of the masked tangent,
    /// per state a JVP, the Fisher weighting by `weigh` on the host, a weighted VJP
    /// accumulated into one field, then one ICR adjoint into `out_xi`. Returns the summed
    /// [Σ s t, Σ t] per state.
    pub(crate) fn averaged_metric(
        &mut self,
        states: &[crate::model::State],
        dxi: &[f64],
        dlatent: [f64; 2],
        offset_std: f64,
        weigh: &mut Weigh<'_>,
        out_xi: &mut [f64],
    ) -> Result<Vec<[f64; 2]>> {
        self.upload(&self.icr.xi, dxi)?;
        self.icr.forward()?;
        self.final_field().copy(&self.ds, None, None).enq()?;
        self.final_field().cmd().fill(T::default(), None).enq()?;
        let n = states.len() as f64;
        let (mut da, mut dv) = (vec![0.0; self.d.nstar], vec![0.0; self.d.nstar]);
        let mut scalars = Vec::with_capacity(states.len());
        for (k, st) in states.iter().enumerate() {
            let i = self.ensure(st.id, st)?;
            let dscl = st.dscl * dlatent[0];
            let doff = offset_std * dlatent[1];
            self.jvp_kernel(i, &self.ds, st.scl, dscl, doff)?;
            self.download(&self.star[DA], &mut da)?;
            self.download(&self.star[DV], &mut dv)?;
            weigh(k, &mut da, &mut dv);
            self.upload(&self.star[CA], &da)?;
            self.upload(&self.star[CV], &dv)?;
            self.vjp_kernel(i, st.scl, 1.0 / n, true)?;
            let s = self.sum_partials(2)?;
            scalars.push([s[0], s[1]]);
        }
        self.icr.adjoint()?;
        self.download(&self.icr.xi_bar, out_xi)?;
        Ok(scalars)
    }
}

fn zeros_q<T: Real>(q: &Queue, len: usize) -> Result<Buffer<T>> {
    Buffer::builder()
        .queue(q.clone())
        .len(len.max(1))
        .fill_val(T::default())
        .build()
        .context("cannot allocate an OpenCL buffer")
}

/// The likelihood on a device, in the precision chosen at construction.
pub enum GpuModel {
    /// Double precision.
    F64(Inner<f64>),
    /// Single precision.
    F32(Inner<f32>),
}

impl GpuModel {
    /// Upload the model's data and ICR to the device chosen by `spec`.
    pub fn new(
        icr: &Icr,
        data: &StarData,
        widths: &[f64],
        pad: usize,
        gpu: &Gpu,
        precision: GpuPrecision,
    ) -> Result<Self> {
        Ok(match precision {
            GpuPrecision::F64 => GpuModel::F64(Inner::new(icr, data, widths, pad, gpu, precision)?),
            GpuPrecision::F32 => GpuModel::F32(Inner::new(icr, data, widths, pad, gpu, precision)?),
        })
    }
}

/// Dispatch a method call to the precision variant.
#[macro_export]
#[doc(hidden)]
macro_rules! on_gpu_model {
    ($m:expr, $i:ident => $body:expr) => {
        match $m {
            $crate::gpu::model::GpuModel::F64($i) => $body,
            $crate::gpu::model::GpuModel::F32($i) => $body,
        }
    };
}
