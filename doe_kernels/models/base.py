"""What the architecture adapters share: the model's sizes, and how one layer is patched/restored.

An adapter recognises a transformer layer by its modules (not by class names), reads its sizes
and patches it. `LayerPatch` keeps everything a patch replaced, so `restore` puts back the very
same modules and Parameters, with the original weight layout, also after a patch that failed half
way (a weight that is a view into a larger storage, has non-dense strides or shares its storage
with another of the model's tensors keeps that storage while patched, and its values go back
into it). The output and down projections' Parameters are laid out input-major in place while
patched (transposed strides, `LayerPatch.lay_out_input_major`), so that they still train; an
optimizer step pre-hook keeps fused optimizers' state in their layout. While patched,
`state_dict()` (and so `save_pretrained`) still gives the original model's keys and weights, and
`load_state_dict` is refused.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from doe_kernels.ops import HeadSelection, input_major


class UnsupportedModelError(ValueError):
    """The model's architecture (or a variant of it) is not one doe_kernels can patch."""


@dataclass(frozen=True)
class ModelSpec:
    """The sizes a mask must fit: per layer, `intermediate_size` neurons and `num_heads` heads
    (and, in a mixture-of-experts model, `num_experts` experts of which `top_k` run per token;
    `intermediate_size` is then one expert's)."""

    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 0
    top_k: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def has_modules(module: nn.Module, *paths: str) -> bool:
    """True when every dotted path names a submodule."""
    for path in paths:
        node = module
        for name in path.split("."):
            node = getattr(node, name, None)
            if not isinstance(node, nn.Module):
                return False
    return True


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def refuse_load_while_patched(module, *args) -> None:
    """A load_state_dict pre-hook: loading weights into a patched model is refused."""
    raise RuntimeError("load_state_dict on a model patched by doe_kernels: call "
                       "doe_kernels.unpatch(model) first (or load outside `plugged(...)`), then "
                       "load and patch again")


# Kept in a swapped-in module's __dict__ (module-level hooks read them: no reference cycles):
_ORIGINAL = "_doe_original"  # the module it replaced
_CONVERTED = "_doe_converted"  # [original Parameters laid out input-major in place]
_KEEP_VARS = "_doe_keep_vars"  # the keep_vars of the state_dict call in progress


def _note_keep_vars(module, prefix: str, keep_vars: bool) -> None:
    module.__dict__[_KEEP_VARS] = keep_vars


def _original_state(module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a swapped-in module: its entries become the original module's,
    a weight laid out input-major as a contiguous copy in its original layout (under
    keep_vars=True the Parameter itself, whose strides are transposed while patched)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", {})
    for key in [k for k in metadata if k.startswith(prefix)]:
        del metadata[key]
    original = module.__dict__[_ORIGINAL]
    keep_vars = module.__dict__.pop(_KEEP_VARS, False)
    original.state_dict(destination=state_dict, prefix=prefix, keep_vars=keep_vars)
    if keep_vars:
        return
    names = {}
    for name, param in original.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for holder in module.modules():
        for weight in holder.__dict__.get(_CONVERTED, ()):
            value = weight.detach().contiguous()
            for name in names.get(id(weight), ()):
                state_dict[prefix + name] = value


def _strided_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with `like`'s strides."""
    return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype,
                               device=t.device).copy_(t)


def _relayout(weight: nn.Parameter, data: torch.Tensor) -> None:
    """`weight.data = data` (same values, another layout), its gradient laid out alike; the
    weight of a model made under torch.inference_mode stays an inference tensor."""
    if weight.is_inference() and not data.is_inference():
        with torch.inference_mode():
            data = data.clone()
    weight.data = data
    if weight.grad is not None and weight.grad.stride() != data.stride():
        weight.grad = _strided_like(weight.grad, data)


def _match_layouts(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook (registered on import): in a fused parameter group
    (torch.optim's `fused=True`, transformers' default AdamW), the gradients and per-element
    state of a Parameter whose strides differ from theirs get the Parameter's. Fused kernels
    assume that they match and silently mix up elements otherwise, which a patch brings about:
    it lays the output and down projections out input-major in place, and restores them, under
    an optimizer that holds their state (also state saved while patched and loaded later)."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        for param in group["params"]:
            if param.grad is not None and param.grad.stride() != param.stride():
                param.grad = _strided_like(param.grad, param)
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                # plain tensors only (a quantized state subclass keeps its own layout)
                if (type(value) is torch.Tensor and value.shape == param.shape
                        and value.stride() != param.stride()):
                    state[key] = _strided_like(value, param)


register_optimizer_step_pre_hook(_match_layouts)


class LayerPatch:
    """The patch of one layer: the modules swapped in, the originals, and the converted weights."""

    def __init__(self, layer: nn.Module, shared_storages=frozenset()):
        self.layer = layer
        self.originals: dict[str, nn.Module] = {}
        # the storages (by address) other tensors of the model share: a weight in one keeps it
        self.shared_storages = shared_storages
        # Parameters laid out input-major in place (lay_out_input_major), until restore
        self.converted: list[nn.Parameter] = []
        self.strides: list[tuple] = []  # each converted weight's strides before the patch
        # each converted weight's data before the patch where it is to go back into that storage
        # (`_keeps_storage`), else None
        self.storages: list[torch.Tensor | None] = []
        self.ffn_modules: list[nn.Module] = []  # modules whose `kept` is the FFN index list
        self.head_modules: list[nn.Module] = []  # modules with set_selection(HeadSelection)
        self.head_cols: list[nn.Module] = []  # modules whose `kept` is the kept heads' columns
        self.moe_modules: list[nn.Module] = []  # modules with set_routing(MoePlan)
        # modules that take the expert's reconstruction (bias_delta, scales) of the FFN's down
        # projection, and of the attention output projection
        self.ffn_out: list[nn.Module] = []
        self.attn_out: list[nn.Module] = []
        # mixed-task batches: the modules that run a whole block per segment (`segments`), and the
        # ones they replace then (`passthrough`); empty in a layer that cannot serve them
        self.mixed_run: list[nn.Module] = []
        self.mixed_pass: list[nn.Module] = []

    def replace(self, path: str, module: nn.Module) -> None:
        """Put `module` at `path`; its state_dict shows the original module's weights."""
        original = self.layer.get_submodule(path)
        module.train(original.training)  # the model's mode: it decides dropout and router jitter
        module.__dict__[_ORIGINAL] = original  # not a submodule: kept out of the module tree
        module.register_state_dict_pre_hook(_note_keep_vars)
        module.register_state_dict_post_hook(_original_state)
        module.register_load_state_dict_pre_hook(refuse_load_while_patched)
        self.originals[path] = original
        set_submodule(self.layer, path, module)

    def lay_out_input_major(self, weight: nn.Parameter, make_module) -> nn.Module:
        """`make_module(weight)`, after laying the Parameter out input-major in place: its data
        becomes the transpose of a contiguous (..., in, out) copy (same Parameter, shape and
        values; one copy of the weight), so that the module reads `weight.transpose(-2, -1)`
        (contiguous: `ops.linear.input_major_view`) and gradients still reach the Parameter."""
        # its layout to restore: the strides it had where they lay it out densely (a transposed
        # weight), else contiguous; a weight that does not own its storage alone goes back there
        data = weight.detach()
        strides = torch.empty_like(data, device="meta",
                                   memory_format=torch.preserve_format).stride()
        storage = data if self._keeps_storage(data, strides) else None
        _relayout(weight, input_major(data).transpose(-2, -1))
        self.converted.append(weight)  # (once converted: a failed copy leaves nothing to undo)
        self.strides.append(strides)
        self.storages.append(storage)
        module = make_module(weight)
        module.__dict__.setdefault(_CONVERTED, []).append(weight)
        return module

    def _keeps_storage(self, data: torch.Tensor, dense_strides: tuple) -> bool:
        """Whether `data` (a weight's) is not a dense tensor owning its storage alone: a view into
        a larger storage (a flat parameter buffer), at an offset, with gaps between its elements,
        or sharing its storage with another of the model's tensors. Such a weight keeps its
        storage while patched (held here) and is copied back into it at restore."""
        storage = data.untyped_storage()
        return (data.stride() != dense_strides or data.storage_offset() != 0
                or storage.nbytes() != data.numel() * data.element_size()
                or storage.data_ptr() in self.shared_storages)

    def set(self, ffn_kept: torch.Tensor | None, heads: HeadSelection, moe=None,
            ffn_delta: torch.Tensor | None = None, attn_delta: torch.Tensor | None = None,
            ffn_scales: torch.Tensor | None = None, head_col_scales: torch.Tensor | None = None,
            ) -> None:
        """Point the patched modules at an expert's indices (None: every neuron kept), in a
        mixture-of-experts layer at its routing plan (kept experts, skip threshold), and at its
        bias deltas and scales (None: none; scales one per kept neuron, and one per column of
        the kept heads), on the model's device and in its dtype."""
        if (ffn_delta is not None or ffn_scales is not None) and not self.ffn_out:
            raise ValueError("this layer takes no FFN bias delta or scales (mixture-of-experts "
                             "block)")
        for module in self.moe_modules:
            module.set_routing(moe)
        for module in self.ffn_modules:
            module.kept = ffn_kept
        for module in self.head_modules:
            module.set_selection(heads)
        for module in self.head_cols:
            module.kept = None if heads.is_full else heads.q_rows
        for module in self.ffn_out:
            module.bias_delta, module.scales = ffn_delta, ffn_scales
        for module in self.attn_out:
            module.bias_delta, module.scales = attn_delta, head_col_scales

    def set_segments(self, segments) -> None:
        """Serve a mixed batch (a models.segments.LayerSegments), or one expert again (None)."""
        for module in self.mixed_run:
            module.segments = segments
        for module in self.mixed_pass:
            module.passthrough = segments is not None

    def restore(self) -> None:
        """Put the original modules back, and the converted weights in their original layout
        (strides). A module whose replacement's train/eval mode differs from its own (set while
        patched: model.train()/eval() did not reach it outside the module tree) gets that mode,
        its submodules too; otherwise its submodules keep the modes they had. The modules go
        back first: a weight whose copy back fails (out of memory) keeps its values in the
        input-major layout, which the original module reads as well, and the others are still
        restored before the first such error is raised. A weight that kept its storage
        (`_keeps_storage`) gets its values copied back into it, and that storage back."""
        for path, module in self.originals.items():
            training = self.layer.get_submodule(path).training
            if training != module.training:
                module.train(training)
            set_submodule(self.layer, path, module)
        failed = None
        for weight, strides, storage in zip(self.converted, self.strides, self.storages):
            data = weight.detach()
            if storage is not None and (storage.dtype, storage.device) != (data.dtype,
                                                                         data.device):
                storage = None  # (converted since: patching's _checked_apply drops it too)
            if storage is None and data.stride() == strides:
                continue
            try:
                if storage is None:
                    storage = torch.empty_strided(data.shape, strides, dtype=data.dtype,
                                                  device=data.device)
                _copy_into(storage, data)
                _relayout(weight, storage)
            except Exception as error:  # noqa: BLE001 (raised once every layer is back)
                failed = failed or error
        self.converted.clear()
        self.strides.clear()
        self.storages.clear()
        if failed is not None:
            raise failed


def _copy_into(target: torch.Tensor, values: torch.Tensor) -> None:
    """`target.copy_(values)`, also into an inference tensor (a model made under
    torch.inference_mode), which only inference mode may change in place."""
    if target.is_inference():
        with torch.inference_mode():
            target.copy_(values)
    else:
        target.copy_(values)
