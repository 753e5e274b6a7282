"""A patched layer's plan for a mixed-task batch: which batch sequences run which expert.

While `doe_kernels.mixed` holds a batch composition, each patched layer holds a `LayerSegments`:
the batch's sequences grouped into segments (consecutive sequences on the same expert) and each
segment's `SegmentPlan` (its kept neurons and heads, bias deltas and scales, and in a
mixture-of-experts layer its kept experts: what `patch` sets for one expert). The FFN lists are
packed once for the segmented ops (`ops/segmented.py`); a mixture-of-experts block routes each
segment's rows among its own experts (models/moe_block.py); the attention runs each segment on
its own heads (GQA-aware, through the single-expert steps `project_qkv`, `attend`,
`project_out`).

A layer's KV cache holds every KV head while it serves a mixed batch (a segment's unused heads stay
zero), so that one cache tensor serves segments keeping different heads.
"""
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from doe_kernels.caller_state import lasting
from doe_kernels.ops import HeadSelection, attend, library, project_out, project_qkv
from doe_kernels.ops.attention import keys_of_pass, no_heads_output

if TYPE_CHECKING:
    from doe_kernels.models.moe_block import MoePlan


@dataclass(frozen=True)
class SegmentPlan:
    """One expert's plan of one layer (`patching._plans`), on the model's device and dtype."""

    kept: torch.Tensor | None  # kept FFN neurons (None: all)
    selection: HeadSelection
    ffn_delta: torch.Tensor | None = None
    attn_delta: torch.Tensor | None = None
    ffn_scales: torch.Tensor | None = None  # one per kept neuron
    head_col_scales: torch.Tensor | None = None  # one per column of the kept heads
    moe: "MoePlan | None" = None  # a mixture-of-experts layer's routing plan


def rows_of(tensor, start: int, stop: int):
    """Batch rows [start, stop) of a per-sequence tensor (None, or one broadcast row, as is)."""
    if tensor is None or tensor.shape[0] == 1:
        return tensor
    return tensor[start:stop]


class LayerSegments:
    """One layer's segments for one batch composition: `bounds` (sequence offsets, one more than
    segments; segment s is sequences [bounds[s], bounds[s + 1])) and one SegmentPlan each."""

    def __init__(self, bounds: list[int], plans: list[SegmentPlan], intermediate_size: int):
        self.bounds, self.plans = list(bounds), list(plans)
        self.intermediate_size = intermediate_size
        device = plans[0].selection.kept_heads.device
        # the FFN's segments: neighbours on the same neurons and scales merged
        ffn_runs = merge_runs(zip(self.bounds, self.bounds[1:], plans), _same_ffn)
        self.ffn_bounds = [self.bounds[0]] + [stop for _, stop, _ in ffn_runs]
        self.ffn_plans = ffn_plans = [plan for _, _, plan in ffn_runs]
        lists = [torch.arange(intermediate_size, device=device) if p.kept is None else p.kept
                 for p in ffn_plans]
        # offsets stay on the host (as row_segments' and packed_offsets'): the segmented ops
        # read them there, so a GPU call waits for no copy back (ops/segmented.py)
        self.kept_offsets = torch.tensor([0] + [k.numel() for k in lists]).cumsum(0)
        self.kept = torch.cat(lists)
        self.ffn_scales = None
        if any(p.ffn_scales is not None for p in ffn_plans):
            self.ffn_scales = torch.cat([
                p.ffn_scales if p.ffn_scales is not None else
                torch.ones(k.numel(), device=device, dtype=_dtype(ffn_plans)) for p, k in
                zip(ffn_plans, lists)])
        self.ffn_delta = self._per_sequence([p.ffn_delta for p in plans])
        self._row_segments: dict[int, torch.Tensor] = {}
        self._unions: dict = {}
        self.real: RealTokens | None = None  # the batch's real tokens, when `mixed` was told
        self._packed_offsets = self._packed_delta = None

    @property
    def batch(self) -> int:
        return self.bounds[-1]

    def spans(self):
        """(first sequence, end, SegmentPlan) of each segment holding sequences."""
        return [(b0, b1, plan) for b0, b1, plan in zip(self.bounds, self.bounds[1:], self.plans)
                if b1 > b0]

    def attention_spans(self):
        """`spans` with neighbours that compute attention alike (the same heads, no attention
        reconstruction) merged: experts that keep every head run attention as one batch."""
        return merge_runs(self.spans(), _same_attention)

    def check_batch(self, batch: int) -> None:
        if batch != self.batch:
            raise ValueError(f"the batch has {batch} sequences, but doe_kernels.mixed was given "
                             f"{self.batch} masks (one per sequence)")

    def row_segments(self, batch: int, tokens: int) -> torch.Tensor:
        """The FFN's segment offsets over the rows of the batch flattened to (batch * tokens,
        hidden), on the host."""
        self.check_batch(batch)
        if tokens not in self._row_segments:
            with lasting():  # (caches outlive the pass: see caller_state.lasting)
                self._row_segments[tokens] = torch.tensor(self.row_bounds(tokens))
        return self._row_segments[tokens]

    def row_bounds(self, key) -> list[int]:
        """The FFN's segment offsets over the rows of layout `key` (over_rows': "packed", the real
        tokens, or the number of tokens per sequence), as ints (row_segments and packed_offsets
        hold them as tensors)."""
        if key == "packed":
            return [self.real.offsets[b] for b in self.ffn_bounds]
        return [b * key for b in self.ffn_bounds]

    def real_tokens(self, batch: int, tokens: int):
        """The RealTokens of the padded batch whose attention mask `mixed` was given, during a
        forward pass of that batch with padding; else None."""
        self.check_batch(batch)
        real = self.real
        if (real is None or not real.active or real.shape != (batch, tokens)
                or real.index.numel() == batch * tokens):
            return None
        return real

    def packed(self, batch: int, tokens: int):
        """(the flat row index of the real tokens, the FFN's segment offsets over them) during a
        forward pass of the padded batch whose attention mask `mixed` was given, else None."""
        real = self.real_tokens(batch, tokens)
        if real is None:
            return None
        return real.index, self.packed_offsets()

    def packed_offsets(self) -> torch.Tensor:
        """The FFN's segment offsets over the batch's real tokens packed, on the host."""
        if self._packed_offsets is None:
            with lasting():
                self._packed_offsets = torch.tensor(self.row_bounds("packed"))
        return self._packed_offsets

    def holds_packed(self, x: torch.Tensor) -> bool:
        """Whether `x` is the batch's real tokens packed (a pass that runs its layers packed:
        RealTokens.pack)."""
        return self.real is not None and self.real.holds_packed(x)

    def packed_delta(self):
        """(1, real tokens, hidden): each real token's segment's FFN bias delta, or None."""
        if self.ffn_delta is None:
            return None
        if self._packed_delta is None:
            offsets = self.real.offsets
            with lasting():
                counts = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])],
                                      device=self.ffn_delta.device)
                self._packed_delta = self.ffn_delta[:, 0].repeat_interleave(counts, dim=0)[None]
        return self._packed_delta

    def union(self, x2d: torch.Tensor, row_segments: torch.Tensor, key, up_matrices: int):
        """The FFN's union plan (library.union_plan: (union, row_mask), or None to run per
        segment) for the rows `x2d` in segments `row_segments`, computed once per `key` (the
        layout: each decoding step of a generation reuses it); `up_matrices`: 1 (BERT's FFN) or
        2 (SwiGLU's)."""
        key = (key, x2d.shape[0], x2d.dtype)
        if key not in self._unions:
            with lasting():
                self._unions[key] = library.union_plan(
                    x2d, row_segments, self.kept, self.kept_offsets, self.ffn_scales,
                    neurons=self.intermediate_size, up_matrices=up_matrices)
        return self._unions[key]

    def _per_sequence(self, deltas):
        """(batch, 1, hidden): each sequence's segment's delta (zeros where it has none), or None
        when no segment has one."""
        if all(d is None for d in deltas):
            return None
        like = next(d for d in deltas if d is not None)
        stacked = torch.stack([torch.zeros_like(like) if d is None else d for d in deltas])
        counts = torch.tensor([b1 - b0 for b0, b1 in zip(self.bounds, self.bounds[1:])],
                              device=like.device)
        return stacked.repeat_interleave(counts, dim=0).unsqueeze(1)


class RealTokens:
    """The real (not padding) tokens of a (batch, tokens) attention mask of 0s and 1s: their
    flat row index, `offsets`, the number of real tokens before each sequence (one more entry
    than sequences), and `widths`, the positions each sequence's real tokens span (from its
    first to its last, padding between them included). `active`: whether the forward pass
    running is of that batch (`mixed` sets it from the pass's attention_mask). `pack_layers`:
    whether such a pass runs packed from the first layer's input to the last layer's output
    (`pack`, `unpack`; `mixed`'s pack_layers)."""

    def __init__(self, attention_mask: torch.Tensor, pack_layers: bool = False):
        self.mask = attention_mask.to(torch.bool, copy=True)  # (not the caller's tensor)
        self.shape = tuple(self.mask.shape)
        self.index = self.mask.reshape(-1).nonzero().squeeze(1)
        self.offsets = [0] + self.mask.sum(1).cumsum(0).tolist()
        self.padded = self.offsets[-1] < self.mask.numel()
        self.active = False
        self.pack_layers = pack_layers
        self._spans: dict[tuple[int, int], torch.Tensor] = {}

    def packing(self) -> bool:
        """Whether the pass running is this batch's and runs its layers packed."""
        return self.active and self.pack_layers and self.padded

    def holds_packed(self, hidden: torch.Tensor) -> bool:
        """Whether `hidden` is this batch's real tokens packed, (1, real tokens, width): a
        layer's input in a pass that runs packed."""
        return self.packing() and tuple(hidden.shape[:2]) == (1, self.offsets[-1])

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, real tokens, width): the real tokens' rows of a (batch, tokens, width) tensor."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)[None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) from `pack`'s layout, zeros at the padding."""
        return _unpack(packed[0], self.index, self.mask.numel()).view(*self.shape, -1)

    @functools.cached_property
    def widths(self) -> list[int]:
        """Per sequence, the positions its real tokens span (read by the CPU's attention only)."""
        return _widths(self.mask)

    def span_index(self, start: int, stop: int) -> torch.Tensor:
        """The row index of sequences [start, stop)'s real tokens within those sequences' rows
        (cached: every layer asks for the same spans)."""
        if (start, stop) not in self._spans:
            index = self.index[self.offsets[start]:self.offsets[stop]]
            with lasting():
                self._spans[start, stop] = index - start * self.shape[1]
        return self._spans[start, stop]

    def matches(self, attention_mask) -> bool:
        """Whether `attention_mask` (a forward pass's) is this batch's."""
        return (isinstance(attention_mask, torch.Tensor)
                and tuple(attention_mask.shape) == self.shape
                and torch.equal(attention_mask.to(self.mask.device, torch.bool), self.mask))


def _widths(mask: torch.Tensor) -> list[int]:
    """Per row of a (batch, tokens) boolean mask: last true position - first + 1 (0 if none)."""
    if mask.shape[1] == 0:
        return [0] * mask.shape[0]
    positions = torch.arange(mask.shape[1], device=mask.device)
    first = torch.where(mask, positions, mask.shape[1]).amin(1)
    last = torch.where(mask, positions, -1).amax(1)
    return (last - first + 1).clamp_min(0).tolist()


def merge_runs(runs, same) -> list[tuple]:
    """(start, stop, item) runs with each run joined to the one before it when `same(item
    before, item)`; a joined run keeps the first item."""
    merged = []
    for start, stop, item in runs:
        if merged and same(merged[-1][2], item):
            merged[-1] = (merged[-1][0], stop, merged[-1][2])
        else:
            merged.append((start, stop, item))
    return merged


def _same_ffn(a: SegmentPlan, b: SegmentPlan) -> bool:
    return a.kept is b.kept and a.ffn_scales is b.ffn_scales and a.moe is b.moe


def _same_attention(a: SegmentPlan, b: SegmentPlan) -> bool:
    if any(p.attn_delta is not None or p.head_col_scales is not None for p in (a, b)):
        return False
    return a.selection is b.selection or (a.selection.is_full and b.selection.is_full)


def _dtype(plans) -> torch.dtype:
    return next(p.ffn_scales.dtype for p in plans if p.ffn_scales is not None)


def _add(out: torch.Tensor, per_sequence: torch.Tensor | None) -> torch.Tensor:
    return out if per_sequence is None else out + per_sequence


def _flat(x: torch.Tensor):
    """(x as (rows, hidden), batch, tokens): a (batch, tokens, hidden) or (batch, hidden) input."""
    batch, tokens = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
    return x.reshape(batch * tokens, x.shape[-1]), batch, tokens


def swiglu_forward(segments: LayerSegments, x, w_gate, w_up, w_down_t, backend: str):
    """A LLaMA-style MLP over a mixed batch: each segment on its expert's neurons."""
    return _ffn_forward(
        segments, x, 2,
        lambda x2d, union, row_mask: library.union_gather_swiglu_ffn(
            x2d, w_gate, w_up, w_down_t, union, row_mask, backend),
        lambda x2d, rows, strategy: library.segmented_gather_swiglu_ffn(
            x2d, w_gate, w_up, w_down_t, rows, segments.kept, segments.kept_offsets, backend,
            segments.ffn_scales, strategy=strategy))


def ffn_forward(segments: LayerSegments, x, w_in, b_in, activation: str, w_out_t, b_out,
                backend: str):
    """A BERT FFN (up projection, activation, down projection) over a mixed batch."""
    return _ffn_forward(
        segments, x, 1,
        lambda x2d, union, row_mask: library.union_gather_ffn(
            x2d, w_in, b_in, w_out_t, b_out, union, row_mask, activation, backend),
        lambda x2d, rows, strategy: library.segmented_gather_ffn(
            x2d, w_in, b_in, w_out_t, b_out, rows, segments.kept, segments.kept_offsets,
            activation, backend, segments.ffn_scales, strategy=strategy))


def _ffn_forward(segments: LayerSegments, x, up_matrices: int, run_union, run_segments):
    """An FFN over a mixed batch (its up projection of `up_matrices` weight matrices), over_rows;
    then each sequence's segment's bias delta (on every row)."""
    out = over_rows(segments, x, lambda x2d, row_segments, key: _rows_forward(
        segments, x2d, row_segments, key, up_matrices, run_union, run_segments))
    delta = (segments.packed_delta() if segments.holds_packed(x)
             else _matching(segments.ffn_delta, x))
    return _add(out, delta)


def over_rows(segments: LayerSegments, x, run):
    """`run(x2d, row_segments, key)` (the FFN block of rows `x2d`, the FFN's segment s being rows
    row_segments[s] to row_segments[s + 1]; `key` names the layout for caches) over a mixed
    batch's hidden states `x`, shaped like x: over the real tokens only when the batch's are
    known (the padding's rows get zeros: no real token reads them; a pass packed between
    layers gives the real tokens alone)."""
    if segments.holds_packed(x):
        x2d = x.reshape(-1, x.shape[-1])
        out = run(x2d, segments.packed_offsets(), "packed")
        return out.view(*x.shape[:-1], out.shape[-1])  # (no real token: -1 cannot be inferred)
    x2d, batch, tokens = _flat(x)
    packed = segments.packed(batch, tokens)
    if packed is None:
        out = run(x2d, segments.row_segments(batch, tokens), tokens)
    else:
        index, offsets = packed
        out = _unpack(run(x2d.index_select(0, index), offsets, "packed"), index, x2d.shape[0])
    return out.view(*x.shape[:-1], out.shape[-1])


def _rows_forward(segments: LayerSegments, x2d, row_segments, key, up_matrices: int, run_union,
                  run_segments):
    """The FFN of rows `x2d` in segments `row_segments`: `run_union(x2d, union, row_mask)` where
    the layer's union plan for this layout (segments.union, cached under `key`) takes the union,
    else `run_segments(x2d, row_segments, "segments")`. Past one token per sequence (`key` 1:
    decoding, which keeps the plan, built once) on the CPU, where the extension plans a call in
    C++, the segmented op plans and runs it (`run_segments(..., "auto")`): the cpu backend's
    fused union path ran 1.5x faster than the union's separate gathers (MiniLM's FFN, 5 x 64
    rows, 1 thread; a mixed batch of 8 MiniLM requests 1.16x), and its plan costs little
    beside that many rows."""
    if key != 1 and library._plan_in_cpp(x2d, segments.kept, segments.ffn_scales):
        return run_segments(x2d, row_segments, "auto")
    union = segments.union(x2d, row_segments, key, up_matrices)
    return (run_segments(x2d, row_segments, "segments") if union is None
            else run_union(x2d, *union))


def _matching(per_sequence, x):
    """A (batch, 1, hidden) per-sequence tensor shaped to add to x (3-D as is, 2-D squeezed)."""
    if per_sequence is None or x.dim() == 3:
        return per_sequence
    return per_sequence.squeeze(1)


def attention_forward(segments: LayerSegments, hidden, weights: dict, o_weight_t, o_bias,
                      attention_mask, scale: float, dropout: float, backend: str, rotary=None,
                      cache_update=None, is_causal: bool = False,
                      sliding_window: int | None = None, eager: str | None = None):
    """Attention over a mixed batch, each segment on its expert's heads, through the output
    projection (with the segment's scales and bias delta).

    `weights`: the q/k/v weights and biases (project_qkv's keywords); `rotary(q, k, start, stop,
    index=None)` applies rotary embeddings to sequences [start, stop) (to the rows `index` of
    their flattened positions, when given: a packed pass); `cache_update(k, v)` (LLaMA's KV
    cache) takes (batch, num_kv_heads, tokens, head_dim) keys and values holding every segment's
    kept KV heads (zeros elsewhere) and returns the cached ones; `is_causal`: a causal mask when
    no `attention_mask` is given; `sliding_window`: how many past positions a query sees, when
    the layer limits them (Mistral, Qwen2; `attention_mask` holds that limit); `eager`: ops.attend's
    (the arithmetic of transformers' eager attention). A pass whose real tokens `mixed` knows runs
    packed (`_packed_attention`)."""
    spans = segments.attention_spans()
    packed_input = segments.holds_packed(hidden)
    batch = hidden.shape[0]
    real = segments.real if packed_input else segments.real_tokens(batch, hidden.shape[1])
    if real is not None:
        return _packed_attention(spans, real, hidden, packed_input, weights, o_weight_t, o_bias,
                                 attention_mask, scale, dropout, backend, rotary, cache_update,
                                 is_causal, sliding_window, eager)
    projected = []
    for b0, b1, plan in spans:
        if plan.selection.num_kept == 0:
            projected.append(None)
            continue
        q, k, v = project_qkv(hidden[b0:b1], selection=plan.selection, backend=backend,
                              **weights)
        if rotary is not None:
            q, k = rotary(q, k, b0, b1)
        projected.append((q, k, v))
    if cache_update is not None:
        keys, values = cache_update(*_full_kv(spans, projected, hidden, *hidden.shape[:2]))
    out = []
    for (b0, b1, plan), qkv in zip(spans, projected):
        if qkv is None:
            part = no_heads_output(hidden[b0:b1], weights, o_weight_t, o_bias, plan.selection,
                                   backend)
        else:
            q, k, v = qkv
            if cache_update is not None:
                k, v = keys[b0:b1], values[b0:b1]
                if not plan.selection.is_full:
                    heads = plan.selection.kept_kv_heads
                    k, v = k.index_select(1, heads), v.index_select(1, heads)
            mask = rows_of(attention_mask, b0, b1)
            causal = is_causal and mask is None and q.shape[2] > 1
            k, v = keys_of_pass(k, v, q.shape[2], causal)
            part = attend(q, k, v, plan.selection, mask, is_causal=causal, scale=scale,
                          dropout=dropout, eager=eager)
            part = project_out(part, o_weight_t, o_bias, plan.selection, backend,
                               scales=plan.head_col_scales)
        out.append(_add(part, plan.attn_delta))
    return torch.cat(out)


def _packed_attention(spans, real: "RealTokens", hidden, packed_input: bool, weights: dict,
                      o_weight_t, o_bias, attention_mask, scale: float, dropout: float,
                      backend: str, rotary, cache_update, is_causal: bool,
                      sliding_window: int | None, eager: str | None):
    """attention_forward of a pass whose real tokens are known (`real`): each span's real tokens
    projected as one packed sequence, attended (`_attend_span`) and projected out. `hidden` is
    the padded batch (its padding's rows of the output are zeros), or with `packed_input` the
    real tokens alone (RealTokens.pack; the output keeps that layout). The KV cache, when there
    is one, gets the padded layout (zeros at the padding)."""
    batch, tokens = real.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    projected = []
    for b0, b1, plan in spans:
        index = real.span_index(b0, b1)
        if plan.selection.num_kept == 0 or index.numel() == 0:
            projected.append(None)
            continue
        rows = _span_rows(flat, real, b0, b1, tokens, packed_input)
        q, k, v = project_qkv(rows, selection=plan.selection, backend=backend, **weights)
        if rotary is not None:
            q, k = rotary(q, k, b0, b1, index)
        projected.append((q, k, v))
    if cache_update is not None:  # its past is empty: the pass's mask covers its tokens only
        padded = [None if qkv is None else
                  (None, *(_padded_layout(part, real.span_index(b0, b1), b1 - b0, tokens)
                           for part in qkv[1:]))
                  for (b0, b1, _), qkv in zip(spans, projected)]
        cache_update(*_full_kv(spans, padded, hidden, batch, tokens))
    out = []
    for (b0, b1, plan), qkv in zip(spans, projected):
        if qkv is None and real.span_index(b0, b1).numel() == 0:  # sequences of padding alone
            part = flat.new_zeros(0, o_weight_t.shape[1])
        elif qkv is None:
            part = no_heads_output(_span_rows(flat, real, b0, b1, tokens, packed_input), weights,
                                   o_weight_t, o_bias, plan.selection, backend)[0]
        else:
            attended = _attend_span(qkv, real, b0, b1, tokens, plan.selection,
                                    rows_of(attention_mask, b0, b1), is_causal, scale, dropout,
                                    sliding_window, eager)
            part = project_out(attended, o_weight_t, o_bias, plan.selection, backend,
                               scales=plan.head_col_scales)
        out.append(_add(part, plan.attn_delta))
    if packed_input:
        return torch.cat(out)[None]
    return _unpack(torch.cat(out), real.index, batch * tokens).view(batch, tokens, -1)


def _per_sequence(device: torch.device) -> bool:
    """Whether a packed span's attention runs sequence by sequence (on the CPU: SDPA over each
    sequence's real tokens beat one padded call at every length mix measured, 1.3-2.8x), rather
    than padded again into one call (on a GPU, where a launch per sequence and layer would cost
    more than the padding)."""
    return device.type == "cpu"


def _attend_span(qkv, real: "RealTokens", b0: int, b1: int, tokens: int, selection, mask,
                 is_causal: bool, scale: float, dropout: float,
                 sliding_window: int | None, eager: str | None) -> torch.Tensor:
    """(real tokens of sequences [b0, b1), kept * head_dim): their attention from the packed
    (q, k, v), each sequence's real tokens seeing each other only (causally when `is_causal`):
    what the padding mask `mask` (the pass's, for these sequences) gives. Sequence by sequence
    where `_per_sequence` says so and no sequence spans more positions than `sliding_window`
    (padding between its real tokens counted, as the model counts the window: there the window
    cuts nothing); else padded again under `mask`, which holds the window (where padding stands
    between a causal expert's soft prompt and its text, as in `mixed_logits`, a window shorter
    than that span sees fewer real tokens than the sequence alone, unpadded, would)."""
    if _per_sequence(qkv[0].device) and (sliding_window is None or max(
            real.widths[j] for j in range(b0, b1)) <= sliding_window):
        return _attend_each(qkv, real.offsets[b0:b1 + 1], selection, is_causal, scale, dropout,
                            eager)
    index = real.span_index(b0, b1)
    q, k, v = (_padded_layout(part, index, b1 - b0, tokens) for part in qkv)
    if mask is not None and mask.shape[-1] > tokens:  # a static cache's: the pass's keys first
        mask = mask[..., :tokens]
    out = attend(q, k, v, selection, mask, is_causal=is_causal and mask is None and tokens > 1,
                 scale=scale, dropout=dropout, eager=eager)
    return out.reshape(-1, out.shape[-1]).index_select(0, index)


def _attend_each(qkv, offsets: list[int], selection, is_causal: bool, scale: float,
                 dropout: float, eager: str | None) -> torch.Tensor:
    """(real tokens, kept * head_dim): attention of each sequence's packed real tokens (rows
    [offsets[j] - offsets[0], offsets[j + 1] - offsets[0]) of q, k, v) over its own."""
    q, k, v = qkv
    parts = []
    for first, end in zip(offsets, offsets[1:]):
        if end > first:
            rows = slice(first - offsets[0], end - offsets[0])
            parts.append(attend(q[:, :, rows], k[:, :, rows], v[:, :, rows], selection,
                                is_causal=is_causal and end - first > 1, scale=scale,
                                dropout=dropout, eager=eager)[0])
    return torch.cat(parts)


def _span_rows(flat, real: "RealTokens", b0: int, b1: int, tokens: int, packed_input: bool):
    """(1, real tokens, hidden): the real tokens of sequences [b0, b1) of a pass, from its
    flattened hidden states (packed already, or padded)."""
    return (flat[real.offsets[b0]:real.offsets[b1]] if packed_input else
            flat[b0 * tokens:b1 * tokens].index_select(0, real.span_index(b0, b1)))[None]


def packed_rows(tensor: torch.Tensor, count: int, index: torch.Tensor) -> torch.Tensor:
    """(1, len(index), ...): rows `index` of a (count or 1, tokens, ...) per-position tensor
    (rotary embeddings' cos, sin) flattened over its first two dimensions."""
    flat = tensor.expand(count, *tensor.shape[1:]).reshape(-1, *tensor.shape[2:])
    return flat.index_select(0, index)[None]


def _padded_layout(part: torch.Tensor, index: torch.Tensor, count: int,
                   tokens: int) -> torch.Tensor:
    """A packed (1, heads, real tokens, head_dim) projection in the padded layout (count, heads,
    tokens, head_dim), zeros at the padding."""
    _, heads, _, head_dim = part.shape
    flat = part[0].transpose(0, 1).reshape(-1, heads * head_dim)
    padded = _unpack(flat, index, count * tokens).view(count, tokens, heads, head_dim)
    return padded.transpose(1, 2)


def _unpack(rows: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows: `rows` at the places `index` names, zeros elsewhere."""
    return rows.new_zeros(count, rows.shape[1]).index_copy_(0, index, rows)


def _full_kv(spans, projected, like: torch.Tensor, batch: int, tokens: int):
    """(keys, values) of the batch ((batch, KV heads, tokens, head_dim), in the projections'
    dtypes, else `like`'s) with every KV head: each span's computed heads in place, zeros in the
    heads it does not keep."""
    spec = spans[0][2].selection
    if len(spans) == 1 and spec.is_full and projected[0] is not None:  # one span, every head
        return projected[0][1], projected[0][2]
    shape = (batch, spec.num_kv_heads, tokens, spec.head_dim)
    # under autocast the values come in bfloat16, the keys in float32 (rotated with float32 tables)
    keys, values = (next((qkv[i] for qkv in projected if qkv is not None), like).new_zeros(shape)
                    for i in (1, 2))
    for (b0, b1, plan), qkv in zip(spans, projected):
        if qkv is not None:
            heads = plan.selection.kept_kv_heads
            keys[b0:b1, heads] = qkv[1]
            values[b0:b1, heads] = qkv[2]
    return keys, values
