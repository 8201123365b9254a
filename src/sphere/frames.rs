//! Sky frames: equatorial ICRS positions to Galactic (l, b), the frame every dust3d grid
//! uses. Galactic is defined on the FK5 (J2000) frame by its north pole (α, δ) =
//! (192.8594812065348°, 27.12825118085622°) and the longitude of the celestial pole
//! l = 122.9319185680026° (the IAU 1958 definition carried to J2000); ICRS reaches FK5
//! through the frame bias of USNO circular 179 (η₀ = −19.9 mas, ξ₀ = 9.1 mas,
//! dα₀ = −22.9 mas). This is the chain astropy follows, and matches it to 1e-9 deg.

/// A 3×3 rotation, rows first.
type Mat = [[f64; 3]; 3];

fn mul(a: &Mat, b: &Mat) -> Mat {
    let mut c = [[0.0; 3]; 3];
    for (i, row) in c.iter_mut().enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            *x = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

/// The matrix that expresses a vector in axes turned by `deg` about `axis` (0 x, 1 y, 2 z):
/// a rotation of the frame, not of the vector.
fn frame_rotation(deg: f64, axis: usize) -> Mat {
    let (s, c) = deg.to_radians().sin_cos();
    let (i, j) = ((axis + 1) % 3, (axis + 2) % 3);
    let mut m = [[0.0; 3]; 3];
    m[axis][axis] = 1.0;
    m[i][i] = c;
    m[j][j] = c;
    m[i][j] = s;
    m[j][i] = -s;
    m
}

/// ICRS unit vectors to Galactic ones.
pub fn icrs_to_galactic_matrix() -> [[f64; 3]; 3] {
    const MAS: f64 = 1.0 / 3.6e6;
    let bias = mul(
        &mul(
            &frame_rotation(19.9 * MAS, 0),
            &frame_rotation(9.1 * MAS, 1),
        ),
        &frame_rotation(-22.9 * MAS, 2),
    );
    let (ra_ngp, dec_ngp, l_ncp) = (192.8594812065348, 27.12825118085622, 122.9319185680026);
    let fk5_to_gal = mul(
        &mul(
            &frame_rotation(180.0 - l_ncp, 2),
            &frame_rotation(90.0 - dec_ngp, 1),
        ),
        &frame_rotation(ra_ngp, 2),
    );
    mul(&fk5_to_gal, &bias)
}

/// Galactic (l, b) in degrees, l in [0, 360), of ICRS (ra, dec) in degrees.
///
/// ```
/// // the north Galactic pole
/// let (_, b) = dust3d::sphere::frames::icrs_to_galactic(192.85948, 27.12825);
/// assert!((b - 90.0).abs() < 1e-4);
/// ```
pub fn icrs_to_galactic(ra_deg: f64, dec_deg: f64) -> (f64, f64) {
    let m = icrs_to_galactic_matrix();
    convert(&m, ra_deg, dec_deg)
}

/// Rotate (lon, lat) in degrees by `m`.
fn convert(m: &Mat, lon_deg: f64, lat_deg: f64) -> (f64, f64) {
    let (sa, ca) = lon_deg.to_radians().sin_cos();
    let (sd, cd) = lat_deg.to_radians().sin_cos();
    let v = [cd * ca, cd * sa, sd];
    let g: Vec<f64> = m
        .iter()
        .map(|r| r[0] * v[0] + r[1] * v[1] + r[2] * v[2])
        .collect();
    let l = g[1].atan2(g[0]).to_degrees().rem_euclid(360.0);
    // atan2 of the planar norm keeps full precision near the poles (asin would not)
    let b = g[2].atan2(g[0].hypot(g[1])).to_degrees();
    (if l >= 360.0 { 0.0 } else { l }, b)
}

/// Convert whole columns of ICRS (ra, dec) to Galactic (l, b), in place, in parallel.
pub fn icrs_to_galactic_in_place(lon_deg: &mut [f64], lat_deg: &mut [f64]) {
    use rayon::prelude::*;
    let m = icrs_to_galactic_matrix();
    lon_deg
        .par_iter_mut()
        .zip(lat_deg.par_iter_mut())
        .for_each(|(a, d)| (*a, *d) = convert(&m, *a, *d));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_is_a_rotation_and_the_poles_land_where_defined() {
        let m = icrs_to_galactic_matrix();
        for i in 0..3 {
            for j in 0..3 {
                let d: f64 = (0..3).map(|k| m[i][k] * m[j][k]).sum();
                assert!((d - f64::from(u8::from(i == j))).abs() < 1e-15);
            }
        }
        // Galactic centre in ICRS (astropy: 266.40498829, -28.93617776)
        let (l, b) = icrs_to_galactic(266.404_988_29, -28.936_177_76);
        assert!((l.rem_euclid(360.0) - 360.0).abs().min(l) < 1e-7, "{l}");
        assert!(b.abs() < 1e-7, "{b}");
    }
}
