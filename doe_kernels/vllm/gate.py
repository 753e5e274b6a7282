"""Mixed-task requests over HTTP: `vllm serve ... --middleware doe_kernels.vllm.gate.ExpertGate`.

A request names its expert in its body's `vllm_xargs` (`{"doe_expert": NAME}`), which vLLM hands
to the workers as `SamplingParams.extra_args`. A worker that meets a name it does not hold cannot
refuse that one request: the step fails and the engine stops. `ExpertGate`, an ASGI middleware
in the API server, stands before the engine:
 * a completion, chat completion or responses request naming an expert the engine does not hold
   (or one being added or removed, or naming one with anything but a non-empty string, or asking
   to run in the background or with beam search, which drops the extra arguments, or with a
   `cache_salt` of its own that vLLM refuses) is answered 400 and never reaches it; so is any other POST whose body holds "doe_expert" (the routes that
   take `vllm_xargs` or `extra_args` another way: Anthropic messages, batches, tokens-only
   generation, audio; a form's fields are read as the app reads them, with Starlette's parser,
   each value also as JSON, as vLLM reads `vllm_xargs`);
 * a request naming a held expert is given that expert's prefix-cache salt (a hash of the name,
   the request's own `cache_salt`, if any, and the count of experts added under that name), so
   that no request reuses KV blocks another expert computed and a name added again never meets
   the KV blocks of the expert it replaced; a POST whose own `cache_salt` starts as the
   experts' salts do (`doe_kernels-`) is answered 400, so no request can fill an expert's
   prefix cache from another model;
 * `POST /collective_rpc` removing or replacing an expert (`doe_remove_expert`,
   `doe_add_expert`) while requests naming it run is answered 409, before any rank changes;
   adding or removing one must name it as the first of `args` (not in `kwargs`);
 * its answers to `POST /collective_rpc` carry the header `x-doe-kernels-gate` (how
   `doe_kernels.vllm.http.add` knows the server has the gate).
A request that vLLM's own API-key check (`--api-key`, `VLLM_API_KEY`; it runs after this
middleware) will answer 401 passes unread. The names held are read from the workers
(`doe_experts`) on first use and again after every add or remove, which all pass the gate. It
counts the requests of one API server process, so a server started with several
(`--api-server-count` above 1, which data parallelism sets by default) fails at start-up, saying
so.
"""
import asyncio
import collections
import dataclasses
import json

from doe_kernels.vllm.protocol import (EXTRA_ARG, SALT_PREFIX, cache_salt, held_on_every_rank,
                                       reserved_salt)

GENERATING = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
RPC_PATH = "/collective_rpc"
GATE_HEADER = b"x-doe-kernels-gate"
CHANGING = ("doe_add_expert", "doe_remove_expert")  # worker methods that change the names held


class ExpertGate:
    """The ASGI middleware (vLLM's `--middleware` instantiates it with the app)."""

    def __init__(self, app):
        self.app = app
        self.held = None  # the names the workers hold, None: to be read
        self.changes = 0  # adds and removes begun: a read of the names older than one is stale
        self.generations = collections.Counter()  # adds seen per name
        self.running = collections.Counter()  # requests in flight per name
        self.changing = set()  # names being added or removed
        self.api_key = _UNREAD  # vLLM's API-key check of this server (_api_key_check)
        self.reading = None  # (event loop, asyncio.Lock): one read of the names at a time

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await _start(scope, receive, send, self.app)
        if scope["type"] != "http" or scope["method"] != "POST" or self._lacks_key(scope):
            return await self.app(scope, receive, send)
        path = _route(scope)
        body = await _read_body(receive)
        if path == RPC_PATH:
            return await self._rpc(scope, receive, _tagged(send), body)
        try:
            parsed = await _Body.read(scope, body)
        except RecursionError:
            return await _error(send, 400, "the request body is nested too deeply to read")
        request = parsed.json
        if parsed.holds("cache_salt", reserved_salt, word=SALT_PREFIX):
            return await _error(send, 400, f"a cache_salt starting with {SALT_PREFIX!r} is "
                                "reserved for the experts' prefix caches")
        if path not in GENERATING:
            if parsed.holds(EXTRA_ARG):
                return await _error(send, 400, f"{path} cannot serve an expert: name one "
                                    f"(vllm_xargs.{EXTRA_ARG}) in {', '.join(GENERATING)}")
            return await self.app(scope, _replay(body, receive), send)
        if not isinstance(request, dict):  # vLLM answers what it cannot parse
            return await self.app(scope, _replay(body, receive), send)
        return await self._generate(scope, receive, send, request, body)

    async def _generate(self, scope, receive, send, request: dict, body: bytes):
        xargs = request.get("vllm_xargs")
        name = xargs.get(EXTRA_ARG) if isinstance(xargs, dict) else None
        if name is None:  # the plugged expert, or the dense model
            return await self.app(scope, _replay(body, receive), send)
        problem = await self._refusal(scope, name, request)
        if problem is not None:
            return await _error(send, *problem)
        request["cache_salt"] = cache_salt(name, request.get("cache_salt"),
                                           self.generations[name])
        body = json.dumps(request).encode()
        self.running[name] += 1
        try:
            await self.app(_with_length(scope, len(body)), _replay(body, receive), send)
        finally:
            self.running[name] -= 1
            if not self.running[name]:
                del self.running[name]

    async def _refusal(self, scope, name, request: dict):
        """(status, message) refusing a request that names `name`, or None."""
        if not isinstance(name, str) or not name:
            return 400, f"vllm_xargs.{EXTRA_ARG} must name an expert (a non-empty string), " \
                        f"got {name!r}"
        if request.get("background"):
            return 400, "a request naming an expert cannot run in the background"
        if request.get("use_beam_search"):  # vLLM's beam search drops the extra arguments
            return 400, "a request naming an expert cannot use beam search"
        problem = _salt_problem(request.get("cache_salt"))
        if problem is not None:
            return 400, problem
        held = await self._names(scope)
        if isinstance(held, Exception):
            return 500, (f"the server cannot tell which experts it holds ({held!r}); is it "
                         "started with --worker-extension-cls "
                         "doe_kernels.vllm.WorkerExtension?")
        if name in self.changing:
            return 400, (f"the expert {name!r} is being added or removed; send the request "
                         "again once that has finished")
        if name not in held:
            return 400, (f"no expert is held under the name {name!r}; add it first "
                         "(doe_kernels.vllm.http.add)")
        return None

    def _lacks_key(self, scope) -> bool:
        """Whether vLLM's own API-key check (`--api-key`, VLLM_API_KEY), which runs after this
        middleware, will answer the request 401: the gate then hands it on unread, so that a
        client without the key learns nothing from the gate (which names are held) and costs
        it no parsing."""
        if self.api_key is _UNREAD:
            self.api_key = _api_key_check(getattr(scope.get("app"), "state", None))
        if self.api_key is None:
            return False
        from starlette.datastructures import Headers

        check, guarded = self.api_key
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # as vLLM's check reads it
        return path.startswith(guarded) and not check.verify_token(Headers(scope=scope))

    async def _rpc(self, scope, receive, send, body: bytes):
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):  # the app answers it
            request = None
        method = request.get("method") if isinstance(request, dict) else None
        if method not in CHANGING:
            return await self.app(scope, _replay(body, receive), send)
        args = request.get("args")
        name = args[0] if isinstance(args, list) and args else None
        if request.get("kwargs") or not isinstance(name, str) or not name:
            return await _error(send, 400, f"{method} takes the expert's name (a non-empty "
                                "string) as the first of args, and no kwargs")
        if self.running.get(name) or name in self.changing:
            doing = (f"serves {self.running[name]} running requests" if self.running.get(name)
                     else "is being added or removed")
            return await _error(send, 409, f"the expert {name!r} {doing}; remove or replace it "
                                "once they have finished (nothing was changed)")
        self.changes += 1
        self.changing.add(name)
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            if method == "doe_add_expert":  # a replaced expert's KV blocks stay unreachable
                self.generations[name] += 1
            self.changing.discard(name)
            self.changes += 1
            self.held = None

    async def _names(self, scope):
        """The names the workers hold (or the exception that kept them from saying: no worker
        extension, no engine), read again while an add or a remove begins during the read;
        requests that need them at once wait for one read."""
        loop = asyncio.get_running_loop()
        if self.reading is None or self.reading[0] is not loop:
            self.reading = (loop, asyncio.Lock())
        async with self.reading[1]:
            while self.held is None:
                changes = self.changes
                try:
                    replies = await scope["app"].state.engine_client.collective_rpc(
                        "doe_experts")
                except Exception as error:  # noqa: BLE001 (said to the client)
                    return error
                if self.changes == changes:
                    self.held = set(held_on_every_rank(replies))
            return self.held


def _salt_problem(own) -> str | None:
    """vLLM's own refusal of a request's `cache_salt` (the gate hashes it into the expert's
    salt, which vLLM would then accept), or None."""
    try:
        from vllm.entrypoints.generate.base.protocol import validate_cache_salt
    except ImportError:  # another vLLM layout: none but the gate's own checks
        return None
    try:
        validate_cache_salt(own)
    except Exception as error:  # noqa: BLE001 (vLLM's VLLMValidationError, a ValueError)
        return str(error)
    return None


async def _start(scope, receive, send, app):
    """The app's lifespan, unless the server runs several API server processes: each would
    count only its own requests, and one could remove an expert that another's requests still
    name. Then its start-up fails with the reason (uvicorn exits with it)."""
    count = _api_server_processes(getattr(scope.get("app"), "state", None))
    if count == 1:
        return await app(scope, receive, send)
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send(dict(type="lifespan.startup.failed", message=(
            f"doe_kernels.vllm.gate.ExpertGate serves one API server process, and this server "
            f"starts {count} (--api-server-count, which data parallelism sets by default): "
            "start it with --api-server-count 1")))


def _api_server_processes(state) -> int:
    """How many API server processes share this server's engine: the engine client's own count
    where it has one (vLLM's module entry point serves from one process whatever
    `--api-server-count` says), else the count vLLM's `serve` left in `args` (None: one)."""
    count = getattr(getattr(state, "engine_client", None), "_client_count", None)
    if isinstance(count, int) and count >= 1:
        return count
    return getattr(getattr(state, "args", None), "api_server_count", None) or 1


def _api_key_check(state):
    """(vLLM's AuthenticationMiddleware holding this server's keys, the path prefixes it guards),
    from the server's arguments as vLLM builds its own; None where the server takes no key."""
    try:
        from vllm import envs
        from vllm.entrypoints.serve.middleware.authenticate import (GUARDED_PREFIX,
                                                                    AuthenticationMiddleware)
    except ImportError:  # another vLLM layout (or none): the gate reads every request
        return None
    args = getattr(state, "args", None)
    tokens = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
    return (AuthenticationMiddleware(None, tokens), GUARDED_PREFIX) if tokens else None


_UNREAD = object()
_NOT_JSON = object()  # a body json.loads refused
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")  # what Starlette parses


@dataclasses.dataclass
class _Body:
    """A POST body as the app may read it: `raw` bytes, `json` (its JSON value, or _NOT_JSON) and
    `form`, a form's fields as Starlette's parser reads them under the request's content type
    (what FastAPI's Form fields get), each as {name: value} and, where the value is JSON, parsed
    (vLLM decodes `vllm_xargs` so)."""

    raw: bytes
    json: object
    form: list | None  # None: not a form Starlette read

    @classmethod
    async def read(cls, scope, raw: bytes) -> "_Body":
        """The body's readings; RecursionError for JSON nested deeper than Python parses (the
        gate refuses it: its keys cannot be read)."""
        try:
            value = json.loads(raw)
        except ValueError:  # (a RecursionError is no ValueError: it goes up)
            value = _NOT_JSON
        return cls(raw, value, await _form_fields(scope, raw))

    def holds(self, key: str, test=lambda value: True, word: str | None = None) -> bool:
        """Whether a reading of the body holds `key` at any depth with a value that passes
        `test`; or, for a body that is neither JSON nor a form the parser read (another format),
        whether its bytes hold the key's word (and `word` if given)."""
        readings = (self.form or []) + ([] if self.json is _NOT_JSON else [self.json])
        if any(_holds(value, key, test) for value in readings):
            return True
        return self.json is _NOT_JSON and self.form is None and key.encode() in self.raw and (
            word is None or word.encode() in self.raw)


def _holds(value, key: str, test) -> bool:
    """Whether a JSON value holds `key` at any depth with a value that passes `test`."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if key in value and test(value[key]):
                return True
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


async def _form_fields(scope, body: bytes) -> list | None:
    """A form body's fields (see _Body) as Starlette parses them; None for another content type,
    a form Starlette cannot parse (the app cannot either), or without Starlette (no vLLM
    server)."""
    try:
        from starlette.datastructures import Headers
        from starlette.requests import Request
    except ImportError:
        return None
    content_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
    if content_type not in FORMS:
        return None

    async def disconnected():
        return dict(type="http.disconnect")
    try:
        form = await Request(scope, _replay(body, disconnected)).form()
    except Exception:  # noqa: BLE001 (a malformed form: the app answers it)
        return None
    try:
        fields = []
        for name, value in form.multi_items():
            if isinstance(value, str):  # (not an uploaded file)
                fields.append({name: value})
                try:
                    fields.append(json.loads(value))
                except (ValueError, RecursionError):  # not JSON: vLLM refuses it as vllm_xargs
                    pass
        return fields
    finally:
        await form.close()


def _route(scope) -> str:
    """The request's path within the app (vLLM's --root-path removed), as Starlette's router
    reads it (starlette._utils.get_route_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def _tagged(send):
    """`send` adding the gate's header to the response."""
    async def tagged(message):
        if message["type"] == "http.response.start":
            message = dict(message, headers=list(message.get("headers", [])) + [(GATE_HEADER,
                                                                                  b"1")])
        await send(message)
    return tagged


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read, then the client's own messages (vLLM
    listens for the client's disconnect)."""
    pending = [dict(type="http.request", body=body, more_body=False)]

    async def replay():
        return pending.pop() if pending else await receive()
    return replay


def _with_length(scope, length: int):
    headers = [(key, value) for key, value in scope["headers"] if key.lower() != b"content-length"]
    return dict(scope, headers=headers + [(b"content-length", str(length).encode())])


async def _error(send, status: int, message: str):
    """An error as vLLM's OpenAI server words its own."""
    kind = {400: "BadRequestError", 409: "ConflictError"}.get(status, "InternalServerError")
    await _send_json(send, status, dict(error=dict(message=message, type=kind, param=None,
                                                   code=status)))


async def _send_json(send, status: int, content: dict):
    body = json.dumps(content).encode()
    await send(dict(type="http.response.start", status=status,
                    headers=[(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]))
    await send(dict(type="http.response.body", body=body))
