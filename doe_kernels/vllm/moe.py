"""A vLLM mixture-of-experts block (Mixtral's `block_sparse_moe`) on an expert's kept MoE experts.

vLLM's MixtralMoE computes the router logits with its `gate`, and its fused experts then take the
softmax, the top k and the renormalisation. A plugged block sets the dropped experts' logits to
minus infinity before the fused experts see them, so each token is routed among the kept experts
as doe_kernels.patch routes it on the HuggingFace model. The router is replicated on every
tensor-parallel rank and the fused experts reduce their output themselves, so the same logits
serve every rank. In a mixed-task batch (`MixedMoe`) each row gets its own expert's dropped
experts. Neurons inside the experts and dynamic skipping are not served (refused by
doe_kernels.tensor_parallel.check_servable).
"""
import torch

from doe_kernels.models import UnsupportedModelError
from doe_kernels.vllm.mixed import current_step


def moe_block_of(layer, index: int):
    """The layer's vLLM Mixtral-style MoE block (a `gate` and fused `experts` routed by softmax,
    top-k and renormalisation, without shared experts); raises UnsupportedModelError naming what
    differs."""
    block = getattr(layer, "block_sparse_moe", None)
    where = f"layer {index}'s MoE block ({type(block).__name__})"
    if block is None or not all(isinstance(getattr(block, name, None), torch.nn.Module)
                                for name in ("gate", "experts")):
        raise UnsupportedModelError(f"layer {index} has neither a LLaMA-style MLP nor a "
                                    "Mixtral-style MoE block (block_sparse_moe with gate and "
                                    "experts)")
    router = getattr(block.experts, "router", None)
    rule = {name: getattr(router, name, None) for name in
            ("scoring_func", "renormalize", "use_grouped_topk", "custom_routing_function",
             "e_score_correction_bias", "routed_scaling_factor")}
    expected = dict(scoring_func="softmax", renormalize=True, use_grouped_topk=False,
                    custom_routing_function=None, e_score_correction_bias=None,
                    routed_scaling_factor=1.0)
    if router is None or rule != expected:
        raise UnsupportedModelError(f"{where}: only Mixtral's routing (softmax, top-k, "
                                    f"renormalised, no correction) is supported; found {rule}")
    if getattr(block.experts, "_shared_experts", None) is not None:
        raise UnsupportedModelError(f"{where}: MoE blocks with shared experts are not supported")
    return block


def is_moe_block(module) -> bool:
    """Whether `module` (a layer's FFN as ffn_of returns it) is a MoE block."""
    return isinstance(getattr(module, "experts", None), torch.nn.Module)


def routing_sizes(block) -> tuple[int, int]:
    """(experts, experts per token) of a block moe_block_of accepted: the experts as its router
    logits count them (the gate's outputs)."""
    router = block.experts.router
    return int(getattr(block.gate, "output_size", router.global_num_experts)), int(router.top_k)


def moe_forward(block, hidden_states: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """MixtralMoE's forward with the experts `dropped` ((experts,) or (tokens, experts) bool)
    given minus infinity as router logits."""
    shape = hidden_states.shape
    h = hidden_states.view(-1, block.hidden_size)
    logits, _ = block.gate(h)
    logits = logits.masked_fill(dropped, float("-inf"))
    return block.experts(h, logits).view(shape)


class MoePlan:
    """One MoE block on an expert's `kept` experts (sorted int64 indices)."""

    def __init__(self, block, kept: torch.Tensor):
        experts, _ = routing_sizes(block)
        device = next(block.experts.parameters()).device
        self.block = block
        self.kept = kept.to(device)
        self.dropped = torch.ones(experts, dtype=torch.bool, device=device)
        self.dropped[self.kept] = False

    def forward(self, hidden_states):
        return moe_forward(self.block, hidden_states, self.dropped)


def moe_plans(blocks: list, mask) -> list:
    """Per layer, the MoePlan of `mask` (checked against the model already), or None where the
    layer keeps every expert."""
    plans = []
    for index, block in enumerate(blocks):
        kept = mask.moe.get(index)
        experts, _ = routing_sizes(block)
        plans.append(None if kept is None or kept.numel() == experts else MoePlan(block, kept))
    return plans


class MixedMoe:
    """One MoE block's forward while experts are held: the plugged plan (or dense) for a step
    naming no expert, else each group of rows routed among its own expert's kept experts (None:
    every expert)."""

    def __init__(self, block, single: MoePlan | None, plans: dict, dense):
        self.block, self.single, self.dense = block, single, dense
        self.plans = dict(plans)
        self.plans[None] = single

    def forward(self, x):
        step = current_step()
        if step is None:
            return self.dense(x) if self.single is None else self.single.forward(x)
        if all(self.plans[name] is None for name in step.names):
            return self.dense(x)
        return moe_forward(self.block, x, self._dropped_rows(step))

    def _dropped_rows(self, step) -> torch.Tensor:
        """(rows, experts): each row's expert's dropped experts, in the step's row order (made
        once per step and block)."""
        made = step.__dict__.setdefault("_moe_dropped", {})
        if id(self) not in made:
            experts, _ = routing_sizes(self.block)
            none = torch.zeros(experts, dtype=torch.bool,
                               device=next(self.block.experts.parameters()).device)
            grouped = torch.cat([(none if self.plans[name] is None
                                  else self.plans[name].dropped).expand(end - start, experts)
                                 for name, start, end in step.bounds()])
            made[id(self)] = step.ungrouped(grouped)
        return made[id(self)]
