"""What a step that runs the caller's model (localize's, a MoE calibration pass) changes on the
caller's side and puts back when it ends, however it ends: each module's train/eval mode
(`evaluating`) and torch's global random state (`seeded`); `lasting`, where tensors that
outlive a call are made whatever the caller's autograd and inference modes; `own_modes`,
for steps that train and choose their own precision whatever the caller's modes; and
`unchunked`, for steps whose hooks must see each layer's FFN input whole; `warn_caller`, a
warning that points at the caller's line."""
import contextlib
import dataclasses
import functools
import os
import sys
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_caller(message: str, category=UserWarning) -> None:
    """warnings.warn pointing at the first frame outside doe_kernels, the caller's line however
    deep the library's own calls (and wrappers) run: Python shows a DeprecationWarning by default
    only where it points at __main__. The `__init__` that dataclasses writes for the library's
    configs, and dataclasses.replace, count as the library's."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _library_frame(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_DATACLASSES = os.path.abspath(dataclasses.__file__)


def _library_frame(frame) -> bool:
    code = frame.f_code
    if code.co_filename.startswith(_PACKAGE) or code.co_filename == _DATACLASSES:
        return True
    if code.co_filename != "<string>":
        return False
    # a dataclass's generated __init__ (file "<string>") on one of the library's classes, or on
    # a caller's subclass of one
    owner = frame.f_locals.get("self")
    return owner is not None and any(cls.__module__.startswith("doe_kernels.")
                                     for cls in type(owner).__mro__)


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode while the body runs, each module's own mode restored after (a
    top-level `model.train(flag)` would overwrite modes the caller set per module)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None):
    """torch's global random generators seeded with `seed` while the body runs (for what draws
    from them: PEFT's initialisations, dropout), the caller's states restored after."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        # the generators forked only: torch.manual_seed would reseed every GPU's (lazily, where
        # CUDA is not started yet) and leave them so
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def lasting():
    """The body makes tensors that outlive the call (plans, index lists, caches a later forward
    pass reuses): outside torch.inference_mode (an inference tensor cannot be saved for a later
    backward pass) and outside autograd."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def own_modes(device: torch.device):
    """The body trains and picks its own precision whatever the caller's modes: outside
    torch.no_grad and torch.inference_mode, and outside a torch.autocast of the caller's on
    `device`'s type (the body may enter its own)."""
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        yield


def chunk_holders(model) -> list:
    """The model's config and modules that make its FFNs run in chunks of tokens
    (transformers' chunk_size_feed_forward > 0, BERT's memory saving: a layer keeps its own copy
    of the config's value, which may be set on it alone)."""
    return [holder for holder in (getattr(model, "config", None), *model.modules())
            if getattr(holder, "chunk_size_feed_forward", 0)]


@contextlib.contextmanager
def unchunked(model):
    """The model's FFNs run on all tokens at once while the body runs (each `chunk_holders`
    entry's chunk_size_feed_forward set to 0, restored after; the outputs are the same, only
    the FFN's activations are held whole), so that a hook sees a layer's FFN input once per
    forward pass. Like `evaluating`, for one caller of a model at a time."""
    saved = [(holder, holder.chunk_size_feed_forward) for holder in chunk_holders(model)]
    try:
        for holder, _ in saved:
            holder.chunk_size_feed_forward = 0
        yield model
    finally:
        for holder, size in saved:
            holder.chunk_size_feed_forward = size


def in_own_modes(function):
    """`function(model, ...)` run in `own_modes` of the model's device and `unchunked` (localize's
    steps: a caller under torch.no_grad got an autograd error from the first backward pass, one
    under torch.autocast trained in another precision than the figures said, and a BERT whose
    FFN ran in chunks was scored on its last chunk's tokens only)."""
    @functools.wraps(function)
    def run(model, *args, **kwargs):
        with own_modes(model.get_input_embeddings().weight.device), unchunked(model):
            return function(model, *args, **kwargs)
    return run
