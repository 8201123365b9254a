//! The `dust3d` command-line program: a thin driver of the library.

fn main() {
    // MPI first (when a launcher started us): logging and errors depend on the rank
    let mpi = dust3d::comm::init();
    dust3d::logging::init();
    if let Err(e) = dust3d::cli::run() {
        if dust3d::comm::size() > 1 {
            // one rank's error ends the whole job: the others would wait for it forever
            eprintln!(
                "error (rank {} of {}): {e:#}",
                dust3d::comm::rank(),
                dust3d::comm::size()
            );
            dust3d::comm::abort(1);
        }
        eprintln!("error: {e:#}");
        drop(mpi);
        std::process::exit(1);
    }
}
