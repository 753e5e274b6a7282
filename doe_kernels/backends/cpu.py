"""The `cpu` backend: C++ kernels of doe_kernels._C (csrc/cpu) that gather inside the kernel."""
import torch

from doe_kernels._ext import extension
from doe_kernels.activations import ACTIVATION_CODES

NAME = "cpu"
DTYPES = (torch.float32, torch.bfloat16)


def available(device_type: str) -> bool:
    return device_type == "cpu" and extension() is not None


def gather_rows_linear(x, weight, bias, rows, activation):
    return extension().gather_rows_linear_cpu(x, weight, bias, rows, ACTIVATION_CODES[activation])


def gather_swiglu(x, w_gate, w_up, kept):
    return extension().gather_swiglu_cpu(x, w_gate, w_up, kept)


def gather_cols_linear(h, weight_t, bias, cols, scales):
    return extension().gather_cols_linear_cpu(h, weight_t, bias, cols, scales)


def set_gather_above(rows: int | None) -> None:
    """Above how many input rows every op of this backend copies the kept weights and calls ATen's
    GEMM (MKL, oneDNN) instead of its fused kernels; None restores the default rule, which chooses
    per op by dtype, CPU vendor and the bytes to copy (see csrc/cpu/gather_linear_cpu.cpp). The
    environment variable DOE_KERNELS_CPU_GATHER_ABOVE sets the same at start-up. Both regimes give
    the same results up to float rounding; this is for measuring and testing them."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise ValueError(f"rows must be a non-negative int or None, got {rows!r}")
    extension().set_cpu_gather_above(-1 if rows is None else rows)
