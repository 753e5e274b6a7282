"""The GPU a backend's launch runs on: torch's current stream on a tensor's device, and torch's
device guard where that device is not the current one (a few microseconds less a call where it
is, which decoding pays per op); whether that stream is capturing a CUDA graph."""
import contextlib

import torch

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # (CUDA builds of torch)


def current_stream(t: torch.Tensor) -> int:
    """The handle of torch's current CUDA stream on t's GPU: the stream the kernels launch on."""
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def device_guard(t: torch.Tensor):
    """torch's guard making t's GPU the current device for the scope, where another is current
    (Triton launches on the current device; the extension's own guard, a cudaSetDevice pair,
    would create a context on the device it restores if that had none, which torch's does not
    do); else nothing."""
    return device_guard_of(t.device)


def device_guard_of(device: torch.device):
    """`device_guard` of a device rather than a tensor's (an index of None: the current GPU)."""
    if device.type != "cuda" or device.index is None or \
            device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def capturing(device: torch.device) -> bool:
    """Whether the GPU `device` is capturing a CUDA graph on its current stream (where a launch
    may not synchronize the device or read host memory a replay would read again)."""
    if device.type != "cuda":
        return False
    with device_guard_of(device):
        return torch.cuda.is_current_stream_capturing()
