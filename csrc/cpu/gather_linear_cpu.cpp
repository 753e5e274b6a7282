// CPU kernels of the gathered linear primitives (see doe_kernels.h for the contract).
//
// Two regimes, chosen by the number of rows M of the input:
//  * fused (few rows; float32 on AMD CPUs with AVX-512 and bfloat16 on CPUs without AVX-512
//    always): gather-GEMV/GEMM micro-kernels that read each kept weight row in place, straight from
//    the full weight (nothing is copied). gather_rows and gather_swiglu use dot-product tiles (x
//    rows x kept weight rows, both contiguous along K) with software prefetch of the kept rows;
//    gather_cols uses broadcast-FMA tiles over the input-major weight_t (each kept input feature
//    one contiguous row). Work is split over kept rows (rows, swiglu) or output column blocks x row
//    blocks (cols), so no cross-thread reduction is needed; large inputs are processed in L2-sized
//    blocks of rows. With at most kColsSplitMaxRows rows (decoding) gather_cols instead splits its
//    kept rows over the threads, each row read whole, and adds the threads' sums (cols_split_run).
//    gather_rows' activation runs on each block of outputs right after the kernel wrote it, on the
//    same thread (activate_range).
//  * gather + GEMM (many rows): the kept rows are copied into a scratch matrix and ATen's GEMM
//    (oneDNN bf16, several times the fused kernels' throughput on avx512_bf16 CPUs; MKL sgemm, about
//    2x the fused kernels on Intel CPUs) multiplies; the copy is O(kept x K), the GEMM
//    O(M x kept x K). See use_gather_gemm for where the regimes meet. In bfloat16 on CPUs with
//    AMX, up to 128 rows, the kept rows go straight into the matrix unit's tiles instead, with no
//    copy (amx_gather_cpu.cpp).
// gather_cols' optional per-column scales are applied once, before the kernels: in the fused regime
// h is copied to float32 times the scales in one pass (for bfloat16 that pass is the widening copy
// the kernels read anyway), in the gather + GEMM regime the gathered scratch rows of weight_t (or
// the AMX path's packed rows) are scaled. Without scales neither regime does anything extra.
// The micro-kernels are compiled for AVX-512 and AVX2 (x86-64, selected at run time with
// __builtin_cpu_supports) and as portable C++ with GCC vector extensions (any other CPU, aarch64).
// DOE_KERNELS_CPU_ISA=generic|avx2|avx512 caps the selection (for testing the fallbacks).
#include "doe_kernels.h"
#include "cpu/amx_gather.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define DOE_X86_DISPATCH 1
#endif

namespace doe_kernels {
namespace {

// The most rows of h for which gather_cols splits the kept rows over threads (cols_split: each
// kept row read whole, in order) rather than tiling the output columns (cols_range).
constexpr int kColsSplitMaxRows = 8;

// ---------------------------------------------------------------------------------------------
// Portable micro-kernels.
namespace k_generic {
constexpr int W = 4;  // 16-byte vectors: SSE on x86-64, NEON on aarch64
typedef float vf __attribute__((vector_size(W * sizeof(float))));
static inline vf vzero() { return vf{}; }
static inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline vf vload(const uint16_t* p) {
  uint32_t u[W];
  for (int i = 0; i < W; ++i) u[i] = static_cast<uint32_t>(p[i]) << 16;
  vf v;
  std::memcpy(&v, u, sizeof(v));
  return v;
}
static inline vf vbcast(float s) { return vf{} + s; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
constexpr int RR_MR = 2, RR_NR = 4, CR_MR = 4, CR_NV = 4;
#include "gather_kernels_impl.h"
}  // namespace k_generic

#ifdef DOE_X86_DISPATCH
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA micro-kernels.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace k_avx2 {
constexpr int W = 8;
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vload(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vf vbcast(float s) { return _mm256_set1_ps(s); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
constexpr int RR_MR = 2, RR_NR = 4, CR_MR = 4, CR_NV = 2;
#include "gather_kernels_impl.h"
}  // namespace k_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------------------------------------
// AVX-512 micro-kernels.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 warns about _mm512_undefined_epi32() inside its own intrinsics (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace k_avx512 {
constexpr int W = 16;
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vload(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vf vbcast(float s) { return _mm512_set1_ps(s); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
constexpr int RR_MR = 4, RR_NR = 4, CR_MR = 6, CR_NV = 4;
#include "gather_kernels_impl.h"
}  // namespace k_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif  // DOE_X86_DISPATCH

// ---------------------------------------------------------------------------------------------
// Run-time selection of the micro-kernel set.
template <typename T>
struct KernelSet {
  void (*rows)(const float*, int64_t, int64_t, const T*, const int64_t*, const float*, int64_t,
               int64_t, float*, int64_t);
  void (*swiglu)(const float*, int64_t, int64_t, const T*, const T*, const int64_t*, int64_t,
                 int64_t, float*, int64_t);
  void (*cols)(const float*, int64_t, const T*, int64_t, const int64_t*, const float*, int64_t,
               int64_t, int64_t, int64_t, float*);
  void (*cols_split)(const float*, int64_t, int64_t, const T*, int64_t, const int64_t*, int64_t,
                     int64_t, float*);
  void (*activate)(float*, int64_t, int64_t, int64_t, int64_t, int64_t);
};

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether the CPU has the AVX-512 the kernels use (F, BW, VL, DQ), whatever DOE_KERNELS_CPU_ISA
// says; ATen checks BW, VL and DQ before running oneDNN's bfloat16 GEMM (aten_bf16_gemm_fast).
bool cpu_has_avx512() {
#ifdef DOE_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

Isa detect_isa() {
  Isa best = Isa::kGeneric;
#ifdef DOE_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && cpu_has_avx512()) best = Isa::kAvx512;
#endif
  if (const char* cap = std::getenv("DOE_KERNELS_CPU_ISA")) {
    const std::string c(cap);
    const Isa limit = c == "generic" ? Isa::kGeneric : c == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    best = std::min(best, limit);
  }
  return best;
}

Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

#define DOE_KSET(NS, T)                                                 \
  KernelSet<T> {                                                        \
    static_cast<decltype(KernelSet<T>::rows)>(&NS::rows_range),         \
        static_cast<decltype(KernelSet<T>::swiglu)>(&NS::swiglu_range), \
        static_cast<decltype(KernelSet<T>::cols)>(&NS::cols_range),     \
        static_cast<decltype(KernelSet<T>::cols_split)>(&NS::cols_split), \
        &NS::activate_range                                               \
  }

template <typename T>
KernelSet<T> kernels() {
#ifdef DOE_X86_DISPATCH
  switch (isa()) {
    case Isa::kAvx512: return DOE_KSET(k_avx512, T);
    case Isa::kAvx2: return DOE_KSET(k_avx2, T);
    default: break;
  }
#endif
  return DOE_KSET(k_generic, T);
}
#undef DOE_KSET

// ---------------------------------------------------------------------------------------------
// Regime: gather + ATen GEMM when use_gather_gemm says so, the fused micro-kernels otherwise.
// Measured at 2 threads (see docs/benchmarks.md):
//  * bfloat16: oneDNN's bf16 GEMM (avx512_bf16) is about 2x faster than the fused kernels (which
//    widen to float32) from about 16 rows up (AMD Zen 4). On CPUs with AMX the regime gathers
//    the kept rows straight into the matrix unit's tiles up to 128 rows, copying nothing
//    (amx_gather_cpu.cpp); the copy and oneDNN's GEMM from 129 rows. ATen runs oneDNN's bfloat16
//    GEMM only on CPUs with AVX-512 (BW, VL, DQ: its mkldnn_bf16_device_check), and its own
//    loops elsewhere (AVX2 CPUs), where bfloat16 GEMMs are no option: on an AMD EPYC with AVX2,
//    64 x 768 by 768 x 2000 took 17 ms with the weight row-major (x @ W.T), 262 ms input-major
//    (h @ W_t), against 1.8 ms for float32's. There bfloat16 stays fused at every row count,
//    also where every row is kept (aten_bf16_gemm_fast).
//  * float32 on AMD Zen 4: the fused kernels match or beat MKL's sgemm on pre-sliced weights at
//    every row count (1 to 4096; MKL runs its AVX2 code on AMD CPUs), so float32 never gathers.
//    On AMD CPUs without AVX-512 (Zen 3), where the kernels run AVX2 code too, MKL wins with
//    many rows as on Intel and the Intel rule applies: BERT-base's FFN keeping 35% at 512 rows
//    took 1.62x the pre-sliced time fused, 1.03x gathered (benchmarks/results/cpu_avx2).
//  * float32 on Intel (Xeon, AVX-512): MKL's sgemm is about 2x the fused gather_rows / gather_swiglu
//    kernels at many rows, and the copy of the kept rows is paid back after roughly 64 rows when the
//    weight sits in cache, and after a few hundred when it streams from memory (LLaMA-7B-sized
//    matrices): the bound below grows with the bytes copied. The same bound serves gather_cols:
//    its fused kernel matches MKL on sliced weights for outputs of 384 or 576 features; for 768
//    and 4096 it ran 2-3x slower (the input-major weight's row stride is then a multiple of 1 KiB,
//    and the panels it reads fall into few cache sets), 1.0-1.3x at 16-64 rows since it packs
//    those panels (cols_panel_packed).
// DOE_KERNELS_CPU_GATHER_ABOVE=<rows> (or set_cpu_gather_above) forces gather + GEMM above that
// many rows for every op and dtype (0: always; a huge number: never); -1 restores the rule.

int64_t initial_gather_above() {
  const char* value = std::getenv("DOE_KERNELS_CPU_GATHER_ABOVE");
  return value != nullptr && *value != '\0' ? std::atoll(value) : -1;
}

std::atomic<int64_t>& gather_above_override() {
  static std::atomic<int64_t> rows{initial_gather_above()};
  return rows;
}

bool float32_gemm_beats_fused() {
#ifdef DOE_X86_DISPATCH
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return !(amd && isa() == Isa::kAvx512);
#else
  return true;  // no measurement off x86-64: trust the platform's BLAS for many rows
#endif
}

// Whether ATen's bfloat16 GEMM runs oneDNN's code here (see the regime note): on x86-64 with
// AVX-512 BW, VL and DQ, as ATen checks; off x86-64 not measured, trusted as for float32.
bool aten_bf16_gemm_fast() {
#ifdef DOE_X86_DISPATCH
  return cpu_has_avx512();
#else
  return true;
#endif
}

bool use_gather_gemm(at::ScalarType dtype, int64_t M, int64_t copied_bytes) {
  const int64_t forced = gather_above_override().load(std::memory_order_relaxed);
  if (forced >= 0) return M > forced;
  // nothing to copy (whole_matrix): as a dense weight
  if (copied_bytes == 0) return !cpu_runs_fused_dense(dtype == at::kFloat, M);
  if (dtype != at::kFloat) return aten_bf16_gemm_fast() && M > 16;
  if (!float32_gemm_beats_fused()) return false;
  return M > 64 + copied_bytes / (128 * 1024);
}

// Whether idx[0..n) lists every one of `rows` rows in order.
bool lists_every_row(const int64_t* ip, int64_t n, int64_t rows) {
  if (n != rows) return false;
  for (int64_t i = 0; i < n; ++i)
    if (ip[i] != i) return false;
  return true;
}

// Whether the rows idx of src are all its rows in order (a union of experts that together keep
// every neuron): the gather + GEMM regime then multiplies src itself and copies nothing (its
// callers test it once, for the regime and for the operand).
bool whole_matrix(const at::Tensor& src, const at::Tensor& idx) {
  return src.is_contiguous() && lists_every_row(idx.data_ptr<int64_t>(), idx.numel(), src.size(0));
}

// Kept weight rows per parallel task of the fused gather_rows / gather_swiglu kernels: at least
// `least`, and few enough that a task either computes about `work` x 64 products per row of x or
// reads kMinTaskBytes of weights, whichever is fewer rows (a decoding step of a model whose
// weights stream from memory is bound by the reads: in a SmolLM2-sized model on an Intel Xeon a
// 384-row projection of 576 features took 76 us on one thread, 44-49 us on two).
constexpr int64_t kMinTaskBytes = 64 * 1024;

int64_t rows_grain(int64_t least, int64_t work, int64_t M, int64_t K, int64_t row_element_bytes) {
  const int64_t by_work = work / std::max<int64_t>(M * K / 64, 1);
  const int64_t by_bytes = kMinTaskBytes / std::max<int64_t>(K * row_element_bytes, 1);
  return std::max(least, std::min(by_work, by_bytes));
}

// With fewer kept rows than this per thread, large inputs are split over rows of x instead.
constexpr int64_t kMinColsPerThread = 32;
// gather_cols' parallel tasks: (column block of kColBlock) x (row block of kRowBlock).
constexpr int64_t kColBlock = 64;
constexpr int64_t kRowBlock = 48;

// ---------------------------------------------------------------------------------------------
// Checks and helpers.
void check_input(const at::Tensor& x, const char* fn, const char* xname) {
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", xname, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, fn, ": ", xname, " must be 2-D (rows, features), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, fn, ": ", xname,
              " must be float32 or bfloat16 on CPU, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), fn, ": ", xname, " must be contiguous");
}

void check_index_tensor(const at::Tensor& idx, const char* fn, const char* iname) {
  TORCH_CHECK(idx.device().is_cpu(), fn, ": ", iname, " must be a CPU tensor, got ", idx.device());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous(), fn, ": ",
              iname, " must be a 1-D contiguous int64 tensor");
}

void check_common(const at::Tensor& x, const at::Tensor& idx, const char* fn, const char* xname,
                  const char* iname) {
  check_input(x, fn, xname);
  check_index_tensor(idx, fn, iname);
  TORCH_CHECK(idx.numel() > 0, fn, ": ", iname, " must be non-empty");
}

void check_operand(const at::Tensor& t, const at::Tensor& x, const char* fn, const char* name,
                   int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " dtype ", t.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// Every index is read, not only the ends: the callers' sortedness is not trusted (an index tensor
// changed in place after it was validated would otherwise make the kernels read out of bounds). The
// O(n) pass is negligible next to the O(n x features) kernel work. Unsorted or repeated indices are
// harmless to the kernels (every output is written by position, never scattered by index value),
// so only the range is checked. Raises ValueError in Python.
void check_index_range(const at::Tensor& idx, int64_t bound, const char* fn, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  const int64_t* bad = std::find_if(p, p + n, [bound](int64_t i) { return i < 0 || i >= bound; });
  TORCH_CHECK_VALUE(bad == p + n, fn, ": ", name, " holds index ", *bad, " at position ", bad - p,
                    ", out of range for a dimension of size ", bound);
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

// h (M x J, contiguous) in float32 with column j multiplied by scales[j] (same dtype as h): one
// pass, in parallel over rows, the product formed in float32.
at::Tensor as_float_scaled(const at::Tensor& h, const at::Tensor& scales) {
  const int64_t M = h.size(0), J = h.size(1);
  at::Tensor out = at::empty({M, J}, h.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  auto run = [&](const auto* hp, const auto* sp) {
    at::parallel_for(0, M, std::max<int64_t>(1, 32768 / J), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t j = 0; j < J; ++j) op[m * J + j] = widen(hp[m * J + j]) * widen(sp[j]);
    });
  };
  if (h.scalar_type() == at::kFloat) {
    run(h.data_ptr<float>(), scales.data_ptr<float>());
  } else {
    run(h.data_ptr<at::BFloat16>(), scales.data_ptr<at::BFloat16>());
  }
  return out;
}

// `t` (a view of a padded float32 buffer) as a contiguous tensor of `dtype`, in one pass.
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

at::Tensor finish(const at::Tensor& out_f, at::ScalarType dtype) {
  return dtype == at::kFloat ? out_f : out_f.to(dtype);
}

void apply_activation_(at::Tensor& t, int64_t act) {
  switch (act) {
    case kIdentity: break;
    case kGeluErf: at::gelu_(t, "none"); break;
    case kGeluTanh: at::gelu_(t, "tanh"); break;
    case kRelu: at::relu_(t); break;
    default: TORCH_CHECK(false, "doe_kernels: unknown activation code ", act);
  }
}

// The gather + GEMM regime's copies of kept rows live only until the GEMM after them. A fresh
// buffer of tens of MB comes straight from the OS each call (glibc maps blocks over 32 MiB anew)
// and its pages fault in during the copy: LLaMA-7B's down projection with 65% kept in bfloat16
// (58 MB) took 17.4 ms to copy into fresh memory, 3.5 ms into reused memory (Intel Xeon, 2
// threads). Smaller copies into fresh (malloc'd) memory fault no pages, yet in some processes the
// GEMM after them ran 2-3x slower: SmolLM2-135M's SwiGLU FFN keeping 1535 of its 1536 neurons
// (3.5 MB per matrix), 32 rows, took 3.0-3.5 ms against 1.2-1.3 ms, in one process out of two or
// three, and whenever the other lists' calls ran before it (the cause is not known; reusing the
// buffer removes it). So copies of kScratchMinBytes or more go to a buffer the calling thread keeps
// (one per `slot`, as large as its largest copy yet) and reuses.
constexpr int64_t kScratchMinBytes = 1 << 20;

// `bytes` of the calling thread's scratch buffer `slot`, 64-byte aligned, valid until the next
// call for that slot on this thread.
void* scratch(int slot, int64_t bytes) {
  static thread_local at::Tensor buffers[2];
  at::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::Tensor();  // free the smaller one first
    buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  return buffer.data_ptr();
}

// (n x cols) copy of the rows idx[0..n) of src, in parallel. Large copies land in the calling
// thread's scratch buffer `slot` (see kScratchMinBytes): the result is then valid until the next
// large gather_rows for that slot on this thread, so callers use it at once (one GEMM) and two
// copies alive together take different slots.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& idx, int slot = 0) {
  const int64_t n = idx.numel();
  const int64_t row_bytes = src.size(1) * src.element_size();
  at::Tensor dst = n * row_bytes >= kScratchMinBytes
                       ? at::from_blob(scratch(slot, n * row_bytes), {n, src.size(1)},
                                       src.options())
                       : at::empty({n, src.size(1)}, src.options());
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(d + i * row_bytes, s + ip[i] * row_bytes, row_bytes);
  });
  return dst;
}

template <typename T>
const T* raw(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

}  // namespace

void set_cpu_gather_above(int64_t rows) { gather_above_override().store(rows); }

int64_t cpu_gather_above() { return gather_above_override().load(); }

bool cpu_uses_gather_gemm(bool float32, int64_t rows, int64_t copied_bytes) {
  return use_gather_gemm(float32 ? at::kFloat : at::kBFloat16, rows, copied_bytes);
}

bool cpu_runs_fused_dense(bool float32, int64_t rows) {
  const int64_t forced = gather_above_override().load(std::memory_order_relaxed);
  if (forced >= 0) return rows <= forced;
  // At most kColsSplitMaxRows rows (decoding), where the kernels read weights streaming from
  // memory faster than ATen's GEMM: float32 (Intel Xeon, 2 threads, a SmolLM2-sized model's
  // 576 x 576 projections at 5 rows with other weights read in between: 73-76 us against
  // 103-108 us with MKL; five sequences decoding in one mixed batch, every head kept: 46.4-46.8
  // ms a step against 49.2-49.3 ms) and bfloat16 (the same CPU: a SmolLM2-shaped model's
  // decoding step with every head kept and 35% of the FFN, 19.5-20.6 ms against 26.4-26.9 ms
  // with oneDNN's AMX GEMM for the attention projections, the dense model 35.8-36.6 ms; one
  // expert's FFN keeping every neuron at 1-8 rows,
  // benchmarks/results/cpu_intel/segmented_regimes_bfloat16.json: 1.1-2.9x oneDNN's speed,
  // 0.75-0.83x at 16). float32 on AMD CPUs with AVX-512 at every row count, where the kernels
  // beat MKL's AVX2 code (above); bfloat16 at every row count where ATen's bfloat16 GEMM is
  // its own slow loops (CPUs without AVX-512, above). With more rows ATen's GEMM on the whole
  // weight, which needs no copy.
  return rows <= kColsSplitMaxRows || (float32 && !float32_gemm_beats_fused()) ||
         (!float32 && !aten_bf16_gemm_fast());
}

// =============================================================================================
at::Tensor gather_rows_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                                  int64_t activation) {
  constexpr const char* fn = "gather_rows_linear_cpu";
  check_common(x, rows, fn, "x", "rows");
  check_operand(weight, x, fn, "weight", 2);
  TORCH_CHECK(weight.size(1) == x.size(1), fn, ": weight has ", weight.size(1),
              " input features, x has ", x.size(1));
  TORCH_CHECK(activation >= kIdentity && activation <= kRelu, fn, ": unknown activation code ",
              activation);
  if (bias.has_value()) {
    check_operand(*bias, x, fn, "bias", 1);
    TORCH_CHECK(bias->size(0) == weight.size(0), fn, ": bias has ", bias->size(0),
                " entries, weight has ", weight.size(0), " rows");
  }
  check_index_range(rows, weight.size(0), fn, "rows");
  const int64_t M = x.size(0), K = x.size(1), N = rows.numel();
  if (M == 0) return at::empty({0, N}, x.options());

  const bool whole = whole_matrix(weight, rows);
  if (use_gather_gemm(x.scalar_type(), M, whole ? 0 : N * K * x.element_size())) {
    if (!whole) {
      if (std::optional<at::Tensor> product = amx_gather_rows_mm(x, weight, rows)) {
        at::Tensor sum = *product;  // a float32 view of the path's own buffer: updated in place
        if (bias.has_value()) sum.add_(bias->index_select(0, rows));
        at::Tensor out = as_contiguous(sum, x.scalar_type());
        apply_activation_(out, activation);  // as the copy's path does: on x's dtype, contiguous
        return out;
      }
    }
    at::Tensor wg = whole ? weight : gather_rows(weight, rows);
    at::Tensor out = bias.has_value() ? at::addmm(bias->index_select(0, rows), x, wg.t())
                                      : at::mm(x, wg.t());
    apply_activation_(out, activation);
    return out;
  }

  at::Tensor xf = as_float(x);
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = as_float(*bias);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const float* bp = bf.has_value() ? bf->data_ptr<float>() : nullptr;
  const int64_t* ip = rows.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto ks, auto wp) {
    const int64_t nt = at::get_num_threads();
    if (N < kMinColsPerThread * nt && M >= 16 * nt) {
      // Few kept rows, many input rows: split over input rows.
      at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        ks.rows(xp + m0 * K, m1 - m0, K, wp, ip, bp, 0, N, op + m0 * N, N);
        ks.activate(op + m0 * N, m1 - m0, N, 0, N, activation);
      });
    } else {
      const int64_t grain = rows_grain(16, 4096, M, K, weight.element_size());
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        ks.rows(xp, M, K, wp, ip, bp, n0, n1, op, N);
        ks.activate(op, M, N, n0, n1, activation);
      });
    }
  };
  if (weight.scalar_type() == at::kFloat) {
    run(kernels<float>(), raw<float>(weight));
  } else {
    run(kernels<uint16_t>(), raw<uint16_t>(weight));
  }
  return finish(out, x.scalar_type());
}

// =============================================================================================
at::Tensor gather_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                             const at::Tensor& kept) {
  constexpr const char* fn = "gather_swiglu_cpu";
  check_common(x, kept, fn, "x", "kept");
  check_operand(w_gate, x, fn, "w_gate", 2);
  check_operand(w_up, x, fn, "w_up", 2);
  TORCH_CHECK(w_gate.sizes() == w_up.sizes(), fn, ": w_gate ", w_gate.sizes(), " and w_up ",
              w_up.sizes(), " differ in shape");
  TORCH_CHECK(w_gate.size(1) == x.size(1), fn, ": w_gate has ", w_gate.size(1),
              " input features, x has ", x.size(1));
  check_index_range(kept, w_gate.size(0), fn, "kept");
  const int64_t M = x.size(0), K = x.size(1), N = kept.numel();
  if (M == 0) return at::empty({0, N}, x.options());

  const bool whole = whole_matrix(w_gate, kept) && w_up.is_contiguous();
  if (use_gather_gemm(x.scalar_type(), M, whole ? 0 : 2 * N * K * x.element_size())) {
    if (!whole) {
      std::optional<at::Tensor> gate = amx_gather_rows_mm(x, w_gate, kept);
      if (gate.has_value()) {
        at::Tensor g = *gate;  // a view of its padded result: silu_ then writes in place
        at::silu_(g);
        g.mul_(*amx_gather_rows_mm(x, w_up, kept));
        return as_contiguous(g, x.scalar_type());
      }
    }
    at::Tensor g = at::mm(x, (whole ? w_gate : gather_rows(w_gate, kept)).t());
    at::Tensor u = at::mm(x, (whole ? w_up : gather_rows(w_up, kept, 1)).t());
    at::silu_(g);
    g.mul_(u);
    return g;
  }

  at::Tensor xf = as_float(x);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int64_t* ip = kept.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto ks, auto gp, auto up) {
    const int64_t nt = at::get_num_threads();
    if (N < kMinColsPerThread * nt && M >= 16 * nt) {
      at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        ks.swiglu(xp + m0 * K, m1 - m0, K, gp, up, ip, 0, N, op + m0 * N, N);
      });
    } else {
      const int64_t grain = rows_grain(8, 2048, M, K, 2 * w_gate.element_size());
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        ks.swiglu(xp, M, K, gp, up, ip, n0, n1, op, N);
      });
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(kernels<float>(), raw<float>(w_gate), raw<float>(w_up));
  } else {
    run(kernels<uint16_t>(), raw<uint16_t>(w_gate), raw<uint16_t>(w_up));
  }
  return finish(out, x.scalar_type());
}

// rows x N floats at out, each row the bias (zeros without one): where split sums start.
void fill_with_bias(float* out, int64_t rows, int64_t N, const float* bias) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias ? bias[n] : 0.f;
}

// out[i] += part[i] for i < count: a split's later parts summed into its first.
void add_part(float* out, const float* part, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] += part[i];
}

// gather_cols for at most kColsSplitMaxRows rows of h (out: M x N float32): the kept rows split
// into one part per thread (at least a task's worth of weight bytes each), each part's rows read
// whole and in order (ks.cols_split) into its own accumulator: the first part's is out itself,
// holding the bias; the others' are added to it at the end. Tiling the output columns instead
// (cols_range) reads every kept row in pieces of a few cache lines, which streams badly from
// memory. Intel Xeon, 2 threads, float32, 65% of the rows kept: in a SmolLM2-sized model
// decoding one token, the down projection (998 kept of 1536 rows of 576) took 166 us tiled and
// 107 us split; over weights too large for the caches, 1-8 rows ran 1.1-1.4x faster split on
// outputs of 384-768 features and 1.5-2.2x on 4096 (LLaMA-7B's). A weight that stays in L2
// across calls (an op benchmark's loop) is the exception: there 4-8 rows on 384 outputs ran
// 0.7-0.8x as fast split.
template <typename T>
void cols_split_run(const KernelSet<T>& ks, const float* hp, int64_t M, int64_t J, const T* wp,
                    int64_t N, const int64_t* ip, const float* bp, float* op,
                    int64_t element_bytes) {
  const int64_t row_bytes = std::max<int64_t>(N * element_bytes, 1);
  const int64_t grain = std::max<int64_t>(16, kMinTaskBytes / row_bytes);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), J / grain));
  fill_with_bias(op, M, N, bp);
  std::vector<float> acc((parts - 1) * M * N, 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      ks.cols_split(hp, M, J, wp, N, ip, J * p / parts, J * (p + 1) / parts,
                    p == 0 ? op : acc.data() + (p - 1) * M * N);
  });
  for (int64_t p = 1; p < parts; ++p) add_part(op, acc.data() + (p - 1) * M * N, M * N);
}

// =============================================================================================
at::Tensor gather_cols_linear_cpu(const at::Tensor& h, const at::Tensor& weight_t,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& cols,
                                  const std::optional<at::Tensor>& scales) {
  constexpr const char* fn = "gather_cols_linear_cpu";
  check_common(h, cols, fn, "h", "cols");
  check_operand(weight_t, h, fn, "weight_t", 2);
  TORCH_CHECK(h.size(1) == cols.numel(), fn, ": h has ", h.size(1), " features but cols has ",
              cols.numel(), " entries");
  const int64_t N = weight_t.size(1);
  if (bias.has_value()) {
    check_operand(*bias, h, fn, "bias", 1);
    TORCH_CHECK(bias->size(0) == N, fn, ": bias has ", bias->size(0), " entries, weight_t has ", N,
                " output features");
  }
  if (scales.has_value()) {
    check_operand(*scales, h, fn, "scales", 1);
    TORCH_CHECK(scales->size(0) == cols.numel(), fn, ": scales has ", scales->size(0),
                " entries but cols has ", cols.numel());
  }
  check_index_range(cols, weight_t.size(0), fn, "cols");
  const int64_t M = h.size(0), J = h.size(1);
  if (M == 0) return at::empty({0, N}, h.options());

  const bool whole = !scales.has_value() && whole_matrix(weight_t, cols);
  if (use_gather_gemm(h.scalar_type(), M, whole ? 0 : J * N * h.element_size())) {
    if (!whole) {
      if (std::optional<at::Tensor> product = amx_gather_cols_mm(h, weight_t, cols, scales)) {
        at::Tensor out = *product;
        if (bias.has_value()) out.add_(*bias);
        return as_contiguous(out, h.scalar_type());
      }
    }
    // (scales are applied to a copy of the rows, never to weight_t itself: never whole)
    at::Tensor wg = whole ? weight_t : gather_rows(weight_t, cols);
    if (scales.has_value()) wg.mul_(scales->unsqueeze(1));  // row j of the scratch times scales[j]
    return bias.has_value() ? at::addmm(*bias, h, wg) : at::mm(h, wg);
  }

  at::Tensor hf = scales.has_value() ? as_float_scaled(h, *scales) : as_float(h);
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = as_float(*bias);
  at::Tensor out = at::empty({M, N}, h.options().dtype(at::kFloat));
  const float* hp = hf.data_ptr<float>();
  const float* bp = bf.has_value() ? bf->data_ptr<float>() : nullptr;
  const int64_t* ip = cols.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  if (M <= kColsSplitMaxRows) {
    if (h.scalar_type() == at::kFloat) {
      cols_split_run(kernels<float>(), hp, M, J, raw<float>(weight_t), N, ip, bp, op,
                     weight_t.element_size());
    } else {
      cols_split_run(kernels<uint16_t>(), hp, M, J, raw<uint16_t>(weight_t), N, ip, bp, op,
                     weight_t.element_size());
    }
    return finish(out, h.scalar_type());
  }
  // Column block outermost, so that a thread's consecutive tasks reuse one weight panel
  // (J x kColBlock) from L2.
  const int64_t ncb = (N + kColBlock - 1) / kColBlock;
  const int64_t nrb = (M + kRowBlock - 1) / kRowBlock;
  auto run = [&](auto ks, auto wp) {
    at::parallel_for(0, ncb * nrb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cb = t / nrb, rb = t % nrb;
        const int64_t c0 = cb * kColBlock, c1 = std::min(N, c0 + kColBlock);
        const int64_t m0 = rb * kRowBlock, m1 = std::min(M, m0 + kRowBlock);
        ks.cols(hp, J, wp, N, ip, bp, m0, m1, c0, c1, op);
      }
    });
  };
  if (h.scalar_type() == at::kFloat) {
    run(kernels<float>(), raw<float>(weight_t));
  } else {
    run(kernels<uint16_t>(), raw<uint16_t>(weight_t));
  }
  return finish(out, h.scalar_type());
}

// The layout of a segmented FFN, shared with the CUDA entry points (doe_kernels.h).
namespace {

void check_offsets(const at::Tensor& offsets, int64_t total, const char* fn, const char* name) {
  check_index_tensor(offsets, fn, name);
  const int64_t* p = offsets.data_ptr<int64_t>();
  const int64_t n = offsets.numel();
  TORCH_CHECK_VALUE(n > 0 && p[0] == 0 && p[n - 1] == total, fn, ": ", name,
                    " must start at 0 and end at ", total);
  TORCH_CHECK_VALUE(std::is_sorted(p, p + n), fn, ": ", name, " must be non-decreasing");
}

}  // namespace

std::vector<Segment> read_segment_layout(const at::Tensor& segments,
                                         const at::Tensor& kept_offsets, int64_t rows,
                                         int64_t kept_count, const char* fn) {
  check_offsets(segments, rows, fn, "segments");
  check_offsets(kept_offsets, kept_count, fn, "kept_offsets");
  TORCH_CHECK_VALUE(segments.numel() == kept_offsets.numel(), fn, ": segments has ",
                    segments.numel() - 1, " segments but kept_offsets has ",
                    kept_offsets.numel() - 1, " kept lists");
  const int64_t* r = segments.data_ptr<int64_t>();
  const int64_t* k = kept_offsets.data_ptr<int64_t>();
  std::vector<Segment> out;
  for (int64_t s = 0; s + 1 < segments.numel(); ++s)
    if (r[s + 1] > r[s]) out.push_back({r[s], r[s + 1] - r[s], k[s], k[s + 1] - k[s], 0});
  return out;
}

// =============================================================================================
// Segmented FFNs (mixed-task batches): segment s holds rows [segments[s], segments[s + 1]) of x
// and keeps kept[kept_offsets[s] .. kept_offsets[s + 1]) (and the scales there). One call serves
// every segment. Segments with enough rows for the gather + GEMM regime (use_gather_gemm, as the
// single-expert ops decide it for either projection) run one after another through the
// single-expert entry points, each of which uses all threads; the others run on the fused kernels
// in three phases, each over every segment at once: the up projections into one packed float32
// hidden buffer (a (rows x kept) block per segment), the activation and scales over that buffer,
// the down projections into out. A phase's work items are tiles (segment x row block x column
// block) that the threads take one after another, so a batch of a few one-row segments still
// keeps every thread busy and segments of different sizes balance. The hidden activations stay
// in float32 between the projections (the single-expert ops round them to x's dtype).
namespace {

// Rows [m0, m1) x columns [c0, c1) of segment `seg`: one work item of a parallel phase.
struct Tile {
  size_t seg;
  int64_t m0, m1, c0, c1;
};

// Up projections: tiles of kUpRows rows x kUpKept kept neurons.
constexpr int64_t kUpRows = 128;
constexpr int64_t kUpKept = 64;

// The segments holding rows, from a checked layout.
std::vector<Segment> read_segments(const at::Tensor& x, const at::Tensor& segments,
                                   const at::Tensor& kept, const at::Tensor& kept_offsets,
                                   const std::optional<at::Tensor>& scales, int64_t neurons,
                                   const char* fn) {
  check_index_tensor(kept, fn, "kept");
  check_index_range(kept, neurons, fn, "kept");
  auto segs = read_segment_layout(segments, kept_offsets, x.size(0), kept.numel(), fn);
  if (scales.has_value()) {
    check_operand(*scales, x, fn, "scales", 1);
    TORCH_CHECK(scales->size(0) == kept.numel(), fn, ": scales has ", scales->size(0),
                " entries but kept has ", kept.numel());
  }
  return segs;
}

// Runs the segments for which `gemm(segment)` holds through `single(rows of x, kept list,
// scales)` (the single-expert ops), writing their rows of out; returns the others, each with the
// offset of its block in the packed hidden buffer.
template <typename Gemm, typename Single>
std::vector<Segment> run_gemm_segments(const std::vector<Segment>& segs, const at::Tensor& x,
                                       const at::Tensor& kept,
                                       const std::optional<at::Tensor>& scales, at::Tensor& out,
                                       const Gemm& gemm, const Single& single) {
  std::vector<Segment> fused;
  int64_t hidden = 0;
  for (Segment s : segs) {
    if (s.kept == 0 || !gemm(s)) {
      s.hidden = hidden;
      hidden += s.rows * s.kept;
      fused.push_back(s);
      continue;
    }
    std::optional<at::Tensor> sc;
    if (scales.has_value()) sc = scales->narrow(0, s.k0, s.kept);
    out.narrow(0, s.r0, s.rows)
        .copy_(single(x.narrow(0, s.r0, s.rows), kept.narrow(0, s.k0, s.kept), sc));
  }
  return fused;
}

// Tiles of rows x columns (`width(segment)` columns) over every segment, column block outermost
// so that a thread's consecutive tiles tend to share a weight panel.
template <typename Width>
std::vector<Tile> tile_segments(const std::vector<Segment>& segs, int64_t tile_rows,
                                int64_t tile_cols, const Width& width) {
  std::vector<Tile> tiles;
  for (size_t s = 0; s < segs.size(); ++s) {
    const int64_t rows = segs[s].rows, cols = width(segs[s]);
    for (int64_t c = 0; c < cols; c += tile_cols)
      for (int64_t m = 0; m < rows; m += tile_rows)
        tiles.push_back({s, m, std::min(rows, m + tile_rows), c, std::min(cols, c + tile_cols)});
  }
  return tiles;
}

// body(i) for every i < count, in parallel: each thread takes the next item when it is done with
// one (items of different segments differ in cost).
template <typename Body>
void for_each_item(size_t count, const Body& body) {
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (size_t i = next++; i < count; i = next++) body(i);
  });
}

template <typename Body>
void for_each_tile(const std::vector<Tile>& tiles, const Body& body) {
  for_each_item(tiles.size(), [&](size_t i) { body(tiles[i]); });
}

// Column j of each segment's hidden block times scales[k0 + j], in parallel over segments.
void scale_hidden_(const std::vector<Segment>& segs, const at::Tensor& scales, float* hidden) {
  const float* sp = scales.data_ptr<float>();
  at::parallel_for(0, segs.size(), 1, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i) {
      const Segment& s = segs[i];
      for (int64_t m = 0; m < s.rows; ++m) {
        float* h = hidden + s.hidden + m * s.kept;
        for (int64_t j = 0; j < s.kept; ++j) h[j] *= sp[s.k0 + j];
      }
    }
  });
}

// A part of a decoding segment's down projection: its kept rows [j0, j1), summed into the
// segment's rows of out (its first part, buffer -1) or into the floats of a buffer at `buffer`,
// added to them afterwards.
struct DownPart {
  size_t seg;
  int64_t j0, j1, buffer;
};

// Each segment's down projection (ks over the input-major w_down_t) from its hidden block into
// its rows of out (float32, rows x N). Segments of at most kColsSplitMaxRows rows (decoding) run
// as gather_cols does at few rows: their kept rows split into parts read whole (ks.cols_split),
// about four parts per thread over all of them; the others are tiled over rows x output columns.
// Both kinds share one parallel phase. Intel Xeon, 2 threads, five segments of 1-8 rows each
// keeping 35% (a loop over one call, its weights in cache): split, the call ran 1.0-1.14x as fast
// as tiled on SmolLM2-135M's FFN and 1.04-1.27x on BERT-base's; on all-MiniLM-L6-v2's (384
// outputs) 0.93-1.0x, the exception that gather_cols' split also makes where the weights stay
// in cache.
template <typename T>
void down_segments(const std::vector<Segment>& segs, const KernelSet<T>& ks, const float* hp,
                   const T* w_down_t, const float* b_down, const int64_t* kept, at::Tensor& out) {
  const int64_t N = out.size(1);
  float* op = out.data_ptr<float>();
  std::vector<Segment> tiled;
  int64_t split_kept = 0;
  for (const Segment& s : segs) {
    if (s.rows > kColsSplitMaxRows) {
      tiled.push_back(s);
      continue;
    }
    split_kept += s.kept;
    fill_with_bias(op + s.r0 * N, s.rows, N, b_down);
  }
  const int64_t grain = std::max<int64_t>(16, kMinTaskBytes / std::max<int64_t>(N * sizeof(T), 1));
  const int64_t target = 4 * at::get_num_threads();
  std::vector<DownPart> parts;
  int64_t buffered = 0;  // floats of the parts after each segment's first
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.rows > kColsSplitMaxRows || s.kept == 0) continue;
    const int64_t count = std::clamp<int64_t>((target * s.kept + split_kept - 1) / split_kept, 1,
                                              std::max<int64_t>(1, s.kept / grain));
    for (int64_t p = 0; p < count; ++p) {
      parts.push_back({i, s.kept * p / count, s.kept * (p + 1) / count, p == 0 ? -1 : buffered});
      if (p > 0) buffered += s.rows * N;
    }
  }
  std::vector<float> buffer(buffered, 0.f);
  auto acc = [&](const DownPart& d) {
    return d.buffer < 0 ? op + segs[d.seg].r0 * N : buffer.data() + d.buffer;
  };
  const auto tiles = tile_segments(tiled, kRowBlock, kColBlock, [N](const Segment&) { return N; });
  for_each_item(parts.size() + tiles.size(), [&](size_t i) {
    if (i < parts.size()) {
      const DownPart& d = parts[i];
      const Segment& s = segs[d.seg];
      ks.cols_split(hp + s.hidden, s.rows, s.kept, w_down_t, N, kept + s.k0, d.j0, d.j1, acc(d));
      return;
    }
    const Tile& t = tiles[i - parts.size()];
    const Segment& s = tiled[t.seg];
    ks.cols(hp + s.hidden, s.kept, w_down_t, N, kept + s.k0, b_down, t.m0, t.m1, t.c0, t.c1,
            op + s.r0 * N);
  });
  for (const DownPart& d : parts)
    if (d.buffer >= 0)  // a first part is summed in place
      add_part(op + segs[d.seg].r0 * N, acc(d), segs[d.seg].rows * N);
}

// The fused regime over `segs`: `up(segment, tile, its hidden block)` for every up tile, each
// tile's activation right after it, then the scales over the hidden buffer, then every segment's
// down projection (down_segments) into out (float32, rows x N).
template <typename T, typename Up>
void run_fused_segments(const std::vector<Segment>& segs, const Up& up, int64_t activation,
                        const std::optional<at::Tensor>& scales, const KernelSet<T>& ks,
                        const T* w_down_t, const float* b_down, const int64_t* kept,
                        at::Tensor& out) {
  if (segs.empty()) return;
  at::Tensor hidden = at::empty({segs.back().hidden + segs.back().rows * segs.back().kept},
                                out.options());
  float* hp = hidden.data_ptr<float>();
  for_each_tile(tile_segments(segs, kUpRows, kUpKept, [](const Segment& s) { return s.kept; }),
                [&](const Tile& t) {
                  const Segment& s = segs[t.seg];
                  float* h = hp + s.hidden + t.m0 * s.kept;
                  up(s, t, hp + s.hidden);
                  ks.activate(h, t.m1 - t.m0, s.kept, t.c0, t.c1, activation);
                });
  if (scales.has_value()) scale_hidden_(segs, as_float(*scales), hp);
  down_segments(segs, ks, hp, w_down_t, b_down, kept, out);
}

// The down projection's operands, checked against the up projection's `neurons` (its rows).
void check_down(const at::Tensor& x, const at::Tensor& w_down_t,
                const std::optional<at::Tensor>& b_down, int64_t neurons, const char* fn) {
  check_operand(w_down_t, x, fn, "w_down_t", 2);
  TORCH_CHECK(w_down_t.size(0) == neurons, fn, ": w_down_t has ", w_down_t.size(0),
              " rows, the up projection has ", neurons, " neurons");
  if (b_down.has_value()) {
    check_operand(*b_down, x, fn, "b_down", 1);
    TORCH_CHECK(b_down->size(0) == w_down_t.size(1), fn, ": b_down has ", b_down->size(0),
                " entries, w_down_t has ", w_down_t.size(1), " output features");
  }
}

}  // namespace

// =============================================================================================
// The union of a segmented FFN (doe_kernels/ops/library.py `_segmented`): the sorted union of the
// kept lists of the segments holding rows, gathered once for every row, each row's hidden
// activations multiplied by its segment's 1 (or scale) at the union places of the segment's kept
// neurons, 0 elsewhere. One pass over the lists with a table of the FFN's `neurons` places, where
// the torch version takes a dozen small ops.
namespace {

// place[n]: neuron n's place in the sorted union of the lists of `segs`, -1 outside it; returns
// the union's size.
int64_t union_places(const std::vector<Segment>& segs, const int64_t* ip, int64_t neurons,
                     std::vector<int64_t>& place) {
  place.assign(neurons, -1);
  for (const Segment& s : segs)
    for (int64_t j = s.k0; j < s.k0 + s.kept; ++j) place[ip[j]] = 0;
  int64_t count = 0;
  for (int64_t& p : place)
    if (p == 0) p = count++;  // unmarked places stay -1
  return count;
}

// The union of union_places' `place` table (`count` neurons: none where count is 0, whatever the
// table holds).
at::Tensor union_tensor(const std::vector<int64_t>& place, int64_t count,
                        const at::TensorOptions& options) {
  at::Tensor union_ = at::empty({count}, options);
  if (count == 0) return union_;
  int64_t* up = union_.data_ptr<int64_t>();
  for (int64_t n = 0; n < static_cast<int64_t>(place.size()); ++n)
    if (place[n] >= 0) up[place[n]] = n;
  return union_;
}

// Segment s's row of the row mask over the union (`count` places): 1 (or its scale) at its kept
// neurons' places, 0 elsewhere.
void segment_mask(const Segment& s, const std::vector<int64_t>& place, const int64_t* ip,
                  const float* scales, int64_t count, float* row) {
  std::fill(row, row + count, 0.0f);
  for (int64_t j = s.k0; j < s.k0 + s.kept; ++j) row[place[ip[j]]] = scales ? scales[j] : 1.0f;
}

// The strategy's cost model. An FFN call's cost, in units of one product of an input row with
// one kept neuron (all its projections) in the fused kernels, is per kept neuron:
//   fused regime:        read + rows
//   gather + GEMM:       gemm_read + gemm_copy (unless the list is every neuron in order,
//                        whole_matrix) + rows x gemm_product
// An FFN call weighs its up and down projections by their share of the weight matrices, each in
// the regime its single-expert op takes (FfnShape::cost). The segments cost the sum of their calls
// (a segment with neither projection in the gather + GEMM regime runs both fused:
// SegmentRegime); the union one call over every row. `auto` takes the union where it costs less.
// Fitted with python/segmented_regimes.py (one expert's FFN of SmolLM2-135M's and BERT-base's
// shapes, either regime forced, 1-512 rows; medians over rows, so that the 10-30% outliers of a
// run weigh little) on an Intel Xeon (AVX-512, AMX; 2 threads), the committed files
// (benchmarks/results/cpu_intel/segmented_regimes*.json): float32 read 5.3-5.5, gemm_read
// 12.0-13.0, gemm_copy 18.1, gemm_product 0.56-0.61 (three earlier runs: 5.1-7.2, 10.8-14.5,
// 17-25 and 0.57-0.63); bfloat16 (oneDNN on AMX) 3.9-4.8, 15.0-15.4, 9.2, 0.11-0.13 (an earlier
// run: 3.5-4.6, 13.0-13.4, 6.8-8.8, 0.11-0.12). The constants below lie within these runs'
// ranges. On AMD CPUs with AVX-512 float32 runs the fused kernels only, and read is 3.5 (the fit
// of python/segmented_union_sweep.py on AMD EPYC, over five experts' lists at 1-16 rows each);
// AMD CPUs without it take the Intel constants (not fitted there).
// bfloat16's GEMM without AMX (avx512_bf16 on AMD Zen 4) costs about half the fused kernels'
// products (see the regime note above); its other constants are taken from the AMX fit, not
// measured.
struct RegimeCosts {
  double read, gemm_read, gemm_copy, gemm_product;
};

RegimeCosts regime_costs(at::ScalarType dtype) {
  if (dtype == at::kFloat) return {float32_gemm_beats_fused() ? 6.0 : 3.5, 12.0, 21.0, 0.6};
  return {4.0, 13.0, 8.0, has_amx_bf16() ? 0.12 : 0.5};
}

// One call's cost over `rows` rows keeping `neurons` neurons (the model above).
double call_cost(const RegimeCosts& c, bool gemm, int64_t rows, int64_t neurons, bool copies) {
  const double per_neuron = gemm ? c.gemm_read + (copies ? c.gemm_copy : 0.0) +
                                       static_cast<double>(rows) * c.gemm_product
                                 : c.read + static_cast<double>(rows);
  return per_neuron * static_cast<double>(neurons);
}

// An FFN's shape as the regimes see it: x's dtype and features, the matrices of its up projection
// (1: w_in; 2: SwiGLU's w_gate and w_up), the down projection's output features.
struct FfnShape {
  at::ScalarType dtype;
  int64_t in_features, up_matrices, out_features;

  // Bytes the gather + GEMM regime copies for `neurons` kept neurons of the up (else the down)
  // projection: none when they are every neuron, in order, unscaled (whole_matrix).
  int64_t copied(bool up, int64_t neurons, bool whole) const {
    if (whole) return 0;
    return (up ? up_matrices * in_features : out_features) * neurons *
           static_cast<int64_t>(at::elementSize(dtype));
  }
  // Whether the up (else the down) projection's single-expert op takes the gather + GEMM regime.
  bool gemm(bool up, int64_t rows, int64_t neurons, bool whole) const {
    return use_gather_gemm(dtype, rows, copied(up, neurons, whole));
  }
  // One FFN call's cost (the model above): each projection in the regime its op takes (both
  // fused where `fused`), weighed by its share of the weight matrices.
  double cost(int64_t rows, int64_t neurons, bool whole_up, bool whole_down, bool fused) const {
    const RegimeCosts c = regime_costs(dtype);
    auto one = [&](bool up, bool whole) {
      // the AMX path gathers into its tiles: no copy
      const bool copies = !whole && !amx_gather_takes(dtype, rows, up ? in_features : out_features);
      return call_cost(c, !fused && gemm(up, rows, neurons, whole), rows, neurons, copies);
    };
    const double share = static_cast<double>(up_matrices) / (up_matrices + 1);
    return share * one(true, whole_up) + (1 - share) * one(false, whole_down);
  }
};

// How segment s's kept list meets the regimes: whether it is every one of `neurons` neurons in
// order for the up projection and for the down one (whose scales, if any, go to a copy), and
// whether the segment runs through the single-expert ops (either projection in the gather + GEMM
// regime) rather than the fused segments.
struct SegmentRegime {
  bool whole_up, whole_down, gemm;

  SegmentRegime(const FfnShape& f, const Segment& s, const int64_t* ip, int64_t neurons,
                bool scaled)
      : whole_up(lists_every_row(ip + s.k0, s.kept, neurons)),
        whole_down(whole_up && !scaled),
        gemm(f.gemm(true, s.rows, s.kept, whole_up) ||
             f.gemm(false, s.rows, s.kept, whole_down)) {}
};

double segments_cost(const FfnShape& f, const std::vector<Segment>& segs, const int64_t* ip,
                     int64_t neurons, bool scaled) {
  double cost = 0;
  for (const Segment& s : segs) {
    const SegmentRegime r(f, s, ip, neurons, scaled);
    cost += f.cost(s.rows, s.kept, r.whole_up, r.whole_down, !r.gemm);
  }
  return cost;
}

// The union's size when `strategy` takes it for `segs` (auto: where one call over every row and
// the union, copied unless it holds every neuron, costs less than the segments), with `place`
// filled (union_places); 0 to run the segments.
int64_t chosen_union(int64_t strategy, const FfnShape& f, const std::vector<Segment>& segs,
                     const at::Tensor& kept, int64_t neurons, bool scaled,
                     std::vector<int64_t>& place) {
  TORCH_CHECK_VALUE(strategy >= kAutoStrategy && strategy <= kUnionStrategy,
                    "unknown segment strategy code ", strategy);
  if (strategy == kSegmentsStrategy || segs.empty()) return 0;
  const int64_t* ip = kept.data_ptr<int64_t>();
  const int64_t count = union_places(segs, ip, neurons, place);
  if (count == 0 || strategy == kUnionStrategy) return count;
  int64_t rows = 0;
  for (const Segment& s : segs) rows += s.rows;
  const bool whole = count == neurons;
  return f.cost(rows, count, whole, whole, false) < segments_cost(f, segs, ip, neurons, scaled)
             ? count
             : 0;
}

// hidden (rows of x x union, x's dtype) times each row's segment's mask, in place (torch's
// `hidden * row_mask` with the mask in hidden's dtype), in parallel over rows; a segment whose
// mask is all ones (every neuron of the union kept, unscaled) is left as it is. (A list that
// repeats a neuron, which only unchecked calls pass, is read as a set.)
template <typename T>
void mask_hidden_(at::Tensor& hidden, const std::vector<Segment>& segs,
                  const std::vector<int64_t>& place, const int64_t* ip, const float* scales) {
  const int64_t count = hidden.size(1);
  std::vector<float> mask(count);
  T* hp = hidden.data_ptr<T>();
  for (const Segment& s : segs) {
    segment_mask(s, place, ip, scales, count, mask.data());
    if (std::all_of(mask.begin(), mask.end(), [](float m) { return m == 1.0f; })) continue;
    for (float& m : mask) m = static_cast<float>(static_cast<T>(m));
    at::parallel_for(s.r0, s.r0 + s.rows, std::max<int64_t>(1, 16384 / count),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         T* h = hp + r * count;
                         // 0 where the mask is 0, even for an infinite activation (0 * inf
                         // is NaN): a neuron the row's expert does not keep never reaches it
                         for (int64_t j = 0; j < count; ++j)
                           h[j] = mask[j] == 0.0f
                                      ? T(0.0f)
                                      : static_cast<T>(static_cast<float>(h[j]) * mask[j]);
                       }
                     });
  }
}

// A segmented FFN through its union: `up(union)` (the gathered up projection, x's dtype), each
// row times its segment's mask, then the down projection over the union.
template <typename Up>
at::Tensor union_ffn(const at::Tensor& x, const std::vector<Segment>& segs,
                     const std::vector<int64_t>& place, int64_t count, const at::Tensor& kept,
                     const std::optional<at::Tensor>& scales, const Up& up,
                     const at::Tensor& w_down_t, const std::optional<at::Tensor>& b_down) {
  at::Tensor union_ = union_tensor(place, count, kept.options());
  at::Tensor hidden = up(union_);
  std::optional<at::Tensor> sf;
  if (scales.has_value()) sf = as_float(*scales);
  const float* sp = sf.has_value() ? sf->data_ptr<float>() : nullptr;
  if (hidden.scalar_type() == at::kFloat) {
    mask_hidden_<float>(hidden, segs, place, kept.data_ptr<int64_t>(), sp);
  } else {
    mask_hidden_<at::BFloat16>(hidden, segs, place, kept.data_ptr<int64_t>(), sp);
  }
  return gather_cols_linear_cpu(hidden, w_down_t, b_down, union_, std::nullopt);
}

}  // namespace

at::Tensor segmented_ffn_cpu(const at::Tensor& x, const at::Tensor& w_in,
                             const std::optional<at::Tensor>& b_in, const at::Tensor& w_out_t,
                             const std::optional<at::Tensor>& b_out, const at::Tensor& segments,
                             const at::Tensor& kept, const at::Tensor& kept_offsets,
                             const std::optional<at::Tensor>& scales, int64_t activation,
                             int64_t strategy) {
  constexpr const char* fn = "segmented_ffn_cpu";
  check_input(x, fn, "x");
  check_operand(w_in, x, fn, "w_in", 2);
  TORCH_CHECK(w_in.size(1) == x.size(1), fn, ": w_in has ", w_in.size(1),
              " input features, x has ", x.size(1));
  if (b_in.has_value()) {
    check_operand(*b_in, x, fn, "b_in", 1);
    TORCH_CHECK(b_in->size(0) == w_in.size(0), fn, ": b_in has ", b_in->size(0),
                " entries, w_in has ", w_in.size(0), " rows");
  }
  TORCH_CHECK(activation >= kIdentity && activation <= kRelu, fn, ": unknown activation code ",
              activation);
  check_down(x, w_out_t, b_out, w_in.size(0), fn);
  const auto segs = read_segments(x, segments, kept, kept_offsets, scales, w_in.size(0), fn);
  const FfnShape shape{x.scalar_type(), x.size(1), 1, w_out_t.size(1)};
  std::vector<int64_t> place;
  if (const int64_t count = chosen_union(strategy, shape, segs, kept, w_in.size(0),
                                            scales.has_value(), place))
    return union_ffn(
        x, segs, place, count, kept, scales,
        [&](const at::Tensor& u) { return gather_rows_linear_cpu(x, w_in, b_in, u, activation); },
        w_out_t, b_out);
  const int64_t K = x.size(1), N = w_out_t.size(1);
  const int64_t* ip = kept.data_ptr<int64_t>();
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  const auto fused = run_gemm_segments(
      segs, x, kept, scales, out,
      [&](const Segment& s) {
        return SegmentRegime(shape, s, ip, w_in.size(0), scales.has_value()).gemm;
      },
      [&](const at::Tensor& xs, const at::Tensor& list, const std::optional<at::Tensor>& sc) {
        return gather_cols_linear_cpu(gather_rows_linear_cpu(xs, w_in, b_in, list, activation),
                                      w_out_t, b_out, list, sc);
      });
  at::Tensor xf = as_float(x);
  std::optional<at::Tensor> bi, bo;
  if (b_in.has_value()) bi = as_float(*b_in);
  if (b_out.has_value()) bo = as_float(*b_out);
  const float* xp = xf.data_ptr<float>();
  const float* bip = bi.has_value() ? bi->data_ptr<float>() : nullptr;
  auto run = [&](auto ks, auto wp, auto wtp) {
    auto up = [&](const Segment& s, const Tile& t, float* h) {
      ks.rows(xp + (s.r0 + t.m0) * K, t.m1 - t.m0, K, wp, ip + s.k0, bip, t.c0, t.c1,
              h + t.m0 * s.kept, s.kept);
    };
    run_fused_segments(fused, up, activation, scales, ks, wtp,
                       bo.has_value() ? bo->data_ptr<float>() : nullptr, ip, out);
  };
  if (x.scalar_type() == at::kFloat) {
    run(kernels<float>(), raw<float>(w_in), raw<float>(w_out_t));
  } else {
    run(kernels<uint16_t>(), raw<uint16_t>(w_in), raw<uint16_t>(w_out_t));
  }
  return finish(out, x.scalar_type());
}

at::Tensor segmented_swiglu_ffn_cpu(const at::Tensor& x, const at::Tensor& w_gate,
                                    const at::Tensor& w_up, const at::Tensor& w_down_t,
                                    const at::Tensor& segments, const at::Tensor& kept,
                                    const at::Tensor& kept_offsets,
                                    const std::optional<at::Tensor>& scales, int64_t strategy) {
  constexpr const char* fn = "segmented_swiglu_ffn_cpu";
  check_input(x, fn, "x");
  check_operand(w_gate, x, fn, "w_gate", 2);
  check_operand(w_up, x, fn, "w_up", 2);
  TORCH_CHECK(w_gate.sizes() == w_up.sizes(), fn, ": w_gate ", w_gate.sizes(), " and w_up ",
              w_up.sizes(), " differ in shape");
  TORCH_CHECK(w_gate.size(1) == x.size(1), fn, ": w_gate has ", w_gate.size(1),
              " input features, x has ", x.size(1));
  check_down(x, w_down_t, std::nullopt, w_gate.size(0), fn);
  const auto segs = read_segments(x, segments, kept, kept_offsets, scales, w_gate.size(0), fn);
  const FfnShape shape{x.scalar_type(), x.size(1), 2, w_down_t.size(1)};
  std::vector<int64_t> place;
  if (const int64_t count = chosen_union(strategy, shape, segs, kept, w_gate.size(0),
                                            scales.has_value(), place))
    return union_ffn(
        x, segs, place, count, kept, scales,
        [&](const at::Tensor& u) { return gather_swiglu_cpu(x, w_gate, w_up, u); }, w_down_t,
        std::nullopt);
  const int64_t K = x.size(1), N = w_down_t.size(1);
  const int64_t* ip = kept.data_ptr<int64_t>();
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  const auto fused = run_gemm_segments(
      segs, x, kept, scales, out,
      [&](const Segment& s) {
        return SegmentRegime(shape, s, ip, w_gate.size(0), scales.has_value()).gemm;
      },
      [&](const at::Tensor& xs, const at::Tensor& list, const std::optional<at::Tensor>& sc) {
        return gather_cols_linear_cpu(gather_swiglu_cpu(xs, w_gate, w_up, list), w_down_t,
                                      std::nullopt, list, sc);
      });
  at::Tensor xf = as_float(x);
  const float* xp = xf.data_ptr<float>();
  auto run = [&](auto ks, auto gp, auto up_w, auto wtp) {
    auto up = [&](const Segment& s, const Tile& t, float* h) {
      ks.swiglu(xp + (s.r0 + t.m0) * K, t.m1 - t.m0, K, gp, up_w, ip + s.k0, t.c0, t.c1,
                h + t.m0 * s.kept, s.kept);
    };
    run_fused_segments(fused, up, kIdentity, scales, ks, wtp, nullptr, ip, out);
  };
  if (x.scalar_type() == at::kFloat) {
    run(kernels<float>(), raw<float>(w_gate), raw<float>(w_up), raw<float>(w_down_t));
  } else {
    run(kernels<uint16_t>(), raw<uint16_t>(w_gate), raw<uint16_t>(w_up),
        raw<uint16_t>(w_down_t));
  }
  return finish(out, x.scalar_type());
}


std::tuple<double, double, double, double> cpu_segment_costs(bool float32) {
  const RegimeCosts c = regime_costs(float32 ? at::kFloat : at::kBFloat16);
  return {c.read, c.gemm_read, c.gemm_copy, c.gemm_product};
}

// The union plan alone (union, row_mask), for a model that reuses it over decoding steps: the row
// mask in x's dtype; an empty union and an (M, 0) mask where `strategy` runs the segments.
std::tuple<at::Tensor, at::Tensor> union_plan_cpu(const at::Tensor& x, const at::Tensor& segments,
                                                  const at::Tensor& kept,
                                                  const at::Tensor& kept_offsets,
                                                  const std::optional<at::Tensor>& scales,
                                                  int64_t neurons, int64_t up_matrices,
                                                  int64_t strategy) {
  constexpr const char* fn = "union_plan_cpu";
  // only x's rows and dtype are read
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              fn, ": x must be a 2-D float32 or bfloat16 CPU tensor, got ", x.dim(), "-D ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(neurons >= 0, fn, ": neurons must be >= 0, got ", neurons);
  TORCH_CHECK_VALUE(up_matrices == 1 || up_matrices == 2, fn,
                    ": up_matrices must be 1 (w_in) or 2 (SwiGLU's w_gate and w_up), got ",
                    up_matrices);
  const auto segs = read_segments(x, segments, kept, kept_offsets, scales, neurons, fn);
  const FfnShape shape{x.scalar_type(), x.size(1), up_matrices, x.size(1)};
  std::vector<int64_t> place;
  const int64_t count =
      chosen_union(strategy, shape, segs, kept, neurons, scales.has_value(), place);
  at::Tensor union_ = union_tensor(place, count, kept.options());
  at::Tensor mask = at::empty({x.size(0), count}, x.options().dtype(at::kFloat));
  float* mp = mask.data_ptr<float>();
  std::optional<at::Tensor> sf;
  if (scales.has_value()) sf = as_float(*scales);
  const float* sp = sf.has_value() ? sf->data_ptr<float>() : nullptr;
  const int64_t* ip = kept.data_ptr<int64_t>();
  for (const Segment& s : segs) {
    if (count == 0) break;
    float* row = mp + s.r0 * count;
    segment_mask(s, place, ip, sp, count, row);
    for (int64_t m = 1; m < s.rows; ++m)
      std::memcpy(row + m * count, row, count * sizeof(float));
  }
  return {union_, mask.to(x.scalar_type())};
}

}  // namespace doe_kernels
