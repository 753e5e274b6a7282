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
   are read once, at the price of computing every row over the union (the decode regime). It
   takes the weights to be finite: a NaN or infinite weight in the down projection of a neuron
   some segment keeps reaches the rows of every segment (0 x inf is NaN), where "segments" keeps
   it to the rows of the segments keeping that neuron;
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
from doe_kernels.ops.checks import (check_float_tensor, check_index, check_scales,
                                    check_sorted_unique)
from doe_kernels.ops.ffn import check_ffn_weights, check_swiglu_weights
from doe_kernels.ops.library import check_strategy


def pack_segments(row_counts, kept_lists, scales=None, device=None):
    """(segments, kept, kept_offsets, scales) for segments of `row_counts` rows (non-negative
    whole numbers) keeping `kept_lists` (one index list per segment: 1-D, sorted unique,
    non-negative integers), with `scales` (one vector per segment, floating-point and finite, or
    None). Checked on the host, then moved to `device` (None: the device of the first tensor
    among the kept lists and the scales, else the CPU; the offsets stay on the CPU)."""
    if len(row_counts) != len(kept_lists) or (scales is not None and len(scales) != len(kept_lists)):
        raise ValueError(f"one kept list (and one scale vector) per segment: {len(row_counts)} "
                         f"segments, {len(kept_lists)} kept lists"
                         + ("" if scales is None else f", {len(scales)} scale vectors"))
    counts = [_row_count(i, n) for i, n in enumerate(row_counts)]
    lists = [_index_list(i, k) for i, k in enumerate(kept_lists)]
    vectors = None if scales is None else [
        _scale_vector(i, s, k.numel()) for i, (s, k) in enumerate(zip(scales, lists))]
    segments = _offsets(counts, device)
    kept_offsets = _offsets([k.numel() for k in lists], device)
    home = _home([*kept_lists, *(scales or [])], device)
    kept = (torch.cat(lists) if lists else torch.empty(0, dtype=torch.int64)).to(home)
    if vectors is None:
        return segments, kept, kept_offsets, None
    packed_scales = torch.cat(vectors) if vectors else torch.empty(0)
    return segments, kept, kept_offsets, packed_scales.to(home)


def _row_count(i: int, count) -> int:
    """row_counts[i] as an int: a non-negative whole number (not a bool, NaN or infinity)."""
    try:
        whole = not isinstance(count, (bool, str, bytes)) and bool(int(count) == count)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        whole = False
    if not whole or int(count) < 0:
        raise ValueError(f"row_counts[{i}] must be a non-negative whole number, got {count!r}")
    return int(count)


def _host_tensor(name: str, values, what: str) -> torch.Tensor:
    """`values` (a tensor, or a list of numbers) as a 1-D tensor on the CPU."""
    if isinstance(values, torch.Tensor):
        if values.is_meta:
            raise ValueError(f"{name} is on the meta device (it has no values)")
        tensor = values.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{name} must be a 1-D list of {what}, got "
                             f"{type(values).__name__} {values!r:.60} ({error})") from None
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor


def _index_list(i: int, kept) -> torch.Tensor:
    """kept_lists[i] as a 1-D int64 CPU tensor; ValueError for anything but sorted unique
    non-negative integers."""
    name = f"kept_lists[{i}]"
    tensor = _host_tensor(name, kept, "integer indices")
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex()
                           or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer indices, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.int64)
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} holds index {int(tensor.min())}: indices must be >= 0")
    check_sorted_unique(name, tensor)
    return tensor


def _scale_vector(i: int, scales, size: int) -> torch.Tensor:
    """scales[i] as a 1-D floating CPU tensor of `size` finite values."""
    name = f"scales[{i}]"
    tensor = _host_tensor(name, scales, "floating-point scales")
    if tensor.numel() != size:
        raise ValueError(f"{name} must hold one value per kept index of segment {i} ({size}), "
                         f"got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must hold floating-point scales, got dtype {tensor.dtype}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        position = int((~finite).nonzero()[0])
        raise ValueError(f"{name} must be finite, got {float(tensor[position])} at position "
                         f"{position}")
    return tensor


def _home(items, device):
    """`device`, or (None) that of the first tensor among `items`, else the CPU."""
    if device is not None:
        return device
    return next((t.device for t in items if isinstance(t, torch.Tensor)), torch.device("cpu"))


def _offsets(counts: list, device) -> torch.Tensor:
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
