"""Requests that name an expert, checked and salted as a `vllm.LLM` takes them.

Once any doe_kernels.vllm call has touched an engine (`guard`), its `add_request` reads each
request's `SamplingParams.extra_args["doe_expert"]`, however the request was made (through
`for_experts` or with extra_args of its own):
 * a name the engine does not hold (never added, or removed: an expert still serving requests it
   had before its removal takes no new ones) raises ValueError before the request reaches the
   engine; `LLM.generate` then aborts the requests of that call it had added, and the engine
   serves on;
 * a named request gets its expert's prefix-cache salt (doe_kernels.vllm.protocol.cache_salt of
   the name and the prompt's own salt), so that no request reuses KV blocks another expert (or
   the dense model) computed; a request naming none may not carry a salt of its own that starts
   as the experts' do (ValueError).
The names the guard admits are the ranks' (`doe_experts`), read again after every add and
remove.
"""
import inspect

from doe_kernels.vllm.protocol import EXTRA_ARG, SALT_PREFIX, cache_salt, reserved_salt


class Guard:
    """The names an engine admits, and its wrapped `add_request`."""

    def __init__(self, llm):
        self.llm = llm
        self.held = frozenset()
        self.refresh()

    def refresh(self) -> None:
        """Read the names the ranks hold (retiring ones not) again."""
        self.held = frozenset(self.llm.collective_rpc("doe_experts")[0])

    def admit(self, prompt, params):
        """`prompt` as the engine should take it (salted for its expert), or ValueError."""
        name = name_in(params)
        if name is None:
            own = prompt.get("cache_salt") if isinstance(prompt, dict) else getattr(
                prompt, "cache_salt", None)
            if reserved_salt(own):
                raise ValueError(f"a request's own cache_salt may not start with {SALT_PREFIX!r}"
                                 " (the experts' salts do): it could fill an expert's prefix "
                                 "cache")
            return prompt
        if name not in self.held:
            raise ValueError(f"a request names the expert {name!r}, which this engine does not "
                             f"hold (held: {sorted(self.held)}); add it first with "
                             "doe_kernels.vllm.add")
        return salted(prompt, name)


def guard(llm) -> Guard:
    """`llm`'s guard, installed on first use (the engine's `add_request` wrapped once)."""
    engine = llm.llm_engine
    current = engine.__dict__.get("_doe_guard")
    if current is not None:
        return current
    current = Guard(llm)
    add_request = engine.add_request
    signature = inspect.signature(add_request)

    def guarded_add_request(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        prompt = bound.arguments["prompt"]
        params = getattr(prompt, "sampling_params", None) or bound.arguments["params"]
        bound.arguments["prompt"] = current.admit(prompt, params)
        return add_request(*bound.args, **bound.kwargs)

    engine.add_request = guarded_add_request
    engine._doe_guard = current
    return current


def name_in(params) -> str | None:
    """The expert a request's sampling params name (None: none); ValueError for a name that is
    not a non-empty string."""
    name = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARG)
    return None if name is None else check_name(name)


def check_name(name) -> str:
    """`name`, or ValueError if it is not a non-empty string."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an expert's name must be a non-empty string, got {name!r}")
    return name


def naming(params, name):
    """A copy of `params` (vllm.SamplingParams) naming the expert `name` (as given for None)."""
    if name is None:
        return params
    named = params.clone()
    named.extra_args = {**(params.extra_args or {}), EXTRA_ARG: name}
    return named


def salted(prompt, name: str):
    """`prompt` (a text, token ids, a vLLM prompt dict or the engine's processed request) with
    the prefix-cache salt of the expert `name`."""
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    elif isinstance(prompt, (list, tuple)):
        prompt = {"prompt_token_ids": list(prompt)}
    if isinstance(prompt, dict):
        return {**prompt, "cache_salt": cache_salt(name, prompt.get("cache_salt"))}
    if hasattr(prompt, "cache_salt"):  # a vllm EngineCoreRequest, its own from here on
        prompt.cache_salt = cache_salt(name, prompt.cache_salt)
        return prompt
    raise ValueError(f"a prompt must be a text, token ids or a vLLM prompt dict, got "
                     f"{type(prompt).__name__}")
