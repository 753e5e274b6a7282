// bfloat16 gather + GEMM on Intel AMX: the kept rows of a weight are gathered straight into the
// tile layout of the matrix unit (64 x K bytes per task of 32 output columns, in L2) and
// multiplied there, instead of copied to a scratch matrix for oneDNN's GEMM (gather_linear_cpu.cpp,
// the gather + GEMM regime).
// On an Intel Xeon (2 threads), SmolLM2's and BERT-base's up projections keeping 35% of their
// rows at 64-128 rows took 0.84-0.97x the time of oneDNN on a weight sliced ahead, against
// 1.28-1.52x with the copy.
//
// Layout: `_tile_dpbf16ps(C, A, B)` adds A (16 rows x 32 bfloat16) times B (32 x 16, stored as 16
// rows of 16 pairs: B[k/2][n] holds k and k + 1) to C (16 x 16 float32). Each task owns 32 output
// columns (two B panels, packed once for the whole reduction) and runs over the rows of x two
// A tiles at a time: four C tiles, eight tile registers.
//   gather_rows: x @ weight[rows].T; A from x (rows padded to 32 with zeros), B gathered from 16
//       kept weight rows with one AVX-512 gather per B row (the 32-bit pairs of k, k + 1).
//   gather_cols: h @ weight_t[cols]; A from h (its columns padded to 32), B from two kept rows
//       of weight_t interleaved (times their scales, rounded to bfloat16).
//
// Not yet fast: gather_cols (the down projection). Keeping 35% of BERT-base's and SmolLM2's at
// 64-128 rows it took 1.4-1.9x oneDNN's time on a sliced weight (weights cycled over six layers,
// 2 threads), half in the packing (64 scattered bytes per kept row and panel, read at about
// 12 GB/s) and half in the products. Tried without a gain in the op: packing each row 256-1024
// bytes at a time; permutes instead of widening loads; prefetching the next panel's rows during
// the products (they then took as long as packing and products had: the prefetches' misses and
// the tile loads from L2 share the core's L1 miss slots); splitting the reduction so a B block
// stays in L1 (the C tiles' reloads cost more). Prefetching A's next tiles raised a lone
// multiply_panel from about 670 to 900 GFLOP/s per core, but not the op's time.
#include "amx_gather.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The tile intrinsics: GCC 11 and clang 12 on; the permission request: Linux.
#if defined(__x86_64__) && defined(__linux__) &&                    \
    ((defined(__clang__) && __clang_major__ >= 12) ||                 \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define DOE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace doe_kernels {

namespace {

#ifdef DOE_AMX
// CPUID leaf 7 (sub-leaf `sub`) register `reg` (0 EAX, 1 EBX, 2 ECX, 3 EDX), or 0.
unsigned cpuid7(unsigned sub, int reg) {
  unsigned r[4] = {0, 0, 0, 0};
  if (__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3]) == 0) return 0;
  return r[reg];
}

// The OS-enabled state components (XCR0), or 0 without OSXSAVE.
unsigned xcr0() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0 || (c & (1u << 27)) == 0) return 0;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return lo;
}

// The AVX-512 the kernels run besides the tiles: F, BW, VL (leaf 7 EBX bits 16, 30, 31) and BF16
// (sub-leaf 1 EAX bit 5), with the OS saving the vector and mask registers (XCR0 bits 1, 2, 5-7).
bool has_avx512_bf16() {
  const unsigned ebx = cpuid7(0, 1);
  return (ebx & (1u << 16)) && (ebx & (1u << 30)) && (ebx & (1u << 31)) &&
         (cpuid7(1, 0) & (1u << 5)) && (xcr0() & 0xE6u) == 0xE6u;
}

// Linux grants a process the tile data state on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA), as oneDNN asks for it; without it the first tile instruction faults.
bool tiles_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}
#endif

// DOE_KERNELS_CPU_AMX=0 turns the AMX path off, and so does DOE_KERNELS_CPU_ISA capped below
// avx512 (generic or avx2, as the micro-kernels' selection reads it).
[[maybe_unused]] bool amx_allowed_by_env() {
  const char* amx = std::getenv("DOE_KERNELS_CPU_AMX");
  if (amx != nullptr && std::string(amx) == "0") return false;
  const char* isa = std::getenv("DOE_KERNELS_CPU_ISA");
  return isa == nullptr || (std::string(isa) != "generic" && std::string(isa) != "avx2");
}

constexpr int64_t kPanel = 32;  // output columns per task, and the reduction's block
// Above this many rows of x the copy and oneDNN's GEMM run faster: every task reads all of x
// again (BERT-base's projections keeping 35%, Intel Xeon, 2 threads: the up projection with its
// GELU 0.79 / 1.70 ms at 256 / 512 rows against 0.46 / 0.73 ms; at 32-128 rows 0.14-0.28 ms
// against 0.19-0.31 ms, the down projection 0.17-0.29 against 0.24-0.31 ms).
constexpr int64_t kMaxRows = 128;

std::atomic<int64_t> calls{0};  // products computed here (amx_gather_calls)

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// `t` (rows x cols) copied into zeros of (rows_to x cols_to), or t itself when it fits.
at::Tensor padded(const at::Tensor& t, int64_t rows_to, int64_t cols_to) {
  if (t.size(0) == rows_to && t.size(1) == cols_to) return t;
  at::Tensor out = at::zeros({rows_to, cols_to}, t.options());
  out.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

}  // namespace

bool has_amx_bf16() {
#ifdef DOE_AMX
  static const bool amx = (cpuid7(0, 3) & (1u << 22)) && (xcr0() & (3u << 17)) == (3u << 17);
  return amx;
#else
  return false;
#endif
}

bool amx_gather_available() {
#ifdef DOE_AMX
  static const bool ok =
      has_amx_bf16() && has_avx512_bf16() && amx_allowed_by_env() && tiles_permitted();
  return ok;
#else
  return false;
#endif
}

bool amx_gather_takes(at::ScalarType dtype, int64_t rows, int64_t width) {
  return dtype == at::kBFloat16 && rows <= kMaxRows && width % kPanel == 0 &&
         amx_gather_available();
}

int64_t amx_gather_calls() { return calls.load(); }

#ifdef DOE_AMX
#if defined(__clang__)
#pragma clang attribute push(                                                     \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")
// GCC 12 warns about _mm512_undefined_epi32() inside its own intrinsics (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace {

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes; loaded for every panel, whose multiply ends by releasing the
// tiles (a thread keeps no tile state between calls).
void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  asm volatile("" ::: "memory");  // GCC's tile intrinsics do not tell it they read memory
  _tile_loadconfig(&c);
}

// out rows [0, Mpad) x columns [c0, c0 + 32) (row stride ldo floats) = A (Mpad x Kpad bfloat16,
// row stride lda elements) times the two packed B panels (`panels`: Kpad / 32 blocks of 2 x 256
// dwords).
void multiply_panel(const uint16_t* a, int64_t lda, int64_t Mpad, int64_t Kpad,
                    const uint32_t* panels, float* out, int64_t ldo) {
  configure_tiles();  // (after the packing's stores to `panels`: the barrier in it)
  for (int64_t m0 = 0; m0 < Mpad; m0 += 32) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t kb = 0; kb < Kpad / 32; ++kb) {
      _tile_loadd(0, a + m0 * lda + kb * 32, lda * 2);
      _tile_loadd(1, a + (m0 + 16) * lda + kb * 32, lda * 2);
      _tile_loadd(2, panels + kb * 512, 64);
      _tile_loadd(3, panels + kb * 512 + 256, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
    _tile_stored(4, out + m0 * ldo, ldo * 4);
    _tile_stored(5, out + m0 * ldo + 16, ldo * 4);
    _tile_stored(6, out + (m0 + 16) * ldo, ldo * 4);
    _tile_stored(7, out + (m0 + 16) * ldo + 16, ldo * 4);
  }
  _tile_release();
  asm volatile("" ::: "memory");  // the tile stores wrote `out`
}

// The B panels of weight rows idx[n0 .. n0 + 32) (those < N; the rest zeros), K bfloat16 each:
// panels[kb][half][p][n] = the pair (k, k + 1) = (2p, 2p + 1) of block kb of row n0 + 16 half + n.
void pack_rows(const uint16_t* w, int64_t K, const int64_t* idx, int64_t N, int64_t n0,
               uint32_t* panels) {
  for (int half = 0; half < 2; ++half) {
    alignas(64) int32_t offsets[16];
    __mmask16 valid = 0;
    for (int n = 0; n < 16; ++n) {
      const int64_t i = n0 + half * 16 + n;
      offsets[n] = i < N ? static_cast<int32_t>(idx[i] * K * 2) : 0;
      if (i < N) valid = static_cast<__mmask16>(valid | (1u << n));
    }
    const __m512i base = _mm512_load_si512(offsets);
    for (int64_t kb = 0; kb < K / 32; ++kb) {
      uint32_t* tile = panels + kb * 512 + half * 256;
      for (int p = 0; p < 16; ++p) {
        const __m512i at =
            _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int>(kb * 64 + p * 4)));
        _mm512_store_si512(tile + p * 16,
                           _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, at, w, 1));
      }
    }
  }
}

// 16 bfloat16 of a weight_t row from column c, times `scale` (rounded to bfloat16), as 16 dwords'
// low halves.
__m512i load16(const uint16_t* row, float scale, bool scaled) {
  const __m512i v =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
  if (!scaled) return v;
  const __m512 f =
      _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_set1_ps(scale));
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f));
}

// The B panels of weight_t's columns [c0, c0 + 32) over the kept rows cols[0 .. J) (zeros up to
// Jpad): panels[jb][half][p][n] = (row cols[32 jb + 2p], row cols[32 jb + 2p + 1]) at column
// c0 + 16 half + n, each times its scale.
void pack_cols(const uint16_t* wt, int64_t ldw, const int64_t* cols, const float* scales,
               int64_t J, int64_t Jpad, int64_t c0, uint32_t* panels) {
  for (int64_t jb = 0; jb < Jpad / 32; ++jb)
    for (int half = 0; half < 2; ++half) {
      uint32_t* tile = panels + jb * 512 + half * 256;
      for (int p = 0; p < 16; ++p) {
        const int64_t j = jb * 32 + 2 * p;
        __m512i pair = _mm512_setzero_si512();
        for (int odd = 0; odd < 2; ++odd) {
          if (j + odd >= J) continue;
          const __m512i v = load16(wt + cols[j + odd] * ldw + c0 + half * 16,
                                   scales ? scales[j + odd] : 1.0f, scales != nullptr);
          pair = _mm512_or_si512(pair, odd ? _mm512_slli_epi32(v, 16) : v);
        }
        _mm512_store_si512(tile + p * 16, pair);
      }
    }
}

// The calling thread's panel buffer, at least `dwords` long and 64-byte aligned (kept, as large
// as its largest use yet).
uint32_t* panel_buffer(int64_t dwords) {
  static thread_local std::vector<uint32_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < dwords + 16) buffer.resize(dwords + 16);
  const auto p = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<uint32_t*>((p + 63) & ~uintptr_t{63});
}

// out (Mpad x ldo float32) columns of panels [g0, g1) = a (Mpad x K) @ weight[idx].T.
void rows_tasks(const uint16_t* a, int64_t Mpad, int64_t K, const uint16_t* w, const int64_t* idx,
                int64_t N, int64_t g0, int64_t g1, float* out, int64_t ldo) {
  uint32_t* panels = panel_buffer(K * 16);
  for (int64_t g = g0; g < g1; ++g) {
    pack_rows(w, K, idx, N, g * kPanel, panels);
    multiply_panel(a, K, Mpad, K, panels, out + g * kPanel, ldo);
  }
}

// out (Mpad x N float32) columns of panels [g0, g1) = a (Mpad x Jpad) @ (weight_t[cols] * scales).
void cols_tasks(const uint16_t* a, int64_t Mpad, int64_t Jpad, const uint16_t* wt, int64_t N,
                const int64_t* cols, const float* scales, int64_t J, int64_t g0, int64_t g1,
                float* out) {
  uint32_t* panels = panel_buffer(Jpad * 16);
  for (int64_t g = g0; g < g1; ++g) {
    pack_cols(wt, N, cols, scales, J, Jpad, g * kPanel, panels);
    multiply_panel(a, Jpad, Mpad, Jpad, panels, out + g * kPanel, N);
  }
}

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif  // DOE_AMX

// The entry points check the path applies (outside the kernels' instruction sets), then run them.
std::optional<at::Tensor> amx_gather_rows_mm(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& rows) {
  const int64_t M = x.size(0), K = x.size(1), N = rows.numel();
  if (!amx_gather_takes(x.scalar_type(), M, K) || weight.size(0) * K * 2 > INT32_MAX)
    return std::nullopt;
  ++calls;
  const int64_t Mpad = round_up(M, 32), Npad = round_up(N, kPanel);
  const at::Tensor xs = padded(x, Mpad, K);
  at::Tensor out = at::empty({Mpad, Npad}, x.options().dtype(at::kFloat));
#ifdef DOE_AMX
  const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
  const auto* a = static_cast<const uint16_t*>(xs.data_ptr());
  const int64_t* idx = rows.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, Npad / kPanel, 1, [&](int64_t g0, int64_t g1) {
    rows_tasks(a, Mpad, K, w, idx, N, g0, g1, op, Npad);
  });
#endif
  return out.narrow(0, 0, M).narrow(1, 0, N);
}

std::optional<at::Tensor> amx_gather_cols_mm(const at::Tensor& h, const at::Tensor& weight_t,
                                             const at::Tensor& cols,
                                             const std::optional<at::Tensor>& scales) {
  const int64_t M = h.size(0), J = h.size(1), N = weight_t.size(1);
  if (!amx_gather_takes(h.scalar_type(), M, N)) return std::nullopt;
  ++calls;
  const int64_t Mpad = round_up(M, 32), Jpad = round_up(std::max<int64_t>(J, 1), 32);
  const at::Tensor hs = padded(h, Mpad, Jpad);
  at::Tensor sf;
  if (scales.has_value()) sf = scales->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({Mpad, N}, h.options().dtype(at::kFloat));
#ifdef DOE_AMX
  const auto* wt = static_cast<const uint16_t*>(weight_t.data_ptr());
  const auto* a = static_cast<const uint16_t*>(hs.data_ptr());
  const int64_t* idx = cols.data_ptr<int64_t>();
  const float* sp = scales.has_value() ? sf.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N / kPanel, 1, [&](int64_t g0, int64_t g1) {
    cols_tasks(a, Mpad, Jpad, wt, N, idx, sp, J, g0, g1, op);
  });
#endif
  return out.narrow(0, 0, M);
}

}  // namespace doe_kernels
