// Vector kernels of the conjugate-gradient solver and the metric product on the device, so
// CG iterates never leave it. Dot products are summed in chunks of DOT_CHUNK values (or per
// patch range), each in the CPU's lane order (base::util::lane_sum), the sums then in order
// on the host: the same association as the CPU's, so both give the same digits.

#define DOT_CHUNK 8192

// sum of x[i] y[i] over lo..hi: eight partial sums by (i - lo) mod 8 over the whole groups of
// eight, the tail apart, added in base::util::lane_sum's tree
REAL lane_dot(const ulong lo, const ulong hi, __global const REAL *x, __global const REAL *y) {
  REAL a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const ulong full = lo + (hi - lo) / 8 * 8;
  for (ulong i = lo; i < full; i += 8)
    for (int k = 0; k < 8; k++) a[k] += x[i + k] * y[i + k];
  REAL tail = 0;
  for (ulong i = full; i < hi; i++) tail += x[i] * y[i];
  return (((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))) + tail;
}

// partial[c] = sum of x[i] y[i] over chunk c
__kernel void dot_partials(const ulong n, __global const REAL *x, __global const REAL *y,
                           __global REAL *partial) {
  const ulong c = get_global_id(0);
  const ulong lo = c * DOT_CHUNK;
  if (lo >= n) return;
  partial[c] = lane_dot(lo, min(n, lo + DOT_CHUNK), x, y);
}

// Patch-ordered partial sums (dust3d's reduction order, docs/architecture.md): partial[k] sums
// x[i] y[i] over the index ranges seg[2s]..seg[2s+1] of parts s = part_off[k]..part_off[k+1],
// each range's lane sum in order. Part 0 is the replicated block, part k ≥ 1 patch k − 1.
__kernel void dot_segments(const ulong nparts, __global const ulong *seg,
                           __global const uint *part_off, __global const REAL *x,
                           __global const REAL *y, __global REAL *partial) {
  const ulong k = get_global_id(0);
  if (k >= nparts) return;
  REAL acc = 0;
  for (uint s = part_off[k]; s < part_off[k + 1]; s++)
    acc += lane_dot(seg[2 * s], seg[2 * s + 1], x, y);
  partial[k] = acc;
}

// y += a x
__kernel void axpy(const ulong n, const REAL a, __global const REAL *x, __global REAL *y) {
  const ulong i = get_global_id(0);
  if (i < n) y[i] += a * x[i];
}

// y = x + b y
__kernel void xpay(const ulong n, __global const REAL *x, const REAL b, __global REAL *y) {
  const ulong i = get_global_id(0);
  if (i < n) y[i] = x[i] + b * y[i];
}

// r = b - ap
__kernel void sub(const ulong n, __global const REAL *b, __global const REAL *ap,
                  __global REAL *r) {
  const ulong i = get_global_id(0);
  if (i < n) r[i] = b[i] - ap[i];
}

// out[i] = mask[i] v[i]
__kernel void mask_mul(const ulong n, __global const REAL *mask, __global const REAL *v,
                       __global REAL *out) {
  const ulong i = get_global_id(0);
  if (i < n) out[i] = mask[i] * v[i];
}

// out[i] = mask[i] g[i] + v[i]
__kernel void combine(const ulong n, __global const REAL *mask, __global const REAL *g,
                      __global const REAL *v, __global REAL *out) {
  const ulong i = get_global_id(0);
  if (i < n) out[i] = mask[i] * g[i] + v[i];
}

// out[off + i] += v[off + i]
__kernel void add_tail(const ulong n, const ulong off, __global const REAL *v,
                       __global REAL *out) {
  const ulong i = get_global_id(0);
  if (i < n) out[off + i] += v[off + i];
}

// The Fisher weighting of one state's star tangents (see Model::averaged_metric): with the
// ξ_σ part of the tangent at v[off..], δv gains ∂v/∂ξ_σ v_σ, then δā /= v, δv /= 2v², and the
// ξ_σ part of the product gains ∂v/∂ξ_σ δv / N.
__kernel void fisher_weigh(const ulong nstar, const int with_sig, const ulong off,
                           const REAL n_states, __global const REAL *nsig,
                           __global const REAL *dnsig, __global const REAL *a_err,
                           __global const REAL *var, __global const REAL *v,
                           __global REAL *da, __global REAL *dv, __global REAL *out) {
  const ulong i = get_global_id(0);
  if (i >= nstar) return;
  const REAL dvds = (REAL)2 * nsig[i] * a_err[i] * a_err[i] * dnsig[i];
  const REAL var_i = var[i];
  REAL t = dv[i];
  if (with_sig) t += dvds * v[off + i];
  da[i] = da[i] / var_i;
  t = t / ((REAL)2 * var_i * var_i);
  dv[i] = t;
  if (with_sig) out[off + i] += dvds * t / n_states;
}

// Chunk sums of the interleaved pixel partials: out[2c + j] = sum over pixels p of chunk c
// (`chunk` pixels: one patch) of partial[2p + j].
__kernel void pair_partials(const ulong npix, const ulong chunk, __global const REAL *partial,
                            __global REAL *out) {
  const ulong c = get_global_id(0);
  const ulong lo = c * chunk;
  if (lo >= npix) return;
  const ulong hi = min(npix, lo + chunk);
  REAL a = 0, b = 0;
  for (ulong p = lo; p < hi; p++) {
    a += partial[2 * p];
    b += partial[2 * p + 1];
  }
  out[2 * c] = a;
  out[2 * c + 1] = b;
}
