// Declarations of the C++ entry points of doe_kernels._C: the gathered-linear primitives that every
// op (gather FFN, SwiGLU FFN, pruned-head attention) is built from, for the CPU and, when the
// extension is built with CUDA, for the GPU.
//
// Contract shared by all entry points (the Python layer in doe_kernels/ops checks it before calling):
//   x, weights and biases are contiguous, of one dtype (float32, float16 or bfloat16; CPU: float32 or
//   bfloat16) and on one device; x is 2-D (rows, features); index tensors are 1-D contiguous int64,
//   sorted, unique, in range and non-empty; the result has x's dtype; accumulation is in float32
//   (the CPU's bfloat16 gather + GEMM regime rounds each GEMM's result to bfloat16 before the
//   activation, as PyTorch's bfloat16 layers do; the fused kernels round once, at the end).
// The kernels never read out of bounds, whatever the index values (an index tensor may have
// changed since the Python layer checked it; writing one while a call runs is a data race, as for
// any input tensor, and is not covered): the CPU entry points check every index and raise
// ValueError; the CUDA kernels, which cannot report to the host without a synchronisation, never
// load through an out-of-range index (the output it feeds is 0) and stop with a device-side
// assertion (unless built with NDEBUG). Unsorted or repeated indices are not refused: every output
// is written by position, never scattered by index value.
//
//   gather_rows_linear: out[m, n] = act(sum_k x[m, k] * weight[rows[n], k] + bias[rows[n]])
//       x (M, K), weight (N_total, K) in nn.Linear layout, bias (N_total) or none, rows (N)
//       -> out (M, N).
//   gather_swiglu: out[m, n] = silu(x[m] . w_gate[kept[n]]) * (x[m] . w_up[kept[n]])
//       x (M, K), w_gate and w_up (N_total, K), kept (N) -> out (M, N).
//   gather_cols_linear: out[m, n] = sum_j h[m, j] * scales[j] * weight_t[cols[j], n] + bias[n]
//       h (M, J), weight_t (K_total, N) input-major (the transpose of nn.Linear's weight, so that
//       each kept input feature is one contiguous row), bias (N) or none, cols (J), scales (J) or
//       none (a factor per kept column, h's dtype, contiguous; none: no scaling, no extra work)
//       -> out (M, N). Scaling is in float32, except in the CPU's bfloat16 gather + GEMM regime
//       (more than 16 rows), which scales its bfloat16 copy of the kept weight rows (on AMX,
//       up to 128 rows: the kept rows it packs into tiles, rounded to bfloat16 alike).
//   segmented_ffn (CPU): rows [segments[s], segments[s + 1]) of x (M, K) through the BERT FFN
//       gather_cols_linear(act(gather_rows_linear(x, w_in, b_in, list)), w_out_t, b_out, list,
//       scales of the list), list = kept[kept_offsets[s] .. kept_offsets[s + 1]), for every
//       segment s in one call. segments and kept_offsets: 1-D int64, one entry more than there are
//       segments, from 0 to M and to len(kept), non-decreasing (checked, ValueError); a segment
//       may have no rows, and an empty list (its rows get b_out, or zeros); w_out_t (N_total, N),
//       scales (len(kept)) or none -> out (M, N). `strategy` (SegmentStrategy): each segment on
//       its own list, or the union of the lists (union_plan) gathered once, each row's hidden
//       activations times its row of the row mask; auto takes the union where it costs less
//       under the CPU's cost model (cpu/gather_linear_cpu.cpp, RegimeCosts: each call weighed in
//       the regime it runs, fused or gather + GEMM).
//   segmented_swiglu_ffn (CPU): the same for the SwiGLU FFN (w_gate, w_up, w_down_t; no biases).
//   union_plan (CPU): (union, row_mask) of a segmented FFN's layout (as segmented_ffn takes it;
//       kept entries below `neurons`, the FFN's width): the sorted union of the lists of the
//       segments holding rows (int64), and (M, len(union)) in x's dtype: each row's segment's 1
//       (or scale) at the places of its kept neurons in the union, 0 elsewhere; where `strategy`
//       runs the segments (as segmented_ffn decides it for an FFN from x's width back to it,
//       `up_matrices` 1 for w_in or 2 for SwiGLU's w_gate and w_up), an empty union and (M, 0).
//   segmented_ffn, segmented_swiglu_ffn (CUDA): the same on the GPU. segments and kept_offsets
//       stay CPU tensors (the layout sizes the launches; it is checked as on the CPU and copied to
//       the device), kept and scales are on x's device (kept's values checked by the kernels). The
//       hidden activations are rounded to x's dtype between the projections, as the single-expert
//       ops store them.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "segments.h"

namespace doe_kernels {

// Activation codes: ACTIVATION_CODES in doe_kernels/activations.py (a test checks they agree).
enum Activation : int64_t {
  kIdentity = 0,
  kGeluErf = 1,
  kGeluTanh = 2,
  kRelu = 3,
};

// Segment strategy codes of the CPU segmented FFNs: the places of their names in
// SEGMENT_STRATEGIES (bound as doe_kernels._C.SEGMENT_STRATEGIES; doe_kernels/ops/library.py's
// tuple of the same name must equal it).
enum SegmentStrategy : int64_t {
  kAutoStrategy = 0,
  kSegmentsStrategy = 1,
  kUnionStrategy = 2,
};

at::Tensor gather_rows_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                                  int64_t activation);
at::Tensor gather_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                             const at::Tensor& kept);
at::Tensor gather_cols_linear_cpu(const at::Tensor& h, const at::Tensor& weight_t,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& cols,
                                  const std::optional<at::Tensor>& scales);
at::Tensor segmented_ffn_cpu(const at::Tensor& x, const at::Tensor& w_in,
                             const std::optional<at::Tensor>& b_in, const at::Tensor& w_out_t,
                             const std::optional<at::Tensor>& b_out, const at::Tensor& segments,
                             const at::Tensor& kept, const at::Tensor& kept_offsets,
                             const std::optional<at::Tensor>& scales, int64_t activation,
                             int64_t strategy);
at::Tensor segmented_swiglu_ffn_cpu(const at::Tensor& x, const at::Tensor& w_gate,
                                    const at::Tensor& w_up, const at::Tensor& w_down_t,
                                    const at::Tensor& segments, const at::Tensor& kept,
                                    const at::Tensor& kept_offsets,
                                    const std::optional<at::Tensor>& scales, int64_t strategy);
std::tuple<at::Tensor, at::Tensor> union_plan_cpu(const at::Tensor& x, const at::Tensor& segments,
                                                  const at::Tensor& kept,
                                                  const at::Tensor& kept_offsets,
                                                  const std::optional<at::Tensor>& scales,
                                                  int64_t neurons, int64_t up_matrices,
                                                  int64_t strategy);
// The segments holding rows of a segmented FFN's layout (segments and kept_offsets: CPU int64, one
// entry more than there are segments, from 0 to `rows` and to `kept_count`, non-decreasing;
// ValueError otherwise), their `hidden` offsets 0. The CPU and CUDA entry points read it alike.
std::vector<Segment> read_segment_layout(const at::Tensor& segments,
                                         const at::Tensor& kept_offsets, int64_t rows,
                                         int64_t kept_count, const char* fn);
// Above how many input rows every CPU op gathers the kept weights and calls ATen's GEMM: -1 (the
// default, or DOE_KERNELS_CPU_GATHER_ABOVE unset) lets each op choose by dtype, CPU and size.
void set_cpu_gather_above(int64_t rows);
int64_t cpu_gather_above();
// Whether a call keeping every row of its weight, with `rows` input rows in float32 (else
// bfloat16), should run the fused kernels (true) rather than ATen's GEMM on the whole weight: at
// few rows (decoding), float32 on AMD CPUs with AVX-512 at any, bfloat16 at any on CPUs without
// AVX-512, or as set_cpu_gather_above forces.
bool cpu_runs_fused_dense(bool float32, int64_t rows);
// Whether a CPU op over `rows` rows in float32 (else bfloat16) that copies `copied_bytes` of kept
// weights (0: its list is every row in order) takes the gather + GEMM regime.
bool cpu_uses_gather_gemm(bool float32, int64_t rows, int64_t copied_bytes);
// The segment strategy's cost model for float32 (else bfloat16) on this CPU: (read, gemm_read,
// gemm_copy, gemm_product), as cpu/gather_linear_cpu.cpp's RegimeCosts defines them.
std::tuple<double, double, double, double> cpu_segment_costs(bool float32);

#ifdef DOE_KERNELS_WITH_CUDA
// `stream` is the cudaStream_t to launch on, passed from Python
// (torch.cuda.current_stream().cuda_stream), so that the bindings need no ATen CUDA headers. It must
// be the current stream of the tensors' device: the outputs and workspaces are allocated (and
// freed on return) by the caching allocator on that stream.
at::Tensor gather_rows_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                                   int64_t activation, int64_t stream);
at::Tensor gather_swiglu_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                              const at::Tensor& w_up, const at::Tensor& kept, int64_t stream);
at::Tensor gather_cols_linear_cuda(const at::Tensor& h, const at::Tensor& weight_t,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& cols,
                                   const std::optional<at::Tensor>& scales, int64_t stream);
at::Tensor segmented_ffn_cuda(const at::Tensor& x, const at::Tensor& w_in,
                              const std::optional<at::Tensor>& b_in, const at::Tensor& w_out_t,
                              const std::optional<at::Tensor>& b_out, const at::Tensor& segments,
                              const at::Tensor& kept, const at::Tensor& kept_offsets,
                              const std::optional<at::Tensor>& scales, int64_t activation,
                              int64_t stream);
at::Tensor segmented_swiglu_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                                     const at::Tensor& w_up, const at::Tensor& w_down_t,
                                     const at::Tensor& segments, const at::Tensor& kept,
                                     const at::Tensor& kept_offsets,
                                     const std::optional<at::Tensor>& scales, int64_t stream);
// Whether the CUDA kernels can run on `device` (the build holds code for its architecture).
bool cuda_kernels_run_on(int64_t device);
#endif

}  // namespace doe_kernels
