"""The HTTP gate of mixed-task requests (doe_kernels.vllm.gate.ExpertGate) on a stand-in ASGI app
and engine client: what reaches the engine, what is refused, the salts, and the races between
requests and removals. Needs no vLLM (test_vllm_serve.py runs the gate in `vllm serve`)."""
import asyncio
import json
import warnings
from types import SimpleNamespace

import pytest

from doe_kernels.vllm.gate import GATE_HEADER, ExpertGate
from doe_kernels.vllm.protocol import EXTRA_ARG, SALT_PREFIX, cache_salt


class Engine:
    """The engine client: holds names; `doe_experts` answers what it held when called, after
    `lag` (an asyncio.Event) is set, if given."""

    def __init__(self, names=()):
        self.names, self.reads, self.lag = list(names), 0, None
        self.only_first = []  # names the first rank holds and the second does not


    async def collective_rpc(self, method):
        assert method == "doe_experts"
        self.reads += 1
        held = list(self.names)
        if self.lag is not None:
            await self.lag.wait()
        return [held + self.only_first, held]  # two ranks


class App:
    """The API server: records each request it gets (path, body, headers) and answers 200;
    `doe_add_expert` / `doe_remove_expert` RPCs change the engine's names. While `hold` (an
    asyncio.Event) is not set, each request waits before it is answered."""

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
        if self.hold is not None:
            await self.hold.wait()
        engine = self.state.engine_client
        method = body.get("method") if isinstance(body, dict) else None
        if method == "doe_add_expert":
            engine.names = list(dict.fromkeys(engine.names + [body["args"][0]]))
        elif method == "doe_remove_expert":
            engine.names.remove(body["args"][0])
        await send(dict(type="http.response.start", status=200, headers=[]))
        await send(dict(type="http.response.body", body=b"{}"))


def call(gate, app, path, body=None, **options):
    """(status, JSON reply, response headers) of one request through the gate."""
    return asyncio.run(acall(gate, app, path, body, **options))


async def acall(gate, app, path, body=None, method="POST", chunks=1, root_path="",
                content_type=None, headers=()):
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

    scope = dict(type="http", method=method, path=root_path + path, root_path=root_path,
                 app=app, headers=[(b"content-length", str(len(raw)).encode())] + [
                     (b"content-type", value.encode()) for value in (
                         [content_type] if isinstance(content_type, str) else content_type or [])]
                 + [(key.encode(), value.encode()) for key, value in headers])
    await gate(scope, receive, send)
    reply = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(reply), dict(sent[0]["headers"])


def completion(name, **extra):
    return dict(model="m", prompt="hi", vllm_xargs={EXTRA_ARG: name, "other": 1}, **extra)


def rpc(method, *args, **kwargs):
    return dict(method=method, args=list(args), **({"kwargs": kwargs} if kwargs else {}))


def setup(names=("polarity",)):
    engine = Engine(names)
    app = App(engine)
    return engine, app, ExpertGate(app)


def test_a_request_naming_a_held_expert_reaches_the_engine_salted():
    engine, app, gate = setup()
    assert call(gate, app, "/v1/completions", completion("polarity"), chunks=3)[0] == 200
    path, body, headers = app.seen[-1]
    assert body["vllm_xargs"] == {EXTRA_ARG: "polarity", "other": 1}
    assert body["cache_salt"] == cache_salt("polarity")
    assert headers[b"content-length"] == str(len(json.dumps(body).encode())).encode()
    # the request's own salt stays, before the expert's; chat requests alike
    call(gate, app, "/v1/chat/completions", completion("polarity", cache_salt="user 7"))
    assert app.seen[-1][1]["cache_salt"] == cache_salt("polarity", "user 7")
    assert engine.reads == 1  # the names were read once
    # naming none, bodies vLLM must judge itself, other routes and RPCs pass as sent
    for path, body in (("/v1/completions", dict(model="m", prompt="hi")),
                       ("/v1/completions", completion(None)),
                       ("/v1/completions", b"not json"),
                       ("/tokenize", dict(model="m", prompt="what is doe_expert?")),
                       ("/collective_rpc", rpc("doe_status"))):
        assert call(gate, app, path, body)[0] == 200
        assert app.seen[-1][:2] == (path, body)
    # the gate's answers to RPCs say it is there (http.add checks)
    assert call(gate, app, "/collective_rpc", rpc("doe_status"))[2][GATE_HEADER] == b"1"
    assert GATE_HEADER not in call(gate, app, "/v1/completions", completion("polarity"))[2]


def test_unknown_or_malformed_names_never_reach_the_engine():
    engine, app, gate = setup()
    for body, message in (
            (completion("tweets"), "no expert is held under the name 'tweets'"),
            (completion(""), "must name an expert"), (completion(7), "must name an expert"),
            (completion("polarity", background=True), "cannot run in the background"),
            (completion("polarity", use_beam_search=1), "cannot use beam search"),
            (b"[" * 100_000, "nested too deeply")):
        status, reply, _ = call(gate, app, "/v1/responses", body)
        assert status == 400 and message in reply["error"]["message"]
        assert reply["error"]["code"] == 400 and "polarity" not in reply["error"]["message"]
    # routes that take extra arguments another way may not name one; --root-path is no way in
    for path, body, root in (
            ("/v1/messages", completion("polarity"), ""),
            ("/v1/chat/completions/batch", dict(requests=[completion("polarity")]), ""),
            ("/inference/v1/generate", dict(sampling_params=dict(extra_args={
                EXTRA_ARG: "polarity"})), ""),
            ("/v1/audio/transcriptions", b'--x\r\nname="vllm_xargs"\r\n{"doe_expert": "a"}', ""),
            ("/v1/completions", completion("tweets"), "/prefix")):
        status, reply, _ = call(gate, app, path, body, root_path=root)
        assert status == 400, path
    assert app.seen == [] and engine.reads == 1
    # under --root-path a held name is served, salted, as without it
    assert call(gate, app, "/v1/completions", completion("polarity"), root_path="/prefix")[0] \
        == 200
    assert app.seen[-1][0] == "/prefix/v1/completions"
    assert app.seen[-1][1]["cache_salt"] == cache_salt("polarity")


def test_a_name_counts_as_held_only_where_every_rank_holds_it():
    """A name only some ranks hold (an add that failed on one rank) is refused: the others would
    fail the engine step."""
    engine, app, gate = setup()
    engine.only_first = ["tweets"]
    status, reply, _ = call(gate, app, "/v1/completions", completion("tweets"))
    assert status == 400 and "no expert is held under the name 'tweets'" in \
        reply["error"]["message"]
    assert call(gate, app, "/v1/completions", completion("polarity"))[0] == 200


def test_adds_and_removes_refresh_the_names_and_the_salts():
    engine, app, gate = setup(names=())
    assert call(gate, app, "/v1/completions", completion("a"))[0] == 400
    assert call(gate, app, "/collective_rpc", rpc("doe_add_expert", "a", "token"))[0] == 200
    assert call(gate, app, "/v1/completions", completion("a"))[0] == 200
    first = app.seen[-1][1]["cache_salt"]
    call(gate, app, "/collective_rpc", rpc("doe_add_expert", "a", "token"))
    call(gate, app, "/v1/completions", completion("a"))
    assert app.seen[-1][1]["cache_salt"] not in (first, None)  # the new "a" meets no old block
    call(gate, app, "/collective_rpc", rpc("doe_remove_expert", "a"))
    assert call(gate, app, "/v1/completions", completion("a"))[0] == 400
    # adds and removes name the expert first in args, nowhere else
    seen = len(app.seen)
    for body in (rpc("doe_remove_expert", name="a"), rpc("doe_add_expert", 3, "token"),
                 rpc("doe_remove_expert")):
        assert call(gate, app, "/collective_rpc", body)[0] == 400
    assert len(app.seen) == seen


@pytest.mark.parametrize("change", [rpc("doe_remove_expert", "polarity"),
                                    rpc("doe_add_expert", "polarity", "token")])
def test_an_expert_serving_requests_cannot_be_removed_or_replaced(change):
    engine, app, gate = setup()

    async def scenario():  # one event loop, as in the API server
        app.hold = asyncio.Event()
        running = asyncio.create_task(acall(gate, app, "/v1/completions", completion("polarity")))
        while not gate.running:
            await asyncio.sleep(0)
        refused = await asyncio.wait_for(acall(gate, app, "/collective_rpc", change), 10)
        app.hold.set()
        return refused, await running

    refused, served = asyncio.run(scenario())
    assert refused[0] == 409 and "serves 1 running requests" in refused[1]["error"]["message"]
    assert served[0] == 200 and engine.names == ["polarity"] and not gate.running
    assert len(app.seen) == 1  # the change never reached the engine


def test_no_request_slips_in_while_an_expert_is_removed():
    """A request arriving while the removal runs, or whose read of the names began before it,
    is refused; so is a request arriving while its expert is replaced."""
    engine, app, gate = setup()
    remove = rpc("doe_remove_expert", "polarity")

    async def during(change):
        """(the reply to a request sent while `change` runs, the reply to `change`)"""
        app.hold = asyncio.Event()
        changing = asyncio.create_task(acall(gate, app, "/collective_rpc", change))
        while not gate.changing:
            await asyncio.sleep(0)
        # (a request let through would wait for the release below: a bug times out)
        refused = await asyncio.wait_for(
            acall(gate, app, "/v1/completions", completion("polarity")), 10)
        app.hold.set()
        return refused, await changing

    refused, removed = asyncio.run(during(remove))
    assert refused[0] == 400 and removed[0] == 200 and engine.names == []
    assert "'polarity' is being added or removed" in refused[1]["error"]["message"]
    app.hold = None
    call(gate, app, "/collective_rpc", rpc("doe_add_expert", "polarity", "token"))

    async def stale_read():
        engine.lag = asyncio.Event()  # the workers answer the names they held before
        request = asyncio.create_task(acall(gate, app, "/v1/completions",
                                            completion("polarity")))
        while not engine.reads:
            await asyncio.sleep(0)
        removed = await acall(gate, app, "/collective_rpc", remove)
        engine.lag.set()
        return await request, removed

    engine.reads = 0
    request, removed = asyncio.run(stale_read())
    assert removed[0] == 200 and request[0] == 400 and engine.reads == 2  # read again
    engine.lag = None
    call(gate, app, "/collective_rpc", rpc("doe_add_expert", "polarity", "token"))
    call(gate, app, "/v1/completions", completion("polarity"))
    salt = app.seen[-1][1]["cache_salt"]

    refused, replaced = asyncio.run(during(rpc("doe_add_expert", "polarity", "token")))
    assert refused[0] == 400 and replaced[0] == 200
    app.hold = None
    call(gate, app, "/v1/completions", completion("polarity"))
    assert app.seen[-1][1]["cache_salt"] != salt  # the replacement's own KV blocks


def test_without_the_worker_extension_the_gate_says_so():
    app = App(None)

    class Broken:
        async def collective_rpc(self, method):
            raise RuntimeError("no such method")

    app.state.engine_client = Broken()
    status, reply, _ = call(ExpertGate(app), app, "/v1/completions", completion("a"))
    assert status == 500 and "--worker-extension-cls" in reply["error"]["message"]
    assert "no such method" in reply["error"]["message"]  # what went wrong
    assert app.seen == []


def test_requests_arriving_together_share_one_read_of_the_names():
    engine, app, gate = setup()

    async def together():
        engine.lag = asyncio.Event()
        requests = [asyncio.create_task(acall(gate, app, "/v1/completions",
                                              completion("polarity"))) for _ in range(5)]
        while not engine.reads:
            await asyncio.sleep(0)
        for _ in range(20):  # every request reaches the read
            await asyncio.sleep(0)
        engine.lag.set()
        return await asyncio.gather(*requests)

    assert [reply[0] for reply in asyncio.run(together())] == [200] * 5
    assert engine.reads == 1 and len(app.seen) == 5


@pytest.mark.parametrize("own", ["", 7, {"a": 1}, "x" * 129, "a/b", "a@b"])
def test_an_own_salt_vllm_refuses_is_refused_before_it_is_hashed(own):
    """The gate hashes a named request's own cache_salt into its expert's salt, which vLLM
    accepts: an own salt vLLM would have refused is answered 400 as vLLM words it."""
    pytest.importorskip("vllm")
    engine, app, gate = setup()
    status, reply, _ = call(gate, app, "/v1/completions", completion("polarity", cache_salt=own))
    assert status == 400 and "'cache_salt' must" in reply["error"]["message"]
    assert app.seen == []


@pytest.mark.parametrize("count, engine_count", [(None, None), (1, None), (2, None),
                                                 (2, 1), (None, 2), (1, 2)])
def test_the_gate_refuses_to_start_with_several_api_server_processes(count, engine_count):
    """vLLM's `serve` sets api_server_count to None when it serves from one process, and above 1
    in each of several; its engine client counts the API servers sharing it (its module entry
    point serves from one process whatever the flag says). Several: the lifespan's start-up
    fails with the reason, and the app's never runs."""
    started, sent = [], []

    async def app(scope, receive, send):
        started.append((await receive())["type"])
        await send(dict(type="lifespan.startup.complete"))

    async def receive():
        return dict(type="lifespan.startup")

    async def send(message):
        sent.append(message)

    state = SimpleNamespace(args=SimpleNamespace(api_server_count=count))
    if engine_count is not None:
        state.engine_client = SimpleNamespace(_client_count=engine_count)
    scope = dict(type="lifespan", app=SimpleNamespace(state=state))
    asyncio.run(ExpertGate(app)(scope, receive, send))
    if (engine_count or count) == 2:
        assert started == [] and sent[0]["type"] == "lifespan.startup.failed"
        assert "starts 2 (--api-server-count" in sent[0]["message"]
        assert "--api-server-count 1" in sent[0]["message"]
    else:
        assert started == ["lifespan.startup"] and sent == [dict(type="lifespan.startup.complete")]


@pytest.mark.parametrize("name", [None, "a"])
def test_naming_builds_the_body_fields(name):
    from doe_kernels.vllm import http

    assert http.naming(name) == {"vllm_xargs": {EXTRA_ARG: name}}


def test_the_client_asks_for_the_gate_before_adding():
    """http.add on a server without the gate (here one that answers every RPC without the
    gate's header) says how to start it, and sends no expert."""
    import doe_kernels
    from doe_kernels.vllm import http as client
    from http_utils import answering

    with answering(json.dumps(dict(results=[[], []])).encode()) as (url, posts):
        with pytest.raises(RuntimeError, match="--middleware doe_kernels.vllm.gate.ExpertGate"):
            client.add(url, "a", doe_kernels.ExpertMask({0: [1, 2]}))
        with pytest.raises(ValueError, match="non-empty string"):
            client.add(url, "", doe_kernels.ExpertMask({0: [1, 2]}))
        assert [p["method"] for p in posts] == ["doe_experts"]


@pytest.mark.parametrize("replies, message", [
    (["True", "False"], r"held by ranks \[0\] only, and is removed from them \(not held by "
                        r"ranks \[1\]\)"),
    (["False", "False"], r"no expert named 'a' is held\W*$"),
    ([], r"no expert named 'a' is held\W*$")])
def test_the_client_says_which_ranks_held_a_removed_name(replies, message):
    """http.remove: KeyError naming the ranks that did not hold the name, where some did; where
    none did (or none answered), the plain KeyError, not the error of asking which names are
    held (here a server without the gate)."""
    from doe_kernels.vllm import http as client
    from http_utils import answering

    with answering(json.dumps(dict(results=replies)).encode()) as (url, _), \
            pytest.raises(KeyError, match=message):
        client.remove(url, "a")


@pytest.mark.parametrize("restored, resets", [(["0", "0"], 0), (["0", "12"], 1)])
def test_the_client_resets_the_prefix_cache_after_an_unplug_that_restored_layers(restored,
                                                                                resets):
    """http.unplug resets the prefix cache where a rank restored layers, not after a no-op (a
    reset refused while requests run would then report a swap that never happened)."""
    from doe_kernels.vllm import http as client
    from http_utils import answering

    with answering(json.dumps(dict(results=restored, success=True)).encode()) as (url, posts):
        client.unplug(url)
    assert [p.get("method") for p in posts] == ["doe_unplug"] + [None] * resets


def test_the_client_waits_past_the_servers_timeout():
    """The client's socket waits ANSWER_MARGIN past the RPC timeout it gives the server: a
    client that gave up first could not tell whether the swap went on."""
    from unittest import mock

    from doe_kernels.vllm import http as client

    with mock.patch.object(client, "_request", return_value=dict(results=[[]])) as request:
        client.status("http://x", timeout=7)
    (_, _, body, socket_timeout), _ = request.call_args
    assert body["timeout"] == 7 and socket_timeout == 7 + client.ANSWER_MARGIN > 7


def test_a_failed_apply_on_several_ranks_warns_they_may_be_out_of_step():
    """An apply raising on a many-rank engine: the ranks it reached may hold the new expert, and
    the caller is warned (one rank: its apply changes nothing, no warning)."""
    import doe_kernels
    from doe_kernels.vllm.protocol import plug_on_ranks

    for ranks in (1, 2):
        def call(method, args):
            if method == "doe_apply_mask":
                raise RuntimeError("out of memory on rank 1")
            return [None] * ranks

        with warnings.catch_warnings(record=True) as caught, \
                pytest.raises(RuntimeError, match="out of memory"):
            warnings.simplefilter("always")
            plug_on_ranks(call, doe_kernels.ExpertMask({0: [1]}))
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(said) == (ranks > 1)
        assert all("2 ranks may now hold different experts" in m for m in said)


@pytest.mark.parametrize("discard_fails", [False, True])
@pytest.mark.parametrize("failing", ["doe_check_mask", "doe_apply_mask"])
def test_a_check_or_apply_that_raises_drops_every_staged_plan(failing, discard_fails):
    """A rank whose check or apply raises (not a refusal: an RPC timeout, a rank gone) leaves
    no plan of this swap staged on any rank (the discard names its token: other callers' swaps
    stay staged); the call's error is the one reported, even when dropping the plans fails
    too."""
    import doe_kernels
    from doe_kernels.vllm.protocol import plug_on_ranks

    calls = []

    def call(method, args):
        calls.append((method, args[2] if method == "doe_check_mask" else args[-1]))
        if method == failing:
            raise ValueError("rank 1 died")
        if method == "doe_discard_mask" and discard_fails:
            raise RuntimeError("no ranks to reach")
        return [None, None]

    with pytest.raises(ValueError, match="rank 1 died"):
        plug_on_ranks(call, doe_kernels.ExpertMask({0: [1]}))
    token = calls[0][1]
    expected = ["doe_check_mask"] + (["doe_apply_mask"] if failing == "doe_apply_mask" else [])
    assert calls == [(method, token) for method in expected + ["doe_discard_mask"]]


def test_salts_cannot_be_forged_or_confused():
    """Experts' salts are hashes of (name, own salt, generation) with a prefix no request's own
    salt may take: a request (named or not, on any route) cannot fill an expert's prefix cache
    from the model it runs on, and names or own salts holding separators, '/' or '@', or long
    own salts, give distinct salts vLLM accepts (at most 128 characters, none of @ / \\)."""
    engine, app, gate = setup()
    call(gate, app, "/v1/completions", completion("polarity"))
    expert_salt = app.seen[-1][1]["cache_salt"]
    seen = len(app.seen)
    for path, body in (("/v1/completions", dict(model="m", prompt="hi", cache_salt=expert_salt)),
                       ("/v1/completions", completion("polarity", cache_salt=SALT_PREFIX)),
                       ("/v1/messages", dict(model="m", messages=[], cache_salt=expert_salt))):
        status, reply, _ = call(gate, app, path, body)
        assert status == 400 and "reserved" in reply["error"]["message"], path
    assert len(app.seen) == seen
    salts = {cache_salt(name, own, generation)
             for name, own in (("q | doe_kernels expert r", None), ("r", "doe_kernels expert q"),
                               ("r", "q"), ("q", "r"), ("news/v2", None), ("a@b", "x" * 200),
                               ("a", None), ("a", ""))
             for generation in (0, 1)}
    assert len(salts) == 16
    assert all(len(salt) <= 128 and not set("@/\\\0") & set(salt) for salt in salts)



def _multipart(name, value: bytes) -> bytes:
    return (b'--b\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
            + value + b"\r\n--b--\r\n")


def test_forms_are_read_as_the_app_reads_them():
    """A form (an audio request) hides no reserved salt or expert name in percent-encoding, a
    field's name, JSON escapes in a value (vLLM decodes vllm_xargs as JSON) or a charset under
    the first of two content types (the one the app's parser reads): the gate reads its fields
    with the app's own parser; other forms pass."""
    pytest.importorskip("starlette")
    engine, app, gate = setup()
    urlencoded, multipart = "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"
    for body, content_type, message in (
            (b"model=m&cache_salt=doe%5Fkernels-" + b"0" * 40, urlencoded, "reserved"),
            (b"model=m&cache%5Fsalt=" + SALT_PREFIX.encode(), urlencoded, "reserved"),
            (b"model=m&vllm%5Fxargs=%7B%22doe%5Fexpert%22%3A%22polarity%22%7D", urlencoded,
             "cannot serve an expert"),
            (_multipart("vllm_xargs", b'{"doe_expert": "polarity"}'), multipart,
             "cannot serve an expert"),
            (_multipart("vllm_xargs", b'{"doe\\u005fexpert": "polarity"}'), multipart,
             "cannot serve an expert"),
            (_multipart("vllm_xargs", b'{"cache\\u005fsalt": "doe\\u005fkernels-0"}'), multipart,
             "reserved"),
            (_multipart("vllm_xargs", b'{"doe+AF8-expert": "polarity"}'),
             [multipart + "; charset=utf-7", "text/plain"], "cannot serve an expert")):
        status, reply, _ = call(gate, app, "/v1/audio/transcriptions", body,
                                content_type=content_type)
        assert status == 400 and message in reply["error"]["message"], body
    assert app.seen == []
    for body, content_type in (
            (b"model=m&language=en&cache_salt=mine", urlencoded),
            (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
             b"RIFF\x00\xff\r\n--b--\r\n", "multipart/form-data; boundary=b"),
            (b"not a form", "multipart/form-data; boundary=b")):  # the app refuses it
        assert call(gate, app, "/v1/audio/transcriptions", body, content_type=content_type)[0] \
            == 200
        assert app.seen[-1][1] == body


def test_a_form_mentioning_the_words_in_its_text_passes():
    """A form the parser read is judged by its fields only: a prompt that mentions the words,
    or one that is deeply nested JSON-like text, reaches the app."""
    pytest.importorskip("starlette")
    engine, app, gate = setup()
    for text in (b"Set vllm_xargs.doe_expert to pick an expert, cache_salt to doe_kernels-1",
                 b"[" * 100_000):
        body = _multipart("prompt", text)
        status, _, _ = call(gate, app, "/v1/audio/transcriptions", body,
                            content_type="multipart/form-data; boundary=b")
        assert status == 200 and app.seen[-1][1] == body


def test_routes_are_read_as_starlette_reads_them():
    from doe_kernels.vllm.gate import _route

    for path, root, route in (("/v1/completions", "/", "/v1/completions"),
                              ("/v1/completions", "/v", "/v1/completions"),
                              ("/v/v1/completions", "/v", "/v1/completions"),
                              ("/v", "/v", ""), ("/v1/completions", "", "/v1/completions")):
        assert _route(dict(path=path, root_path=root)) == route, (path, root)


def test_requests_without_the_api_key_pass_unread():
    """With vLLM's --api-key, a request its own check will answer 401 passes the gate unread
    (the gate tells such a client nothing, e.g. which names are held); with the key, the gate
    reads it as usual."""
    pytest.importorskip("vllm")
    engine, app, gate = setup()
    app.state.args = SimpleNamespace(api_key=["secret"])
    for body in (completion("tweets"), completion("polarity", cache_salt=SALT_PREFIX)):
        assert call(gate, app, "/v1/completions", body)[0] == 200  # (the app's check: 401)
        assert app.seen[-1][1] == body
        assert call(gate, app, "/v1/completions", body,
                    headers=[("authorization", "Bearer wrong")])[0] == 200
    assert engine.reads == 0
    status, reply, _ = call(gate, app, "/v1/completions", completion("tweets"),
                            headers=[("authorization", "Bearer secret")])
    assert status == 400 and "no expert is held" in reply["error"]["message"]
