// Torch bindings of the gather-GEMV CUDA kernels: the *_cuda entry points of doe_kernels.h.
//
// No ATen/cuda or c10/cuda headers (the toolkit used to build may lack cuBLAS headers): the stream
// comes from Python as an int64 (torch.cuda.current_stream(device).cuda_stream), the device guard is
// a cudaGetDevice/cudaSetDevice pair, and launch errors come from cudaGetLastError.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <optional>
#include <string>

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
void check_index(const at::Tensor& idx, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda_tensor(idx, ref, op, name);
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, op, ": ", name, " must be 1-D, got ", idx.dim(), " dims");
  TORCH_CHECK(idx.numel() > 0, op, ": ", name, " must be non-empty");
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

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

}  // namespace doe_kernels
