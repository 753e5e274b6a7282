"""A vLLM mixture-of-experts block (Mixtral's `block_sparse_moe`) on an expert's kept MoE experts,
neurons and skipping thresholds.

vLLM's MixtralMoE computes the router logits with its `gate`, and its fused experts then take the
softmax, the top k and the renormalisation. An expert that only drops whole experts gives them
the lowest logit (as good as minus infinity) before the fused experts see them, so each token is
routed among the kept experts as doe_kernels.patch routes it on the HuggingFace model, by vLLM's
own kernels. An expert that prunes neurons inside the experts or skips small second experts (its
mask's `skip` thresholds, applied as `patch(..., dynamic_skip=True)` applies them) runs the
HuggingFace path's own routing and expert FFNs (doe_kernels.models.moe_block: `route`, then
`experts_forward`, the gather SwiGLU op per expert on the rank's kept neurons) on the experts'
weights as loaded (doe_kernels.vllm.weights.expert_weights), then the all-reduce vLLM's experts
would do. The router is replicated on every tensor-parallel rank and each rank holds its slice of
every expert's neurons, so the same routing serves every rank. In a mixed-task batch (`MixedMoe`)
each row gets its own expert's routing.
"""
import torch

from vllm.distributed import tensor_model_parallel_all_reduce

from doe_kernels.models import UnsupportedModelError
from doe_kernels.models.moe_block import experts_forward, route
from doe_kernels.vllm.mixed import current_step
from doe_kernels.vllm.weights import expert_weights

BLOCKS = ("MixtralMoE",)  # vLLM blocks whose forward moe_forward follows
_NEUTRAL_ROUTING = dict(scoring_func=None, renormalize=None, use_grouped_topk=False,
                        custom_routing_function=None, e_score_correction_bias=None,
                        routed_scaling_factor=1.0)


def moe_block_of(layer, index: int):
    """The layer's vLLM Mixtral MoE block (`MixtralMoE`: a `gate` and fused `experts` routed by
    softmax, top-k and renormalisation, without shared experts, on tensor parallelism alone);
    raises UnsupportedModelError naming what differs."""
    block = getattr(layer, "block_sparse_moe", None)
    where = f"layer {index}'s MoE block ({type(block).__name__})"
    parts = all(isinstance(getattr(block, name, None), torch.nn.Module)
                for name in ("gate", "experts"))
    if type(block).__name__ not in BLOCKS or not parts:
        raise UnsupportedModelError(f"layer {index} has neither a LLaMA-style MLP nor a MoE block "
                                    f"doe_kernels.vllm knows ({', '.join(BLOCKS)}, with its gate "
                                    "and experts)")
    router = getattr(block.experts, "router", None)
    # CPU and GPU routers hold different attributes: the neutral value where one is absent
    rule = {name: getattr(router, name, neutral) for name, neutral in _NEUTRAL_ROUTING.items()}
    if router is None or rule != dict(_NEUTRAL_ROUTING, scoring_func="softmax", renormalize=True):
        raise UnsupportedModelError(f"{where}: only Mixtral's routing (softmax, top-k, "
                                    f"renormalised, no correction) is supported; found {rule}")
    if getattr(block.experts, "gate", None) is not None:
        raise UnsupportedModelError(f"{where}: experts that compute their own router logits are "
                                    "not supported")
    if getattr(block.experts, "_shared_experts", None) is not None:
        raise UnsupportedModelError(f"{where}: MoE blocks with shared experts are not supported")
    config = getattr(block.experts, "moe_config", None)
    spread = {name: getattr(config, name, None) for name in ("ep_size", "dp_size",
                                                            "is_sequence_parallel")}
    spread["skip_final_all_reduce"] = getattr(config, "skip_final_all_reduce", False)
    if spread != dict(ep_size=1, dp_size=1, is_sequence_parallel=False,
                      skip_final_all_reduce=False):
        raise UnsupportedModelError(f"{where}: only tensor parallelism is supported (found "
                                    f"{spread}; expert, data or sequence parallelism is not)")
    return block


def is_moe_block(module) -> bool:
    """Whether `module` (a layer's FFN as ffn_of returns it) is a MoE block."""
    return isinstance(getattr(module, "experts", None), torch.nn.Module)


def routing_sizes(block) -> tuple[int, int]:
    """(experts, experts per token) of a block moe_block_of accepted: the experts as its router
    logits count them (the gate's outputs)."""
    return int(block.gate.output_size), int(block.experts.router.top_k)


def moe_forward(block, hidden_states: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """MixtralMoE's forward with the experts `dropped` ((experts,) or (tokens, experts) bool)
    given the lowest logit (the same routing as minus infinity, without infinities in the
    kernels)."""
    shape = hidden_states.shape
    h = hidden_states.view(-1, block.hidden_size)
    logits, _ = block.gate(h)
    logits = logits.masked_fill(dropped, torch.finfo(logits.dtype).min)
    return block.experts(h, logits).view(shape)


class MoePlan:
    """One MoE block on an expert's `kept` experts (sorted int64 indices), the rank's kept
    `neurons` inside every expert (None: all) and its skipping threshold `beta` (None: none)."""

    def __init__(self, block, kept: torch.Tensor, neurons: torch.Tensor | None = None,
                 beta: float | None = None):
        experts, self.top_k = routing_sizes(block)
        device = next(block.experts.parameters()).device
        self.block = block
        self.kept = kept.to(device)
        self.dropped = torch.ones(experts, dtype=torch.bool, device=device)
        self.dropped[self.kept] = False
        self.neurons = None if neurons is None else neurons.to(device)
        self.beta = beta
        self._route_among = None if self.kept.numel() == experts else self.kept  # None: all
        # vLLM's fused experts route among the kept experts; neurons or skipping need our own
        self.weights = None if neurons is None and beta is None else expert_weights(block)
        self.reduce = block.experts.moe_config.tp_size > 1

    @property
    def routes_in_vllm(self) -> bool:
        """Whether vLLM's fused experts run this plan (it only drops whole experts)."""
        return self.weights is None

    def forward(self, hidden_states):
        if self.routes_in_vllm:
            return moe_forward(self.block, hidden_states, self.dropped)
        out = self.rank_forward(hidden_states.view(-1, self.block.hidden_size))
        if self.reduce:
            out = tensor_model_parallel_all_reduce(out)
        return out.view(hidden_states.shape)

    def rank_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the block's output on tokens x (tokens, hidden), before the
        all-reduce (a plan that does not route in vLLM)."""
        logits, _ = self.block.gate(x)
        weights, experts = route(logits, self.top_k, self._route_among, beta=self.beta)
        return experts_forward(x, weights, experts, self.weights.gate_up, self.weights.down_t,
                               self.neurons)


def moe_plans(blocks: list, mask, neuron_shards: list) -> list:
    """Per layer, the MoePlan of `mask` (checked against the model already) with the rank's
    neuron shards (doe_kernels.tensor_parallel.ffn_shards), or None where the layer runs dense
    (every expert and neuron kept, no skipping)."""
    plans = []
    for index, (block, shard) in enumerate(zip(blocks, neuron_shards)):
        experts, top_k = routing_sizes(block)
        kept = mask.moe.get(index, torch.arange(experts))
        beta = mask.skip.get(index) if top_k > 1 else None  # one expert a token: none to skip
        if kept.numel() == experts and shard is None and beta is None:
            plans.append(None)
        else:
            plans.append(MoePlan(block, kept, None if shard is None else shard.kept, beta))
    return plans


class MixedMoe:
    """One MoE block's forward while experts are held: the plugged plan (or dense) for a step
    naming no expert, else each group of rows on its own expert's plan (None: dense). The rows of
    plans that only drop experts (and dense rows) go through one call of vLLM's fused experts,
    each row's dropped experts set apart; the rows of each other plan run its own routing and
    experts, and those rows' outputs are all-reduced together, once per step and block."""

    def __init__(self, block, single: MoePlan | None, plans: dict, dense):
        self.block, self.single, self.dense = block, single, dense
        self.plans = dict(plans)
        self.plans[None] = single
        self.reduce = block.experts.moe_config.tp_size > 1
        experts, _ = routing_sizes(block)
        self._none = torch.zeros(experts, dtype=torch.bool,
                                 device=next(block.experts.parameters()).device)

    def forward(self, x):
        step = current_step()
        if step is None:
            return self.dense(x) if self.single is None else self.single.forward(x)
        plans = [self.plans[name] for name in step.names]
        if all(plan is None for plan in plans):
            return self.dense(x)
        if all(_in_vllm(plan) for plan in plans):
            return moe_forward(self.block, x, self._dropped_rows(step))
        return self._split(step, x)

    def _split(self, step, x):
        """The step's rows in two parts: those vLLM's fused experts route (one call), then the
        other plans' groups in turn (one all-reduce over all of them)."""
        grouped = step.grouped(x.view(-1, self.block.hidden_size))
        bounds = [(self.plans[name], start, end) for name, start, end in step.bounds()
                  if end > start]
        in_vllm = [(plan, start, end) for plan, start, end in bounds if _in_vllm(plan)]
        own = [(plan, start, end) for plan, start, end in bounds if not _in_vllm(plan)]
        out = torch.empty_like(grouped)
        if in_vllm:
            rows = torch.cat([grouped[start:end] for _, start, end in in_vllm])
            _put(out, in_vllm, moe_forward(self.block, rows, self._dropped_of(in_vllm)))
        if own:  # the same on every rank (one layout per step), so the all-reduces pair up
            local = torch.cat([plan.rank_forward(grouped[start:end]) for plan, start, end in own])
            _put(out, own, tensor_model_parallel_all_reduce(local) if self.reduce else local)
        return step.ungrouped(out).view(x.shape)

    def _dropped_of(self, bounds) -> torch.Tensor:
        """(rows, experts): the dropped experts of each row of `bounds` ((plan, start, end),
        plans that route in vLLM), in that order."""
        experts = self._none.numel()
        return torch.cat([(self._none if plan is None else plan.dropped).expand(end - start,
                                                                                experts)
                          for plan, start, end in bounds])

    def _dropped_rows(self, step) -> torch.Tensor:
        """(rows, experts): each row's expert's dropped experts, in the step's row order (made
        once per step and block)."""
        made = step.__dict__.setdefault("_moe_dropped", {})
        if id(self) not in made:
            made[id(self)] = step.ungrouped(self._dropped_of(
                [(self.plans[name], start, end) for name, start, end in step.bounds()]))
        return made[id(self)]


def _put(out: torch.Tensor, bounds: list, rows: torch.Tensor) -> None:
    """Write `rows` (the rows of `bounds`, (plan, start, end) each, one after another) into out."""
    offset = 0
    for _, start, end in bounds:
        out[start:end] = rows[offset:offset + end - start]
        offset += end - start


def _in_vllm(plan: MoePlan | None) -> bool:
    """Whether vLLM's fused experts serve a plan's rows (dense, or only dropping experts)."""
    return plan is None or plan.routes_in_vllm
