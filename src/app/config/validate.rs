//! The semantic checks of a configuration: every key's value in its allowed range, each
//! error a [`ConfigError`] naming the key, and the line of the file it came from.

use anyhow::Result;

use super::{invalid, Config, ConfigError, KernelKind};

/// Largest |prior.offset_mean| accepted (ln ρ at the prior median).
const MAX_LN_DENSITY: f64 = 300.0;

impl Config {
    /// Semantic checks; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.validate_grid()?;
        self.validate_output()?;
        self.validate_distances()?;
        self.validate_kernel()?;
        self.validate_prior_and_noise()?;
        self.validate_backend()?;
        self.validate_catalog()?;
        self.validate_inference()?;
        if let Some(n) = self.parallel.nside_dec {
            let chart = self.chart()?;
            if !n.is_power_of_two() || n > chart.nside_final() {
                return Err(invalid(
                    "parallel.nside_dec",
                    format!(
                        "parallel.nside_dec must be a power of two ≤ the map nside {}, got {n}",
                        chart.nside_final()
                    ),
                ));
            }
        }
        self.simulate.validate()?;
        let h = self.validation.holdout_fraction;
        if !((0.0..1.0).contains(&h)) {
            return Err(invalid(
                "validation.holdout_fraction",
                format!("validation.holdout_fraction must be in [0, 1), got {h}"),
            ));
        }
        Ok(())
    }

    /// `[kernel]`: a positive, finite amplitude and length, and a spectrum file where the
    /// kernel is a tabulated spectrum.
    fn validate_kernel(&self) -> Result<()> {
        let k = &self.kernel;
        if !(k.std > 0.0 && k.std.is_finite()) {
            return Err(invalid(
                "kernel.std",
                format!("kernel.std must be > 0, got {}", k.std),
            ));
        }
        if !(k.length_pc > 0.0 && k.length_pc.is_finite()) {
            return Err(invalid(
                "kernel.length_pc",
                format!("kernel.length_pc must be > 0, got {}", k.length_pc),
            ));
        }
        if k.kind == KernelKind::Spectrum && k.spectrum_file.is_none() {
            return Err(invalid(
                "kernel.spectrum_file",
                "kernel.kind = \"spectrum\" needs kernel.spectrum_file",
            ));
        }
        Ok(())
    }

    /// `[prior]` and `[noise]`: finite values, positive widths, a prior median of ln ρ that
    /// exp can take, and n_σ either marginalised or sampled.
    fn validate_prior_and_noise(&self) -> Result<()> {
        let p = &self.prior;
        for (key, v) in [
            ("prior.scale_mean", p.scale_mean),
            ("prior.scale_std", p.scale_std),
            ("prior.offset_mean", p.offset_mean),
            ("prior.offset_std", p.offset_std),
            ("noise.nsigma_shape", self.noise.nsigma_shape),
            ("noise.nsigma_scale", self.noise.nsigma_scale),
        ] {
            if !v.is_finite() {
                return Err(invalid(
                    key,
                    format!("{key} must be a finite number, got {v}"),
                ));
            }
        }
        if !(p.scale_mean > 0.0 && p.scale_std > 0.0 && p.offset_std > 0.0) {
            return Err(invalid(
                "prior",
                "prior.scale_mean, prior.scale_std and prior.offset_std must be > 0",
            ));
        }
        if p.offset_mean.abs() > MAX_LN_DENSITY {
            return Err(invalid(
                "prior.offset_mean",
                format!(
                    "prior.offset_mean = {} is ln ρ at the prior median: beyond ±{MAX_LN_DENSITY} \
                     no density unit makes sense and ρ = e^(ln ρ) overflows past 709 (the \
                     paper's -6.91 is ρ ≈ 1e-3 E per pc)",
                    p.offset_mean
                ),
            ));
        }
        let n = &self.noise;
        if !(n.nsigma_shape > 0.0 && n.nsigma_scale > 0.0) {
            return Err(invalid(
                "noise.nsigma_shape",
                "noise.nsigma_shape and noise.nsigma_scale must be > 0",
            ));
        }
        if n.marginalise_nsigma && n.sample_nsigma {
            return Err(invalid(
                "noise.marginalise_nsigma",
                "noise.marginalise_nsigma integrates n_σ out: it cannot also be sampled \
                 (noise.sample_nsigma = true)",
            ));
        }
        Ok(())
    }

    /// `[backend]` against the rest: one way to name the devices, and the settings that run
    /// on the CPU backend only (the n_σ-marginal likelihood and, with it, no geoVI).
    fn validate_backend(&self) -> Result<()> {
        if self.backend.device.is_some() && !self.backend.devices.is_empty() {
            return Err(invalid(
                "backend.devices",
                "backend.device names one OpenCL device for every rank and backend.devices \
                 shares a list out by node-local rank: set one of them",
            ));
        }
        let n = &self.noise;
        if n.marginalise_nsigma && self.backend.kind == super::BackendKind::Opencl {
            return Err(invalid(
                "noise.marginalise_nsigma",
                "noise.marginalise_nsigma runs on the CPU backend only (backend.kind = \"cpu\")",
            ));
        }
        if let Some(k) = self
            .inference
            .stage
            .iter()
            .position(|s| n.marginalise_nsigma && s.sample_mode == super::SampleModeName::Geovi)
        {
            return Err(invalid(
                format!("inference.stage[{k}].sample_mode"),
                "geoVI's coordinates assume the Gaussian likelihood: with \
                 noise.marginalise_nsigma use sample_mode = \"mgvi\"",
            ));
        }
        Ok(())
    }

    /// The chart's own checks ([`Chart::new`](crate::sphere::grid::Chart::new)), each error
    /// keyed by the `[grid]` field it names.
    fn validate_grid(&self) -> Result<()> {
        let g = &self.grid;
        if !(g.variance_rtol > 0.0 && g.variance_rtol.is_finite()) {
            return Err(invalid(
                "grid.variance_rtol",
                format!("grid.variance_rtol must be > 0, got {}", g.variance_rtol),
            ));
        }
        if g.variance_max_draws < 16 {
            return Err(invalid(
                "grid.variance_max_draws",
                format!(
                    "grid.variance_max_draws must be ≥ 16 (two batches of 8 draws), got {}",
                    g.variance_max_draws
                ),
            ));
        }
        match self.chart() {
            Ok(_) => Ok(()),
            Err(e) => match e.downcast_ref::<crate::sphere::grid::ChartError>() {
                Some(c) => Err(invalid(format!("grid.{}", c.field), c.message.clone())),
                None => Err(e),
            },
        }
    }

    fn validate_distances(&self) -> Result<()> {
        use super::DistancePriorName as Name;
        let d = &self.distances;
        if d.prior == Name::Parallax && (d.range_pc.is_some() || d.length_pc.is_some()) {
            let key = if d.range_pc.is_some() {
                "distances.range_pc"
            } else {
                "distances.length_pc"
            };
            return Err(invalid(
                key,
                "distances.range_pc and distances.length_pc belong to the \"volume\" and \
                 \"exponential\" priors; distances.prior is \"parallax\"",
            ));
        }
        if let Some([lo, hi]) = d.range_pc {
            // NaN fails every comparison; max may be infinite
            let ordered = lo >= 0.0 && lo.is_finite() && hi > lo;
            if !ordered {
                return Err(invalid(
                    "distances.range_pc",
                    format!("distances.range_pc must be [min, max] with 0 <= min < max, got [{lo}, {hi}]"),
                ));
            }
            if d.prior == Name::Volume && (lo == 0.0 || hi.is_infinite()) {
                return Err(invalid(
                    "distances.range_pc",
                    format!(
                        "a \"volume\" prior (∝ d²) needs a finite range with min > 0, got \
                         [{lo}, {hi}]"
                    ),
                ));
            }
        }
        match (d.prior, d.length_pc) {
            (Name::Exponential, None) => Err(invalid(
                "distances.length_pc",
                "distances.prior = \"exponential\" needs distances.length_pc (pc)",
            )),
            (Name::Exponential, Some(l)) if !(l > 0.0 && l.is_finite()) => Err(invalid(
                "distances.length_pc",
                format!("distances.length_pc must be > 0, got {l}"),
            )),
            (Name::Volume, Some(_)) => Err(invalid(
                "distances.length_pc",
                "distances.length_pc belongs to the \"exponential\" prior",
            )),
            _ => Ok(()),
        }
    }

    fn validate_output(&self) -> Result<()> {
        let o = &self.output;
        for (key, v) in [
            ("output.r_min_pc", o.r_min_pc),
            ("output.r_max_pc", o.r_max_pc),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(invalid(
                        key,
                        format!("{key} must be a finite number > 0, got {v}"),
                    ));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (o.r_min_pc, o.r_max_pc) {
            if lo >= hi {
                return Err(invalid(
                    "output.r_max_pc",
                    format!("output.r_max_pc ({hi}) must be above output.r_min_pc ({lo})"),
                ));
            }
        }
        Ok(())
    }

    fn validate_catalog(&self) -> Result<()> {
        let c = &self.catalog;
        let n = &c.columns;
        for (key, name) in [
            ("l", Some(&n.l)),
            ("b", Some(&n.b)),
            ("ra", Some(&n.ra)),
            ("dec", Some(&n.dec)),
            ("parallax", Some(&n.parallax)),
            ("parallax_error", Some(&n.parallax_error)),
            ("extinction", Some(&n.extinction)),
            ("extinction_error", Some(&n.extinction_error)),
            ("source_id", n.source_id.as_ref()),
            ("quality", n.quality.as_ref()),
        ] {
            if let Some(name) = name {
                if let Err(e) = crate::data::catalog::array_column(name) {
                    return Err(invalid(format!("catalog.columns.{key}"), format!("{e:#}")));
                }
            }
        }
        if c.quality_below.is_some() && c.columns.quality.is_none() {
            return Err(invalid(
                "catalog.quality_below",
                "catalog.quality_below needs catalog.columns.quality",
            ));
        }
        for (key, v) in [
            ("catalog.d_max_pc", c.d_max_pc),
            ("catalog.d_min_pc", c.d_min_pc),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(invalid(
                        key.to_string(),
                        format!("{key} must be > 0, got {v}"),
                    ));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (c.d_min_pc, c.d_max_pc) {
            if lo >= hi {
                return Err(invalid(
                    "catalog.d_min_pc",
                    format!("catalog.d_min_pc ({lo}) must be below catalog.d_max_pc ({hi})"),
                ));
            }
        }
        Ok(())
    }

    fn validate_inference(&self) -> Result<()> {
        if self.inference.stage.is_empty() {
            return Err(invalid(
                "inference.stage",
                "inference.stage: the schedule needs at least one stage",
            ));
        }
        let last = self.inference.stage.len() - 1;
        for (i, s) in self.inference.stage.iter().enumerate() {
            self.validate_stage(i, s, i == last)?;
            stage_numbers(&format!("inference.stage[{i}]"), s)?;
        }
        Ok(())
    }

    /// Stage `i` against the schedule and the grid: the full likelihood in the `last` stage,
    /// no more levels than the grid has, a usable distance limit.
    fn validate_stage(&self, i: usize, s: &super::StageConfig, last: bool) -> Result<()> {
        let key = format!("inference.stage[{i}]");
        if !s.distance_variance && last {
            return Err(invalid(
                format!("{key}.distance_variance"),
                format!(
                    "{key}.distance_variance = false in the last stage: the map must come \
                     from the full likelihood (use it in earlier stages only)"
                ),
            ));
        }
        if let Some(l) = s.levels {
            if l > self.grid.levels {
                return Err(invalid(
                    format!("{key}.levels"),
                    format!(
                        "{key}.levels = {l} exceeds grid.levels = {}",
                        self.grid.levels
                    ),
                ));
            }
        }
        if let Some(d) = s.max_distance_pc {
            if !(d > 0.0 && d.is_finite()) {
                return Err(invalid(
                    format!("{key}.max_distance_pc"),
                    format!("{key}.max_distance_pc must be a finite number > 0, got {d}"),
                ));
            }
        }
        Ok(())
    }
}

/// A stage's numbers in their ranges: fractions, tolerances, counts; `key` its table.
fn stage_numbers(key: &str, s: &super::StageConfig) -> Result<()> {
    if !(s.star_fraction > 0.0 && s.star_fraction <= 1.0) {
        return Err(invalid(
            format!("{key}.star_fraction"),
            format!(
                "{key}.star_fraction must be in (0, 1], got {}",
                s.star_fraction
            ),
        ));
    }
    if !(s.newton_forcing > 0.0 && s.newton_forcing < 1.0) {
        return Err(invalid(
            format!("{key}.newton_forcing"),
            format!(
                "{key}.newton_forcing must be in (0, 1), got {}",
                s.newton_forcing
            ),
        ));
    }
    for (name, v) in [
        ("selection_sigma", s.selection_sigma),
        ("kl_rtol", s.kl_rtol),
        ("step_tol", s.step_tol),
        ("map_tol", s.map_tol),
        ("scale_tol", s.scale_tol),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(invalid(
                format!("{key}.{name}"),
                format!("{key}.{name} must be ≥ 0 (0: never stop early), got {v}"),
            ));
        }
    }
    for (name, v) in [
        ("sample_pairs", s.sample_pairs),
        ("iterations", s.iterations),
        ("sample_cg_iterations", s.sample_cg_iterations),
        ("newton_steps", s.newton_steps),
        ("newton_cg_iterations", s.newton_cg_iterations),
        ("geovi_newton_steps", s.geovi_newton_steps),
    ] {
        if v == 0 {
            return Err(invalid(
                format!("{key}.{name}"),
                format!("{key}.{name} must be ≥ 1"),
            ));
        }
    }
    if !(s.sample_cg_tolerance > 0.0 && s.sample_cg_tolerance < 1.0) {
        return Err(invalid(
            format!("{key}.sample_cg_tolerance"),
            format!(
                "{key}.sample_cg_tolerance must be in (0, 1), got {}",
                s.sample_cg_tolerance
            ),
        ));
    }
    Ok(())
}

/// `err` with the place of its key in the file: "<origin>, line N: …" when the key is set
/// there, the line of its table when only that is, else a note that the default applies.
pub(super) fn locate(err: anyhow::Error, text: &str, origin: &str) -> anyhow::Error {
    let Some(key) = err.downcast_ref::<ConfigError>().map(|c| c.key.clone()) else {
        return err.context(format!("{origin}: invalid configuration"));
    };
    let place = match key_line(text, &key) {
        Some((line, true)) => format!("{origin}, line {line}"),
        Some((line, false)) => {
            format!("{origin} (key `{key}` unset in the table at line {line}: its default)")
        }
        None => format!("{origin} (key `{key}` not in the file: its default)"),
    };
    err.context(format!("{place}: invalid configuration"))
}

/// One component of a dotted key: a name and, for arrays of tables, an index.
type Part = (String, Option<usize>);

fn parse_key(key: &str) -> Vec<Part> {
    key.split('.')
        .map(|p| match p.find('[') {
            Some(i) => (
                p[..i].to_string(),
                p[i + 1..].trim_end_matches(']').parse().ok(),
            ),
            None => (p.to_string(), None),
        })
        .collect()
}

/// The 1-based line where `key` (`a.b`, `a.b[i].c`) is set in TOML `text`, with `true`; or
/// the header line of the deepest table of the key that the file has, with `false`.
/// Reads headers (`[a.b]`, `[[a.b]]`) and `name = value` lines, the forms configurations use.
pub fn key_line(text: &str, key: &str) -> Option<(usize, bool)> {
    let want = parse_key(key);
    let mut here: Vec<Part> = Vec::new();
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    let mut best: Option<(usize, usize)> = None; // (matched parts, line)
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if let Some(h) = line.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
            let n = arrays.entry(h.trim().to_string()).or_insert(0);
            here = parse_key(h.trim());
            if let Some(last) = here.last_mut() {
                last.1 = Some(*n);
            }
            *n += 1;
        } else if let Some(h) = line.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            here = parse_key(h.trim());
        } else if let Some((name, _)) = line.split_once('=') {
            let mut full = here.clone();
            full.extend(parse_key(name.trim().trim_matches('"')));
            if full == want {
                return Some((i + 1, true));
            }
            continue;
        } else {
            continue;
        }
        let matched = here.len();
        if matched <= want.len() && want[..matched] == here[..] {
            if matched == want.len() {
                return Some((i + 1, true));
            }
            if best.is_none_or(|(m, _)| matched >= m) {
                best = Some((matched, i + 1));
            }
        }
    }
    best.map(|(_, line)| (line, false))
}
