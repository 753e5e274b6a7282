"""The kernel backends and the rule that picks one.

Every backend is a module with the same interface: `NAME`, `DTYPES`, `available(device_type,
index=None)` (whether it serves tensors on that device type; `index`: the GPU, None for the current
one, which only `cuda` tells apart: its kernels may be built for some of a machine's GPUs only),
`gather_rows_linear(x, weight, bias, rows, activation)`, `gather_swiglu(x, w_gate, w_up, kept)` and
`gather_cols_linear(h, weight_t, bias, cols, scales)`, on validated 2-D inputs and non-empty int64
indices. `scales` is None or a contiguous 1-D tensor of h's dtype with one factor per column of h:
out[m, n] = sum_j h[m, j] * scales[j] * weight_t[cols[j], n] + bias[n]; with None no backend makes
an extra pass or buffer (the cpu, torch and triton results are bit for bit those without the
argument). A backend may add `segmented_ffn(x, up, w_out_t, b_out, bounds, kept, scales)`: every
segment of a segmented op in one call (triton, and cuda when its extension has the kernels), or
`segmented_ffn_with_union(x, up, w_out_t, b_out, segments, kept, kept_offsets, scales,
strategy)`: the whole op, the choice between the segments and their union included (cpu; see
ops/library.py `_segmented`).

Index values are not trusted: the ops skip their check when called with `check_indices=False` (the
patched modules, which checked their mask once), and an index tensor may change after a check. No
backend reads outside a weight through an out-of-range index: `cpu` checks every index and raises
ValueError, `torch` raises IndexError (index_select), `triton` masks the loads (the entry reads
nothing), `cuda` never loads through it either and fails a device-side assertion (no host sync).
An unchecked FFN list as long as the layer is taken for every neuron (a permutation): the dense
FFN runs, whatever its values, with no error (but where the `cpu` backend's kernel beats the
dense FFN and runs over the list instead, which checks it as above).

The `auto` rule (see `resolve`):
  * CPU tensors: `cpu` (C++ kernels) when the extension is loaded, else `torch`.
  * CUDA tensors, at most 16 rows (decoding): `cuda` (hand-written gather GEMV) when built, else
    `triton`, else `torch`.
  * CUDA tensors, more rows (prefill, batches): `triton` (tiled tl.dot), else `torch`.
  * A dtype the chosen backend does not take falls through to the next in that order; `torch` takes
    every floating dtype.
The 16-row threshold is a design choice. On an H200 (bfloat16, docs/results.md) `cuda` beat
`triton` at 8 rows on five of six LLaMA-shaped FFNs, and lost four of six at 16 rows; the rule
stays until whole models are measured with both.
"""
import torch

from doe_kernels.backends import cpu, cuda, torch_ref, triton

BACKENDS = {module.NAME: module for module in (torch_ref, cpu, cuda, triton)}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)
DECODE_ROWS = 16

_PREFERENCE = {
    ("cpu", "decode"): ("cpu", "torch"),
    ("cpu", "prefill"): ("cpu", "torch"),
    ("cuda", "decode"): ("cuda", "triton", "torch"),
    ("cuda", "prefill"): ("triton", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not present for this device or dtype."""


def available_backends(device_type: str, index: int | None = None) -> list[str]:
    """Names of the backends present for a device type ("cpu" or "cuda"; `index`: the GPU, None
    for the current one)."""
    return [name for name, module in BACKENDS.items() if module.available(device_type, index)]


def check_backend_name(backend) -> None:
    """ValueError for a name that is none of BACKEND_NAMES (the public ops check it even where a
    call has nothing to compute)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def resolve(backend: str, device: torch.device, dtype: torch.dtype, rows: int) -> str:
    """The concrete backend name for a call; raises if an explicit request cannot be honoured."""
    check_backend_name(backend)
    device_type = device.type
    if backend != "auto":
        module = BACKENDS[backend]
        if not module.available(device_type, device.index):
            raise BackendUnavailableError(
                f"backend {backend!r} is not available for {device_type} tensors; available: "
                f"{available_backends(device_type, device.index)}"
            )
        if dtype not in module.DTYPES:
            raise BackendUnavailableError(
                f"backend {backend!r} does not support {dtype}; it supports {list(module.DTYPES)}"
            )
        return backend
    regime = "decode" if rows <= DECODE_ROWS else "prefill"
    for name in _PREFERENCE.get((device_type, regime), ("torch",)):
        module = BACKENDS[name]
        if module.available(device_type, device.index) and dtype in module.DTYPES:
            return name
    return "torch"


def get(name: str):
    return BACKENDS[name]
