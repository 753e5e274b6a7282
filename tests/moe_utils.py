"""Small Mixtral models, and the reference a patched MoE model must equal: the unpatched model with
the dropped experts' router logits set to minus infinity (and, with dynamic skipping, the non-top
experts' weights zeroed where the rule says so, before Mixtral's renormalisation, as in Lu et al.'s
code), pruned neurons and heads zeroed."""
import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import doe_kernels as dk


def mixtral(num_experts=8, top_k=2, layers=3, seed=0, dtype=torch.float32, router_scale=40.0,
            vocab=120):
    """A random Mixtral; the router is scaled up so that routing is far from uniform (and top-k
    choices are not near ties that a lower precision would flip)."""
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=48, num_hidden_layers=layers, num_attention_heads=6,
                           num_key_value_heads=2, intermediate_size=40, vocab_size=vocab,
                           max_position_embeddings=128, num_local_experts=num_experts,
                           num_experts_per_tok=top_k, tie_word_embeddings=False)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(router_scale)
            layer.mlp.experts.gate_up_proj.normal_(0, 0.1)
            layer.mlp.experts.down_proj.normal_(0, 0.1)
    return model.to(dtype)


def small_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=40, vocab_size=120,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _reference_router(gate, dropped, beta):
    def forward(hidden):
        hidden = hidden.reshape(-1, gate.weight.shape[1])
        logits = F.linear(hidden, gate.weight)
        masked = logits.float().clone()
        masked[:, dropped] = float("-inf")
        top, index = torch.topk(torch.softmax(masked, dim=-1), gate.top_k, dim=-1)
        if beta is not None:  # skipped experts get weight zero, the rest is renormalised
            for rank in range(1, gate.top_k):
                top[top[:, rank] < beta * top[:, 0], rank] = 0.0
        top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, index
    return forward


def moe_reference(model, mask, dynamic_skip=False):
    """A copy of the unpatched model computing what `patch(model, mask, dynamic_skip=...)` must."""
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")  # the plain loop over experts; also runs in float64
    spec = dk.models.spec_of(model)
    size = spec.intermediate_size
    with torch.no_grad():
        for index, layer in enumerate(ref.model.layers):
            kept = mask.moe.get(index, torch.arange(spec.num_experts))
            dropped = sorted(set(range(spec.num_experts)) - set(kept.tolist()))
            beta = mask.skip[index] if dynamic_skip else None
            layer.mlp.gate.forward = _reference_router(layer.mlp.gate, dropped, beta)
            pruned = torch.ones(size, dtype=torch.bool)
            pruned[mask.ffn.get(index, torch.arange(size))] = False
            experts = layer.mlp.experts
            experts.gate_up_proj[:, torch.cat([pruned, pruned])] = 0
            experts.down_proj[:, :, pruned] = 0
            head_pruned = torch.ones(spec.num_heads, dtype=torch.bool)
            head_pruned[mask.heads.get(index, torch.arange(spec.num_heads))] = False
            layer.self_attn.o_proj.weight[:, head_pruned.repeat_interleave(spec.head_dim)] = 0
    return ref
