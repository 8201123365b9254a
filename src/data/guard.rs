//! Reading through C libraries that may misbehave on damaged input. The netCDF crate unwraps
//! some library errors (an attribute or variable lookup in a file whose metadata is
//! corrupt), so a damaged map or catalog would end the program with a panic; here such a
//! panic becomes an error naming the file, its message kept out of the terminal. And HDF5
//! can loop forever on some damaged files (seen in its global heap): a watchdog ends the
//! process with a message naming the file when a read takes longer than any healthy one
//! would — 5 s plus 0.1 s per MB of the file (10 MB/s), or `DUST3D_READ_TIMEOUT_S`. HDF5
//! 1.10 also dereferences damaged heap addresses (segmentation fault in `H5HG_read`) and frees
//! pointers read from damaged object headers (glibc's `free(): invalid pointer`, an abort,
//! in `H5O_msg_reset` while a file is opened): during a guarded read a handler of SIGSEGV,
//! SIGBUS, SIGABRT, SIGFPE and SIGILL prints the same kind of message and exits 1. Whether
//! such a file crashes, or only fails, depends on the process's memory layout (the length of
//! its path and of its environment), so one damaged file can do either on two machines.
//! After a guarded read has failed, the library's state is suspect: [`library_suspect`]
//! tells the program to end without the library's exit handlers.

use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The message the crash handler writes (only async-signal-safe access: a fixed buffer whose
/// length is published through an atomic once it is filled).
static mut CRASH_MSG: [u8; 1024] = [0; 1024];
static CRASH_LEN: AtomicUsize = AtomicUsize::new(0);

/// Set once a guarded read has failed or panicked.
static SUSPECT: AtomicBool = AtomicBool::new(false);

/// The signals a damaged file can raise inside the C libraries.
const CRASH_SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGFPE,
    libc::SIGILL,
];

/// True once a guarded read in this process has failed: the netCDF/HDF5 library may hold
/// memory that the damaged file corrupted, and its clean-up at exit could crash on it.
pub fn library_suspect() -> bool {
    SUSPECT.load(Ordering::SeqCst)
}

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

/// Route [`CRASH_SIGNALS`] to [`on_crash`] with `message`; returns the previous actions.
fn arm_crash_message(message: &str) -> [libc::sigaction; 5] {
    let bytes = message.as_bytes();
    let n = bytes.len().min(1024);
    // SAFETY: no handler runs yet (the length is 0 or the previous message's until stored)
    unsafe {
        let buf = &mut *std::ptr::addr_of_mut!(CRASH_MSG);
        buf[..n].copy_from_slice(&bytes[..n]);
    }
    CRASH_LEN.store(n, Ordering::SeqCst);
    let mut old: [libc::sigaction; 5] = unsafe { std::mem::zeroed() };
    for (sig, old) in CRASH_SIGNALS.into_iter().zip(old.iter_mut()) {
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

fn disarm_crash_message(old: [libc::sigaction; 5]) {
    for (sig, old) in CRASH_SIGNALS.into_iter().zip(old.iter()) {
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
    if result.is_err() {
        SUSPECT.store(true, Ordering::SeqCst);
    }
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

    /// Which signal the child process raises inside a guarded read.
    const CHILD: &str = "DUST3D_GUARD_TEST_SIGNAL";

    #[test]
    fn a_crash_inside_a_read_ends_with_a_message_and_exit_code_1() {
        if let Ok(sig) = std::env::var(CHILD) {
            // the child: raise the signal inside a guarded read, as a damaged file would
            let sig: libc::c_int = sig.parse().unwrap();
            let _ = reading(Path::new("damaged.nc"), "test file", || {
                if sig == libc::SIGABRT {
                    std::process::abort() // glibc's malloc checks end this way
                }
                // SAFETY: raising a signal whose handler ends the process
                unsafe { libc::raise(sig) };
                Ok(())
            });
            unreachable!("the handler ends the process");
        }
        // listed here, not taken from CRASH_SIGNALS, so that a signal dropped there fails
        let signals = [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGABRT,
            libc::SIGFPE,
            libc::SIGILL,
        ];
        for sig in signals {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "data::guard::tests::a_crash_inside_a_read_ends_with_a_message_and_exit_code_1",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, sig.to_string())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "signal {sig}: {:?} {err}",
                out.status
            );
            assert!(
                err.contains(
                    "error: damaged.nc: the netCDF/HDF5 library crashed reading this test file"
                ),
                "signal {sig}: {err}"
            );
        }
    }

    #[test]
    fn a_failed_read_makes_the_library_suspect() {
        let r: Result<()> = reading(Path::new("m.nc"), "netCDF map", || Err(anyhow!("bad")));
        assert!(r.is_err());
        assert!(library_suspect());
    }
}
