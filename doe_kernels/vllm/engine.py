"""The caller's side: `plug(llm, mask)` and `unplug(llm)` on a `vllm.LLM`; `add(llm, name, mask)`,
`remove` and `for_experts` for mixed-task batches (doe_kernels.vllm.mixed).

`plug` checks the engine (the doe_kernels worker extension, no CUDA graphs), then asks every rank
to check the mask and stage its plan; only if every rank accepts does it ask them to apply it. A
refused mask raises ValueError here and the engine keeps serving the previous expert (or the dense
model).
After every plug, and an unplug that restored layers, the prefix cache is reset: cached KV blocks
were computed by the previous expert. `add` and `remove` reset nothing: requests naming an expert
carry a prefix-cache salt of its own, new at every add of its name, so no request meets the KV
blocks of another expert or of the one a name held before. The first call on an engine makes it
check and salt every request that names an expert (doe_kernels.vllm.admission); `add` and `remove`
of a name are refused, nothing changed, while requests naming it may be unfinished.
"""
import importlib

from doe_kernels.vllm.admission import guard, naming, prompt_dict
from doe_kernels.vllm.protocol import (as_mask, check_name, held_on_every_rank, plug_on_ranks,
                                       removed_on_every_rank, statuses)
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
    if any(llm.collective_rpc("doe_unplug")):  # (layers restored: nothing was plugged at 0)
        _reset_prefix_cache(llm, "the expert was unplugged")


def add(llm, name: str, mask) -> None:
    """Hold an expert under `name` in `llm`, beside the plugged one (if any), for the requests
    that name it (`for_experts`): one engine step then serves requests of several experts, each
    on its own neurons and heads. Adding a name again replaces its expert (RuntimeError, nothing
    changed, while requests naming it may be unfinished, as for `remove`). Checked on every rank
    before any changes, as `plug` is (the same errors)."""
    check_name(name)
    mask = as_mask(mask)
    _check_engine(llm)
    with guard(llm).changing_expert(name, adding=True):
        plug_on_ranks(lambda method, args: llm.collective_rpc(method, args=tuple(args)), mask,
                      "doe_add_expert", name)


def remove(llm, name: str) -> None:
    """Stop holding the expert `name` (KeyError if `llm` holds none of that name; RuntimeError,
    nothing changed, while requests naming it may be unfinished: queued with `LLM.enqueue`, or
    a `generate` call running in another thread)."""
    check_name(name)
    _check_engine(llm)
    with guard(llm).changing_expert(name, adding=False):
        removed = [bool(reply) for reply in llm.collective_rpc("doe_remove_expert",
                                                               args=(name,))]
    if removed_on_every_rank(name, removed):
        return
    raise KeyError(f"no expert named {name!r} is held (held: {experts(llm)})")


def experts(llm) -> list:
    """The names of the experts `llm` holds, in the order they were added."""
    _check_engine(llm)
    return held_on_every_rank(llm.collective_rpc("doe_experts"))


def for_experts(llm, requests, params=None) -> tuple[list, list]:
    """(prompts, sampling params) for `llm.generate(prompts, params)`, each request on its own
    expert, the prompts as vLLM prompt dicts. `requests`: (name, prompt) pairs, the name of a held
    expert (`add`) or None (the plugged expert, or the dense model), the prompt a text, a list of
    token ids or a vLLM prompt dict; `params`: a vllm.SamplingParams for every request (vLLM's
    default when None), or a list of them, one per request. Each request's params name its expert
    (extra_args["doe_expert"]; a request named None names none, whatever its params named); the
    engine gives each such request its expert's prefix-cache salt as it takes it
    (doe_kernels.vllm.admission). Raises ValueError for a name `llm` does not hold."""
    from vllm import SamplingParams

    requests = [tuple(r) for r in requests]
    if any(len(r) != 2 for r in requests):
        raise ValueError("requests must be (expert name or None, prompt) pairs")
    held = experts(llm)
    unknown = sorted({str(n) for n, _ in requests if n is not None and n not in held})
    if unknown:
        raise ValueError(f"no expert held under the names {unknown} (held: {held}); "
                         "add them first with doe_kernels.vllm.add")
    params = SamplingParams() if params is None else params
    if not isinstance(params, (list, tuple)):
        params = [params] * len(requests)
    if len(params) != len(requests):
        raise ValueError(f"{len(params)} sampling params for {len(requests)} requests")
    wrong = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
    if wrong:
        raise TypeError(f"params must be a vllm.SamplingParams or a list of them, got "
                        f"{wrong[0]}")
    return ([prompt_dict(prompt) for _, prompt in requests],
            [naming(p, name) for (name, _), p in zip(requests, params)])


def status(llm) -> list:
    """Per rank: its place and its local kept neuron and head counts per layer (None:
    dense)."""
    _check_engine(llm)
    return statuses(llm.collective_rpc("doe_status"))


def _check_engine(llm) -> None:
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    if config is None:
        raise TypeError(f"expected a vllm.LLM, got {type(llm).__name__}")
    if not names_extension(config.parallel_config.worker_extension_cls):
        raise RuntimeError(f"create the LLM with worker_extension_cls={EXTENSION!r} (it has "
                           f"{config.parallel_config.worker_extension_cls!r})")
    check_engine_config(config)
    guard(llm)


def names_extension(qualname: str) -> bool:
    """Whether a worker_extension_cls qualname names WorkerExtension or a subclass of it."""
    module, _, name = (qualname or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, WorkerExtension)


def _reset_prefix_cache(llm, done: str = "the expert was swapped") -> None:
    if not llm.reset_prefix_cache():
        raise RuntimeError(f"{done}, but vLLM could not reset its prefix cache (requests still "
                           "running?): cached blocks of the previous expert may be reused; call "
                           "llm.reset_prefix_cache() once the engine is idle")
