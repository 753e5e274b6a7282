"""vLLM's OpenAI-compatible server with an expert plugged and swapped over HTTP
(doe_kernels.vllm.http, the `doe-kernels vllm-*` commands), and the HTTP client without vLLM.

The server test starts SmolLM2-135M on a free localhost port (about a minute), plugs an expert with
heads and neurons pruned, asks one completion, and checks it against doe_kernels.patch on the
HuggingFace model; then a refused mask, the status command, and unplug. A server started with
two API server processes fails at start-up, saying why. A random Mixtral's server plugs and holds
MoE experts (neurons inside the experts, skipping, dropped experts). Marked `vllm`.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import doe_kernels
from real_models import smollm2_dir

NEW_TOKENS = 8


def test_the_http_client_and_its_command_need_no_vllm():
    """`doe_kernels.vllm.http` imports without vLLM; the engine API says what it needs."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import doe_kernels.vllm as dkv, doe_kernels.vllm.http as http\n"
        "try:\n    dkv.plug\nexcept ImportError as e:\n    print('refused:', e)\n"
        "from doe_kernels.cli import main\n"
        "sys.exit(main(['vllm-status', '--url', 'http://127.0.0.1:9']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert "refused: doe_kernels.vllm needs vLLM" in result.stdout, result.stderr[-2000:]
    assert result.returncode == 2
    assert "doe-kernels vllm-status: error: cannot reach http://127.0.0.1:9" in result.stderr


def test_the_http_client_checks_a_name_before_any_request():
    """remove, as add, refuses a name that is no non-empty string before asking the server (it
    failed inside the worker); the port here answers nothing."""
    from doe_kernels.vllm import http

    for call in (lambda name: http.remove("http://127.0.0.1:9", name),
                 lambda name: http.add("http://127.0.0.1:9", name, None)):
        for name in (["a"], "", None):
            with pytest.raises(ValueError, match="an expert's name must be a non-empty string"):
                call(name)


@pytest.mark.parametrize("body, message", [(b"[1]", r"answered '\[1\]', not a JSON object"),
                                           (b"<html>", "answered what is not JSON")])
def test_the_http_client_refuses_answers_that_are_not_json_objects(body, message):
    """A server (or a proxy before it) answering a JSON list or an HTML page: a clear error."""
    import doe_kernels.vllm.http as client
    from http_utils import answering

    with answering(body) as (url, _), pytest.raises(RuntimeError, match=message):
        client.status(url, timeout=30)


@contextlib.contextmanager
def _answering_raw(answer: bytes):
    """Yields the URL of a localhost server that answers every connection with the bytes
    `answer` and closes it (a server that is not HTTP, or an HTTP answer cut short)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed
                return
            with connection:
                connection.recv(65536)
                connection.sendall(answer)
                # the answer ends with a FIN, not a reset: close after the client has (a
                # close at once is seen as a reset by the client on some Linux kernels)
                connection.shutdown(socket.SHUT_WR)
                connection.settimeout(30)
                with contextlib.suppress(OSError):
                    while connection.recv(65536):
                        pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.parametrize("answer, kind", [
    (b"SSH-2.0-OpenSSH_8.9\r\n", "BadStatusLine"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "IncompleteRead")])
def test_a_server_that_does_not_speak_http_is_a_one_line_error(answer, kind, capsys):
    """A port that answers what is not HTTP (http.client's BadStatusLine), or an answer cut
    short (IncompleteRead), ended `doe-kernels vllm-*` in a traceback: the client raises
    RuntimeError and the command says it in one line, exit 2."""
    import doe_kernels.vllm.http as client
    from doe_kernels import cli

    with _answering_raw(answer) as url:
        with pytest.raises(RuntimeError, match=f"cannot reach {url}: no well-formed HTTP "
                           f"answer \\({kind}"):
            client.status(url, timeout=30)
        for command in (["vllm-status"], ["vllm-unplug"]):
            assert cli.main([*command, "--url", url]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"doe-kernels {command[0]}: error: cannot reach {url}")
            assert len(err.strip().splitlines()) == 1


def _gate_refusing_adds(post: dict) -> tuple:
    """A stand-in server's answer to `post`: the gate of two ranks that accept every mask, which
    answers an add 409 (an expert serving running requests)."""
    from doe_kernels.vllm.gate import GATE_HEADER

    headers = {GATE_HEADER.decode(): "1"}
    if post["method"] == "doe_add_expert":
        return 409, dict(error=dict(message=(
            "the expert 'a' serves 1 running requests; remove or replace it once they have "
            "finished (nothing was changed)"))), headers
    return 200, dict(results=[[], []] if post["method"] == "doe_experts" else [None, None]), headers


def test_an_add_the_gate_refuses_warns_of_nothing():
    """The gate refusing an add (409: requests naming the expert run) changed nothing, yet the
    client warned that the ranks may now hold different experts: it raises the refusal
    (http.Refused, a RuntimeError) alone, the staged plans dropped."""
    import warnings

    import doe_kernels.vllm.http as client

    from http_utils import answering

    with answering(_gate_refusing_adds) as (url, posts), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="answered 409 the expert 'a' serves 1 running "
                                               "requests") as refusal:
            client.add(url, "a", doe_kernels.ExpertMask({0: [1]}))
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert isinstance(refusal.value, client.Refused)
    assert [post["method"] for post in posts] == ["doe_experts", "doe_check_mask",
                                                  "doe_add_expert", "doe_discard_mask"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server, log_path, limit: float = 600) -> None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if server.poll() is not None:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            raise RuntimeError(f"vllm serve exited with code {server.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve did not answer {url}/health within {limit} s")


def _stop(server) -> None:
    """Terminate a server process (vLLM then stops its engine and API processes), killing it
    if it has not exited within a minute."""
    if server.poll() is None:
        server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def _complete(url: str, model: str, prompt: list, **fields) -> tuple:
    """A greedy completion's (token ids, their log-probabilities)."""
    body = dict(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                ignore_eos=True, logprobs=0, return_tokens_as_token_ids=True, **fields)
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        logprobs = json.loads(response.read())["choices"][0]["logprobs"]
    return ([int(token.removeprefix("token_id:")) for token in logprobs["tokens"]],
            logprobs["token_logprobs"])


def _hf_greedy(model, prompt: list) -> tuple:
    """The HuggingFace model's (patched or not) greedy (token ids, their log-probabilities)."""
    from test_vllm import _hf_generate

    tokens, logprobs = _hf_generate(model, [prompt], NEW_TOKENS)
    return tokens[0], logprobs[0]


def _assert_completion(got: tuple, expected: tuple) -> None:
    """The same tokens, log-probabilities within test_vllm's tolerance."""
    from test_vllm import assert_same_generation

    assert_same_generation(([got[0]], [got[1]]), ([expected[0]], [expected[1]]))


def _distinct(expected: dict) -> int:
    """How many different token sequences the expected completions hold."""
    return len({tuple(tokens) for tokens, _ in expected.values()})


# vLLM's `serve` command, which starts each API server in its own process. vllm-cpu's `vllm`
# command looks up a package named vllm, which vllm-cpu is not (docs/vllm.md): under vllm-cpu the
# version is read from it, and the device is named before vLLM is imported.
SERVE_COMMAND = """
import importlib.metadata as metadata, os, sys
try:
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    real = metadata.version
    metadata.version = lambda name: real("vllm-cpu" if name == "vllm" else name)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", "serve"] + sys.argv[1:]
main()
"""


@pytest.mark.vllm
def test_vllm_serve_with_several_api_servers_fails_at_start_up_naming_the_gate(tmp_path):
    """Each API server process would hold its own count of running requests, so the gate fails
    the server's start-up and says why (ExpertGate, docs/vllm.md)."""
    pytest.importorskip("vllm")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    command = [sys.executable, "-c", SERVE_COMMAND, smollm2_dir(), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "512", "--api-server-count", "2",
               "--middleware", "doe_kernels.vllm.gate.ExpertGate"]
    log_path = tmp_path / "vllm_serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:  # a server that comes up healthy fails the test at once
            with pytest.raises(RuntimeError, match="vllm serve exited with code [1-9]"):
                _wait_healthy(f"http://127.0.0.1:{port}", server, log_path)
        finally:
            _stop(server)
    output = log_path.read_text()
    assert ("ExpertGate serves one API server process, and this server starts 2" in output
            and "start it with --api-server-count 1" in output), output[-3000:]


@contextlib.contextmanager
def _serving(path: str, log_dir):
    """`vllm serve` on `path` with the worker extension and the gate, on a free localhost port;
    yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    log_path = log_dir / "vllm_serve.log"
    # `vllm serve` itself, by its module: vllm-cpu's `vllm` command looks up a package named
    # vllm, which vllm-cpu is not, and fails (docs/vllm.md)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
               "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0",
               "--worker-extension-cls", "doe_kernels.vllm.WorkerExtension",
               "--middleware", "doe_kernels.vllm.gate.ExpertGate"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, server, log_path)
            yield url
        finally:
            _stop(server)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    path = smollm2_dir()
    with _serving(path, tmp_path_factory.mktemp("serve")) as url:
        yield dict(url=url, model=path)


@pytest.mark.vllm
def test_vllm_serve_plugs_swaps_and_unplugs(server, capsys):
    from transformers import LlamaForCausalLM

    from doe_kernels.cli import main
    from doe_kernels.vllm import http

    url, path = server["url"], server["model"]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(100, 40000, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    mask = doe_kernels.ExpertMask.random(hf, ffn_keep=0.5, heads_keep=0.67, seed=3)
    with doe_kernels.plugged(hf, mask):
        expected_expert = _hf_greedy(hf, prompt)
    expected_dense = _hf_greedy(hf, prompt)
    assert expected_expert[0] != expected_dense[0]  # the check below can tell them apart

    http.plug(url, mask)
    _assert_completion(_complete(url, path, prompt), expected_expert)
    with pytest.raises(ValueError, match="out of range"):
        http.plug(url, doe_kernels.ExpertMask({0: [0, 10**6]}))
    _assert_completion(_complete(url, path, prompt), expected_expert)  # still the expert

    assert main(["vllm-status", "--url", url]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status[0]["kept_heads"] == [mask.heads[l].numel() for l in range(30)]

    assert main(["vllm-unplug", "--url", url]) == 0
    capsys.readouterr()
    _assert_completion(_complete(url, path, prompt), expected_dense)


@pytest.mark.vllm
def test_vllm_serve_mixed_requests_each_on_its_expert(server, tmp_path, capsys):
    """Two held experts and the dense model answer concurrent requests, each as the patched
    HuggingFace model with its expert alone; the gate refuses unknown names without harm."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import LlamaForCausalLM

    from doe_kernels.cli import main
    from doe_kernels.vllm import http

    url, path = server["url"], server["model"]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(100, 40000, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    masks = {"a": doe_kernels.ExpertMask.random(hf, ffn_keep=0.4, heads_keep=0.67, seed=5),
             "b": doe_kernels.ExpertMask.random(hf, ffn_keep=0.6, seed=6), None: None}
    expected = {}
    for name, mask in masks.items():
        with doe_kernels.plugged(hf, mask) if mask is not None else contextlib.nullcontext():
            expected[name] = _hf_greedy(hf, prompt)
    assert _distinct(expected) == 3  # the checks below can tell them apart

    http.add(url, "a", masks["a"])
    masks["b"].save(tmp_path / "b.safetensors")
    assert main(["vllm-add", "--url", url, "--name", "b", str(tmp_path / "b.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out) == dict(experts=["a", "b"])
    assert http.experts(url) == ["a", "b"]
    names = ["a", "b", None, "b", "a", None]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(
            lambda name: _complete(url, path, prompt, **({} if name is None
                                                          else http.naming(name))), names))
    for name, answer in zip(names, answers):
        _assert_completion(answer, expected[name])
    with pytest.raises(urllib.error.HTTPError) as refused:
        _complete(url, path, prompt, **http.naming("tweets"))
    assert refused.value.code == 400
    assert "no expert is held under the name 'tweets'" in refused.value.read().decode()
    _assert_completion(_complete(url, path, prompt, **http.naming("a")), expected["a"])
    http.remove(url, "a")
    with pytest.raises(KeyError, match="no expert named 'a'"):
        http.remove(url, "a")
    assert main(["vllm-remove", "--url", url, "--name", "a"]) == 2
    assert "no expert named 'a' is held" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out of range"):
        http.add(url, "b", doe_kernels.ExpertMask({0: [0, 10**6]}))
    _assert_completion(_complete(url, path, prompt, **http.naming("b")), expected["b"])
    http.remove(url, "b")
    assert http.experts(url) == []
    _assert_completion(_complete(url, path, prompt), expected[None])


@pytest.mark.vllm
def test_vllm_serve_plugs_and_mixes_mixtral_experts(tmp_path, capsys):
    """A random Mixtral (SmolLM2's tokenizer) served over HTTP: an expert pruning neurons inside
    the MoE experts, skipping small second experts and pruning heads plugged from a file, one
    dropping whole experts held by name; concurrent requests on each equal the patched
    HuggingFace model (dynamic skipping) with that expert alone; unplugged, the dense model."""
    pytest.importorskip("vllm")
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from doe_kernels.cli import main
    from doe_kernels.vllm import http
    from test_vllm_moe import _masks, _tiny_mixtral

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    path = _tiny_mixtral(tmp_path / "mixtral", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    first, _, third = _masks(doe_kernels.models.spec_of(hf))
    prompt = torch.randint(100, 40000, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = {None: _hf_greedy(hf, prompt)}
    for name, mask in (("first", first), ("third", third)):
        with doe_kernels.plugged(hf, mask, dynamic_skip=bool(mask.skip)):
            expected[name] = _hf_greedy(hf, prompt)
    assert _distinct(expected) == 3  # the checks below can tell them apart

    with _serving(path, tmp_path) as url:
        third.save(tmp_path / "third.safetensors")
        assert main(["vllm-plug", "--url", url, str(tmp_path / "third.safetensors")]) == 0
        http.add(url, "first", first)
        capsys.readouterr()
        names = ["first", None, "first", None]  # None: the plugged expert, "third"
        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(
                lambda name: _complete(url, path, prompt, **({} if name is None
                                                              else http.naming(name))), names))
        for name, answer in zip(names, answers):
            _assert_completion(answer, expected[name or "third"])
        assert http.status(url)[0]["kept_experts"] == [3, 4]
        http.remove(url, "first")
        http.unplug(url)
        _assert_completion(_complete(url, path, prompt), expected[None])
