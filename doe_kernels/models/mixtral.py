"""Mixtral adapter: LLaMA-style attention plus a sparse mixture-of-experts block.

A layer is recognised by `self_attn.{q,k,v,o}_proj` and an `mlp` holding a top-k router (`gate`,
a `weight` of experts x hidden) and fused experts (`experts.gate_up_proj`, experts x 2I x H, and
`experts.down_proj`, experts x H x I: transformers 5's layout). Patching replaces `self_attn` as
for LLaMA and `mlp` by PrunedMoeBlock (kept experts, dynamic skipping, kept neurons inside every
expert), which calls the model's router module, so `output_router_logits` works as unpatched (see
moe_block). Both serve mixed-task batches (doe_kernels.mixed). Only routers with Mixtral's rule
(softmax, top-k, renormalise) are accepted, by class.
"""
from doe_kernels.models import llama
from doe_kernels.models.base import LayerPatch, UnsupportedModelError, has_modules
from doe_kernels.models.moe_block import PrunedMoeBlock

FAMILY = "mixtral"
DESCRIPTION = "Mixtral sparse mixture of experts (MixtralForCausalLM, MixtralModel)"
MODEL_TYPES = ("mixtral",)
LINEARS = llama.ATTENTION_LINEARS  # the experts are fused tensors, checked by shape
ROUTERS = ("MixtralTopKRouter",)  # routers known to softmax, take the top k and renormalise


def is_layer(module) -> bool:
    if not has_modules(module, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate", "mlp.experts"):
        return False
    experts, gate = module.mlp.experts, module.mlp.gate
    return all(hasattr(experts, name) for name in ("gate_up_proj", "down_proj")) and \
        getattr(getattr(gate, "weight", None), "dim", lambda: 0)() == 2


def layer_sizes(layer, config) -> dict:
    num_experts, two_i, hidden = layer.mlp.experts.gate_up_proj.shape
    return dict(hidden_size=hidden, intermediate_size=two_i // 2, num_experts=num_experts,
                top_k=layer.mlp.gate.top_k, **llama.attention_sizes(layer, config))


def check_supported(layer, config) -> None:
    llama.check_swiglu(config, "Mixtral experts")
    mlp = layer.mlp
    if type(mlp.gate).__name__ not in ROUTERS:
        raise UnsupportedModelError(f"router {type(mlp.gate).__name__} is not supported (known: "
                                    f"{', '.join(ROUTERS)})")
    for name in ("shared_expert", "shared_experts"):
        if hasattr(mlp, name):
            raise UnsupportedModelError("MoE blocks with a shared expert are not supported")
    if any(getattr(mlp.experts, name, None) is not None for name in ("gate_up_proj_bias",
                                                                     "down_proj_bias")):
        raise UnsupportedModelError("expert biases are not supported")
    sizes = layer_sizes(layer, config)
    if tuple(mlp.experts.down_proj.shape) != (sizes["num_experts"], sizes["hidden_size"],
                                              sizes["intermediate_size"]):
        raise UnsupportedModelError(f"experts.down_proj has shape {tuple(mlp.experts.down_proj.shape)}"
                                    "; expected experts x hidden x intermediate (transformers 5)")
    llama.check_attention(layer, sizes)


def patch_layer(patch: LayerPatch, config, backend: str) -> None:
    """Patch `patch.layer`, recording every change in `patch` as it is made."""
    layer = patch.layer
    sizes = layer_sizes(layer, config)
    llama.patch_attention(patch, layer, sizes, backend)
    mlp = layer.mlp
    block = patch.lay_out_input_major(
        mlp.experts.down_proj,
        lambda down: PrunedMoeBlock(mlp.gate, mlp.experts.gate_up_proj, down, sizes["top_k"],
                                    normalize=True, backend=backend,
                                    jitter_noise=getattr(mlp, "jitter_noise", 0.0)))
    patch.replace("mlp", block)
    patch.ffn_modules.append(block)
    patch.moe_modules.append(block)
    patch.mixed_run += [patch.head_modules[-1], block]
