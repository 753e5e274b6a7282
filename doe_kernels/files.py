"""Reading and writing the package's safetensors files (ExpertMask and Expert files).

Whatever is wrong with a file (missing, a directory, empty, corrupt, not written by doe_kernels,
a header or tensor that does not make sense), loading raises `FileFormatError`, a ValueError whose
message names the file and the problem. Saving writes a temporary file next to the target and
renames it over the target, so a save that fails (a full disk, an interrupt) leaves any earlier
file at that path whole.
"""
import json
import os
import stat
import uuid

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# The floating-point dtypes a mask's vectors or an expert's prompt and head may be given in (torch
# loads float8 and float4 tensors too, but computes little on them)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FileFormatError(ValueError):
    """A mask or expert file that cannot be loaded; the message names the file and the problem."""


def parse_json(text: str, what: str):
    """The JSON value of `text`; raises ValueError naming `what` when it is not JSON or is nested
    deeper than Python parses."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply") from None


def read_safetensors(path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata marks it as doe_kernels `kind`
    ("ExpertMask" or "Expert"); raises FileFormatError otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileFormatError(f"{path} is a directory, not a doe_kernels {kind} file")
    if not os.path.isfile(path):
        raise FileFormatError(f"{kind} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            found = metadata.get("doe_kernels")
            if found != kind:
                what = ("no doe_kernels metadata" if found is None
                        else f"its metadata marks it as {found}")
                raise FileFormatError(f"{path} is not a doe_kernels {kind} file ({what})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise FileFormatError(f"{path} is not a readable safetensors file: {error}") from None
    return metadata, tensors


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` to `path` as one safetensors file, atomically: the file at
    `path` is either the earlier one or the whole new one, never a part."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path}: it is a directory")
    target = os.path.realpath(path)  # through a symbolic link, the file it names
    # a new name in the same folder (so the rename stays on one file system); safetensors
    # writes files readable by their owner only, so the file gets the earlier one's permissions,
    # or those any new file gets (the temporary's, as created here)
    folder, name = os.path.split(target)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb"):
            pass
        mode = stat.S_IMODE(os.stat(target if os.path.exists(target) else temporary).st_mode)
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
