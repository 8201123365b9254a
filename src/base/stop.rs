//! Stopping a fit cleanly when the batch system asks: SIGTERM, SIGINT or SIGUSR1 set a flag
//! that the inference polls at safe points (before each residual draw and each Newton step);
//! the run then returns [`Interrupted`] and the program exits with [`EXIT_CODE`], leaving the
//! newest checkpoint (the end of the last whole global iteration) as the place to resume.
//! A second signal ends the process at once.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::base::comm;

/// Exit status of a run stopped by a signal at a safe point (EX_TEMPFAIL: "try again").
pub const EXIT_CODE: i32 = 75;

/// The first stop signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A run stopped at a safe point on request; its newest checkpoint is where to resume.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {name} at a safe point; continue with --resume", name = signal_name(*.signal))]
pub struct Interrupted {
    /// The signal number (SIGTERM 15, SIGINT 2, SIGUSR1 10 on Linux).
    pub signal: i32,
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "(a stop request)",
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // only async-signal-safe calls here: an atomic swap and _exit
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Install the stop handlers (SIGTERM, SIGINT, SIGUSR1) for the rest of the process.
pub fn install() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic and calls _exit
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// A safe point: `Err(Interrupted)` on every rank if any rank was asked to stop. Collective
/// under MPI: every rank must reach the same safe points in the same order.
pub fn check() -> Result<(), Interrupted> {
    // one reduction tells every rank whether, and by which signal, any rank was asked
    let signal = comm::max_f64(f64::from(SIGNAL.load(Ordering::SeqCst))) as i32;
    if signal != 0 {
        return Err(Interrupted { signal });
    }
    Ok(())
}

/// The [`Interrupted`] an error chain holds, if any (under whatever context was added).
pub fn interrupted(e: &anyhow::Error) -> Option<&Interrupted> {
    e.chain().find_map(|c| c.downcast_ref::<Interrupted>())
}
