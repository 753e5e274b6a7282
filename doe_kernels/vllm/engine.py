"""The caller's side: `plug(llm, mask)` and `unplug(llm)` on a `vllm.LLM`.

`plug` checks the engine (the doe_kernels worker extension, no CUDA graphs), then asks every rank
to check the mask and stage its plan; only if every rank accepts does it ask them to apply it. A
refused mask raises ValueError here and the engine keeps serving the previous expert (or the dense
model).
After every plug and unplug the prefix cache is reset: cached KV blocks were computed by the
previous expert.
"""
import importlib

from doe_kernels.vllm.protocol import as_mask, plug_on_ranks
from doe_kernels.vllm.worker import WorkerExtension, check_engine_config

EXTENSION = "doe_kernels.vllm.WorkerExtension"


def plug(llm, mask) -> None:
    """Run `llm` (a vllm.LLM made with worker_extension_cls="doe_kernels.vllm.WorkerExtension",
    compiled without CUDA graphs or eager) on an expert's FFN neurons and heads; on a plugged
    engine this swaps experts.

    `mask`: an ExpertMask, or a doe_kernels.Expert (its mask). Every rank prunes its own shard in
    place; the weights are shared, only index tensors change. Raises ValueError (mask) or
    UnsupportedModelError (model) before any rank changes anything, RuntimeError for an engine
    that captures CUDA graphs or lacks the extension.
    """
    mask = as_mask(mask)
    _check_engine(llm)
    plug_on_ranks(lambda method, args: llm.collective_rpc(method, args=tuple(args)), mask)
    _reset_prefix_cache(llm)


def unplug(llm) -> None:
    """Give `llm` back its dense layers (vLLM's own forwards, bit for bit); a no-op if
    unplugged."""
    _check_engine(llm)
    llm.collective_rpc("doe_unplug")
    _reset_prefix_cache(llm)


def status(llm) -> list:
    """Per rank: its place and its local kept neuron and head counts per layer (None:
    dense)."""
    _check_engine(llm)
    return llm.collective_rpc("doe_status")


def _check_engine(llm) -> None:
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    if config is None:
        raise TypeError(f"expected a vllm.LLM, got {type(llm).__name__}")
    if not names_extension(config.parallel_config.worker_extension_cls):
        raise RuntimeError(f"create the LLM with worker_extension_cls={EXTENSION!r} (it has "
                           f"{config.parallel_config.worker_extension_cls!r})")
    check_engine_config(config)


def names_extension(qualname: str) -> bool:
    """Whether a worker_extension_cls qualname names WorkerExtension or a subclass of it."""
    module, _, name = (qualname or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, WorkerExtension)


def _reset_prefix_cache(llm) -> None:
    if not llm.reset_prefix_cache():
        raise RuntimeError("the expert was swapped, but vLLM could not reset its prefix cache "
                           "(requests still running?): cached blocks of the previous expert may "
                           "be reused; call llm.reset_prefix_cache() once the engine is idle")
