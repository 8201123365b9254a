//! Checks a fit makes before any computation: that the model fits this machine's memory and
//! that the output and checkpoint directories take files and have room for what the run
//! will write. Each fails at once with the figure, instead of hours into the run.

use anyhow::{bail, Result};
use std::path::Path;

use super::FitPaths;
use crate::app::config::Config;
use crate::base::comm;
use crate::sphere::grid::Chart;

/// Refuse, before any work, a model that cannot fit this machine: chart voxels × 8 bytes ×
/// (4 per sample of the largest stage + 16 for fields and workspaces) per rank — the arrays
/// `dust3d plan` counts at the KL peak, stars and matrices aside — against MemAvailable.
/// `DUST3D_SKIP_MEMORY_CHECK=1` skips it.
pub(super) fn check_memory(cfg: &Config, chart: &Chart) -> Result<()> {
    if std::env::var_os("DUST3D_SKIP_MEMORY_CHECK").is_some() {
        return Ok(());
    }
    let lv = chart.levels;
    let pairs = cfg.inference.max_sample_pairs();
    let voxels = chart.voxels(lv) as f64;
    let need = voxels * 8.0 * (4.0 * pairs as f64 + 16.0) / comm::size() as f64;
    let Some(avail) = mem_available_bytes() else {
        return Ok(());
    };
    if need > avail {
        bail!(
            "the model needs about {:.1} GB per rank ({voxels:.3e} chart voxels, {pairs} sample \
             pairs, {} ranks) but this machine has {:.1} GB available: use more ranks, fewer \
             grid.levels, or see `dust3d plan` (DUST3D_SKIP_MEMORY_CHECK=1 skips this check)",
            need / 1e9,
            comm::size(),
            avail / 1e9
        );
    }
    Ok(())
}

/// MemAvailable of /proc/meminfo, bytes (None where unknown).
fn mem_available_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// Bytes the fit will write: (checkpoints of all ranks, products), estimated from the chart.
/// Checkpoints hold the excitations (at most the voxels of every level) for the expansion
/// point and each residual, in f64, twice (the current and the previous); the map holds
/// mean, std and every sample per voxel in f32, and the star table ~120 bytes a star.
pub(super) fn output_bytes(cfg: &Config, chart: &Chart, n_stars_hint: f64) -> (f64, f64) {
    let pairs = cfg.inference.max_sample_pairs() as f64;
    let excitations: f64 = (0..=chart.levels).map(|l| chart.voxels(l) as f64).sum();
    let checkpoints = 2.0 * 8.0 * excitations * (1.0 + pairs);
    let lv = chart.levels;
    let voxels = chart.voxels(lv) as f64;
    let products = 4.0 * voxels * (2.0 + 2.0 * pairs) + 120.0 * n_stars_hint;
    (checkpoints, products)
}

/// Refuse, before any work, directories that do not exist or take no file, and filesystems
/// without room for the checkpoints and products ([`output_bytes`]).
pub(super) fn check_disk(cfg: &Config, chart: &Chart, paths: &FitPaths) -> Result<()> {
    let (ck_dir, out_dir) = (dir_of(&paths.checkpoint), dir_of(&paths.map));
    if comm::is_root() {
        probe_writable(out_dir, "output")?;
    }
    if ck_dir != out_dir || !comm::is_root() {
        probe_writable(ck_dir, "checkpoint")?;
    }
    if !comm::is_root() {
        return Ok(());
    }
    // the catalog size is not known yet: one star per 10 chart voxels is generous
    let lv = chart.levels;
    let stars_hint = chart.voxels(lv) as f64 / 10.0;
    let (ck, prod) = output_bytes(cfg, chart, stars_hint);
    let (ck_free, ck_dev) = free_bytes(ck_dir)?;
    let (out_free, out_dev) = free_bytes(out_dir)?;
    if ck_dev == out_dev {
        need_room(out_dir, ck + prod, out_free, "checkpoints and products")
    } else {
        need_room(ck_dir, ck, ck_free, "checkpoints")?;
        need_room(out_dir, prod, out_free, "products")
    }
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Create and remove a small file in `dir`.
fn probe_writable(dir: &Path, what: &str) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{what} directory {} does not exist (create it first)",
            dir.display()
        );
    }
    let probe = dir.join(format!(".dust3d-probe-{}", std::process::id()));
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"probe"));
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = made {
        bail!("{what} directory {} takes no file: {e}", dir.display());
    }
    Ok(())
}

/// Free bytes for an unprivileged user on the filesystem of `dir`, and its device id.
fn free_bytes(dir: &Path) -> Result<(f64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)?.dev();
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is NUL-terminated
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        // no figure to check against (some network filesystems): let the run go on
        return Ok((f64::INFINITY, dev));
    }
    Ok((s.f_bavail as f64 * s.f_frsize as f64, dev))
}

/// Refuse when `need` bytes exceed `free` (with a 10 % margin).
fn need_room(dir: &Path, need: f64, free: f64, what: &str) -> Result<()> {
    if std::env::var_os("DUST3D_SKIP_DISK_CHECK").is_some() || 1.1 * need <= free {
        return Ok(());
    }
    bail!(
        "{} has {:.2} GB free but the {what} of this fit need about {:.2} GB: free space or \
         choose another directory (--checkpoint-dir, --out); DUST3D_SKIP_DISK_CHECK=1 skips \
         this check",
        dir.display(),
        free / 1e9,
        need / 1e9
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_refused_with_the_figures_and_missing_directories_are_named() {
        let d = Path::new("/data");
        assert!(need_room(d, 1e9, 2e9, "products").is_ok());
        let e = need_room(d, 1e9, 1.05e9, "products")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1.05 GB free") && e.contains("about 1.00 GB"),
            "{e}"
        );
        let e = probe_writable(Path::new("/no/such/dir"), "output")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/dir does not exist"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        probe_writable(tmp.path(), "output").unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        let (free, _) = free_bytes(tmp.path()).unwrap();
        assert!(free > 0.0);
    }
}
