// ISA-generic micro-kernels of the gathered linear primitives. PRIVATE: this file is included several
// times by gather_linear_cpu.cpp, once per instruction set, inside a namespace and (on x86-64) under a
// `#pragma GCC target`, after that namespace has defined:
//   constexpr int W;                 floats per vector
//   vf                               vector type
//   vzero(), vload(const float*), vload(const uint16_t*) (bf16 -> float), vbcast(float),
//   vfma(a, b, c) = a * b + c, vsum(v) (horizontal sum), vstore(float*, vf)
//   constexpr int RR_MR, RR_NR       rows/swiglu tile: x rows x weight rows
//   constexpr int CR_MR, CR_NV       cols tile: h rows x (vectors of output columns)
// No #include here: every header is included by the .cpp before the target pragmas.
// bf16 is passed as raw uint16_t; all accumulation is in float32.

static inline float to_f(float v) { return v; }
static inline float to_f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- gather_rows: out[m, n] = dot(x[m], W[rows[n]]) + bias[rows[n]] -------------------------------
// Software prefetch distance along a weight row, in elements; near the end of the row the next
// tile's rows (nx) are prefetched instead, so that a new tile starts on warm lines.
constexpr int64_t kRowPrefetch = 160;

template <typename T>
static inline void prefetch_row(const T* cur, const T* nx, int64_t k, int64_t K) {
  const int64_t a = k + kRowPrefetch;
  __builtin_prefetch(a < K ? cur + a : nx + (a - K), 0, 3);
}

// Weight vectors per 64-byte cache line: the k loops prefetch each line of a weight row once.
template <typename T>
constexpr int vecs_per_line() {
  return 64 / (W * (int)sizeof(T)) > 1 ? 64 / (W * (int)sizeof(T)) : 1;
}

// One vector step along k of a rows tile: acc[i][j] += x[i, k..k+W) * W[row j][k..k+W).
template <typename T, int MR, int NR>
static inline __attribute__((always_inline)) void rows_step(const float* x, int64_t ldx,
                                                            const T* const* wr, int64_t k,
                                                            vf (&acc)[MR][NR]) {
  vf w[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) w[j] = vload(wr[j] + k);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    vf xv = vload(x + i * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, w[j], acc[i][j]);
  }
}

// `nx`: the rows to prefetch from near the end of these (the next tile's), or nullptr for a tile
// whose weight rows an earlier tile of x rows brought into cache (no prefetches: they would only
// take load slots).
template <typename T, int MR, int NR>
static inline void rows_tile(const float* x, int64_t ldx, int64_t K, const T* const* wr,
                             const T* const* nx, const float* b, float* out, int64_t ldo) {
  vf acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  constexpr int L = vecs_per_line<T>();
  int64_t k = 0;
  for (; k + L * W <= K; k += L * W) {
    if (nx != nullptr) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) prefetch_row(wr[j], nx[j], k, K);
    }
#pragma GCC unroll 4
    for (int l = 0; l < L; ++l) rows_step<T, MR, NR>(x, ldx, wr, k + l * W, acc);
  }
  for (; k + W <= K; k += W) rows_step<T, MR, NR>(x, ldx, wr, k, acc);
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * to_f(wr[j][kk]);
      out[i * ldo + j] = s + b[j];
    }
  }
}

template <typename T, int NR>
static inline void rows_tile_m(const float* x, int64_t ldx, int64_t K, const T* const* wr,
                               const T* const* nx, const float* b, float* out, int64_t ldo,
                               int64_t mr) {
  switch (mr) {
    case 1: rows_tile<T, 1, NR>(x, ldx, K, wr, nx, b, out, ldo); break;
    case 2: rows_tile<T, (RR_MR >= 2 ? 2 : 1), NR>(x, ldx, K, wr, nx, b, out, ldo); break;
    case 3: rows_tile<T, (RR_MR >= 3 ? 3 : 1), NR>(x, ldx, K, wr, nx, b, out, ldo); break;
    default: rows_tile<T, RR_MR, NR>(x, ldx, K, wr, nx, b, out, ldo); break;
  }
}

// Rows of x per block, so that a block of x (MB x K floats) stays in L2 while the kept weight rows
// stream past it once per block.
static inline int64_t row_block(int64_t M, int64_t K) {
  int64_t mb = (int64_t{768} * 1024 / 4) / std::max<int64_t>(K, 1);
  mb = std::max<int64_t>(RR_MR, mb - mb % RR_MR);
  return std::min(M, mb);
}

// Whether `rows` weight rows of K elements fit in half of a 32 KiB L1 data cache (the x rows
// of a tile and the next rows take the rest): tiles of x rows after the first then find them there.
template <typename T>
static inline bool fits_l1(int rows, int64_t K) {
  return rows * K * (int64_t)sizeof(T) <= 16 * 1024;
}

// Pointers to kept rows idx[n .. n+cnt) of a (rows x K) matrix; past n1 the last kept row repeats
// (used only for prefetching).
template <typename T, int CNT>
static inline void row_ptrs(const T* Wm, int64_t K, const int64_t* idx, int64_t n, int64_t n1,
                            const T** p) {
  for (int j = 0; j < CNT; ++j) p[j] = Wm + idx[std::min(n + j, n1 - 1)] * K;
}

// Output columns [n0, n1) of out (M x ldo), for all M rows of x (M x K, contiguous).
template <typename T>
static void rows_range_t(const float* x, int64_t M, int64_t K, const T* Wm, const int64_t* idx,
                         const float* bias, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int NR1 = 2 * RR_NR;  // single row: wider tile, more independent FMA chains
  const T* wr[NR1];
  const T* nx[NR1];
  float b[NR1];
  auto biases = [&](int64_t nn, int cnt) {
    for (int j = 0; j < cnt; ++j) b[j] = bias ? bias[idx[nn + j]] : 0.f;
  };
  if (M == 1) {
    int64_t n = n0;
    for (; n + NR1 <= n1; n += NR1) {
      row_ptrs<T, NR1>(Wm, K, idx, n, n1, wr);
      row_ptrs<T, NR1>(Wm, K, idx, n + NR1, n1, nx);
      biases(n, NR1);
      rows_tile<T, 1, NR1>(x, K, K, wr, nx, b, out + n, ldo);
    }
    for (; n < n1; ++n) {
      row_ptrs<T, 1>(Wm, K, idx, n, n1, wr);
      row_ptrs<T, 1>(Wm, K, idx, n + 1, n1, nx);
      biases(n, 1);
      rows_tile<T, 1, 1>(x, K, K, wr, nx, b, out + n, ldo);
    }
    return;
  }
  const int64_t MB = row_block(M, K);
  const bool in_l1 = fits_l1<T>(RR_NR, K);
  for (int64_t mb0 = 0; mb0 < M; mb0 += MB) {
    const int64_t mb1 = std::min(M, mb0 + MB);
    int64_t n = n0;
    for (; n + RR_NR <= n1; n += RR_NR) {
      row_ptrs<T, RR_NR>(Wm, K, idx, n, n1, wr);
      row_ptrs<T, RR_NR>(Wm, K, idx, n + RR_NR, n1, nx);
      biases(n, RR_NR);
      for (int64_t m = mb0; m < mb1; m += RR_MR) {
        // The first x-row tile of a weight tile prefetches along its rows, the last the next
        // weight tile's; those between find rows that fit in L1 there (in_l1), and prefetch
        // rows that do not along them, as the first.
        const T* const* pf = (m + RR_MR >= mb1) ? nx : (m == mb0 || !in_l1 ? wr : nullptr);
        rows_tile_m<T, RR_NR>(x + m * K, K, K, wr, pf, b, out + m * ldo + n, ldo,
                              std::min<int64_t>(RR_MR, mb1 - m));
      }
    }
    for (; n < n1; ++n) {
      row_ptrs<T, 1>(Wm, K, idx, n, n1, wr);
      row_ptrs<T, 1>(Wm, K, idx, n + 1, n1, nx);
      biases(n, 1);
      for (int64_t m = mb0; m < mb1; m += RR_MR)
        rows_tile_m<T, 1>(x + m * K, K, K, wr, nx, b, out + m * ldo + n, ldo,
                          std::min<int64_t>(RR_MR, mb1 - m));
    }
  }
}

void rows_range(const float* x, int64_t M, int64_t K, const float* Wm, const int64_t* idx,
                const float* bias, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  rows_range_t<float>(x, M, K, Wm, idx, bias, n0, n1, out, ldo);
}
void rows_range(const float* x, int64_t M, int64_t K, const uint16_t* Wm, const int64_t* idx,
                const float* bias, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  rows_range_t<uint16_t>(x, M, K, Wm, idx, bias, n0, n1, out, ldo);
}

// ---- activations, in place over out[m, n0 .. n1) for m < M ---------------------------------------
// Branch-free float code that the compiler vectorizes for this file's instruction set, applied to a
// tile right after the kernel wrote it (while it is in cache, on the thread that wrote it). The
// formulas are ATen's CPU kernels' (GELU's erf by Abramowitz-Stegun 7.1.26, as
// Vectorized<float>::erf), with Cephes' expf (about 1 ulp).
static inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : x;  // 2^-126 at the bottom; e^88 < FLT_MAX at the top
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;  // 2^n (std::bit_cast is C++20; torch 2.11 builds extensions as C++17)
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

static inline float gelu_erf_f(float x) {
  const float z = x * 0.70710678118654752f, a = z < 0 ? -z : z;
  const float t = 1.0f / (0.3275911f * a + 1.0f);
  float r = 1.061405429f * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float erf_a = 1.0f - r * t * exp_f(-z * z);
  return 0.5f * x * (1.0f + (z < 0 ? -erf_a : erf_a));
}

static inline float gelu_tanh_f(float x) {
  const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (2.0f - 2.0f / (exp_f(2.0f * u) + 1.0f));  // 1 + tanh(u)
}

template <int ACT>
static void activate_t(float* out, int64_t M, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * ldo;
    for (int64_t n = n0; n < n1; ++n) {
      const float v = o[n];
      o[n] = ACT == kGeluErf ? gelu_erf_f(v) : ACT == kGeluTanh ? gelu_tanh_f(v)
                                                               : (v < 0.0f ? 0.0f : v);
    }
  }
}

// The activation (doe_kernels.h's codes; kIdentity does nothing) of out[m, n0 .. n1), m < M.
void activate_range(float* out, int64_t M, int64_t ldo, int64_t n0, int64_t n1, int64_t act) {
  switch (act) {
    case kGeluErf: activate_t<kGeluErf>(out, M, ldo, n0, n1); break;
    case kGeluTanh: activate_t<kGeluTanh>(out, M, ldo, n0, n1); break;
    case kRelu: activate_t<kRelu>(out, M, ldo, n0, n1); break;
    default: break;
  }
}

// ---- gather_swiglu: out[m, n] = silu(dot(x[m], G[kept[n]])) * dot(x[m], U[kept[n]]) ------------
static inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// One vector step along k of a SwiGLU tile (gate and up rows).
template <typename T, int MR, int NR>
static inline __attribute__((always_inline)) void swiglu_step(const float* x, int64_t ldx,
                                                              const T* const* gr,
                                                              const T* const* ur, int64_t k,
                                                              vf (&ag)[MR][NR],
                                                              vf (&au)[MR][NR]) {
  vf g[NR], u[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    g[j] = vload(gr[j] + k);
    u[j] = vload(ur[j] + k);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    vf xv = vload(x + i * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      ag[i][j] = vfma(xv, g[j], ag[i][j]);
      au[i][j] = vfma(xv, u[j], au[i][j]);
    }
  }
}

// `gn`, `un`: as rows_tile's `nx` (both nullptr or neither).
template <typename T, int MR, int NR>
static inline void swiglu_tile(const float* x, int64_t ldx, int64_t K, const T* const* gr,
                               const T* const* ur, const T* const* gn, const T* const* un,
                               float* out, int64_t ldo) {
  vf ag[MR][NR], au[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) ag[i][j] = au[i][j] = vzero();
  constexpr int L = vecs_per_line<T>();
  int64_t k = 0;
  for (; k + L * W <= K; k += L * W) {
    if (gn != nullptr) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        prefetch_row(gr[j], gn[j], k, K);
        prefetch_row(ur[j], un[j], k, K);
      }
    }
#pragma GCC unroll 4
    for (int l = 0; l < L; ++l) swiglu_step<T, MR, NR>(x, ldx, gr, ur, k + l * W, ag, au);
  }
  for (; k + W <= K; k += W) swiglu_step<T, MR, NR>(x, ldx, gr, ur, k, ag, au);
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float sg = vsum(ag[i][j]), su = vsum(au[i][j]);
      for (int64_t kk = k; kk < K; ++kk) {
        sg += x[i * ldx + kk] * to_f(gr[j][kk]);
        su += x[i * ldx + kk] * to_f(ur[j][kk]);
      }
      out[i * ldo + j] = silu_mul(sg, su);
    }
  }
}

template <typename T, int NR>
static inline void swiglu_tile_m(const float* x, int64_t ldx, int64_t K, const T* const* gr,
                                 const T* const* ur, const T* const* gn, const T* const* un,
                                 float* out, int64_t ldo, int64_t mr) {
  switch (mr) {
    case 1: swiglu_tile<T, 1, NR>(x, ldx, K, gr, ur, gn, un, out, ldo); break;
    case 2: swiglu_tile<T, (RR_MR >= 2 ? 2 : 1), NR>(x, ldx, K, gr, ur, gn, un, out, ldo); break;
    case 3: swiglu_tile<T, (RR_MR >= 3 ? 3 : 1), NR>(x, ldx, K, gr, ur, gn, un, out, ldo); break;
    default: swiglu_tile<T, RR_MR, NR>(x, ldx, K, gr, ur, gn, un, out, ldo); break;
  }
}

template <typename T>
static void swiglu_range_t(const float* x, int64_t M, int64_t K, const T* G, const T* U,
                           const int64_t* idx, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int NR = RR_NR / 2 > 0 ? RR_NR / 2 : 1;
  constexpr int NR1 = RR_NR;  // single row: wider tile
  const T *gr[NR1], *ur[NR1], *gn[NR1], *un[NR1];
  auto ptrs = [&](int64_t n, int cnt) {
    for (int j = 0; j < cnt; ++j) {
      const int64_t r = idx[std::min(n + j, n1 - 1)], q = idx[std::min(n + cnt + j, n1 - 1)];
      gr[j] = G + r * K;
      ur[j] = U + r * K;
      gn[j] = G + q * K;
      un[j] = U + q * K;
    }
  };
  if (M == 1) {
    int64_t n = n0;
    for (; n + NR1 <= n1; n += NR1) {
      ptrs(n, NR1);
      swiglu_tile<T, 1, NR1>(x, K, K, gr, ur, gn, un, out + n, ldo);
    }
    for (; n < n1; ++n) {
      ptrs(n, 1);
      swiglu_tile<T, 1, 1>(x, K, K, gr, ur, gn, un, out + n, ldo);
    }
    return;
  }
  const int64_t MB = row_block(M, K);
  const bool in_l1 = fits_l1<T>(2 * NR, K);
  for (int64_t mb0 = 0; mb0 < M; mb0 += MB) {
    const int64_t mb1 = std::min(M, mb0 + MB);
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
      ptrs(n, NR);
      for (int64_t m = mb0; m < mb1; m += RR_MR) {
        // as rows_range_t's tiles: the first (or any, where the rows do not fit in L1)
        // prefetches along its rows, the last the next rows
        const bool last = m + RR_MR >= mb1, first = m == mb0 || !in_l1;
        swiglu_tile_m<T, NR>(x + m * K, K, K, gr, ur, last ? gn : (first ? gr : nullptr),
                             last ? un : (first ? ur : nullptr), out + m * ldo + n, ldo,
                             std::min<int64_t>(RR_MR, mb1 - m));
      }
    }
    for (; n < n1; ++n) {
      ptrs(n, 1);
      for (int64_t m = mb0; m < mb1; m += RR_MR)
        swiglu_tile_m<T, 1>(x + m * K, K, K, gr, ur, gn, un, out + m * ldo + n, ldo,
                            std::min<int64_t>(RR_MR, mb1 - m));
    }
  }
}

void swiglu_range(const float* x, int64_t M, int64_t K, const float* G, const float* U,
                  const int64_t* idx, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  swiglu_range_t<float>(x, M, K, G, U, idx, n0, n1, out, ldo);
}
void swiglu_range(const float* x, int64_t M, int64_t K, const uint16_t* G, const uint16_t* U,
                  const int64_t* idx, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  swiglu_range_t<uint16_t>(x, M, K, G, U, idx, n0, n1, out, ldo);
}

// ---- gather_cols: out[m, c] = sum_j h[m, j] * Wt[cols[j], c] + bias[c] --------------------------
constexpr int kPrefetchDist = 8;

// With `accumulate`, the tile adds to out's values (a later chunk of kept rows) instead of
// starting from the bias.
template <typename T, int MR, int NV>
static inline void cols_tile(const float* h, int64_t ldh, int64_t J, const T* Wt, int64_t ldw,
                             const int64_t* idx, int64_t c, const float* bias, float* out,
                             int64_t ldo, bool accumulate = false) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    vf b0 = bias ? vload(bias + c + v * W) : vzero();
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) acc[i][v] = accumulate ? vload(out + i * ldo + c + v * W) : b0;
  }
  const T* base = Wt + c;
  for (int64_t j = 0; j < J; ++j) {
    const T* wr = base + idx[j] * ldw;
    if (j + kPrefetchDist < J) {
      const char* p = reinterpret_cast<const char*>(base + idx[j + kPrefetchDist] * ldw);
      constexpr int bytes = NV * W * static_cast<int>(sizeof(T));
#pragma GCC unroll 16
      for (int o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
    }
    vf w[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) w[v] = vload(wr + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      vf hb = vbcast(h[i * ldh + j]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(hb, w[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(out + i * ldo + c + v * W, acc[i][v]);
}

template <typename T, int NV>
static inline void cols_tile_m(const float* h, int64_t ldh, int64_t J, const T* Wt, int64_t ldw,
                               const int64_t* idx, int64_t c, const float* bias, float* out,
                               int64_t ldo, int64_t mr, bool accumulate = false) {
  switch (mr) {
#define DOE_CASE(R)                                                                       \
  case R:                                                                                 \
    cols_tile<T, (CR_MR >= R ? R : 1), NV>(h, ldh, J, Wt, ldw, idx, c, bias, out, ldo,    \
                                           accumulate);                                   \
    break;
    DOE_CASE(1)
    DOE_CASE(2)
    DOE_CASE(3)
    DOE_CASE(4)
    DOE_CASE(5)
#undef DOE_CASE
    default:
      cols_tile<T, CR_MR, NV>(h, ldh, J, Wt, ldw, idx, c, bias, out, ldo, accumulate);
      break;
  }
}

// Kept rows per packed panel chunk: 16 KiB of float32 (64 rows of 64 columns with AVX-512), so
// that the row tiles read the chunk from L1 (32 KiB chunks measured about the same).
constexpr int64_t kPanelRows = 16 * 1024 / (4 * CR_NV * W);

// Rows [m0, m1) of the output columns [c, c + CR_NV * W), through a packed panel: the kept rows'
// pieces of those columns copied (as float32) into one contiguous buffer, chunk by chunk, which
// every row tile then reads. Read in place, the pieces lie one weight row apart; where a row's
// bytes are a multiple of 1 KiB (768 or 4096 float32 features) they fall into a few cache sets
// and each row tile read them again from L2 or beyond. cols_range_t packs only there: elsewhere
// the copy costs more than it saves. Intel Xeon, 2 threads, float32, 16 / 64 rows of h, time
// against MKL's on the sliced weight: 768 outputs, 1996 kept rows: 1.52 / 2.42x in place, 0.96 /
// 1.29x packed; 1024 outputs, 1433 kept: 1.57 / 2.27x and 0.96 / 1.24x; but 768 outputs, 1075
// kept (their panel fits L2 in place): 0.92 / 1.08x and 0.95 / 1.15x; and 384 outputs (not
// packed) 0.65 / 0.89x in place, 0.83 / 1.87x packed. Chunks of 256 KiB rather than 16 KiB, read
// from L2 by the row tiles: 1.27 / 1.50x (1996 kept) and 1.24 / 1.29x (1075 kept).
template <typename T>
static void cols_panel_packed(const float* h, int64_t J, const T* Wt, int64_t N,
                              const int64_t* idx, const float* bias, int64_t m0, int64_t m1,
                              int64_t c, float* out) {
  constexpr int CW = CR_NV * W;
  static thread_local std::vector<float> panel;
  static thread_local std::vector<int64_t> order;  // 0, 1, 2, ...: the panel's rows in turn
  const int64_t chunk = std::min(J, kPanelRows);
  if (static_cast<int64_t>(panel.size()) < chunk * CW) panel.resize(chunk * CW);
  for (int64_t j = static_cast<int64_t>(order.size()); j < chunk; ++j) order.push_back(j);
  for (int64_t j0 = 0; j0 < J; j0 += chunk) {
    const int64_t rows = std::min(chunk, J - j0);
    for (int64_t j = 0; j < rows; ++j) {
      const T* src = Wt + idx[j0 + j] * N + c;
      float* dst = panel.data() + j * CW;
#pragma GCC unroll 16
      for (int v = 0; v < CR_NV; ++v) vstore(dst + v * W, vload(src + v * W));
    }
    for (int64_t m = m0; m < m1; m += CR_MR)
      cols_tile_m<float, CR_NV>(h + m * J + j0, J, rows, panel.data(), CW, order.data(), 0,
                                bias ? bias + c : nullptr, out + m * N + c, N,
                                std::min<int64_t>(CR_MR, m1 - m), j0 > 0);
  }
}

// Rows [m0, m1) and columns [c0, c1) of out (M x N, contiguous); h is (M x J) contiguous.
// c0 is a multiple of W unless c0 == c1; only the global tail (c1 == N) may be ragged.
template <typename T>
static void cols_range_t(const float* h, int64_t J, const T* Wt, int64_t N, const int64_t* idx,
                         const float* bias, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                         float* out) {
  constexpr int CW = CR_NV * W;
  int64_t c = c0;
  for (; c + CW <= c1; c += CW) {
    // several row tiles read a panel whose pieces fall into few cache sets: pack it once (a
    // segment keeping no row, J == 0, takes the tiles, which write its bias)
    if (J > 0 && m1 - m0 > CR_MR && (N * static_cast<int64_t>(sizeof(T))) % 1024 == 0) {
      cols_panel_packed(h, J, Wt, N, idx, bias, m0, m1, c, out);
      continue;
    }
    for (int64_t m = m0; m < m1; m += CR_MR)
      cols_tile_m<T, CR_NV>(h + m * J, J, J, Wt, N, idx, c, bias, out + m * N, N,
                            std::min<int64_t>(CR_MR, m1 - m));
  }
  for (; c + W <= c1; c += W)
    for (int64_t m = m0; m < m1; m += CR_MR)
      cols_tile_m<T, 1>(h + m * J, J, J, Wt, N, idx, c, bias, out + m * N, N,
                        std::min<int64_t>(CR_MR, m1 - m));
  if (c < c1) {  // ragged tail, fewer than W columns
    for (int64_t m = m0; m < m1; ++m) {
      float* o = out + m * N;
      for (int64_t cc = c; cc < c1; ++cc) o[cc] = bias ? bias[cc] : 0.f;
      for (int64_t j = 0; j < J; ++j) {
        const float hv = h[m * J + j];
        const T* wr = Wt + idx[j] * N;
        for (int64_t cc = c; cc < c1; ++cc) o[cc] += hv * to_f(wr[cc]);
      }
    }
  }
}

void cols_range(const float* h, int64_t J, const float* Wt, int64_t N, const int64_t* idx,
                const float* bias, int64_t m0, int64_t m1, int64_t c0, int64_t c1, float* out) {
  cols_range_t<float>(h, J, Wt, N, idx, bias, m0, m1, c0, c1, out);
}
void cols_range(const float* h, int64_t J, const uint16_t* Wt, int64_t N, const int64_t* idx,
                const float* bias, int64_t m0, int64_t m1, int64_t c0, int64_t c1, float* out) {
  cols_range_t<uint16_t>(h, J, Wt, N, idx, bias, m0, m1, c0, c1, out);
}

// ---- gather_cols over a range of kept rows, few rows of h: acc[m, :] += sum over kept rows j in
// [j0, j1) of h[m, j] * Wt[cols[j], :] ------------------------------------------------------------
// Each kept row of Wt is read whole and in order, four at a time, so a few rows of h (decoding)
// stream the weight from memory as a GEMV does; the (MR x N) float32 accumulator stays in cache.
// The caller splits the kept rows over threads, each with its own accumulator, and adds them up.
constexpr int64_t kSplitAhead = 8;  // kept rows between a row's prefetch and its use

template <typename T, int MR>
static void cols_split_t(const float* h, int64_t J, const T* Wt, int64_t N, const int64_t* idx,
                         int64_t j0, int64_t j1, float* acc) {
  // kept rows per pass over the accumulator: their MR x G factors of h stay in registers
  constexpr int G = 4;
  int64_t j = j0;
  for (; j + G <= j1; j += G) {
    const T *w[G], *next[G];  // this group's rows, and the rows kSplitAhead further on
    vf hb[MR][G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      w[g] = Wt + idx[j + g] * N;
      next[g] = Wt + idx[std::min(j + g + kSplitAhead, j1 - 1)] * N;
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) hb[m][g] = vbcast(h[m * J + j + g]);
    }
    int64_t c = 0;
    for (; c + W <= N; c += W) {
      vf x[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        __builtin_prefetch(next[g] + c, 0, 3);
        x[g] = vload(w[g] + c);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        vf a = vload(acc + m * N + c);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) a = vfma(hb[m][g], x[g], a);
        vstore(acc + m * N + c, a);
      }
    }
    for (; c < N; ++c)
      for (int m = 0; m < MR; ++m)
        for (int g = 0; g < G; ++g) acc[m * N + c] += h[m * J + j + g] * to_f(w[g][c]);
  }
  for (; j < j1; ++j) {
    const T* w = Wt + idx[j] * N;
    int64_t c = 0;
    for (; c + W <= N; c += W) {
      const vf x = vload(w + c);
      for (int m = 0; m < MR; ++m)
        vstore(acc + m * N + c, vfma(vbcast(h[m * J + j]), x, vload(acc + m * N + c)));
    }
    for (; c < N; ++c)
      for (int m = 0; m < MR; ++m) acc[m * N + c] += h[m * J + j] * to_f(w[c]);
  }
}

// cols_split_t for M rows, M in [R, kColsSplitMaxRows]: one instance per row count.
template <typename T, int R = 1>
static void cols_split_m(const float* h, int64_t M, int64_t J, const T* Wt, int64_t N,
                         const int64_t* idx, int64_t j0, int64_t j1, float* acc) {
  if constexpr (R <= kColsSplitMaxRows) {
    if (M == R) return cols_split_t<T, R>(h, J, Wt, N, idx, j0, j1, acc);
    cols_split_m<T, R + 1>(h, M, J, Wt, N, idx, j0, j1, acc);
  }
}

void cols_split(const float* h, int64_t M, int64_t J, const float* Wt, int64_t N,
                const int64_t* idx, int64_t j0, int64_t j1, float* acc) {
  cols_split_m<float>(h, M, J, Wt, N, idx, j0, j1, acc);
}
void cols_split(const float* h, int64_t M, int64_t J, const uint16_t* Wt, int64_t N,
                const int64_t* idx, int64_t j0, int64_t j1, float* acc) {
  cols_split_m<uint16_t>(h, M, J, Wt, N, idx, j0, j1, acc);
}
