//! dust3d's HEALPix layer (cdshealpix, NESTED) against values computed once with healpy
//! (scripts/make_healpy_fixture.py): pixel centres, neighbours, ang2pix and the angular
//! interpolation weights of `get_interp_weights` (which dustmaps uses).

use dust3d::sphere::grid;
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/healpy_nested.json"
    ))
    .expect("fixture present");
    serde_json::from_str(&text).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn centres_neighbours_and_ang2pix_match_healpy() {
    let fx = fixture();
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let nside = case["nside"].as_u64().unwrap() as u32;
        let pix = i64s(&case["pix"]);
        let l = f64s(&case["l_deg"]);
        let b = f64s(&case["b_deg"]);
        for (k, &p) in pix.iter().enumerate() {
            let (pl, pb) = grid::pix2ang(nside, p as u64);
            let dl = ((pl - l[k] + 180.0).rem_euclid(360.0) - 180.0) * pb.to_radians().cos();
            assert!(
                dl.abs() < 1e-9 && (pb - b[k]).abs() < 1e-9,
                "nside {nside} pix {p}: centre"
            );
            let want = i64s(&case["neighbours"][k]);
            let got: Vec<i64> = grid::neighbours(nside, p as u64)
                .iter()
                .map(|n| n.map_or(-1, |v| v as i64))
                .collect();
            assert_eq!(got, want, "nside {nside} pix {p}: neighbours");
            checked += 1;
        }
        let ql = f64s(&case["query_l_deg"]);
        let qb = f64s(&case["query_b_deg"]);
        let want = i64s(&case["ang2pix"]);
        for k in 0..ql.len() {
            assert_eq!(
                grid::ang2pix(nside, ql[k], qb[k]) as i64,
                want[k],
                "nside {nside} ang2pix #{k}"
            );
        }
    }
    assert!(checked > 200);
}

#[test]
fn interpolation_weights_match_healpy_get_interp_weights() {
    let fx = fixture();
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let nside = case["nside"].as_u64().unwrap() as u32;
        let layer = cdshealpix::nested::get(grid::depth_of_nside(nside).unwrap());
        let l = f64s(&case["interp_l_deg"]);
        let b = f64s(&case["interp_b_deg"]);
        for k in 0..l.len() {
            let (pix, w) = dust3d::products::query::angular_weights(layer, l[k], b[k]);
            let want_p = i64s(&case["interp_pix"][k]);
            let want_w = f64s(&case["interp_w"][k]);
            // compare as pixel -> weight maps: a pixel may appear twice near the poles
            let mut got = std::collections::BTreeMap::<i64, f64>::new();
            let mut want = std::collections::BTreeMap::<i64, f64>::new();
            for j in 0..4 {
                *got.entry(pix[j] as i64).or_default() += w[j];
                *want.entry(want_p[j]).or_default() += want_w[j];
            }
            got.retain(|_, v| *v > 1e-13);
            want.retain(|_, v| *v > 1e-13);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "nside {nside} point #{k} (l {}, b {}): pixels",
                l[k],
                b[k]
            );
            for (p, v) in &got {
                assert!(
                    (v - want[p]).abs() < 1e-12,
                    "nside {nside} point #{k}: weight of {p}: {v} vs {}",
                    want[p]
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 1500);
}
