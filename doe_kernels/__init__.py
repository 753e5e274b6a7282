"""doe-kernels: gather-based sparse FFN and pruned-head attention for task-expert inference.

The ops take index lists of kept neurons and heads directly (no copies of sliced weights) and run
on one of four backends: `torch` (reference), `cpu` (C++), `triton` and `cuda` (GPU).
"""
from doe_kernels.backends import BackendUnavailableError, available_backends
from doe_kernels.ops import (
    HeadSelection,
    gather_cols_linear,
    gather_ffn,
    gather_rows_linear,
    gather_swiglu_ffn,
    input_major,
    pruned_head_attention,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "HeadSelection",
    "available_backends",
    "gather_cols_linear",
    "gather_ffn",
    "gather_rows_linear",
    "gather_swiglu_ffn",
    "input_major",
    "pruned_head_attention",
]
