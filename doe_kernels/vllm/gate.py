"""Mixed-task requests over HTTP: `vllm serve ... --middleware doe_kernels.vllm.gate.ExpertGate`.

A request names its expert in its body's `vllm_xargs` (`{"doe_expert": NAME}`), which vLLM hands
to the workers as `SamplingParams.extra_args`. A worker that meets a name it does not hold cannot
refuse that one request: the step fails and the engine stops. `ExpertGate`, an ASGI middleware
in the API server, stands before the engine:
 * a completion, chat completion or responses request naming an expert the engine does not hold
   (or naming one with anything but a non-empty string) is answered 400 and never reaches it;
 * a request naming a held expert is given that expert's prefix-cache salt (after its own
   `cache_salt`, if any), so that no request reuses KV blocks another expert computed; the salt
   counts the experts added under that name, so a name added again never meets the KV blocks
   of the expert it replaced;
 * `POST /collective_rpc` removing an expert (`doe_remove_expert`) while requests naming it run
   is answered 409, before any rank changes;
 * `GET /doe/experts` answers the names held (what `doe_kernels.vllm.http.experts` reads; its
   presence tells the client that the gate is installed).
The names held are read from the workers (`doe_experts`) on first use, after every add or remove
that passes the gate, and when a request names one the gate has not seen. The gate counts the
requests of one API server process: run one (vLLM's default `--api-server-count`).
"""
import collections
import json

from doe_kernels.vllm.protocol import EXTRA_ARG, cache_salt

GENERATING = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
NAMES_PATH = "/doe/experts"
CHANGING = ("doe_add_expert", "doe_remove_expert")  # worker methods that change the names held


class ExpertGate:
    """The ASGI middleware (vLLM's `--middleware` instantiates it with the app)."""

    def __init__(self, app):
        self.app = app
        self.held = None  # the names the workers hold, None: to be read
        self.generations = collections.Counter()  # adds seen per name
        self.running = collections.Counter()  # requests in flight per name

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] == "http" and scope["method"] == "GET" and path == NAMES_PATH:
            return await self._answer_names(scope, send)
        if scope["type"] != "http" or scope["method"] != "POST" or (
                path not in GENERATING and path != "/collective_rpc"):
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):  # vLLM answers what it cannot parse
            return await self.app(scope, _replay(body, receive), send)
        if path == "/collective_rpc":
            return await self._rpc(scope, receive, send, request, body)
        return await self._generate(scope, receive, send, request, body)

    async def _generate(self, scope, receive, send, request: dict, body: bytes):
        xargs = request.get("vllm_xargs")
        name = xargs.get(EXTRA_ARG) if isinstance(xargs, dict) else None
        if name is None:  # the plugged expert, or the dense model
            return await self.app(scope, _replay(body, receive), send)
        if not isinstance(name, str) or not name:
            return await _error(send, 400, f"vllm_xargs.{EXTRA_ARG} must name an expert (a "
                                f"non-empty string), got {name!r}")
        held = await self._names(scope, refresh=self.held is None or name not in self.held)
        if held is None:
            return await _error(send, 500, "the server cannot tell which experts it holds: "
                                "start it with --worker-extension-cls "
                                "doe_kernels.vllm.WorkerExtension")
        if name not in held:
            return await _error(send, 400, f"no expert is held under the name {name!r} (held: "
                                f"{sorted(held)}); add it first (doe_kernels.vllm.http.add)")
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

    async def _rpc(self, scope, receive, send, request: dict, body: bytes):
        method, args = request.get("method"), request.get("args") or []
        if method not in CHANGING:
            return await self.app(scope, _replay(body, receive), send)
        name = args[0] if isinstance(args, list) and args else None
        if method == "doe_remove_expert" and self.running.get(name):
            return await _error(send, 409, f"the expert {name!r} serves "
                                f"{self.running[name]} running requests; remove it once they "
                                "have finished (nothing was changed)")
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            if method == "doe_add_expert" and isinstance(name, str):
                self.generations[name] += 1
            self.held = None

    async def _names(self, scope, refresh: bool):
        if refresh:
            try:
                replies = await scope["app"].state.engine_client.collective_rpc("doe_experts")
            except Exception:  # no worker extension (or no engine): say so to the client
                return None
            self.held = set(replies[0])
        return self.held

    async def _answer_names(self, scope, send):
        held = await self._names(scope, refresh=True)
        if held is None:
            return await _error(send, 500, "the server cannot tell which experts it holds: "
                                "start it with --worker-extension-cls "
                                "doe_kernels.vllm.WorkerExtension")
        await _send_json(send, 200, dict(experts=sorted(held)))


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
