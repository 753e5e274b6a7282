"""Mixed-task batches in vLLM, on the worker's side: each request of a step on its own expert.

Experts held under names (`doe_kernels.vllm.add`) are staged on every rank like a plugged one. A
request names its expert in `SamplingParams.extra_args["doe_expert"]` (`doe_kernels.vllm.
for_experts` sets it); a request naming none runs on the plugged expert, or the dense model.

Each engine step, `watch_steps` (wrapping the model runner's `execute_model` and `_model_forward`)
reads the step's requests in the runner's batch order with their scheduled token counts and sets
the step's `StepLayout`: the rows (tokens) of each expert, grouped. The layers read it:
 * the MLP (`MixedFfn`) permutes the rows so that each expert's rows are contiguous (skipped when
   they already are), runs the segmented SwiGLU FFN (one segment per expert; or, when decoding
   one token per expert reads fewer bytes over the union of their neurons, the union, its plan
   built once per composition of rows as doe_kernels.models.segments does), all-reduces once,
   adds each expert's bias delta to its rows and puts the rows back in order;
 * attention (`MixedAttention`): qkv_proj runs dense (every head's queries, keys and values; a
   head an expert prunes is never read by its rows), o_proj reads each expert's kept heads'
   columns for its rows (with its scales), all-reduces once, and adds each expert's bias delta;
 * a Mixtral's MoE block (doe_kernels.vllm.moe.MixedMoe) routes each row among its own expert's
   kept MoE experts, in the rows' own order.
A step whose requests name no expert runs the plugged expert's (or vLLM's dense) forwards as if
nothing were held. The shared weights are never modified.
"""
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.distributed import tensor_model_parallel_all_reduce

from doe_kernels.ops import library
from doe_kernels.vllm.protocol import EXTRA_ARG
from doe_kernels.vllm.weights import attention_weights, ffn_weights

UNION_PLANS = 64  # union plans (and packed kept lists) kept per MLP (one per composition of a
# step's rows), and at most UNION_PLAN_BYTES of union plans: a plan's row mask is rows x union
# (3.5 MB at 128 rows of four experts on an 8B model's FFN in bfloat16: 64 of them in each of 32
# layers would hold 7 GB that vLLM's memory accounting does not see)
UNION_PLAN_BYTES = 8 * 2**20


@dataclass
class StepLayout:
    """One engine step's rows by expert: `names` (None: the plugged expert or dense), `counts`
    (rows of each, in that order) and `order` (the row permutation grouping them; None when they
    are grouped already) and its inverse."""

    names: tuple
    counts: list
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    _copies: dict = field(default_factory=dict, repr=False, compare=False)  # (segments, _on)

    def bounds(self):
        """(name, first row, end) of each group, in grouped order."""
        start = 0
        for name, count in zip(self.names, self.counts):
            yield name, start, start + count
            start += count

    def segments(self) -> torch.Tensor:
        """The groups' row offsets (one more than groups), as the segmented ops take them: on
        the host, where they read them (no copy back from a GPU)."""
        cached = self._copies.get("segments")
        if cached is None:
            cached = self._copies["segments"] = torch.tensor([0] + self.counts).cumsum(0)
        return cached

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x.index_select(0, self._on("order", x.device))

    def ungrouped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x.index_select(0, self._on("inverse", x.device))

    def _on(self, name: str, device) -> torch.Tensor:
        """The permutation `name` ("order" or "inverse") on `device`, copied there once a step
        (every layer of the step reads it)."""
        key = (name, str(device))
        if key not in self._copies:
            self._copies[key] = getattr(self, name).to(device)
        return self._copies[key]


_STEP = threading.local()  # the StepLayout of the step this thread runs (an engine's steps run
# in one thread: in-process engines of other threads have their own), or None


def current_step() -> StepLayout | None:
    """The layout of the engine step this thread is running; None outside a step, or when no
    request of the step names an expert."""
    return getattr(_STEP, "layout", None)


def set_step(layout: StepLayout | None) -> None:
    """Make `layout` this thread's current step (None: none)."""
    _STEP.layout = layout


def layout_of(names: list, counts: list, rows: int) -> StepLayout | None:
    """The layout of requests naming `names` (None: none) with `counts` tokens each, over `rows`
    rows (rows past the requests' tokens, padding, go with the unnamed); None when no request
    names an expert."""
    if all(name is None for name in names):
        return None
    per_row = list(names) + [None]
    counts = list(counts) + [rows - sum(counts)]
    groups = list(dict.fromkeys(per_row))  # names in order of first appearance
    ids = np.repeat(np.array([groups.index(n) for n in per_row], dtype=np.int64), counts)
    group_counts = np.bincount(ids, minlength=len(groups)).tolist()
    order = inverse = None
    if np.any(ids[1:] < ids[:-1]):
        order = torch.from_numpy(np.argsort(ids, kind="stable"))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(rows)
    return StepLayout(tuple(groups), group_counts, order, inverse)


def check_runner(runner) -> None:
    """RuntimeError when vLLM's model runner lacks what `watch_steps` wraps and reads."""
    missing = [name for name in ("execute_model", "_model_forward", "input_batch", "requests")
               if not hasattr(runner, name)]
    if missing:
        raise RuntimeError(f"mixed-task batches need vLLM's model runner to have {missing} "
                           f"(this one is a {type(runner).__name__}); plug one expert instead")


def watch_steps(runner, known, after_step=None) -> None:
    """Make `runner` (vLLM's model runner) set the step's layout before each model forward
    (idempotent: the first call's functions stay). `known(name)`: whether an expert is held
    under `name`; `after_step()`, if given, runs after each step."""
    if runner.__dict__.get("_doe_watched"):
        return
    check_runner(runner)
    execute, forward = runner.execute_model, runner._model_forward
    scheduled = [None]

    def execute_model(scheduler_output, *args, **kwargs):
        scheduled[0] = scheduler_output
        try:
            return execute(scheduler_output, *args, **kwargs)
        finally:
            scheduled[0] = None
            set_step(None)
            if after_step is not None:
                after_step()

    def model_forward(*args, **kwargs):
        set_step(None)
        if scheduled[0] is not None:
            set_step(_layout_of_step(runner, scheduled[0], _rows(args, kwargs), known))
        return forward(*args, **kwargs)

    runner.execute_model, runner._model_forward = execute_model, model_forward
    runner._doe_watched = True


def _rows(args, kwargs) -> int:
    for key, index in (("input_ids", 0), ("inputs_embeds", 3)):
        value = kwargs.get(key, args[index] if len(args) > index else None)
        if value is not None:
            return int(value.shape[0])
    raise RuntimeError("doe_kernels.vllm: the model forward got neither input_ids nor "
                       "inputs_embeds")


def _layout_of_step(runner, scheduler_output, rows: int, known) -> StepLayout | None:
    """The step's layout from the runner's batch order (as vLLM lays out the tokens)."""
    req_ids = runner.input_batch.req_ids[:runner.input_batch.num_reqs]
    names = [_expert_of(runner.requests[req_id], known) for req_id in req_ids]
    return layout_of(names, _token_counts(runner, scheduler_output, req_ids), rows)


def _token_counts(runner, scheduler_output, req_ids) -> list[int]:
    """Each request's tokens in this step, as the runner laid them out (its query_start_loc,
    filled before the forward: the scheduler's counts less what the runner trims, such as
    rejected speculative tokens), else as the scheduler gave them."""
    starts, count = getattr(getattr(runner, "query_start_loc", None), "np", None), len(req_ids)
    if starts is not None and len(starts) > count:
        return [int(n) for n in starts[1:count + 1] - starts[:count]]
    return [int(scheduler_output.num_scheduled_tokens.get(req_id, 0)) for req_id in req_ids]


def named_experts(runner) -> set:
    """The names of the experts that the requests `runner` holds name (finished or aborted ones
    included until the step that drops them)."""
    requests = getattr(runner, "requests", None) or {}
    return {name for name in map(_name_in, requests.values()) if name is not None}


def _name_in(request):
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
    return extra.get(EXTRA_ARG)


def _expert_of(request, known) -> str | None:
    name = _name_in(request)
    if name is not None and not known(name):
        raise RuntimeError(f"request {request.req_id} names the expert {name!r}, which this "
                           "engine does not hold (doe_kernels.vllm.add it first; an engine "
                           "that a doe_kernels.vllm call has touched checks names as it takes "
                           "requests)")
    return name


class MixedFfn:
    """One MLP's forward while experts are held: the plugged plan (or dense) for a step naming no
    expert, else each group of rows on its expert's FfnPlan (None: every neuron)."""

    def __init__(self, mlp, single, plans: dict, dense):
        self.weights = ffn_weights(mlp)
        self.single, self.plans, self.dense = single, dict(plans), dense
        self.plans[None] = single
        self.deltas = _deltas(self.plans)
        self.reduce_here = bool(mlp.down_proj.reduce_results and mlp.down_proj.tp_size > 1)
        self._packed: dict = {}
        self._unions: dict = {}
        self._union_bytes = 0  # what the plans in _unions hold (UNION_PLAN_BYTES)

    def forward(self, x):
        step = current_step()
        if step is None:
            return self.dense(x) if self.single is None else self.single.forward(x)
        if all(self.plans[name] is None for name in step.names):
            return self.dense(x)  # no expert of this step prunes this layer
        kept, offsets, scales = self._pack(step.names)
        segments = step.segments()
        grouped, w = step.grouped(x), self.weights
        union = self._union(step, grouped, segments)
        if union is not None:
            out = library.union_gather_swiglu_ffn(grouped, w.w_gate, w.w_up, w.w_down_t, *union,
                                                  "auto")
        else:
            out = library.segmented_gather_swiglu_ffn(
                grouped, w.w_gate, w.w_up, w.w_down_t, segments, kept, offsets, "auto", scales,
                strategy="segments")
        if self.reduce_here:
            out = tensor_model_parallel_all_reduce(out)
        _add_deltas(out, step, self.deltas)
        return step.ungrouped(out)

    def _union(self, step: StepLayout, x, segments):
        """The union plan (library.union_plan: (union, row_mask), or None for one segment per
        expert) of this composition of rows, built once: each decoding step of the same
        requests reuses it."""
        key = (step.names, tuple(step.counts), x.dtype)
        if key not in self._unions:
            plan = library.union_plan(x, segments, *self._pack(step.names),
                                      neurons=self.weights.w_gate.shape[0], up_matrices=2)
            size = 0 if plan is None else sum(t.numel() * t.element_size() for t in plan)
            if size > UNION_PLAN_BYTES:
                return plan  # (too large to keep: built again at each step)
            if len(self._unions) >= UNION_PLANS or self._union_bytes + size > UNION_PLAN_BYTES:
                self._unions.clear()
                self._union_bytes = 0
            self._unions[key] = plan
            self._union_bytes += size
        return self._unions[key]

    def _pack(self, names: tuple):
        """(kept, kept_offsets, scales) of the experts `names`, in that order (cached)."""
        if names not in self._packed:
            if len(self._packed) >= UNION_PLANS:  # (batch orders vary: bounded in count)
                self._packed.clear()
            device = self.weights.w_gate.device
            every = torch.arange(self.weights.w_down_t.shape[0], device=device)
            plans = [self.plans[n] for n in names]
            lists = [every if p is None else p.kept for p in plans]
            offsets = torch.tensor([0] + [k.numel() for k in lists]).cumsum(0)  # (host: as
            # step.segments)
            scales = None
            if any(p is not None and p.scales is not None for p in plans):
                scales = torch.cat([k.new_ones(k.numel(), dtype=self.weights.w_gate.dtype)
                                    if p is None or p.scales is None else p.scales
                                    for p, k in zip(plans, lists)])
            self._packed[names] = (torch.cat(lists), offsets, scales)
        return self._packed[names]


class MixedAttention:
    """One attention's qkv_proj and o_proj forwards while experts are held (AttentionPlans by
    name; None: every head)."""

    def __init__(self, attn, single, plans: dict, dense_qkv, dense_o):
        self.weights = attention_weights(attn)
        self.single, self.plans = single, dict(plans)
        self.dense_qkv, self.dense_o = dense_qkv, dense_o
        self.plans[None] = single
        self.deltas = _deltas(self.plans)
        self.reduce_here = bool(attn.o_proj.reduce_results and attn.o_proj.tp_size > 1)

    def qkv(self, x):
        if current_step() is None and self.single is not None:
            return self.single.qkv(x)
        return self.dense_qkv(x)

    def o(self, attn_output):
        step = current_step()
        if step is None:
            return (self.dense_o(attn_output) if self.single is None
                    else self.single.o(attn_output))
        if all(self.plans[name] is None for name in step.names):
            return self.dense_o(attn_output)  # every expert of this step keeps every head
        grouped = step.grouped(attn_output)
        out = grouped.new_empty(grouped.shape[0], self.weights.w_o_t.shape[1])
        for name, start, stop in step.bounds():
            rows, plan = grouped[start:stop], self.plans[name]
            if plan is None:
                out[start:stop] = rows @ self.weights.w_o_t
            else:
                out[start:stop] = library.gather_cols_linear(
                    rows.index_select(-1, plan.cols), self.weights.w_o_t, None, plan.cols,
                    "auto", plan.col_scales)
        if self.reduce_here:
            out = tensor_model_parallel_all_reduce(out)
        _add_deltas(out, step, self.deltas)
        return step.ungrouped(out)


def _deltas(plans: dict) -> dict:
    """Each expert's bias delta (None where it has none), by name."""
    return {name: None if plan is None else plan.bias_delta for name, plan in plans.items()}


def _add_deltas(out: torch.Tensor, step: StepLayout, deltas: dict) -> None:
    """Add each group's bias delta (None: none) to its rows of `out`, in place."""
    for name, start, stop in step.bounds():
        delta = deltas.get(name)
        if delta is not None and stop > start:
            out[start:stop] += delta
