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
