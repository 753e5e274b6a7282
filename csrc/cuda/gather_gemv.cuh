// Torch-free launchers of the gather-GEMV CUDA kernels (csrc/cuda/gather_gemv.cu).
//
// Pointers are raw device pointers of contiguous row-major buffers, all of one element type (`dtype`)
// except the int64 index lists; `bias` may be nullptr. Index lists are non-empty (sorted and unique in
// normal use; the kernels do not rely on it). Accumulation is in float32. Rows of x / h are processed
// in chunks of at most kMaxRowsPerChunk rows (one launch per chunk), so any row count is correct, but
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

}  // namespace gemv
}  // namespace doe_kernels
