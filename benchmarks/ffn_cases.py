"""The FFN cases of the op benchmark (benchmarks/test_ffn_bench.py), shared with
python/host_overhead.py: random weights of a shape, a kept list, and the call of each variant
(`dense`, `sliced`, `gather-<backend>`)."""
import functools

import torch
import torch.nn.functional as F

import doe_kernels as dk
from shapes import SHAPES


@functools.lru_cache(maxsize=2)
def ffn_weights(name, device, dtype):
    """Random FFN weights of the shape `name` (SHAPES), the down projection also input-major
    (`w_out_t`); the same on every call."""
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    make = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(device, dtype)  # noqa: E731
    w = dict(w_in=make(shape.intermediate, shape.hidden), w_out=make(shape.hidden, shape.intermediate))
    if shape.ffn == "swiglu":
        w["w_up"] = make(shape.intermediate, shape.hidden)
    else:
        w["b_in"], w["b_out"] = make(shape.intermediate), make(shape.hidden)
    w["w_out_t"] = dk.input_major(w["w_out"])
    return w


SLICE_ALIGN = 64  # GPU: the sliced baseline's neurons are padded with zeros to a multiple of this


def sliced(w, kept, names_rows, names_cols):
    """The weights `names_rows` (rows: neurons) and `names_cols` (columns: neurons) cut to the
    kept neurons, once; on a GPU padded with zero neurons to a multiple of SLICE_ALIGN (a zero
    neuron adds nothing: GELU(0) and SiLU(0) are 0, and its down-projection column is 0)."""
    pad = -kept.numel() % SLICE_ALIGN if kept.device.type == "cuda" else 0
    out = {name: F.pad(w[name][kept], (0, 0) * (w[name].dim() - 1) + (0, pad))  # dim 0
           for name in names_rows}
    out.update({name: F.pad(w[name][:, kept], (0, pad)) for name in names_cols})
    return {name: t.contiguous() for name, t in out.items()}


def kept_list(intermediate, prune_rate, device):
    """A random sorted list keeping round(intermediate * (1 - prune_rate)) neurons."""
    keep = round(intermediate * (1 - prune_rate))
    gen = torch.Generator().manual_seed(1)
    return torch.randperm(intermediate, generator=gen)[:keep].sort().values.to(device)


def ffn_call(name, variant, w, kept, x, scales=None):
    """The call of one variant; `scales` (gather variants only): one per kept neuron, or None."""
    shape = SHAPES[name]
    if shape.ffn == "swiglu":
        if variant in ("dense", "sliced"):
            gate, up, down = w["w_in"], w["w_up"], w["w_out"]
            if variant == "sliced":
                cut = sliced(w, kept, ("w_in", "w_up"), ("w_out",))
                gate, up, down = cut["w_in"], cut["w_up"], cut["w_out"]
            return lambda: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        backend = variant.removeprefix("gather-")
        return lambda: dk.gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], kept,
                                            backend=backend, check_indices=False, scales=scales)
    if variant in ("dense", "sliced"):
        w_in, b_in, w_out = w["w_in"], w["b_in"], w["w_out"]
        if variant == "sliced":
            cut = sliced(w, kept, ("w_in", "b_in"), ("w_out",))
            w_in, b_in, w_out = cut["w_in"], cut["b_in"], cut["w_out"]
        return lambda: F.linear(F.gelu(F.linear(x, w_in, b_in)), w_out, w["b_out"])
    backend = variant.removeprefix("gather-")
    return lambda: dk.gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], kept, "gelu",
                                 backend=backend, check_indices=False, scales=scales)
