"""The plain-PyTorch backend: index_select, then a dense matmul.

It is the reference every other backend is tested against and the fallback on any device. It copies
the kept weights on every call, so it is correct everywhere but not the fast path.
"""
import torch
import torch.nn.functional as F

from doe_kernels.activations import apply_activation

NAME = "torch"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

def available(device_type: str, index: int | None = None) -> bool:
    return device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available())


def gather_rows_linear(x, weight, bias, rows, activation):
    kept_bias = None if bias is None else bias.index_select(0, rows)
    return apply_activation(F.linear(x, weight.index_select(0, rows), kept_bias), activation)


def gather_swiglu(x, w_gate, w_up, kept):
    gate = F.linear(x, w_gate.index_select(0, kept))
    up = F.linear(x, w_up.index_select(0, kept))
    return F.silu(gate) * up


def gather_cols_linear(h, weight_t, bias, cols, scales):
    if scales is not None:
        h = h * scales
    kept = weight_t.index_select(0, cols)
    # with a bias: added inside the GEMM (one rounding), as F.linear does; a product rounded to
    # bfloat16 before the bias is added differs from the layer's own F.linear by a unit
    return h @ kept if bias is None else torch.addmm(bias, h, kept)
