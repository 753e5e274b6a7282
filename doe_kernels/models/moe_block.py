"""The patched mixture-of-experts block: routing among the kept experts, dynamic skipping, and the
expert FFNs computed grouped by expert.

Routing (`route`) is Mixtral's: softmax of the router logits in float32, top-k, weights
renormalised to sum to one. Dropping experts excludes their logits before the softmax (the same as
setting them to minus infinity). Dynamic skipping (Lu et al. 2024) zeroes every non-top expert of
a token whose weight is below `beta` times the token's top weight, before the renormalisation (as
the paper's implementation does: a token left with one expert gives it weight one).

The block computes the router logits by calling the model's own router module (`gate`), as the
unpatched block does, so transformers' output recording (a hook on that module) sees them:
`output_router_logits=True` returns, per layer, the router's logits for every expert, dropped
ones included, as the unpatched model computes them from the same hidden states (what the router
module outputs; equal to the unpatched model's when the mask keeps everything). The auxiliary
load-balancing loss Mixtral computes from them is therefore the unpatched router's: it counts
the dropped experts and does not see dynamic skipping.

The expert FFNs read the model's own fused weights (`gate_up_proj`, experts x 2I x H, and the down
projection held input-major, experts x I x H): token-expert pairs are sorted by expert and run as
one grouped GEMM per projection (`torch.nn.functional.grouped_mm`) where PyTorch has it for the
device and dtype, else one GEMM per expert that received tokens. With a neuron mask each expert
runs the gather SwiGLU op on the kept neurons instead, and so does every expert over the full list
where the CPU kernels beat ATen's GEMMs (`library.dense_in_kernel`: a few rows, float32 at any
row count on AMD CPUs with AVX-512, and bfloat16 at any row count on CPUs without AVX-512).

In a mixed-task batch (doe_kernels.mixed) the block holds the layer's `segments`: every row's
router logits come from one call of the router module, each segment's rows are routed among its
own expert's kept experts (and its skipping threshold), and the token-expert pairs of segments on
the same neurons run together, grouped by MoE expert, whatever their task. A pass returning the
router logits computes every position (`mixed`), so they come in the padded layout as
unpatched.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from doe_kernels.models.segments import over_rows
from doe_kernels.ops import library
from doe_kernels.ops.linear import input_major_view

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass(frozen=True)
class MoePlan:
    """One layer's routing plan: kept experts (sorted, on the model's device; None = all) and the
    dynamic-skipping threshold (None = no skipping)."""

    kept: torch.Tensor | None = None
    beta: float | None = None

    def apply(self, fn) -> "MoePlan":
        return MoePlan(None if self.kept is None else fn(self.kept), self.beta)


FULL_PLAN = MoePlan()


def route(logits: torch.Tensor, top_k: int, kept: torch.Tensor | None = None,
          normalize: bool = True, beta: float | None = None):
    """(weights, experts), both (tokens, top_k), from router logits (tokens, num_experts).

    `kept` restricts routing to those experts; `beta` zeroes non-top weights below beta x top
    (then the remaining weights are renormalised when `normalize`).
    Expert numbers are the model's (not positions in `kept`).
    """
    if kept is not None:
        logits = logits.index_select(-1, kept)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if beta is not None and top_k > 1:  # before renormalising, as Lu et al.'s implementation
        rest = weights[:, 1:]
        weights = torch.cat([weights[:, :1], rest.masked_fill(rest < beta * weights[:, :1], 0.0)], 1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if kept is not None:
        experts = kept[experts]
    return weights, experts


def _use_grouped_mm(x: torch.Tensor, hidden: int, intermediate: int) -> bool:
    """Whether PyTorch's grouped GEMM takes these experts (experts_forward hands them to the op
    instead where the cpu backend's kernels may run an expert: `library.dense_in_kernel` of one
    row)."""
    if _grouped_mm is None:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # its meta function (FakeTensor) takes bfloat16 only
    if x.device.type == "cpu":  # operand rows a multiple of 16 bytes, as PyTorch checks
        aligned = hidden % (16 // x.element_size()) == 0 and \
            intermediate % (16 // x.element_size()) == 0
        return x.dtype in (torch.float32, torch.bfloat16) and aligned
    # cuBLAS/CUTLASS grouped GEMM: bfloat16, rows 16-byte aligned.
    return x.dtype == torch.bfloat16 and hidden % 8 == 0 and intermediate % 8 == 0


def experts_forward(x, weights, experts, gate_up, down_t, neurons=None, backend="auto"):
    """sum_k weights[t, k] * FFN_{experts[t, k]}(x[t]) for every token t.

    x (tokens, H); weights float (tokens, k), a zero weight means the pair is skipped; experts
    (tokens, k); gate_up (E, 2I, H); down_t (E, I, H); neurons: kept neuron indices or None.
    """
    num_experts, two_i, hidden = gate_up.shape
    intermediate = two_i // 2
    top_k = experts.shape[1]
    flat_w = weights.reshape(-1)
    skipped = flat_w == 0
    flat_e = experts.reshape(-1).masked_fill(skipped, num_experts)  # skipped pairs sort last
    sorted_e, order = torch.sort(flat_e, stable=True)
    tokens = order // top_k
    valid = (sorted_e < num_experts).unsqueeze(1)  # the pairs not skipped, first
    xs = x.index_select(0, tokens)
    # each expert's group ends where the sorted ids pass it (bincount would read the ids' range
    # back from a GPU: a sync, which a CUDA graph's capture forbids)
    ends = torch.searchsorted(sorted_e, torch.arange(num_experts, device=sorted_e.device),
                              right=True)
    # Where one row's call may run the cpu backend's kernel (an eager CPU call), every expert
    # gets the full list and the op picks the kernel or ATen's GEMM by its own row count: on an
    # AVX2 CPU at 8-16 tokens (decoding-sized groups) that took a quarter of the grouped GEMM's
    # time in float32; with more rows per expert the two tie within run-to-run noise
    if neurons is None and library.dense_in_kernel(xs[:1], backend, gate_up, down_t):
        neurons = library.every_index(intermediate, x.device)
    if neurons is None and _use_grouped_mm(x, hidden, intermediate):
        offsets = ends.to(torch.int32)
        if torch.is_grad_enabled() and x.requires_grad:
            # the grouped GEMMs leave the rows past the groups (skipped pairs) unwritten, in
            # their input's gradient too: none of it may reach x's
            xs = torch.where(valid, xs, 0.0)
        gate, up = _grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        ys = _grouped_mm(F.silu(gate) * up, down_t, offs=offsets)
    else:
        ys = xs.new_zeros(xs.shape)
        start = 0
        for expert, end in enumerate(ends.tolist()):
            if end > start:
                rows = slice(start, end)
                ys[rows] = expert_ffn(xs[rows], gate_up[expert], down_t[expert], intermediate,
                                       neurons, backend)
                start = end
    scale = flat_w.index_select(0, order).unsqueeze(1)
    # rows past the groups are not written: masked before the scale (whose gradient reads them)
    ys = (torch.where(valid, ys, 0.0) * scale).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, ys)


def expert_ffn(x, gate_up, down_t, intermediate, neurons=None, backend="auto"):
    """One expert's SwiGLU FFN on rows x (fused gate_up (2I, H), down_t (I, H) input-major),
    on the kept `neurons` only when given (a full list: the op runs the kernel or torch's GEMMs,
    whichever library.dense_in_kernel says is faster)."""
    if neurons is None:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate) * up, down_t)
    return library.gather_swiglu_ffn(x, gate_up[:intermediate], gate_up[intermediate:], down_t,
                                     neurons, backend)


class PrunedMoeBlock(nn.Module):
    """A Mixtral-style sparse MoE block routing among the kept experts (see the module docstring).

    Holds the model's router module (`gate`, called as the unpatched block calls it) and
    `gate_up_proj` and `down_proj` Parameters, the latter laid out input-major (`down_t`).
    `kept` (FFN neurons inside every expert) and the routing plan are set by the patching layer;
    an expert swap changes only them. `jitter_noise`: the model's router jitter, applied to the
    block's input in training mode as Mixtral does.
    """

    def __init__(self, gate, gate_up, down, top_k, normalize=True, backend="auto",
                 jitter_noise: float = 0.0):
        super().__init__()
        self.gate, self.gate_up, self.down = gate, gate_up, down
        self.top_k, self.normalize, self.backend = top_k, normalize, backend
        self.jitter_noise = jitter_noise
        self.register_buffer("kept", None, persistent=False)
        self.plan = FULL_PLAN
        self.segments = None  # a mixed batch's (models/segments.py)

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's weight (experts x hidden)."""
        return self.gate.weight

    @property
    def down_t(self) -> torch.Tensor:
        """The experts' down projections input-major (experts x intermediate x hidden)."""
        return input_major_view(self.down)

    def set_routing(self, plan: MoePlan | None) -> None:
        self.plan = plan or FULL_PLAN

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.plan = self.plan.apply(fn)  # keep the kept-expert list on the module's device
        return self

    def forward(self, hidden_states):
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        if self.segments is not None:
            return over_rows(self.segments, hidden_states, self._mixed_rows)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        # The model's own router module, so that transformers records its logits
        # (output_router_logits); its top-k is the routing when every expert is kept.
        logits, weights, experts = self.gate(x)
        weights, experts = self._routed(logits, weights, experts, self.plan)
        out = experts_forward(x, weights, experts, self.gate_up, self.down_t, self.kept,
                              self.backend)
        return out.reshape(hidden_states.shape)

    def _routed(self, logits, weights, experts, plan: MoePlan):
        """(weights, experts) of rows under `plan`: the router module's own where it keeps every
        expert, skips none and renormalises (Mixtral's rule), else `route`."""
        if plan.kept is not None or plan.beta is not None or not self.normalize:
            return route(logits, self.top_k, plan.kept, self.normalize, plan.beta)
        return weights, experts

    def _mixed_rows(self, x, row_segments, key):
        """The block over rows `x` of a mixed batch, FFN segment s being rows row_segments[s] to
        row_segments[s + 1] (segments.over_rows; `key`, the layout, gives them on the host):
        each segment routed by its expert's plan, the segments on the same neurons run as one."""
        logits, weights, experts = self.gate(x)
        bounds = self.segments.row_bounds(key)  # on the host: no device sync
        routed, groups = [], {}
        for s, plan in enumerate(self.segments.ffn_plans):
            rows = slice(bounds[s], bounds[s + 1])
            routed.append(self._routed(logits[rows], weights[rows], experts[rows],
                                       plan.moe or FULL_PLAN))
            groups.setdefault(id(plan.kept), (plan.kept, []))[1].append(s)
        weights = torch.cat([w for w, _ in routed])
        experts = torch.cat([e for _, e in routed])
        if len(groups) == 1:
            return experts_forward(x, weights, experts, self.gate_up, self.down_t,
                                   self.segments.ffn_plans[0].kept, self.backend)
        out = torch.empty_like(x)
        for neurons, members in groups.values():
            index = torch.cat([torch.arange(bounds[s], bounds[s + 1], device=x.device)
                               for s in members])
            out.index_copy_(0, index, experts_forward(
                x.index_select(0, index), weights.index_select(0, index),
                experts.index_select(0, index), self.gate_up, self.down_t, neurons,
                self.backend))
        return out

    def extra_repr(self):
        total = self.gate_up.shape[0]
        kept = total if self.plan.kept is None else self.plan.kept.numel()
        skip = "off" if self.plan.beta is None else f"beta={self.plan.beta:.3f}"
        neurons = self.down_t.shape[1] if self.kept is None else self.kept.numel()
        return (f"experts={kept}/{total} kept, top_k={self.top_k}, skipping {skip}, "
                f"neurons={neurons}/{self.down_t.shape[1]} per expert, backend={self.backend}")
