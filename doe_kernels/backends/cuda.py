"""The `cuda` backend: hand-written CUDA gather-GEMV kernels of doe_kernels._C (csrc/cuda).

Written for decoding (1 to 16 rows); correct for any row count but slow for many rows, so `auto`
only picks it for few rows.
"""
import torch

from doe_kernels._ext import has_cuda_kernels, extension
from doe_kernels.activations import ACTIVATION_CODES

NAME = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available(device_type: str) -> bool:
    return device_type == "cuda" and torch.cuda.is_available() and has_cuda_kernels()


def _stream(tensor):
    return torch.cuda.current_stream(tensor.device).cuda_stream


def gather_rows_linear(x, weight, bias, rows, activation):
    return extension().gather_rows_linear_cuda(
        x, weight, bias, rows, ACTIVATION_CODES[activation], _stream(x)
    )


def gather_swiglu(x, w_gate, w_up, kept):
    return extension().gather_swiglu_cuda(x, w_gate, w_up, kept, _stream(x))


def gather_cols_linear(h, weight_t, bias, cols, scales):
    return extension().gather_cols_linear_cuda(h, weight_t, bias, cols, scales, _stream(h))
