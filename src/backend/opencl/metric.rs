//! The metric products of the OpenCL likelihood: the KL's sample-averaged metric and the
//! sampler's, applied on the device, and CG solves with every vector resident there.

use anyhow::Result;
use ocl::{Buffer, Kernel};

use super::buffers::Real;
use super::model::{zeros_q, Inner, DA, DV};
use super::space::DeviceSpace;
use crate::likelihood::backend::Chain;
use crate::likelihood::mask::Mask;
use crate::likelihood::state::State;
use crate::num::cg::{CgReport, CgSettings};

impl<T: Real> Inner<T> {
    /// Sum of the interleaved pixel partials [Σ s t, Σ t] in chunks on the device.
    pub(super) fn pair_sum(&self) -> Result<[f64; 2]> {
        let nc = self.d.npix.div_ceil(self.pix_chunk);
        let k = self
            .vkernel("pair_partials", nc)
            .arg(self.d.npix as u64)
            .arg(self.pix_chunk as u64)
            .arg(&self.partial)
            .arg(&self.chunk)
            .build()?;
        // SAFETY: `chunk` holds ≥ 2 values per chunk of pixels
        unsafe { k.enq()? };
        let mut h = vec![T::default(); 2 * nc];
        self.chunk.read(&mut h).enq()?;
        let parts: Vec<[f64; 2]> = h
            .chunks(2)
            .map(|c| [c[0].to_f64(), c[1].to_f64()])
            .collect();
        self.global_sum([0.0; 2], &parts)
    }

    /// A vector kernel (no pixel/shell leading arguments).
    pub(super) fn vkernel(&self, name: &str, n: usize) -> ocl::builders::KernelBuilder<'_> {
        let mut kb = Kernel::builder();
        kb.program(&self.prog)
            .name(name)
            .queue(self.queue.clone())
            .global_work_size(n.max(1));
        kb
    }

    pub(super) fn enq(kb: &mut ocl::builders::KernelBuilder<'_>) -> Result<()> {
        let k = kb.build()?;
        // SAFETY: every vector kernel checks its index against the length it is given
        unsafe { k.enq()? };
        Ok(())
    }

    /// Two values of a device vector at `off`.
    pub(super) fn read2(buf: &Buffer<T>, off: usize) -> Result<[f64; 2]> {
        let mut h = [T::default(); 2];
        buf.read(&mut h[..]).offset(off).enq()?;
        Ok([h[0].to_f64(), h[1].to_f64()])
    }

    /// The metric product entirely on the device (see `Model::averaged_metric`; with one
    /// state and `with_sig` false it is `ModelAt::metric`): `out = mask ∘ (1/N) Σ_k J_kᵀ F_k
    /// J_k (mask ∘ v) + v`, plus the ξ_σ part when `with_sig`; without the `+ v` unless
    /// `identity` (`Model::averaged_fisher`). Only four scalars and the chunk sums of the
    /// scale/offset cotangents cross the bus.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn metric_apply(
        &self,
        slots: &[(usize, f64, f64)],
        mask: &Buffer<T>,
        mask_host: &Mask,
        with_sig: bool,
        chain: Chain,
        (v, out): (&Buffer<T>, &Buffer<T>),
        identity: bool,
    ) -> Result<()> {
        let np = mask.len();
        let nxi = np - 2;
        let nst = self.d.nstar;
        Self::enq(
            self.vkernel("mask_mul", np)
                .arg(np as u64)
                .arg(mask)
                .arg(v)
                .arg(&self.vm),
        )?;
        self.vm.copy(&self.icr.xi, None, Some(nxi)).enq()?;
        let lat = Self::read2(&self.vm, nxi)?;
        let vlat = Self::read2(v, nxi)?;
        self.icr.forward()?;
        self.final_field().copy(&self.ds, None, None).enq()?;
        self.final_field().cmd().fill(T::default(), None).enq()?;
        out.cmd().fill(T::default(), None).enq()?;
        let n = slots.len() as f64;
        let (mut g_scl, mut g_off) = (0.0, 0.0);
        for &(i, scl, dscl) in slots {
            let (tscl, toff) = chain.tangent(dscl, lat);
            self.jvp_kernel(i, &self.ds, scl, tscl, toff)?;
            let st = &self.cache[i].1;
            Self::enq(
                self.vkernel("fisher_weigh", nst)
                    .arg(nst as u64)
                    .arg(i32::from(with_sig))
                    .arg(np as u64)
                    .arg(T::from_f64(n))
                    .arg(&st.nsig)
                    .arg(&st.dnsig)
                    .arg(&self.a_err)
                    .arg(&st.var)
                    .arg(v)
                    .arg(&self.star[DA])
                    .arg(&self.star[DV])
                    .arg(out),
            )?;
            self.vjp_kernel(i, (&self.star[DA], &self.star[DV]), scl, 1.0 / n, true)?;
            let [a, b] = chain.cotangent(dscl, self.pair_sum()?);
            g_scl += a;
            g_off += b;
        }
        self.icr.adjoint()?;
        let xi_bar = &self.icr.xi_bar;
        let mut k = self.vkernel(if identity { "combine" } else { "mask_mul" }, nxi);
        k.arg(nxi as u64).arg(mask).arg(xi_bar);
        if identity {
            k.arg(v);
        }
        Self::enq(k.arg(out))?;
        let vlat = if identity { vlat } else { [0.0; 2] };
        let tail = [
            T::from_f64(mask_host.factor(nxi) * g_scl + vlat[0]),
            T::from_f64(mask_host.factor(nxi + 1) * g_off + vlat[1]),
        ];
        out.write(&tail[..]).offset(nxi).enq()?;
        if with_sig && identity {
            Self::enq(
                self.vkernel("add_tail", nst)
                    .arg(nst as u64)
                    .arg(np as u64)
                    .arg(v)
                    .arg(out),
            )?;
        }
        Ok(())
    }

    /// Make `states` resident (growing the cache to hold them) and return (slot, scl, dscl)
    /// per state.
    pub(super) fn resident(&mut self, states: &[&State]) -> Result<Vec<(usize, f64, f64)>> {
        self.reserve(states.len() + 1);
        for st in states {
            self.ensure(st.id, st)?;
        }
        states
            .iter()
            .map(|st| {
                let i = self.cache.iter().position(|(k, _)| *k == st.id);
                let i = i.ok_or_else(|| {
                    anyhow::anyhow!("state {} is not resident on the OpenCL device", st.id)
                })?;
                Ok((i, st.scl, st.dscl))
            })
            .collect()
    }

    /// One metric product's likelihood part from and to the host (the KL's
    /// `averaged_fisher`: no identity part).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fisher_host(
        &mut self,
        states: &[&State],
        mask: &Mask,
        with_sig: bool,
        chain: Chain,
        v: &[f64],
        out: &mut [f64],
    ) -> Result<()> {
        let slots = self.resident(states)?;
        self.upload(&self.mask, &mask.dense(self.mask.len()))?;
        let vb = zeros_q::<T>(&self.queue, v.len())?;
        let ob = zeros_q::<T>(&self.queue, v.len())?;
        self.upload(&vb, v)?;
        self.metric_apply(&slots, &self.mask, mask, with_sig, chain, (&vb, &ob), false)?;
        self.download(&ob, out)
    }

    /// Solve `M x = b` by CG with every vector on the device (M as in [`Self::metric_apply`]);
    /// `x` holds the initial guess. None in single precision or if the states do not fit in
    /// the device cache (the caller then runs CG on the host).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn solve(
        &mut self,
        states: &[&State],
        mask: &Mask,
        with_sig: bool,
        chain: Chain,
        b: &[f64],
        x: &mut [f64],
        settings: &CgSettings,
    ) -> Result<Option<CgReport>> {
        if std::mem::size_of::<T>() < 8 {
            // single-precision CG stalls on this metric (condition numbers reach 1e6): the
            // caller runs CG on the host in f64 over the device's products
            return Ok(None);
        }
        let slots = self.resident(states)?;
        self.upload(&self.mask, &mask.dense(self.mask.len()))?;
        let n = b.len();
        let bb = zeros_q::<T>(&self.queue, n)?;
        let mut xb = zeros_q::<T>(&self.queue, n)?;
        self.upload(&bb, b)?;
        self.upload(&xb, x)?;
        // every caller starts from zero: known here, before the upload (collectively, as
        // CG's every step is)
        let zero_start = self.decomp.all(x.iter().all(|v| *v == 0.0));
        let this = &*self;
        let mut space = DeviceSpace::new(this, n).with_zero_start(zero_start);
        let mut op_err = None;
        let rep = crate::num::cg::solve_in(
            &mut space,
            |v: &Buffer<T>, o: &mut Buffer<T>| {
                let r = this.metric_apply(&slots, &this.mask, mask, with_sig, chain, (v, o), true);
                if let (Err(e), None) = (r, &op_err) {
                    op_err = Some(e);
                }
            },
            &bb,
            &mut xb,
            settings,
        );
        if let Some(e) = op_err.or(space.into_error()) {
            return Err(e.context("OpenCL metric product in CG failed"));
        }
        self.download(&xb, x)?;
        Ok(Some(rep))
    }
}
