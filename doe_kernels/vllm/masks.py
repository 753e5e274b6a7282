"""Masks on their way to the ranks: what the caller accepts, and the encoding collective_rpc
carries intact (safetensors bytes and the spec as JSON). Needs no vLLM."""
import json

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from doe_kernels.expert import Expert
from doe_kernels.mask import ExpertMask


def as_mask(mask) -> ExpertMask:
    """An ExpertMask, or an Expert's mask; TypeError for anything else."""
    if isinstance(mask, Expert):
        return mask.mask if mask.mask is not None else ExpertMask()
    if not isinstance(mask, ExpertMask):
        raise TypeError(f"mask must be a doe_kernels.ExpertMask or Expert, got "
                        f"{type(mask).__name__}")
    return mask


def encode_mask(mask: ExpertMask) -> tuple[bytes, str]:
    """A mask as (safetensors bytes, spec JSON)."""
    return save_tensors(mask.tensors()), json.dumps(mask.spec)


def decode_mask(tensors: bytes, spec: str) -> ExpertMask:
    return ExpertMask.from_tensors(load_tensors(tensors), json.loads(spec))
