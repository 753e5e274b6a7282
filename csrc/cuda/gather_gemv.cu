// Gather-GEMV CUDA kernels for decoding (few rows of x): the kernels read the kept weight rows / columns
// through the index list instead of a sliced copy of the weights. Torch-free; see gather_gemv.cuh.
//
// gather_rows_linear / gather_swiglu ("rows" kernel): a group of `wpr` warps (1, 2, 4 or 8 of the 8
// warps of a 256-thread block) owns R consecutive kept outputs n; its threads stride over K with
// 16-byte loads of the R weight rows (scalar loads when K * sizeof(T) is not a multiple of 16 or a
// pointer is misaligned), multiply with up to 16 rows of x (read through L1, tiny) and accumulate in
// float32 registers; a warp shuffle reduction and a shared-memory reduction over the group's warps
// end with the bias + activation (or SwiGLU) epilogue.
//
// gather_cols_linear ("cols" kernel): a 256-thread block is 64 column threads x 4 j-groups; each
// thread owns CPT consecutive output columns (one 8- or 16-byte load per kept row) and the block
// owns a slice of the kept rows j (blockIdx.y is the J split); h's values (times their column's
// scale, when scales are given) are staged in shared memory as float32. Partial sums are reduced
// over the j-groups in shared memory, then written either straight to the output (one split:
// + bias, cast) or to a float32 workspace that a second kernel reduces in a fixed order (+ bias,
// cast).
//
// Segmented FFN (mixed-task batches; segmented_rows_kernel, segmented_cols_kernel): the same tile
// bodies (rows_tiles, cols_block) with a grid axis over the segments (y) and one over each
// segment's chunks of up to 16 rows (z), sized for the largest segment and the longest list. A
// block reads its segment's row range, kept-list range and hidden block from the segment table on
// the device and returns at once when it lies past that segment's rows or (up projections) its
// kept tiles. The up projections write every segment's hidden block into one packed buffer (x's
// dtype); the down projections read it back, each segment splitting its own list over the J
// splits (a split past a short list adds zeros); then the reduction of the splits. The row bucket
// MR is the launch's fullest chunk's: a launch mixing long and one-row segments computes the
// one-row ones at the long ones' width.
//
// Index safety: every index is compared with its bound where it is loaded (in_range, once per loaded
// index, not per element); an index outside [0, bound) is never used as an address (see
// gather_gemv.cuh for the result).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "gather_gemv.cuh"

namespace doe_kernels {
namespace gemv {
namespace {

constexpr int kThreads = 256;  // every kernel here uses 256-thread blocks
constexpr int kWarps = kThreads / 32;

// ----------------------------------------------------------------------------------------------
// Element conversion and vector unpacking
// ----------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Unpack one 32-bit word into 32 / (8 * sizeof(T)) floats.
template <typename T>
__device__ __forceinline__ void unpack_word(unsigned int w, float* f);
template <>
__device__ __forceinline__ void unpack_word<float>(unsigned int w, float* f) {
  f[0] = __uint_as_float(w);
}
template <>
__device__ __forceinline__ void unpack_word<__half>(unsigned int w, float* f) {
  __half2_raw raw;
  raw.x = static_cast<unsigned short>(w & 0xffffu);
  raw.y = static_cast<unsigned short>(w >> 16);
  const float2 v = __half22float2(__half2(raw));
  f[0] = v.x;
  f[1] = v.y;
}
template <>
__device__ __forceinline__ void unpack_word<__nv_bfloat16>(unsigned int w, float* f) {
  // bf16 -> f32 is a 16-bit shift: exact.
  f[0] = __uint_as_float(w << 16);
  f[1] = __uint_as_float(w & 0xffff0000u);
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[16 / sizeof(T)]) {
  constexpr int P = 4 / sizeof(T);  // elements per 32-bit word
  unpack_word<T>(v.x, f + 0 * P);
  unpack_word<T>(v.y, f + 1 * P);
  unpack_word<T>(v.z, f + 2 * P);
  unpack_word<T>(v.w, f + 3 * P);
}
template <typename T>
__device__ __forceinline__ void unpack(const uint2& v, float (&f)[8 / sizeof(T)]) {
  constexpr int P = 4 / sizeof(T);
  unpack_word<T>(v.x, f + 0 * P);
  unpack_word<T>(v.y, f + 1 * P);
}

template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};

// ----------------------------------------------------------------------------------------------
// Epilogue math (float32)
// ----------------------------------------------------------------------------------------------
__device__ __forceinline__ float apply_activation(float v, int act) {
  switch (act) {
    case 1:  // exact GELU
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 2: {  // tanh GELU; tanh(u) = 1 - 2 / (1 + exp(2u)), robust under --use_fast_math
      const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      const float t = 1.0f - 2.0f / (1.0f + expf(2.0f * u));
      return 0.5f * v * (1.0f + t);
    }
    case 3:  // ReLU; NaN stays NaN, as torch's
      return v < 0.0f ? 0.0f : v;
    default:
      return v;
  }
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Whether index i lies in [0, bound) (one unsigned compare). The host cannot check the index values
// without a synchronisation, so the kernels do: they never load through an index outside, and fail
// a device-side assertion (unless built with NDEBUG) in their epilogue, where few registers are
// live (an assertion in the main loop costs spills: it is a call).
__device__ __forceinline__ bool in_range(int64_t i, int64_t bound) {
  return static_cast<uint64_t>(i) < static_cast<uint64_t>(bound);
}

__device__ __forceinline__ void assert_indices_in_range(bool ok) {
  assert(ok && "doe_kernels: gather index out of range");
}

// ----------------------------------------------------------------------------------------------
// Rows kernel: gather_rows_linear (NW = 1) and gather_swiglu (NW = 2)
// ----------------------------------------------------------------------------------------------

// Kept outputs per warp group: more rows share each x load when there are many x rows.
template <int MR, int NW>
struct RowsPerGroup {
  static constexpr int value = (NW == 1 && MR >= 4) ? 2 : 1;
};

// One step of the vectorized loop: U consecutive (strided by tpr) 16-byte units for every weight row.
// wbase[s][r] is the uint4 offset of row r of weight s; xv the uint4 view of the x chunk.
template <typename T, int MR, int R, int NW, int U>
__device__ __forceinline__ void rows_step_vec(const uint4* const* wp, const int64_t (&wbase)[R],
                                              const uint4* __restrict__ xv, int64_t nvec,
                                              int mcount, int64_t v, int tpr,
                                              float (&acc)[NW][R][MR]) {
  constexpr int VE = 16 / sizeof(T);
  uint4 wr[U][NW][R];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int s = 0; s < NW; ++s)
#pragma unroll
      for (int r = 0; r < R; ++r) wr[u][s][r] = __ldcs(wp[s] + wbase[r] + v + (int64_t)u * tpr);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float wf[NW][R][VE];
#pragma unroll
    for (int s = 0; s < NW; ++s)
#pragma unroll
      for (int r = 0; r < R; ++r) unpack<T>(wr[u][s][r], wf[s][r]);
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const int mm = m < mcount ? m : mcount - 1;  // padded rows re-read a valid row; discarded
      const uint4 xr = __ldg(xv + (int64_t)mm * nvec + v + (int64_t)u * tpr);
      float xf[VE];
      unpack<T>(xr, xf);
#pragma unroll
      for (int s = 0; s < NW; ++s)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < VE; ++e) acc[s][r][m] = fmaf(wf[s][r][e], xf[e], acc[s][r][m]);
    }
  }
}

// Scalar fallback step: one element k for every weight row.
template <typename T, int MR, int R, int NW>
__device__ __forceinline__ void rows_step_scalar(const T* const* wp, const int64_t (&wbase)[R],
                                                 const T* __restrict__ x, int64_t K, int mcount,
                                                 int64_t k, float (&acc)[NW][R][MR]) {
  float wf[NW][R];
#pragma unroll
  for (int s = 0; s < NW; ++s)
#pragma unroll
    for (int r = 0; r < R; ++r) wf[s][r] = to_f<T>(wp[s][wbase[r] + k]);
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    const int mm = m < mcount ? m : mcount - 1;
    const float xf = to_f<T>(x[(int64_t)mm * K + k]);
#pragma unroll
    for (int s = 0; s < NW; ++s)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[s][r][m] = fmaf(wf[s][r], xf, acc[s][r][m]);
  }
}

// The rows kernel's body: tiles first_tile, first_tile + tile_stride, ... of the N kept outputs
// (one tile: R outputs per warp group). x: the chunk's first row (mcount <= MR rows of K); out: the
// chunk's first output row (row stride N). The whole block calls it alike (it holds __syncthreads),
// and may call it again straight away: its last barrier frees the shared memory.
template <typename T, int MR, int NW, bool VEC>
__device__ __forceinline__ void rows_tiles(const T* __restrict__ x, const T* __restrict__ w0,
                                           const T* __restrict__ w1, const T* __restrict__ bias,
                                           const int64_t* __restrict__ rows, T* __restrict__ out,
                                           int mcount, int64_t K, int64_t N, int64_t n_total,
                                           int act, int wpr, int64_t first_tile,
                                           int64_t tile_stride) {
  constexpr int R = RowsPerGroup<MR, NW>::value;
  constexpr int NACC = NW * R * MR;
  __shared__ float red[kWarps][NACC];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gpb = kWarps / wpr;  // warp groups per block
  const int group = warp / wpr;
  const int gw = warp - group * wpr;  // warp index inside the group
  const int tpr = wpr * 32;           // threads per group
  const int t = gw * 32 + lane;       // thread index inside the group
  const int64_t outs_per_block = (int64_t)gpb * R;
  const int64_t n_tiles = (N + outs_per_block - 1) / outs_per_block;
  const T* wp_s[2] = {w0, NW == 2 ? w1 : w0};

  // Uniform loop over tiles for the whole block (it contains __syncthreads).
  for (int64_t tile = first_tile; tile < n_tiles; tile += tile_stride) {
    const int64_t n0 = tile * outs_per_block + (int64_t)group * R;
    // An out-of-range index reads row 0 instead; the epilogue writes its output as 0.
    int64_t wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r < N ? n0 + r : N - 1;  // padded outputs re-read a valid row
      const int64_t i = rows[n];
      wrow[r] = in_range(i, n_total) ? i : 0;
    }

    float acc[NW][R][MR];
#pragma unroll
    for (int s = 0; s < NW; ++s)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[s][r][m] = 0.0f;

    if constexpr (VEC) {
      constexpr int VE = 16 / sizeof(T);
      constexpr int U = (R * NW) >= 4 ? 1 : 4 / (R * NW);  // >= 4 16-byte loads in flight per thread
      const int64_t nvec = K / VE;
      int64_t wbase[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wbase[r] = wrow[r] * nvec;
      const uint4* wv[2] = {reinterpret_cast<const uint4*>(wp_s[0]),
                            reinterpret_cast<const uint4*>(wp_s[1])};
      const uint4* xv = reinterpret_cast<const uint4*>(x);
      int64_t v = t;
      if constexpr (U > 1) {
        for (; v + (int64_t)(U - 1) * tpr < nvec; v += (int64_t)U * tpr)
          rows_step_vec<T, MR, R, NW, U>(wv, wbase, xv, nvec, mcount, v, tpr, acc);
      }
      for (; v < nvec; v += tpr) rows_step_vec<T, MR, R, NW, 1>(wv, wbase, xv, nvec, mcount, v, tpr, acc);
    } else {
      int64_t wbase[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wbase[r] = wrow[r] * K;
      for (int64_t k = t; k < K; k += tpr)
        rows_step_scalar<T, MR, R, NW>(wp_s, wbase, x, K, mcount, k, acc);
    }

    // Warp reduction, then the group's warps through shared memory.
#pragma unroll
    for (int s = 0; s < NW; ++s)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          float a = acc[s][r][m];
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
          if (lane == 0) red[warp][(s * R + r) * MR + m] = a;
        }
    __syncthreads();

    if (gw == 0) {
      for (int idx = lane; idx < R * MR; idx += 32) {
        const int r = idx / MR;
        const int m = idx - r * MR;
        const int64_t n = n0 + r;
        if (m < mcount && n < N) {
          float v0 = 0.0f, v1 = 0.0f;
          for (int g = 0; g < wpr; ++g) {
            v0 += red[group * wpr + g][(0 * R + r) * MR + m];
            if (NW == 2) v1 += red[group * wpr + g][(1 * R + r) * MR + m];
          }
          const int64_t i = rows[n];
          const bool ok = in_range(i, n_total);
          assert_indices_in_range(ok);
          float res = 0.0f;  // stays 0 for an out-of-range index
          if (ok) {
            if constexpr (NW == 2) {
              res = silu(v0) * v1;
            } else {
              if (bias != nullptr) v0 += to_f<T>(bias[i]);
              res = apply_activation(v0, act);
            }
          }
          out[(int64_t)m * N + n] = from_f<T>(res);
        }
      }
    }
    __syncthreads();  // red is reused by the next tile
  }
}

// x: the chunk's first row (mcount <= MR rows of K); out: the chunk's first output row (row stride N).
template <typename T, int MR, int NW, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
    gather_rows_kernel(const T* __restrict__ x, const T* __restrict__ w0,
                       const T* __restrict__ w1, const T* __restrict__ bias,
                       const int64_t* __restrict__ rows, T* __restrict__ out, int mcount, int64_t K,
                       int64_t N, int64_t n_total, int act, int wpr) {
  rows_tiles<T, MR, NW, VEC>(x, w0, w1, bias, rows, out, mcount, K, N, n_total, act, wpr,
                             blockIdx.x, gridDim.x);
}

// The up projections of a segmented FFN: blockIdx.y walks the segments, blockIdx.z their chunks
// of kMaxRowsPerChunk rows, blockIdx.x the tiles of their kept lists (rows_tiles); a block past its
// segment's rows or tiles does nothing. Segment s writes its (rows x kept) block of `hidden` at
// s.hidden (row stride s.kept). mcount <= MR: MR is the bucket of the most rows in a chunk.
template <typename T, int MR, int NW, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
    segmented_rows_kernel(const T* __restrict__ x, const T* __restrict__ w0,
                          const T* __restrict__ w1, const T* __restrict__ bias,
                          const int64_t* __restrict__ kept, const Segment* __restrict__ segments,
                          int64_t count, T* __restrict__ hidden, int64_t K, int64_t n_total,
                          int act, int wpr) {
  for (int64_t s = blockIdx.y; s < count; s += gridDim.y) {
    const Segment seg = segments[s];
    for (int64_t m0 = (int64_t)blockIdx.z * kMaxRowsPerChunk; m0 < seg.rows;
         m0 += (int64_t)gridDim.z * kMaxRowsPerChunk) {
      const int mcount = (int)(seg.rows - m0 < kMaxRowsPerChunk ? seg.rows - m0 : kMaxRowsPerChunk);
      rows_tiles<T, MR, NW, VEC>(x + (seg.r0 + m0) * K, w0, w1, bias, kept + seg.k0,
                                 hidden + seg.hidden + m0 * seg.kept, mcount, K, seg.kept, n_total,
                                 act, wpr, blockIdx.x, gridDim.x);
    }
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int bucket_rows(int64_t mcount) {
  return mcount <= 1 ? 1 : mcount <= 2 ? 2 : mcount <= 4 ? 4 : mcount <= 8 ? 8 : 16;
}

// f(std::integral_constant<int, MR>{}) for the row bucket mr (1, 2, 4, 8 or 16).
template <typename F>
void with_row_bucket(int mr, F&& f) {
  switch (mr) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 16>{}); break;
  }
}

// Whether the rows kernel may use 16-byte loads: rows of whole 16-byte units, aligned pointers.
template <typename T, int NW>
bool rows_vec(int64_t K, const T* x, const T* w0, const T* w1) {
  return (K * (int64_t)sizeof(T)) % 16 == 0 && aligned16(x) && aligned16(w0) &&
         (NW == 1 || aligned16(w1));
}

// Warps per group of a rows launch with `groups` warp groups' work over weight rows of `units`
// loads: each group is split over more warps when there are few groups and long rows.
inline int rows_wpr(int64_t groups, int64_t units, int num_sms) {
  const int64_t target_warps = (int64_t)std::max(num_sms, 1) * 32;
  int wpr = 1;
  while (wpr < kWarps && groups * wpr < target_warps && units >= (int64_t)wpr * 2 * 32 * 4) wpr *= 2;
  return wpr;
}

template <typename T, int MR, int NW>
void launch_rows_chunk(const T* x, const T* w0, const T* w1, const T* bias, const int64_t* rows,
                       T* out, int mcount, int64_t K, int64_t N, int64_t n_total, int act,
                       int num_sms, cudaStream_t stream) {
  constexpr int R = RowsPerGroup<MR, NW>::value;
  const bool vec = rows_vec<T, NW>(K, x, w0, w1);
  const int64_t units = vec ? K * (int64_t)sizeof(T) / 16 : K;  // loads per weight row
  const int wpr = rows_wpr(ceil_div(N, R), units, num_sms);
  const int64_t outs_per_block = (int64_t)(kWarps / wpr) * R;
  const int64_t blocks = std::min<int64_t>(ceil_div(N, outs_per_block), INT_MAX);
  if (vec) {
    gather_rows_kernel<T, MR, NW, true><<<(unsigned)blocks, kThreads, 0, stream>>>(
        x, w0, w1, bias, rows, out, mcount, K, N, n_total, act, wpr);
  } else {
    gather_rows_kernel<T, MR, NW, false><<<(unsigned)blocks, kThreads, 0, stream>>>(
        x, w0, w1, bias, rows, out, mcount, K, N, n_total, act, wpr);
  }
}

template <typename T, int NW>
cudaError_t launch_rows(const T* x, const T* w0, const T* w1, const T* bias, const int64_t* rows,
                        T* out, int64_t M, int64_t K, int64_t N, int64_t n_total, int act,
                        int num_sms, cudaStream_t stream) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerChunk) {
    const int mcount = (int)std::min<int64_t>(kMaxRowsPerChunk, M - m0);
    with_row_bucket(bucket_rows(mcount), [&](auto mr) {
      launch_rows_chunk<T, decltype(mr)::value, NW>(x + m0 * K, w0, w1, bias, rows, out + m0 * N,
                                                    mcount, K, N, n_total, act, num_sms, stream);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// What sizes a segmented launch, from the host's copy of its segment table.
struct SegmentsShape {
  int64_t count = 0;       // segments (each holds rows)
  int64_t max_rows = 0;    // rows of the largest segment
  int64_t max_kept = 0;    // entries of the longest kept list
  int64_t chunks = 0;      // chunks of kMaxRowsPerChunk rows, over every segment
  int64_t chunk_outs = 0;  // kept outputs x chunks, over every segment (the up projections' work)

  SegmentsShape(const Segment* segments, int64_t n) : count(n) {
    for (int64_t s = 0; s < n; ++s) {
      const int64_t c = ceil_div(segments[s].rows, kMaxRowsPerChunk);
      max_rows = std::max(max_rows, segments[s].rows);
      max_kept = std::max(max_kept, segments[s].kept);
      chunks += c;
      chunk_outs += c * segments[s].kept;
    }
  }
  // Rows of the fullest chunk: every chunk fits the launch's row bucket.
  int64_t chunk_rows() const { return std::min<int64_t>(max_rows, kMaxRowsPerChunk); }
  // A segmented grid: `x_blocks` along x, the segments along y, the largest segment's chunks
  // along z (the kernels loop over what does not fit).
  dim3 grid(int64_t x_blocks) const {
    return dim3((unsigned)x_blocks, (unsigned)std::min<int64_t>(count, 65535),
                (unsigned)std::min<int64_t>(ceil_div(max_rows, kMaxRowsPerChunk), 65535));
  }
};

// The up projections of every segment in one launch (segmented_rows_kernel); sh.max_kept > 0.
template <typename T, int NW>
void launch_segmented_rows(const T* x, const T* w0, const T* w1, const T* bias,
                           const int64_t* kept, const Segment* segments, const SegmentsShape& sh,
                           T* hidden, int64_t K, int64_t n_total, int act, int num_sms,
                           cudaStream_t stream) {
  const bool vec = rows_vec<T, NW>(K, x, w0, w1);
  const int64_t units = vec ? K * (int64_t)sizeof(T) / 16 : K;
  with_row_bucket(bucket_rows(sh.chunk_rows()), [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    constexpr int R = RowsPerGroup<MR, NW>::value;
    const int wpr = rows_wpr(ceil_div(sh.chunk_outs, R), units, num_sms);
    const int64_t outs_per_block = (int64_t)(kWarps / wpr) * R;
    const dim3 grid = sh.grid(std::min<int64_t>(ceil_div(sh.max_kept, outs_per_block), INT_MAX));
    if (vec) {
      segmented_rows_kernel<T, MR, NW, true><<<grid, kThreads, 0, stream>>>(
          x, w0, w1, bias, kept, segments, sh.count, hidden, K, n_total, act, wpr);
    } else {
      segmented_rows_kernel<T, MR, NW, false><<<grid, kThreads, 0, stream>>>(
          x, w0, w1, bias, kept, segments, sh.count, hidden, K, n_total, act, wpr);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Cols kernel: gather_cols_linear
// ----------------------------------------------------------------------------------------------
constexpr int kColsTX = 64;                        // column threads per block
constexpr int kColsTY = 4;                         // j-groups per block
constexpr int kColsU = 4;                          // kept rows per thread per step (loads in flight)
constexpr int kColsStep = kColsTY * kColsU;        // kept rows per block per step
constexpr int kColsTile = 4 * kColsStep;           // kept rows staged in shared memory at once
static_assert(kColsTX * kColsTY == kThreads, "cols block shape");

// Columns per thread: one 16-byte load, or 8 bytes when MR * CPT would exceed 64 accumulators.
template <typename T, int MR>
struct ColsVecCpt {
  static constexpr int value =
      (int)(16 / sizeof(T)) * MR <= 64 ? (int)(16 / sizeof(T)) : (int)(8 / sizeof(T));
};

// The cols kernel's body: output columns [col_base, col_base + kColsTX * CPT) of mcount rows,
// summed over the kept rows [jbeg, jend) (none when jend <= jbeg: the block writes zeros, or the
// bias).
// h: the chunk's first row (mcount <= MR rows of J); scales: J factors or nullptr; out: the chunk's
// first output row (+ bias, cast; when final_out); ws: the block's float32 partial sums (row
// stride N; when !final_out). The whole block calls it alike, and may call it again straight away.
template <typename T, int MR, int CPT>
__device__ __forceinline__ void cols_block(const T* __restrict__ h, const T* __restrict__ wt,
                                           const T* __restrict__ bias,
                                           const int64_t* __restrict__ cols,
                                           const T* __restrict__ scales, T* __restrict__ out,
                                           float* __restrict__ ws, int mcount, int64_t J, int64_t N,
                                           int64_t k_total, int64_t col_base, int64_t jbeg,
                                           int64_t jend, bool final_out) {
  __shared__ __align__(16) float hs[kColsTile][MR];
  __shared__ int64_t cs[kColsTile];
  __shared__ float red[MR][kColsTX * CPT];

  const int tx = threadIdx.x % kColsTX;
  const int ty = threadIdx.x / kColsTX;
  const int64_t col0 = col_base + (int64_t)tx * CPT;
  // Vector path (CPT > 1): N % CPT == 0, so col0 < N implies col0 + CPT <= N.
  const bool col_ok = col0 < N;

  float acc[MR][CPT];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[m][c] = 0.0f;

  bool indices_ok = true;  // of the kept rows this thread staged
  for (int64_t jt = jbeg; jt < jend; jt += kColsTile) {
    const int tcount = (int)(jend - jt < kColsTile ? jend - jt : kColsTile);
    __syncthreads();  // the previous tile's shared reads are done
    for (int i = threadIdx.x; i < kColsTile * MR; i += kThreads) {
      const int jj = i / MR;
      const int m = i - jj * MR;
      float v = 0.0f;
      if (jj < tcount && m < mcount) {
        v = to_f<T>(h[(int64_t)m * J + jt + jj]);
        if (scales != nullptr) v *= to_f<T>(scales[jt + jj]);
      }
      hs[jj][m] = v;
    }
    // Kept rows, or -1 past the tile's end and for an out-of-range index (never loaded through).
    for (int i = threadIdx.x; i < kColsTile; i += kThreads) {
      int64_t c = -1;
      if (i < tcount) {
        c = cols[jt + i];
        if (!in_range(c, k_total)) {
          c = -1;
          indices_ok = false;
        }
      }
      cs[i] = c;
    }
    __syncthreads();

    if (col_ok) {
      for (int j0 = 0; j0 < tcount; j0 += kColsStep) {
        if constexpr (CPT > 1) {
          using V = typename RawVec<CPT * sizeof(T)>::type;
          V wr[kColsU];
          bool valid[kColsU];
#pragma unroll
          for (int u = 0; u < kColsU; ++u) {
            const int jj = j0 + u * kColsTY + ty;
            valid[u] = jj < tcount && cs[jj] >= 0;
            if (valid[u]) {
              wr[u] = __ldcs(reinterpret_cast<const V*>(wt + cs[jj] * N + col0));
            } else {
              wr[u] = V{};
            }
          }
#pragma unroll
          for (int u = 0; u < kColsU; ++u) {
            if (!valid[u]) continue;
            const int jj = j0 + u * kColsTY + ty;
            float wf[CPT];
            unpack<T>(wr[u], wf);
            if constexpr (MR % 4 == 0) {
#pragma unroll
              for (int m = 0; m < MR; m += 4) {
                const float4 hv = *reinterpret_cast<const float4*>(&hs[jj][m]);
#pragma unroll
                for (int c = 0; c < CPT; ++c) {
                  acc[m + 0][c] = fmaf(hv.x, wf[c], acc[m + 0][c]);
                  acc[m + 1][c] = fmaf(hv.y, wf[c], acc[m + 1][c]);
                  acc[m + 2][c] = fmaf(hv.z, wf[c], acc[m + 2][c]);
                  acc[m + 3][c] = fmaf(hv.w, wf[c], acc[m + 3][c]);
                }
              }
            } else {
#pragma unroll
              for (int m = 0; m < MR; ++m) {
                const float hv = hs[jj][m];
#pragma unroll
                for (int c = 0; c < CPT; ++c) acc[m][c] = fmaf(hv, wf[c], acc[m][c]);
              }
            }
          }
        } else {
          float wf[kColsU];
          bool valid[kColsU];
#pragma unroll
          for (int u = 0; u < kColsU; ++u) {
            const int jj = j0 + u * kColsTY + ty;
            valid[u] = jj < tcount && cs[jj] >= 0;
            wf[u] = valid[u] ? to_f<T>(wt[cs[jj] * N + col0]) : 0.0f;
          }
#pragma unroll
          for (int u = 0; u < kColsU; ++u) {
            if (!valid[u]) continue;
            const int jj = j0 + u * kColsTY + ty;
#pragma unroll
            for (int m = 0; m < MR; ++m) acc[m][0] = fmaf(hs[jj][m], wf[u], acc[m][0]);
          }
        }
      }
    }
  }

  assert_indices_in_range(indices_ok);

  // Reduce over the j-groups in a fixed order (deterministic).
  for (int g = 0; g < kColsTY; ++g) {
    if (ty == g) {
#pragma unroll
      for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          float& dst = red[m][tx * CPT + c];
          dst = (g == 0) ? acc[m][c] : dst + acc[m][c];
        }
    }
    __syncthreads();
  }

  for (int i = threadIdx.x; i < MR * kColsTX * CPT; i += kThreads) {
    const int m = i / (kColsTX * CPT);
    const int cl = i - m * (kColsTX * CPT);
    const int64_t col = col_base + cl;
    if (m < mcount && col < N) {
      const float v = red[m][cl];
      if (final_out) {
        const float b = bias != nullptr ? to_f<T>(bias[col]) : 0.0f;
        out[(int64_t)m * N + col] = from_f<T>(v + b);
      } else {
        ws[(int64_t)m * N + col] = v;
      }
    }
  }
  __syncthreads();  // red is read above: a next call must not overwrite it before
}

// h: the chunk's first row (mcount rows of J); scales: J factors or nullptr; out: the chunk's first
// output row; ws: workspace of gridDim.y * mcount * N floats (used only when !final_out).
// blockIdx.x: the column tile, blockIdx.y: the J split (jps kept rows each).
template <typename T, int MR, int CPT>
__global__ void __launch_bounds__(kThreads, 2)
    gather_cols_kernel(const T* __restrict__ h, const T* __restrict__ wt,
                       const T* __restrict__ bias, const int64_t* __restrict__ cols,
                       const T* __restrict__ scales, T* __restrict__ out, float* __restrict__ ws,
                       int mcount, int64_t J, int64_t N, int64_t k_total, int64_t jps,
                       int final_out) {
  const int64_t jbeg = (int64_t)blockIdx.y * jps;
  const int64_t jend = jbeg + jps < J ? jbeg + jps : J;
  cols_block<T, MR, CPT>(h, wt, bias, cols, scales, out,
                         final_out ? nullptr : ws + (int64_t)blockIdx.y * mcount * N, mcount, J, N,
                         k_total, (int64_t)blockIdx.x * (kColsTX * CPT), jbeg, jend, final_out);
}

// The down projections of a segmented FFN: blockIdx.x walks the column tiles x J splits (tile
// fastest; `tiles` x `splits` blocks), blockIdx.y the segments, blockIdx.z their chunks of
// kMaxRowsPerChunk rows (cols_block); a block past its segment's rows does nothing. Each segment
// splits its own kept list into `splits` slices of whole steps (slices past its end are empty and
// add zeros); its rows of h are its (rows x kept) block of `hidden` at s.hidden. One split: out is
// written directly (+ bias); more: ws holds splits x M x N partial sums (gather_cols_reduce_kernel
// adds them, + bias). Every row of out belongs to a segment, so every partial sum is written.
template <typename T, int MR, int CPT>
__global__ void __launch_bounds__(kThreads, 2)
    segmented_cols_kernel(const T* __restrict__ hidden, const T* __restrict__ wt,
                          const T* __restrict__ bias, const int64_t* __restrict__ kept,
                          const T* __restrict__ scales, const Segment* __restrict__ segments,
                          int64_t count, T* __restrict__ out, float* __restrict__ ws, int64_t M,
                          int64_t N, int64_t k_total, int64_t tiles, int64_t splits) {
  const int64_t tile = blockIdx.x % tiles;
  const int64_t split = blockIdx.x / tiles;
  for (int64_t s = blockIdx.y; s < count; s += gridDim.y) {
    const Segment seg = segments[s];
    const int64_t jps = ceil_div(ceil_div(seg.kept, splits), kColsStep) * kColsStep;
    const int64_t jbeg = split * jps;
    const int64_t jend = jbeg + jps < seg.kept ? jbeg + jps : seg.kept;
    for (int64_t m0 = (int64_t)blockIdx.z * kMaxRowsPerChunk; m0 < seg.rows;
         m0 += (int64_t)gridDim.z * kMaxRowsPerChunk) {
      const int mcount = (int)(seg.rows - m0 < kMaxRowsPerChunk ? seg.rows - m0 : kMaxRowsPerChunk);
      const int64_t row = seg.r0 + m0;
      cols_block<T, MR, CPT>(hidden + seg.hidden + m0 * seg.kept, wt, bias, kept + seg.k0,
                             scales == nullptr ? nullptr : scales + seg.k0, out + row * N,
                             splits == 1 ? nullptr : ws + (split * M + row) * N, mcount, seg.kept,
                             N, k_total, tile * (kColsTX * CPT), jbeg, jend, splits == 1);
    }
  }
}

// out[i] = sum_s ws[s * total + i] + bias[i % N], i < total = mcount * N.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_cols_reduce_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                              T* __restrict__ out, int64_t total, int64_t N, int64_t splits) {
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * kThreads) {
    float v = 0.0f;
    for (int64_t s = 0; s < splits; ++s) v += ws[s * total + i];
    if (bias != nullptr) v += to_f<T>(bias[i % N]);
    out[i] = from_f<T>(v);
  }
}

struct ColsPlan {
  int mr;
  int cpt;
  int64_t tiles;   // column tiles
  int64_t splits;  // J splits
  int64_t jps;     // kept rows per split (gather_cols_kernel; segmented launches split per segment)
};

template <int MR, typename T>
int cols_cpt(const void* wt, int64_t N) {
  constexpr int vcpt = ColsVecCpt<T, MR>::value;
  const bool vec = N % vcpt == 0 &&
                   (reinterpret_cast<uintptr_t>(wt) % (uintptr_t)(vcpt * sizeof(T))) == 0;
  return vec ? vcpt : 1;
}

// Sets jps from the wanted split count (rounded to whole steps of kColsStep kept rows) and the actual splits.
inline void set_splits(ColsPlan& p, int64_t J, int64_t want) {
  want = std::max<int64_t>(1, std::min<int64_t>(want, 65535));
  p.jps = ceil_div(ceil_div(J, want), kColsStep) * kColsStep;
  p.splits = ceil_div(J, p.jps);
}

// The row bucket, columns per thread and column tiles of a cols launch over chunks of up to
// mcount rows (one split).
template <typename T>
ColsPlan cols_tiling(const void* wt, int64_t mcount, int64_t N) {
  ColsPlan p{};
  p.mr = bucket_rows(mcount);
  with_row_bucket(p.mr, [&](auto mr) { p.cpt = cols_cpt<decltype(mr)::value, T>(wt, N); });
  p.tiles = ceil_div(N, (int64_t)kColsTX * p.cpt);
  p.splits = 1;
  return p;
}

// The J splits wanted by a cols launch of `blocks` blocks per split over J kept rows: about 4
// blocks per SM, with enough kept rows per split that the workspace traffic stays small next to the
// weight traffic.
inline int64_t wanted_splits(int64_t blocks, int64_t J, int64_t mcount, int num_sms) {
  const int64_t target_blocks = (int64_t)std::max(num_sms, 1) * 4;
  const int64_t min_jps = std::max<int64_t>(64, 16 * mcount);
  return std::min(ceil_div(target_blocks, blocks), ceil_div(J, min_jps));
}

template <typename T>
ColsPlan plan_cols(const void* wt, int64_t mcount, int64_t J, int64_t N, int num_sms) {
  ColsPlan p = cols_tiling<T>(wt, mcount, N);
  set_splits(p, J, wanted_splits(p.tiles, J, mcount, num_sms));
  return p;
}

// f(std::integral_constant<int, MR>{}, std::integral_constant<int, CPT>{}) for a plan's mr and cpt.
template <typename T, typename F>
void with_cols_shape(const ColsPlan& p, F&& f) {
  with_row_bucket(p.mr, [&](auto mr) {
    constexpr int vcpt = ColsVecCpt<T, decltype(mr)::value>::value;
    if (p.cpt == vcpt) {
      f(mr, std::integral_constant<int, vcpt>{});
    } else {
      f(mr, std::integral_constant<int, 1>{});
    }
  });
}

// out[i] = sum of `splits` partial sums of ws + bias, i < total (gather_cols_reduce_kernel).
template <typename T>
void launch_cols_reduce(const float* ws, const T* bias, T* out, int64_t total, int64_t N,
                        int64_t splits, int num_sms, cudaStream_t stream) {
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(total, kThreads), (int64_t)std::max(num_sms, 1) * 8));
  gather_cols_reduce_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(ws, bias, out, total, N,
                                                                          splits);
}

template <typename T>
cudaError_t launch_cols(const T* h, const T* wt, const T* bias, const int64_t* cols,
                        const T* scales, T* out, float* ws, int64_t ws_elems, int64_t M, int64_t J,
                        int64_t N, int64_t k_total, int num_sms, cudaStream_t stream) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerChunk) {
    const int mcount = (int)std::min<int64_t>(kMaxRowsPerChunk, M - m0);
    ColsPlan p = plan_cols<T>(wt, mcount, J, N, num_sms);
    if (p.splits > 1 && (ws == nullptr || p.splits * mcount * N > ws_elems)) {
      // Not enough workspace for the planned splits: use as many as fit (at least one).
      const int64_t fit = ws == nullptr ? 1 : ws_elems / ((int64_t)mcount * N);
      set_splits(p, J, std::min(p.splits, fit));
      if (p.splits > 1 && p.splits * mcount * N > ws_elems) set_splits(p, J, 1);
    }
    const T* hc = h + m0 * J;
    T* oc = out + m0 * N;
    with_cols_shape<T>(p, [&](auto mr, auto cpt) {
      const dim3 grid((unsigned)p.tiles, (unsigned)p.splits, 1);
      gather_cols_kernel<T, decltype(mr)::value, decltype(cpt)::value>
          <<<grid, kThreads, 0, stream>>>(hc, wt, bias, cols, scales, oc, ws, mcount, J, N,
                                          k_total, p.jps, p.splits == 1);
    });
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (p.splits > 1) {
      launch_cols_reduce<T>(ws, bias, oc, (int64_t)mcount * N, N, p.splits, num_sms, stream);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

template <typename T>
int64_t cols_workspace(const void* wt, int64_t M, int64_t J, int64_t N, int num_sms) {
  int64_t need = 0;
  const int64_t sizes[2] = {std::min<int64_t>(M, kMaxRowsPerChunk), M % kMaxRowsPerChunk};
  for (int64_t mc : sizes) {
    if (mc <= 0) continue;
    const ColsPlan p = plan_cols<T>(wt, mc, J, N, num_sms);
    if (p.splits > 1) need = std::max(need, p.splits * mc * N);
  }
  return need;
}

// ----------------------------------------------------------------------------------------------
// Segmented FFN: the up projections of every segment in one launch, into the packed hidden buffer,
// then the down projections of every segment in one launch (+ the reduction of its J splits).
// ----------------------------------------------------------------------------------------------

// The down projections' plan: the row bucket of the fullest chunk, and as many J splits (each
// segment splitting its own list) as wanted for the blocks of every segment's chunks and the
// longest list (at most 65535, and tiles x splits blocks along x).
template <typename T>
ColsPlan plan_segmented_cols(const void* wt, const SegmentsShape& sh, int64_t N, int num_sms) {
  ColsPlan p = cols_tiling<T>(wt, sh.chunk_rows(), N);
  const int64_t want = wanted_splits(p.tiles * sh.chunks, sh.max_kept, sh.chunk_rows(), num_sms);
  p.splits = std::max<int64_t>(1, std::min<int64_t>({want, 65535, INT_MAX / p.tiles}));
  return p;
}

template <typename T>
int64_t segmented_workspace(const SegmentedFfn& f, int num_sms) {
  const SegmentsShape sh(f.segments, f.count);
  const ColsPlan p = plan_segmented_cols<T>(f.w_down_t, sh, f.N, num_sms);
  return p.splits > 1 ? p.splits * f.M * f.N : 0;
}

template <typename T>
cudaError_t launch_segmented(const SegmentedFfn& f, T* hidden, float* ws, int64_t ws_elems,
                             T* out, int num_sms, cudaStream_t stream) {
  const SegmentsShape sh(f.segments, f.count);
  const T* x = static_cast<const T*>(f.x);
  const T* w0 = static_cast<const T*>(f.w_up0);
  if (sh.max_kept > 0) {
    if (f.swiglu) {
      launch_segmented_rows<T, 2>(x, w0, static_cast<const T*>(f.w_up1), nullptr, f.kept,
                                  f.device_segments, sh, hidden, f.K, f.n_total, 0, num_sms,
                                  stream);
    } else {
      launch_segmented_rows<T, 1>(x, w0, nullptr, static_cast<const T*>(f.b_up), f.kept,
                                  f.device_segments, sh, hidden, f.K, f.n_total, f.activation,
                                  num_sms, stream);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ColsPlan p = plan_segmented_cols<T>(f.w_down_t, sh, f.N, num_sms);
  if (p.splits > 1 && (ws == nullptr || p.splits * f.M * f.N > ws_elems)) {
    // Not enough workspace for the planned splits: use as many as fit (at least one).
    p.splits = std::max<int64_t>(1, ws == nullptr ? 1 : ws_elems / (f.M * f.N));
  }
  const T* bias = static_cast<const T*>(f.b_down);
  with_cols_shape<T>(p, [&](auto mr, auto cpt) {
    segmented_cols_kernel<T, decltype(mr)::value, decltype(cpt)::value>
        <<<sh.grid(p.tiles * p.splits), kThreads, 0, stream>>>(
            hidden, static_cast<const T*>(f.w_down_t), bias, f.kept,
            static_cast<const T*>(f.scales), f.device_segments, sh.count, out, ws, f.M, f.N,
            f.n_total, p.tiles, p.splits);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.splits > 1) {
    launch_cols_reduce<T>(ws, bias, out, f.M * f.N, f.N, p.splits, num_sms, stream);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Public launchers (dtype dispatch)
// ----------------------------------------------------------------------------------------------
cudaError_t launch_gather_rows_linear(DType dtype, const void* x, const void* weight,
                                      const void* bias, const int64_t* rows, void* out, int64_t M,
                                      int64_t K, int64_t N, int64_t n_total, int activation,
                                      int num_sms, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: {
      using T = float;
      return launch_rows<T, 1>(static_cast<const T*>(x), static_cast<const T*>(weight), nullptr,
                               static_cast<const T*>(bias), rows, static_cast<T*>(out), M, K, N,
                               n_total, activation, num_sms, stream);
    }
    case DType::kFloat16: {
      using T = __half;
      return launch_rows<T, 1>(static_cast<const T*>(x), static_cast<const T*>(weight), nullptr,
                               static_cast<const T*>(bias), rows, static_cast<T*>(out), M, K, N,
                               n_total, activation, num_sms, stream);
    }
    case DType::kBFloat16: {
      using T = __nv_bfloat16;
      return launch_rows<T, 1>(static_cast<const T*>(x), static_cast<const T*>(weight), nullptr,
                               static_cast<const T*>(bias), rows, static_cast<T*>(out), M, K, N,
                               n_total, activation, num_sms, stream);
    }
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gather_swiglu(DType dtype, const void* x, const void* w_gate, const void* w_up,
                                 const int64_t* kept, void* out, int64_t M, int64_t K, int64_t N,
                                 int64_t n_total, int num_sms, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: {
      using T = float;
      return launch_rows<T, 2>(static_cast<const T*>(x), static_cast<const T*>(w_gate),
                               static_cast<const T*>(w_up), nullptr, kept, static_cast<T*>(out), M,
                               K, N, n_total, 0, num_sms, stream);
    }
    case DType::kFloat16: {
      using T = __half;
      return launch_rows<T, 2>(static_cast<const T*>(x), static_cast<const T*>(w_gate),
                               static_cast<const T*>(w_up), nullptr, kept, static_cast<T*>(out), M,
                               K, N, n_total, 0, num_sms, stream);
    }
    case DType::kBFloat16: {
      using T = __nv_bfloat16;
      return launch_rows<T, 2>(static_cast<const T*>(x), static_cast<const T*>(w_gate),
                               static_cast<const T*>(w_up), nullptr, kept, static_cast<T*>(out), M,
                               K, N, n_total, 0, num_sms, stream);
    }
  }
  return cudaErrorInvalidValue;
}

int64_t gather_cols_linear_workspace_elems(DType dtype, const void* weight_t, int64_t M, int64_t J,
                                           int64_t N, int num_sms) {
  if (M <= 0 || N <= 0 || J <= 0) return 0;
  switch (dtype) {
    case DType::kFloat32: return cols_workspace<float>(weight_t, M, J, N, num_sms);
    case DType::kFloat16: return cols_workspace<__half>(weight_t, M, J, N, num_sms);
    case DType::kBFloat16: return cols_workspace<__nv_bfloat16>(weight_t, M, J, N, num_sms);
  }
  return 0;
}

cudaError_t launch_gather_cols_linear(DType dtype, const void* h, const void* weight_t,
                                      const void* bias, const int64_t* cols, const void* scales,
                                      void* out, float* workspace, int64_t workspace_elems,
                                      int64_t M, int64_t J, int64_t N, int64_t k_total,
                                      int num_sms, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || J <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: {
      using T = float;
      return launch_cols<T>(static_cast<const T*>(h), static_cast<const T*>(weight_t),
                            static_cast<const T*>(bias), cols, static_cast<const T*>(scales),
                            static_cast<T*>(out), workspace, workspace_elems, M, J, N, k_total,
                            num_sms, stream);
    }
    case DType::kFloat16: {
      using T = __half;
      return launch_cols<T>(static_cast<const T*>(h), static_cast<const T*>(weight_t),
                            static_cast<const T*>(bias), cols, static_cast<const T*>(scales),
                            static_cast<T*>(out), workspace, workspace_elems, M, J, N, k_total,
                            num_sms, stream);
    }
    case DType::kBFloat16: {
      using T = __nv_bfloat16;
      return launch_cols<T>(static_cast<const T*>(h), static_cast<const T*>(weight_t),
                            static_cast<const T*>(bias), cols, static_cast<const T*>(scales),
                            static_cast<T*>(out), workspace, workspace_elems, M, J, N, k_total,
                            num_sms, stream);
    }
  }
  return cudaErrorInvalidValue;
}

int64_t segmented_ffn_workspace_elems(const SegmentedFfn& ffn, int num_sms) {
  if (ffn.M <= 0 || ffn.N <= 0 || ffn.count <= 0) return 0;
  switch (ffn.dtype) {
    case DType::kFloat32: return segmented_workspace<float>(ffn, num_sms);
    case DType::kFloat16: return segmented_workspace<__half>(ffn, num_sms);
    case DType::kBFloat16: return segmented_workspace<__nv_bfloat16>(ffn, num_sms);
  }
  return 0;
}

cudaError_t launch_segmented_ffn(const SegmentedFfn& ffn, void* hidden, float* workspace,
                                 int64_t workspace_elems, void* out, int num_sms,
                                 cudaStream_t stream) {
  if (ffn.M <= 0 || ffn.N <= 0 || ffn.count <= 0) return cudaSuccess;
  switch (ffn.dtype) {
    case DType::kFloat32:
      return launch_segmented<float>(ffn, static_cast<float*>(hidden), workspace, workspace_elems,
                                     static_cast<float*>(out), num_sms, stream);
    case DType::kFloat16:
      return launch_segmented<__half>(ffn, static_cast<__half*>(hidden), workspace,
                                      workspace_elems, static_cast<__half*>(out), num_sms, stream);
    case DType::kBFloat16:
      return launch_segmented<__nv_bfloat16>(ffn, static_cast<__nv_bfloat16*>(hidden), workspace,
                                             workspace_elems, static_cast<__nv_bfloat16*>(out),
                                             num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kernels_run_here() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, gather_cols_reduce_kernel<float>);
  if (err != cudaSuccess) cudaGetLastError();  // not left for torch's next check to report
  return err;
}

}  // namespace gemv
}  // namespace doe_kernels
