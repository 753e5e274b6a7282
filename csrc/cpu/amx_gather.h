// bfloat16 gather + GEMM on Intel AMX (amx_gather_cpu.cpp), for the gather + GEMM regime of
// gather_linear_cpu.cpp. Each returns the float32 product, or nullopt where the AMX path does
// not apply (another dtype, no AMX or no permission from the OS, DOE_KERNELS_CPU_AMX=0 or
// DOE_KERNELS_CPU_ISA below avx512, or a shape it does not take); callers then copy the kept
// rows and call ATen's GEMM.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace doe_kernels {

// Whether this CPU has AMX-BF16 (CPUID leaf 7, EDX bit 22) and the OS enables its tile state
// (XCR0 bits 17 and 18), as oneDNN needs to run its AMX kernels.
bool has_amx_bf16();

// Whether the AMX gather path runs here (has_amx_bf16, AVX-512 with BF16, the environment, the
// OS's permission).
bool amx_gather_available();

// How many products the AMX path has computed in this process (for tests).
int64_t amx_gather_calls();

// Whether the AMX path runs a bfloat16 projection of `rows` rows of x whose tiles span `width`
// features: x's (gather_rows, gather_swiglu) or the output's (gather_cols), a multiple of 32.
bool amx_gather_takes(at::ScalarType dtype, int64_t rows, int64_t width);

// x (M, K) @ weight[rows].T -> (M, rows.numel()) float32; K a multiple of 32.
std::optional<at::Tensor> amx_gather_rows_mm(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& rows);

// (h * scales) @ weight_t[cols] -> (M, weight_t.size(1)) float32, the scales applied to the
// kept rows rounded to bfloat16 (as the copy regime does); weight_t.size(1) a multiple of 32.
std::optional<at::Tensor> amx_gather_cols_mm(const at::Tensor& h, const at::Tensor& weight_t,
                                             const at::Tensor& cols,
                                             const std::optional<at::Tensor>& scales);

}  // namespace doe_kernels
