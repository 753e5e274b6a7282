"""Gathered linear layers: output rows gathered, and input columns gathered.

Weights come in nn.Linear's layout (out_features, in_features) as loaded, except for the
column-gathered op, which reads the weight input-major: `input_major(linear.weight)` converts once
(a transpose made contiguous); a patched module keeps only that copy, so it costs no extra memory.
The column-gathered op takes optional per-column `scales` (one per kept input feature, Kwon et al.
2022's "mask tuning") that multiply the kept inputs; without them nothing extra runs. The public
ops take `check_indices` and `scales` by keyword only (a tensor passed by position in their place
was once read as the flag).
"""
import torch
import torch.nn.functional as F

from doe_kernels.activations import check_activation
from doe_kernels.backends import check_backend_name
from doe_kernels.ops import library
from doe_kernels.ops.checks import (
    check_bias,
    check_features,
    check_float_tensor,
    check_index,
    check_same_dtype_device,
    check_scales,
)

def input_major(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight (out, in) -> input-major (in, out), contiguous: each input feature a row.
    A stack of weights (..., out, in) gives (..., in, out)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must be at least 2-D, (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    return weight.transpose(-2, -1).contiguous()


def input_major_view(weight: torch.Tensor) -> torch.Tensor:
    """A weight whose data was laid out input-major in place (a patched model's output and down
    projections) as the gather ops read it: (..., in, out), contiguous, and a view of the
    Parameter, so that gradients reach it."""
    return weight.transpose(-2, -1)


def scale_columns(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """`x * scales` (one factor per feature of x, as the column-gathered op applies `scales`
    to its kept inputs), or `x` itself when there are none: the dense path of a patched layer
    that keeps every input."""
    if scales is None:
        return x
    if scales.dim() != 1 or scales.numel() != x.shape[-1]:
        raise ValueError(f"scales has shape {tuple(scales.shape)}, but x has {x.shape[-1]} "
                         "features (one scale per feature)")
    return x * scales


def dense_cols_linear(x: torch.Tensor, weight_t: torch.Tensor, bias, scales=None):
    """`scale_columns(x, scales) @ weight_t + bias` over every input (weight_t input-major), as
    the layer's own F.linear computes it: under torch.autocast in autocast's dtype, the bias cast
    with the rest (a float32 bias added to the product would make the output float32)."""
    return F.linear(scale_columns(x, scales), weight_t.T, bias)


def gather_rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    activation: str = "identity",
    backend: str = "auto",
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """`act(x @ weight[rows].T + bias[rows])` without copying the kept rows.

    x: (..., in_features); weight: (out_features, in_features), nn.Linear layout; bias:
    (out_features,) or None; rows: 1-D sorted unique int32/int64 indices into out_features.
    Returns (..., len(rows)).
    """
    check_float_tensor("x", x)
    check_backend_name(backend)
    check_float_tensor("weight", weight, dims=2)
    check_same_dtype_device("x", x, weight=weight, bias=bias)
    check_features("x", x, -1, weight.shape[1], "weight's in_features")
    check_bias("bias", bias, weight.shape[0])
    check_activation(activation)
    rows = check_index("rows", rows, weight.shape[0], weight.device, check_indices)
    return library.gather_rows_linear(x, weight, bias, rows, activation, backend)


def gather_cols_linear(
    x_kept: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    cols: torch.Tensor,
    backend: str = "auto",
    *,
    check_indices: bool = True,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(x_kept * scales) @ W[:, cols].T + bias`, reading the weight input-major:
    `weight_t = input_major(W)`.

    x_kept: (..., len(cols)), the kept input features; weight_t: (in_features, out_features);
    bias: (out_features,) or None; cols: 1-D sorted unique indices into in_features; scales:
    (len(cols),) with x_kept's dtype and device, a factor per kept column, or None (no scaling).
    Returns (..., out_features).
    """
    check_float_tensor("x_kept", x_kept)
    check_backend_name(backend)
    check_float_tensor("weight_t", weight_t, dims=2)
    check_same_dtype_device("x_kept", x_kept, weight_t=weight_t, bias=bias)
    check_bias("bias", bias, weight_t.shape[1])
    cols = check_index("cols", cols, weight_t.shape[0], weight_t.device, check_indices)
    check_features("x_kept", x_kept, -1, cols.numel(), "the number of kept columns")
    check_scales(scales, cols.numel(), "the number of kept columns", "x_kept", x_kept)
    return library.gather_cols_linear(x_kept, weight_t, bias, cols, backend, scales)
