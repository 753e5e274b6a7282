"""An expert's FFN neurons as one tensor-parallel rank sees them.

Under Megatron-style tensor parallelism (vLLM's MergedColumnParallelLinear / RowParallelLinear),
rank r of `world_size` holds the intermediate neurons [r * I / world_size, (r + 1) * I /
world_size) of every layer. `ffn_shards` maps a mask's global kept lists (and their scales) to
each rank's local indices; the rank's partial outputs are then summed by the usual all-reduce.
A rank may keep no neuron of a layer: it contributes zeros. Pure PyTorch, no serving engine needed.
"""
from dataclasses import dataclass

import torch

from doe_kernels.mask import ExpertMask
from doe_kernels.models import ModelSpec


@dataclass(frozen=True)
class FfnShard:
    """One layer's FFN on one rank: `kept` local neuron indices (sorted unique int64, possibly
    empty), `scales` one per local kept neuron or None, and the layer's `bias_delta`
    (hidden-size vector, for the summed output) or None."""

    kept: torch.Tensor
    scales: torch.Tensor | None
    bias_delta: torch.Tensor | None


def check_ffn_only(mask: ExpertMask, spec: ModelSpec) -> None:
    """Raise ValueError if the mask asks for more than FFN neurons (with their scales and bias
    deltas): pruned heads, attention reconstruction, MoE experts or skipping thresholds."""
    pruned = [layer for layer, heads in mask.heads.items() if heads.numel() != spec.num_heads]
    if pruned:
        raise ValueError(f"this mask prunes attention heads (layers {pruned[:8]}"
                         f"{' ...' if len(pruned) > 8 else ''}); head pruning is not supported "
                         "in vLLM yet: use a mask that keeps every head (FFN neurons only)")
    for kind in ("attn_bias", "head_scales", "moe", "skip"):
        if getattr(mask, kind):
            raise ValueError(f"this mask has {kind} entries, which vLLM serving does not support "
                             "yet (FFN neurons, ffn_scales and ffn_bias only)")


def ffn_shards(mask: ExpertMask, spec: ModelSpec, rank: int, world_size: int) -> list:
    """Per layer, the FfnShard of `rank`, or None where the layer runs dense (keeps every neuron,
    no scales, no bias delta). Checks the mask against `spec` first (ValueError)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for {world_size} ranks")
    if spec.intermediate_size % world_size:
        raise ValueError(f"the intermediate size {spec.intermediate_size} does not split evenly "
                         f"over {world_size} ranks")
    mask.check_spec(spec)
    check_ffn_only(mask, spec)
    local = spec.intermediate_size // world_size
    return [_layer_shard(mask, spec.intermediate_size, layer, rank * local, local)
            for layer in range(spec.num_layers)]


def _layer_shard(mask: ExpertMask, intermediate: int, layer: int, start: int,
                 local: int) -> FfnShard | None:
    kept = mask.ffn.get(layer)
    scales = mask.ffn_scales.get(layer)
    bias_delta = mask.ffn_bias.get(layer)
    keeps_all = kept is None or kept.numel() == intermediate
    if keeps_all and scales is None and bias_delta is None:
        return None
    if kept is None:
        kept = torch.arange(intermediate)
    mine = (kept >= start) & (kept < start + local)
    return FfnShard(kept[mine] - start, None if scales is None else scales[mine], bias_delta)
