"""Gradients of the single-expert gather ops (torch.library.register_autograd), so that a patched
model can be trained: gradients reach its inputs (soft prompts, embeddings, adapters before a
layer), biases, scales, and the weights the ops read.

The backward passes run on the same gather kernels as the forward passes, on the kept units only:
x @ W[rows].T differentiates to grad @ W[rows], a column-gathered product over the same weight
read input-major, and h @ W_t[cols] to grad @ W_t[cols].T, a row-gathered one. The pre-activations
are recomputed (one more gathered product), not saved: when autograd records a call, the public
functions (ops/library.py) therefore run the FFNs unfused, the activation in torch, and these
passes serve the fused ops called as torch.ops.doe_kernels.*. The backward passes call the
registered ops, so that torch.compile can trace them. A weight's gradient is dense-shaped, zero
at the pruned rows. First order only: a backward with create_graph=True raises.
"""
import torch

from doe_kernels.activations import apply_activation
from doe_kernels.ops import library


def _first_order_only() -> None:
    """The backward passes cut the graph at the recomputed pre-activations: refuse to build a
    graph of them (create_graph=True) rather than give wrong second derivatives."""
    if torch.is_grad_enabled():
        raise RuntimeError("doe_kernels' gather ops are differentiable once: a backward with "
                           "create_graph=True (second derivatives) through them is not supported")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _through_activation(pre, grad, activation: str):
    """grad times the activation's derivative at `pre`."""
    if activation == "identity":
        return grad
    with torch.enable_grad():
        p = pre.detach().requires_grad_()
        (out,) = torch.autograd.grad(apply_activation(p, activation), p, grad)
    return out


def _at_rows(like: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A gradient shaped like `like`: `rows` at `index`, zeros elsewhere."""
    return torch.zeros_like(like).index_add_(0, index, rows.to(like.dtype))


def _rows_product(x2d, weight, rows, backend):
    """x2d @ weight[rows].T (weight: rows x features)."""
    return library._gather_rows_linear_op(x2d, weight, None, rows, "identity", backend)


def _cols_product(h2d, weight, rows, backend):
    """h2d @ weight[rows] (h2d: one column per entry of `rows`)."""
    return library._gather_cols_linear_op(h2d, weight, None, rows, backend)


def _save(ctx, inputs, tensors: tuple, names: tuple) -> None:
    """Save the tensor inputs at positions `tensors` (None past the inputs given: a trailing
    `scales` left out) and keep the other inputs by name."""
    ctx.save_for_backward(*(inputs[i] if i < len(inputs) else None for i in tensors))
    for index, name in names:
        setattr(ctx, name, inputs[index])


def _needs(ctx, index: int) -> bool:
    """Whether the input at `index` (given, and differentiable) wants a gradient."""
    need = ctx.needs_input_grad
    return index < len(need) and need[index]


def _returned(ctx, *grads):
    """One gradient per input given (a trailing `scales` may have been left out)."""
    return grads[:len(ctx.needs_input_grad)]


def _up_backward(ctx, g, x, weight, bias, rows):
    """The gradients of x, weight and bias (inputs 0, 1, 2) of x @ weight[rows].T + bias[rows]
    from the gradient `g` (rows of x flattened x kept) reaching its output."""
    gx = None
    if _needs(ctx, 0):
        gx = _cols_product(g, weight, rows, ctx.backend).reshape(x.shape)
    gw = _at_rows(weight, rows, g.T @ _flat(x)) if _needs(ctx, 1) else None
    gb = _at_rows(bias, rows, g.sum(0)) if _needs(ctx, 2) else None
    return gx, gw, gb


# gather_rows_linear(x, weight, bias, rows, activation, backend)
def _rows_linear_setup(ctx, inputs, output):
    _save(ctx, inputs, (0, 1, 2, 3), ((4, "activation"), (5, "backend")))


def _rows_linear_backward(ctx, grad):
    _first_order_only()
    x, weight, bias, rows = ctx.saved_tensors
    x2d, g = _flat(x), _flat(grad)
    if ctx.activation != "identity":
        pre = library._gather_rows_linear_op(x2d, weight, bias, rows, "identity", ctx.backend)
        g = _through_activation(pre, g, ctx.activation)
    return _returned(ctx, *_up_backward(ctx, g, x, weight, bias, rows), None, None, None)


# gather_cols_linear(h, weight_t, bias, cols, backend, scales)
def _cols_linear_setup(ctx, inputs, output):
    _save(ctx, inputs, (0, 1, 2, 3, 5), ((4, "backend"),))


def _cols_linear_backward(ctx, grad):
    _first_order_only()
    h, weight_t, bias, cols, scales = ctx.saved_tensors
    h2d, g = _flat(h), _flat(grad)
    to_h = _rows_product(g, weight_t, cols, ctx.backend)  # grad @ weight_t[cols].T
    gh = (to_h if scales is None else to_h * scales).reshape(h.shape) if _needs(ctx, 0) else None
    scaled = h2d if scales is None else h2d * scales
    gw = _at_rows(weight_t, cols, scaled.T @ g) if _needs(ctx, 1) else None
    gb = g.sum(0).to(bias.dtype) if _needs(ctx, 2) else None
    gs = (h2d * to_h).sum(0) if _needs(ctx, 5) else None
    return _returned(ctx, gh, gw, gb, None, None, gs)


def _down_backward(ctx, g, hidden, w_out_t, kept, scales):
    """The down projection's gradients from the kept neurons' activations `hidden` (rows x kept):
    (the gradient reaching `hidden`, w_out_t's, the scales')."""
    to_hidden = _rows_product(g, w_out_t, kept, ctx.backend)
    scaled = hidden if scales is None else hidden * scales
    gw = _at_rows(w_out_t, kept, scaled.T @ g) if _needs(ctx, ctx.down_index) else None
    gs = (hidden * to_hidden).sum(0) if _needs(ctx, ctx.scales_index) else None
    return (to_hidden if scales is None else to_hidden * scales), gw, gs


# gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales)
def _ffn_setup(ctx, inputs, output):
    _save(ctx, inputs, (0, 1, 2, 3, 4, 5, 8), ((6, "activation"), (7, "backend")))
    ctx.down_index, ctx.scales_index = 3, 8


def _ffn_backward(ctx, grad):
    _first_order_only()
    x, w_in, b_in, w_out_t, b_out, kept, scales = ctx.saved_tensors
    x2d, g = _flat(x), _flat(grad)
    pre = library._gather_rows_linear_op(x2d, w_in, b_in, kept, "identity", ctx.backend)
    hidden = apply_activation(pre, ctx.activation)
    to_hidden, gw_out, gs = _down_backward(ctx, g, hidden, w_out_t, kept, scales)
    g_pre = _through_activation(pre, to_hidden, ctx.activation)
    gx, gw_in, gb_in = _up_backward(ctx, g_pre, x, w_in, b_in, kept)
    gb_out = g.sum(0).to(b_out.dtype) if _needs(ctx, 4) else None
    return _returned(ctx, gx, gw_in, gb_in, gw_out, gb_out, None, None, None, gs)


# gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend, scales)
def _swiglu_setup(ctx, inputs, output):
    _save(ctx, inputs, (0, 1, 2, 3, 4, 6), ((5, "backend"),))
    ctx.down_index, ctx.scales_index = 3, 6


def _swiglu_backward(ctx, grad):
    _first_order_only()
    x, w_gate, w_up, w_down_t, kept, scales = ctx.saved_tensors
    x2d, g = _flat(x), _flat(grad)
    gate = _rows_product(x2d, w_gate, kept, ctx.backend)
    up = _rows_product(x2d, w_up, kept, ctx.backend)
    with torch.enable_grad():
        gate_in = gate.detach().requires_grad_()
        silu = torch.nn.functional.silu(gate_in)
    to_hidden, gw_down, gs = _down_backward(ctx, g, silu.detach() * up, w_down_t, kept, scales)
    (g_gate,) = torch.autograd.grad(silu, gate_in, to_hidden * up)
    g_up = to_hidden * silu.detach()
    gx = None
    if _needs(ctx, 0):
        gx = (_cols_product(g_gate, w_gate, kept, ctx.backend)
              + _cols_product(g_up, w_up, kept, ctx.backend)).reshape(x.shape)
    gw_gate = _at_rows(w_gate, kept, g_gate.T @ x2d) if _needs(ctx, 1) else None
    gw_up = _at_rows(w_up, kept, g_up.T @ x2d) if _needs(ctx, 2) else None
    return _returned(ctx, gx, gw_gate, gw_up, gw_down, None, None, gs)


library._gather_rows_linear_op.register_autograd(_rows_linear_backward,
                                                 setup_context=_rows_linear_setup)
library._gather_cols_linear_op.register_autograd(_cols_linear_backward,
                                                 setup_context=_cols_linear_setup)
library._gather_ffn_op.register_autograd(_ffn_backward, setup_context=_ffn_setup)
library._gather_swiglu_ffn_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)
