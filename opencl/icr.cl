// ICR prior operator s = S xi and its transpose on an OpenCL device (see src/icr/mod.rs for
// the layout; these kernels compute the same sums in the same order per output value where
// the CPU code is sequential, so f64 results agree to rounding).
//
// Compile-time definitions: REAL (double or float) is the arithmetic and field type, MAT the
// storage type of the refinement matrices (double or float). SITE_LEN = 8*27 + 64 values per
// site: R^T (27 rows of 8) then sqrt(D)^T (8 rows of 8).

#ifdef USE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif
// no fused multiply-adds: the CPU code does not fuse either, so sums round alike
#pragma OPENCL FP_CONTRACT OFF

#define SITE_LEN 280

// s0[i] = sum_{k <= i} L[i, k] xi[k]  (L lower triangular, row-major n0 x n0)
__kernel void level0_forward(const uint n0, __global const REAL *L,
                             __global const REAL *xi, __global REAL *s0) {
  const uint i = get_global_id(0);
  if (i >= n0) return;
  REAL acc = 0;
  for (uint k = 0; k <= i; k++) acc += L[(ulong)i * n0 + k] * xi[k];
  s0[i] = acc;
}

// xi_bar[m] = sum_{i >= m} L[i, m] s0_bar[i]
__kernel void level0_adjoint(const uint n0, __global const REAL *L,
                             __global const REAL *s0_bar, __global REAL *xi_bar) {
  const uint m = get_global_id(0);
  if (m >= n0) return;
  REAL acc = 0;
  for (uint i = m; i < n0; i++) acc += L[(ulong)i * n0 + m] * s0_bar[i];
  xi_bar[m] = acc;
}

// One work-item per site (coarse pixel p, radial site j): 27 coarse values and 8
// excitations in, the 8 fine values (4 children x 2 shells) out.
__kernel void refine(const uint npix_c, const uint n_c, const uint n_f,
                     __global const uint *window, __global const uint *klass,
                     __global const MAT *mats, __global const REAL *coarse,
                     __global const REAL *xi, const ulong xi_off, __global REAL *fine) {
  const uint ns = n_c - 2;
  const uint gid = get_global_id(0);
  if (gid >= npix_c * ns) return;
  const uint p = gid / ns, j = gid % ns;
  __global const MAT *m = mats + ((ulong)klass[p] * ns + j) * SITE_LEN;
  __global const REAL *x = xi + xi_off + ((ulong)p * ns + j) * 8;
  REAL acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint a = 0; a < 9; a++) {
    __global const REAL *col = coarse + (ulong)window[p * 9 + a] * n_c + j;
    for (uint dj = 0; dj < 3; dj++) {
      const REAL v = col[dj];
      __global const MAT *row = m + (a * 3 + dj) * 8;
      for (uint o = 0; o < 8; o++) acc[o] += (REAL)row[o] * v;
    }
  }
  for (uint q = 0; q < 8; q++) {
    const REAL v = x[q];
    __global const MAT *row = m + (27 + q) * 8;
    for (uint o = 0; o < 8; o++) acc[o] += (REAL)row[o] * v;
  }
  __global REAL *out = fine + (ulong)p * 4 * n_f;
  for (uint o = 0; o < 8; o++) out[(o / 2) * n_f + 2 * j + (o % 2)] = acc[o];
}

// Dot of matrix row k with the site's fine cotangents g, summed as a balanced tree like
// the CPU code.
inline REAL row_dot(__global const MAT *m, uint k, const REAL *g) {
  __global const MAT *r = m + k * 8;
  REAL p0 = (REAL)r[0] * g[0], p1 = (REAL)r[1] * g[1], p2 = (REAL)r[2] * g[2],
       p3 = (REAL)r[3] * g[3], p4 = (REAL)r[4] * g[4], p5 = (REAL)r[5] * g[5],
       p6 = (REAL)r[6] * g[6], p7 = (REAL)r[7] * g[7];
  return ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7));
}

inline void site_cotangent(__global const REAL *fine_bar, uint p, uint j, uint n_f, REAL *g) {
  __global const REAL *fb = fine_bar + (ulong)p * 4 * n_f;
  for (uint o = 0; o < 8; o++) g[o] = fb[(o / 2) * n_f + 2 * j + (o % 2)];
}

// Adjoint, excitation part: one work-item per site.
__kernel void refine_adjoint_xi(const uint npix_c, const uint n_c, const uint n_f,
                                __global const uint *klass, __global const MAT *mats,
                                __global const REAL *fine_bar, __global REAL *xi_bar,
                                const ulong xi_off) {
  const uint ns = n_c - 2;
  const uint gid = get_global_id(0);
  if (gid >= npix_c * ns) return;
  const uint p = gid / ns, j = gid % ns;
  __global const MAT *m = mats + ((ulong)klass[p] * ns + j) * SITE_LEN;
  REAL g[8];
  site_cotangent(fine_bar, p, j, n_f, g);
  __global REAL *x = xi_bar + xi_off + ((ulong)p * ns + j) * 8;
  for (uint q = 0; q < 8; q++) x[q] = row_dot(m, 27 + q, g);
}

// Adjoint, coarse part: one work-item per (coarse pixel p, window slot a) accumulates that
// slot's contributions over all radial sites into its own row of `scatter`, in the CPU's
// order (j ascending, then dj).
__kernel void refine_adjoint_scatter(const uint npix_c, const uint n_c, const uint n_f,
                                     __global const uint *klass, __global const MAT *mats,
                                     __global const REAL *fine_bar, __global REAL *scatter) {
  const uint ns = n_c - 2;
  const uint gid = get_global_id(0);
  if (gid >= npix_c * 9) return;
  const uint p = gid / 9, a = gid % 9;
  __global REAL *t = scatter + (ulong)gid * n_c;
  for (uint i = 0; i < n_c; i++) t[i] = 0;
  for (uint j = 0; j < ns; j++) {
    __global const MAT *m = mats + ((ulong)klass[p] * ns + j) * SITE_LEN;
    REAL g[8];
    site_cotangent(fine_bar, p, j, n_f, g);
    for (uint dj = 0; dj < 3; dj++) t[j + dj] += row_dot(m, a * 3 + dj, g);
  }
}

// Adjoint, gather: coarse_bar[q, i] = sum over the windows containing q of their rows.
__kernel void refine_adjoint_gather(const uint npix_c, const uint n_c,
                                    __global const uint *rev_off, __global const uint *rev,
                                    __global const REAL *scatter, __global REAL *coarse_bar) {
  const uint gid = get_global_id(0);
  if (gid >= npix_c * n_c) return;
  const uint q = gid / n_c, i = gid % n_c;
  REAL acc = 0;
  for (uint e = rev_off[q]; e < rev_off[q + 1]; e++) acc += scatter[(ulong)rev[e] * n_c + i];
  coarse_bar[gid] = acc;
}

// MPI exchanges: row r of `send` is row idx[r] of `src` (n_c values per row), so only the
// values another rank needs cross the bus.
__kernel void pack_rows(const uint n_rows, const uint n_c, __global const uint *idx,
                        __global const REAL *src, __global REAL *send) {
  const uint gid = get_global_id(0);
  if (gid >= n_rows * n_c) return;
  const uint r = gid / n_c, i = gid % n_c;
  send[gid] = src[(ulong)idx[r] * n_c + i];
}
