//! Every distributed operation of dust3d on a small simulated sky, written in a canonical
//! order (replicated values, then patch by patch) so that runs on any rank count can be
//! compared value by value. Run by `tests/mpi.rs` under `mpirun -n 1, 2, 4` and as a plain
//! process: `mpi_ops OUT.json [nside_dec]`.

use std::sync::Arc;

use anyhow::Result;
use dust3d::app::config::Config;
use dust3d::base::comm;
use dust3d::inference::mgvi::{self, Fisher, Kl, ModelAt};
use dust3d::inference::newton::MetricObjective;
use dust3d::likelihood::model::Model;
use dust3d::sphere::decomp::{Space, VecLayout};
use rand::Rng;
use rand_distr::StandardNormal;

const CONFIG: &str = r#"
seed = 5
[grid]
nside0 = 1
n_r0 = 6
levels = 3
padding = 1
r_min_pc = 50.0
r_max_pc = 800.0
[simulate]
n_stars = 3000
star_r_min_pc = 55.0
star_r_max_pc = 850.0
"#;

/// A vector of `layout` with standard normals drawn per patch (rank-count independent).
fn random(layout: &VecLayout, seed: u64) -> Vec<f64> {
    let mut v = vec![0.0; layout.len];
    let mut rng = dust3d::base::rng::stream(seed, 0);
    for i in layout.rep.iter().flat_map(|r| r.clone()) {
        v[i] = rng.sample(StandardNormal);
    }
    let first = layout.decomp.patches().start;
    for (k, rs) in layout.patch.iter().enumerate() {
        let mut rng = dust3d::base::rng::stream(seed, (first + k + 1) as u64);
        for i in rs.iter().flat_map(|r| r.clone()) {
            v[i] = rng.sample(StandardNormal);
        }
    }
    v
}

/// All ranks' values of `v` on rank 0: replicated part once, then every patch in order.
fn canonical(layout: &VecLayout, v: &[f64]) -> Vec<f64> {
    let mut out: Vec<f64> = layout
        .rep
        .iter()
        .flat_map(|r| v[r.clone()].to_vec())
        .collect();
    let mine: Vec<f64> = layout
        .patch
        .iter()
        .flat_map(|rs| rs.iter().flat_map(|r| v[r.clone()].to_vec()))
        .collect();
    let counts = comm::all_gather_u64(&[mine.len() as u64], &vec![1; comm::size()]);
    let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
    out.extend(comm::all_gather_f64(&mine, &counts));
    out
}

/// Layout of a per-pixel field with `per_pixel` values per final pixel.
fn field_layout(model: &Model, per_pixel: usize) -> VecLayout {
    let k = model.dom.pix_per_patch * per_pixel;
    VecLayout {
        decomp: model.dom.decomp.clone(),
        rep: vec![],
        patch: (0..model.dom.x.patch.len())
            .map(|q| std::iter::once(q * k..(q + 1) * k).collect())
            .collect(),
        len: model.npix() * per_pixel,
    }
}

fn main() -> Result<()> {
    let _mpi = comm::init();
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .expect("usage: mpi_ops OUT.json [nside_dec]")
        .clone();
    let mut cfg: Config = toml::from_str(CONFIG)?;
    cfg.parallel.nside_dec = Some(args.get(2).map_or(Ok(2), |s| s.parse())?);
    let chart = cfg.chart()?;
    let sim = dust3d::app::simulate::run(&cfg, "")?;
    let decomp = dust3d::data::catalog::balance(cfg.nside_dec()?, &chart, &sim.catalog)?;
    let icr = Arc::new(dust3d::app::build::icr(&cfg, decomp)?);
    let stars = sim
        .catalog
        .into_pixel_range(chart.nside_final(), icr.final_pixels());
    let model = dust3d::app::build::model(&cfg, icr.clone(), &stars)?;
    let dom = model.dom.clone();
    let nc = chart.n_r(chart.levels);
    let fl = field_layout(&model, nc);
    let mut res: Vec<(String, Vec<f64>)> = Vec::new();
    let mut w = model.workspace();
    let mut iw = icr.workspace();

    // ICR forward and adjoint, and the adjoint identity with global dots
    let x = random(&dom.x, 11)
        .iter()
        .map(|v| 0.3 * v)
        .collect::<Vec<_>>();
    let nxi = icr.n_xi();
    icr.forward(&x[..nxi], &mut iw);
    let s = iw.fields[chart.levels][..icr.n_field()].to_vec();
    let sbar = random(&fl, 12);
    let mut xibar = vec![0.0; dom.x.len];
    icr.adjoint(&sbar, &mut xibar[..nxi], &mut iw);
    let lhs = fl.dot(&s, &sbar);
    let rhs = dom.x.dot(&x, &xibar);
    let rel = (lhs - rhs).abs() / lhs.abs().max(rhs.abs());
    assert!(rel < 1e-12, "adjoint identity {lhs} vs {rhs} ({rel:e})");
    res.push(("icr_forward".into(), canonical(&fl, &s)));
    res.push(("icr_adjoint".into(), canonical(&dom.x, &xibar)));
    res.push(("adjoint_identity".into(), vec![lhs, rhs]));

    // energy, gradient, value+gradient, JVP, VJP, metric
    let xsig = random(&dom.stars, 13)
        .iter()
        .map(|v| 0.2 * v)
        .collect::<Vec<_>>();
    let st = model.state(&x, &xsig, &mut w)?;
    let e = model.energy(&st, &x, &xsig);
    let (mut gx, mut gs) = (vec![0.0; dom.x.len], vec![0.0; dom.stars.len]);
    model.gradient(&st, &x, &xsig, &mut gx, &mut gs, &mut w)?;
    let mut st2 = model.empty_state();
    let (mut gx2, mut gs2) = (vec![0.0; dom.x.len], vec![0.0; dom.stars.len]);
    let e2 = model.value_grad(&x, &xsig, &mut st2, &mut gx2, &mut gs2, &mut w)?;
    res.push(("energy".into(), vec![e, e2]));
    res.push(("gradient_x".into(), canonical(&dom.x, &gx)));
    res.push(("gradient_sigma".into(), canonical(&dom.stars, &gs)));
    res.push(("value_grad_x".into(), canonical(&dom.x, &gx2)));
    res.push(("abar".into(), canonical(&dom.stars, &st.abar)));
    let v = random(&dom.x, 14);
    let (mut da, mut dv) = (vec![0.0; dom.stars.len], vec![0.0; dom.stars.len]);
    model.jvp(&st, &v, &mut da, &mut dv, &mut w)?;
    res.push(("jvp_a".into(), canonical(&dom.stars, &da)));
    res.push(("jvp_v".into(), canonical(&dom.stars, &dv)));
    let mut vj = vec![0.0; dom.x.len];
    model.vjp(&st, &da, &dv, &mut vj, &mut w)?;
    res.push(("vjp".into(), canonical(&dom.x, &vj)));
    let mut mv = vec![0.0; dom.x.len];
    model.metric(&st, &v, &mut mv, &mut w)?;
    res.push(("metric".into(), canonical(&dom.x, &mv)));

    // sample-averaged KL metric and value/gradient over [x | ξ_σ]
    let residuals = vec![random(&dom.x, 15)
        .iter()
        .map(|v| 0.1 * v)
        .collect::<Vec<_>>()];
    let mask = mgvi::free_mask();
    let kl = Kl::new(&model, &residuals, &[], &mask);
    let p: Vec<f64> = x.iter().chain(&xsig).copied().collect();
    let vp = random(&dom.p, 16);
    let mut kv = vec![0.0; dom.p.len];
    kl.metric(&p, &vp, &mut kv)?;
    res.push(("kl_metric".into(), canonical(&dom.p, &kv)));
    let mut kg = vec![0.0; dom.p.len];
    let kval = kl.value_grad(&p, &mut kg)?;
    res.push(("kl_value".into(), vec![kval]));
    res.push(("kl_gradient".into(), canonical(&dom.p, &kg)));

    // one MGVI residual (normals per patch, CG with global dots)
    let lin = ModelAt::new(&model, &st, &mask);
    let settings = dust3d::num::cg::CgSettings {
        rel_tol: 1e-6,
        max_iter: 30,
        ..Default::default()
    };
    let (delta, rep, _) = mgvi::draw_residual_in(&lin, 7, 99, &settings)?;
    res.push(("residual".into(), canonical(&dom.x, &delta)));
    res.push((
        "residual_cg".into(),
        vec![rep.iterations as f64, rep.rel_residual],
    ));
    let _ = lin.dim();

    if comm::is_root() {
        let map: serde_json::Map<String, serde_json::Value> = res
            .into_iter()
            .map(|(k, v)| (k, serde_json::json!(v)))
            .collect();
        std::fs::write(&out, serde_json::to_string(&map)?)?;
    }
    Ok(())
}
