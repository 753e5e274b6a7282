// Torch-free launchers of the gather-GEMV CUDA kernels (csrc/cuda/gather_gemv.cu).
//
// Pointers are raw device pointers of contiguous row-major buffers, all of one element type (`dtype`)
// except the int64 index lists; `bias` may be nullptr. Index lists are non-empty (sorted and unique in
// normal use; the kernels do not rely on it; a segmented FFN's lists may be empty). Accumulation is in
// float32. Rows of x / h are processed in chunks of at most kMaxRowsPerChunk rows (one launch per
// chunk; a segmented FFN: a grid axis over each segment's chunks), so any row count is correct, but
// the kernels are tuned for decoding (1 to 16 rows). Every launcher returns cudaGetLastError() after
// its launches.
//
// Index values are checked on the device, where they are read (the host cannot read them without a
// synchronisation, which would also break CUDA-graph capture): each index is compared with its bound
// (n_total rows of the weight, k_total rows of weight_t). An index outside [0, bound) fails a
// device-side assertion (the error surfaces at the next synchronising CUDA call; compiled out with
// NDEBUG) and is never used as an address: the output it feeds is 0 (rows, swiglu) or it adds
// nothing (cols).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "segments.h"

namespace doe_kernels {
namespace gemv {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int64_t kMaxRowsPerChunk = 16;

// out (M, N) = act(x (M, K) . weight[rows[n]] (K) + bias[rows[n]]); weight (n_total, K).
// activation: 0 identity, 1 erf GELU, 2 tanh GELU, 3 ReLU.
cudaError_t launch_gather_rows_linear(DType dtype, const void* x, const void* weight,
                                      const void* bias, const int64_t* rows, void* out, int64_t M,
                                      int64_t K, int64_t N, int64_t n_total, int activation,
                                      int num_sms, cudaStream_t stream);

// out (M, N) = silu(x . w_gate[kept[n]]) * (x . w_up[kept[n]]); w_gate, w_up (n_total, K).
cudaError_t launch_gather_swiglu(DType dtype, const void* x, const void* w_gate, const void* w_up,
                                 const int64_t* kept, void* out, int64_t M, int64_t K, int64_t N,
                                 int64_t n_total, int num_sms, cudaStream_t stream);

// Number of float32 elements of device workspace that launch_gather_cols_linear wants for these
// arguments (0 when it needs none). Passing less workspace is still correct (fewer J splits, slower).
int64_t gather_cols_linear_workspace_elems(DType dtype, const void* weight_t, int64_t M, int64_t J,
                                           int64_t N, int num_sms);

// out (M, N) = sum_j h (M, J)[m, j] * scales[j] * weight_t[cols[j], n] + bias[n]; weight_t
// (k_total, N). `scales` (J elements) may be nullptr: no scaling; the kernel multiplies each h
// value by its scale in float32 as it stages it. `workspace` (float32, `workspace_elems` elements,
// may be nullptr when 0) holds per-split partial sums; the result is deterministic (fixed
// reduction order).
cudaError_t launch_gather_cols_linear(DType dtype, const void* h, const void* weight_t,
                                      const void* bias, const int64_t* cols, const void* scales,
                                      void* out, float* workspace, int64_t workspace_elems,
                                      int64_t M, int64_t J, int64_t N, int64_t k_total,
                                      int num_sms, cudaStream_t stream);

// A segmented FFN (mixed-task batch): for every segment s (rows [s.r0, s.r0 + s.rows) of x and out,
// kept list kept[s.k0 .. s.k0 + s.kept)), out rows = the gather FFN of those x rows on that list:
//   up:   h[m, j] = act(x[m] . w_up0[list[j]] + b_up[list[j]])               (BERT)
//         h[m, j] = silu(x[m] . w_up0[list[j]]) * (x[m] . w_up1[list[j]])   (swiglu)
//   down: out[m, n] = sum_j h[m, j] * scales[s.k0 + j] * w_down_t[list[j], n] + b_down[n]
// h is stored in x's dtype, segment s's (rows x kept) block at element s.hidden of `hidden`. A
// segment with an empty list gives b_down (or zeros). `segments` lists the segments holding rows,
// in row order, covering rows [0, M); the launchers read it on the host to size the launches and
// the kernels read `device_segments`, the same table on the device.
struct SegmentedFfn {
  DType dtype;
  bool swiglu;           // the SwiGLU FFN, else the BERT one
  const void* x;         // (M, K)
  const void* w_up0;     // w_in or w_gate (n_total, K)
  const void* w_up1;     // w_up (n_total, K); SwiGLU only
  const void* b_up;      // b_in (n_total) or nullptr; BERT only
  int activation;        // as launch_gather_rows_linear's; BERT only
  const void* w_down_t;  // (n_total, N)
  const void* b_down;    // (N) or nullptr
  const int64_t* kept;   // every segment's list, concatenated
  const void* scales;    // one per entry of kept, or nullptr
  const Segment* segments;         // host table, `count` entries
  const Segment* device_segments;  // the same on the device
  int64_t count, M, K, N, n_total;
};

// cudaSuccess when the current device can run these kernels (the build holds code for its
// architecture), else the error that says why (cudaErrorNoKernelImageForDevice); clears it.
cudaError_t kernels_run_here();

// Float32 elements of workspace that launch_segmented_ffn wants (0: none); less is still correct.
int64_t segmented_ffn_workspace_elems(const SegmentedFfn& ffn, int num_sms);

// Two launches (the up projections of every segment, then the down projections; a third reduces
// the down projections' J splits when the workspace holds them), each over a grid of tiles x
// segments x row chunks (blocks past their segment's work return at once). `hidden`: sum of
// rows x kept elements of x's dtype.
cudaError_t launch_segmented_ffn(const SegmentedFfn& ffn, void* hidden, float* workspace,
                                 int64_t workspace_elems, void* out, int num_sms,
                                 cudaStream_t stream);

}  // namespace gemv
}  // namespace doe_kernels
