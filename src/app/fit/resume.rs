//! Checkpoints of a running fit: where to resume (the newest position every rank has, or a
//! set written with another rank count) and how to save (keeping the previous one).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::{FitPaths, Setup};
use crate::app::checkpoint::{self, FitState};
use crate::base::comm;

/// The state to continue from: the newest position every rank has a checkpoint of.
pub(super) fn resume_point(paths: &FitPaths, su: &Setup, resume: bool) -> Result<Option<FitState>> {
    let mine = usable_checkpoints(paths)?;
    let none_anywhere = comm::all(mine.is_empty());
    if none_anywhere {
        let (dir, stem) = checkpoint_dir_stem(paths);
        if crate::app::reshard::has_other_sets(&dir, &stem, comm::size())? {
            if !resume {
                bail!(
                    "{} holds checkpoints of this fit written with another rank count: pass \
                     --resume to continue it on {} ranks, or delete them to start over",
                    dir.display(),
                    comm::size()
                );
            }
            let x = su.icr.x_layout();
            let s = crate::app::reshard::load(&dir, &stem, &su.id, &su.part, &x)?
                .context("no checkpoint of another rank count could be read")?;
            tracing::info!(
                stage = s.stage,
                iteration = s.iteration,
                ranks = comm::size(),
                "resuming from checkpoints written with another rank count"
            );
            su.resharded.set(true);
            return Ok(Some(s));
        }
        if resume {
            tracing::info!(checkpoint = %paths.checkpoint.display(), "no checkpoint to resume from: starting afresh");
        }
        return Ok(None);
    }
    if !resume {
        bail!(
            "checkpoint {} exists: pass --resume to continue that run, or delete it to start over",
            paths.checkpoint.display()
        );
    }
    if !comm::all(!mine.is_empty()) {
        bail!(
            "some ranks have no checkpoint ({} is missing on at least one): the checkpoint \
             set is incomplete; delete it to start over",
            paths.checkpoint.display()
        );
    }
    let newest = mine.iter().map(|m| m.0).max().unwrap_or(0);
    let target = comm::min_u64(newest);
    let pick = mine.iter().find(|m| m.0 == target);
    if !comm::all(pick.is_some()) {
        bail!("checkpoints of the ranks share no position: the set is inconsistent");
    }
    let path = pick.expect("checked on every rank").1;
    let s = checkpoint::load_part(path, &su.id, &su.part)?;
    tracing::info!(
        stage = s.stage,
        iteration = s.iteration,
        "resuming from checkpoint"
    );
    Ok(Some(s))
}

/// This rank's checkpoints that pass their checksum, with their positions. A damaged newest
/// one is set aside (renamed `.corrupt`, so that the next save does not keep it as the
/// previous) and the previous one used, with a warning; when every file present is damaged,
/// an error naming them, and nothing is touched.
fn usable_checkpoints(paths: &FitPaths) -> Result<Vec<(u64, &PathBuf)>> {
    let mut usable = Vec::new();
    let mut damaged = Vec::new();
    for p in [&paths.checkpoint, &paths.previous] {
        if !p.exists() {
            continue;
        }
        match checkpoint::verify(p) {
            Ok(pos) => usable.push((pos, p)),
            Err(e) => damaged.push((p, e)),
        }
    }
    if usable.is_empty() && !damaged.is_empty() {
        let list: Vec<String> = damaged.iter().map(|(_, e)| format!("{e:#}")).collect();
        bail!(
            "no usable checkpoint: {}; nothing was changed: restore a copy, or delete them \
             to start over",
            list.join("; ")
        );
    }
    for (p, e) in damaged {
        let aside = p.with_extension("ckpt.corrupt");
        tracing::warn!(
            "{e:#}: resuming from the previous checkpoint instead; the damaged file is kept as {}",
            aside.display()
        );
        std::fs::rename(p, &aside).with_context(|| format!("cannot move {} aside", p.display()))?;
    }
    Ok(usable)
}

/// The checkpoint directory and the stem of the fit's files.
pub(super) fn checkpoint_dir_stem(paths: &FitPaths) -> (PathBuf, String) {
    let dir = paths
        .checkpoint
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let stem = paths
        .map
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, stem)
}

/// Save this rank's checkpoint, keeping the previous one.
pub(super) fn save_checkpoint(
    paths: &FitPaths,
    su: &Setup,
    st: &FitState,
    part: &checkpoint::Part,
) -> Result<()> {
    if paths.checkpoint.exists() {
        // keep the current one as the previous (a second name, so that a checkpoint exists
        // under the current name at every moment), then replace the current atomically
        std::fs::remove_file(&paths.previous).ok();
        std::fs::hard_link(&paths.checkpoint, &paths.previous)
            .or_else(|_| std::fs::copy(&paths.checkpoint, &paths.previous).map(|_| ()))
            .with_context(|| format!("cannot keep {} as previous", paths.checkpoint.display()))?;
    }
    checkpoint::save_part(&paths.checkpoint, &su.id, st, part)?;
    if su.resharded.get() {
        // the new set is on disk on every rank: the old one has served its purpose
        comm::barrier();
        if comm::is_root() {
            let (dir, stem) = checkpoint_dir_stem(paths);
            crate::app::reshard::remove_other_sets(&dir, &stem, comm::size())?;
        }
        su.resharded.set(false);
    }
    Ok(())
}
