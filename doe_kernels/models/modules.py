"""The modules a patched model runs: linear layers and an MLP that read only the kept neurons.

They hold the model's own weight Parameters (no copies); the down projections' are laid out
input-major in place at patch time (the Parameter keeps its shape; its data becomes the transpose
of a contiguous input-major tensor, which the modules read as `weight_t` / `w_down_t`; the
original layout is restored at unpatch), so gradients reach them too. Index tensors are
non-persistent buffers, so `model.to(...)` moves them.
An expert swap only replaces their `kept` index tensors and the expert's reconstruction of a down
or attention output projection: `bias_delta`, added to its output, and `scales`, one per kept
input (aligned with `kept`), multiplying each kept input's contribution; both non-persistent
buffers in the model's dtype, None costing nothing. `kept = None` means every neuron is kept: the
module then runs the plain dense computation (with `scales` then one per input); the linear
layers run the kernel over every index instead where that is faster (`library.dense_in_kernel`:
float32 on AMD CPUs with AVX-512, bfloat16 on CPUs without AVX-512).

While a mixed-task batch is served (doe_kernels.mixed), a module that computes a whole block (an
MLP, a BERT FFN's down projection, an attention) holds the layer's `segments`
(models/segments.py) and runs each segment on its expert; the modules a block's computation
replaces (a BERT FFN's up projection and attention output projection) are `passthrough`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from doe_kernels.activations import apply_activation
from doe_kernels.models.segments import ffn_forward, swiglu_forward
from doe_kernels.ops import HeadSelection, library, project_qkv, scale_columns
from doe_kernels.ops.attention import empty_heads
from doe_kernels.ops.linear import dense_cols_linear, input_major_view


def _kept_repr(kept, total: int) -> str:
    return f"{total if kept is None else kept.numel()}/{total} kept"


def _kept_or_all(kept, total: int, x: torch.Tensor) -> torch.Tensor:
    """`kept`, or every index 0..total-1 when it is None (a keep-all call through the kernels)."""
    return kept if kept is not None else library.every_index(total, x.device)


def add_bias_delta(out: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """`out + delta` (an expert's bias compensation), or `out` itself when there is none."""
    return out if delta is None else out + delta


def reconstruction_repr(module) -> str:
    """What a module's extra_repr adds for the expert's bias delta and scales it holds."""
    return ((", bias-compensated" if getattr(module, "bias_delta", None) is not None else "")
            + (", scaled" if getattr(module, "scales", None) is not None else ""))


class KeptRowsLinear(nn.Module):
    """`act(x @ weight[kept].T + bias[kept])`: a linear layer computing only its kept outputs."""

    def __init__(self, weight, bias, activation: str = "identity", backend: str = "auto"):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.activation, self.backend = activation, backend
        self.register_buffer("kept", None, persistent=False)
        self.passthrough = False

    def forward(self, x):
        if self.passthrough:
            return x
        if self.kept is None and not library.dense_in_kernel(x, self.backend, self.weight):
            return apply_activation(F.linear(x, self.weight, self.bias), self.activation)
        return library.gather_rows_linear(x, self.weight, self.bias,
                                          _kept_or_all(self.kept, self.weight.shape[0], x),
                                          self.activation, self.backend)

    def extra_repr(self):
        return (f"in={self.weight.shape[1]}, out={_kept_repr(self.kept, self.weight.shape[0])}, "
                f"activation={self.activation}, backend={self.backend}")


class KeptColsLinear(nn.Module):
    """`x_kept @ W[:, kept].T + bias`, with W (`weight`, out x in) laid out input-major
    (`weight_t`, one row per input)."""

    def __init__(self, weight, bias, backend: str = "auto"):
        super().__init__()
        self.weight, self.bias, self.backend = weight, bias, backend
        self.register_buffer("kept", None, persistent=False)
        self.register_buffer("bias_delta", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.passthrough, self.segments = False, None

    @property
    def weight_t(self) -> torch.Tensor:
        return input_major_view(self.weight)

    def run_up_projection_of(self, up: KeptRowsLinear) -> None:
        """Serve mixed batches as a whole FFN: `up` (the up projection, passed through then)
        feeds this down projection."""
        self.__dict__["up"] = up  # not a submodule: the layer already holds it

    def forward(self, x_kept):
        if self.passthrough:
            return x_kept
        if self.segments is not None:
            up = self.__dict__["up"]
            return ffn_forward(self.segments, x_kept, up.weight, up.bias, up.activation,
                               self.weight_t, self.bias, self.backend)
        if self.kept is None and not library.dense_in_kernel(x_kept, self.backend, self.weight_t):
            out = dense_cols_linear(x_kept, self.weight_t, self.bias, self.scales)
        else:
            cols = _kept_or_all(self.kept, self.weight_t.shape[0], x_kept)
            out = library.gather_cols_linear(x_kept, self.weight_t, self.bias, cols, self.backend,
                                             self.scales)
        return add_bias_delta(out, self.bias_delta)

    def extra_repr(self):
        return (f"in={_kept_repr(self.kept, self.weight_t.shape[0])}, out={self.weight_t.shape[1]}, "
                f"backend={self.backend}{reconstruction_repr(self)}")


class GatherSwiGLUMLP(nn.Module):
    """A LLaMA-style MLP (`down(silu(gate(x)) * up(x))`) on the kept neurons only; the down
    projection's weight (`w_down`) laid out input-major (`w_down_t`)."""

    def __init__(self, w_gate, w_up, w_down, backend: str = "auto"):
        super().__init__()
        self.w_gate, self.w_up, self.w_down, self.backend = w_gate, w_up, w_down, backend
        self.register_buffer("kept", None, persistent=False)
        self.register_buffer("bias_delta", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.segments = None

    @property
    def w_down_t(self) -> torch.Tensor:
        return input_major_view(self.w_down)

    def forward(self, x):
        if self.segments is not None:
            return swiglu_forward(self.segments, x, self.w_gate, self.w_up, self.w_down_t,
                                  self.backend)
        # With every neuron kept the float32 kernel only ties with torch's GEMMs; other dtypes
        # pass the full list to the op, whose dense path runs them where the kernel would not
        # win (library.dense_in_kernel: in bfloat16 it wins decoding, and at every row count on
        # CPUs without AVX-512, where PyTorch's bfloat16 GEMMs are slow)
        if self.kept is None and x.dtype == torch.float32:
            hidden = F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up)
            out = torch.matmul(scale_columns(hidden, self.scales), self.w_down_t)
        else:
            kept = _kept_or_all(self.kept, self.w_gate.shape[0], x)
            out = library.gather_swiglu_ffn(x, self.w_gate, self.w_up, self.w_down_t, kept,
                                            self.backend, self.scales)
        return add_bias_delta(out, self.bias_delta)

    def extra_repr(self):
        return (f"hidden={self.w_gate.shape[1]}, "
                f"neurons={_kept_repr(self.kept, self.w_gate.shape[0])}, backend={self.backend}"
                f"{reconstruction_repr(self)}")


class PrunedAttention(nn.Module):
    """Base of the patched attention modules: Q, K, V projections of the kept heads only.

    Holds the original q/k/v Parameters; `selection` (a HeadSelection) says which heads are kept.
    `attention_dropout` is the model's dropout probability on the attention probabilities,
    applied in training mode only (`dropout_p()`), as the original attention does. `config`, the
    model's, says which attention implementation runs (`eager()`).
    Subclasses implement the family's forward (rotary embeddings, cache, output projection).
    """

    EAGER_SOFTMAX = "float32"  # the family's eager attention: softmax in float32 (ops.attend)

    def __init__(self, q, k, v, num_heads, num_kv_heads, head_dim, scaling, backend="auto",
                 attention_dropout: float = 0.0, config=None):
        super().__init__()
        self.config = config
        self.q_weight, self.q_bias = q.weight, q.bias
        self.k_weight, self.k_bias = k.weight, k.bias
        self.v_weight, self.v_bias = v.weight, v.bias
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling, self.backend = scaling, backend
        self.attention_dropout = attention_dropout
        self.selection = None
        self.segments = None  # a mixed batch's (models/segments.py)

    def dropout_p(self) -> float:
        """The attention-probability dropout to apply now: the model's in training, 0 in eval."""
        return self.attention_dropout if self.training else 0.0

    def eager(self) -> str | None:
        """ops.attend's `eager`: the family's softmax where the model's attn_implementation is
        "eager" (read at each call, as transformers' attention modules read it), else None."""
        if getattr(self.config, "_attn_implementation", None) == "eager":
            return self.EAGER_SOFTMAX
        return None

    def set_selection(self, selection: HeadSelection) -> None:
        self.selection = selection

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.selection is not None:  # keep the index lists on the module's device
            self.selection = self.selection.apply(fn)
        return self

    def qkv_weights(self) -> dict:
        """The Q, K, V projections' weights and biases, as project_qkv takes them."""
        return dict(q_weight=self.q_weight, q_bias=self.q_bias, k_weight=self.k_weight,
                    k_bias=self.k_bias, v_weight=self.v_weight, v_bias=self.v_bias)

    def no_heads(self, hidden):
        """The (batch, seq, 0) attention output of a layer keeping no head (ops.empty_heads:
        under autograd, through the projections' empty gathers, for their zero gradients)."""
        return empty_heads(hidden, self.qkv_weights(), self.selection, self.backend)

    def project(self, hidden):
        return project_qkv(hidden, self.q_weight, self.q_bias, self.k_weight, self.k_bias,
                           self.v_weight, self.v_bias, self.selection, self.backend)

    def extra_repr(self):
        kept = self.num_heads if self.selection is None else self.selection.num_kept
        kv = self.num_kv_heads if self.selection is None else self.selection.kept_kv_heads.numel()
        return (f"heads={kept}/{self.num_heads} kept, kv_heads={kv}/{self.num_kv_heads} computed, "
                f"head_dim={self.head_dim}, backend={self.backend}{reconstruction_repr(self)}")
