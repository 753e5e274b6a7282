"""An expert's FFN neurons and attention heads as one tensor-parallel rank sees them.

Under Megatron-style tensor parallelism (vLLM's MergedColumnParallelLinear / QKVParallelLinear, then
RowParallelLinear), rank r of `world_size` holds the intermediate neurons [r * I / world_size,
(r + 1) * I / world_size) of every layer, and the query heads [r * H / world_size, ...) with their
KV heads (split the same way, or one replicated KV head per rank when there are fewer KV heads than
ranks). `ffn_shards` and `head_shards` map a mask's global kept lists (and their scales) to each
rank's local indices; the ranks' partial outputs are then summed by the usual all-reduce, and the
expert's bias deltas are added once, to the sum. A rank may keep no neuron or head of a layer: it
contributes zeros. In a mixture-of-experts model every expert is split the same way (`ffn_shards`
gives the rank's kept neurons inside every expert); its kept experts and skipping thresholds need
no sharding: the router is replicated on every rank. Pure PyTorch, no serving engine needed.
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


@dataclass(frozen=True)
class HeadShard:
    """One layer's attention on one rank: `heads` the local kept query heads (sorted unique
    int64, possibly empty), `kv_heads` the local KV heads they read, `scales` one per local kept
    head or None, and the layer's `bias_delta` (hidden-size vector, for the summed output) or
    None."""

    heads: torch.Tensor
    kv_heads: torch.Tensor
    scales: torch.Tensor | None
    bias_delta: torch.Tensor | None


def ffn_shards(mask: ExpertMask, spec: ModelSpec, rank: int, world_size: int) -> list:
    """Per layer, the FfnShard of `rank`, or None where the layer runs dense (keeps every neuron,
    no scales, no bias delta). Checks the mask against `spec` first (ValueError)."""
    _check_rank(rank, world_size)
    if spec.intermediate_size % world_size:
        raise ValueError(f"the intermediate size {spec.intermediate_size} does not split evenly "
                         f"over {world_size} ranks")
    mask.check_spec(spec)
    local = spec.intermediate_size // world_size
    return [_layer_shard(mask, spec.intermediate_size, layer, rank * local, local)
            for layer in range(spec.num_layers)]


def head_shards(mask: ExpertMask, spec: ModelSpec, rank: int, world_size: int) -> list:
    """Per layer, the HeadShard of `rank`, or None where the layer's attention runs dense (keeps
    every head, no scales, no bias delta). Checks the mask against `spec` first (ValueError)."""
    _check_rank(rank, world_size)
    heads, kv = spec.num_heads, spec.num_kv_heads
    if heads % world_size:
        raise ValueError(f"the {heads} attention heads do not split evenly over {world_size} ranks")
    if (kv % world_size) if kv >= world_size else (world_size % kv):
        raise ValueError(f"the {kv} KV heads neither split evenly over {world_size} ranks nor "
                         "replicate evenly across them")
    mask.check_spec(spec)
    local = heads // world_size
    group = local // max(1, kv // world_size)  # local query heads per local KV head
    return [_head_shard(mask, heads, layer, rank * local, local, group)
            for layer in range(spec.num_layers)]


def ffn_imbalance(mask: ExpertMask, intermediate_size: int, world_size: int) -> dict:
    """Per layer of the mask, the most neurons one rank keeps over the mean per rank (1.0: even;
    layers keeping none are left out). Each layer's all-reduce waits for its busiest rank, so
    the FFN takes this factor longer than an even split of the same neurons would;
    `ExpertMask.from_scores(shards=world_size)` (localize's `SearchConfig(shards=)`) keeps it at
    1 (give or take one neuron)."""
    _check_rank(0, world_size)
    if intermediate_size % world_size:
        raise ValueError(f"the intermediate size {intermediate_size} does not split evenly "
                         f"over {world_size} ranks")
    local = intermediate_size // world_size
    out = {}
    for layer, kept in mask.ffn.items():
        if kept.numel() and int(kept.max()) >= intermediate_size:
            raise ValueError(f"ffn[{layer}] holds index {int(kept.max())}, out of range for an "
                             f"intermediate size of {intermediate_size}")
        counts = torch.bincount(kept.long() // local, minlength=world_size).double()
        if counts.sum() > 0:
            out[layer] = float(counts.max() / counts.mean())
    return out


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for {world_size} ranks")


def _head_shard(mask: ExpertMask, num_heads: int, layer: int, start: int, local: int,
                group: int) -> HeadShard | None:
    kept = mask.heads.get(layer)
    scales = mask.head_scales.get(layer)
    bias_delta = mask.attn_bias.get(layer)
    if (kept is None or kept.numel() == num_heads) and scales is None and bias_delta is None:
        return None
    if kept is None:
        kept = torch.arange(num_heads)
    mine = (kept >= start) & (kept < start + local)
    heads = kept[mine] - start
    return HeadShard(heads, torch.unique(heads // group), None if scales is None else scales[mine],
                     bias_delta)


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
