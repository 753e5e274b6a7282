"""doe_kernels.tensor_parallel: a mask's FFN lists split over tensor-parallel ranks.

The ranks' partial FFNs, summed as an all-reduce does, must equal the whole masked FFN; sizes odd
where they can be (an empty shard, one neuron, a shard's last neuron).
"""
import pytest
import torch

from doe_kernels import ExpertMask, gather_swiglu_ffn, input_major
from doe_kernels.models import ModelSpec
from doe_kernels.tensor_parallel import ffn_shards

SPEC = ModelSpec(family="llama", model_type="llama", num_layers=3, hidden_size=8,
                 intermediate_size=12, num_heads=2, num_kv_heads=1, head_dim=4)


def test_shards_map_global_indices_to_local_rows():
    mask = ExpertMask({0: [0, 5, 6, 11], 1: [6, 7], 2: list(range(12))})
    rank0, rank1 = (ffn_shards(mask, SPEC, rank, 2) for rank in (0, 1))
    assert rank0[0].kept.tolist() == [0, 5] and rank1[0].kept.tolist() == [0, 5]
    assert rank0[1].kept.tolist() == [] and rank1[1].kept.tolist() == [0, 1]
    assert rank0[2] is None and rank1[2] is None  # every neuron, nothing to reconstruct


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_summed_shards_equal_the_masked_ffn(world_size):
    gen = torch.Generator().manual_seed(world_size)
    w_gate, w_up = (torch.randn(12, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    w_down = torch.randn(8, 12, generator=gen, dtype=torch.float64)  # nn.Linear (hidden, neurons)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    kept = {0: [11], 1: [0, 2, 3, 5, 8, 9], 2: []}
    scales = {l: torch.rand(len(k), generator=gen) + 0.5 for l, k in kept.items()}
    bias = {1: torch.randn(8, generator=gen)}
    mask = ExpertMask(kept, ffn_scales=scales, ffn_bias=bias)
    local = 12 // world_size
    for layer, neurons in kept.items():
        index = torch.tensor(neurons, dtype=torch.long)
        hidden = torch.nn.functional.silu(x @ w_gate[index].T) * (x @ w_up[index].T)
        expected = (hidden * scales[layer].double()) @ w_down[:, index].T
        if layer in bias:
            expected = expected + bias[layer].double()
        total = torch.zeros_like(expected)
        for rank in range(world_size):
            shard = ffn_shards(mask, SPEC, rank, world_size)[layer]
            rows = slice(rank * local, (rank + 1) * local)
            scale = None if shard.scales is None else shard.scales.double()
            total += gather_swiglu_ffn(x, w_gate[rows], w_up[rows], input_major(w_down[:, rows]),
                                       shard.kept, backend="torch", scales=scale)
        if layer in bias:
            total += bias[layer].double()  # after the all-reduce
        torch.testing.assert_close(total, expected)


def test_refusals():
    with pytest.raises(ValueError, match="head pruning is not supported"):
        ffn_shards(ExpertMask(heads={1: [0]}), SPEC, 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        ffn_shards(ExpertMask({0: [12]}), SPEC, 0, 2)
    with pytest.raises(ValueError, match="does not split evenly"):
        ffn_shards(ExpertMask(), SPEC, 0, 5)
    assert ffn_shards(ExpertMask(heads={1: [0, 1]}), SPEC, 0, 1) == [None] * 3
