//! Atomic file output: write to a temporary sibling, then rename over the target, so a
//! crash never leaves a half-written file under the final name.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The temporary sibling path used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp),
        _ => PathBuf::from(tmp),
    }
}

/// Run `write` on a temporary path, then move the result to `path`; on error the temporary
/// file is removed and `path` is left untouched.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let tmp = temp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let result = write(&tmp).and_then(|_| {
        // flush file contents to disk before the rename makes them visible
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).ok();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.txt");
        let r = write_atomically(&target, |p| {
            std::fs::write(p, "partial")?;
            anyhow::bail!("boom")
        });
        assert!(r.is_err());
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomically(&target, |p| Ok(std::fs::write(p, "whole")?)).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "whole");
    }
}
