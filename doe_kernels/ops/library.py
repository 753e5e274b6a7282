"""The torch.library definitions of the doe_kernels ops: schema, fake implementation, device kernels.

Each op takes x with any leading shape, runs on the backend named by its `backend` argument (a
concrete name or "auto", resolved per call by `doe_kernels.backends.resolve`), and returns a fresh
tensor. Empty index lists and empty inputs are answered here, so backends never see them. The ops
with a column-gathered step take `scales` last (None: no scaling, and nothing extra runs), one per
kept column or neuron, which that step applies to its input. The public wrappers in linear.py and
ffn.py check the arguments first; call those, not these, from user code. The patched modules,
whose indices were checked once when the mask was plugged, call these directly; eager calls then
skip the dispatcher too (`_direct`). The single-expert ops' gradients are registered by
doe_kernels/ops/autograd.py (imported at the end of this module); the segmented ops have none.
"""
import functools
import sys

import torch
import torch.nn.functional as F

from doe_kernels import backends
from doe_kernels.activations import apply_activation
from doe_kernels.backends.device import capturing

LIB = "doe_kernels"
DEVICES = ("cpu", "cuda")


def _register(name: str, implementation):
    """`implementation` registered as the custom op doe_kernels::<name> (schema from its
    annotations)."""
    return torch.library.custom_op(f"{LIB}::{name}", mutates_args=(), device_types=DEVICES)(
        implementation)


def _direct(*tensors) -> bool:
    """Whether a call may run its implementation directly, skipping torch.library's dispatcher
    (about 10 us a call, which decoding pays 150 times a token on a small LLaMA): eager plain CPU or
    CUDA tensors, no gradient asked for, nothing compiling, tracing or transforming the call (and,
    checked by the callers first, nothing for torch.autocast to cast: `_autocast`).
    Otherwise the call goes through the registered op, which torch.compile, export and FakeTensor
    understand."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _functorch_active():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or not (t.is_cpu or t.is_cuda) or (grad and t.requires_grad):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


@functools.lru_cache(maxsize=64)
def every_index(total: int, device: torch.device) -> torch.Tensor:
    """0..total-1 on `device`, made once: the full list of a keep-all call through the kernels
    (every keep-all layer of a forward pass asks; the kernels only read it). Asked for CPU calls
    only (`dense_in_kernel`), never inside a CUDA graph's capture, where it would only be
    recorded."""
    return torch.arange(total, device=device)


def dense_in_kernel(x, backend: str, *tensors) -> bool:
    """Whether a call keeping every output (every neuron or head) should run the backend's kernel
    over the full index list rather than torch's dense GEMM: an eager call that needs no gradient
    nor autocast's casts (`_direct`, `_autocast`, over x and `tensors`), resolving to the `cpu`
    backend where that backend runs its own kernel for it, not ATen's GEMM (at a few rows; at
    any, float32 on AMD CPUs with AVX-512, where the kernels outrun MKL's sgemm, and bfloat16 on
    CPUs without AVX-512; backends/cpu.runs_fused_dense). The index lists cost nothing
    next to the GEMM."""
    if x.device.type != "cpu" or _autocast(x, *tensors) or not _direct(x, *tensors):
        return False
    rows = x.shape[:-1].numel()
    return (backends.resolve(backend, x.device, x.dtype, rows) == "cpu"
            and backends.get("cpu").runs_fused_dense(x.dtype, rows))


def _run(x, backend: str):
    """The backend module for this call, and x as a contiguous 2-D tensor."""
    name = backends.resolve(backend, x.device, x.dtype, x.shape[:-1].numel())
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return backends.get(name), x.contiguous()


def _contiguous(*tensors):
    """The tensors contiguous, index lists as int64 (the registered ops take int32 ones too; the
    public functions convert them first)."""
    return [None if t is None else
            (t.to(torch.int64) if t.dtype == torch.int32 else t).contiguous() for t in tensors]


def _zeros_plus_bias(x, out_features: int, bias):
    out = x.new_zeros(*x.shape[:-1], out_features)
    return out if bias is None else out + bias


def _gather_rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
    activation: str, backend: str,
) -> torch.Tensor:
    if rows.numel() == 0 or x.shape[:-1].numel() == 0:
        return x.new_zeros(*x.shape[:-1], rows.numel())
    module, x2d = _run(x, backend)
    weight, bias, rows = _contiguous(weight, bias, rows)
    out = module.gather_rows_linear(x2d, weight, bias, rows, activation)
    return out.reshape(*x.shape[:-1], rows.numel())


_gather_rows_linear_op = _register("gather_rows_linear", _gather_rows_linear)


@_gather_rows_linear_op.register_fake
def _(x, weight, bias, rows, activation, backend):
    return x.new_empty(*x.shape[:-1], rows.shape[0])


def _gather_cols_linear(
    h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor,
    backend: str, scales: torch.Tensor | None = None,
) -> torch.Tensor:
    if cols.numel() == 0 or h.shape[:-1].numel() == 0:
        return _zeros_plus_bias(h, weight_t.shape[1], bias)
    module, h2d = _run(h, backend)
    weight_t, bias, scales, cols = _contiguous(weight_t, bias, scales, cols)
    out = module.gather_cols_linear(h2d, weight_t, bias, cols, scales)
    return out.reshape(*h.shape[:-1], weight_t.shape[1])


_gather_cols_linear_op = _register("gather_cols_linear", _gather_cols_linear)


@_gather_cols_linear_op.register_fake
def _(h, weight_t, bias, cols, backend, scales=None):
    return h.new_empty(*h.shape[:-1], weight_t.shape[1])


def _in_order(scales: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The scales of a full kept list (one per entry of `kept`) in neuron order (zeros where an
    unchecked list repeats a neuron and so misses another: no memory left unwritten is read; an
    unchecked value out of range is clamped into it, so that no device fails an assertion)."""
    return torch.zeros_like(scales).scatter_(0, kept.clamp(0, scales.numel() - 1), scales)


def _gather_ffn(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
    b_out: torch.Tensor | None, kept: torch.Tensor, activation: str, backend: str,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    if kept.numel() == 0:
        return _zeros_plus_bias(x, w_out_t.shape[1], b_out)
    if kept.numel() == w_in.shape[0] and (x.shape[:-1].numel() == 0 or not dense_in_kernel(
            x, backend, w_in, b_in, w_out_t, b_out, scales)):
        # every neuron (unique), in any order: the dense FFN (unless the kernels beat it; with no
        # rows too, so that autograd records it)
        hidden = apply_activation(F.linear(x, w_in, b_in), activation)
        # (the bias added inside the GEMM, one rounding, as the layer's own F.linear does)
        return F.linear(hidden if scales is None else hidden * _in_order(scales, kept),
                        w_out_t.T, b_out)
    if x.shape[:-1].numel() == 0:
        return _zeros_plus_bias(x, w_out_t.shape[1], b_out)
    module, x2d = _run(x, backend)
    w_in, b_in, w_out_t, b_out, scales, kept = _contiguous(w_in, b_in, w_out_t, b_out, scales,
                                                           kept)
    hidden = module.gather_rows_linear(x2d, w_in, b_in, kept, activation)
    out = module.gather_cols_linear(hidden, w_out_t, b_out, kept, scales)
    return out.reshape(*x.shape[:-1], w_out_t.shape[1])


_gather_ffn_op = _register("gather_ffn", _gather_ffn)


@_gather_ffn_op.register_fake
def _(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales=None):
    return x.new_empty(*x.shape[:-1], w_out_t.shape[1])


def _gather_swiglu_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
    kept: torch.Tensor, backend: str, scales: torch.Tensor | None = None,
) -> torch.Tensor:
    if kept.numel() == 0:
        return _zeros_plus_bias(x, w_down_t.shape[1], None)
    if kept.numel() == w_gate.shape[0] and (x.shape[:-1].numel() == 0 or not dense_in_kernel(
            x, backend, w_gate, w_up, w_down_t, scales)):
        # every neuron (unique), in any order: the dense FFN (unless the kernels beat it; with no
        # rows too, so that autograd records it)
        hidden = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
        return torch.matmul(hidden if scales is None else hidden * _in_order(scales, kept),
                            w_down_t)
    if x.shape[:-1].numel() == 0:
        return _zeros_plus_bias(x, w_down_t.shape[1], None)
    module, x2d = _run(x, backend)
    w_gate, w_up, w_down_t, scales, kept = _contiguous(w_gate, w_up, w_down_t, scales, kept)
    hidden = module.gather_swiglu(x2d, w_gate, w_up, kept)
    out = module.gather_cols_linear(hidden, w_down_t, None, kept, scales)
    return out.reshape(*x.shape[:-1], w_down_t.shape[1])


_gather_swiglu_ffn_op = _register("gather_swiglu_ffn", _gather_swiglu_ffn)


@_gather_swiglu_ffn_op.register_fake
def _(x, w_gate, w_up, w_down_t, kept, backend, scales=None):
    return x.new_empty(*x.shape[:-1], w_down_t.shape[1])


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(x, *tensors) -> bool:
    """Whether torch.autocast, on for x's device, would cast one of x and `tensors` (a floating
    tensor not in its dtype)."""
    if not _any_autocast() or not torch.is_autocast_enabled(x.device.type):
        return False
    dtype = torch.get_autocast_dtype(x.device.type)
    return any(t is not None and t.is_floating_point() and t.dtype != dtype
               for t in (x, *tensors))


# Under torch.autocast, where it would cast an input (a float32 model), the public ops run torch's
# own ops, which autocast casts, on copies of the kept weight rows (a weight's kept rows, or an
# input-major weight's kept inputs): the gather kernels take one dtype, and casting the whole
# weight per call would read all of it. Inputs already in autocast's dtype run the kernels.
def _kept(t, index):
    return None if t is None else t.index_select(0, index)


def _autocast_rows_linear(x, weight, bias, rows, activation: str):
    return apply_activation(F.linear(x, _kept(weight, rows), _kept(bias, rows)), activation)


def _autocast_cols_linear(h, weight_t, bias, cols, scales):
    h = h if scales is None else h * scales.to(h.dtype)
    return F.linear(h, _kept(weight_t, cols).T, bias)


def _records_grad(*tensors) -> bool:
    """Whether autograd records the call: grad mode on and an input that requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# A call that autograd records (training), or that autocast casts, runs the FFNs unfused, through
# the public row- and column-gathered ops (which take autocast's casts themselves): the kept
# neurons' pre-activations come from the row-gathered op and the activation from torch, which keeps
# its input for the backward pass. The fused ops' own backward passes (ops/autograd.py, for
# callers of torch.ops.doe_kernels.*) recompute those pre-activations instead: one more gathered
# product per input projection (docs/results.md, "Training a patched model"). Under autograd alone
# a full kept list takes the fused ops' dense path, torch's own ops.
def gather_rows_linear(x, weight, bias, rows, activation: str, backend: str):
    if _autocast(x, weight, bias):
        return _autocast_rows_linear(x, weight, bias, rows, activation)
    if _direct(x, weight, bias, rows):
        return _gather_rows_linear(x, weight, bias, rows, activation, backend)
    if activation != "identity" and _records_grad(x, weight, bias):
        pre = _gather_rows_linear_op(x, weight, bias, rows, "identity", backend)
        return apply_activation(pre, activation)
    return _gather_rows_linear_op(x, weight, bias, rows, activation, backend)


def gather_cols_linear(h, weight_t, bias, cols, backend: str, scales=None):
    if _autocast(h, weight_t, bias, scales):
        return _autocast_cols_linear(h, weight_t, bias, cols, scales)
    if _direct(h, weight_t, bias, cols, scales):
        return _gather_cols_linear(h, weight_t, bias, cols, backend, scales)
    return _gather_cols_linear_op(h, weight_t, bias, cols, backend, scales)


def _masked(hidden: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """The union path's hidden activations times each row's mask, 0 where the mask is 0 even
    for an infinite or NaN activation (a neuron the row's expert does not keep never reaches its
    output, as when the row runs alone)."""
    return (hidden * row_mask).masked_fill_(row_mask == 0, 0)


def _unfused_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation: str, backend: str, scales=None,
                 row_mask=None):
    """The BERT FFN through the public row- and column-gathered ops (`row_mask`: each row's
    hidden activations multiplied by its row of it, the union path's)."""
    hidden = gather_rows_linear(x, w_in, b_in, kept, activation, backend)
    hidden = hidden if row_mask is None else _masked(hidden, row_mask)
    return gather_cols_linear(hidden, w_out_t, b_out, kept, backend, scales)


def _unfused_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend: str, scales=None,
                        row_mask=None):
    """The SwiGLU FFN as _unfused_ffn."""
    gate = gather_rows_linear(x, w_gate, None, kept, "identity", backend)
    hidden = F.silu(gate) * gather_rows_linear(x, w_up, None, kept, "identity", backend)
    hidden = hidden if row_mask is None else _masked(hidden, row_mask)
    return gather_cols_linear(hidden, w_down_t, None, kept, backend, scales)


def gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation: str, backend: str, scales=None):
    autocast = _autocast(x, w_in, b_in, w_out_t, b_out, scales)
    if not autocast and _direct(x, w_in, b_in, w_out_t, b_out, kept, scales):
        return _gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales)
    if autocast or _records_grad(x, w_in, b_in, w_out_t, b_out, scales):
        full = not autocast and kept.numel() == w_in.shape[0]  # autocast: F.linear's dtype
        run = _gather_ffn if full else _unfused_ffn
        return run(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales)
    return _gather_ffn_op(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales)


def gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend: str, scales=None):
    autocast = _autocast(x, w_gate, w_up, w_down_t, scales)
    if not autocast and _direct(x, w_gate, w_up, w_down_t, kept, scales):
        return _gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend, scales)
    if autocast or _records_grad(x, w_gate, w_up, w_down_t, scales):
        full = not autocast and kept.numel() == w_gate.shape[0]
        run = _gather_swiglu_ffn if full else _unfused_swiglu_ffn
        return run(x, w_gate, w_up, w_down_t, kept, backend, scales)
    return _gather_swiglu_ffn_op(x, w_gate, w_up, w_down_t, kept, backend, scales)


SEGMENT_STRATEGIES = ("auto", "segments", "union")


def _segment_bounds(segments: torch.Tensor, kept_offsets: torch.Tensor, x: torch.Tensor,
                    kept: torch.Tensor):
    """(first row, end row, first kept, end kept) of each segment that has rows; ValueError for
    offsets that do not run from 0 to the rows of `x` and the entries of `kept`, non-decreasing
    (as the C++ entry points check them, even when the caller skipped the checks)."""
    rows, lists = segments.tolist(), kept_offsets.tolist()
    check_offset_values("segments", rows, x.shape[0])
    check_offset_values("kept_offsets", lists, kept.numel())
    return [(rows[s], rows[s + 1], lists[s], lists[s + 1]) for s in range(len(rows) - 1)
            if rows[s + 1] > rows[s]]


def check_offset_values(name: str, values: list, total: int) -> None:
    """ValueError unless the offsets `values` run from 0 to `total`, non-decreasing."""
    if not values or values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at {total}, got "
                         f"{values[0] if values else 'none'} ... {values[-1] if values else ''}")
    steps = [b - a for a, b in zip(values, values[1:])]
    if steps and min(steps) < 0:
        raise ValueError(f"{name} must be non-decreasing: offset {values[steps.index(min(steps))]} "
                         f"is followed by a smaller one")


def check_strategy(strategy) -> None:
    if strategy not in SEGMENT_STRATEGIES:
        raise ValueError(f"strategy must be one of {SEGMENT_STRATEGIES}, got {strategy!r}")


def _choose_strategy(strategy: str, bounds, kept: torch.Tensor, min_union: int = 0):
    """("segments", None) (one gather per segment: reads each segment's kept rows) or ("union",
    the union of the segments' lists) (one gather of the union, masked per row: reads each kept
    row once, computes every row over the union). "auto": the union when the segments hold at
    most UNION_MAX_ROWS rows on average (decoding: one token per sequence), it reads fewer
    weight rows than the segments do, and it holds at least `min_union` neurons."""
    if not _union_may_pay(strategy, bounds, min_union):
        return "segments", None
    union = torch.unique(torch.cat([kept[k0:k1] for _, _, k0, k1 in bounds]))  # sorted
    if not _union_pays(strategy, union, bounds, min_union):
        return "segments", None
    return "union", union


def _union_may_pay(strategy: str, bounds, min_union: int) -> bool:
    """_choose_strategy's tests that need no union."""
    check_strategy(strategy)
    if strategy == "segments" or not bounds:
        return False
    if strategy == "union":
        return True
    rows, read = _totals(bounds)
    # `read` bounds the union's size from above
    return rows <= UNION_MAX_ROWS * len(bounds) and read >= min_union


def _union_pays(strategy: str, union: torch.Tensor, bounds, min_union: int) -> bool:
    """_choose_strategy's tests of the union itself."""
    if union.numel() == 0:
        return False
    if strategy == "union":
        return True
    return union.numel() >= min_union and union.numel() < _totals(bounds)[1]


def _totals(bounds) -> tuple[int, int]:
    """(rows, kept neurons read) of the segments' calls."""
    return (sum(r1 - r0 for r0, r1, _, _ in bounds), sum(k1 - k0 for _, _, k0, k1 in bounds))


# On the CPU the cpu backend chooses the strategy, plans the union and runs it in one C++ call
# (backends/cpu.segmented_ffn_with_union; backends/cpu.union_plan builds the plan alone), and
# `auto` takes the union where the extension's cost model says it is cheaper. The union reads its
# neurons once where the segments read each list, and computes every row over all of them; the
# model weighs each call in the regime it runs (the fused kernels: a fixed cost per kept neuron
# read plus one per row x neuron; gather + GEMM: a larger fixed cost, the copy of the kept rows
# unless they are every neuron in order, and cheaper products), so that experts which prune
# little, whose union holds every neuron and runs as a dense GEMM, take the union at many rows
# too. The constants, per dtype and CPU, and their fit: csrc/cpu/gather_linear_cpu.cpp
# (RegimeCosts; python/segmented_regimes.py). The check: python/segmented_union_sweep.py, five
# experts keeping 35% each (lists sharing 0, 50 or 100% of their neurons) or 80% each, 1-256 rows
# per expert, on SmolLM2-135M's, BERT-base's, BERT-large's and a 1024 x 4096 SwiGLU FFN (Intel
# Xeon, 2 threads, benchmarks/results/cpu_intel/segmented_union_sweep*.json; docs/results.md).
# Where torch builds the plan (about 0.2 ms: float16, or no extension) an op call takes the union
# at one row per segment only, for weights of UNION_MIN_BYTES_CPU or more (below, the plan cost
# more than the union saved: Intel Xeon, the segments 1.39x faster on SmolLM2's FFN, 1.16x on
# BERT-large's; the union from 42 MiB on, 1.73x on LLaMA-7B's). A model serving a mixed batch
# (models/segments) builds the plan once per token count.
# On an H200 (bfloat16, LLaMA-7B's FFN, the same five experts,
# benchmarks/results/gpu_h200/gpu-nvidia-h200_quick_segmented.json) an op call took 0.59 ms with
# the union and 0.25 ms with the segments at one row each (building the plan is a dozen small
# launches and host syncs), 0.69 against 0.28 ms at three rows: so on a GPU an op call never
# takes the union by itself (`strategy="union"` still does).
UNION_MAX_ROWS = 1
UNION_MIN_BYTES_CPU = 32 * 2**20


def union_plan(x, segments, kept, kept_offsets, scales=None, strategy: str = "auto",
               min_union: int = 0, neurons: int | None = None, up_matrices: int = 1):
    """(union, row_mask) when `strategy` takes the union for these segments (`_choose_strategy`,
    "auto" with a union of at least `min_union` neurons), else None: what the union path of a
    segmented op computes before its gathers (a model serving one batch composition over many
    decoding steps computes it once). `neurons` (the FFN's width), when given, lets the cpu
    backend build a CPU plan in one C++ call, which decides under the CPU's cost model (see the
    note above; `min_union` then plays no part) for an FFN whose up projection has `up_matrices`
    weight matrices (1: BERT's w_in; 2: SwiGLU's w_gate and w_up)."""
    if neurons is not None and _plan_in_cpp(x, kept, scales):
        check_strategy(strategy)
        union, row_mask = backends.cpu.union_plan(x, segments, kept, kept_offsets, scales,
                                                  neurons, up_matrices, strategy)
        return (union, row_mask) if union.numel() else None
    chosen, union = _choose_strategy(strategy, _segment_bounds(segments, kept_offsets, x, kept),
                                     kept, min_union)
    if chosen != "union":
        return None
    return union, _union_row_mask(x, union, segments, kept, kept_offsets, scales)


def _plan_in_cpp(x, kept, scales) -> bool:
    """Whether the cpu backend's C++ calls can take these tensors: a whole segmented op on that
    backend (_segmented), or the plan alone for union_plan (the same plan as _choose_strategy and
    _union_row_mask build with a dozen small torch ops, about 0.2 ms)."""
    return (x.device.type == "cpu" and x.dtype in backends.cpu.DTYPES and x.dim() == 2
            and kept.dtype == torch.int64 and kept.is_contiguous()
            and (scales is None or (scales.dtype == x.dtype and scales.is_contiguous()))
            and backends.cpu.available("cpu") and backends.cpu.has_union_plan())


def _min_union(x, kept, scales, projections: int) -> int:
    """The fewest neurons whose rows of an FFN's `projections` weight matrices (of x's width and
    dtype) make a union worth building in one op call: on the CPU any union when the C++ call
    builds the plan (_plan_in_cpp), else UNION_MIN_BYTES_CPU's worth; elsewhere no union is
    (sys.maxsize: see UNION_MIN_BYTES_CPU's note)."""
    if x.device.type != "cpu":
        return sys.maxsize
    if _plan_in_cpp(x, kept, scales):
        return 0
    return -(-UNION_MIN_BYTES_CPU // (projections * x.shape[-1] * x.element_size()))


def _segmented(x, out_features, segments, kept, kept_offsets, scales, strategy, run_segment,
               run_union, backend: str, up: tuple, w_out_t, b_out):
    """The output of a segmented op (x 2-D). A backend that chooses the strategy itself (cpu:
    segmented_ffn_with_union, one C++ call) takes the whole call. Otherwise: for all rows at once
    `run_union(x, union, row_mask)`, the union of the kept lists gathered once and each row's
    hidden activations multiplied by its segment's 0/1 (or scale) mask over the union, where the
    strategy takes it; else, on a backend with segmented kernels (triton and cuda: one launch per
    projection) and outside a CUDA graph's capture, every segment at once; else per segment
    `run_segment(rows, kept, scales)` (the single-expert op on it). `up`, `w_out_t`, `b_out`:
    the projections, for the backends' hooks (see their segmented_ffn)."""
    module, x2d = _run(x, backend)
    segments, kept, kept_offsets = _contiguous(segments, kept, kept_offsets)
    if hasattr(module, "segmented_ffn_with_union") and _plan_in_cpp(x, kept, scales):
        up = (up[0], *_contiguous(*up[1:3]), *up[3:])
        w_out_t, b_out = _contiguous(w_out_t, b_out)
        return module.segmented_ffn_with_union(x2d, up, w_out_t, b_out, segments, kept,
                                               kept_offsets, scales, strategy)
    up_matrices = 1 if up[0] == "rows" else 2
    plan = union_plan(x, segments, kept, kept_offsets, scales, strategy,
                      _min_union(x, kept, scales, up_matrices + 1), neurons=up[1].shape[0],
                      up_matrices=up_matrices)
    if plan is not None:
        return run_union(x, *plan)
    bounds = _segment_bounds(segments, kept_offsets, x, kept)
    if bounds:
        if hasattr(module, "segmented_ffn") and not capturing(x.device):
            up = (up[0], *_contiguous(*up[1:3]), *up[3:])
            w_out_t, b_out, scales = _contiguous(w_out_t, b_out, scales)
            return module.segmented_ffn(x2d, up, w_out_t, b_out, bounds, kept, scales)
    out = x.new_empty(x.shape[0], out_features)
    for r0, r1, k0, k1 in bounds:
        out[r0:r1] = run_segment(x[r0:r1], kept[k0:k1], None if scales is None else scales[k0:k1])
    return out


def _union_row_mask(x, union, segments, kept, kept_offsets, scales):
    """(rows, len(union)): for each row, 1 (or the scale) at its segment's kept neurons' places
    in the union, 0 elsewhere; built with one scatter and one row gather."""
    count = segments.numel() - 1
    segments, kept_offsets = segments.to(x.device), kept_offsets.to(kept.device)  # (host ones)
    owner = torch.repeat_interleave(torch.arange(count, device=kept.device),
                                    kept_offsets.diff())  # the segment of each kept entry
    per_segment = x.new_zeros(count, union.numel())
    # a segment without rows may hold neurons outside the union: its (unused) row gets them
    # at a clamped place
    places = torch.searchsorted(union, kept).clamp_(max=union.numel() - 1)
    per_segment[owner, places] = (
        1 if scales is None else scales.to(x.dtype))
    row_segment = torch.repeat_interleave(torch.arange(count, device=x.device), segments.diff())
    return per_segment.index_select(0, row_segment)


def _segmented_gather_ffn(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
    b_out: torch.Tensor | None, segments: torch.Tensor, kept: torch.Tensor,
    kept_offsets: torch.Tensor, activation: str, backend: str,
    scales: torch.Tensor | None = None, strategy: str = "auto",
) -> torch.Tensor:
    return _segmented(x, w_out_t.shape[1], segments, kept, kept_offsets, scales, strategy,
                      lambda rows, k, s: _gather_ffn(rows, w_in, b_in, w_out_t, b_out, k,
                                                     activation, backend, s),
                      lambda x, union, row_mask: union_gather_ffn(
                          x, w_in, b_in, w_out_t, b_out, union, row_mask, activation, backend),
                      backend, ("rows", w_in, b_in, activation), w_out_t, b_out)


def union_gather_ffn(x, w_in, b_in, w_out_t, b_out, union, row_mask, activation: str,
                     backend: str):
    """The union path of segmented_gather_ffn (x 2-D): the union's rows gathered once, each row's
    hidden activations multiplied by its row of `row_mask` (through the public ops when autograd
    records the call or autocast casts it)."""
    if _records_grad(x, w_in, b_in, w_out_t, b_out) or _autocast(x, w_in, b_in, w_out_t, b_out):
        return _unfused_ffn(x, w_in, b_in, w_out_t, b_out, union, activation, backend,
                            row_mask=row_mask)
    module, x2d = _run(x, backend)
    w_in, b_in, w_out_t, b_out = _contiguous(w_in, b_in, w_out_t, b_out)
    hidden = _masked(module.gather_rows_linear(x2d, w_in, b_in, union, activation), row_mask)
    return module.gather_cols_linear(hidden, w_out_t, b_out, union, None)


_segmented_gather_ffn_op = _register("segmented_gather_ffn", _segmented_gather_ffn)


@_segmented_gather_ffn_op.register_fake
def _(x, w_in, b_in, w_out_t, b_out, segments, kept, kept_offsets, activation, backend,
      scales=None, strategy="auto"):
    return x.new_empty(x.shape[0], w_out_t.shape[1])


def _segmented_gather_swiglu_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
    segments: torch.Tensor, kept: torch.Tensor, kept_offsets: torch.Tensor, backend: str,
    scales: torch.Tensor | None = None, strategy: str = "auto",
) -> torch.Tensor:
    return _segmented(x, w_down_t.shape[1], segments, kept, kept_offsets, scales, strategy,
                      lambda rows, k, s: _gather_swiglu_ffn(rows, w_gate, w_up, w_down_t, k,
                                                            backend, s),
                      lambda x, union, row_mask: union_gather_swiglu_ffn(
                          x, w_gate, w_up, w_down_t, union, row_mask, backend),
                      backend, ("swiglu", w_gate, w_up), w_down_t, None)


def union_gather_swiglu_ffn(x, w_gate, w_up, w_down_t, union, row_mask, backend: str):
    """The union path of segmented_gather_swiglu_ffn (union_gather_ffn's, for SwiGLU)."""
    if _records_grad(x, w_gate, w_up, w_down_t) or _autocast(x, w_gate, w_up, w_down_t):
        return _unfused_swiglu_ffn(x, w_gate, w_up, w_down_t, union, backend, row_mask=row_mask)
    module, x2d = _run(x, backend)
    w_gate, w_up, w_down_t = _contiguous(w_gate, w_up, w_down_t)
    hidden = _masked(module.gather_swiglu(x2d, w_gate, w_up, union), row_mask)
    return module.gather_cols_linear(hidden, w_down_t, None, union, None)


_segmented_gather_swiglu_ffn_op = _register("segmented_gather_swiglu_ffn",
                                            _segmented_gather_swiglu_ffn)


@_segmented_gather_swiglu_ffn_op.register_fake
def _(x, w_gate, w_up, w_down_t, segments, kept, kept_offsets, backend, scales=None,
      strategy="auto"):
    return x.new_empty(x.shape[0], w_down_t.shape[1])


def segmented_gather_ffn(x, w_in, b_in, w_out_t, b_out, segments, kept, kept_offsets,
                         activation: str, backend: str, scales=None, strategy: str = "auto"):
    args = (x, w_in, b_in, w_out_t, b_out, segments, kept, kept_offsets, activation, backend,
            scales, strategy)
    autocast = _autocast(x, w_in, b_in, w_out_t, b_out, scales)
    if not autocast and _direct(x, w_in, b_in, w_out_t, b_out, segments, kept, kept_offsets,
                                scales):
        return _segmented_gather_ffn(*args)
    if autocast or _records_grad(x, w_in, b_in, w_out_t, b_out, scales):
        return _per_segment(x, w_out_t.shape[1], segments, kept, kept_offsets, scales,
                            lambda rows, k, s: gather_ffn(rows, w_in, b_in, w_out_t, b_out, k,
                                                          activation, backend, s))
    return _segmented_gather_ffn_op(*args)


def segmented_gather_swiglu_ffn(x, w_gate, w_up, w_down_t, segments, kept, kept_offsets,
                                backend: str, scales=None, strategy: str = "auto"):
    args = (x, w_gate, w_up, w_down_t, segments, kept, kept_offsets, backend, scales, strategy)
    autocast = _autocast(x, w_gate, w_up, w_down_t, scales)
    if not autocast and _direct(x, w_gate, w_up, w_down_t, segments, kept, kept_offsets, scales):
        return _segmented_gather_swiglu_ffn(*args)
    if autocast or _records_grad(x, w_gate, w_up, w_down_t, scales):
        return _per_segment(x, w_down_t.shape[1], segments, kept, kept_offsets, scales,
                            lambda rows, k, s: gather_swiglu_ffn(rows, w_gate, w_up, w_down_t, k,
                                                                 backend, s))
    return _segmented_gather_swiglu_ffn_op(*args)


def _per_segment(x, out_features: int, segments, kept, kept_offsets, scales, run_segment):
    """A segmented op that autograd records or autocast casts: each segment with rows through
    the single-expert public op (`run_segment(rows, kept, scales)`), which handles both, the
    outputs concatenated (the segmented ops have no backward pass, nor mixed dtypes, of their
    own)."""
    parts = [run_segment(x[r0:r1], kept[k0:k1], None if scales is None else scales[k0:k1])
             for r0, r1, k0, k1 in _segment_bounds(segments, kept_offsets, x, kept)]
    if parts:
        return torch.cat(parts)
    dtype = (torch.get_autocast_dtype(x.device.type)  # (as a segment's autocast call gives it)
             if torch.is_autocast_enabled(x.device.type) else x.dtype)
    return x.new_zeros(0, out_features, dtype=dtype)


from doe_kernels.ops import autograd  # noqa: E402,F401  (the single-expert ops' gradients)
