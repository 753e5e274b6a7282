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
import weakref

from doe_kernels.vllm.protocol import (EXTRA_ARG, SALT_PREFIX, cache_salt, held_on_every_rank,
                                       reserved_salt)


class Guard:
    """The names an engine admits, and the names of the requests it admitted since it was last
    idle. Holds the LLM and its engine weakly (the engine holds the guard)."""

    def __init__(self, llm):
        self._llm, self._engine = weakref.ref(llm), weakref.ref(llm.llm_engine)
        self.held = frozenset()
        self._named = set()
        self.refresh()

    def refresh(self) -> None:
        """Read the names the ranks hold (retiring ones not) again."""
        self.held = frozenset(held_on_every_rank(self._llm().collective_rpc("doe_experts")))

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
        salted_prompt = salted(prompt, name)
        self.may_be_pending(name)  # (forgets the names of an idle engine's requests)
        self._named.add(name)
        return salted_prompt

    def may_be_pending(self, name: str) -> bool:
        """Whether a request naming `name` may be unfinished: one was admitted since the engine
        was last seen idle, and it is not idle now (queued with LLM.enqueue, say, a request may
        wait unscheduled, where no rank sees it)."""
        if self._engine().get_num_unfinished_requests() == 0:
            self._named.clear()
        return name in self._named


def guard(llm) -> Guard:
    """`llm`'s guard, installed on first use (the engine's `add_request` wrapped once)."""
    engine = llm.llm_engine
    current = engine.__dict__.get("_doe_guard")
    if current is not None:
        return current
    current = Guard(llm)
    add_request = engine.add_request
    signature = inspect.signature(add_request)
    original = (weakref.WeakMethod(add_request) if inspect.ismethod(add_request)
                else lambda: add_request)

    def guarded_add_request(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        prompt = bound.arguments["prompt"]
        params = getattr(prompt, "sampling_params", None) or bound.arguments["params"]
        bound.arguments["prompt"] = current.admit(prompt, params)
        return original()(*bound.args, **bound.kwargs)

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


def prompt_dict(prompt) -> dict:
    """A text, token ids or a vLLM prompt dict as a vLLM prompt dict; ValueError otherwise."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, (list, tuple)):
        return {"prompt_token_ids": list(prompt)}
    if isinstance(prompt, dict):
        return prompt
    raise ValueError(f"a prompt must be a text, token ids or a vLLM prompt dict, got "
                     f"{type(prompt).__name__}")


def salted(prompt, name: str):
    """`prompt` (what `prompt_dict` takes, or the engine's processed request) with the
    prefix-cache salt of the expert `name`."""
    if not isinstance(prompt, (str, list, tuple, dict)) and hasattr(prompt, "cache_salt"):
        prompt.cache_salt = cache_salt(name, prompt.cache_salt)  # a vllm EngineCoreRequest,
        return prompt  # its own from here on
    prompt = prompt_dict(prompt)
    return {**prompt, "cache_salt": cache_salt(name, prompt.get("cache_salt"))}
