"""Architecture detection: find a model's transformer layers by their modules, pick the adapter.

Supported: the BERT family (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA), the LLaMA family
(LLaMA, Mistral, Qwen2) and Mixtral (sparse mixture of experts), recognised by their layers'
modules and accepted by their config's model_type (models that share the modules but compute
otherwise are refused). The transformers versions this was tested with are checked at patch time.
"""
from torch import nn

from doe_kernels.models import bert, llama, mixtral
from doe_kernels.models.base import ModelSpec, UnsupportedModelError

ADAPTERS = (bert, llama, mixtral)
PATCH_STATE_ATTR = "_doe_kernels_patch"  # set on a model by doe_kernels.patch
SUPPORTED_TRANSFORMERS = ((5, 0), (6, 0))  # [low, high)


def supported_families() -> str:
    return "; ".join(adapter.DESCRIPTION for adapter in ADAPTERS)


def check_transformers_version() -> None:
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= version < high:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} is not supported; doe_kernels supports "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}")


def find_layers(model: nn.Module):
    """(adapter, layers): the first ModuleList whose children are all layers of one family."""
    for _, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for adapter in ADAPTERS:
            if all(adapter.is_layer(layer) for layer in module):
                return adapter, module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no stack of transformer layers doe_kernels recognises. "
        f"Supported: {supported_families()}.")


def check_model_type(model_name: str, model_type, adapter) -> None:
    """UnsupportedModelError unless `model_type` is one known to compute as the `adapter`
    family's modules do (models that hold the same modules but compute otherwise: Qwen3's
    normed queries and keys, Granite's multipliers, Cohere, OLMo...)."""
    if model_type not in adapter.MODEL_TYPES:
        raise UnsupportedModelError(
            f"{model_name} (model_type {model_type!r}) is not supported: its layers hold the "
            f"{adapter.FAMILY} family's modules, but its model type is not one known to compute "
            f"as they do ({', '.join(adapter.MODEL_TYPES)}). Supported: "
            f"{supported_families()}.")


def describe(model: nn.Module):
    """(adapter, layers, ModelSpec) of a supported model; raises UnsupportedModelError otherwise."""
    adapter, layers = find_layers(model)
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `config`; pass a HuggingFace "
                                    "PreTrainedModel")
    check_model_type(type(model).__name__, getattr(config, "model_type", None), adapter)
    for layer in layers:
        _check_plain_linears(layer, adapter.LINEARS)
        adapter.check_supported(layer, config)
    sizes = [adapter.layer_sizes(layer, config) for layer in layers]
    if any(s != sizes[0] for s in sizes):
        raise UnsupportedModelError("layers of different sizes are not supported")
    spec = ModelSpec(family=adapter.FAMILY, model_type=getattr(config, "model_type", "unknown"),
                     num_layers=len(layers), **sizes[0])
    return adapter, layers, spec


def _check_plain_linears(layer: nn.Module, paths) -> None:
    """The projections a patch reads must be torch's own Linear: a subclass or wrapper (PEFT's
    LoRA layers, quantized linears) computes more than its `weight` says."""
    for path in paths:
        module = layer.get_submodule(path)
        if type(module) is not nn.Linear:
            hint = (" (a PEFT adapter: merge it first, model = model.merge_and_unload())"
                    if hasattr(module, "base_layer") else "")
            raise UnsupportedModelError(f"{path} is a {type(module).__name__}, not a plain "
                                        f"torch.nn.Linear{hint}")


def spec_of(model: nn.Module) -> ModelSpec:
    """The sizes of a supported model, patched or not."""
    state = getattr(model, PATCH_STATE_ATTR, None)
    return state.spec if state is not None else describe(model)[2]


__all__ = ["ModelSpec", "spec_of", "UnsupportedModelError", "check_model_type",
           "check_transformers_version", "describe"]
