"""A vLLM LLaMA MLP on an expert's neurons of one rank: its plan and its forward.

A plugged MLP gets an instance `forward` that runs the gather SwiGLU FFN op on the rank's kept
neurons (checked when the plan was made, so it calls doe_kernels.ops.library directly) and then the
all-reduce vLLM's RowParallelLinear does; layers that keep every neuron (no scales, no bias delta)
keep vLLM's own forward. Mixtral-style MoE blocks are the other FFN a layer may have
(doe_kernels.vllm.moe).
"""
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

from doe_kernels.models import UnsupportedModelError
from doe_kernels.ops import library
from doe_kernels.tensor_parallel import FfnShard
from doe_kernels.vllm.moe import moe_block_of
from doe_kernels.vllm.weights import FfnWeights, check_plain_linear


def summed_output_delta(delta, down, device, dtype):
    """The expert's bias delta as the rank adds it (None where it does not): a delta is for the
    summed output, so it is added after the all-reduce (on every rank, all holding the sum) or by
    rank 0 alone when the sum is taken later."""
    reduce_here = bool(down.reduce_results and down.tp_size > 1)
    adds_delta = delta is not None and (reduce_here or down.tp_rank == 0)
    return reduce_here, (delta.to(device, dtype) if adds_delta else None)


class FfnPlan:
    """The pruned FFN of one MLP on this rank: its weights, the expert's local FfnShard on the
    weights' device and in their dtype, and whether this MLP all-reduces its output."""

    def __init__(self, mlp, weights: FfnWeights, shard: FfnShard):
        device, dtype = weights.w_gate.device, weights.w_gate.dtype
        self.weights = weights
        self.kept = shard.kept.to(device)
        self.scales = None if shard.scales is None else shard.scales.to(device, dtype)
        self.reduce_here, self.bias_delta = summed_output_delta(shard.bias_delta, mlp.down_proj,
                                                                device, dtype)

    def forward(self, x):
        w = self.weights
        out = library.gather_swiglu_ffn(x, w.w_gate, w.w_up, w.w_down_t, self.kept, "auto",
                                        self.scales)
        if self.reduce_here:
            out = tensor_model_parallel_all_reduce(out)
        return out if self.bias_delta is None else out + self.bias_delta


def ffn_of(layer, index: int):
    """The layer's FFN: a LLaMA-style MLP (mlp_of) or, in a Mixtral-style model, its MoE block
    (doe_kernels.vllm.moe.moe_block_of); raises UnsupportedModelError naming what differs."""
    if getattr(layer, "block_sparse_moe", None) is not None:
        return moe_block_of(layer, index)
    return mlp_of(layer, index)


def mlp_of(layer, index: int):
    """The layer's MLP if it is a vLLM LLaMA-style one (merged gate/up, SwiGLU, row-parallel
    down, unquantized, no biases); raises UnsupportedModelError naming what differs."""
    mlp = getattr(layer, "mlp", None)
    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    where = f"layer {index}'s MLP ({type(mlp).__name__})"
    if not (isinstance(gate_up, MergedColumnParallelLinear) and isinstance(down, RowParallelLinear)
            and len(gate_up.output_sizes) == 2
            and gate_up.output_sizes[0] == gate_up.output_sizes[1]):
        raise UnsupportedModelError(f"{where} is not a LLaMA-style MLP (merged gate_up_proj, "
                                    "row-parallel down_proj)")
    if not isinstance(getattr(mlp, "act_fn", None), SiluAndMul):
        raise UnsupportedModelError(f"{where}: only SwiGLU (SiluAndMul) is supported")
    for linear in (gate_up, down):
        check_plain_linear(linear, where, bias_allowed=False)
    return mlp
