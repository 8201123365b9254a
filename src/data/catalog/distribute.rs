//! Reading a catalog on many ranks: each reads its share of the rows and sends every star
//! to the rank that owns its pixel; the stars per patch decide the decomposition.

use anyhow::{bail, Result};
use std::path::Path;

use super::{Catalog, CatalogParams, RowPart};
use crate::base::comm;
use crate::sphere::decomp::Decomp;
use crate::sphere::grid::{self, Chart};

/// Every rank reads its share of the file's rows (a block of a FITS or netCDF table, every
/// n-th row of a CSV), validates and selects them, counts stars per patch for the balance,
/// and sends each star to the rank that owns its pixel. Returns the decomposition and this
/// rank's stars in file-row order (so that every rank count sees the same order).
/// `nside_dec` is the nside of the patches ranks own.
pub fn read_distributed(
    params: &CatalogParams,
    nside_dec: u32,
    chart: &Chart,
    path: &Path,
) -> Result<(Decomp, Catalog)> {
    let (rank, size) = (comm::rank(), comm::size());
    let part = RowPart { rank, size };
    let (cat, rows, n_read) = Catalog::read_part_rows(path, params, part)?;
    let total = comm::sum_u64(cat.len() as u64);
    if total == 0 {
        let read = comm::sum_u64(n_read as u64) as usize;
        bail!("{}", super::no_star_message(path, read, params));
    }
    let nside = chart.nside_final();
    let pix: Vec<usize> = (0..cat.len())
        .map(|i| grid::ang2pix(nside, cat.l_deg[i], cat.b_deg[i]) as usize)
        .collect();
    let n_patch = grid::npix(nside_dec);
    let per_patch = grid::npix(nside) / n_patch;
    let mut counts = vec![0u64; n_patch];
    for &p in &pix {
        counts[p / per_patch] += 1;
    }
    let all = comm::all_gather_u64(&counts, &vec![n_patch; size]);
    let counts: Vec<u64> = (0..n_patch)
        .map(|q| (0..size).map(|r| all[r * n_patch + q]).sum())
        .collect();
    let decomp = balance_counts(nside_dec, chart, &counts)?;
    if size == 1 {
        return Ok((decomp, cat));
    }
    // [row, source_id, l, b, ω, σ_ω, A, σ_A] per star, bit-exact through f64 slots
    const W: usize = 8;
    let mut by_dest: Vec<Vec<f64>> = vec![Vec::new(); size];
    for i in 0..cat.len() {
        let v = &mut by_dest[decomp.owner(nside, pix[i])];
        v.extend([
            f64::from_bits(rows[i]),
            f64::from_bits(cat.source_id[i] as u64),
            cat.l_deg[i],
            cat.b_deg[i],
            cat.parallax_mas[i],
            cat.parallax_error_mas[i],
            cat.extinction[i],
            cat.extinction_error[i],
        ]);
    }
    drop(cat);
    let send_counts: Vec<usize> = by_dest.iter().map(Vec::len).collect();
    let sc: Vec<f64> = send_counts.iter().map(|&c| c as f64).collect();
    let ones = vec![1; size];
    let recv_counts: Vec<usize> = comm::all_to_all_f64(&sc, &ones, &ones)
        .iter()
        .map(|&c| c as usize)
        .collect();
    let send: Vec<f64> = by_dest.concat();
    drop(by_dest);
    let recv = comm::all_to_all_f64(&send, &send_counts, &recv_counts);
    drop(send);
    let mut recs: Vec<&[f64]> = recv.chunks_exact(W).collect();
    recs.sort_by_key(|r| r[0].to_bits());
    let mut mine = Catalog::default();
    for r in recs {
        mine.source_id.push(r[1].to_bits() as i64);
        mine.l_deg.push(r[2]);
        mine.b_deg.push(r[3]);
        mine.parallax_mas.push(r[4]);
        mine.parallax_error_mas.push(r[5]);
        mine.extinction.push(r[6]);
        mine.extinction_error.push(r[7]);
    }
    Ok((decomp, mine))
}

/// Decomposition for stars per patch `counts` (see [`balance`]).
fn balance_counts(nside_dec: u32, chart: &Chart, counts: &[u64]) -> Result<Decomp> {
    let per_patch = grid::npix(chart.nside_final()) / counts.len();
    let work: Vec<f64> = counts
        .iter()
        .map(|&c| (per_patch * chart.n_kept()) as f64 + 4.0 * c as f64)
        .collect();
    Decomp::balanced(nside_dec, comm::rank(), comm::size(), &work)
}

/// This process's share of the sky: patches at `nside_dec` in contiguous runs of about
/// equal work (a patch's voxels plus 4 per star: a star costs about four voxels).
pub fn balance(nside_dec: u32, chart: &Chart, cat: &Catalog) -> Result<Decomp> {
    let nside = chart.nside_final();
    let n_patch = grid::npix(nside_dec);
    let per_patch = grid::npix(nside) / n_patch;
    let mut counts = vec![0u64; n_patch];
    for i in 0..cat.len() {
        counts[grid::ang2pix(nside, cat.l_deg[i], cat.b_deg[i]) as usize / per_patch] += 1;
    }
    balance_counts(nside_dec, chart, &counts)
}
