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
