"""Upcycling: a Mixtral model built from a dense LLaMA or Mistral model (SmolLM2 is a LLaMA; no
small MoE model ships on PyPI, this makes one for tests and examples). Other dense families whose
weights carry the same names compute something else (Gemma's norms and scaled embeddings,
Granite's multipliers, SmolLM3's layers without rotary embeddings): they are refused.

Every expert starts as a copy of the layer's dense MLP, each weight scaled elementwise by
(1 + noise * N(0, 1)) so that experts differ. The router is initialised from data when calibration
token ids are given (spherical k-means of the layer's MLP inputs: an expert's router row is its
cluster's direction, so routing follows the structure of the inputs and expert loads differ), else
at random. Attention, norms, embeddings and the LM head are the dense model's.
"""
import math
from numbers import Real

import torch
from torch import nn

from doe_kernels.caller_state import lasting
from doe_kernels.expert import check_count
from doe_kernels.mask import _as_seed
from doe_kernels.moe.calibration import capture_inputs
from doe_kernels.patching import is_patched

FAMILIES = ("llama", "mistral")  # config.model_type values a Mixtral reproduces exactly


@torch.no_grad()
def upcycle(model: nn.Module, num_experts: int = 8, top_k: int = 2, noise: float = 0.1,
            calibration=None, router_scale: float = 8.0, seed: int = 0) -> nn.Module:
    """A MixtralForCausalLM with `num_experts` experts (top-`top_k` routing) made from `model`, a
    LlamaForCausalLM or MistralForCausalLM (SmolLM2 included: its model_type is "llama"; other
    families are refused), unpatched. `noise` (finite, >= 0) scales the experts' perturbation;
    `router_scale` (finite, > 0) the router rows, i.e. how peaked routing is. Returns it in eval
    mode, in the dense model's dtype and on its device. Bad arguments are refused before anything
    is built."""
    config = model.config
    _check(model, num_experts, top_k, noise, router_scale)
    seed = _as_seed(seed)
    with lasting():  # (weights a later backward pass may use, whatever the caller's modes)
        return _upcycled(model, config, num_experts, top_k, noise, calibration, router_scale,
                         seed)


def _upcycled(model, config, num_experts, top_k, noise, calibration, router_scale, seed):
    """upcycle's Mixtral, its arguments checked."""
    from transformers import MixtralConfig, MixtralForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "pad_token_id",
            "bos_token_id", "eos_token_id", "rope_parameters", "sliding_window",
            "attention_dropout")
    moe_config = MixtralConfig(**{k: getattr(config, k) for k in keys if hasattr(config, k)},
                               num_local_experts=num_experts, num_experts_per_tok=top_k)
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # (its random initialisation, all overwritten,
        # leaves the caller's random state as it was)
        moe = MixtralForCausalLM(moe_config).to(param.device, param.dtype).eval()
    dense_state = model.state_dict()
    result = moe.load_state_dict({k: v for k, v in dense_state.items() if ".mlp." not in k},
                                 strict=False)
    left = [k for k in result.missing_keys if ".mlp." not in k] + list(result.unexpected_keys)
    if left:  # a weight named otherwise would keep its random initialisation
        raise ValueError(f"{type(model).__name__}'s weights do not map onto a Mixtral's "
                         f"(unmatched: {left[:5]})")
    if moe_config.tie_word_embeddings:
        moe.tie_weights()

    gen = torch.Generator().manual_seed(seed)
    inputs = _mlp_inputs(model, calibration) if calibration is not None else None
    for index, (dense, layer) in enumerate(zip(model.model.layers, moe.model.layers)):
        gate_up = torch.cat([dense.mlp.gate_proj.weight, dense.mlp.up_proj.weight]).float().cpu()
        down = dense.mlp.down_proj.weight.float().cpu()
        for e in range(num_experts):
            layer.mlp.experts.gate_up_proj[e] = _perturb(gate_up, noise, gen)
            layer.mlp.experts.down_proj[e] = _perturb(down, noise, gen)
        hidden = None if inputs is None else inputs[index]
        layer.mlp.gate.weight.copy_(_router(hidden, num_experts, config.hidden_size,
                                            router_scale, gen))
    return moe


def _check(model, num_experts, top_k, noise, router_scale):
    """Refuse, before anything is built, what upcycling cannot convert exactly or use."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"upcycling takes a LLaMA or Mistral model (model_type in {FAMILIES}); "
                         f"{type(model).__name__} has model_type {model_type!r}, whose "
                         "computation a Mixtral does not reproduce")
    if is_patched(model):
        raise ValueError(f"{type(model).__name__} is patched by doe_kernels: unpatch first "
                         "(upcycling copies the dense MLP weights)")
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("upcycling needs a model without attention or MLP biases")
    check_count("num_experts", num_experts)
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int between 1 and num_experts ({num_experts}), "
                         f"got {top_k!r}")
    if not _is_real(noise) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not _is_real(router_scale) or not math.isfinite(router_scale) or router_scale <= 0:
        raise ValueError(f"router_scale must be a finite number > 0, got {router_scale!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, Real) and not isinstance(value, bool)


def _perturb(weight, noise, gen):
    return weight * (1 + noise * torch.randn(weight.shape, generator=gen))


def _router(hidden, num_experts, hidden_size, scale, gen):
    """Rows = unit cluster directions x scale / typical input norm (random without data)."""
    if hidden is None:
        return torch.randn(num_experts, hidden_size, generator=gen) * scale / hidden_size
    if hidden.shape[0] < num_experts:
        raise ValueError(f"the calibration holds {hidden.shape[0]} tokens (padding left out), "
                         f"fewer than the {num_experts} experts whose routing directions are "
                         "clustered from them: give at least one token per expert")
    x = hidden.float()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    distinct = torch.unique(unit, dim=0)  # (one token repeated, a BOS, would start two
    # experts on one centre: the second's cluster would stay empty, its router row the first's)
    if distinct.shape[0] < num_experts:
        raise ValueError(f"the calibration holds {distinct.shape[0]} distinct token inputs, "
                         f"fewer than the {num_experts} experts whose routing directions are "
                         "clustered from them")
    centers = distinct[torch.randperm(distinct.shape[0], generator=gen)[:num_experts]]
    for _ in range(20):  # spherical k-means
        assign = (unit @ centers.T).argmax(1)
        for e in range(num_experts):
            members = unit[assign == e]
            if len(members):
                centers[e] = members.sum(0) / members.sum(0).norm().clamp_min(1e-6)
    return centers * scale / x.norm(dim=1).mean()


def _mlp_inputs(model, calibration):
    """Each layer's MLP inputs over the calibration batches (padding removed), on the CPU."""
    return capture_inputs(model, [layer.mlp for layer in model.model.layers], calibration,
                          to_cpu=True)
