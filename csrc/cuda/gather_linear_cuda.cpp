// Torch bindings of the gather-GEMV CUDA kernels: the *_cuda entry points of doe_kernels.h.
//
// No ATen/cuda or c10/cuda headers (the toolkit used to build may lack cuBLAS headers): the stream
// comes from Python as an int64 (torch's current stream on the tensors' device), the device guard is
// a cudaGetDevice/cudaSetDevice pair (the Python side makes the tensors' device current first, with
// torch's guard, so that this one has nothing to restore: cudaSetDevice back to a device without a
// context would create one), and launch errors come from cudaGetLastError.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "gather_gemv.cuh"
#include "doe_kernels.h"

namespace doe_kernels {
namespace {

#define DOE_CUDA_CHECK(expr, what)                                                       \
  do {                                                                                   \
    const cudaError_t doe_err_ = (expr);                                                 \
    TORCH_CHECK(doe_err_ == cudaSuccess, "doe_kernels: ", what, " failed: ",             \
                cudaGetErrorString(doe_err_));                                           \
  } while (0)

// Makes `device` current for the scope and restores the previous current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DOE_CUDA_CHECK(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      DOE_CUDA_CHECK(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) {
      // Never throw from a destructor; a failure to restore leaves the error for the next check.
      (void)cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

int num_sms(int device) {
  int n = 0;
  DOE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
                 "cudaDeviceGetAttribute(MultiProcessorCount)");
  return n > 0 ? n : 1;
}

gemv::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gemv::DType::kFloat32;
    case at::kHalf:
      return gemv::DType::kFloat16;
    case at::kBFloat16:
      return gemv::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(),
                  " (expected float32, float16 or bfloat16)");
  }
  return gemv::DType::kFloat32;  // unreachable
}

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                      const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but the input has dtype ", ref.scalar_type());
}

// Metadata only: the index values are checked by the kernels, on the device (gather_gemv.cuh), since
// reading them here would synchronise with the device and break CUDA-graph capture.
void check_index(const at::Tensor& idx, const at::Tensor& ref, const char* op, const char* name,
                 bool may_be_empty = false) {
  check_cuda_tensor(idx, ref, op, name);
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, op, ": ", name, " must be 1-D, got ", idx.dim(), " dims");
  TORCH_CHECK(may_be_empty || idx.numel() > 0, op, ": ", name, " must be non-empty");
}

// Index lists into a weight of no rows: every index would be out of range, and the kernels' fallback
// for one (row 0) does not exist either.
void check_rows_exist(int64_t weight_rows, int64_t listed, const char* op, const char* name) {
  TORCH_CHECK(weight_rows > 0 || listed == 0, op, ": ", name, " lists ", listed,
              " indices into a weight with no rows");
}

// An optional 1-D operand of x's device and dtype with `size` entries.
void check_vector(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t size,
                  const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_cuda_tensor(*t, x, op, name);
  check_same_dtype(*t, x, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, op, ": ", name, " must have shape (", size,
              "), got ", t->sizes());
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The up projection's weight (w_in or w_gate) of a segmented FFN on x.
void check_up_weight(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name) {
  check_cuda_tensor(w, x, op, name);
  check_same_dtype(w, x, op, name);
  TORCH_CHECK(w.dim() == 2, op, ": ", name, " must be 2-D (neurons, in_features), got ", w.dim(),
              " dims");
  TORCH_CHECK(w.size(1) == x.size(1), op, ": ", name, " has ", w.size(1),
              " input features but x has ", x.size(1));
}

// The rest of a segmented FFN's entry point, once x and the up projection are checked: the down
// projection (w_down_t, b_down), the kept lists and their layout (read on the host: the segments
// holding rows, their hidden blocks packed in row order), then the launches on `stream`. `ffn`
// holds x's dtype and the up projection's operands.
at::Tensor run_segmented(gemv::SegmentedFfn ffn, const at::Tensor& x, const at::Tensor& w_down_t,
                         const std::optional<at::Tensor>& b_down, const at::Tensor& segments,
                         const at::Tensor& kept, const at::Tensor& kept_offsets,
                         const std::optional<at::Tensor>& scales, int64_t neurons,
                         int64_t stream, const char* op) {
  check_cuda_tensor(w_down_t, x, op, "w_down_t");
  check_same_dtype(w_down_t, x, op, "w_down_t");
  TORCH_CHECK(w_down_t.dim() == 2 && w_down_t.size(0) == neurons, op,
              ": w_down_t must be 2-D with ", neurons, " rows (the up projection's neurons), got ",
              w_down_t.sizes());
  const int64_t M = x.size(0), N = w_down_t.size(1);
  check_vector(b_down, x, N, op, "b_down");
  check_index(kept, x, op, "kept", /*may_be_empty=*/true);
  check_rows_exist(neurons, kept.numel(), op, "kept");
  check_vector(scales, x, kept.numel(), op, "scales");
  std::vector<Segment> table = read_segment_layout(segments, kept_offsets, M, kept.numel(), op);
  int64_t hidden_elems = 0;
  for (Segment& s : table) {
    s.hidden = hidden_elems;
    hidden_elems += s.rows * s.kept;
  }

  at::Tensor out = at::empty({M, N}, x.options());
  if (table.empty() || N == 0) return out;
  const int device = x.get_device();
  DeviceGuard guard(device);
  // the segment table is copied from host memory: a CUDA graph would keep a dangling pointer
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  DOE_CUDA_CHECK(cudaStreamIsCapturing(as_stream(stream), &capture), "cudaStreamIsCapturing");
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "the segmented CUDA FFN cannot be captured in a CUDA graph (its segment table is "
              "copied from the host)");
  static_assert(sizeof(Segment) % sizeof(int64_t) == 0, "Segment is a row of int64");
  const int64_t table_bytes = (int64_t)(table.size() * sizeof(Segment));
  at::Tensor device_table =
      at::empty({table_bytes / (int64_t)sizeof(int64_t)}, x.options().dtype(at::kLong));
  // From pageable memory: the call returns once `table` is staged, so it may go out of scope.
  DOE_CUDA_CHECK(cudaMemcpyAsync(device_table.data_ptr(), table.data(), table_bytes,
                                 cudaMemcpyHostToDevice, as_stream(stream)),
                 "cudaMemcpyAsync(segment table)");
  at::Tensor hidden = at::empty({std::max<int64_t>(hidden_elems, 1)}, x.options());

  ffn.x = x.data_ptr();
  ffn.w_down_t = w_down_t.data_ptr();
  ffn.b_down = data_or_null(b_down);
  ffn.kept = kept.data_ptr<int64_t>();
  ffn.scales = data_or_null(scales);
  ffn.segments = table.data();
  ffn.device_segments = static_cast<const Segment*>(device_table.data_ptr());
  ffn.count = (int64_t)table.size();
  ffn.M = M;
  ffn.K = x.size(1);
  ffn.N = N;
  ffn.n_total = neurons;
  const int sms = num_sms(device);
  // Allocated on the caching allocator's current stream, as in gather_cols_linear_cuda.
  const int64_t ws_elems = gemv::segmented_ffn_workspace_elems(ffn, sms);
  at::Tensor workspace;
  float* ws_ptr = nullptr;
  if (ws_elems > 0) {
    workspace = at::empty({ws_elems}, x.options().dtype(at::kFloat));
    ws_ptr = workspace.data_ptr<float>();
  }
  const cudaError_t err = gemv::launch_segmented_ffn(ffn, hidden.data_ptr(), ws_ptr, ws_elems,
                                                     out.data_ptr(), sms, as_stream(stream));
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

at::Tensor gather_rows_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                                   int64_t activation, int64_t stream) {
  const char* op = "gather_rows_linear_cuda";
  check_cuda_tensor(x, x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, features), got ", x.dim(), " dims");
  const gemv::DType dtype = to_dtype(x, op);
  check_cuda_tensor(weight, x, op, "weight");
  check_same_dtype(weight, x, op, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ",
              weight.dim(), " dims");
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight has ", weight.size(1),
              " input features but x has ", x.size(1));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cuda_tensor(*bias, x, op, "bias");
    check_same_dtype(*bias, x, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape (", weight.size(0), "), got ", bias->sizes());
  }
  check_index(rows, x, op, "rows");
  check_rows_exist(weight.size(0), rows.numel(), op, "rows");
  TORCH_CHECK(activation >= kIdentity && activation <= kRelu, op, ": unknown activation code ",
              activation, " (0 identity, 1 erf GELU, 2 tanh GELU, 3 ReLU)");

  const int64_t M = x.size(0), K = x.size(1), N = rows.numel();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;

  const int device = x.get_device();
  DeviceGuard guard(device);
  const cudaError_t err = gemv::launch_gather_rows_linear(
      dtype, x.data_ptr(), weight.data_ptr(), has_bias ? bias->data_ptr() : nullptr,
      rows.data_ptr<int64_t>(), out.data_ptr(), M, K, N, weight.size(0),
      static_cast<int>(activation), num_sms(device), as_stream(stream));
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor gather_swiglu_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                              const at::Tensor& w_up, const at::Tensor& kept, int64_t stream) {
  const char* op = "gather_swiglu_cuda";
  check_cuda_tensor(x, x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, features), got ", x.dim(), " dims");
  const gemv::DType dtype = to_dtype(x, op);
  check_cuda_tensor(w_gate, x, op, "w_gate");
  check_cuda_tensor(w_up, x, op, "w_up");
  check_same_dtype(w_gate, x, op, "w_gate");
  check_same_dtype(w_up, x, op, "w_up");
  TORCH_CHECK(w_gate.dim() == 2 && w_up.dim() == 2, op, ": w_gate and w_up must be 2-D");
  TORCH_CHECK(w_gate.sizes() == w_up.sizes(), op, ": w_gate ", w_gate.sizes(), " and w_up ",
              w_up.sizes(), " must have the same shape");
  TORCH_CHECK(w_gate.size(1) == x.size(1), op, ": w_gate has ", w_gate.size(1),
              " input features but x has ", x.size(1));
  check_index(kept, x, op, "kept");
  check_rows_exist(w_gate.size(0), kept.numel(), op, "kept");

  const int64_t M = x.size(0), K = x.size(1), N = kept.numel();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;

  const int device = x.get_device();
  DeviceGuard guard(device);
  const cudaError_t err = gemv::launch_gather_swiglu(
      dtype, x.data_ptr(), w_gate.data_ptr(), w_up.data_ptr(), kept.data_ptr<int64_t>(),
      out.data_ptr(), M, K, N, w_gate.size(0), num_sms(device), as_stream(stream));
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor gather_cols_linear_cuda(const at::Tensor& h, const at::Tensor& weight_t,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& cols,
                                   const std::optional<at::Tensor>& scales, int64_t stream) {
  const char* op = "gather_cols_linear_cuda";
  check_cuda_tensor(h, h, op, "h");
  TORCH_CHECK(h.dim() == 2, op, ": h must be 2-D (rows, kept features), got ", h.dim(), " dims");
  const gemv::DType dtype = to_dtype(h, op);
  check_cuda_tensor(weight_t, h, op, "weight_t");
  check_same_dtype(weight_t, h, op, "weight_t");
  TORCH_CHECK(weight_t.dim() == 2, op,
              ": weight_t must be 2-D (in_features, out_features), got ", weight_t.dim(), " dims");
  check_index(cols, h, op, "cols");
  TORCH_CHECK(cols.numel() == h.size(1), op, ": h has ", h.size(1), " columns but cols has ",
              cols.numel(), " entries");
  check_rows_exist(weight_t.size(0), cols.numel(), op, "cols");
  const int64_t M = h.size(0), J = h.size(1), N = weight_t.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cuda_tensor(*bias, h, op, "bias");
    check_same_dtype(*bias, h, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N,
                "), got ", bias->sizes());
  }
  const bool has_scales = scales.has_value() && scales->defined();
  if (has_scales) {
    check_cuda_tensor(*scales, h, op, "scales");
    check_same_dtype(*scales, h, op, "scales");
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == J, op, ": scales must have shape (", J,
                "), got ", scales->sizes());
  }

  at::Tensor out = at::empty({M, N}, h.options());
  if (M == 0 || N == 0) return out;

  const int device = h.get_device();
  DeviceGuard guard(device);
  const int sms = num_sms(device);
  const int64_t ws_elems =
      gemv::gather_cols_linear_workspace_elems(dtype, weight_t.data_ptr(), M, J, N, sms);
  // Allocated on the caching allocator's current stream of the device; the kernels run on
  // `stream` (normally that same current stream, as passed by the Python layer).
  at::Tensor workspace;
  float* ws_ptr = nullptr;
  if (ws_elems > 0) {
    workspace = at::empty({ws_elems}, h.options().dtype(at::kFloat));
    ws_ptr = workspace.data_ptr<float>();
  }
  const cudaError_t err = gemv::launch_gather_cols_linear(
      dtype, h.data_ptr(), weight_t.data_ptr(), has_bias ? bias->data_ptr() : nullptr,
      cols.data_ptr<int64_t>(), has_scales ? scales->data_ptr() : nullptr, out.data_ptr(), ws_ptr,
      ws_elems, M, J, N, weight_t.size(0), sms, as_stream(stream));
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// A SegmentedFfn of x's dtype, once x is checked (a 2-D CUDA tensor).
static gemv::SegmentedFfn segmented_input(const at::Tensor& x, const char* op) {
  check_cuda_tensor(x, x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, features), got ", x.dim(), " dims");
  gemv::SegmentedFfn ffn{};
  ffn.dtype = to_dtype(x, op);
  return ffn;
}

at::Tensor segmented_ffn_cuda(const at::Tensor& x, const at::Tensor& w_in,
                              const std::optional<at::Tensor>& b_in, const at::Tensor& w_out_t,
                              const std::optional<at::Tensor>& b_out, const at::Tensor& segments,
                              const at::Tensor& kept, const at::Tensor& kept_offsets,
                              const std::optional<at::Tensor>& scales, int64_t activation,
                              int64_t stream) {
  const char* op = "segmented_ffn_cuda";
  gemv::SegmentedFfn ffn = segmented_input(x, op);
  check_up_weight(w_in, x, op, "w_in");
  check_vector(b_in, x, w_in.size(0), op, "b_in");
  TORCH_CHECK(activation >= kIdentity && activation <= kRelu, op, ": unknown activation code ",
              activation, " (0 identity, 1 erf GELU, 2 tanh GELU, 3 ReLU)");
  ffn.w_up0 = w_in.data_ptr();
  ffn.b_up = data_or_null(b_in);
  ffn.activation = static_cast<int>(activation);
  return run_segmented(ffn, x, w_out_t, b_out, segments, kept, kept_offsets, scales,
                       w_in.size(0), stream, op);
}

at::Tensor segmented_swiglu_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                                     const at::Tensor& w_up, const at::Tensor& w_down_t,
                                     const at::Tensor& segments, const at::Tensor& kept,
                                     const at::Tensor& kept_offsets,
                                     const std::optional<at::Tensor>& scales, int64_t stream) {
  const char* op = "segmented_swiglu_ffn_cuda";
  gemv::SegmentedFfn ffn = segmented_input(x, op);
  check_up_weight(w_gate, x, op, "w_gate");
  check_up_weight(w_up, x, op, "w_up");
  TORCH_CHECK(w_gate.sizes() == w_up.sizes(), op, ": w_gate ", w_gate.sizes(), " and w_up ",
              w_up.sizes(), " must have the same shape");
  ffn.swiglu = true;
  ffn.w_up0 = w_gate.data_ptr();
  ffn.w_up1 = w_up.data_ptr();
  return run_segmented(ffn, x, w_down_t, std::nullopt, segments, kept, kept_offsets, scales,
                       w_gate.size(0), stream, op);
}

bool cuda_kernels_run_on(int64_t device) {
  DeviceGuard guard(static_cast<int>(device));
  return gemv::kernels_run_here() == cudaSuccess;
}

}  // namespace doe_kernels
