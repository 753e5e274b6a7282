// The Python module doe_kernels._C: binds the CPU kernels always and the CUDA kernels when the
// extension was built with them (has_cuda() tells which). The kernels run without the GIL.
#include "doe_kernels.h"
#include "cpu/amx_gather.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object once their arguments are converted: other Python threads
  // (a server batching requests while a forward runs) go on meanwhile.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.doc() = "doe-kernels compiled kernels (gathered linear primitives)";
  m.def("gather_rows_linear_cpu", &doe_kernels::gather_rows_linear_cpu, nogil);
  m.def("gather_swiglu_cpu", &doe_kernels::gather_swiglu_cpu, nogil);
  m.def("gather_cols_linear_cpu", &doe_kernels::gather_cols_linear_cpu, nogil);
  m.def("segmented_ffn_cpu", &doe_kernels::segmented_ffn_cpu, nogil);
  m.def("segmented_swiglu_ffn_cpu", &doe_kernels::segmented_swiglu_ffn_cpu, nogil);
  m.def("union_plan_cpu", &doe_kernels::union_plan_cpu, nogil);
  m.attr("SEGMENT_STRATEGIES") = pybind11::make_tuple("auto", "segments", "union");
  m.def("set_cpu_gather_above", &doe_kernels::set_cpu_gather_above);
  m.def("cpu_gather_above", &doe_kernels::cpu_gather_above);
  m.def("cpu_runs_fused_dense", &doe_kernels::cpu_runs_fused_dense);
  m.def("cpu_amx_gather_available", &doe_kernels::amx_gather_available);
  m.def("cpu_amx_gather_calls", &doe_kernels::amx_gather_calls);
  m.def("cpu_segment_costs", &doe_kernels::cpu_segment_costs);
  m.def("cpu_uses_gather_gemm", &doe_kernels::cpu_uses_gather_gemm);
#ifdef DOE_KERNELS_WITH_CUDA
  m.def("gather_rows_linear_cuda", &doe_kernels::gather_rows_linear_cuda, nogil);
  m.def("gather_swiglu_cuda", &doe_kernels::gather_swiglu_cuda, nogil);
  m.def("gather_cols_linear_cuda", &doe_kernels::gather_cols_linear_cuda, nogil);
  m.def("segmented_ffn_cuda", &doe_kernels::segmented_ffn_cuda, nogil);
  m.def("segmented_swiglu_ffn_cuda", &doe_kernels::segmented_swiglu_ffn_cuda, nogil);
  m.def("cuda_kernels_run_on", &doe_kernels::cuda_kernels_run_on);
  m.def("has_cuda", []() { return true; });
#else
  m.def("has_cuda", []() { return false; });
#endif
}
