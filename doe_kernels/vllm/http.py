"""Plug and swap experts on a running `vllm serve` over HTTP: `plug(url, mask)`, `unplug(url)`,
`status(url)`; hold several for mixed-task requests: `add(url, name, mask)`, `remove(url, name)`,
`experts(url)`, and name one in a request's body with `naming(name)` (the server then also runs
`--middleware doe_kernels.vllm.gate.ExpertGate`).

The server must run with the doe_kernels worker extension and with vLLM's development
endpoints, which carry the calls to every rank (`POST /collective_rpc`) and reset the prefix cache
(`POST /reset_prefix_cache`):

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \
        --worker-extension-cls doe_kernels.vllm.WorkerExtension

The protocol is the offline one's (doe_kernels.vllm.protocol): every rank checks the mask and
stages its plan, and only if every rank accepts does any apply it. The development endpoints let anyone
who reaches the port call worker methods: bind the server to localhost or a private network.
Needs only the standard library and doe_kernels (not vLLM), so a client machine can swap experts.
"""
import http.client
import json
import urllib.error
import urllib.request

from doe_kernels.vllm.gate import GATE_HEADER
from doe_kernels.vllm.protocol import (EXTRA_ARG, Refused, as_mask, check_name,
                                       held_on_every_rank, plug_on_ranks, removed_on_every_rank,
                                       statuses)


REFUSALS = (400, 409)  # statuses of requests refused before anything was done
ANSWER_MARGIN = 30.0  # seconds the client waits past the `timeout` it gives the server's RPC:
# a client that gave up first could not tell whether the server went on to swap


def plug(url: str, mask, timeout: float = 120.0) -> None:
    """Serve `mask` (an ExpertMask or Expert) from the server at `url` (e.g.
    "http://localhost:8000"); swaps when one is plugged. Raises ValueError (mask) or
    UnsupportedModelError (model) before any rank changes, RuntimeError when the server cannot
    take it (no development endpoints, no worker extension, CUDA graphs)."""
    plug_on_ranks(lambda method, args: _rpc(url, method, args, timeout), as_mask(mask))
    _reset_prefix_cache(url, timeout)


def unplug(url: str, timeout: float = 120.0) -> None:
    """Give the server its dense model back (a no-op if nothing is plugged)."""
    if any(restored not in (0, "0") for restored in _rpc(url, "doe_unplug", [], timeout)):
        _reset_prefix_cache(url, timeout, "the expert was unplugged")


def add(url: str, name: str, mask, timeout: float = 120.0) -> None:
    """Hold an expert under `name` on the server at `url`, beside the plugged one, for the
    requests that name it in their body (`"vllm_xargs": {"doe_expert": name}`, `naming(name)`):
    requests of several experts then share engine steps. Adding a name again replaces its
    expert (Refused, a RuntimeError, nothing changed, while requests naming it run). Needs the
    server's gate (`--middleware doe_kernels.vllm.gate.ExpertGate`), which refuses requests
    naming experts the server does not hold and salts each expert's prefix cache; RuntimeError
    without it. Checked on every rank before any changes, as `plug` is."""
    check_name(name)
    mask = as_mask(mask)
    experts(url, timeout)  # the gate is there
    plug_on_ranks(lambda method, args: _rpc(url, method, args, timeout), mask,
                  "doe_add_expert", name)


def remove(url: str, name: str, timeout: float = 120.0) -> None:
    """Stop holding the expert `name`: KeyError if the server holds none of that name,
    RuntimeError (nothing changed) while requests naming it run."""
    check_name(name)
    # vLLM's endpoint passes a rank's reply as a string unless it is a dict or a list
    removed = [reply in (True, "True") for reply in _rpc(url, "doe_remove_expert", [name],
                                                         timeout)]
    if removed_on_every_rank(name, removed):
        return
    try:
        held = f" (held: {experts(url, timeout)})"
    except RuntimeError:  # (no gate, or no answer: the name is what matters)
        held = ""
    raise KeyError(f"no expert named {name!r} is held{held}")


def experts(url: str, timeout: float = 120.0) -> list:
    """The names of the experts the server holds, in the order they were added; RuntimeError
    when the server has no gate (the --middleware that mixed-task requests need)."""
    reply, headers = _request(url, "/collective_rpc", dict(method="doe_experts", args=[],
                                                           timeout=timeout),
                              timeout + ANSWER_MARGIN, with_headers=True)
    if headers.get(GATE_HEADER.decode()) is None:
        raise RuntimeError(f"{url} has no expert gate: start vllm serve with --middleware "
                           "doe_kernels.vllm.gate.ExpertGate")
    results = (reply or {}).get("results")
    if not isinstance(results, list) or not results:
        raise RuntimeError(f"{url}: unexpected answer to doe_experts: {reply!r}")
    return held_on_every_rank(results)


def naming(name: str) -> dict:
    """The body fields of a completion or chat request on the expert `name` (with the OpenAI
    client: `extra_body=naming(name)`)."""
    return {"vllm_xargs": {EXTRA_ARG: name}}


def status(url: str, timeout: float = 120.0) -> list:
    """Per rank: its place and its local kept neuron and head counts per layer (None: dense)."""
    return statuses(_rpc(url, "doe_status", [], timeout))


def _request(url: str, path: str, body: dict | None, timeout: float,
             with_headers: bool = False):
    """The server's JSON answer to POST `path` (with its headers, lower-cased, when
    `with_headers`); RuntimeError saying what is wrong when there is none, Refused (a
    RuntimeError) for a 400 or 409: a request refused before anything was done (the gate's
    refusals of an add or remove, vLLM's of a malformed call)."""
    request = urllib.request.Request(
        url.rstrip("/") + path, method="POST", data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            headers = {key.lower(): value for key, value in response.headers.items()}
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise RuntimeError(f"{url} has no {path} endpoint: start vllm serve with "
                               "VLLM_SERVER_DEV_MODE=1") from error
        try:
            detail = error.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):  # (the error's body cut short)
            detail = ""
        try:  # the gate's (and vLLM's) errors: {"error": {"message": ...}}
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = ("(is the server started with --worker-extension-cls "
                      f"doe_kernels.vllm.WorkerExtension?): {detail[:500]}")
        refused = Refused if error.code in REFUSALS else RuntimeError
        raise refused(f"{url}{path} answered {error.code} {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"cannot reach {url}: {error}") from error
    except http.client.HTTPException as error:  # not HTTP (BadStatusLine), or cut short
        raise RuntimeError(f"cannot reach {url}: no well-formed HTTP answer "
                           f"({type(error).__name__}: {str(error).strip()[:200]})") from error
    try:
        reply = json.loads(text) if text else None
    except ValueError:  # not JSON (a proxy's page, say)
        raise RuntimeError(f"{url}{path} answered what is not JSON: {text[:200]!r}") from None
    if reply is not None and not isinstance(reply, dict):
        raise RuntimeError(f"{url}{path} answered {text[:200]!r}, not a JSON object")
    return (reply, headers) if with_headers else reply


def _rpc(url: str, method: str, args: list, timeout: float) -> list:
    """Call a WorkerExtension method on every rank; the ranks' results, in rank order."""
    reply = _request(url, "/collective_rpc", dict(method=method, args=args, timeout=timeout),
                     timeout + ANSWER_MARGIN)
    results = (reply or {}).get("results")
    if not isinstance(results, list):
        raise RuntimeError(f"{url}: unexpected answer to {method}: {reply!r}")
    return results


def _reset_prefix_cache(url: str, timeout: float, done: str = "the expert was swapped") -> None:
    if not (_request(url, "/reset_prefix_cache", None, timeout) or {}).get("success"):
        raise RuntimeError(f"{done}, but the server could not reset its prefix cache (requests "
                           "still running?): cached blocks of the previous expert may be reused; "
                           f"POST {url}/reset_prefix_cache once it is idle")
