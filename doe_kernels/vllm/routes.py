"""Compiled vLLM engines: a route per MLP and projection, so that a swap reaches the compiled graph.

vLLM's default mode traces the model's forward once at start-up (torch.compile; on the CPU
Dynamo with Inductor, `CompilationMode.DYNAMO_TRACE_ONCE`) and from then on replays the traced
code: an instance `forward` set after that (what `plug` does on an eager engine) is never called.
So on an engine that compiles, every LLaMA-style MLP (or Mixtral-style MoE block) and every
attention's `qkv_proj` and `o_proj` get, when the model is loaded and before it is traced, a
forward that calls one opaque op, `doe_kernels::vllm_route(x, key)`. The op is traced as a call
(its shape known from the route), and at run time it calls the route's current target: the
module's own class forward (dense; the same code vLLM runs eagerly) or the plugged expert's plan.
A swap changes the target, so the compiled graph never goes stale and never recompiles.

Routes are installed by `route_compiled_models()` (run when doe_kernels.vllm.worker is imported,
which vLLM does in every worker before it loads the model): it wraps vLLM's
`process_weights_after_loading` and installs them when the engine compiles and names the
doe_kernels worker extension. Engines that run eagerly get no routes (their dense path is vLLM's
own, untouched). The routed module runs eagerly inside the op, so the compiler does not fuse
across it; on the CPU vLLM's linear layers and SiluAndMul are opaque kernels anyway.
CUDA graphs would replay whatever target was captured, so engines that capture them are refused
(see `check_routes`).
"""
import itertools
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

ROUTE_OP = "doe_kernels::vllm_route"
_ROUTE = "_doe_route"  # set on a routed module
# key -> route, in this process; held by its module alone (a weak value: an engine's model, once
# dropped, is freed with its routes), keys never reused (a graph traced for a model gone raises
# KeyError rather than run another model's module)
_ROUTES: "weakref.WeakValueDictionary[int, Route]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@dataclass
class Route:
    """One routed module: its output width, its dense forward (returning the output tensor), the
    forward the op calls now, and how many times the op ran it (a compiled graph that never
    calls it was traced without the route)."""

    width: int
    dense: Callable
    target: Callable
    calls: int = 0

    def reset(self) -> None:
        self.target = self.dense


@torch.library.custom_op(ROUTE_OP, mutates_args=())
def vllm_route(x: torch.Tensor, key: int) -> torch.Tensor:
    """The routed module `key`'s current forward on x."""
    route = _ROUTES[key]
    route.calls += 1
    return route.target(x)


@vllm_route.register_fake
def _(x, key):
    return x.new_empty(*x.shape[:-1], _ROUTES[key].width)


def route_of(module) -> Route | None:
    return module.__dict__.get(_ROUTE)


def dense_forward(module, returns_bias: bool = False) -> Callable:
    """`module`'s own class forward returning its output tensor (`returns_bias`: the module
    returns (output, bias) as vLLM's linear layers do, with its bias added inside)."""
    own = type(module).forward.__get__(module)
    return (lambda x: own(x)[0]) if returns_bias else own


def add_route(module, width: int, returns_bias: bool = False) -> Route:
    """Route `module`'s forward through the op (idempotent); `returns_bias`: the module returns
    (output, bias) as vLLM's linear layers do, and its bias is None (added inside)."""
    route = route_of(module)
    if route is not None:
        return route
    dense = dense_forward(module, returns_bias)
    route = Route(width, dense, dense)
    key = next(_KEYS)
    _ROUTES[key] = route

    def routed(x):
        out = torch.ops.doe_kernels.vllm_route(x, key)
        return (out, None) if returns_bias else out

    module.__dict__[_ROUTE] = route
    module.forward = routed
    return route


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """A vLLM model's decoder layers (`model.model.layers`), or None where it has none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def install_routes(model) -> int:
    """Route every LLaMA-style MLP or MoE block and attention projection of `model` (a vLLM model
    with `model.layers`); layers of another kind are left as they are (plug refuses them).
    Returns the number of modules routed."""
    from doe_kernels.models import UnsupportedModelError
    from doe_kernels.vllm.attention import attention_of
    from doe_kernels.vllm.ffn import ffn_of
    from doe_kernels.vllm.moe import is_moe_block

    routed = 0
    for index, layer in enumerate(decoder_layers(model) or ()):
        try:
            ffn = ffn_of(layer, index)
            add_route(ffn, ffn.hidden_size if is_moe_block(ffn) else ffn.down_proj.output_size)
            routed += 1
        except UnsupportedModelError:
            pass
        try:
            attn = attention_of(layer, index)
            for linear, width in ((attn.qkv_proj, attn.qkv_proj.output_size_per_partition),
                                  (attn.o_proj, attn.o_proj.output_size)):
                add_route(linear, width, returns_bias=linear.return_bias)
                routed += 1
        except UnsupportedModelError:
            pass
    return routed


def compiles(vllm_config) -> bool:
    """Whether the engine traces or compiles its model (vLLM's default unless enforce_eager)."""
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode != CompilationMode.NONE


def route_compiled_models() -> None:
    """Wrap vLLM's `process_weights_after_loading` so that a model loaded for a compiling engine
    with the doe_kernels worker extension gets its routes (idempotent)."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.model_loader import base_loader

    process = base_loader.process_weights_after_loading
    if getattr(process, "_doe_routes", False):
        return

    def process_and_route(model, *args, **kwargs):
        from doe_kernels.vllm.engine import names_extension  # engine imports worker, our caller

        out = process(model, *args, **kwargs)
        config = get_current_vllm_config_or_none()
        if config is not None and compiles(config) and names_extension(
                config.parallel_config.worker_extension_cls):
            install_routes(model)
        return out

    process_and_route._doe_routes = True
    base_loader.process_weights_after_loading = process_and_route
