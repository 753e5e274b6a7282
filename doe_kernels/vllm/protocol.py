"""The caller's side of a swap, whatever carries the calls to the ranks (`LLM.collective_rpc`
offline, vLLM's `POST /collective_rpc` on a server): what a caller may plug, the mask's encoding,
and the check-then-apply protocol. Needs no vLLM.

A mask travels as (base64 of its safetensors bytes, its spec as JSON): strings, the only arguments
the HTTP endpoint passes. Every rank checks it and stages its plan (`doe_check_mask`); only if
every rank accepts does any apply it (`doe_apply_mask`), else every rank drops it
(`doe_discard_mask`).
"""
import base64
import hashlib
import json
import uuid
import warnings

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from doe_kernels.expert import Expert
from doe_kernels.files import parse_json
from doe_kernels.mask import ExpertMask
from doe_kernels.models import UnsupportedModelError


EXTRA_ARG = "doe_expert"  # the key of SamplingParams.extra_args (a request's vllm_xargs) naming
# its expert


SALT_PREFIX = "doe_kernels-"  # experts' salts start with it; a request's own salt may not


def cache_salt(name: str, own: str | None = None, generation: int = 0) -> str:
    """The prefix-cache salt of a request on the expert `name`, from the request's `own` salt
    (None: none) too: no request reuses the KV blocks another expert (or another `own` salt)
    computed. `generation` tells apart the experts held under one name one after another (a
    server's gate counts them). A hash of the three, so that no two of them give one salt and
    every salt passes vLLM's check (at most 128 characters, none of @ / \\)."""
    key = json.dumps([name, own, generation], ensure_ascii=False).encode("utf-8",
                                                                         "surrogatepass")
    return SALT_PREFIX + hashlib.sha256(key).hexdigest()[:40]


class Refused(RuntimeError):
    """A call to the ranks refused before any rank ran it (a server's gate answering 409 or
    400): nothing was changed."""


def removed_on_every_rank(name: str, removed: list) -> bool:
    """Whether every rank removed the expert `name` (`removed`: each rank's reply, in rank order);
    False if none did; KeyError naming the ranks where only some did."""
    if removed and all(removed):
        return True
    if any(removed):
        where = lambda value: [rank for rank, flag in enumerate(removed) if flag == value]  # noqa: E731
        raise KeyError(f"the expert {name!r} was held by ranks {where(True)} only, and is "
                       f"removed from them (not held by ranks {where(False)})")
    return False


def reserved_salt(own) -> bool:
    """Whether a request's own `cache_salt` could pass for an expert's (its KV blocks would
    then be reused by that expert's requests): refused by the server's gate."""
    return isinstance(own, str) and own.startswith(SALT_PREFIX)


def as_mask(mask) -> ExpertMask:
    """An ExpertMask, or an Expert's mask; TypeError for anything else."""
    if isinstance(mask, Expert):
        return mask.mask if mask.mask is not None else ExpertMask()
    if not isinstance(mask, ExpertMask):
        raise TypeError(f"mask must be a doe_kernels.ExpertMask or Expert, got "
                        f"{type(mask).__name__}")
    return mask


def encode_mask(mask: ExpertMask) -> tuple[str, str]:
    """A mask as (base64 of its safetensors bytes, its spec as JSON)."""
    return base64.b64encode(save_tensors(mask.tensors())).decode("ascii"), json.dumps(mask.spec)


def decode_mask(tensors: str, spec: str) -> ExpertMask:
    """The mask `encode_mask` encoded; ValueError for anything else."""
    try:
        loaded = load_tensors(base64.b64decode(tensors, validate=True))
    except SafetensorError as error:  # not a ValueError
        raise ValueError(f"the mask's tensors are not a safetensors payload: {error}") from None
    return ExpertMask.from_tensors(loaded, parse_json(spec, "the mask's spec"))


def plug_on_ranks(call, mask: ExpertMask, apply: str = "doe_apply_mask", *args) -> list:
    """Check `mask` on every rank, then apply it on every rank (`apply(*args, token)`: the
    worker method that takes the staged plan; plug's by default); `call(method, args)` runs a
    WorkerExtension method on every rank and returns their results in rank order. Raises
    ValueError (mask) or UnsupportedModelError (model) with nothing changed on any rank, and
    `call`'s Refused as it is (no rank ran the apply); returns the ranks' replies to `apply`."""
    tensors, spec = encode_mask(mask)
    token = uuid.uuid4().hex
    try:
        replies = call("doe_check_mask", [tensors, spec, token, apply == "doe_add_expert"])
    except Exception:
        _discard(call, token)  # ranks that staged a plan before another failed
        raise
    refusals = [(rank, reply) for rank, reply in enumerate(replies) if reply is not None]
    if refusals:
        _discard(call, token)
        rank, reply = refusals[0]
        error = UnsupportedModelError if reply["model"] else ValueError
        raise error(f"mask refused (rank {rank}; nothing was changed): {reply['error']}")
    try:
        return call(apply, [*args, token])
    except Refused:  # (no rank ran the apply)
        _discard(call, token)
        raise
    except Exception:
        _discard(call, token)  # ranks the apply did not reach keep no staged plan
        if len(replies) > 1:  # (one rank's apply changes nothing when it fails)
            warnings.warn(f"{apply} failed on a rank after others may have applied it: the "
                          f"{len(replies)} ranks may now hold different experts (names only "
                          "some hold are refused); plug or add it again, or unplug",
                          RuntimeWarning, stacklevel=3)
        raise


def check_name(name) -> str:
    """`name`, or ValueError if it is not a non-empty string."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an expert's name must be a non-empty string, got {name!r}")
    return name


def statuses(replies: list) -> list:
    """The ranks' replies to `doe_status`; UnsupportedModelError where a rank found the model
    unsupported."""
    for reply in replies:
        if isinstance(reply, dict) and "error" in reply:
            raise UnsupportedModelError(reply["error"])
    return replies


def held_on_every_rank(replies: list) -> list:
    """The expert names every rank holds, from the ranks' replies to `doe_experts` (in the order
    the first rank added them): a name only some ranks hold (an add that failed on one) would
    fail the engine step of a request naming it."""
    if not replies:
        return []
    return [name for name in replies[0] if all(name in names for names in replies[1:])]


def _discard(call, token: str) -> None:
    """Drop the plan staged under `token` on every rank; an error doing so is not the one to
    report."""
    try:
        call("doe_discard_mask", [token])
    except Exception:  # noqa: BLE001
        pass
