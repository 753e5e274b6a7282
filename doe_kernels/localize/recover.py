"""Recovery tuning: re-train an expert's soft prompt (and head) on its own pruned network.

Pruning moves the activations the prompt was tuned for; a short second round of prompt tuning on
the pruned network (`retune`, its learning rate decayed linearly to zero by default) wins back
most of what pruning cost (docs/localize.md). The pruned network is built on the unpatched model
from torch's own modules. `masked` emulates it with forward pre-hooks that zero the pruned units'
activations (the inputs of the down and attention-output projections, the same points
attribution reads), which is what the patched kernels compute, at the dense model's cost.
`sliced`, which `retune` trains through, computes the same with the FFN's projections swapped for
copies of their kept rows and columns (the scales folded into the down projection's columns, the
bias delta into its bias), so that an epoch costs what the pruned FFN costs; heads stay emulated.
The retuned expert is evaluated (and served) through `patch` as any other. `retune(vectors_lr=)`
also trains the mask's FFN scales and bias deltas with the prompt (`TrainedDown`); measured, it
does not beat the least-squares fit they start from (docs/results.md), so `localize` keeps the fit.
"""
import contextlib

import torch
from torch import nn

from doe_kernels.caller_state import evaluating, in_own_modes, seeded
from doe_kernels.expert import Expert
from doe_kernels.localize.attribution import check_unpatched, hook_points
from doe_kernels.localize.prompt import check_choices, extract, fit, unwrap, wrap
from doe_kernels.mask import ExpertMask
from doe_kernels.models import describe


def input_factors(kept, size: int, scales=None, repeat: int = 1) -> torch.Tensor:
    """Per input column of a projection: 0 for a pruned unit's, the unit's scale (1 when `scales`
    is None) for a kept unit's; each unit spans `repeat` columns."""
    factors = torch.zeros(size, dtype=torch.float32)
    kept = torch.as_tensor(kept, dtype=torch.long)
    factors[kept] = 1.0 if scales is None else scales.float()
    return factors.repeat_interleave(repeat)


@contextlib.contextmanager
def masked(model, mask):
    """While the body runs, the unpatched `model` computes as if `mask` were plugged: pruned FFN
    neurons and attention heads contribute zero and kept ones their scale times their activation
    (multiplied in the graph, so gradients flow to everything else), and the mask's bias deltas
    are added to the down and attention output projections' outputs."""
    points, spec = hook_points(model)
    mask.validate(model)
    handles = []

    def scale(factors):
        def hook(module, args):
            x = args[0]
            return (x * factors.to(x.device, x.dtype),) + tuple(args[1:])
        return hook

    def shift(delta):
        return lambda module, args, out: out + delta.to(out.device, out.dtype)

    try:
        for layer, (ffn_module, head_module) in enumerate(points):
            for module, index, scales, bias, size, repeat in (
                    (ffn_module, mask.ffn, mask.ffn_scales, mask.ffn_bias,
                     spec.intermediate_size, 1),
                    (head_module, mask.heads, mask.head_scales, mask.attn_bias,
                     spec.num_heads, spec.head_dim)):
                if layer in index or layer in scales:
                    kept = index[layer] if layer in index else torch.arange(size)
                    factors = input_factors(kept, size, scales.get(layer), repeat)
                    handles.append(module.register_forward_pre_hook(scale(factors)))
                if layer in bias:
                    handles.append(module.register_forward_hook(shift(bias[layer])))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def sliced(model, mask, trained_vectors: bool = False):
    """`masked`'s network at the pruned FFN's cost: while the body runs, each FFN projection of a
    layer the mask prunes (or scales, or shifts) is replaced by a frozen copy of its kept
    neurons' rows (the input projections) or columns (the down projection, times the kept
    neurons' scales, its bias plus the mask's bias delta); the heads are emulated by `masked`.
    The model's own modules are put back afterwards, unchanged. With `trained_vectors`, the down
    projection of each layer the mask prunes is a `TrainedDown` instead, whose scales and bias
    delta are parameters (starting at the mask's, or at 1 and 0); the context yields
    {layer: TrainedDown} (else {})."""
    check_unpatched(model)
    mask.validate(model)
    ffn_tables = ("ffn", "ffn_scales", "ffn_bias")
    heads_only = mask.replace(**{name: {} for name in ffn_tables})
    adapter, layers, _ = describe(model)
    swapped, trained = [], {}
    with masked(model, heads_only):  # refuses models attribution does not support (MoE)
        try:
            for number, layer in enumerate(layers):
                if not any(number in getattr(mask, name) for name in ffn_tables):
                    continue
                kept = mask.ffn.get(number)
                copies = {path: _slice(layer.get_submodule(path), rows=kept)
                          for path in adapter.FFN_INPUTS}
                down = layer.get_submodule(adapter.FFN_DOWN)
                if trained_vectors and kept is not None:
                    copies[adapter.FFN_DOWN] = trained[number] = TrainedDown(
                        _slice(down, cols=kept), mask.ffn_scales.get(number),
                        mask.ffn_bias.get(number))
                else:
                    copies[adapter.FFN_DOWN] = _slice(
                        down, cols=kept, col_scales=mask.ffn_scales.get(number),
                        bias_delta=mask.ffn_bias.get(number))
                for path, copy in copies.items():
                    parent, _, name = path.rpartition(".")
                    parent = layer.get_submodule(parent)
                    swapped.append((parent, name, getattr(parent, name)))
                    setattr(parent, name, copy)
            yield trained
        finally:
            for parent, name, original in reversed(swapped):
                setattr(parent, name, original)


def _slice(linear: nn.Linear, rows=None, cols=None, col_scales=None, bias_delta=None) -> nn.Linear:
    """A frozen nn.Linear holding `linear`'s weight rows `rows` (and bias entries) or columns
    `cols` (None: all) times `col_scales`, its bias plus `bias_delta`."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        rows = rows.to(weight.device)
        weight, bias = weight[rows], (None if bias is None else bias[rows])
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    if col_scales is not None:
        weight = weight * col_scales.to(weight.device, weight.dtype)
    if bias_delta is not None:
        delta = bias_delta.to(weight.device, weight.dtype)
        bias = delta if bias is None else bias + delta
    copy = nn.Linear(1, 1, bias=False, device="meta")  # no initialisation to pay for
    copy.in_features, copy.out_features = weight.shape[1], weight.shape[0]
    copy.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        copy.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return copy


class TrainedDown(nn.Module):
    """A pruned layer's down projection (`linear`: its kept columns, frozen) with the kept
    neurons' scales and the bias delta as parameters: linear(h * scales) + bias_delta, what the
    patched kernels compute with the mask's vectors. `scales`/`bias_delta`: the starting values
    (None: 1 and 0)."""

    def __init__(self, linear: nn.Linear, scales=None, bias_delta=None):
        super().__init__()
        self.linear = linear
        weight = linear.weight
        self.scales = nn.Parameter(
            torch.ones(linear.in_features, device=weight.device) if scales is None
            else scales.detach().to(weight.device, torch.float32).clone())
        self.bias_delta = nn.Parameter(
            torch.zeros(linear.out_features, device=weight.device) if bias_delta is None
            else bias_delta.detach().to(weight.device, torch.float32).clone())

    def forward(self, hidden):
        out = self.linear(hidden * self.scales.to(hidden.dtype))
        return out + self.bias_delta.to(out.dtype)


def trained_mask(mask, trained: dict):
    """`mask` with the scales and bias deltas of `trained` ({layer: TrainedDown}) in place of
    its own for those layers (float32 CPU)."""
    if not trained:
        return mask
    vectors = {name: {layer: getattr(module, name).detach().float().cpu().clone()
                      for layer, module in trained.items()}
               for name in ("scales", "bias_delta")}
    return mask.replace(ffn_scales={**mask.ffn_scales, **vectors["scales"]},
                        ffn_bias={**mask.ffn_bias, **vectors["bias_delta"]})


class TrainingDiverged(ValueError):
    """Recovery training ended with a non-finite soft prompt or head."""


def _check_finite(prompt, head, lr: float, vectors=()) -> None:
    tensors = [prompt] + list((head or {}).values()) + list(vectors)
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise TrainingDiverged(f"recovery training diverged (the prompt, head or reconstruction "
                               f"vectors hold NaN or inf) at lr={lr:g}; try a lower recover_lr")


@in_own_modes
def retune(model, tokenizer, expert: Expert, data, epochs: int = 1, lr: float = 3e-2,
           head_lr: float = 1e-2, batch_size: int = 16, seed: int = 0,
           progress: bool = True, teacher: torch.Tensor | None = None,
           schedule: str = "linear", vectors_lr: float | None = None,
           precision: str = "auto", batching: str = "shuffled") -> tuple[Expert, list]:
    """(a new Expert with the same mask and a prompt and head trained for `epochs` more on
    `data` through the pruned network, the mean training loss of each epoch). Starts from the
    expert's own prompt and head; `model` (unpatched) is left as it was. A dense expert (mask
    None) is trained on the whole network: the baseline given the same extra training.
    `teacher`: (len(data), num_labels) label logits to distil (KL divergence from their softmax,
    e.g. the unpruned prompt-tuned expert's, `Expert.predict_logits`) instead of the labels.
    `schedule`: the learning rate decayed linearly to zero over the steps ("linear"), or held
    ("constant"; one epoch at a constant lr lands the prompt wherever Adam's last steps took it).
    `vectors_lr`: also train the FFN reconstruction vectors of the layers the mask prunes (the
    kept neurons' scales and the bias delta, `TrainedDown`) at this learning rate; the new
    Expert's mask holds them (None: the mask is kept as it is). `precision`, `batching`: as
    `fit`'s."""
    check_unpatched(model)
    if vectors_lr is not None and not vectors_lr > 0:
        raise ValueError(f"vectors_lr must be > 0 or None, got {vectors_lr}")
    if teacher is not None and tuple(teacher.shape) != (len(data), len(expert.label_names)):
        raise ValueError(f"teacher has shape {tuple(teacher.shape)}; it must hold one logit per "
                         f"label for each example: ({len(data)}, {len(expert.label_names)})")
    check_choices(schedule=schedule, precision=precision, batching=batching)
    targets = None if teacher is None else torch.softmax(teacher.float(), dim=-1)
    mask = ExpertMask() if expert.mask is None else expert.mask
    device = model.get_input_embeddings().weight.device
    with (evaluating(model), seeded(seed, device), expert.plugged(model, prune=False),
          sliced(model, mask, trained_vectors=vectors_lr is not None) as trained):
        peft_model = wrap(model, expert.task_type, expert.num_virtual_tokens, seed=seed)
        try:  # PEFT copied the plugged head into its trainable copy; the prompt is set here
            weight = peft_model.prompt_encoder["default"].embedding.weight
            with torch.no_grad():
                weight.copy_(expert.prompt.to(weight.device, weight.dtype))
            vectors = [p.requires_grad_() for module in trained.values()
                       for p in (module.scales, module.bias_delta)]
            losses = fit(peft_model, tokenizer, data, expert.task_type, expert.label_token_ids,
                         expert.template, epochs, lr, head_lr, batch_size, expert.max_length,
                         seed, progress, targets, schedule,
                         [dict(params=vectors, lr=vectors_lr)] if vectors else None,
                         precision, batching)
            prompt, head = extract(peft_model)
            mask = trained_mask(mask, trained)
        finally:
            unwrap(peft_model)
    _check_finite(prompt, head, lr, list(mask.ffn_scales.values()) + list(mask.ffn_bias.values()))
    retuned = Expert(None if expert.mask is None else mask, prompt, expert.task_type,
                     expert.label_names, label_words=expert.label_words,
                     label_token_ids=expert.label_token_ids, template=expert.template, head=head, sizes=expert.sizes, name=expert.name,
                     max_length=expert.max_length)
    retuned.figures = dict(expert.figures)
    return retuned, losses
