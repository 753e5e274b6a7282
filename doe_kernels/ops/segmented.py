"""Segmented gather FFNs: one call serves rows of several experts, each segment of rows with its own
kept neurons (mixed-task batches).

The layout is vLLM's multi-LoRA one: the rows of x are grouped into contiguous segments, segment s
being rows [segments[s], segments[s + 1]); the kept-neuron lists are concatenated in `kept`, segment
s's list being kept[kept_offsets[s]:kept_offsets[s + 1]] (sorted unique; empty for a segment that
keeps nothing, whose rows get the output bias or zeros); `scales`, when given, is concatenated the
same way as `kept`. `pack_segments` builds these from Python lists.

Two ways to compute it, `strategy`:
 * "segments": each segment on its own kept neurons, through the chosen backend's kernels (each
   reads its own kept rows);
 * "union": the union of the segments' lists gathered once for every row, each row's hidden
   activations multiplied by its segment's 0/1 (or scale) mask over the union: the shared rows
   are read once, at the price of computing every row over the union (the decode regime);
 * "auto" (default): on the CPU, where the extension plans the call (float32,
   bfloat16), the union where its cost model says it costs less, each call weighed in the regime
   it runs (library's note; weakly pruned experts, whose union holds every neuron, take it at
   many rows too); where torch builds the plan (float16, or no extension), the union at most
   library.UNION_MAX_ROWS rows per segment on average (one: decoding), for FFNs whose union holds
   library.UNION_MIN_BYTES_CPU of weights or more (below, the weights stay in cache and the plan,
   built with torch ops each call, costs more than it saves). On a GPU an op call takes the
   segments (see library.UNION_MAX_ROWS's note).
The segment and list boundaries are read on the host: `segments` and `kept_offsets` may be CPU
tensors whatever the weights' device (on a GPU that spares each call a device-to-host copy, which
waits for the GPU; a patched model and a vLLM worker keep them so). "segments": the triton backend runs every
segment in one launch per projection (a grid axis over segments, programs past their segment's
tiles storing nothing); the cuda backend too (its gather-GEMV tiles, blocks over segments x tiles x
chunks of 16 rows, blocks past their segment's work returning at once; built for decoding, a few
rows per segment); the cpu backend in one C++ call, in parallel over segments x tiles (segments
with rows enough for its gather + GEMM regime one after another, each on every thread); the torch
backend runs one single-expert call per segment. The cuda backend's segmented kernels are compiled
everywhere but tested for correctness only where a GPU runs the tests; an extension built before
them runs one single-expert call per segment there too.
"""
import torch

from doe_kernels.ops import library
from doe_kernels.backends import check_backend_name
from doe_kernels.ops.checks import check_float_tensor, check_index, check_scales
from doe_kernels.ops.ffn import check_ffn_weights, check_swiglu_weights
from doe_kernels.ops.library import check_strategy


def pack_segments(row_counts, kept_lists, scales=None, device=None):
    """(segments, kept, kept_offsets, scales) for segments of `row_counts` rows keeping
    `kept_lists` (one index list per segment; each sorted unique), with `scales` (one vector per
    segment, or None)."""
    if len(row_counts) != len(kept_lists) or (scales is not None and len(scales) != len(kept_lists)):
        raise ValueError(f"one kept list (and one scale vector) per segment: {len(row_counts)} "
                         f"segments, {len(kept_lists)} kept lists"
                         + ("" if scales is None else f", {len(scales)} scale vectors"))
    lists = [_index_list(i, k, device) for i, k in enumerate(kept_lists)]
    bad = [n for n in row_counts if isinstance(n, bool) or int(n) != n]
    if bad:
        raise ValueError(f"row counts must be whole numbers, got {bad[0]!r}")
    segments = _offsets([int(n) for n in row_counts], device)
    kept_offsets = _offsets([k.numel() for k in lists], device)
    kept = torch.cat(lists) if lists else torch.empty(0, dtype=torch.int64, device=device)
    packed_scales = None
    if scales is not None:
        vectors = [torch.as_tensor(s, device=device) for s in scales]
        for i, (vector, kept_list) in enumerate(zip(vectors, lists)):
            if vector.dim() != 1 or vector.numel() != kept_list.numel():
                raise ValueError(f"scales[{i}] must hold one value per kept index of segment "
                                 f"{i} ({kept_list.numel()}), got shape {tuple(vector.shape)}")
        packed_scales = torch.cat(vectors) if vectors else torch.empty(0, device=device)
    return segments, kept, kept_offsets, packed_scales


def _index_list(i: int, kept, device) -> torch.Tensor:
    """Segment i's kept list as a 1-D int64 tensor; ValueError for anything but integers."""
    tensor = torch.as_tensor(kept, device=device)
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex()
                           or tensor.dtype == torch.bool):
        raise ValueError(f"kept_lists[{i}] must hold integer indices, got dtype {tensor.dtype}")
    if tensor.dim() > 1:
        raise ValueError(f"kept_lists[{i}] must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.int64).reshape(-1)


def _offsets(counts: list, device) -> torch.Tensor:
    if any(c < 0 for c in counts):
        raise ValueError(f"row counts must be >= 0, got {counts}")
    return torch.tensor([0] + counts, dtype=torch.int64, device=device).cumsum(0)


def check_segments(rows: int, intermediate: int, segments, kept, kept_offsets, device,
                   check_indices: bool = True):
    """Validate the segment layout (module docstring); returns (segments, kept, kept_offsets) as
    contiguous int64."""
    kept = check_index("kept", kept, intermediate, device, check_values=False)
    segments = _as_offsets("segments", segments, rows, device, check_indices)
    kept_offsets = _as_offsets("kept_offsets", kept_offsets, kept.numel(), device, check_indices)
    if segments.numel() != kept_offsets.numel():
        raise ValueError(f"segments has {segments.numel() - 1} segments but kept_offsets has "
                         f"{kept_offsets.numel() - 1} kept lists")
    if check_indices:
        bounds = kept_offsets.tolist()
        for s in range(len(bounds) - 1):
            check_index(f"kept list of segment {s}", kept[bounds[s]:bounds[s + 1]], intermediate,
                        device)
    return segments, kept, kept_offsets


def _as_offsets(name: str, offsets, total: int, device, check_values: bool) -> torch.Tensor:
    """`offsets` (1-D int, on `device` or the CPU) as contiguous int64; with `check_values`, from
    0 to `total`, non-decreasing."""
    on_host = isinstance(offsets, torch.Tensor) and offsets.device.type == "cpu"
    offsets = check_index(name, offsets, total + 1, offsets.device if on_host else device,
                          check_values=False)
    if offsets.numel() == 0:
        raise ValueError(f"{name} must hold at least one offset (0), got none")
    if check_values:
        library.check_offset_values(name, offsets.tolist(), total)
    return offsets


def segmented_gather_ffn(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
    b_out: torch.Tensor | None, segments: torch.Tensor, kept: torch.Tensor,
    kept_offsets: torch.Tensor, activation: str = "gelu", backend: str = "auto",
    *, check_indices: bool = True, scales: torch.Tensor | None = None, strategy: str = "auto",
) -> torch.Tensor:
    """`gather_ffn` (BERT FFN) with each segment of rows on its own kept neurons (module
    docstring). x: (rows, hidden); weights as for gather_ffn; scales: (len(kept),) or None."""
    check_strategy(strategy)
    check_float_tensor("x", x, dims=2)
    check_backend_name(backend)
    check_ffn_weights(x, w_in, b_in, w_out_t, b_out, activation)
    segments, kept, kept_offsets = check_segments(x.shape[0], w_in.shape[0], segments, kept,
                                                  kept_offsets, w_in.device, check_indices)
    check_scales(scales, kept.numel(), "the number of kept neurons", "x", x)
    return library.segmented_gather_ffn(x, w_in, b_in, w_out_t, b_out, segments, kept,
                                        kept_offsets, activation, backend, scales, strategy)


def segmented_gather_swiglu_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
    segments: torch.Tensor, kept: torch.Tensor, kept_offsets: torch.Tensor,
    backend: str = "auto", *, check_indices: bool = True, scales: torch.Tensor | None = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """`gather_swiglu_ffn` (LLaMA FFN) with each segment of rows on its own kept neurons (module
    docstring). x: (rows, hidden); weights as for gather_swiglu_ffn."""
    check_strategy(strategy)
    check_float_tensor("x", x, dims=2)
    check_backend_name(backend)
    check_swiglu_weights(x, w_gate, w_up, w_down_t)
    segments, kept, kept_offsets = check_segments(x.shape[0], w_gate.shape[0], segments, kept,
                                                  kept_offsets, w_gate.device, check_indices)
    check_scales(scales, kept.numel(), "the number of kept neurons", "x", x)
    return library.segmented_gather_swiglu_ffn(x, w_gate, w_up, w_down_t, segments, kept,
                                               kept_offsets, backend, scales, strategy)
