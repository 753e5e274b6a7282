"""The Triton backend: tiled ``tl.dot`` kernels that gather kept neurons through the index list.

Triton is imported lazily (on the first kernel call or ``available`` check), so importing this module
never fails when triton is missing or when there is neither a GPU nor the interpreter. Whether the
kernels run under the interpreter is decided from ``TRITON_INTERPRET`` when they are first imported;
set it before the first call. On the CPU the backend is offered only when the interpreter runs a
probe kernel: Triton 3.6's interpreter (torch 2.11's pin) cannot run the kernels' loops with numpy
2.4 or later, and then the backend is unavailable there, with one warning saying why.
"""
import contextlib
import os
import warnings

import torch

from doe_kernels.activations import ACTIVATION_CODES, check_activation
from doe_kernels.backends.device import device_guard
from doe_kernels.backends.memo import probe

NAME = "triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_kernels_mod = None
_import_error = None


@probe
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _kernels():
    global _kernels_mod, _import_error
    if _kernels_mod is None:
        if _import_error is not None:
            raise RuntimeError(f"triton backend unavailable: {_import_error}") from _import_error
        try:
            from . import kernels as mod
        except Exception as exc:
            _import_error = exc
            raise RuntimeError(f"triton backend unavailable: {exc}") from exc
        _kernels_mod = mod
    return _kernels_mod


def available(device_type: str, index: int | None = None) -> bool:
    if not _triton_importable():
        return False
    if device_type == "cuda":
        try:
            return torch.cuda.is_available()
        except Exception:
            return False
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and _interpreter_runs()
    return False


@probe
def _interpreter_runs() -> bool:
    """Whether the interpreter runs a loop with a runtime bound (see the module docstring)."""
    out = torch.full((3,), -1, dtype=torch.int32)
    try:
        _kernels().interpreter_probe_kernel[(1,)](out, 3)
        if out.tolist() == [0, 1, 2]:
            return True
        reason = f"it computed {out.tolist()} instead of [0, 1, 2]"
    except Exception as error:  # noqa: BLE001 (any failure means the backend cannot run here)
        reason = f"{type(error).__name__}: {error}"
    import numpy
    import triton

    warnings.warn(
        f"doe_kernels: the triton backend is unavailable on the CPU: Triton {triton.__version__}'s "
        f"interpreter (TRITON_INTERPRET=1) could not run a probe kernel with numpy "
        f"{numpy.__version__} ({reason}). Triton 3.9, or numpy < 2.4 with Triton 3.6, runs it.",
        RuntimeWarning, stacklevel=3)
    return False


_NO_LOCK = contextlib.nullcontext()  # (reusable: a plain kernel's launch takes no lock)


def _launch(k, name: str, x, M: int, N: int, K: int, args: tuple, constants: dict) -> None:
    """Launch the kernel `name` over an (M, N) output on x's GPU: autotuned by default (the
    autotuner of x's kind of GPU, one thread at a time: Triton's keeps a launch's arguments on
    itself while it runs), with fixed large blocks under the interpreter, or with one fixed
    configuration per M regime (fitted to the shared memory of x's device) when autotuning is
    off or when a CUDA graph is being captured and the launch's key has not been tuned yet
    (tuning times configurations and synchronizes the device, which a capture forbids; a
    kernel never compiled still compiles and loads there, which a capture forbids too: run each
    shape once before capturing)."""
    with device_guard(x):  # (x's GPU current: its stream is the one a capture would be on)
        kernel, meta = None, {}
        if k.INTERPRET:
            kernel, meta = getattr(k, name + "_kernel"), k.interpreter_blocks(M, N, K)
        elif k.autotune_enabled():
            tuner = k.tuned(name, x.device)
            if not torch.cuda.is_current_stream_capturing() or \
                    k.has_tuned(tuner, args, constants):
                kernel = tuner
        if kernel is None:
            weights = 2 if name == "gather_swiglu" else 1
            kernel, meta = getattr(k, name + "_kernel"), k.fixed_launch(
                M, weights, x.element_size(), k.smem_limit(x.device), k.device_arch(x.device))
        with getattr(kernel, "doe_lock", _NO_LOCK):
            kernel[_grid(M, N)](*args, **constants, **meta)


def _grid(M, N):
    import triton

    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _out_dtype(k, dtype):
    """Under the interpreter, float32 -> bfloat16 stores truncate instead of rounding to nearest;
    there the kernel writes float32 and torch does the rounding (GPU stores round correctly)."""
    return torch.float32 if (k.INTERPRET and dtype == torch.bfloat16) else dtype


def gather_rows_linear(x, weight, bias, rows, activation: str):
    k = _kernels()
    check_activation(activation)
    M, K = x.shape
    N = rows.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=_out_dtype(k, x.dtype))
    has_bias = bias is not None
    _launch(k, "gather_rows_linear", x, M, N, K, (
        x, weight, bias if has_bias else x, rows, out,
        M, N, K, weight.shape[0],
        x.stride(0), weight.stride(0), out.stride(0),
        k.m_bucket(M), k.kept_bucket(N)), dict(
        HAS_BIAS=has_bias, ACTIVATION=ACTIVATION_CODES[activation],
        F32_DOT=x.dtype == torch.float32 or k.INTERPRET))
    return out.to(x.dtype)


def gather_swiglu(x, w_gate, w_up, kept):
    k = _kernels()
    M, K = x.shape
    N = kept.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=_out_dtype(k, x.dtype))
    _launch(k, "gather_swiglu", x, M, N, K, (
        x, w_gate, w_up, kept, out,
        M, N, K, w_gate.shape[0],
        x.stride(0), w_gate.stride(0), w_up.stride(0), out.stride(0),
        k.m_bucket(M), k.kept_bucket(N)), dict(F32_DOT=x.dtype == torch.float32 or k.INTERPRET))
    return out.to(x.dtype)


def gather_cols_linear(h, weight_t, bias, cols, scales):
    k = _kernels()
    M, J = h.shape
    N = weight_t.shape[1]
    out = torch.empty((M, N), device=h.device, dtype=_out_dtype(k, h.dtype))
    has_bias, has_scales = bias is not None, scales is not None
    _launch(k, "gather_cols_linear", h, M, N, J, (
        h, weight_t, bias if has_bias else h, cols, scales if has_scales else h, out,
        M, N, J, weight_t.shape[0],
        h.stride(0), weight_t.stride(0), out.stride(0),
        k.m_bucket(M), k.kept_bucket(J)), dict(
        HAS_BIAS=has_bias, HAS_SCALES=has_scales,
        F32_DOT=h.dtype == torch.float32 or k.INTERPRET))
    return out.to(h.dtype)


def _segment_table(bounds, device):
    """(table, hidden size): per segment (first row, rows, first kept entry, kept count, offset of
    its rows x kept hidden block), int64 on `device`, from library._segment_bounds' bounds. To a
    GPU through pinned memory, without waiting (a plain copy from the host would wait for every
    launch queued before it; the pinned block is not reused before the copy has run)."""
    table, offset = [], 0
    for r0, r1, k0, k1 in bounds:
        table.append([r0, r1 - r0, k0, k1 - k0, offset])
        offset += (r1 - r0) * (k1 - k0)
    host = torch.tensor(table, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device), offset
    # (not inside a CUDA graph's capture, where a replay would read the freed host block again:
    # the library runs one call per segment there: device.capturing)
    return host.pin_memory().to(device, non_blocking=True), offset


# CUDA caps a grid's second axis at 65535 blocks: more segments than that launch in chunks, of
# an even count so that each chunk's table (5 int64 a segment) starts 16-byte aligned, as Triton
# specialises the first (no second compilation)
MAX_SEGMENTS_PER_LAUNCH = 65534


def _segment_grid(k, bounds, x, width=None, weights=1):
    """(tiles, meta): grid axis 0 runs over the largest segment's tiles (axis 1 over segments)."""
    import triton

    rows = max(r1 - r0 for r0, r1, _, _ in bounds)
    cols = width or max(max(k1 - k0 for _, _, k0, k1 in bounds), 1)
    meta = k.interpreter_blocks(rows, cols, cols) if k.INTERPRET else k.fixed_launch(
        rows, weights, x.element_size(), k.smem_limit(x.device), k.device_arch(x.device))
    return triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), meta


def _launch_over_segments(kernel, table, tiles, args, meta):
    """`kernel[(tiles, segments)]` over the segment table, in launches of at most
    MAX_SEGMENTS_PER_LAUNCH segments (each launch reads its own rows of the table; the rows,
    kept entries and hidden offsets in it are absolute)."""
    for first in range(0, table.shape[0], MAX_SEGMENTS_PER_LAUNCH):
        chunk = table[first:first + MAX_SEGMENTS_PER_LAUNCH]
        kernel[(tiles, chunk.shape[0])](*args(chunk), **meta)


def segmented_ffn(x, up, w_out_t, b_out, bounds, kept, scales):
    """A segmented FFN in two launches, each with a grid axis over the segments (`bounds`: the
    library's (first row, end row, first kept, end kept) of each segment with rows): the up
    projection of every segment into one packed hidden buffer, then every segment's down
    projection. `up`: ("rows", w_in, b_in, activation) or ("swiglu", w_gate, w_up)."""
    k = _kernels()
    M, K = x.shape
    N = w_out_t.shape[1]
    table, hidden_size = _segment_table(bounds, x.device)
    hidden = torch.empty(max(hidden_size, 1), device=x.device, dtype=_out_dtype(k, x.dtype))
    out = torch.empty((M, N), device=x.device, dtype=_out_dtype(k, x.dtype))
    f32 = x.dtype == torch.float32 or k.INTERPRET
    tiles, meta = _segment_grid(k, bounds, x, weights=1 if up[0] == "rows" else 2)
    with device_guard(x):
        if up[0] == "rows":
            _, w_in, b_in, activation = up
            check_activation(activation)
            _launch_over_segments(k.segmented_rows_linear_kernel, table, tiles, lambda t: (
                x, w_in, b_in if b_in is not None else x, kept, hidden, t,
                K, w_in.shape[0], x.stride(0), w_in.stride(0)), dict(
                HAS_BIAS=b_in is not None, ACTIVATION=ACTIVATION_CODES[activation],
                F32_DOT=f32, **meta))
        else:
            _, w_gate, w_up = up
            _launch_over_segments(k.segmented_swiglu_kernel, table, tiles, lambda t: (
                x, w_gate, w_up, kept, hidden, t,
                K, w_gate.shape[0], x.stride(0), w_gate.stride(0), w_up.stride(0)),
                dict(F32_DOT=f32, **meta))
        hidden = hidden.to(x.dtype)  # as the single-expert path stores it
        tiles, meta = _segment_grid(k, bounds, hidden, width=N)
        _launch_over_segments(k.segmented_cols_linear_kernel, table, tiles, lambda t: (
            hidden, w_out_t, b_out if b_out is not None else hidden, kept,
            scales if scales is not None else hidden, out, t,
            N, w_out_t.shape[0], w_out_t.stride(0), out.stride(0)), dict(
            HAS_BIAS=b_out is not None, HAS_SCALES=scales is not None, F32_DOT=f32, **meta))
    return out.to(x.dtype)
