//! The allocator settings of the `dust3d` process (glibc on Linux). An MGVI iteration
//! allocates and frees parameter- and field-sized buffers (CG vectors, the Newton steps'
//! points and gradients, the samples' states and fields, the ICR's work arrays); glibc by
//! default serves large ones by `mmap` and gives them, and the free top of its heap, back to
//! the kernel on `free`, which hands them out again as fresh pages to be faulted in and
//! cleared: W2, one warm iteration, 1.8 million page faults (7 GB of cleared pages), and the
//! iteration about 17 % longer than with them kept in the process and reused (peak 1 % lower).

use std::ffi::OsString;

/// Whether the environment (read through `var`) sets glibc's allocator parameters itself:
/// any `MALLOC_…_` variable glibc reads, or a `glibc.malloc.` tunable. dust3d then leaves
/// the allocator as the user chose.
///
/// ```
/// use dust3d::base::allocator::user_sets_allocator;
/// assert!(!user_sets_allocator(|_| None));
/// assert!(user_sets_allocator(|k| (k == "MALLOC_TRIM_THRESHOLD_").then(|| "0".into())));
/// assert!(!user_sets_allocator(|k| (k == "GLIBC_TUNABLES").then(|| "glibc.cpu.x86_ibt=on".into())));
/// ```
pub fn user_sets_allocator(var: impl Fn(&str) -> Option<OsString>) -> bool {
    const VARS: [&str; 5] = [
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_MAX_",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_TRIM_THRESHOLD_",
    ];
    VARS.iter().any(|k| var(k).is_some())
        || var("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("glibc.malloc."))
}

/// Sets glibc's allocator for long computations, unless the environment sets it
/// ([`user_sets_allocator`]): one arena (the command runs on a pool thread, and buffers in a
/// thread's own arena fragment its 64 MB heaps, which are not given back: W1 iteration peak
/// 597 MB, up to 714 MB with thread arenas), and freed memory kept for reuse — no `mmap` for
/// large blocks, no trimming of the heap. Returns whether it did (never on other C
/// libraries, where this does nothing).
///
/// # Safety
/// Call before any other thread exists (glibc's parameters are not set atomically).
pub unsafe fn configure() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if user_sets_allocator(|k| std::env::var_os(k)) {
            return false;
        }
        // SAFETY: the caller guarantees that no other thread allocates meanwhile
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            // −1: never trim (mallopt takes an int; glibc reads it as the largest size)
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
