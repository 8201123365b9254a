// The likelihood stages on an OpenCL device (see src/model.rs and src/response.rs): the
// exp/scale stage ξ-field -> (s, rw = Δr exp(scl s + off)), and per pixel the inner columns,
// each star's parallax-marginalised moments (ā, σ_a²), the energy, and the JVP and VJP of
// the moments. One work-item per pixel walks its stars in order, so every sum runs in the
// CPU's order; pixel partials are summed on the host in pixel order.
//
// Definitions: REAL (double|float); USE_FP64 when double is used.

#ifdef USE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif
// multiply-adds fused exactly where the CPU code fuses them (fma), nowhere else, so
// sums round alike
#pragma OPENCL FP_CONTRACT OFF

#define F_SCALE ((REAL)1.0 / (REAL)65535.0)
#define H_SCALE ((REAL)1.0 / ((REAL)4.0 * (REAL)65535.0))

// A star's window: first extended bin e0, entries [o0, o0 + len).
typedef struct {
  uint jl, jh, k0;
  int beyond;
  ulong o0;
  uint len;
} Split;

inline Split split(__global const uint *start, __global const ulong *woff, ulong i, uint n) {
  Split s;
  uint e0 = start[i];
  s.o0 = woff[i];
  s.len = (uint)(woff[i + 1] - s.o0);
  s.jl = (e0 == 0) ? 1 : 0;
  long room = (long)(n + 1) - (long)e0;
  if (room < 0) room = 0;
  s.jh = min(s.len, (uint)room);
  if (s.jh < s.jl) s.jh = s.jl;
  s.k0 = (e0 + s.jl >= 1) ? e0 + s.jl - 1 : 0;
  s.beyond = (e0 + s.len == n + 2);
  return s;
}

inline void inner_columns(__global const REAL *rw, __global REAL *cum, uint n) {
  REAL acc = 0;
  for (uint k = 0; k < n; k++) {
    cum[k] = acc;
    acc += rw[k];
  }
  cum[n] = acc;
}

// 2 − Σ p over all bins of a star's window (near and beyond bins included): 1 up to the f32
// rounding of the probabilities; σ_a² = m − κ ā² = Σ p (c − ā)², not negative beyond the
// rounding of ā² (src/likelihood/response.rs, `kappa`).
inline REAL kappa(Split w, __global const float *prob) {
  REAL t = 0;
  for (uint j = 0; j < w.len; j++) t += (REAL)prob[w.o0 + j];
  return (REAL)2 - t;
}

// Four partial sums of two quantities, entry t of a window's kept shells into sum t mod 4,
// added pairwise at the end: the order of the CPU's walks (src/likelihood/response.rs,
// `LANES`). Named scalars, not a private array: PoCL 3.1 miscompiled the array form in
// single precision (ā off by 26 %).
typedef struct {
  REAL a0, a1, a2, a3, m0, m1, m2, m3;
} Lanes;

inline void lanes_add(Lanes *l, uint t, REAL ta, REAL tm) {
  switch (t & 3) {
    case 0: l->a0 += ta; l->m0 += tm; break;
    case 1: l->a1 += ta; l->m1 += tm; break;
    case 2: l->a2 += ta; l->m2 += tm; break;
    default: l->a3 += ta; l->m3 += tm; break;
  }
}

inline REAL2 lanes_total(Lanes l) {
  return (REAL2)((l.a0 + l.a1) + (l.a2 + l.a3), (l.m0 + l.m1) + (l.m2 + l.m3));
}

// (ā, σ_a²) of one star.
inline REAL2 moments(Split w, __global const float *prob, __global const ushort *frac,
                     __global const ushort *spread, __global const REAL *rw,
                     __global const REAL *cum, uint n) {
  Lanes l = {0, 0, 0, 0, 0, 0, 0, 0};
  uint k = w.k0;
  for (uint j = w.jl; j < w.jh; j++, k++) {
    REAL pj = (REAL)prob[w.o0 + j], r = rw[k];
    REAL c = fma(r, (REAL)frac[w.o0 + j] * F_SCALE, cum[k]);
    lanes_add(&l, j - w.jl, pj * c,
              pj * fma(c, c, r * r * ((REAL)spread[w.o0 + j] * H_SCALE)));
  }
  REAL2 t = lanes_total(l);
  REAL a = t.x, m = t.y;
  if (w.beyond) {
    REAL pj = (REAL)prob[w.o0 + w.len - 1];
    a += pj * cum[n];
    m += pj * cum[n] * cum[n];
  }
  return (REAL2)(a, m - kappa(w, prob) * a * a);
}

inline void star_vjp(Split w, __global const float *prob, __global const ushort *frac,
                     __global const ushort *spread, __global const REAL *rw,
                     __global const REAL *cum, REAL abar, REAL ga, REAL gv,
                     __global REAL *rw_bar, __global REAL *cum_bar, uint n) {
  REAL base = ga - (REAL)2 * gv * kappa(w, prob) * abar;
  uint k = w.k0;
  for (uint j = w.jl; j < w.jh; j++, k++) {
    REAL pj = (REAL)prob[w.o0 + j], fj = (REAL)frac[w.o0 + j] * F_SCALE;
    REAL c = fma(rw[k], fj, cum[k]);
    REAL wt = pj * fma((REAL)2 * gv, c, base);
    cum_bar[k] += wt;
    rw_bar[k] += fma(wt, fj, (REAL)2 * gv * pj * rw[k] * ((REAL)spread[w.o0 + j] * H_SCALE));
  }
  if (w.beyond) {
    REAL pj = (REAL)prob[w.o0 + w.len - 1];
    cum_bar[n] += pj * (base + (REAL)2 * gv * cum[n]);
  }
}

inline void finish_vjp(__global const REAL *cum_bar, __global REAL *rw_bar, uint n) {
  REAL acc = cum_bar[n];
  for (uint k = n; k-- > 0;) {
    rw_bar[k] += acc;
    acc += cum_bar[k];
  }
}

// Zero one pixel's cotangents of ρΔr (n) and of its inner columns (n + 1).
inline void clear_cotangents(__global REAL *rb, __global REAL *cb, uint n) {
  for (uint k = 0; k < n; k++) rb[k] = 0;
  for (uint k = 0; k <= n; k++) cb[k] = 0;
}

// Fold the column cotangents and pull them through ρΔr = Δr exp(scl s + off): writes (or
// with `accumulate` adds) scl·t to the pixel's chart-field cotangent sb (nc values, kept
// shells from `pad`), t = weight·rw_bar·rw; returns (Σ s t, Σ t) for the scale and offset.
inline REAL2 field_cotangent(__global const REAL *cb, __global REAL *rb,
                             __global const REAL *col, __global const REAL *sk,
                             const REAL scl, const REAL weight, const int accumulate,
                             __global REAL *sb, uint n, uint nc, uint pad) {
  finish_vjp(cb, rb, n);
  if (!accumulate)
    for (uint k = 0; k < nc; k++) sb[k] = 0;
  REAL g_scl = 0, g_off = 0;
  for (uint k = 0; k < n; k++) {
    REAL t = weight * rb[k] * col[k];
    sb[pad + k] += scl * t;
    g_scl += sk[k] * t;
    g_off += t;
  }
  return (REAL2)(g_scl, g_off);
}

// s and rw of every kept voxel from the final chart field.
__kernel void columns(const uint npix, const uint n, const uint nc, const uint pad,
                      __global const REAL *widths, __global const REAL *field, const REAL scl,
                      const REAL off, __global REAL *s, __global REAL *rw) {
  const ulong gid = get_global_id(0);
  if (gid >= (ulong)npix * n) return;
  const ulong p = gid / n;
  const uint k = gid % n;
  const REAL sk = field[p * nc + pad + k];
  s[gid] = sk;
  rw[gid] = exp(scl * sk + off) * widths[k];
}

// ā and v = (n_σ σ_A)² + σ_a² of every star of pixel p (σ_a² left out unless dvar).
__kernel void star_state(const uint npix, const uint n, const int dvar,
                         __global const ulong *offsets,
                         __global const uint *start, __global const ulong *woff,
                         __global const float *prob, __global const ushort *frac,
                         __global const ushort *spread, __global const REAL *a_err,
                         __global const REAL *nsig, __global const REAL *rw,
                         __global REAL *cum, __global REAL *abar, __global REAL *var) {
  const ulong p = get_global_id(0);
  if (p >= npix) return;
  __global const REAL *col = rw + p * n;
  __global REAL *cm = cum + p * (n + 1);
  inner_columns(col, cm, n);
  for (ulong i = offsets[p]; i < offsets[p + 1]; i++) {
    REAL2 av = moments(split(start, woff, i, n), prob, frac, spread, col, cm, n);
    REAL ns = nsig[i] * a_err[i];
    abar[i] = av.x;
    var[i] = ns * ns + (dvar ? av.y : (REAL)0);
  }
}

// Energy and its cotangents in one pass per pixel: the state (ā, v), each star's energy
// term, the field cotangent sbar (chart layout), ∂/∂ξ_σ per star and the pixel partials
// [energy, Σ s t, Σ t] with t = rw_bar rw.
__kernel void value_grad(const uint npix, const uint n, const uint nc, const uint pad,
                         const int dvar, __global const ulong *offsets, __global const uint *start,
                         __global const ulong *woff, __global const float *prob,
                         __global const ushort *frac, __global const ushort *spread,
                         __global const REAL *a_obs, __global const REAL *a_err,
                         __global const REAL *nsig, __global const REAL *dnsig,
                         __global const REAL *xsig, const int infer_nsigma, const REAL scl,
                         __global const REAL *s, __global const REAL *rw, __global REAL *cum,
                         __global REAL *cum_bar, __global REAL *rw_bar, __global REAL *abar,
                         __global REAL *var, __global REAL *gsig, __global REAL *sbar,
                         __global REAL *partial) {
  const ulong p = get_global_id(0);
  if (p >= npix) return;
  __global const REAL *col = rw + p * n;
  __global REAL *cm = cum + p * (n + 1);
  __global REAL *cb = cum_bar + p * (n + 1);
  __global REAL *rb = rw_bar + p * n;
  inner_columns(col, cm, n);
  clear_cotangents(rb, cb, n);
  REAL e = 0;
  for (ulong i = offsets[p]; i < offsets[p + 1]; i++) {
    Split w = split(start, woff, i, n);
    REAL2 av = moments(w, prob, frac, spread, col, cm, n);
    REAL ns = nsig[i] * a_err[i];
    REAL vv = ns * ns + (dvar ? av.y : (REAL)0);
    REAL r = a_obs[i] - av.x;
    e += (REAL)0.5 * r * r / vv + (REAL)0.5 * log(vv);
    REAL ca = -r / vv, cv = (REAL)0.5 / vv - (REAL)0.5 * r * r / (vv * vv);
    star_vjp(w, prob, frac, spread, col, cm, av.x, ca, dvar ? cv : (REAL)0, rb, cb, n);
    abar[i] = av.x;
    var[i] = vv;
    gsig[i] = infer_nsigma ? cv * (REAL)2 * ns * a_err[i] * dnsig[i] + xsig[i] : (REAL)0;
  }
  // weight 1 and a cleared field: the same roundings as the CPU's `sbar = scl rw_bar rw`
  REAL2 g = field_cotangent(cb, rb, col, s + p * n, scl, (REAL)1, 0, sbar + p * nc, n, nc, pad);
  partial[3 * p] = e;
  partial[3 * p + 1] = g.x;
  partial[3 * p + 2] = g.y;
}

// Tangent (δā, δσ_a²) of every star for a chart-field tangent ds and scalar tangents.
__kernel void jvp(const uint npix, const uint n, const uint nc, const uint pad, const int dvar,
                  __global const ulong *offsets, __global const uint *start,
                  __global const ulong *woff, __global const float *prob,
                  __global const ushort *frac, __global const ushort *spread, const REAL scl,
                  const REAL dscl, const REAL doff, __global const REAL *s,
                  __global const REAL *rw, __global const REAL *abar, __global const REAL *ds,
                  __global REAL *drw, __global REAL *cum, __global REAL *dcum,
                  __global REAL *da, __global REAL *dv) {
  const ulong p = get_global_id(0);
  if (p >= npix) return;
  __global const REAL *col = rw + p * n;
  __global REAL *dc = drw + p * n;
  for (uint k = 0; k < n; k++)
    dc[k] = col[k] * (scl * ds[p * nc + pad + k] + s[p * n + k] * dscl + doff);
  if (offsets[p] == offsets[p + 1]) return;
  __global REAL *cm = cum + p * (n + 1);
  __global REAL *dcm = dcum + p * (n + 1);
  inner_columns(col, cm, n);
  inner_columns(dc, dcm, n);
  for (ulong i = offsets[p]; i < offsets[p + 1]; i++) {
    Split w = split(start, woff, i, n);
    Lanes l = {0, 0, 0, 0, 0, 0, 0, 0};
    uint k = w.k0;
    for (uint j = w.jl; j < w.jh; j++, k++) {
      REAL pj = (REAL)prob[w.o0 + j], fj = (REAL)frac[w.o0 + j] * F_SCALE;
      REAL c = fma(col[k], fj, cm[k]);
      REAL dcv = fma(dc[k], fj, dcm[k]);
      lanes_add(&l, j - w.jl, pj * dcv,
                pj * fma(c, dcv, col[k] * dc[k] * ((REAL)spread[w.o0 + j] * H_SCALE)));
    }
    REAL2 t = lanes_total(l);
    REAL a = t.x, m = t.y;
    if (w.beyond) {
      REAL pj = (REAL)prob[w.o0 + w.len - 1];
      a += pj * dcm[n];
      m += pj * cm[n] * dcm[n];
    }
    da[i] = a;
    dv[i] = dvar ? (REAL)2 * m - (REAL)2 * kappa(w, prob) * abar[i] * a : (REAL)0;
  }
}

// Pull star cotangents (ca on ā, cv on σ_a²) back to the chart field, times `weight`,
// written to or (accumulate) added to sbar; pixel partials [Σ s t, Σ t].
__kernel void vjp(const uint npix, const uint n, const uint nc, const uint pad, const int dvar,
                  __global const ulong *offsets, __global const uint *start,
                  __global const ulong *woff, __global const float *prob,
                  __global const ushort *frac, __global const ushort *spread, const REAL scl,
                  __global const REAL *s, __global const REAL *rw, __global const REAL *abar,
                  __global const REAL *ca, __global const REAL *cv, const REAL weight,
                  const int accumulate, __global REAL *cum, __global REAL *cum_bar,
                  __global REAL *rw_bar, __global REAL *sbar, __global REAL *partial) {
  const ulong p = get_global_id(0);
  if (p >= npix) return;
  __global const REAL *col = rw + p * n;
  __global REAL *cm = cum + p * (n + 1);
  __global REAL *cb = cum_bar + p * (n + 1);
  __global REAL *rb = rw_bar + p * n;
  clear_cotangents(rb, cb, n);
  inner_columns(col, cm, n);
  for (ulong i = offsets[p]; i < offsets[p + 1]; i++)
    star_vjp(split(start, woff, i, n), prob, frac, spread, col, cm, abar[i], ca[i],
             dvar ? cv[i] : (REAL)0, rb, cb, n);
  REAL2 g = field_cotangent(cb, rb, col, s + p * n, scl, weight, accumulate, sbar + p * nc, n,
                            nc, pad);
  partial[2 * p] = g.x;
  partial[2 * p + 1] = g.y;
}
