//! The likelihood on an OpenCL device: star windows, observations and every buffer the
//! per-pixel kernels need stay resident; states (s, ρΔr, ā, v) are kept in a small cache on
//! the device keyed by [`State::id`], so JVPs and VJPs at a state computed on
//! the device upload nothing but the tangent or cotangent. Host copies of every state are
//! kept complete, so the rest of dust3d sees the same `State` on either backend.

use anyhow::{Context, Result};
use ocl::{Buffer, Kernel, Program, Queue};

use super::buffers::{buffer, Real};
use super::icr::Resident;
use super::Gpu;
use crate::base::precision::Precision;
use crate::likelihood::backend::Traffic;
use crate::likelihood::state::{HostState, StarData, State};
use crate::prior::icr::Icr;

static SOURCE: &str = concat!(
    include_str!("../../../opencl/likelihood.cl"),
    include_str!("../../../opencl/vector.cl")
);

/// Values per dot-product chunk (as in vector.cl and the CPU's `Serial` space).
pub(super) const DOT_CHUNK: usize = 8192;

/// States kept on the device unless a caller reserves more (two per antithetic sample pair
/// of the paper's KL, plus one).
const CACHE: usize = 13;

/// One state on the device.
pub(super) struct DevState<T: Real> {
    pub(super) s: Buffer<T>,
    pub(super) rw: Buffer<T>,
    pub(super) abar: Buffer<T>,
    pub(super) var: Buffer<T>,
    pub(super) nsig: Buffer<T>,
    pub(super) dnsig: Buffer<T>,
}

/// Shapes: pixels, kept shells, chart shells, padding, stars.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) npix: usize,
    pub(super) n: usize,
    pub(super) nc: usize,
    pub(super) pad: usize,
    pub(super) nstar: usize,
}

/// Appending the star-window arguments (offsets, start, entry offsets, prob, frac, spread)
/// that every per-pixel star kernel takes in this order.
trait WindowArgs<'a> {
    fn args_windows(&mut self, w: &'a Windows) -> &mut Self;
}

impl<'a> WindowArgs<'a> for ocl::builders::KernelBuilder<'a> {
    fn args_windows(&mut self, w: &'a Windows) -> &mut Self {
        self.arg(&w.offsets)
            .arg(&w.start)
            .arg(&w.woff)
            .arg(&w.prob)
            .arg(&w.frac)
            .arg(&w.spread)
    }
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
pub(super) struct Inner<T: Real> {
    pub(super) device: String,
    pub(super) queue: Queue,
    pub(super) prog: Program,
    pub(super) icr: Resident<T>,
    pub(super) d: Dims,
    pub(super) widths: Buffer<T>,
    pub(super) a_obs: Buffer<T>,
    pub(super) a_err: Buffer<T>,
    win: Windows,
    pub(super) cum: Buffer<T>,
    pub(super) aux_c: Buffer<T>,
    pub(super) aux_r: Buffer<T>,
    pub(super) ds: Buffer<T>,
    pub(super) partial: Buffer<T>,
    /// The masked tangent (n_params) and the mask.
    pub(super) vm: Buffer<T>,
    pub(super) mask: Buffer<T>,
    /// Chunk sums of reductions.
    pub(super) chunk: Buffer<T>,
    pub(super) star: [Buffer<T>; 6],
    pub(super) cache: Vec<(u64, DevState<T>)>,
    /// States the cache keeps before evicting the oldest.
    pub(super) capacity: usize,
    pub(super) host_a: Vec<f64>,
    /// Pixels per partial sum of pixel reductions (one patch; DOT_CHUNK until set).
    pub(super) pix_chunk: usize,
    /// Patch-ordered dot layouts by vector length: (length, ranges, part offsets, parts).
    pub(super) dot_layouts: Vec<(usize, Buffer<u64>, Buffer<u32>, usize)>,
    /// Whether a star's variance includes σ_a² (`ModelParams::distance_variance`).
    pub(super) distance_variance: bool,
    /// The MPI decomposition: per-patch partial sums are reduced across ranks in patch order.
    pub(super) decomp: std::sync::Arc<crate::sphere::decomp::Decomp>,
}

/// Indices into `Inner::star`.
const XSIG: usize = 0;
const GSIG: usize = 1;
const CA: usize = 2;
const CV: usize = 3;
pub(super) const DA: usize = 4;
pub(super) const DV: usize = 5;

impl<T: Real> Inner<T> {
    pub(super) fn new(
        icr: &Icr,
        data: &StarData,
        widths: &[f64],
        pad: usize,
        gpu: &Gpu,
        precision: Precision,
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
        let star = [(); 6].map(|_| zeros_q::<T>(&q, d.nstar));
        let [a, b, c2, e, f, g] = star;
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
            vm: zeros_q(&q, icr.n_xi() + 2)?,
            mask: zeros_q(&q, icr.n_xi() + 2)?,
            chunk: zeros_q(
                &q,
                2 * (icr.n_xi() + 2 + d.nstar).div_ceil(DOT_CHUNK) + 2 * d.npix.div_ceil(DOT_CHUNK),
            )?,
            star: [a?, b?, c2?, e?, f?, g?],
            cache: Vec::new(),
            capacity: CACHE,
            host_a: Vec::new(),
            distance_variance: true,
            decomp: icr.decomp.clone(),
            pix_chunk: DOT_CHUNK,
            dot_layouts: Vec::new(),
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
            (2 * self.xi_len() + 3 * d.nstar + 3 * d.nstar + 3 * d.npix) * t,
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

    pub(super) fn xi_len(&self) -> usize {
        self.icr.xi.len()
    }

    pub(super) fn kernel(&self, name: &str, n: usize) -> ocl::builders::KernelBuilder<'_> {
        let mut kb = Kernel::builder();
        kb.program(&self.prog)
            .name(name)
            .queue(self.queue.clone())
            .global_work_size(n.max(1));
        kb.arg(self.d.npix as u32).arg(self.d.n as u32);
        kb
    }

    /// Keep at least `n` states on the device (each costs 2 npix·n_r + 4 n_stars values).
    pub(crate) fn reserve(&mut self, n: usize) {
        self.capacity = self.capacity.max(n);
    }

    /// A per-pixel star kernel: (npix, n, nc, pad) then the star windows.
    pub(super) fn star_kernel(&self, name: &str) -> ocl::builders::KernelBuilder<'_> {
        let mut kb = self.kernel(name, self.d.npix);
        kb.arg(self.d.nc as u32)
            .arg(self.d.pad as u32)
            .arg(i32::from(self.distance_variance))
            .args_windows(&self.win);
        kb
    }

    pub(super) fn final_field(&self) -> &Buffer<T> {
        self.icr.fields.last().expect("levels")
    }

    /// A cache slot for state `id` (evicting the oldest), with its buffers.
    fn slot(&mut self, id: u64) -> Result<usize> {
        if let Some(i) = self.cache.iter().position(|(k, _)| *k == id) {
            return Ok(i);
        }
        let d = self.d;
        let st = if self.cache.len() >= self.capacity {
            self.cache.remove(0).1
        } else {
            DevState {
                s: zeros_q(&self.queue, d.npix * d.n)?,
                rw: zeros_q(&self.queue, d.npix * d.n)?,
                abar: zeros_q(&self.queue, d.nstar)?,
                var: zeros_q(&self.queue, d.nstar)?,
                nsig: zeros_q(&self.queue, d.nstar)?,
                dnsig: zeros_q(&self.queue, d.nstar)?,
            }
        };
        self.cache.push((id, st));
        Ok(self.cache.len() - 1)
    }

    pub(super) fn upload(&self, buf: &Buffer<T>, host: &[f64]) -> Result<()> {
        Resident::write(buf, host)
    }

    pub(super) fn download(&self, buf: &Buffer<T>, host: &mut [f64]) -> Result<()> {
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
    pub(super) fn ensure(&mut self, id: u64, host: &State) -> Result<usize> {
        if let Some(i) = self.cache.iter().position(|(k, _)| *k == id) {
            return Ok(i);
        }
        if !host.fields_on_host {
            anyhow::bail!(
                "state {id} left the OpenCL state cache ({} states) and its fields were \
                 never copied to the host",
                self.capacity
            );
        }
        let i = self.slot(id)?;
        let st = &self.cache[i].1;
        self.upload(&st.s, &host.s)?;
        self.upload(&st.rw, &host.rw)?;
        self.upload(&st.abar, &host.abar)?;
        self.upload(&st.var, &host.var)?;
        self.upload(&st.nsig, &host.nsig)?;
        self.upload(&st.dnsig, &host.dnsig)?;
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
        sig: [&[f64]; 2],
        scl: f64,
        off: f64,
        out: &mut HostState<'_>,
    ) -> Result<()> {
        let i = self.slot(id)?;
        self.columns(xi, scl, off, i)?;
        let st = &self.cache[i].1;
        self.upload(&st.nsig, sig[0])?;
        self.upload(&st.dnsig, sig[1])?;
        let k = self
            .kernel("star_state", self.d.npix)
            .arg(i32::from(self.distance_variance))
            .args_windows(&self.win)
            .arg(&self.a_err)
            .arg(&st.nsig)
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
        let st = &self.cache[i].1;
        self.upload(&st.nsig, sig[0])?;
        self.upload(&st.dnsig, sig[1])?;
        self.upload(&self.star[XSIG], sig[2])?;
        let k = self
            .star_kernel("value_grad")
            .arg(&self.a_obs)
            .arg(&self.a_err)
            .arg(&st.nsig)
            .arg(&st.dnsig)
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
        // ā and v come back; s and ρΔr stay on the device, where the KL uses them
        let st = &self.cache[i].1;
        self.download(&st.abar, out.abar)?;
        self.download(&st.var, out.var)?;
        self.sum_partials(3)
    }

    /// Sum the per-pixel partials (`width` per pixel) in pixel order.
    fn sum_partials(&mut self, width: usize) -> Result<[f64; 3]> {
        let mut h = std::mem::take(&mut self.host_a);
        h.resize(width * self.d.npix, 0.0);
        Resident::read(&self.partial, &mut h)?;
        let parts: Vec<[f64; 3]> = h
            .chunks(width * self.pix_chunk)
            .map(|patch| {
                let mut part = [0.0; 3];
                for p in patch.chunks(width) {
                    for (a, v) in part.iter_mut().zip(p) {
                        *a += v;
                    }
                }
                part
            })
            .collect();
        self.host_a = h;
        self.global_sum([0.0; 3], &parts)
    }

    /// `rep` plus the per-patch partials of every rank, in patch order, as the CPU model
    /// reduces (`parts`: one per patch this rank owns).
    pub(super) fn global_sum<const K: usize>(
        &self,
        rep: [f64; K],
        parts: &[[f64; K]],
    ) -> Result<[f64; K]> {
        anyhow::ensure!(
            parts.len() == self.decomp.patches().len(),
            "OpenCL reduction over {} chunks on a rank that owns {} patches",
            parts.len(),
            self.decomp.patches().len()
        );
        Ok(crate::sphere::decomp::reduce(&self.decomp, rep, parts))
    }

    /// Star tangents (δā, δσ_a²) at a state for the chart-field tangent in `field`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn jvp_kernel(
        &self,
        i: usize,
        field: &Buffer<T>,
        scl: f64,
        dscl: f64,
        doff: f64,
    ) -> Result<()> {
        let st = &self.cache[i].1;
        let k = self
            .star_kernel("jvp")
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

    /// Field cotangent of star cotangents `ca`, `cv` at state slot `i` into the final field.
    pub(super) fn vjp_kernel(
        &self,
        i: usize,
        (ca, cv): (&Buffer<T>, &Buffer<T>),
        scl: f64,
        weight: f64,
        accumulate: bool,
    ) -> Result<()> {
        let st = &self.cache[i].1;
        let k = self
            .star_kernel("vjp")
            .arg(T::from_f64(scl))
            .arg(&st.s)
            .arg(&st.rw)
            .arg(&st.abar)
            .arg(ca)
            .arg(cv)
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
        st: &State,
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
        st: &State,
        ca: &[f64],
        cv: &[f64],
        g_xi: &mut [f64],
    ) -> Result<[f64; 2]> {
        let i = self.ensure(st.id, st)?;
        self.upload(&self.star[CA], ca)?;
        self.upload(&self.star[CV], cv)?;
        self.vjp_kernel(i, (&self.star[CA], &self.star[CV]), st.scl, 1.0, false)?;
        self.icr.adjoint()?;
        self.download(&self.icr.xi_bar, g_xi)?;
        self.pair_sum()
    }

    /// Reduce in the CPU model's order: pixel sums per patch of `pix_per_patch` pixels, dot
    /// products of vectors laid out as `layouts` replicated part first, then patch by patch.
    pub fn set_reduction(
        &mut self,
        pix_per_patch: usize,
        layouts: &[&crate::sphere::decomp::VecLayout],
    ) -> Result<()> {
        self.pix_chunk = pix_per_patch.max(1);
        let mut need = 2 * self.d.npix.div_ceil(self.pix_chunk);
        self.dot_layouts.clear();
        for l in layouts {
            let mut seg = Vec::new();
            let mut off = vec![0u32];
            for part in std::iter::once(&l.rep).chain(&l.patch) {
                for r in part {
                    seg.extend([r.start as u64, r.end as u64]);
                }
                off.push((seg.len() / 2) as u32);
            }
            let nparts = off.len() - 1;
            need = need.max(nparts);
            let segs = raw(&self.queue, &seg)?;
            let offs = raw(&self.queue, &off)?;
            self.dot_layouts.push((l.len, segs, offs, nparts));
        }
        if need > self.chunk.len() {
            self.chunk = zeros_q(&self.queue, need)?;
        }
        Ok(())
    }
}

pub(super) fn zeros_q<T: Real>(q: &Queue, len: usize) -> Result<Buffer<T>> {
    Buffer::builder()
        .queue(q.clone())
        .len(len.max(1))
        .fill_val(T::default())
        .build()
        .context("cannot allocate an OpenCL buffer")
}
