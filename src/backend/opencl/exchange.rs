//! The MPI exchanges of the distributed ICR on a device (`prior::icr::exchange` plans them):
//! a halo step packs on the device exactly the coarse rows other ranks need, downloads them,
//! exchanges them and writes what arrives after the rank's own rows; the adjoint returns
//! window chunks the same way; a gathered step all-gathers the chunks as on the CPU. Only
//! those values cross the bus.

use anyhow::{Context, Result};
use ocl::{Buffer, Kernel};

use super::buffers::Real;
use crate::base::comm;
use crate::prior::icr::exchange::StepKind;
use crate::prior::icr::Level;

/// The device send buffer and the host staging of every exchange, kept between calls so an
/// ICR pass allocates nothing: values as the device holds them, and in f64 sent and received.
pub(super) struct Staging<T: Real> {
    pub(super) send: Buffer<T>,
    host: std::sync::Mutex<HostBuffers<T>>,
}

#[derive(Default)]
struct HostBuffers<T> {
    device: Vec<T>,
    sent: Vec<f64>,
    received: Vec<f64>,
}

impl<T: Real> HostBuffers<T> {
    /// Read the first `n` values of `buf` into `sent` (through `device`).
    fn download(&mut self, buf: &Buffer<T>, n: usize) -> Result<()> {
        self.device.resize(n, T::default());
        if n > 0 {
            buf.read(&mut self.device[..]).enq()?;
        }
        self.sent.clear();
        self.sent.extend(self.device.iter().map(|v| v.to_f64()));
        Ok(())
    }

    /// Write `received` into `buf` from value `at` on (through `device`).
    fn upload(&mut self, buf: &Buffer<T>, at: usize) -> Result<()> {
        if self.received.is_empty() {
            return Ok(());
        }
        self.device.clear();
        self.device
            .extend(self.received.iter().map(|&x| T::from_f64(x)));
        buf.write(&self.device[..]).offset(at).enq()?;
        Ok(())
    }
}

impl<T: Real> Staging<T> {
    /// Staging around a device send buffer large enough for every level's packed values.
    pub(super) fn new(send: Buffer<T>) -> Self {
        Self {
            send,
            host: Default::default(),
        }
    }

    /// Pack with `pack`, exchange with every rank (`send`/`recv` values per rank) and write
    /// what arrives into `dst` from value `at` on.
    fn exchange(
        &self,
        pack: &Kernel,
        (send, recv): (&[usize], &[usize]),
        dst: &Buffer<T>,
        at: usize,
    ) -> Result<()> {
        let mut h = self.host.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the pack kernel reads the rows its index buffer names and writes `send`
        unsafe { pack.enq()? };
        h.download(&self.send, send.iter().sum())?;
        let h = &mut *h;
        h.received.resize(recv.iter().sum(), 0.0);
        comm::all_to_all_into(&h.sent, send, recv, &mut h.received);
        h.upload(dst, at)
    }

    /// A gathered step's adjoint: every rank's first `n_local` values of `scatter` (its
    /// window chunks), in rank order (`counts`), replace the local ones there.
    fn all_gather(&self, scatter: &Buffer<T>, n_local: usize, counts: &[usize]) -> Result<()> {
        let mut h = self.host.lock().unwrap_or_else(|e| e.into_inner());
        h.download(scatter, n_local)?;
        let h = &mut *h;
        h.received.resize(counts.iter().sum(), 0.0);
        comm::all_gather_into(&h.sent, counts, &mut h.received);
        h.upload(scatter, 0)
    }
}

/// One refinement step's exchanges.
pub(super) struct DeviceExchange {
    kind: StepKind,
    /// Values of this rank's coarse rows (owned pixels × n_c), after which the halo lands.
    n_own: usize,
    /// Values of this rank's window chunks (9 per refined pixel × n_c).
    n_local: usize,
    /// Forward: packs the coarse rows other ranks need into the send buffer.
    pack_halo: Option<Kernel>,
    /// Adjoint: packs the window chunks of foreign coarse pixels into the send buffer.
    pack_back: Option<Kernel>,
    halo_counts: (Vec<usize>, Vec<usize>),
    back_counts: (Vec<usize>, Vec<usize>),
    gather_counts: Vec<usize>,
}

impl DeviceExchange {
    /// The exchanges of `lev` with its send lists on the device (`halo_send`, `back_send`)
    /// and the buffers they read and write: the coarse field, the adjoint's window chunks
    /// and the send buffer.
    pub(super) fn new<T: Real>(
        (prog, queue): (&ocl::Program, &ocl::Queue),
        lev: &Level,
        (halo_send, back_send): (&Buffer<u32>, &Buffer<u32>),
        (coarse, scatter, send): (&Buffer<T>, &Buffer<T>, &Buffer<T>),
    ) -> Result<Self> {
        let n_c = lev.n_c;
        let pack = |rows: usize, idx: &Buffer<u32>, src: &Buffer<T>| -> Result<Option<Kernel>> {
            if lev.kind != StepKind::Halo {
                return Ok(None);
            }
            let k = Kernel::builder()
                .program(prog)
                .name("pack_rows")
                .queue(queue.clone())
                // a rank may have nothing to pack; the kernel checks its bound
                .global_work_size((rows * n_c).max(1))
                .arg(rows as u32)
                .arg(n_c as u32)
                .arg(idx)
                .arg(src)
                .arg(send)
                .build()
                .context("kernel pack_rows")?;
            Ok(Some(k))
        };
        let (hs, hr) = lev.halo_counts();
        let (bs, br) = lev.back_counts();
        Ok(Self {
            kind: lev.kind,
            n_own: lev.npix_c() * n_c,
            n_local: 9 * lev.npix_c() * n_c,
            pack_halo: pack(lev.ex.halo_send.len(), halo_send, coarse)?,
            pack_back: pack(lev.ex.back_send.len(), back_send, scatter)?,
            halo_counts: (hs.to_vec(), hr.to_vec()),
            back_counts: (bs.to_vec(), br.to_vec()),
            gather_counts: lev.gather_counts().to_vec(),
        })
    }

    /// Before the refinement: the halo rows of `coarse` from their owners (halo steps).
    pub(super) fn forward<T: Real>(&self, io: &Staging<T>, coarse: &Buffer<T>) -> Result<()> {
        match &self.pack_halo {
            Some(pack) => {
                let (s, r) = &self.halo_counts;
                io.exchange(pack, (s, r), coarse, self.n_own)
            }
            None => Ok(()),
        }
    }

    /// Between the adjoint's scatter and gather: foreign chunks of `scatter` to their owners
    /// (halo steps), or every rank's chunks in rank order (gathered steps).
    pub(super) fn adjoint<T: Real>(&self, io: &Staging<T>, scatter: &Buffer<T>) -> Result<()> {
        match (self.kind, &self.pack_back) {
            (StepKind::Halo, Some(pack)) => {
                let (s, r) = &self.back_counts;
                io.exchange(pack, (s, r), scatter, self.n_local)
            }
            (StepKind::Gathered, _) => io.all_gather(scatter, self.n_local, &self.gather_counts),
            _ => Ok(()),
        }
    }
}
