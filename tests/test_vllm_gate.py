"""The HTTP gate of mixed-task requests (doe_kernels.vllm.gate.ExpertGate) on a stand-in ASGI app
and engine client: what reaches the engine, what is refused, and the salts. Needs no vLLM (the
server test in test_vllm_serve.py runs it in `vllm serve`)."""
import asyncio
import json
from types import SimpleNamespace

import pytest

from doe_kernels.vllm.gate import ExpertGate
from doe_kernels.vllm.protocol import EXTRA_ARG


class Engine:
    """The engine client: holds names, counts the workers' `doe_experts` calls."""

    def __init__(self, names=()):
        self.names, self.reads = list(names), 0

    async def collective_rpc(self, method):
        assert method == "doe_experts"
        self.reads += 1
        return [list(self.names), list(self.names)]  # two ranks


class App:
    """The API server: records each request it gets (its body and headers) and answers 200;
    `doe_add_expert` / `doe_remove_expert` RPCs change the engine's names. `hold` makes a
    generation request wait until released."""

    def __init__(self, engine):
        self.state = SimpleNamespace(engine_client=engine)
        self.seen, self.hold = [], None

    async def __call__(self, scope, receive, send):
        raw = (await receive())["body"]
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        self.seen.append((scope["path"], body, dict(scope["headers"])))
        engine = self.state.engine_client
        if isinstance(body, dict) and body.get("method") == "doe_add_expert":
            engine.names = list(dict.fromkeys(engine.names + [body["args"][0]]))
        elif isinstance(body, dict) and body.get("method") == "doe_remove_expert":
            engine.names.remove(body["args"][0])
        elif self.hold is not None and isinstance(body, dict):
            await self.hold.wait()
        await send(dict(type="http.response.start", status=200, headers=[]))
        await send(dict(type="http.response.body", body=b"{}"))


def call(gate, app, path, body=None, method="POST", chunks=1):
    """(status, JSON reply) of one request through the gate, its body sent in `chunks` parts."""
    return asyncio.run(acall(gate, app, path, body, method, chunks))


async def acall(gate, app, path, body=None, method="POST", chunks=1):
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    size = -(-len(raw) // chunks) or 1
    parts = [raw[i:i + size] for i in range(0, len(raw), size)] or [b""]
    messages = [dict(type="http.request", body=part, more_body=i < len(parts) - 1)
                for i, part in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else dict(type="http.disconnect")

    async def send(message):
        sent.append(message)

    scope = dict(type="http", method=method, path=path, app=app,
                 headers=[(b"content-length", str(len(raw)).encode())])
    await gate(scope, receive, send)
    reply = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(reply)


def completion(name, **extra):
    return dict(model="m", prompt="hi", vllm_xargs={EXTRA_ARG: name, "other": 1}, **extra)


def setup(names=("polarity",)):
    engine = Engine(names)
    app = App(engine)
    return engine, app, ExpertGate(app)


def test_a_request_naming_a_held_expert_reaches_the_engine_salted():
    engine, app, gate = setup()
    assert call(gate, app, "/v1/completions", completion("polarity"), chunks=3)[0] == 200
    path, body, headers = app.seen[-1]
    assert body["vllm_xargs"] == {EXTRA_ARG: "polarity", "other": 1}
    assert body["cache_salt"] == "doe_kernels expert polarity"
    assert headers[b"content-length"] == str(len(json.dumps(body).encode())).encode()
    # the request's own salt stays, before the expert's; chat requests alike
    call(gate, app, "/v1/chat/completions", completion("polarity", cache_salt="user 7"))
    assert app.seen[-1][1]["cache_salt"] == "user 7 | doe_kernels expert polarity"
    assert engine.reads == 1  # the names were read once
    # naming none, other paths and bodies vLLM must judge itself pass unchanged
    plain = dict(model="m", prompt="hi")
    for path, body in (("/v1/completions", plain), ("/v1/completions", b"not json"),
                       ("/v1/embeddings", completion("unknown")), ("/collective_rpc",
                                                                   dict(method="doe_status"))):
        call(gate, app, path, body)
        assert app.seen[-1][:2] == (path, body)  # as sent


def test_unknown_or_malformed_names_never_reach_the_engine():
    engine, app, gate = setup()
    for name, status, message in (("tweets", 400, "no expert is held under the name 'tweets'"),
                                  ("", 400, "must name an expert"), (7, 400, "must name")):
        code, reply = call(gate, app, "/v1/completions", completion(name))
        assert code == status and message in reply["error"]["message"]
        assert reply["error"]["code"] == status
    assert app.seen == []
    assert engine.reads == 1  # an unknown name is looked up again (an add elsewhere)
    engine.names.append("tweets")
    assert call(gate, app, "/v1/completions", completion("tweets"))[0] == 200
    assert engine.reads == 2


def test_adds_and_removes_refresh_the_names_and_the_salts():
    engine, app, gate = setup(names=())
    assert call(gate, app, "/doe/experts", method="GET") == (200, dict(experts=[]))
    call(gate, app, "/collective_rpc", dict(method="doe_add_expert", args=["a", "token"]))
    assert call(gate, app, "/doe/experts", method="GET") == (200, dict(experts=["a"]))
    call(gate, app, "/v1/completions", completion("a"))
    first = app.seen[-1][1]["cache_salt"]
    call(gate, app, "/collective_rpc", dict(method="doe_add_expert", args=["a", "token"]))
    call(gate, app, "/v1/completions", completion("a"))
    assert app.seen[-1][1]["cache_salt"] not in (first, None)  # the new "a" meets no old block
    call(gate, app, "/collective_rpc", dict(method="doe_remove_expert", args=["a"]))
    assert call(gate, app, "/v1/completions", completion("a"))[0] == 400


def test_an_expert_serving_requests_cannot_be_removed():
    engine, app, gate = setup()
    remove = dict(method="doe_remove_expert", args=["polarity"])

    async def scenario():  # one event loop, as in the API server
        app.hold = asyncio.Event()
        running = asyncio.create_task(acall(gate, app, "/v1/completions", completion("polarity")))
        while not gate.running:
            await asyncio.sleep(0)
        refused = await acall(gate, app, "/collective_rpc", remove)
        app.hold.set()
        return refused, await running

    refused, served = asyncio.run(scenario())
    assert refused[0] == 409 and "serves 1 running requests" in refused[1]["error"]["message"]
    assert served[0] == 200 and engine.names == ["polarity"] and not gate.running
    app.hold = None
    assert call(gate, app, "/collective_rpc", remove)[0] == 200 and engine.names == []


def test_without_the_worker_extension_the_gate_says_so():
    app = App(None)

    class Broken:
        async def collective_rpc(self, method):
            raise RuntimeError("no such method")

    app.state.engine_client = Broken()
    gate = ExpertGate(app)
    for path, body, method in (("/v1/completions", completion("a"), "POST"),
                               ("/doe/experts", None, "GET")):
        code, reply = call(gate, app, path, body, method)
        assert code == 500 and "--worker-extension-cls" in reply["error"]["message"]
    assert app.seen == []


@pytest.mark.parametrize("name", [None, "a"])
def test_naming_builds_the_body_fields(name):
    from doe_kernels.vllm import http

    assert http.naming(name) == {"vllm_xargs": {EXTRA_ARG: name}}


def test_the_client_asks_for_the_gate_before_adding():
    """http.add on a server without the gate (here one that answers 404 to everything) says
    how to start it, and sends no expert."""
    import http.server
    import threading

    import doe_kernels
    from doe_kernels.vllm import http as client

    posts = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def do_POST(self):
            posts.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RuntimeError, match="--middleware doe_kernels.vllm.gate.ExpertGate"):
            client.add(url, "a", doe_kernels.ExpertMask({0: [1, 2]}))
        with pytest.raises(ValueError, match="non-empty string"):
            client.add(url, "", doe_kernels.ExpertMask({0: [1, 2]}))
        assert posts == []
    finally:
        server.shutdown()
