"""The doe_kernels ops: gathered linear layers, gather FFNs (single-expert and segmented) and
pruned-head attention."""
from doe_kernels.ops.attention import (
    HeadSelection,
    attend,
    project_out,
    project_qkv,
    pruned_head_attention,
)
from doe_kernels.ops.ffn import gather_ffn, gather_swiglu_ffn
from doe_kernels.ops.segmented import (
    pack_segments,
    segmented_gather_ffn,
    segmented_gather_swiglu_ffn,
)
from doe_kernels.ops.linear import (
    gather_cols_linear,
    gather_rows_linear,
    input_major,
    scale_columns,
)

__all__ = [
    "HeadSelection",
    "attend",
    "gather_cols_linear",
    "gather_ffn",
    "gather_rows_linear",
    "gather_swiglu_ffn",
    "input_major",
    "pack_segments",
    "project_out",
    "project_qkv",
    "pruned_head_attention",
    "scale_columns",
    "segmented_gather_ffn",
    "segmented_gather_swiglu_ffn",
]
