//! Reading through C libraries that may misbehave on damaged input. The netCDF crate unwraps
//! some library errors (an attribute or variable lookup in a file whose metadata is
//! corrupt), so a damaged map or catalog would end the program with a panic; here such a
//! panic becomes an error naming the file, its message kept out of the terminal. And HDF5
//! can loop forever on some damaged files (seen in its global heap): a watchdog ends the
//! process with a message naming the file when a read takes longer than any healthy one
//! would — 5 s plus 0.1 s per MB of the file (10 MB/s), or `DUST3D_READ_TIMEOUT_S`. HDF5
//! 1.10 also dereferences damaged heap addresses (segmentation fault in `H5HG_read`): during
//! a guarded read a SIGSEGV/SIGBUS handler prints the same kind of message and exits 1.

use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The message the crash handler writes (only async-signal-safe access: a fixed buffer whose
/// length is published through an atomic once it is filled).
static mut CRASH_MSG: [u8; 1024] = [0; 1024];
static CRASH_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_crash(_sig: libc::c_int) {
    let n = CRASH_LEN.load(Ordering::SeqCst);
    // SAFETY: write(2) and _exit are async-signal-safe; the buffer is not written while a
    // guarded read runs
    unsafe {
        let buf = std::ptr::addr_of!(CRASH_MSG) as *const libc::c_void;
        libc::write(2, buf, n);
        libc::_exit(1);
    }
}

/// Route SIGSEGV and SIGBUS to [`on_crash`] with `message`; returns the previous actions.
fn arm_crash_message(message: &str) -> [libc::sigaction; 2] {
    let bytes = message.as_bytes();
    let n = bytes.len().min(1024);
    // SAFETY: no handler runs yet (the length is 0 or the previous message's until stored)
    unsafe {
        let buf = &mut *std::ptr::addr_of_mut!(CRASH_MSG);
        buf[..n].copy_from_slice(&bytes[..n]);
    }
    CRASH_LEN.store(n, Ordering::SeqCst);
    let mut old: [libc::sigaction; 2] = unsafe { std::mem::zeroed() };
    for (sig, old) in [libc::SIGSEGV, libc::SIGBUS]
        .into_iter()
        .zip(old.iter_mut())
    {
        // SAFETY: installing a handler that only writes and exits
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_crash as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, old);
        }
    }
    old
}

fn disarm_crash_message(old: [libc::sigaction; 2]) {
    for (sig, old) in [libc::SIGSEGV, libc::SIGBUS].into_iter().zip(old.iter()) {
        // SAFETY: restoring the actions saved by arm_crash_message
        unsafe { libc::sigaction(sig, old, std::ptr::null_mut()) };
    }
}

thread_local! {
    /// The message of the last panic caught on this thread.
    static CAUGHT: RefCell<String> = const { RefCell::new(String::new()) };
}

/// How long a read of `path` may take before it is declared stuck.
pub fn read_limit(path: &Path) -> Duration {
    if let Some(s) = std::env::var("DUST3D_READ_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
    {
        return Duration::from_secs_f64(s);
    }
    let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    Duration::from_secs_f64(5.0 + bytes as f64 / 10e6)
}

/// Run `read` on `path`; a panic inside becomes "`path`: damaged or unreadable `what` (…)",
/// and a read beyond [`read_limit`] ends the process with exit code 1 and a message.
pub fn reading<T>(path: &Path, what: &str, read: impl FnOnce() -> Result<T>) -> Result<T> {
    // one guarded read at a time: the panic hook, the signal actions and the crash message
    // are process-wide (and the HDF5 library serialises its calls anyway)
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let file = path.display().to_string();
    let limit = read_limit(path);
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let (file, what) = (file.clone(), what.to_string());
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                eprintln!(
                    "error: {file}: reading this {what} did not finish in {:.0} s: the \
                     netCDF/HDF5 library is stuck on it (a damaged file?); set \
                     DUST3D_READ_TIMEOUT_S to allow longer",
                    limit.as_secs_f64()
                );
                // _exit: the libraries' exit handlers could wait on the stuck read
                unsafe { libc::_exit(1) };
            }
        })
    };
    let armed = arm_crash_message(&format!(
        "error: {file}: the netCDF/HDF5 library crashed reading this {what} (a damaged file?)\n"
    ));
    let result = catch_panic(&file, what, read);
    disarm_crash_message(armed);
    let _ = done.send(());
    let _ = watchdog.join();
    result
}

fn catch_panic<T>(file: &str, what: &str, read: impl FnOnce() -> Result<T>) -> Result<T> {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        CAUGHT.with(|c| *c.borrow_mut() = msg);
    }));
    let result = panic::catch_unwind(AssertUnwindSafe(read));
    panic::set_hook(previous);
    match result {
        Ok(r) => r,
        Err(_) => {
            let msg = CAUGHT.with(|c| std::mem::take(&mut *c.borrow_mut()));
            Err(anyhow!(
                "{file}: damaged or unreadable {what} (the reading library failed: {msg})"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_becomes_an_error_naming_the_file() {
        let m = Path::new("m.nc");
        let r: Result<()> = reading(m, "netCDF map", || panic!("Netcdf(-107)"));
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("m.nc: damaged or unreadable netCDF map"),
            "{e}"
        );
        assert!(e.contains("Netcdf(-107)"), "{e}");
        assert_eq!(reading(m, "x", || Ok(3)).unwrap(), 3);
        // an absent file gets the base allowance
        if std::env::var_os("DUST3D_READ_TIMEOUT_S").is_none() {
            assert_eq!(read_limit(m), Duration::from_secs(5));
        }
    }
}
