"""Requests that name an expert, checked and salted as a `vllm.LLM` takes them.

Once any doe_kernels.vllm call has touched an engine (`guard`), its `add_request` reads each
request's `SamplingParams.extra_args["doe_expert"]`, however the request was made (through
`for_experts` or with extra_args of its own):
 * a name the engine does not hold (never added, or removed: an expert still serving requests it
   had before its removal takes no new ones), or one being added or removed, raises ValueError
   before the request reaches the engine; `LLM.generate` then aborts the requests of that call it
   had added, and the engine serves on;
 * a named request gets its expert's prefix-cache salt (doe_kernels.vllm.protocol.cache_salt of
   the name, the prompt's own salt and the count of adds of that name, as the server's gate
   counts them), so that no request reuses KV blocks another expert (the dense model, or an
   expert the name held before) computed; a request naming none may not carry a salt of its own
   that starts as the experts' do (ValueError).
The names the guard admits are the ranks' (`doe_experts`), read again after every add and
remove. `Guard.changing_expert` brackets an add or remove of a name: refused while requests naming
it may be unfinished, and no request naming it is admitted until it ends (as the gate does).
"""
import collections
import contextlib
import inspect
import threading
import weakref

from doe_kernels.vllm.protocol import (EXTRA_ARG, SALT_PREFIX, cache_salt, check_name,
                                       held_on_every_rank, reserved_salt)


class Guard:
    """The names an engine admits, and the names of the requests it admitted since it was last
    idle. Holds the LLM and its engine weakly (the engine holds the guard)."""

    def __init__(self, llm):
        self._llm, self._engine = weakref.ref(llm), weakref.ref(llm.llm_engine)
        self.held = frozenset()
        self.generations = collections.Counter()  # adds per name: a part of its salt
        self.changing = set()  # names being added or removed
        self._named = set()
        self._entering = 0  # requests admitted that the engine may not count yet
        self._lock = threading.Lock()  # over the names changing and admitted; not held in RPCs
        self._reading = threading.Lock()  # one read of the names at a time, the last one kept
        self.refresh()

    def refresh(self) -> None:
        """Read the names the ranks hold (retiring ones not) again."""
        with self._reading:
            self.held = frozenset(held_on_every_rank(self._llm().collective_rpc("doe_experts")))

    def admit(self, prompt, params):
        """`prompt` as the engine should take it (salted for its expert), or ValueError; call
        `entered` once the engine has it (or has refused it)."""
        name = name_in(params)
        with self._lock:
            if name is None:
                prompt = unnamed(prompt)
            else:
                self._check_admitted(name)
                prompt = salted(prompt, name, self.generations[name])
                self._pending(name)  # (forgets the names of an idle engine's requests)
                self._named.add(name)
            self._entering += 1
        return prompt

    def entered(self) -> None:
        """A request `admit` passed is now the engine's (or was refused by it)."""
        with self._lock:
            self._entering -= 1

    def _check_admitted(self, name: str) -> None:
        if name in self.changing:
            raise ValueError(f"a request names the expert {name!r}, which is being added or "
                             "removed; send it again once that has finished")
        if name not in self.held:
            raise ValueError(f"a request names the expert {name!r}, which this engine does not "
                             f"hold (held: {sorted(self.held)}); add it first with "
                             "doe_kernels.vllm.add")

    def may_be_pending(self, name: str) -> bool:
        """Whether a request naming `name` may be unfinished: one was admitted since the engine
        was last seen idle, and it is not idle now (queued with LLM.enqueue, say, a request may
        wait unscheduled, where no rank sees it)."""
        with self._lock:
            return self._pending(name)

    def _pending(self, name: str) -> bool:
        if not self._entering and self._engine().get_num_unfinished_requests() == 0:
            self._named.clear()
        return name in self._named

    @contextlib.contextmanager
    def changing_expert(self, name: str, adding: bool):
        """Around the RPC adding (`adding`) or removing the expert `name`: RuntimeError, nothing
        changed, while requests naming it may be unfinished or another call changes it; no
        request naming it is admitted until the names are read again after it. An add gives
        the name's next requests a new salt (the replaced expert's KV blocks unreachable)."""
        with self._lock:
            problem = self._refusal(name, adding)
            if problem is not None:
                raise RuntimeError(f"{problem} (nothing was changed)")
            self.changing.add(name)
        try:
            yield
        finally:
            try:
                self.refresh()
            finally:
                with self._lock:
                    self.generations[name] += adding
                    self.changing.discard(name)

    def _refusal(self, name: str, adding: bool) -> str | None:
        if self._pending(name):
            return (f"requests naming the expert {name!r} may be unfinished: let them finish "
                    "(LLM.wait_for_completion) or abort them before "
                    f"{'replacing' if adding else 'removing'} it")
        if name in self.changing:
            return f"the expert {name!r} is being added or removed by another call: wait for it"
        return None


def guard(llm) -> Guard:
    """`llm`'s guard, installed on first use (the engine's `add_request` wrapped once, also when
    several threads make their first call at once: a second wrapper read the first's signature,
    and every request failed). The engine's own lock (dict.setdefault: atomic) orders them; no
    other engine waits for its RPC."""
    engine = llm.llm_engine
    current = engine.__dict__.get("_doe_guard")
    if current is not None:
        return current
    with engine.__dict__.setdefault("_doe_installing", threading.Lock()):
        current = engine.__dict__.get("_doe_guard")
        if current is None:
            current = _install(llm, engine)
    return current


def _install(llm, engine) -> Guard:
    """A new guard of `llm`, its engine's add_request wrapped to admit requests through it."""
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
        try:
            return original()(*bound.args, **bound.kwargs)
        finally:
            current.entered()

    engine.add_request = guarded_add_request
    engine._doe_guard = current
    return current


def name_in(params) -> str | None:
    """The expert a request's sampling params name (None: none); ValueError for a name that is
    not a non-empty string."""
    name = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARG)
    return None if name is None else check_name(name)


def naming(params, name):
    """A copy of `params` (vllm.SamplingParams) naming the expert `name`; for None (the plugged
    expert, or the dense model), one naming none (`params` itself where it names none)."""
    extra = params.extra_args or {}
    if name is None and EXTRA_ARG not in extra:
        return params
    others = {key: value for key, value in extra.items() if key != EXTRA_ARG}
    named = params.clone()
    named.extra_args = (others or None) if name is None else {**others, EXTRA_ARG: name}
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


def salted(prompt, name: str, generation: int = 0):
    """`prompt` (what `prompt_dict` takes, or the engine's processed request) with the
    prefix-cache salt of the expert `name` (the `generation`-th added under it)."""
    if not isinstance(prompt, (str, list, tuple, dict)) and hasattr(prompt, "cache_salt"):
        prompt.cache_salt = cache_salt(name, prompt.cache_salt, generation)  # a vllm
        return prompt  # EngineCoreRequest, its own from here on
    prompt = prompt_dict(prompt)
    return {**prompt, "cache_salt": cache_salt(name, prompt.get("cache_salt"), generation)}


def unnamed(prompt):
    """`prompt`, naming no expert, as it is; ValueError if its own salt could pass for an
    expert's."""
    own = prompt.get("cache_salt") if isinstance(prompt, dict) else getattr(
        prompt, "cache_salt", None)
    if reserved_salt(own):
        raise ValueError(f"a request's own cache_salt may not start with {SALT_PREFIX!r} (the "
                         "experts' salts do): it could fill an expert's prefix cache")
    return prompt
