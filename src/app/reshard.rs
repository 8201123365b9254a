//! Resuming a fit on another number of ranks: every checkpoint records the patches its rank
//! held and how many of the stage's stars each patch had, and every vector of a checkpoint
//! is laid out patch by patch (after the replicated excitations). A rank of the new run
//! reads the old files that hold its patches and assembles its own vectors from their
//! patch blocks — the same numbers, so the run continues bit for bit. The decomposition
//! nside must stay the same.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::app::checkpoint::{self, FitState, Part, RunId};
use crate::sphere::decomp::VecLayout;

/// One old checkpoint file and what it says about itself.
struct OldFile {
    path: PathBuf,
    part: Part,
    position: u64,
}

/// Checkpoints `<stem>.r<i>of<m>.ckpt` / `.prev.ckpt` (and `<stem>.ckpt`) in `dir` written
/// with a rank count other than `size`, grouped by that count.
fn other_sets(dir: &Path, stem: &str, size: usize) -> Result<Vec<(usize, Vec<OldFile>)>> {
    let mut sets: Vec<(usize, Vec<OldFile>)> = Vec::new();
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(sets);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(&format!("{stem}.")) && name.ends_with(".ckpt")) {
            continue;
        }
        let path = dir.join(&name);
        if !checkpoint::is_checkpoint(&path) {
            continue;
        }
        let (part, position) =
            match checkpoint::part(&path).and_then(|p| Ok((p, checkpoint::position(&path)?))) {
                Ok(v) => v,
                Err(e) => {
                    // a damaged file of an old set: the others may still share a position
                    tracing::warn!("{e:#}: skipped");
                    continue;
                }
            };
        let m = part.size.max(1);
        if m == size {
            continue;
        }
        let f = OldFile {
            path,
            part,
            position,
        };
        match sets.iter_mut().find(|s| s.0 == m) {
            Some(s) => s.1.push(f),
            None => sets.push((m, vec![f])),
        }
    }
    Ok(sets)
}

/// True if `dir` holds checkpoints of `stem` written with a rank count other than `size`.
pub fn has_other_sets(dir: &Path, stem: &str, size: usize) -> Result<bool> {
    Ok(!other_sets(dir, stem, size)?.is_empty())
}

/// One file per old rank at the newest position all of them have (each keeps its last two;
/// a rank killed while saving may hold the same position under both names).
fn common_position(files: &[OldFile], m: usize) -> Result<Vec<&OldFile>> {
    let mut target = u64::MAX;
    for r in 0..m {
        let newest = files
            .iter()
            .filter(|f| f.part.rank == r)
            .map(|f| f.position)
            .max()
            .with_context(|| format!("checkpoint set of {m} ranks lacks rank {r}"))?;
        target = target.min(newest);
    }
    (0..m)
        .map(|r| {
            files
                .iter()
                .find(|f| f.part.rank == r && f.position == target)
                .with_context(|| {
                    format!("checkpoint set of {m} ranks: rank {r} has no checkpoint at the common position")
                })
        })
        .collect()
}

/// The state of this rank (`part`, vectors laid out as `x`) assembled from a checkpoint set
/// written with another rank count, at the newest position all of its ranks have.
pub fn load(
    dir: &Path,
    stem: &str,
    id: &RunId,
    part: &Part,
    x: &VecLayout,
) -> Result<Option<FitState>> {
    let sets = other_sets(dir, stem, part.size.max(1))?;
    let Some((m, files)) = sets.into_iter().next() else {
        return Ok(None);
    };
    let at = common_position(&files, m)?;
    for f in &at {
        if f.part.nside_dec != part.nside_dec {
            bail!(
                "{}: written with parallel.nside_dec = {}, this run uses {}: a fit can change \
                 its rank count, not its patches",
                f.path.display(),
                f.part.nside_dec,
                part.nside_dec
            );
        }
    }
    let rep_len: usize = x.rep.iter().map(|r| r.len()).sum::<usize>() - 2;
    let per_level: Vec<usize> = x
        .patch
        .first()
        .map_or(vec![], |rs| rs.iter().map(|r| r.len()).collect());
    let mine = part.patches.0..part.patches.1;
    let (out, pieces, xsig) = gather_patches(&at, &mine, id, rep_len, &per_level)?;
    let Some(mut st) = out else {
        return Ok(None);
    };
    let n_x_old = st.vi.x.len();
    let assemble = |v: &[f64], blocks: &[Vec<f64>], tail: &[f64]| -> Vec<f64> {
        let mut a = v[..rep_len].to_vec();
        for b in blocks {
            a.extend_from_slice(b);
        }
        a.extend_from_slice(&v[n_x_old - 2..n_x_old]);
        a.extend_from_slice(tail);
        a
    };
    let (blocks, tails) = (&pieces.blocks, &pieces.tails);
    st.vi.x = assemble(&st.vi.x, &blocks[0], &tails[0]);
    let n_res = st.vi.residuals.len();
    let rebuild = |vs: &[Vec<f64>], first: usize| -> Vec<Vec<f64>> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| assemble(v, &blocks[first + i], &tails[first + i]))
            .collect()
    };
    st.vi.residuals = rebuild(&st.vi.residuals, 1);
    st.vi.shifts = rebuild(&st.vi.shifts, 1 + n_res);
    st.vi.xsig = xsig;
    if st.vi.x.len() != x.len {
        bail!(
            "checkpoint vectors assemble to {} values, this rank needs {}",
            st.vi.x.len(),
            x.len
        );
    }
    Ok(Some(st))
}

/// This rank's patch blocks of every vector (x, then each residual and shift; per level) and of ξ_σ,
/// from the old files holding patches `mine`; also the first old state (for its header
/// fields and replicated values).
#[allow(clippy::type_complexity)]
fn gather_patches(
    at: &[&OldFile],
    mine: &std::ops::Range<usize>,
    id: &RunId,
    rep_len: usize,
    per_level: &[usize],
) -> Result<(Option<FitState>, Pieces, Vec<f64>)> {
    let mut out: Option<FitState> = None;
    let mut xsig = Vec::new();
    let mut pieces: Vec<Vec<Vec<f64>>> = Vec::new();
    let mut tails: Vec<Vec<f64>> = Vec::new();
    let mut holders: Vec<&&OldFile> = at
        .iter()
        .filter(|f| f.part.patches.0 < mine.end && mine.start < f.part.patches.1)
        .collect();
    holders.sort_by_key(|f| f.part.patches.0);
    let covered: usize = holders
        .iter()
        .map(|f| f.part.patches.1.min(mine.end) - f.part.patches.0.max(mine.start))
        .sum();
    if covered != mine.len() {
        bail!("the old checkpoints do not cover patches {mine:?}");
    }
    for f in holders {
        let old = checkpoint::load(&f.path, id)?;
        let n_old = f.part.patches.1 - f.part.patches.0;
        let stars = &f.part.patch_stars;
        if stars.len() != n_old {
            bail!(
                "{}: no per-patch star counts (written by an older dust3d): resume it with \
                 its own rank count",
                f.path.display()
            );
        }
        let vectors: Vec<&Vec<f64>> = std::iter::once(&old.vi.x)
            .chain(&old.vi.residuals)
            .chain(&old.vi.shifts)
            .collect();
        if pieces.is_empty() {
            pieces = vec![vec![Vec::new(); per_level.len()]; vectors.len()];
            tails = vec![Vec::new(); vectors.len()];
        }
        for q in f.part.patches.0.max(mine.start)..f.part.patches.1.min(mine.end) {
            let k = q - f.part.patches.0;
            for (v, dst) in vectors.iter().zip(pieces.iter_mut()) {
                let mut off = rep_len;
                for (l, &per) in per_level.iter().enumerate() {
                    dst[l].extend_from_slice(&v[off + k * per..off + (k + 1) * per]);
                    off += n_old * per;
                }
            }
            let s0: usize = stars[..k].iter().sum();
            xsig.extend_from_slice(&old.vi.xsig[s0..s0 + stars[k]]);
            // residuals over p = [x | ξ_σ] carry a per-star tail split like ξ_σ
            let n_x = old.vi.x.len();
            for (v, dst) in vectors.iter().zip(tails.iter_mut()) {
                if v.len() > n_x {
                    dst.extend_from_slice(&v[n_x + s0..n_x + s0 + stars[k]]);
                }
            }
        }
        if out.is_none() {
            out = Some(old);
        }
    }
    Ok((
        out,
        Pieces {
            blocks: pieces,
            tails,
        },
        xsig,
    ))
}

/// The patch blocks of every vector (per vector, per level) and the per-star tails of
/// vectors over p = [x | ξ_σ] (empty for vectors over x).
struct Pieces {
    blocks: Vec<Vec<Vec<f64>>>,
    tails: Vec<Vec<f64>>,
}

/// Remove a checkpoint set of another rank count (once the new set is on disk).
pub fn remove_other_sets(dir: &Path, stem: &str, size: usize) -> Result<()> {
    for (_, files) in other_sets(dir, stem, size)? {
        for f in files {
            std::fs::remove_file(&f.path).ok();
        }
    }
    Ok(())
}
