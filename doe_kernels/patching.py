"""patch / unpatch / plugged: plug a task expert into a HuggingFace model and take it out again.

`patch` swaps each transformer layer's attention and FFN (or mixture-of-experts) modules for ones
that compute only the expert's heads, neurons and MoE experts (models/), in place. Calling it
again swaps the expert: only index tensors change. `unpatch` restores the original modules,
Parameters and weight layout, so the model is bitwise the model it was (transformers'
output-capturing hooks installed while patched are taken off again, so that `output_attentions`
and the like work as on a model never patched). Everything is validated before anything changes,
and an error part-way through (out of memory, say) undoes what was done; a failed `unpatch` still
restores every layer's modules. While patched, the model's `_apply` (`.half()`, `.to(...)`)
checks the new dtype and device against an explicit backend first and refuses a conversion that
would change integer tensors (the index buffers) or replace Parameters; `load_state_dict` and
`output_attentions` are refused (models/base.py keeps `state_dict` the original model's), and so
is a swap inside `doe_kernels.mixed`.
"""
import contextlib
import copy
import itertools
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from doe_kernels import backends
from doe_kernels.backends import BackendUnavailableError
from doe_kernels.caller_state import lasting
from doe_kernels.mask import ExpertMask
from doe_kernels.models import (PATCH_STATE_ATTR, ModelSpec, UnsupportedModelError,
                                check_transformers_version, describe)
from doe_kernels.models.base import LayerPatch, refuse_load_while_patched
from doe_kernels.models.moe_block import MoePlan
from doe_kernels.ops import HeadSelection

_STATE = PATCH_STATE_ATTR
# mask -> {(ModelSpec, device, dynamic_skip): per-layer plans}; masks are immutable, so a plan
# stays valid for as long as its mask lives
_PREPARED: "weakref.WeakKeyDictionary[ExpertMask, dict]" = weakref.WeakKeyDictionary()


@dataclass
class PatchState:
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    backend: str
    layers: list[LayerPatch]
    mask: ExpertMask | None = None
    dynamic_skip: bool = False
    mixed: bool = False  # serving a mixed-task batch (doe_kernels.mixed)
    modules: list[nn.Module] = field(default_factory=list)
    hooks: list = field(default_factory=list)  # the model's refusals, removed at unpatch
    # transformers' output capturing before the patch (`_capture_state`): the names of the
    # modules marked as hooked, and (module name, key) of each capturing hook
    capture_marked: set = field(default_factory=set)
    capture_hooks: set = field(default_factory=set)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


def current_mask(model: nn.Module) -> ExpertMask | None:
    state = getattr(model, _STATE, None)
    return None if state is None else state.mask


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The patched mixture-of-experts block of every layer of a patched MoE model (the modules
    doe_kernels.moe calibrates and selects experts on)."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("the model is not patched by doe_kernels")
    if not state.spec.num_experts:
        raise ValueError("the model has no mixture-of-experts layers")
    return [layer.moe_modules[0] for layer in state.layers]


def _model_device(layers) -> tuple[torch.device, torch.dtype]:
    """The one device and floating dtype of the layers' Parameters; raises if there are several."""
    params = [p for layer in layers for p in layer.parameters()]
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if len(devices) != 1:
        raise ValueError(f"the model's layers are spread over devices {sorted(map(str, devices))}; "
                         "doe_kernels patches a model on one device")
    device = devices.pop()
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the model is on {device}; doe_kernels runs on CPU or CUDA devices")
    if len(dtypes) != 1:
        raise ValueError(f"the model's layers mix dtypes {sorted(map(str, dtypes))}")
    return device, dtypes.pop()


def _plans(mask: ExpertMask, spec: ModelSpec, device: torch.device, dynamic_skip: bool):
    """Per layer: (kept neurons on `device`, or None when all are kept; HeadSelection; MoePlan or
    None for a dense layer; then the expert's reconstruction on `device` in float32, each None
    when absent: FFN and attention bias deltas, scales of the kept neurons, and scales of the kept
    heads' columns (a head's scale repeated over its head_dim columns)).

    Validated and built once per mask, model size, device and skipping choice, then reused by
    every swap.
    """
    prepared = _PREPARED.setdefault(mask, {})
    key = (spec, device, dynamic_skip)
    if key not in prepared:
        # plans outlive the call: no inference tensors, and no autograd graph
        with lasting():
            prepared[key] = _build_plans(mask, spec, device, dynamic_skip)
    return prepared[key]


def _on(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """`tensor` on `device` (None: where it is), an ordinary tensor (a copy of one made under
    inference_mode, which autograd could not save for a backward pass later)."""
    tensor = tensor if device is None else tensor.to(device)
    return tensor.clone() if tensor.is_inference() else tensor


def _build_plans(mask: ExpertMask, spec: ModelSpec, device: torch.device, dynamic_skip: bool):
    """`_plans` for one key, built."""
    mask.check_spec(spec)
    if dynamic_skip:
        if not spec.num_experts:
            raise ValueError("dynamic_skip=True needs a mixture-of-experts model")
        mask.check_skip_everywhere(spec.num_layers, "dynamic_skip=True")
    plans = []
    for layer in range(spec.num_layers):
        kept = mask.ffn.get(layer)
        if kept is not None and kept.numel() == spec.intermediate_size:
            kept = None
        heads = _on(mask.heads.get(layer, torch.arange(spec.num_heads)), None)
        selection = HeadSelection.build(heads, spec.num_heads, spec.num_kv_heads,
                                        spec.head_dim, device=device)
        moe = None
        if spec.num_experts:
            experts = mask.moe.get(layer)
            if experts is not None and experts.numel() == spec.num_experts:
                experts = None
            moe = MoePlan(None if experts is None else _on(experts, device),
                          mask.skip[layer] if dynamic_skip else None)
        vectors = [_on(table[layer], device) if layer in table else None
                   for table in (mask.ffn_bias, mask.attn_bias, mask.ffn_scales,
                                 mask.head_scales)]
        if vectors[3] is not None:
            vectors[3] = vectors[3].repeat_interleave(spec.head_dim)
        plans.append((None if kept is None else _on(kept, device), selection, moe, *vectors))
    return plans


def patch(model: nn.Module, mask: ExpertMask, backend: str = "auto",
          dynamic_skip: bool = False) -> nn.Module:
    """Run `model` (in place) on the expert's neurons, heads and MoE experts; returns the model.

    On a patched model this swaps the expert and sets the backend named (`auto` unless told,
    whatever the model ran on before): only index tensors change. `dynamic_skip=True` (MoE
    models) also skips a token's non-top experts whose routing weight is below the mask's
    per-layer threshold times the top one's. Raises before
    changing anything if the mask does not fit the model, the architecture is not supported or
    the backend is not present; any error while patching leaves the model as it was.
    """
    if not isinstance(mask, ExpertMask):
        raise TypeError(f"mask must be a doe_kernels.ExpertMask, got {type(mask).__name__}")
    if not isinstance(dynamic_skip, bool):
        raise TypeError(f"dynamic_skip must be True or False, got {dynamic_skip!r}")
    given, model = model, unwrap_compiled(model)
    state = getattr(model, _STATE, None)
    if state is not None and state.mixed:  # the segments, not the expert, drive every forward
        raise RuntimeError("the model serves a mixed batch (inside doe_kernels.mixed), whose "
                           "masks drive every forward pass: patch or plug another expert before "
                           "or after the `mixed` block")
    # the relaid-out weights and the index buffers outlive the call: under torch.inference_mode
    # they would be inference tensors, and the model could not be trained afterwards
    with lasting():
        if state is None:
            _patch_layers(model, mask, backend, dynamic_skip)
        else:
            _swap(state, mask, backend, dynamic_skip)
    return given


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper compiles, else `model`: a patch's state, hooks and
    guards live on the original module, so that patching the wrapper or the module is the same
    (the wrapper's compiled code recompiles for the patched forwards)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded wherever a wrapper exists
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return unwrap_compiled(model._orig_mod)
    return model


def _patch_layers(model: nn.Module, mask: ExpertMask, backend: str, dynamic_skip: bool) -> None:
    """Patch an unpatched model; on any error every layer (the failing one too) is restored."""
    check_transformers_version()
    adapter, layers, spec = describe(model)
    _check_attention_implementation(model, spec)
    device, dtype = _model_device(layers)
    if backend != "auto":
        backends.resolve(backend, device, dtype, rows=1)  # raises if not present
    plans = _plans(mask, spec, device, dynamic_skip)
    shared, capture = _shared_storages(model), _capture_state(model)
    patches = []
    try:
        for layer in layers:
            patches.append(LayerPatch(layer, shared))
            adapter.patch_layer(patches[-1], model.config, backend)
        state = PatchState(spec, device, dtype, backend, patches)
        state.capture_marked, state.capture_hooks = capture
        state.modules = [m for p in patches for m in p.ffn_modules + p.head_modules + p.head_cols]
        _set_plans(state, plans, mask, dynamic_skip)
        _guard_model(model, state)
    except BaseException as error:
        _unguard_model(model)
        for done in reversed(patches):  # every layer, also past one whose restore fails
            try:
                done.restore()
            except Exception as restore_error:  # noqa: BLE001 (the patch's error is the one)
                _add_note(error, f"doe_kernels could not restore a layer's weight layout: "
                                 f"{restore_error!r} (its values are intact)")
        raise


def _shared_storages(model: nn.Module) -> set:
    """The storages (by address) that several of the model's distinct Parameters and buffers
    share: a weight laid out anew while patched keeps its storage, so that unpatch puts it back
    there (LayerPatch)."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    counts: dict[int, int] = {}
    for tensor in tensors.values():
        if tensor.numel():
            address = tensor.untyped_storage().data_ptr()
            counts[address] = counts.get(address, 0) + 1
    return {address for address, count in counts.items() if count > 1}


# the attention implementations whose masks a patched causal model's attention reads (it
# computes attention itself: flash attention's 2-D padding mask leaves causality to the kernel,
# which is not called; flex attention's masks are no tensors). A BERT-family encoder reads a
# 2-D padding mask as it is (and refuses a flex mask when it gets one).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _check_attention_implementation(model: nn.Module, spec: ModelSpec) -> None:
    implementation = getattr(model.config, "_attn_implementation", None)
    if (spec.family != "bert" and implementation is not None
            and implementation not in ATTENTION_IMPLEMENTATIONS):
        known = " or ".join(map(repr, ATTENTION_IMPLEMENTATIONS))
        raise UnsupportedModelError(
            f"attn_implementation {implementation!r} is not supported by patched models, which "
            f"compute attention from the masks of {known}: load the model with "
            "attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))")


def _swap(state: PatchState, mask: ExpertMask, backend: str, dynamic_skip: bool) -> None:
    """Point a patched model at another expert (and backend); on error the previous one stays."""
    # read afresh: a submodule's .to(...) is not seen by the model's guarded _apply
    state.device, state.dtype = _model_device([patch.layer for patch in state.layers])
    if backend != "auto":
        backends.resolve(backend, state.device, state.dtype, rows=1)  # raises if not present
    plans = _plans(mask, state.spec, state.device, dynamic_skip)
    previous = (state.backend, state.mask, state.dynamic_skip)
    try:
        _set_backend(state, backend)
        _set_plans(state, plans, mask, dynamic_skip)
    except BaseException:
        _set_backend(state, previous[0])
        if previous[1] is not None:
            _set_plans(state, _plans(previous[1], state.spec, state.device, previous[2]),
                       previous[1], previous[2])
        raise


def _set_backend(state: PatchState, backend: str) -> None:
    if backend != state.backend:
        for module in state.modules:
            module.backend = backend
        state.backend = backend


def cast_vectors(vectors, dtype: torch.dtype) -> list:
    """A plan's bias deltas and scales in the model's dtype (None stays None)."""
    return [None if vector is None else vector.to(dtype) for vector in vectors]


def _set_plans(state: PatchState, plans, mask: ExpertMask, dynamic_skip: bool) -> None:
    """Point every layer at its plan; bias deltas and scales are cast to the model's dtype here
    (a module buffer then follows `.to(...)`/`.half()` of the model)."""
    for layer_patch, (kept, selection, moe, *vectors) in zip(state.layers, plans):
        layer_patch.set(kept, selection, moe, *cast_vectors(vectors, state.dtype))
    state.mask, state.dynamic_skip = mask, dynamic_skip


def _guard_model(model: nn.Module, state: PatchState) -> None:
    """Mark `model` patched: record the state; refuse load_state_dict, into the model or any
    module holding a patched layer, before it copies anything, and output_attentions, which the
    patched attention does not give, on the model and on every PreTrainedModel holding the
    layers (`model.model(...)` is called too); check every dtype or device change (`.half()`,
    `.to(...)`) against the backend before anything is converted."""
    from transformers import PreTrainedModel

    setattr(model, _STATE, state)
    layers = {id(patch.layer) for patch in state.layers}
    names = [name for name, module in model.named_modules() if id(module) in layers]
    holders = {""} | {".".join(name.split(".")[:end]) for name in names
                      for end in range(1, name.count(".") + 2)}
    for name in sorted(holders):
        holder = model.get_submodule(name)
        state.hooks.append(holder.register_load_state_dict_pre_hook(refuse_load_while_patched))
        if holder is model or isinstance(holder, PreTrainedModel):
            state.hooks.append(holder.register_forward_pre_hook(_refuse_output_attentions,
                                                                with_kwargs=True))
    model._apply = _ApplyGuard(model, model.__dict__.get("_apply"))


def _refuse_output_attentions(model, args, kwargs) -> None:
    if kwargs.get("output_attentions") or (
            kwargs.get("output_attentions") is None
            and getattr(getattr(model, "config", None), "output_attentions", False)):
        raise ValueError("output_attentions=True on a model patched by doe_kernels: its "
                         "attention computes no weights to return (unpatch it to read them)")


# transformers 5 marks a PreTrainedModel whose output-capturing hooks (output_hidden_states,
# output_attentions, router logits) it installed: once, on the first forward asking for an output,
# on the modules of the classes it records that are then in the tree
_CAPTURE_MARK = "_output_capturing_hooks_installed"


def _capture_state(model: nn.Module) -> tuple[set, set]:
    """(names of the modules transformers marks as hooked, (module name, key) of each of its
    output-capturing hooks): by name, which copies and pickles of the model share."""
    marked, hooks = set(), set()
    for name, module in model.named_modules():
        if module.__dict__.get(_CAPTURE_MARK):
            marked.add(name)
        hooks.update((name, key) for key, hook in module._forward_hooks.items()
                     if _is_capture_hook(hook))
    return marked, hooks


def _is_capture_hook(hook) -> bool:
    return (getattr(hook, "__name__", None) == "output_capturing_hook"
            and getattr(hook, "__module__", "").startswith("transformers."))


def _drop_capture_hooks_added(model: nn.Module, state: PatchState) -> None:
    """On the restored model: a PreTrainedModel that transformers marked as hooked while it was
    patched got its capturing hooks on the patched tree, not on the original modules the patch
    took out, and would never hook those: the capturing hooks added in it since the patch are
    removed and the mark cleared, so that the next request hooks the model as it is now."""
    marked = [(name, m) for name, m in model.named_modules()
              if m.__dict__.get(_CAPTURE_MARK) and name not in state.capture_marked]
    for prefix, holder in marked:
        for name, module in holder.named_modules(prefix=prefix):
            for key, hook in list(module._forward_hooks.items()):
                if _is_capture_hook(hook) and (name, key) not in state.capture_hooks:
                    for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs,
                                  module._forward_hooks_always_called):
                        hooks.pop(key, None)
        del holder.__dict__[_CAPTURE_MARK]


def _unguard_model(model: nn.Module) -> None:
    state = model.__dict__.pop(_STATE, None)
    for hook in [] if state is None else state.hooks:
        hook.remove()
    guard = model.__dict__.get("_apply")
    if isinstance(guard, _ApplyGuard):
        del model.__dict__["_apply"]
        if guard.previous is not None:
            model._apply = guard.previous


class _ApplyGuard:
    """A patched model's `_apply`: `_checked_apply` on the model, which it holds weakly (no
    reference cycle keeps a deleted model alive); copies and pickles follow the model."""

    def __init__(self, model: nn.Module, previous=None):
        self.model, self.previous = weakref.ref(model), previous

    def __call__(self, fn, recurse: bool = True):
        return _checked_apply(self.model(), fn, recurse, self.previous)

    def __deepcopy__(self, memo):
        model = self.model()
        return _ApplyGuard(memo.get(id(model), model), copy.deepcopy(self.previous, memo))

    def __reduce__(self):
        return _ApplyGuard, (self.model(), self.previous)


_PROBES = itertools.count(0x5DEECE66D)  # each integer probe's values are new (`_check_integers`)


def _checked_apply(model: nn.Module, fn, recurse: bool = True, previous=None):
    """nn.Module._apply on a patched model: a conversion to a dtype or device the model's explicit
    backend cannot run, one that changes integer tensors (the index buffers) or one that replaces
    Parameters (which the original modules, out of the tree, share) is refused before any tensor
    changes; the state follows the model."""
    state = getattr(model, _STATE)
    if torch.__future__.get_overwrite_module_params_on_conversion():
        raise RuntimeError(
            "torch.__future__.set_overwrite_module_params_on_conversion(True) makes a conversion "
            "replace the model's Parameters, which a model patched by doe_kernels shares with its "
            "original modules (out of the module tree until unpatch): doe_kernels.unpatch(model) "
            "first, convert, then patch again")
    probe = fn(torch.empty(0, dtype=state.dtype, device=state.device))
    changed = (probe.dtype, probe.device) != (state.dtype, state.device)
    if changed:
        if state.mixed:  # the segments' plans were cast and placed for the batch's layers
            raise RuntimeError("a model serving a mixed batch (inside doe_kernels.mixed) cannot "
                               f"be converted to {probe.dtype} on {probe.device}: convert it "
                               "before or after")
        if probe.device.type not in ("cpu", "cuda"):
            raise ValueError(f"a patched model runs on CPU or CUDA devices, not {probe.device}; "
                             "doe_kernels.unpatch(model) first")
        if state.backend != "auto":
            try:
                backends.resolve(state.backend, probe.device, probe.dtype, rows=1)
            except BackendUnavailableError as error:
                raise BackendUnavailableError(
                    f"the model is patched with backend={state.backend!r}, which cannot run "
                    f"{probe.dtype} on {probe.device.type} ({error}); patch again with "
                    "backend='auto' (or unpatch) before converting the model") from None
    _check_integers(fn, state.device)
    if previous is not None:
        previous(fn, recurse)
    else:
        type(model)._apply(model, fn, recurse)
    state.dtype, state.device = probe.dtype, probe.device
    if changed:  # weights kept in their old storage go back as converted (not into it)
        for layer_patch in state.layers:
            layer_patch.storages = [None] * len(layer_patch.storages)
    return model


def _check_integers(fn, device: torch.device) -> None:
    """Raise before anything changes if the conversion `fn` changes an int64 tensor's dtype
    (`model.type(torch.float64)`) or values (`model.to_empty(...)`): a patched model's index
    buffers would no longer index."""
    values = [next(_PROBES), -7, 1]
    source = torch.tensor(values, dtype=torch.int64, device=device)
    probe = fn(source)
    if probe.dtype != torch.int64:
        raise ValueError(f"this conversion turns integer tensors into {probe.dtype}, which would "
                         "break the index buffers of a model patched by doe_kernels: convert "
                         "its floating-point tensors only (model.to(dtype), .half(), .double()), "
                         "or doe_kernels.unpatch(model) first")
    # (compared where the source is: a non-blocking copy to the host may not have landed yet,
    # and a copy back is queued after it)
    if not torch.equal(probe.to(device), source):
        raise ValueError("this conversion does not keep tensors' values (to_empty?), which would "
                         "leave a model patched by doe_kernels with garbage index buffers: "
                         "doe_kernels.unpatch(model) first")


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules and weights; the model is then bitwise what it was. An error
    copying a weight back into its layout (out of memory) is raised once every layer has its
    modules back and the model is unpatched; such a weight keeps its values in the input-major
    layout, which the original modules read as well."""
    given, model = model, unwrap_compiled(model)
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("the model is not patched by doe_kernels")
    if state.mixed:  # (its rows would run the whole model, its packing hooks the original layers)
        raise RuntimeError("the model serves a mixed batch (inside doe_kernels.mixed), which "
                           "restores it on exit: unpatch after the `mixed` block")
    failed = None
    with lasting():  # the weights back in their layout
        for layer_patch in reversed(state.layers):  # every layer, also past one that fails
            try:
                layer_patch.restore()
            except Exception as error:  # noqa: BLE001 (raised once the model is unpatched)
                failed = failed or error
    _unguard_model(model)
    _drop_capture_hooks_added(model, state)
    if failed is not None:
        _add_note(failed, "doe_kernels unpatched the model (every layer has its original "
                          "modules back); the weights it could not copy back into their layout "
                          "keep their values")
        raise failed
    return given


@contextlib.contextmanager
def plugged(model: nn.Module, mask: ExpertMask, backend: str = "auto",
            dynamic_skip: bool = False):
    """`with plugged(model, mask): ...` plugs the expert, runs the body, and restores the model
    (also when the body raises): the unpatched model, or the expert that was plugged before."""
    previous = plugged_state(model)
    patch(model, mask, backend, dynamic_skip)
    with restoring(model, previous):
        yield model


def plugged_state(model: nn.Module):
    """What `restoring` puts back: the plugged (mask, backend, dynamic_skip), or None when the
    model is not patched."""
    state = getattr(model, _STATE, None)
    return None if state is None else (state.mask, state.backend, state.dynamic_skip)


@contextlib.contextmanager
def restoring(model: nn.Module, previous, cleanup=None):
    """After the body, `cleanup()` (if given) and the model put back to `previous`
    (`plugged_state`: that expert plugged again, or unpatched), also when the body raises; then
    a failure to restore becomes a note on the body's error, which is the one to see."""
    try:
        yield
    except BaseException as error:
        try:
            if cleanup is not None:
                cleanup()
            _restore(model, previous)
        except Exception as restore_error:
            _add_note(error, f"doe_kernels could not restore the model: {restore_error!r}")
        raise
    if cleanup is not None:
        cleanup()
    _restore(model, previous)


def _restore(model: nn.Module, previous) -> None:
    """Plug `previous` (mask, backend, dynamic_skip) again, or unpatch when it is None."""
    if previous is not None:
        patch(model, *previous)
    elif is_patched(model):  # the body may have unpatched it already
        unpatch(model)


def _add_note(error: BaseException, note: str) -> None:
    """`error.add_note(note)`; on Python 3.10 (no add_note) the note is kept in `__notes__` as
    3.11 keeps it (tracebacks do not print it there)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]
