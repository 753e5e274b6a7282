"""doe_kernels.tensor_parallel: a mask's FFN neurons and heads split over tensor-parallel ranks.

The ranks' partial FFNs and attention outputs, summed as an all-reduce does, must equal the whole
masked layer; sizes odd where they can be (an empty shard, one neuron, a shard's last neuron, KV
heads split and replicated).
"""
import pytest
import torch

from doe_kernels import ExpertMask, gather_swiglu_ffn, input_major
from doe_kernels.models import ModelSpec
from doe_kernels.tensor_parallel import ffn_imbalance, ffn_shards, head_shards

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


def _attention(q, k, v):
    """One head's softmax attention, float64, no mask."""
    return torch.softmax(q @ k.T / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("num_kv,world_size", [(4, 1), (4, 2), (4, 4), (2, 4), (1, 2), (8, 8)])
def test_summed_head_shards_equal_the_masked_attention(num_kv, world_size):
    """Each rank computes its local kept heads on its local KV heads (split, or replicated when
    there are fewer KV heads than ranks, as vLLM's QKVParallelLinear holds them); the sum of the
    ranks' output projections plus the bias delta equals the masked attention."""
    heads, d, hidden = 8, 3, 6
    spec = ModelSpec(family="llama", model_type="llama", num_layers=3, hidden_size=hidden,
                     intermediate_size=8, num_heads=heads, num_kv_heads=num_kv, head_dim=d)
    gen = torch.Generator().manual_seed(num_kv * 10 + world_size)
    q, w_o = (torch.randn(5, heads, d, generator=gen, dtype=torch.float64),
              torch.randn(hidden, heads * d, generator=gen, dtype=torch.float64))
    k, v = (torch.randn(5, num_kv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    kept = {0: [7], 1: [0, 2, 3, 5], 2: []}
    scales = {layer: torch.rand(len(h), generator=gen) + 0.5 for layer, h in kept.items()}
    mask = ExpertMask(heads=kept, head_scales=scales, attn_bias={1: torch.randn(hidden)})
    local_q = heads // world_size
    kv_of_rank = (lambda r: list(range(r * num_kv // world_size, (r + 1) * num_kv // world_size))
                  if num_kv >= world_size else [r * num_kv // world_size])
    per_kv = heads // num_kv
    for layer, chosen in kept.items():
        expected = sum((scales[layer][i].double()
                        * _attention(q[:, h], k[:, h // per_kv], v[:, h // per_kv])
                        @ w_o[:, h * d:(h + 1) * d].T for i, h in enumerate(chosen)),
                       torch.zeros(5, hidden, dtype=torch.float64))
        total = torch.zeros(5, hidden, dtype=torch.float64)
        for rank in range(world_size):
            shard = head_shards(mask, spec, rank, world_size)[layer]
            kv_local = kv_of_rank(rank)
            group = local_q // len(kv_local)
            assert shard.kv_heads.tolist() == sorted({int(j) // group for j in shard.heads})
            for j, scale in zip(shard.heads.tolist(), shard.scales.double()):
                h, g = rank * local_q + j, kv_local[j // group]
                total += scale * _attention(q[:, h], k[:, g], v[:, g]) @ w_o[:, h * d:(h + 1) * d].T
        bias = mask.attn_bias.get(layer)
        if bias is not None:
            expected, total = expected + bias.double(), total + bias.double()  # once, after the sum
        torch.testing.assert_close(total, expected)


def test_head_shards_of_a_layer_that_keeps_everything_are_none():
    assert head_shards(ExpertMask({0: [1]}), SPEC, 0, 2) == [None] * 3
    shards = head_shards(ExpertMask(heads={1: [1]}), SPEC, 1, 2)
    assert shards[0] is None and shards[1].heads.tolist() == [0]
    assert shards[1].kv_heads.tolist() == [0] and shards[1].scales is None


def test_refusals():
    with pytest.raises(ValueError, match="out of range"):
        ffn_shards(ExpertMask({0: [12]}), SPEC, 0, 2)
    with pytest.raises(ValueError, match="does not split evenly"):
        ffn_shards(ExpertMask(), SPEC, 0, 5)
    with pytest.raises(ValueError, match="heads do not split evenly"):
        head_shards(ExpertMask(), SPEC, 0, 3)
    six = ModelSpec(**{**SPEC.as_dict(), "num_heads": 6, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="3 KV heads neither split evenly over 2 ranks"):
        head_shards(ExpertMask(), six, 0, 2)
    with pytest.raises(ValueError, match="out of range"):
        head_shards(ExpertMask(heads={0: [2]}), SPEC, 0, 2)
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        head_shards(ExpertMask(), SPEC, 2, 2)
    with pytest.raises(ValueError, match="skipping"):
        ffn_shards(ExpertMask(skip={0: 0.5}), SPEC, 0, 1)
    assert ffn_shards(ExpertMask(heads={1: [0, 1]}), SPEC, 0, 1) == [None] * 3


def test_moe_masks_shard_neurons_inside_every_expert():
    moe = ModelSpec(**{**SPEC.as_dict(), "family": "mixtral", "model_type": "mixtral",
                       "num_experts": 4, "top_k": 2})
    mask = ExpertMask({1: [0, 5, 6, 11]}, heads={0: [1]}, moe={0: [0, 3], 2: [1, 2, 3]},
                      skip={0: 0.5})
    shards = ffn_shards(mask, moe, 1, 2)  # experts and thresholds need no sharding
    assert shards[0] is None and shards[2] is None
    assert shards[1].kept.tolist() == [0, 5] and shards[1].scales is None
    assert head_shards(mask, moe, 1, 2)[0].heads.tolist() == [0]


def test_ffn_imbalance_and_balanced_selection():
    # 16 neurons over 2 ranks: layer 0 keeps 6 on rank 0 and 2 on rank 1, layer 1 none
    mask = ExpertMask({0: [0, 1, 2, 3, 4, 5, 8, 9], 1: []})
    assert ffn_imbalance(mask, 16, 2) == {0: 6 / 4}
    assert ffn_imbalance(mask, 16, 1) == {0: 1.0}
    scores = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    balanced = ExpertMask.from_scores(scores, ffn_keep=0.4, scope="global", shards=4)
    assert all(value <= 1 + 4 / balanced.ffn[l].numel() for l, value in
               ffn_imbalance(balanced, 16, 4).items())  # one neuron at most above the mean
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        ffn_imbalance(mask, 16, 3)
    with pytest.raises(ValueError, match="ffn\\[0\\] holds index 9, out of range for an "
                                         "intermediate size of 8"):
        ffn_imbalance(mask, 8, 2)  # gave a plausible number for a mask of another model
