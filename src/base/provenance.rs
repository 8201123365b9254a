//! Provenance recorded in every output file: software version, commit, configuration,
//! seed, command line, input checksum and creation time.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Where a product came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    /// dust3d version.
    pub version: String,
    /// Git commit of the build.
    pub git_commit: String,
    /// Full text of the configuration file used.
    pub config: String,
    /// Master seed.
    pub seed: u64,
    /// The command line that produced the file.
    pub command_line: String,
    /// SHA-256 of the input catalog ("" if none).
    pub catalog_sha256: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// How the inference schedule ran, one line per stage ("" where there was none).
    pub schedule: String,
    /// Scores of the held-out stars, a few lines ("" where none were held out).
    pub validation: String,
    /// What the fit warned about its map, one line each ("" where nothing).
    pub warnings: String,
}

impl Provenance {
    /// Provenance of the running process with the given configuration text and seed.
    pub fn current(config: &str, seed: u64, catalog_sha256: &str) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: env!("DUST3D_GIT_COMMIT").to_string(),
            config: config.to_string(),
            seed,
            command_line: std::env::args().collect::<Vec<_>>().join(" "),
            catalog_sha256: catalog_sha256.to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            schedule: String::new(),
            validation: String::new(),
            warnings: String::new(),
        }
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("cannot open {} for checksumming", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
