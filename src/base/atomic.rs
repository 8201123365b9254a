//! Atomic file output: write to a temporary sibling, then rename over the target, so a
//! crash never leaves a half-written file under the final name; a [`Staged`] set renames
//! several files only once all are written.

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
    let mut set = Staged::default();
    set.write(path, write)?;
    set.commit()
}

/// Files written to temporary siblings and moved into place together by
/// [`Staged::commit`], so that a set of products is replaced whole or not at all (a full
/// disk while writing the last one leaves every previous file as it was). Temporary files
/// not committed are removed when the set is dropped.
#[derive(Default)]
pub struct Staged {
    /// (temporary, final) paths written so far.
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    /// Write `path`'s new content to its temporary sibling with `write`, synced to disk.
    pub fn write<F>(&mut self, path: &Path, write: F) -> Result<()>
    where
        F: FnOnce(&Path) -> Result<()>,
    {
        let tmp = temp_path(path);
        let _ = std::fs::remove_file(&tmp);
        self.files.push((tmp.clone(), path.to_path_buf()));
        write(&tmp)?;
        // contents on disk before a rename makes them visible; a full disk may only show
        // here (delayed allocation, network filesystems)
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {} to disk", tmp.display()))
    }

    /// Move every staged file to its final name (renames within a directory: no new space).
    pub fn commit(mut self) -> Result<()> {
        for (tmp, path) in std::mem::take(&mut self.files) {
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
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

    #[test]
    fn a_staged_set_is_replaced_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "old a").unwrap();
        std::fs::write(&b, "old b").unwrap();
        let mut set = Staged::default();
        set.write(&a, |p| Ok(std::fs::write(p, "new a")?)).unwrap();
        let r = set.write(&b, |p| {
            std::fs::write(p, "half")?;
            anyhow::bail!("disk full")
        });
        assert!(r.is_err());
        drop(set);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old a");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "old b");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let mut set = Staged::default();
        set.write(&a, |p| Ok(std::fs::write(p, "new a")?)).unwrap();
        set.write(&b, |p| Ok(std::fs::write(p, "new b")?)).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old a");
        set.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new b");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
