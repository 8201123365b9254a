use dust3d::bench::*;
use dust3d::model::Model;
use dust3d::icr::Icr;
use std::time::Instant;
fn main() {
    let p = preset("w1").unwrap();
    let cfg = preset_config(&p);
    let sim = dust3d::simulate::run(&cfg, "").unwrap();
    let icr = Icr::new(&p.chart, &p.kernel, dust3d::config::Precision::F64).unwrap();
    let mut x = dust3d::simulate::prior_excitations(cfg.seed, icr.n_xi());
    x.extend([0.0, 0.0]);
    let pc = sim.catalog.into_pixel_layout(p.chart.nside_final());
    let model = Model::new(&cfg, icr, &pc).unwrap();
    let xs = vec![0.0; model.data.len()];
    let mut w = model.workspace();
    let mut st = model.state(&x, &xs, &mut w);
    let (mut gx, mut gs) = (vec![0.0; model.n_params()], vec![0.0; model.data.len()]);
    let mut iw = model.icr.workspace();
    let nxi = model.icr.n_xi();
    let f = vec![0.5; model.icr.n_field()];
    let mut xb = vec![0.0; nxi];
    let ca = vec![0.1; model.data.len()];
    for _ in 0..3 {
        let t = Instant::now(); model.icr.forward(&x[..nxi], &mut iw); let a = t.elapsed().as_secs_f64();
        let t = Instant::now(); model.icr.adjoint(&f, &mut xb, &mut iw); let b = t.elapsed().as_secs_f64();
        let t = Instant::now(); model.update_state(&x, &xs, &mut st, &mut w); let c = t.elapsed().as_secs_f64();
        let t = Instant::now(); let e = model.energy(&st, &x, &xs); let d = t.elapsed().as_secs_f64();
        let t = Instant::now(); model.gradient(&st, &x, &xs, &mut gx, &mut gs, &mut w); let g = t.elapsed().as_secs_f64();
        let t = Instant::now(); model.vjp(&st, &ca, &ca, &mut gx, &mut w); let v = t.elapsed().as_secs_f64();
        println!("icr fwd {a:.4} adj {b:.4} state {c:.4} energy {d:.4} grad {g:.4} vjp {v:.4} ({e:.3e})");
    }
}
