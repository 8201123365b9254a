//! Checkpoints of a fit: a JSON header (position in the schedule, history, checksums of the
//! configuration and the catalog) followed by the raw little-endian f64 arrays (expansion
//! point, ξ_σ, residuals) and a SHA-256 of everything before it, so that a truncated or
//! damaged file is recognised instead of resumed from. Written atomically; resuming from one
//! continues bit for bit, because every random stream is derived from (seed, stage,
//! iteration, pair).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;

use crate::base::atomic::write_atomically;
use crate::inference::mgvi::MgviState;

/// Magic of the current format (with the trailing checksum).
const MAGIC: &[u8; 10] = b"DUST3DCK2\n";
/// Magic of the first format (no checksum): still read, unverified.
const MAGIC_V1: &[u8; 10] = b"DUST3DCK1\n";
/// Length of the trailing SHA-256.
const SUM_LEN: usize = 32;

/// One row of the convergence history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HistoryRow {
    /// Schedule stage.
    pub stage: usize,
    /// Global iteration within the stage (1-based when written).
    pub iteration: usize,
    /// Stars used.
    pub n_stars: usize,
    /// KL after the Newton steps.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl: f64,
    /// Newton steps taken.
    pub newton_steps: u64,
    /// Total inner CG iterations of the Newton steps.
    pub newton_cg: usize,
    /// Total CG iterations of the residual draws.
    pub sample_cg: usize,
    /// KL gradient norm at the start of the last Newton step.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Length of the last Newton step.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub step: f64,
    /// Wall time of the iteration, s.
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    /// Peak resident memory so far, bytes (largest rank).
    pub peak_rss_bytes: u64,
    /// MPI ranks.
    #[serde(default)]
    pub ranks: usize,
    /// CPU seconds of the iteration, summed over ranks (all threads).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub cpu_seconds: f64,
    /// Of which inside MPI calls, summed over ranks.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub mpi_cpu_seconds: f64,
    /// Bytes sent through MPI during the iteration, summed over ranks.
    #[serde(default)]
    pub mpi_bytes: u64,
    /// Relative KL change of the iteration (see `inference::mgvi::Change`).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub kl_change: f64,
    /// RMS step of the expansion point per parameter, standardized units.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub step_rms: f64,
    /// RMS change of the sample mean of ln ρ over the voxels.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub map_change: f64,
    /// Residual draws whose CG stopped at its cap above its tolerance.
    #[serde(default)]
    pub sample_cg_capped: usize,
    /// Newton steps whose inner CG stopped at its cap above the forcing residual.
    #[serde(default)]
    pub newton_cg_capped: usize,
    /// Whether the iteration met the stage's convergence tolerances (the stage ended).
    #[serde(default)]
    pub converged: bool,
    /// Mean of the field's scale over the iteration's samples (dimensionless); with the
    /// scale in its own factor, the factor's mode.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub scale_mean: f64,
    /// Standard deviation of the scale over the samples; with the scale in its own factor,
    /// the factor's Laplace spread (the stage's last one where an update was held, NaN
    /// before its first).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub scale_std: f64,
}

/// A history figure that was not a number (JSON writes it as null) reads back as NaN, so a
/// diagnostic that could not be computed never makes a checkpoint unreadable.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Where a fit stands.
#[derive(Clone, Debug, PartialEq)]
pub struct FitState {
    /// Current stage (== number of stages when the schedule is complete).
    pub stage: usize,
    /// Completed global iterations of the current stage.
    pub iteration: usize,
    /// The variational state: expansion point, ξ_σ, residuals.
    pub vi: MgviState,
    /// Convergence history.
    pub history: Vec<HistoryRow>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    seed: u64,
    config_sha256: String,
    catalog_sha256: String,
    stage: usize,
    iteration: usize,
    n_x: usize,
    n_sig: usize,
    n_residuals: usize,
    /// geoVI shifts (absent in files of MGVI-only versions: none).
    #[serde(default)]
    n_shifts: usize,
    /// Length of each residual and shift: n_x, or n_x + n_sig when n_σ is sampled (0 in
    /// files of versions that only sampled x: n_x).
    #[serde(default)]
    residual_len: usize,
    history: Vec<HistoryRow>,
    #[serde(default)]
    part: Part,
}

/// Which rank of how many wrote a checkpoint, and the patches it held.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// Rank.
    pub rank: usize,
    /// Number of ranks (0 in files of single-process versions: read as 1).
    pub size: usize,
    /// First and one-past-last patch held.
    pub patches: (usize, usize),
    /// Decomposition nside.
    pub nside_dec: u32,
    /// Stars of the current stage per patch held (how ξ_σ splits into patches).
    #[serde(default)]
    pub patch_stars: Vec<usize>,
}

/// Identity of a run: a checkpoint only resumes the run it belongs to.
#[derive(Clone, Debug)]
pub struct RunId {
    /// Master seed.
    pub seed: u64,
    /// SHA-256 of the configuration text.
    pub config_sha256: String,
    /// SHA-256 of the catalog file.
    pub catalog_sha256: String,
}

fn put(buf: &mut Vec<u8>, v: &[f64]) {
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

/// Write `state` atomically to `path`.
pub fn save(path: &Path, id: &RunId, st: &FitState) -> Result<()> {
    save_part(path, id, st, &Part::default())
}

/// Write one rank's `state` atomically to `path`, recording the rank's part.
pub fn save_part(path: &Path, id: &RunId, st: &FitState, part: &Part) -> Result<()> {
    let header = Header {
        seed: id.seed,
        config_sha256: id.config_sha256.clone(),
        catalog_sha256: id.catalog_sha256.clone(),
        stage: st.stage,
        iteration: st.iteration,
        n_x: st.vi.x.len(),
        n_sig: st.vi.xsig.len(),
        n_residuals: st.vi.residuals.len(),
        n_shifts: st.vi.shifts.len(),
        residual_len: st.vi.residuals.first().map_or(st.vi.x.len(), Vec::len),
        history: st.history.clone(),
        part: part.clone(),
    };
    let json = serde_json::to_vec(&header)?;
    let mut buf = Vec::with_capacity(
        64 + json.len()
            + 8 * (st.vi.x.len() + st.vi.xsig.len())
            + 8 * (st
                .vi
                .residuals
                .iter()
                .chain(&st.vi.shifts)
                .map(Vec::len)
                .sum::<usize>()),
    );
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
    buf.extend_from_slice(&json);
    put(&mut buf, &st.vi.x);
    put(&mut buf, &st.vi.xsig);
    for r in st.vi.residuals.iter().chain(&st.vi.shifts) {
        put(&mut buf, r);
    }
    let sum = Sha256::digest(&buf);
    buf.extend_from_slice(&sum);
    write_atomically(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        Ok(())
    })
    .with_context(|| format!("cannot write checkpoint {}", path.display()))
}

/// True if `path` starts like a dust3d checkpoint.
pub fn is_checkpoint(path: &Path) -> bool {
    let mut magic = [0u8; 10];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && (&magic == MAGIC || &magic == MAGIC_V1)
}

/// The header, the file without its checksum, and the header length; a file whose
/// checksum does not match its contents (truncated, damaged) is an error naming it.
fn read_header(path: &Path) -> Result<(Header, Vec<u8>, usize)> {
    let file = path.display();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("cannot open checkpoint {file}"))?
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read checkpoint {file}"))?;
    if bytes.len() < 18 || (&bytes[..10] != MAGIC && &bytes[..10] != MAGIC_V1) {
        bail!("{file}: not a dust3d checkpoint");
    }
    if &bytes[..10] == MAGIC {
        let Some(n) = bytes.len().checked_sub(SUM_LEN).filter(|&n| n >= 18) else {
            bail!("{file}: truncated checkpoint ({} bytes)", bytes.len());
        };
        if Sha256::digest(&bytes[..n]).as_slice() != &bytes[n..] {
            bail!("{file}: checksum mismatch: the checkpoint is truncated or damaged");
        }
        bytes.truncate(n);
    }
    let hlen = u64::from_le_bytes(bytes[10..18].try_into()?);
    let header: Header = usize::try_from(hlen)
        .ok()
        .and_then(|h| bytes.get(18..18usize.checked_add(h)?))
        .with_context(|| format!("{file}: truncated checkpoint header"))
        .and_then(|h| {
            serde_json::from_slice(h).with_context(|| format!("{file}: corrupt checkpoint header"))
        })?;
    Ok((header, bytes, hlen as usize))
}

/// Check that `path` is a whole, undamaged checkpoint; returns its position (see
/// [`position`]).
pub fn verify(path: &Path) -> Result<u64> {
    position(path)
}

/// A human-readable summary of a checkpoint: position in the schedule and recent history.
pub fn summary(path: &Path) -> Result<String> {
    let (h, _, _) = read_header(path)?;
    let mut s = format!(
        "{}: dust3d fit checkpoint\n  position  stage {} after {} global iterations; {} parameters, {} stars, {} residuals\n  seed      {}\n",
        path.display(),
        h.stage,
        h.iteration,
        h.n_x,
        h.n_sig,
        h.n_residuals,
        h.seed
    );
    if h.part.size > 1 {
        s += &format!(
            "  rank      {} of {} (patches {}..{} at nside_dec {})\n",
            h.part.rank, h.part.size, h.part.patches.0, h.part.patches.1, h.part.nside_dec
        );
    }
    for r in h.history.iter().rev().take(5).rev() {
        s += &format!(
            "  stage {} it {:>3}: KL {:.6e}  |grad| {:.3e}  step {:.3e}  {:.1} s\n",
            r.stage, r.iteration, r.kl, r.grad_norm, r.step, r.seconds
        );
    }
    Ok(s)
}

/// The rank part a checkpoint records.
pub fn part(path: &Path) -> Result<Part> {
    Ok(read_header(path)?.0.part)
}

/// Position (stage, iteration) of a checkpoint, as one number that orders positions.
pub fn position(path: &Path) -> Result<u64> {
    let (h, _, _) = read_header(path)?;
    Ok(((h.stage as u64) << 32) | h.iteration as u64)
}

/// Read one rank's checkpoint, checking that it belongs to run `id` and to this `part`.
pub fn load_part(path: &Path, id: &RunId, part: &Part) -> Result<FitState> {
    let (header, bytes, hlen) = read_header(path)?;
    // identity first: another catalog or configuration is the likelier cause of a mismatch
    check_identity(path, &header, id)?;
    let h = &header.part;
    let size = h.size.max(1);
    if size != part.size.max(1) || (size > 1 && h.nside_dec != part.nside_dec) {
        bail!(
            "{}: checkpoint of rank {} of {size} (nside_dec {}); this run has {} ranks and \
             nside_dec {}",
            path.display(),
            h.rank,
            h.nside_dec,
            part.size.max(1),
            part.nside_dec
        );
    }
    if size > 1 && (h.rank != part.rank || h.patches != part.patches) {
        bail!(
            "{}: written by rank {} for patches {:?}, this rank {} holds {:?}",
            path.display(),
            h.rank,
            h.patches,
            part.rank,
            part.patches
        );
    }
    decode(path, header, &bytes, hlen)
}

/// Read a checkpoint, checking that it belongs to run `id`.
pub fn load(path: &Path, id: &RunId) -> Result<FitState> {
    let (header, bytes, hlen) = read_header(path)?;
    check_identity(path, &header, id)?;
    decode(path, header, &bytes, hlen)
}

fn check_identity(path: &Path, header: &Header, id: &RunId) -> Result<()> {
    let file = path.display();
    if header.seed != id.seed || header.config_sha256 != id.config_sha256 {
        bail!("{file}: checkpoint was written with another configuration or seed; delete it to start over");
    }
    if header.catalog_sha256 != id.catalog_sha256 {
        bail!("{file}: checkpoint was written for another catalog (SHA-256 differs)");
    }
    Ok(())
}

/// The state a checkpoint's body holds, as its header describes it.
fn decode(path: &Path, header: Header, bytes: &[u8], hlen: usize) -> Result<FitState> {
    let file = path.display();
    let body = &bytes[18 + hlen..];
    let residual_len = if header.residual_len == 0 {
        header.n_x
    } else {
        header.residual_len
    };
    let need = residual_len
        .checked_mul(header.n_residuals.saturating_add(header.n_shifts))
        .and_then(|n| n.checked_add(header.n_x))
        .and_then(|n| n.checked_add(header.n_sig))
        .and_then(|n| n.checked_mul(8));
    if Some(body.len()) != need {
        bail!(
            "{file}: checkpoint body has {} bytes, the header describes {need:?}",
            body.len()
        );
    }
    let mut vals = body
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")));
    let mut take = |n: usize| -> Vec<f64> { (&mut vals).take(n).collect() };
    let x = take(header.n_x);
    let xsig = take(header.n_sig);
    let residuals = (0..header.n_residuals)
        .map(|_| take(residual_len))
        .collect();
    let shifts = (0..header.n_shifts).map(|_| take(residual_len)).collect();
    Ok(FitState {
        stage: header.stage,
        iteration: header.iteration,
        vi: MgviState {
            x,
            xsig,
            residuals,
            shifts,
        },
        history: header.history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run identity for tests: `seed` with fixed digests.
    fn test_id(seed: u64) -> RunId {
        RunId {
            seed,
            config_sha256: "a".into(),
            catalog_sha256: "b".into(),
        }
    }

    #[test]
    fn a_history_figure_that_is_not_a_number_survives_the_round_trip() {
        // JSON has no NaN: serde_json writes null, which once made the checkpoint of a fit
        // whose scale update returned NaN unreadable ("corrupt checkpoint header")
        let row: HistoryRow = serde_json::from_str(
            r#"{"stage":0,"iteration":1,"n_stars":5,"kl":-3.5,"newton_steps":1,"newton_cg":2,
                "sample_cg":3,"seconds":0.5,"peak_rss_bytes":1,"grad_norm":null,
                "scale_mean":null,"scale_std":0.25}"#,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.ckpt");
        let id = test_id(3);
        let st = FitState {
            stage: 0,
            iteration: 1,
            vi: MgviState {
                x: vec![0.5],
                xsig: vec![],
                residuals: vec![],
                shifts: vec![],
            },
            history: vec![HistoryRow {
                step: f64::NAN,
                ..row
            }],
        };
        save(&p, &id, &st).unwrap();
        let back = &load(&p, &id).unwrap().history[0];
        assert!(back.grad_norm.is_nan() && back.scale_mean.is_nan() && back.step.is_nan());
        assert_eq!((back.kl, back.scale_std), (-3.5, 0.25));
    }

    #[test]
    fn round_trip_is_bit_exact_and_checks_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.ckpt");
        let id = test_id(3);
        let st = FitState {
            stage: 1,
            iteration: 2,
            vi: MgviState {
                x: vec![0.1, -3.5e-300, f64::MAX],
                xsig: vec![1.0 / 3.0],
                residuals: vec![vec![1.0, 2.0, 3.0, 0.25], vec![-1.0, 0.0, 7.5, -4.0]],
                shifts: vec![vec![0.5, -0.25, 0.0, 1.0], vec![1e-3, 2.0, -3.0, 0.0]],
            },
            history: vec![],
        };
        save(&p, &id, &st).unwrap();
        assert_eq!(load(&p, &id).unwrap(), st);
        assert!(is_checkpoint(&p));
        assert!(summary(&p)
            .unwrap()
            .contains("stage 1 after 2 global iterations"));
        let other = test_id(4);
        assert!(load(&p, &other).is_err());
    }

    #[test]
    fn truncated_or_damaged_checkpoints_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.ckpt");
        let id = test_id(1);
        let st = FitState {
            stage: 0,
            iteration: 1,
            vi: MgviState {
                x: vec![1.0; 50],
                xsig: vec![0.5; 7],
                residuals: vec![vec![2.0; 50]],
                shifts: Vec::new(),
            },
            history: vec![],
        };
        save(&p, &id, &st).unwrap();
        let good = std::fs::read(&p).unwrap();
        assert!(verify(&p).is_ok());
        for cut in [good.len() - 1, good.len() / 2, 40, 12] {
            std::fs::write(&p, &good[..cut]).unwrap();
            let e = format!("{:#}", load(&p, &id).unwrap_err());
            assert!(e.contains("c.ckpt"), "{e}");
            assert!(verify(&p).is_err());
        }
        for at in [5, 15, 30, good.len() / 2, good.len() - 3] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&p, &bad).unwrap();
            assert!(load(&p, &id).is_err(), "flipped byte {at} went unnoticed");
        }
    }
}
