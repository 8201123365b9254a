//! The OpenCL likelihood behind the [`Backend`] interface, and [`attach`], which moves a
//! model onto a device.

use anyhow::Result;

use super::buffers::Real;
use super::model::Inner;
use super::Gpu;
use crate::base::comm;
use crate::base::precision::Precision;
use crate::likelihood::backend::{Backend, Traffic};
use crate::likelihood::core::{ModelCore, ModelWork};
use crate::likelihood::mask::Mask;
use crate::likelihood::model::Model;
use crate::likelihood::state::State;
use crate::num::cg::{CgReport, CgSettings};

/// The likelihood on an OpenCL device in arithmetic `T`, behind the [`Backend`] interface.
pub struct OpenCl<T: Real> {
    inner: std::sync::Mutex<Inner<T>>,
    name: String,
}

impl<T: Real> OpenCl<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        // every method either completes or returns an error, so a panic elsewhere cannot
        // leave the device state half-written
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Real> Backend for OpenCl<T> {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn state(&self, _m: &ModelCore, xi: &[f64], st: &mut State, _w: &mut ModelWork) -> Result<()> {
        st.fields_on_host = true;
        let (scl, off) = (st.scl, st.off);
        let (id, mut out, sig) = st.device_parts();
        self.lock().state(id, xi, sig, scl, off, &mut out)
    }

    fn value_grad(
        &self,
        m: &ModelCore,
        xi: &[f64],
        xsig: &[f64],
        st: &mut State,
        g_xi: &mut [f64],
        gsig: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<[f64; 3]> {
        // s and ρΔr stay on the device, where the KL's metric uses them
        st.fields_on_host = false;
        let (scl, off) = (st.scl, st.off);
        let (id, mut out, [nsig, dnsig]) = st.device_parts();
        let sig = [nsig, dnsig, xsig];
        let infer = m.infer_nsigma;
        self.lock()
            .value_grad(id, xi, sig, infer, (scl, off), &mut out, gsig, g_xi)
    }

    fn jvp(
        &self,
        _m: &ModelCore,
        st: &State,
        dxi: &[f64],
        dscl: f64,
        doff: f64,
        da: &mut [f64],
        dv: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<()> {
        self.lock().jvp(st, dxi, dscl, doff, da, dv)
    }

    fn vjp(
        &self,
        _m: &ModelCore,
        st: &State,
        ca: &[f64],
        cv: &[f64],
        g_xi: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<[f64; 2]> {
        self.lock().vjp(st, ca, cv, g_xi)
    }

    fn averaged_fisher(
        &self,
        m: &ModelCore,
        states: &[State],
        mask: &Mask,
        v: &[f64],
        out: &mut [f64],
        _w: &mut ModelWork,
    ) -> Result<()> {
        let refs: Vec<&State> = states.iter().collect();
        self.lock()
            .fisher_host(&refs, mask, true, m.chain(), v, out)
    }

    fn solve_metric(
        &self,
        m: &ModelCore,
        states: &[&State],
        mask: &Mask,
        with_sig: bool,
        b: &[f64],
        x: &mut [f64],
        settings: &CgSettings,
    ) -> Result<Option<CgReport>> {
        self.lock()
            .solve(states, mask, with_sig, m.chain(), b, x, settings)
    }

    fn reserve_states(&self, n: usize) {
        self.lock().reserve(n);
    }

    fn traffic(&self) -> Option<Traffic> {
        Some(self.lock().traffic())
    }
}

/// Move `model`'s voxel and star stages onto the OpenCL device chosen by `spec`, in
/// `precision`. Under MPI every rank opens its own device: the one `spec` names for its
/// node-local rank, or device (node-local rank mod devices present).
pub fn attach(model: &mut Model, spec: &super::DeviceSpec, precision: Precision) -> Result<()> {
    if model.marginal.is_some() {
        anyhow::bail!(
            "the OpenCL backend evaluates the Gaussian likelihood only: \
             noise.marginalise_nsigma needs the CPU backend"
        );
    }
    let ranks = model.icr.decomp.size();
    let mut spec = spec.clone();
    if ranks > 1 {
        spec.slot = Some(super::node_local_rank().unwrap_or_else(comm::rank));
    }
    let dev = Gpu::open(&spec)?;
    let chart = &model.icr.chart;
    let level_voxels: Vec<usize> = (0..=chart.levels).map(|l| model.icr.field_len(l)).collect();
    let matrices_f32 = model
        .icr
        .levels
        .iter()
        .any(|l| matches!(l.mats, crate::prior::icr::Matrices::F32(_)));
    let need = super::memory::DeviceBytes::estimate(
        model.icr.matrix_bytes(),
        matrices_f32,
        model.data.windows.bytes(),
        &level_voxels,
        model.data.len(),
        model.n_params(),
        precision.bytes(),
    );
    let (global, _) = super::memory::device_memory(&dev);
    let sharing = if ranks > 1 {
        ranks_sharing(dev.index)
    } else {
        1
    };
    super::memory::check(&dev.name, &need, global, sharing)?;
    log_devices(&format!(
        "{} (index {}) on {}",
        dev.name,
        dev.index,
        hostname()
    ));
    tracing::info!(
        device = %dev.name,
        ?precision,
        device_gb = format!("{:.2} of {:.2}", need.total() / 1e9, global / 1e9),
        "likelihood and ICR on OpenCL"
    );
    let backend: Box<dyn Backend> = match precision {
        Precision::F64 => Box::new(open::<f64>(model, &dev, precision)?),
        Precision::F32 => Box::new(open::<f32>(model, &dev, precision)?),
    };
    model.set_backend(backend);
    Ok(())
}

fn open<T: Real>(model: &Model, dev: &Gpu, precision: Precision) -> Result<OpenCl<T>> {
    let mut inner = Inner::<T>::new(
        &model.icr,
        &model.data,
        &model.widths,
        model.padding(),
        dev,
        precision,
    )?;
    inner.distance_variance = model.distance_variance;
    let dom = &model.dom;
    inner.set_reduction(dom.pix_per_patch, &[&dom.x, &dom.p])?;
    Ok(OpenCl {
        inner: std::sync::Mutex::new(inner),
        name: dev.name.clone(),
    })
}

/// How many ranks on this node use device `index` of the platform (this one included):
/// every rank contributes (host, device) and counts its matches.
fn ranks_sharing(index: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    hostname().hash(&mut h);
    let me = [h.finish(), index as u64];
    let all = comm::all_gather_u64(&me, &vec![2; comm::size()]);
    all.chunks(2).filter(|c| c == &me).count()
}

/// Under MPI, rank 0 logs the device every rank opened (the other ranks log warnings only),
/// for the first model of the run (every rank attaches the same models, so all skip alike).
fn log_devices(mine: &str) {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let size = comm::size();
    if size == 1 || LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if !comm::is_root() {
        comm::send_bytes(0, mine.as_bytes());
        return;
    }
    tracing::info!("rank 0 of {size}: OpenCL device {mine}");
    for r in 1..size {
        let text = String::from_utf8_lossy(&comm::recv_bytes(r)).into_owned();
        tracing::info!("rank {r} of {size}: OpenCL device {text}");
    }
}

fn hostname() -> String {
    let mut host = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, and gethostname terminates or
    // truncates within it
    unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    let end = host.iter().position(|&c| c == 0).unwrap_or(host.len());
    String::from_utf8_lossy(&host[..end]).into_owned()
}
