// The exact-k subset DP of ProbMoE on the CPU, fused: marginals, their Hessian-vector product
// and sampling, one pass over a group of tokens with its tables in the CPU's caches.
//
// Built and loaded by pr2_megatron/routing/probmoe/cpu_kernel.py (plain C ABI, ctypes; no
// PyTorch headers). The math is that of subset_dp.py's unsorted path (x = exp(θ - row max) in
// [0, 1], float64 tables, whatever the logits' dtype).
//
// Notation: for one token, x_p (p = 0..E-1) the rates, K the subset size,
//   pre_j[p] = e_j(x_0 .. x_{p-1})       (prefix elementary symmetric polynomials),
//   suf_m[p] = e_m(x_{p+1} .. x_{E-1})   (suffix ones),
//   S_p = Σ_{j<K} pre_j[p] · suf_{K-1-j}[p] = e_{K-1}(x without x_p),
//   Z = e_K(x),  μ_p = x_p · S_p / Z   (inclusion marginals),
// and the router's backward (∂μ/∂θ)ᵀ g = (∂μ/∂θ) g (a Hessian of log Z: symmetric) is the
// derivative of μ along θ + εg, i.e. along dx_p = x_p g_p:
//   dμ_p = (x_p g_p S_p + x_p dS_p) / Z − μ_p · dZ / Z.
// Tokens go in groups of kGroup: every inner loop runs over the group's tokens (contiguous
// doubles), which the compiler vectorises. Recurrences are in the same order as subset_dp.py's
// cumulative sums (e_j[p+1] = e_j[p] + x_p · e_{j-1}[p]) and contraction into FMA is off
// (-ffp-contract=off), so the sampling table differs from the tensor ops' only by the last bits
// of exp (the C library's against PyTorch's): a draw can differ only where a uniform falls
// within rounding of a boundary between two experts.
//
// Layout: theta, grad, out [T, E] row-major, float32 or float64 (`dtype`); fraction [T, K]
// float64 (1 − uniform: the share of the remaining mass to walk to); ids [T, K] int64
// (ascending); mask [T, E] bytes (0/1).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kGroup = 16;  // tokens per group (measured: a little faster than 4 or 8)

// Row operations over a group's tokens. The rows never overlap (restrict), so the compiler
// vectorises them.
inline void add_product(double* __restrict__ y, const double* __restrict__ a,
                        const double* __restrict__ b) {
  for (int t = 0; t < kGroup; ++t) y[t] += a[t] * b[t];
}

// y += a · b + c · d (a product's derivative: d(x · e) = dx · e + x · de).
inline void add_two_products(double* __restrict__ y, const double* __restrict__ a,
                             const double* __restrict__ b, const double* __restrict__ c,
                             const double* __restrict__ d) {
  for (int t = 0; t < kGroup; ++t) y[t] += a[t] * b[t] + c[t] * d[t];
}

// x = exp(θ − row max) of a group of tokens, transposed to [E][kGroup] (rows past the last
// token: zeros). A row of -inf logits (no finite maximum) is taken relative to 0, as in
// subset_dp.py. `row_E` is scratch of E doubles.
template <typename scalar_t>
void load_rates(const scalar_t* theta, int64_t t0, int nt, int64_t E, double* x,
                double* __restrict__ row_E) {
  for (int t = 0; t < kGroup; ++t) {
    if (t >= nt) {
      for (int64_t p = 0; p < E; ++p) x[p * kGroup + t] = 0.0;
      continue;
    }
    const scalar_t* __restrict__ row = theta + (t0 + t) * E;
    double ref = -INFINITY;
    for (int64_t p = 0; p < E; ++p) ref = std::max(ref, static_cast<double>(row[p]));
    if (!std::isfinite(ref)) ref = 0.0;
    for (int64_t p = 0; p < E; ++p) row_E[p] = std::exp(static_cast<double>(row[p]) - ref);
    for (int64_t p = 0; p < E; ++p) x[p * kGroup + t] = row_E[p];
  }
}

// dx = x · g of a group, transposed like x.
template <typename scalar_t>
void load_tangent(const scalar_t* grad, int64_t t0, int nt, int64_t E, const double* x,
                  double* xg) {
  for (int64_t p = 0; p < E; ++p)
    for (int t = 0; t < kGroup; ++t)
      xg[p * kGroup + t] = t < nt ? x[p * kGroup + t] * static_cast<double>(grad[(t0 + t) * E + p]) : 0.0;
}

// Marginals (tangent == false) or the HVP along g (tangent == true) of one group.
// KT > 0: the subset size as a compile-time constant (unrolled loops); 0: `k` at run time.
// Scratch (each (K + 1) · kGroup doubles): e, de, f, df.
template <bool tangent, int KT>
void adjoint_group(const double* x, const double* xg, int64_t E, int k, double* pre,
                   double* dpre, double* res_E, double* scratch) {
  const int K = KT > 0 ? KT : k;
  double* e = scratch;
  double* de = e + (K + 1) * kGroup;
  double* f = de + (K + 1) * kGroup;
  double* df = f + (K + 1) * kGroup;
  std::fill(scratch, scratch + 4 * (K + 1) * kGroup, 0.0);
  // Forward: pre[(p*K + j)*G + t] = pre_j[p] (j < K) and its tangent; e/de run along p.
  for (int t = 0; t < kGroup; ++t) e[t] = 1.0;
  for (int64_t p = 0; p < E; ++p) {
    const double* xp = x + p * kGroup;
    const double* xgp = xg + p * kGroup;
    std::memcpy(pre + p * K * kGroup, e, sizeof(double) * K * kGroup);
    if (tangent) std::memcpy(dpre + p * K * kGroup, de, sizeof(double) * K * kGroup);
    const int top = static_cast<int>(std::min<int64_t>(K, p + 1));
    for (int j = top; j >= 1; --j) {
      const double* ej1 = e + (j - 1) * kGroup;
      if (tangent) add_two_products(de + j * kGroup, xgp, ej1, xp, de + (j - 1) * kGroup);
      add_product(e + j * kGroup, xp, ej1);
    }
  }
  double inv_z[kGroup], dlog_z[kGroup];
  for (int t = 0; t < kGroup; ++t) {
    inv_z[t] = 1.0 / e[K * kGroup + t];
    dlog_z[t] = de[K * kGroup + t] * inv_z[t];
  }
  // Backward: f/df = suf_m[p] (m < K) along p descending; res_E[p*G + t] = μ or dμ.
  for (int t = 0; t < kGroup; ++t) f[t] = 1.0;
  for (int64_t p = E - 1; p >= 0; --p) {
    const double* xp = x + p * kGroup;
    const double* xgp = xg + p * kGroup;
    const double* pp = pre + p * K * kGroup;
    const double* dpp = dpre + p * K * kGroup;
    alignas(64) double s[kGroup] = {0.0}, ds[kGroup] = {0.0};
    const int m_top = static_cast<int>(std::min<int64_t>(K - 1, E - 1 - p));
    for (int m = 0; m <= m_top; ++m) {
      const double* pj = pp + (K - 1 - m) * kGroup;
      const double* fm = f + m * kGroup;
      add_product(s, pj, fm);
      if (tangent) add_two_products(ds, dpp + (K - 1 - m) * kGroup, fm, pj, df + m * kGroup);
    }
    double* out = res_E + p * kGroup;
    for (int t = 0; t < kGroup; ++t) {
      const double mu = xp[t] * s[t] * inv_z[t];
      out[t] = tangent ? (xgp[t] * s[t] + xp[t] * ds[t]) * inv_z[t] - mu * dlog_z[t] : mu;
    }
    const int up = static_cast<int>(std::min<int64_t>(K - 1, E - p));
    for (int m = up; m >= 1; --m) {
      const double* fm1 = f + (m - 1) * kGroup;
      if (tangent) add_two_products(df + m * kGroup, xgp, fm1, xp, df + (m - 1) * kGroup);
      add_product(f + m * kGroup, xp, fm1);
    }
  }
}

template <typename scalar_t, bool tangent, int KT>
void adjoint_sized(const scalar_t* theta, const scalar_t* grad, int64_t T, int64_t E, int k,
                   scalar_t* out) {
  const int K = KT > 0 ? KT : k;
  std::vector<double> x(E * kGroup), xg(E * kGroup), res(E * kGroup), row(E);
  std::vector<double> pre(E * K * kGroup), dpre(tangent ? E * K * kGroup : 1);
  std::vector<double> scratch(4 * (K + 1) * kGroup);
  for (int64_t t0 = 0; t0 < T; t0 += kGroup) {
    const int nt = static_cast<int>(std::min<int64_t>(kGroup, T - t0));
    load_rates(theta, t0, nt, E, x.data(), row.data());
    if (tangent) load_tangent(grad, t0, nt, E, x.data(), xg.data());
    adjoint_group<tangent, KT>(x.data(), xg.data(), E, K, pre.data(), dpre.data(), res.data(),
                               scratch.data());
    for (int t = 0; t < nt; ++t)
      for (int64_t p = 0; p < E; ++p)
        out[(t0 + t) * E + p] = static_cast<scalar_t>(res[p * kGroup + t]);
  }
}

// The common top-k sizes get unrolled code; other sizes run the same code with K at run time.
template <typename scalar_t, bool tangent>
void adjoint(const scalar_t* theta, const scalar_t* grad, int64_t T, int64_t E, int K,
             scalar_t* out) {
  switch (K) {
    case 2: return adjoint_sized<scalar_t, tangent, 2>(theta, grad, T, E, K, out);
    case 4: return adjoint_sized<scalar_t, tangent, 4>(theta, grad, T, E, K, out);
    case 6: return adjoint_sized<scalar_t, tangent, 6>(theta, grad, T, E, K, out);
    case 8: return adjoint_sized<scalar_t, tangent, 8>(theta, grad, T, E, K, out);
    default: return adjoint_sized<scalar_t, tangent, 0>(theta, grad, T, E, K, out);
  }
}

// Exact-K draws: with r members left below position `end`, the last of them is the smallest q
// with pre_r[q + 1] >= fraction_r · pre_r[end] (subset_dp.SubsetDP.sample, the same rule).
template <typename scalar_t, int KT>
void sample_sized(const scalar_t* theta, const double* fraction, int64_t T, int64_t E, int k,
                  int64_t* ids, uint8_t* mask) {
  const int K = KT > 0 ? KT : k;
  std::vector<double> x(E * kGroup), row(E);
  std::vector<double> table((E + 1) * (K + 1) * kGroup);  // [p][j][t] = pre_j[p]
  std::vector<double> e((K + 1) * kGroup);
  std::memset(mask, 0, static_cast<size_t>(T * E));
  for (int64_t t0 = 0; t0 < T; t0 += kGroup) {
    const int nt = static_cast<int>(std::min<int64_t>(kGroup, T - t0));
    load_rates(theta, t0, nt, E, x.data(), row.data());
    std::fill(e.begin(), e.end(), 0.0);
    for (int t = 0; t < kGroup; ++t) e[t] = 1.0;
    for (int64_t p = 0; p <= E; ++p) {
      std::memcpy(table.data() + p * (K + 1) * kGroup, e.data(), sizeof(double) * (K + 1) * kGroup);
      if (p == E) break;
      const double* xp = x.data() + p * kGroup;
      const int top = static_cast<int>(std::min<int64_t>(K, p + 1));
      for (int j = top; j >= 1; --j) {
        add_product(e.data() + j * kGroup, xp, e.data() + (j - 1) * kGroup);
      }
    }
    for (int t = 0; t < nt; ++t) {
      const int64_t row = t0 + t;
      int64_t end = E;
      for (int r = K; r >= 1; --r) {
        const double total = table[(end * (K + 1) + r) * kGroup + t];
        const double target = fraction[row * K + r - 1] * total;
        int64_t q = end - 1;
        while (q >= r && table[(q * (K + 1) + r) * kGroup + t] >= target) --q;
        ids[row * K + r - 1] = q;
        mask[row * E + q] = 1;
        end = q;
      }
    }
  }
}

template <typename scalar_t>
void sample(const scalar_t* theta, const double* fraction, int64_t T, int64_t E, int K,
            int64_t* ids, uint8_t* mask) {
  switch (K) {
    case 2: return sample_sized<scalar_t, 2>(theta, fraction, T, E, K, ids, mask);
    case 4: return sample_sized<scalar_t, 4>(theta, fraction, T, E, K, ids, mask);
    case 6: return sample_sized<scalar_t, 6>(theta, fraction, T, E, K, ids, mask);
    case 8: return sample_sized<scalar_t, 8>(theta, fraction, T, E, K, ids, mask);
    default: return sample_sized<scalar_t, 0>(theta, fraction, T, E, K, ids, mask);
  }
}

}  // namespace

// On x86-64 each entry point is compiled twice, for AVX2 and for the baseline, and the loader
// picks the one the CPU runs (GCC's target_clones): one library serves every node of a
// cluster whose home folder (the build cache) they share. `flatten` inlines the DP into both.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PR2_CLONES __attribute__((flatten, target_clones("avx2", "default")))
#else
#define PR2_CLONES __attribute__((flatten))
#endif

extern "C" {

// `dtype` of theta, grad and out: 0 float32, 1 float64.

// Inclusion marginals μ [T, E] of exact-K subsets.
PR2_CLONES void pr2_probmoe_marginals(const void* theta, int64_t T, int64_t E, int64_t K, int dtype,
                           void* out) {
  if (dtype == 1)
    adjoint<double, false>(static_cast<const double*>(theta), nullptr, T, E, static_cast<int>(K),
                           static_cast<double*>(out));
  else
    adjoint<float, false>(static_cast<const float*>(theta), nullptr, T, E, static_cast<int>(K),
                          static_cast<float*>(out));
}

// (∂μ/∂θ)ᵀ g [T, E] of exact-K subsets.
PR2_CLONES void pr2_probmoe_hvp(const void* theta, const void* grad, int64_t T, int64_t E, int64_t K,
                     int dtype, void* out) {
  if (dtype == 1)
    adjoint<double, true>(static_cast<const double*>(theta), static_cast<const double*>(grad), T,
                          E, static_cast<int>(K), static_cast<double*>(out));
  else
    adjoint<float, true>(static_cast<const float*>(theta), static_cast<const float*>(grad), T, E,
                         static_cast<int>(K), static_cast<float*>(out));
}

// Exact-K subsets [T, K] (ids ascending) and their mask [T, E] for `fraction` = 1 − uniform.
PR2_CLONES void pr2_probmoe_sample(const void* theta, const double* fraction, int64_t T, int64_t E,
                        int64_t K, int dtype, int64_t* ids, uint8_t* mask) {
  if (dtype == 1)
    sample<double>(static_cast<const double*>(theta), fraction, T, E, static_cast<int>(K), ids,
                   mask);
  else
    sample<float>(static_cast<const float*>(theta), fraction, T, E, static_cast<int>(K), ids, mask);
}

}  // extern "C"
