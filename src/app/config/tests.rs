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
    assert!(format!("{err:#}").starts_with("z.toml: invalid configuration: "));
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
    for f in ["configs/demo.toml", "configs/paper.toml"] {
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
