"""The `cpu` backend: C++ kernels of doe_kernels._C (csrc/cpu) that gather inside the kernel."""
import torch

from doe_kernels._ext import extension
from doe_kernels.activations import ACTIVATION_CODES

NAME = "cpu"
DTYPES = (torch.float32, torch.bfloat16)


def available(device_type: str, index: int | None = None) -> bool:
    return device_type == "cpu" and extension() is not None


def gather_rows_linear(x, weight, bias, rows, activation):
    return extension().gather_rows_linear_cpu(x, weight, bias, rows, ACTIVATION_CODES[activation])


def gather_swiglu(x, w_gate, w_up, kept):
    return extension().gather_swiglu_cpu(x, w_gate, w_up, kept)


def gather_cols_linear(h, weight_t, bias, cols, scales):
    return extension().gather_cols_linear_cpu(h, weight_t, bias, cols, scales)


def segmented_ffn_with_union(x, up, w_out_t, b_out, segments, kept, kept_offsets, scales,
                             strategy: str):
    """A whole segmented FFN in one C++ call (the library's hook for a backend that chooses the
    strategy itself): the union of the lists, gathered once and masked per row, where `strategy`
    takes it (auto: where the union costs less under the extension's cost model, which weighs
    each call in the regime it runs: csrc/cpu, RegimeCosts), else every segment in parallel over
    segments x tiles. `up`: ("rows", w_in,
    b_in, activation) or ("swiglu", w_gate, w_up); the layout as the segmented ops take it."""
    ext = extension()
    code = ext.SEGMENT_STRATEGIES.index(strategy)
    if up[0] == "rows":
        _, w_in, b_in, activation = up
        return ext.segmented_ffn_cpu(x, w_in, b_in, w_out_t, b_out, segments, kept, kept_offsets,
                                     scales, ACTIVATION_CODES[activation], code)
    _, w_gate, w_up = up
    return ext.segmented_swiglu_ffn_cpu(x, w_gate, w_up, w_out_t, segments, kept, kept_offsets,
                                        scales, code)


def has_union_plan() -> bool:
    """Whether the loaded extension plans unions and chooses the segment strategy itself (one
    built before that does not: the library then plans with torch ops and runs the segments one
    call each)."""
    return hasattr(extension(), "SEGMENT_STRATEGIES")


@torch.compiler.disable  # a plan for the layout (data-dependent; torch.compile breaks the
# graph here, as it would at the extension's call, without warning of a builtin it cannot trace)
def union_plan(x, segments, kept, kept_offsets, scales, neurons: int, up_matrices: int,
               strategy: str):
    """(union, row_mask) of a segmented FFN's layout (over an FFN of `neurons` neurons from x's
    width back to it, `up_matrices` 1 for w_in or 2 for SwiGLU's w_gate and w_up) in one C++
    call, where `strategy` takes the union (as segmented_ffn_with_union decides it); else an
    empty union and a (rows, 0) row_mask."""
    ext = extension()
    return ext.union_plan_cpu(x, segments, kept, kept_offsets, scales, neurons, up_matrices,
                              ext.SEGMENT_STRATEGIES.index(strategy))


def runs_fused_dense(dtype: torch.dtype, rows: int) -> bool:
    """Whether a call keeping every row of its weight, with `rows` input rows in `dtype`, should
    run this backend's own kernel rather than ATen's GEMM on the whole weight (the extension's
    rule: at most 8 rows, where the kernels read weights streaming from memory faster than MKL's
    and oneDNN's GEMMs, in float32 and bfloat16; float32 on AMD CPUs with AVX-512 at every row
    count, where the kernels beat MKL's AVX2 code; bfloat16 at every row count on CPUs without
    AVX-512, where ATen's bfloat16 GEMM is slow; or as set_gather_above forces); False
    for a dtype it does not take, or with an extension built before this query."""
    query = getattr(extension(), "cpu_runs_fused_dense", None)
    return query is not None and dtype in DTYPES and query(dtype == torch.float32, rows)


def set_gather_above(rows: int | None) -> None:
    """Above how many input rows every op of this backend copies the kept weights and calls ATen's
    GEMM (MKL, oneDNN) instead of its fused kernels; None restores the default rule, which chooses
    per op by dtype, CPU vendor and the bytes to copy (see csrc/cpu/gather_linear_cpu.cpp). The
    environment variable DOE_KERNELS_CPU_GATHER_ABOVE sets the same at start-up. Both regimes give
    the same results up to float rounding; this is for measuring and testing them."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise ValueError(f"rows must be a non-negative int or None, got {rows!r}")
    extension().set_cpu_gather_above(-1 if rows is None else rows)
