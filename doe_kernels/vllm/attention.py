"""A vLLM LLaMA attention on an expert's heads of one rank: its plan and its projections.

vLLM's attention forward is left as it is (rotary embedding, the paged KV cache, its attention
backend); only its two projections change, as instance `forward`s of `qkv_proj` and `o_proj`:
 * qkv_proj computes the rows of the rank's kept query heads and of the KV heads they read
   (`gather_rows_linear` on the dense weight) into a zero-filled output of vLLM's width: pruned
   heads get zero queries, keys and values.
 * o_proj reads only the kept heads' columns (`gather_cols_linear` on the input-major weight,
   scaled per head when the expert has scales), all-reduces as RowParallelLinear does, and adds the
   expert's bias delta once.
The plan's indices are checked when it is made, so the projections call doe_kernels.ops.library
directly. The output equals attention over the kept heads alone. The attention kernel itself still
runs every head of the rank: vLLM's KV cache and kernels are laid out for all of them, so head
pruning saves the projections' work and bytes, not the attention scores'.
"""
import torch
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

from doe_kernels.models import UnsupportedModelError
from doe_kernels.ops import library
from doe_kernels.tensor_parallel import HeadShard
from doe_kernels.vllm.ffn import summed_output_delta
from doe_kernels.vllm.weights import AttentionWeights, check_plain_linear


def _head_columns(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """The feature indices of `heads` (head h: [offset + h * head_dim, ... + head_dim))."""
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


class AttentionPlan:
    """The pruned projections of one attention on this rank: the qkv rows to compute, the o_proj
    columns to read (with a scale per column or None), whether o_proj all-reduces, and the bias
    delta it adds, on the weights' device and in their dtype."""

    def __init__(self, attn, weights: AttentionWeights, shard: HeadShard):
        device, dtype = weights.w_qkv.device, weights.w_qkv.dtype
        q_size, kv_size, head_dim = attn.q_size, attn.kv_size, attn.head_dim
        heads, kv_heads = shard.heads.long(), shard.kv_heads.long()
        self.weights = weights
        self.width = q_size + 2 * kv_size
        self.rows = torch.cat([_head_columns(heads, head_dim),
                               _head_columns(kv_heads, head_dim, q_size),
                               _head_columns(kv_heads, head_dim, q_size + kv_size)]).to(device)
        self.cols = _head_columns(heads, head_dim).to(device)
        self.col_scales = (None if shard.scales is None else
                           shard.scales.repeat_interleave(head_dim).to(device, dtype))
        self.reduce_here, self.bias_delta = summed_output_delta(shard.bias_delta, attn.o_proj,
                                                                device, dtype)

    def qkv(self, x):
        w = self.weights
        kept = library.gather_rows_linear(x, w.w_qkv, w.b_qkv, self.rows, "identity", "auto")
        out = x.new_zeros(*x.shape[:-1], self.width)
        return out.index_copy_(-1, self.rows, kept)

    def o(self, attn_output):
        kept = attn_output.index_select(-1, self.cols)
        out = library.gather_cols_linear(kept, self.weights.w_o_t, None, self.cols, "auto",
                                         self.col_scales)
        if self.reduce_here:
            out = tensor_model_parallel_all_reduce(out)
        return out if self.bias_delta is None else out + self.bias_delta


def attention_of(layer, index: int):
    """The layer's attention if it is a vLLM LLaMA-style one (QKVParallelLinear, row-parallel
    o_proj without bias, unquantized); raises UnsupportedModelError naming what differs."""
    attn = getattr(layer, "self_attn", None)
    qkv, o = getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None)
    where = f"layer {index}'s attention ({type(attn).__name__})"
    if not (isinstance(qkv, QKVParallelLinear) and isinstance(o, RowParallelLinear)
            and all(hasattr(attn, name) for name in ("q_size", "kv_size", "head_dim"))):
        raise UnsupportedModelError(f"{where} is not a LLaMA-style attention (qkv_proj, "
                                    "row-parallel o_proj)")
    check_plain_linear(qkv, where, bias_allowed=True)
    check_plain_linear(o, where, bias_allowed=False)
    return attn
