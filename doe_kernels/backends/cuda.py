"""The `cuda` backend: hand-written CUDA gather-GEMV kernels of doe_kernels._C (csrc/cuda).

Written for decoding (1 to 16 rows); correct for any row count but slow for many rows, so `auto`
only picks it for few rows. `segmented_ffn` (the library's segmented-kernel hook) is present only
when the loaded extension has the segmented kernels; with an older build a segmented op runs one
single-expert call per segment. On a GPU the build holds no code for (an architecture outside
DOE_KERNELS_CUDA_ARCHS, with no PTX to compile for it) the backend is unavailable, with one
warning, and `auto` picks another.
"""
import warnings

import torch

from doe_kernels._ext import has_cuda_kernels, extension
from doe_kernels.activations import ACTIVATION_CODES
from doe_kernels.backends.device import current_stream, device_guard, device_guard_of
from doe_kernels.backends.layout import segment_layout
from doe_kernels.backends.memo import probe

NAME = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available(device_type: str, index: int | None = None) -> bool:
    return (device_type == "cuda" and torch.cuda.is_available() and has_cuda_kernels()
            and _runs_on(torch.cuda.current_device() if index is None else index))


@probe
def _runs_on(device: int) -> bool:
    """Whether the extension's kernels can run on GPU `device` (warns once when they cannot)."""
    probe = getattr(extension(), "cuda_kernels_run_on", None)
    try:
        with device_guard_of(torch.device("cuda", device)):  # (torch's guard first: the
            # extension's then has nothing to restore)
            if probe is None or probe(device):  # (a build older than the probe: assumed)
                return True
    except RuntimeError as error:  # the device is not usable at all: the other backends say so
        warnings.warn(f"doe_kernels: probing the CUDA kernels on device {device} failed "
                      f"({error}); the 'cuda' backend is unavailable", RuntimeWarning,
                      stacklevel=2)
        return False
    major, minor = torch.cuda.get_device_capability(device)
    warnings.warn(
        f"doe_kernels: the CUDA kernels were built without code for "
        f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}); the 'cuda' "
        f"backend is unavailable on it. Rebuild with DOE_KERNELS_CUDA_ARCHS=\"{major}.{minor}\" "
        "to use it.", RuntimeWarning, stacklevel=2)
    return False


def gather_rows_linear(x, weight, bias, rows, activation):
    with device_guard(x):
        return extension().gather_rows_linear_cuda(
            x, weight, bias, rows, ACTIVATION_CODES[activation], current_stream(x))


def gather_swiglu(x, w_gate, w_up, kept):
    with device_guard(x):
        return extension().gather_swiglu_cuda(x, w_gate, w_up, kept, current_stream(x))


def gather_cols_linear(h, weight_t, bias, cols, scales):
    with device_guard(h):
        return extension().gather_cols_linear_cuda(h, weight_t, bias, cols, scales,
                                                   current_stream(h))


def _segmented_ffn(x, up, w_out_t, b_out, bounds, kept, scales):
    """Every segment of a segmented FFN in two launches with a grid axis over the segments, the
    up projections then the down projections (and one that sums the latter's splits of the kept
    lists, when they have several): the library's segmented-kernel hook, as triton.segmented_ffn.
    `bounds`: the library's (first row, end row, first kept, end kept) of each segment with rows;
    `up`: ("rows", w_in, b_in, activation) or ("swiglu", w_gate, w_up)."""
    segments, kept_offsets = segment_layout(bounds, kept.numel())
    with device_guard(x):
        if up[0] == "rows":
            _, w_in, b_in, activation = up
            return extension().segmented_ffn_cuda(
                x, w_in, b_in, w_out_t, b_out, segments, kept, kept_offsets, scales,
                ACTIVATION_CODES[activation], current_stream(x))
        _, w_gate, w_up = up
        return extension().segmented_swiglu_ffn_cuda(x, w_gate, w_up, w_out_t, segments, kept,
                                                     kept_offsets, scales, current_stream(x))


def __getattr__(name):
    """`segmented_ffn` exists only when the loaded extension has the segmented CUDA kernels (the
    library does not call it while a CUDA graph is being captured: device.capturing)."""
    if name == "segmented_ffn" and hasattr(extension(), "segmented_ffn_cuda"):
        return _segmented_ffn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
