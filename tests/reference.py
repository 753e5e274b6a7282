"""Float64 references and the tolerance rule the op tests share.

References compute in float64 from the same (possibly low-precision) inputs. A backend's error is
allowed to be at most twice what PyTorch's own dense path makes in the same dtype, plus a floor
relative to the output's magnitude: loose enough for rounding, tight enough to catch a wrong index
or a missed tile (both give errors of the order of the output itself).
"""
import torch
import torch.nn.functional as F

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ACT = {
    "identity": lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def f64(t):
    return None if t is None else t.double()


def index_list(kind: str, size: int, device="cpu", dtype=torch.int64, generator=None):
    """'empty', 'single', 'full', 'random' (about 35% kept, at least one) sorted unique indices."""
    if kind == "empty":
        return torch.empty(0, dtype=dtype, device=device)
    if kind == "single":
        return torch.tensor([size // 2], dtype=dtype, device=device)
    if kind == "full":
        return torch.arange(size, dtype=dtype, device=device)
    keep = max(1, round(0.35 * size))
    return torch.randperm(size, generator=generator)[:keep].sort().values.to(device, dtype)


def rows_linear_ref(x, weight, bias, rows, activation="identity"):
    out = f64(x) @ f64(weight)[rows].T
    if bias is not None:
        out = out + f64(bias)[rows]
    return ACT[activation](out)


def cols_linear_ref(h, weight_t, bias, cols, scales=None):
    h = f64(h) if scales is None else f64(h) * f64(scales)
    out = h @ f64(weight_t)[cols]
    return out if bias is None else out + f64(bias)


def _neuron_mask(size, kept, scales, device):
    """1 (or the kept neuron's scale) at the kept neurons, 0 at the pruned ones."""
    mask = torch.zeros(size, dtype=torch.float64, device=device)
    mask[kept] = 1 if scales is None else f64(scales)
    return mask


def ffn_ref(x, w_in, b_in, w_out_t, b_out, kept, activation, scales=None):
    """The masked-dense reference: the dense FFN with the pruned neurons' weights zeroed (and the
    kept neurons' activations multiplied by their scales, when given)."""
    mask = _neuron_mask(w_in.shape[0], kept, scales, x.device)
    hidden = ACT[activation](f64(x) @ f64(w_in).T + (0 if b_in is None else f64(b_in)))
    out = (hidden * mask) @ f64(w_out_t)
    return out if b_out is None else out + f64(b_out)


def swiglu_ffn_ref(x, w_gate, w_up, w_down_t, kept, scales=None):
    mask = _neuron_mask(w_gate.shape[0], kept, scales, x.device)
    hidden = F.silu(f64(x) @ f64(w_gate).T) * (f64(x) @ f64(w_up).T)
    return (hidden * mask) @ f64(w_down_t)


def plain_torch(op: str, *args, scales=None):
    """PyTorch's own result of op `op` (its public positional arguments, without `backend`) in
    the inputs' dtype, from index_select'ed weights and torch ops alone: the same-dtype error
    `assert_close` allows twice of. (Not the op with backend="torch", which shares the package's
    code with every backend and so would hide a bug there in its own tolerance.)"""
    if op == "gather_rows_linear":
        x, weight, bias, rows, activation = (*args, "identity")[:5]
        return ACT[activation](F.linear(x, weight[rows], None if bias is None else bias[rows]))
    if op == "gather_cols_linear":
        h, weight_t, bias, cols = args
        out = (h if scales is None else h * scales) @ weight_t[cols]
        return out if bias is None else out + bias
    if op == "gather_ffn":
        x, w_in, b_in, w_out_t, b_out, kept, activation = args
        hidden = plain_torch("gather_rows_linear", x, w_in, b_in, kept, activation)
        return plain_torch("gather_cols_linear", hidden, w_out_t, b_out, kept, scales=scales)
    if op == "gather_swiglu_ffn":
        x, w_gate, w_up, w_down_t, kept = args
        hidden = F.silu(F.linear(x, w_gate[kept])) * F.linear(x, w_up[kept])
        return plain_torch("gather_cols_linear", hidden, w_down_t, None, kept, scales=scales)
    raise ValueError(f"no plain torch computation of {op!r}")


def assert_close(out, ref, same_dtype_out=None, what=""):
    """out (any dtype) against a float64 ref; same_dtype_out is PyTorch's dense result in out's dtype."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    allowed = FLOOR.get(out.dtype, 1e-10) * max(scale, 1.0)
    if same_dtype_out is not None and ref.numel():
        allowed = max(allowed, 2 * (same_dtype_out.double() - ref).abs().max().item())
    assert err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g})"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
