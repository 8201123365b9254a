use super::*;

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn unknown_key_named_with_line() {
    let err = Config::from_toml("seed = 1\n[grid]\nnsid0 = 4\n", "x.toml").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("x.toml"), "{msg}");
    assert!(msg.contains("nsid0"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
}

#[test]
fn config_errors_carry_their_key() {
    let err =
        Config::from_toml("[[inference.stage]]\nstar_fraction = 2.0\n", "z.toml").unwrap_err();
    let e = err
        .chain()
        .find_map(|e| e.downcast_ref::<ConfigError>())
        .expect("a ConfigError in the chain");
    assert_eq!(e.key, "inference.stage[0].star_fraction");
    assert!(format!("{err:#}").starts_with("z.toml, line 2: invalid configuration: "));
}

#[test]
fn semantic_error_names_key() {
    let err = Config::from_toml("[kernel]\nstd = -1.0\n", "y.toml").unwrap_err();
    assert!(format!("{err:#}").contains("kernel.std"));
    let err = Config::from_toml("[[inference.stage]]\nlevels = 9\n", "y.toml").unwrap_err();
    assert!(format!("{err:#}").contains("inference.stage[0].levels"));
}

#[test]
fn shipped_configs_parse() {
    for f in [
        "configs/demo.toml",
        "configs/paper.toml",
        "configs/paper-mini.toml",
        "configs/zgr23.toml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        Config::from_file(&path).unwrap_or_else(|e| panic!("{f}: {e:#}"));
    }
}

#[test]
fn non_finite_numbers_and_zero_counts_are_refused_with_their_key() {
    for (text, key) in [
        ("[prior]\noffset_mean = nan\n", "prior.offset_mean"),
        (
            "[[inference.stage]]\nnewton_cg_iterations = 0\n",
            "inference.stage[0].newton_cg_iterations",
        ),
        (
            "[[inference.stage]]\nsample_cg_tolerance = 0.0\n",
            "inference.stage[0].sample_cg_tolerance",
        ),
    ] {
        let err = Config::from_toml(text, "k.toml").unwrap_err();
        let e = err
            .chain()
            .find_map(|e| e.downcast_ref::<ConfigError>())
            .unwrap_or_else(|| panic!("{err:#}"));
        assert_eq!(e.key, key);
    }
}

#[test]
fn every_bad_value_is_named_with_its_key_and_line() {
    // (file text, key the error must carry, line it must give)
    let cases = [
        ("[grid]\nlevels = 33\n", "grid.levels", 2),
        ("[prior]\noffset_mean = 800.0\n", "prior.offset_mean", 2),
        ("[grid]\nnside0 = 3\n", "grid.nside0", 2),
        ("[grid]\nn_r0 = 2\n", "grid.n_r0", 2),
        ("[grid]\nr_min_pc = 0.0\n", "grid.r_min_pc", 2),
        ("[grid]\nr_max_pc = inf\n", "grid.r_max_pc", 2),
        ("[grid]\npadding = 40\n", "grid.padding", 2),
        ("seed = 2\n[kernel]\n\nstd = -1.0\n", "kernel.std", 4),
        ("[kernel]\nlength_pc = nan\n", "kernel.length_pc", 2),
        ("[prior]\noffset_mean = nan\n", "prior.offset_mean", 2),
        ("[noise]\nnsigma_shape = inf\n", "noise.nsigma_shape", 2),
        ("[catalog]\nd_max_pc = -5.0\n", "catalog.d_max_pc", 2),
        (
            "[catalog.columns]\nparallax = \"est[4]\"\n",
            "catalog.columns.parallax",
            2,
        ),
        ("[catalog]\nframe = \"fk4\"\n", "", 0),
        (
            "[output]\nr_min_pc = 100.0\nr_max_pc = 50.0\n",
            "output.r_max_pc",
            3,
        ),
        ("[parallel]\nnside_dec = 3\n", "parallel.nside_dec", 2),
        (
            "[validation]\nholdout_fraction = 1.0\n",
            "validation.holdout_fraction",
            2,
        ),
        ("[simulate]\nn_stars = 0\n", "simulate.n_stars", 2),
        (
            "[distances]\nprior = \"exponential\"\nlength_pc = -1.0\n",
            "distances.length_pc",
            3,
        ),
        (
            "[distances]\nprior = \"volume\"\nrange_pc = [0.0, 500.0]\n",
            "distances.range_pc",
            3,
        ),
        (
            "[distances]\nprior = \"volume\"\nrange_pc = [600.0, 500.0]\n",
            "distances.range_pc",
            3,
        ),
        (
            "[distances]\nrange_pc = [40.0, 500.0]\n",
            "distances.range_pc",
            2,
        ),
        (
            "[[inference.stage]]\niterations = 2\n[[inference.stage]]\nsample_pairs = 0\n",
            "inference.stage[1].sample_pairs",
            4,
        ),
        (
            "[[inference.stage]]\nsample_mode = \"geovi\"\ngeovi_newton_steps = 0\n",
            "inference.stage[0].geovi_newton_steps",
            3,
        ),
        (
            "[grid]\nlevels = 2\nvariance_rtol = 0.0\n",
            "grid.variance_rtol",
            3,
        ),
        (
            "[noise]\nmarginalise_nsigma = true\nsample_nsigma = true\n",
            "noise.marginalise_nsigma",
            2,
        ),
        (
            "[noise]\nmarginalise_nsigma = true\n[[inference.stage]]\nsample_mode = \"geovi\"\n",
            "inference.stage[0].sample_mode",
            4,
        ),
        (
            "[[inference.stage]]\niterations = 2\ndistance_variance = false\n[[inference.stage]]\n\
             [[inference.stage]]\ndistance_variance = false\n",
            "inference.stage[2].distance_variance",
            6,
        ),
        (
            "[grid]\nvariance_max_draws = 8\n",
            "grid.variance_max_draws",
            2,
        ),
        (
            "[simulate]\nstar_nsigma = \"half\"\n",
            "simulate.star_nsigma",
            2,
        ),
        (
            "[[inference.stage]]\nmax_distance_pc = -1.0\n",
            "inference.stage[0].max_distance_pc",
            2,
        ),
        (
            "[[inference.stage]]\nkl_rtol = nan\n",
            "inference.stage[0].kl_rtol",
            2,
        ),
    ];
    for (text, key, line) in cases {
        let err = Config::from_toml(text, "c.toml").unwrap_err();
        if key.is_empty() {
            // refused by the schema itself: the TOML error gives line and column
            assert!(format!("{err:#}").contains("line 2"), "{err:#}");
            continue;
        }
        let e = err
            .chain()
            .find_map(|e| e.downcast_ref::<ConfigError>())
            .unwrap_or_else(|| panic!("no ConfigError for {text:?}: {err:#}"));
        assert_eq!(e.key, key, "{text:?}");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("c.toml, line {line}: ")),
            "{text:?}: {msg}"
        );
    }
}

#[test]
fn an_exponential_distance_prior_without_its_length_is_refused() {
    let err = Config::from_toml("[distances]\nprior = \"exponential\"\n", "c.toml").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("distances.length_pc"), "{msg}");
    let ok = "[distances]\nprior = \"exponential\"\nlength_pc = 800.0\n";
    let cfg = Config::from_toml(ok, "c.toml").unwrap();
    assert_eq!(
        cfg.distance_prior(),
        crate::likelihood::distance::DistancePrior::Exponential {
            length_pc: 800.0,
            min_pc: 0.0,
            max_pc: f64::INFINITY
        }
    );
}

#[test]
fn key_lines_follow_tables_and_arrays_of_tables() {
    let text = "seed = 1\n[grid] # comment\nlevels = 3\n[[inference.stage]]\niterations = 1\n\
                [[inference.stage]]\nlevels = 2\n[catalog.columns]\nl = \"glon\"\n";
    assert_eq!(key_line(text, "seed"), Some((1, true)));
    assert_eq!(key_line(text, "grid.levels"), Some((3, true)));
    assert_eq!(key_line(text, "grid"), Some((2, true)));
    assert_eq!(key_line(text, "inference.stage[1].levels"), Some((7, true)));
    assert_eq!(
        key_line(text, "inference.stage[0].levels"),
        Some((4, false))
    );
    assert_eq!(key_line(text, "catalog.columns.l"), Some((9, true)));
    assert_eq!(key_line(text, "kernel.std"), None);
    // a key left at its default says so, with the line of its table
    let err = Config::from_toml("seed = 1\n[grid]\nr_min_pc = 3000.0\n", "d.toml").unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with("d.toml (key `grid.r_max_pc` unset in the table at line 2: its default)"),
        "{msg}"
    );
}

#[test]
fn the_default_decomposition_distributes_every_stage_chart() {
    // grid levels 2 (nside 2 → 8): 8 is capped at nside(1) = 4 where the last refinement
    // starts, and a stage with 1 level (ending at nside 4, refined from nside 2) lowers it
    // to 2; an explicit value stays
    let mut cfg = Config::default();
    cfg.grid.nside0 = 2;
    cfg.grid.levels = 2;
    assert_eq!(cfg.nside_dec().unwrap(), 4);
    cfg.inference.stage[0].levels = Some(1);
    assert_eq!(cfg.nside_dec().unwrap(), 2);
    cfg.parallel.nside_dec = Some(4);
    assert_eq!(cfg.nside_dec().unwrap(), 4);
}
