//! The `dust3d` command-line program: a thin driver of the library.

fn main() {
    // MPI first (when a launcher started us): logging and errors depend on the rank
    // past a file-size limit (ulimit -f, some batch systems) a write fails with an error that
    // is reported and leaves the previous files, instead of the signal killing the process
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // one glibc arena, and freed buffers kept for the next iteration instead of given back
    // SAFETY: no other thread exists yet
    let allocator_set = unsafe { dust3d::base::allocator::configure() };
    let mpi = dust3d::base::comm::init();
    dust3d::base::logging::init();
    tracing::debug!(
        allocator_set,
        "glibc allocator: one arena, freed memory kept (false: the environment sets it, or not glibc)"
    );
    if let Err(e) = dust3d::cli::run() {
        if let Some(stop) = dust3d::base::stop::interrupted(&e) {
            // every rank stopped at the same safe point: a clean exit, not an abort
            if dust3d::base::comm::is_root() {
                eprintln!("dust3d: {stop}");
            }
            drop(mpi);
            std::process::exit(dust3d::base::stop::EXIT_CODE);
        }
        if dust3d::base::comm::size() > 1 {
            // one rank's error ends the whole job: the others would wait for it forever
            eprintln!(
                "error (rank {} of {}): {e:#}",
                dust3d::base::comm::rank(),
                dust3d::base::comm::size()
            );
            dust3d::base::comm::abort(1);
        }
        eprintln!("error: {e:#}");
        drop(mpi);
        exit_without_library_cleanup(1);
    }
    drop(mpi);
    if dust3d::data::guard::library_suspect() {
        // a damaged file was read on the way (e.g. `info` first asks whether a catalog is a map)
        exit_without_library_cleanup(0);
    }
}

/// End the process without the C libraries' exit handlers. After a read of a damaged file
/// has failed, libhdf5's own clean-up at exit can free memory that the failed read left
/// corrupt and abort the process (seen as `free(): invalid pointer` after the error message
/// of a fuzzed map); every file dust3d writes is complete and renamed, or discarded, by now,
/// so nothing is lost by skipping it.
fn exit_without_library_cleanup(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; no Rust state is used afterwards
    unsafe { libc::_exit(code) }
}
