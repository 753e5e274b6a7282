"""Gather FFNs: BERT style (bias, GELU/ReLU) and LLaMA style (SwiGLU, no bias).

The down projection is read input-major ("neuron-major", as Deja Vu stores it): each kept neuron
is one contiguous row of `w_out_t = input_major(down.weight)`, so a call reads only kept bytes.
Optional `scales`, one per kept neuron (Kwon et al. 2022's "mask tuning"), multiply the hidden
activations before the down projection; without them nothing extra runs.
"""
import torch

from doe_kernels.activations import FFN_ACTIVATIONS, check_activation
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


def _check_neuron_major(name: str, weight: torch.Tensor, intermediate: int) -> None:
    check_float_tensor(name, weight, dims=2)
    check_features(name, weight, 0, intermediate, "the intermediate size (expected neuron-major "
                   "(intermediate, hidden): convert nn.Linear weights with input_major())")


def check_ffn_weights(x, w_in, b_in, w_out_t, b_out, activation: str) -> None:
    """A BERT FFN's weights, biases and activation, against x (checked as a float tensor)."""
    check_float_tensor("w_in", w_in, dims=2)
    check_same_dtype_device("x", x, w_in=w_in, b_in=b_in, w_out_t=w_out_t, b_out=b_out)
    check_features("x", x, -1, w_in.shape[1], "w_in's hidden size")
    _check_neuron_major("w_out_t", w_out_t, w_in.shape[0])
    check_bias("b_in", b_in, w_in.shape[0])
    check_bias("b_out", b_out, w_out_t.shape[1])
    check_activation(activation, FFN_ACTIVATIONS)


def check_swiglu_weights(x, w_gate, w_up, w_down_t) -> None:
    """A LLaMA FFN's weights against x (checked as a float tensor)."""
    check_float_tensor("w_gate", w_gate, dims=2)
    check_same_dtype_device("x", x, w_gate=w_gate, w_up=w_up, w_down_t=w_down_t)
    check_float_tensor("w_up", w_up, dims=2)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up has shape {tuple(w_up.shape)} but w_gate has {tuple(w_gate.shape)}")
    check_features("x", x, -1, w_gate.shape[1], "w_gate's hidden size")
    _check_neuron_major("w_down_t", w_down_t, w_gate.shape[0])


def gather_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor | None,
    kept: torch.Tensor,
    activation: str = "gelu",
    backend: str = "auto",
    *,
    check_indices: bool = True,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(act(x @ w_in[kept].T + b_in[kept]) * scales) @ w_out_t[kept] + b_out` (BERT FFN on kept
    neurons).

    x: (..., hidden); w_in: (intermediate, hidden), the up projection's nn.Linear weight; b_in:
    (intermediate,) or None; w_out_t: (intermediate, hidden), the down projection's weight
    input-major; b_out: (hidden,) or None; kept: sorted unique neuron indices, possibly empty
    (the result is then b_out, or zeros). activation: "gelu" (exact), "gelu_tanh" or "relu".
    scales: (len(kept),) with x's dtype and device, a factor per kept neuron, or None (no scaling).
    """
    check_float_tensor("x", x)
    check_backend_name(backend)
    check_ffn_weights(x, w_in, b_in, w_out_t, b_out, activation)
    kept = check_index("kept", kept, w_in.shape[0], w_in.device, check_indices)
    check_scales(scales, kept.numel(), "the number of kept neurons", "x", x)
    return library.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales)


def gather_swiglu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    kept: torch.Tensor,
    backend: str = "auto",
    *,
    check_indices: bool = True,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(silu(x @ w_gate[kept].T) * (x @ w_up[kept].T) * scales) @ w_down_t[kept]` (LLaMA MLP on
    kept neurons).

    w_gate, w_up: (intermediate, hidden), nn.Linear weights; w_down_t: (intermediate, hidden), the
    down projection's weight input-major; kept: sorted unique neuron indices, possibly empty.
    scales: (len(kept),) with x's dtype and device, a factor per kept neuron, or None (no scaling).
    """
    check_float_tensor("x", x)
    check_backend_name(backend)
    check_swiglu_weights(x, w_gate, w_up, w_down_t)
    kept = check_index("kept", kept, w_gate.shape[0], w_gate.device, check_indices)
    check_scales(scales, kept.numel(), "the number of kept neurons", "x", x)
    return library.gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend, scales)
