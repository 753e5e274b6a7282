"""The activations the ops fuse: one table of names, the codes the compiled kernels take, the
HuggingFace `hidden_act` names they stand for, and the plain-PyTorch definition of each.

The codes mirror `enum Activation` in csrc/doe_kernels.h (a test checks they agree); the Triton
kernels take the same codes as a constexpr argument.
"""
import torch
import torch.nn.functional as F

# name -> (code in the compiled kernels, plain-PyTorch definition)
_TABLE = {
    "identity": (0, lambda out: out),
    "gelu": (1, F.gelu),
    "gelu_tanh": (2, lambda out: F.gelu(out, approximate="tanh")),
    "relu": (3, F.relu),
}
ACTIVATIONS = tuple(_TABLE)  # every op that takes an activation
FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # the BERT-style FFN (identity is no FFN)
ACTIVATION_CODES = {name: code for name, (code, _) in _TABLE.items()}

# HuggingFace `hidden_act` names -> the activation computing them
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def check_activation(activation: str, allowed=ACTIVATIONS) -> None:
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")


def apply_activation(out: torch.Tensor, activation: str) -> torch.Tensor:
    """`activation` applied to `out` in plain PyTorch (the reference the kernels match)."""
    check_activation(activation)
    return _TABLE[activation][1](out)
