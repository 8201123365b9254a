//! The `dust3d` command-line program: a thin driver of the library.

fn main() {
    dust3d::logging::init();
    if let Err(e) = dust3d::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
