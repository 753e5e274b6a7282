"""Plug and swap experts on a running `vllm serve` over HTTP: `plug(url, mask)`, `unplug(url)`,
`status(url)`.

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
import json
import urllib.error
import urllib.request

from doe_kernels.vllm.protocol import as_mask, plug_on_ranks


def plug(url: str, mask, timeout: float = 120.0) -> None:
    """Serve `mask` (an ExpertMask or Expert) from the server at `url` (e.g.
    "http://localhost:8000"); swaps when one is plugged. Raises ValueError (mask) or
    UnsupportedModelError (model) before any rank changes, RuntimeError when the server cannot
    take it (no development endpoints, no worker extension, CUDA graphs)."""
    plug_on_ranks(lambda method, args: _rpc(url, method, args, timeout), as_mask(mask))
    _reset_prefix_cache(url, timeout)


def unplug(url: str, timeout: float = 120.0) -> None:
    """Give the server its dense model back (a no-op if nothing is plugged)."""
    _rpc(url, "doe_unplug", [], timeout)
    _reset_prefix_cache(url, timeout)


def status(url: str, timeout: float = 120.0) -> list:
    """Per rank: its place and its local kept neuron and head counts per layer (None: dense)."""
    return _rpc(url, "doe_status", [], timeout)


def _post(url: str, path: str, body: dict | None, timeout: float):
    request = urllib.request.Request(
        url.rstrip("/") + path, method="POST", data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise RuntimeError(f"{url} has no {path} endpoint: start vllm serve with "
                               "VLLM_SERVER_DEV_MODE=1") from error
        raise RuntimeError(f"{url}{path} answered {error.code} (is the server started with "
                           "--worker-extension-cls doe_kernels.vllm.WorkerExtension?): "
                           f"{error.read().decode(errors='replace')[:500]}") from error
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"cannot reach {url}: {error}") from error
    return json.loads(text) if text else None


def _rpc(url: str, method: str, args: list, timeout: float) -> list:
    """Call a WorkerExtension method on every rank; the ranks' results, in rank order."""
    reply = _post(url, "/collective_rpc", dict(method=method, args=args, timeout=timeout),
                  timeout)
    results = (reply or {}).get("results")
    if not isinstance(results, list):
        raise RuntimeError(f"{url}: unexpected answer to {method}: {reply!r}")
    return results


def _reset_prefix_cache(url: str, timeout: float) -> None:
    if not (_post(url, "/reset_prefix_cache", None, timeout) or {}).get("success"):
        raise RuntimeError("the expert was swapped, but the server could not reset its prefix "
                           "cache (requests still running?): cached blocks of the previous expert "
                           f"may be reused; POST {url}/reset_prefix_cache once it is idle")
