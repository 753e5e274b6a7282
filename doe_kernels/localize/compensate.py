"""Bias compensation (FLAP, An et al. 2023): give back, as a bias, what the pruned units added on
average.

A pruned FFN neuron (or attention head) no longer adds its column of the down projection (or its
columns of the attention output projection) times its activation to the layer's output. Over task
data that contribution has a mean; adding that mean back as a constant bias keeps the layer's
output right on average, which is what FLAP found keeps pruned models usable without retraining.

For layer l, with h the input of the down projection (the FFN neurons' activations) and a the
input of the attention output projection (the heads' outputs, concatenated), averaged over the
real tokens (attention_mask) of the calibration batches on the *unpruned* model:

    ffn_bias[l]  = W_down[:, pruned neurons] @ mean(h)[pruned neurons]
    attn_bias[l] = W_o[:, pruned heads' columns] @ mean(a)[pruned heads' columns]

The deltas belong to the expert (`ExpertMask.ffn_bias` / `attn_bias`, saved with it); the shared
weights are never changed: a patched model adds them to the down and attention output projections'
outputs, and unpatching restores the model bitwise. On the calibration data, the patched layer's
mean output then equals the unpruned layer's for the first pruned layer (whose inputs are the
unpruned model's); deeper layers see inputs already changed by pruning, so compensation there is
an approximation, as in FLAP.

Mixture-of-experts models: only the attention deltas are computed (an FFN delta is not supported
on a MoE block). Layers that prune nothing get no delta (the same as a delta of zeros).
"""
import torch
from torch import nn

from doe_kernels.localize.attribution import projection_points
from doe_kernels.localize.recover import keep_vector
from doe_kernels.mask import ExpertMask
from doe_kernels.patching import is_patched


def _pruned(table, layer: int, size: int, repeat: int = 1) -> torch.Tensor:
    """The input columns (`repeat` per unit) of the units the table prunes in `layer`."""
    if layer not in table:
        return torch.empty(0, dtype=torch.long)
    return torch.nonzero(~keep_vector(table[layer], size, repeat)).reshape(-1)


@torch.no_grad()
def bias_compensation(model: nn.Module, mask: ExpertMask, batches) -> ExpertMask:
    """`mask` with the bias deltas that compensate its pruned neurons and heads (replacing any it
    held), fitted on `batches`.

    model: an unpatched supported model (BERT family, LLaMA family, Mixtral: attention only).
    batches: an iterable of keyword dicts for `model(**batch)` (input_ids or inputs_embeds, e.g. a
    prompt-tuned expert's soft prompt already prepended, and attention_mask, (batch, seq), whose
    zeros mark padding left out of the means); tensors are moved to the model's device.
    The model runs in eval mode under no_grad, with forward pre-hooks on the projections, and is
    left exactly as it was (hooks removed, train/eval modes restored).
    """
    if not isinstance(mask, ExpertMask):
        raise TypeError(f"mask must be a doe_kernels.ExpertMask, got {type(mask).__name__}")
    if is_patched(model):
        raise ValueError("bias_compensation runs on the unpruned model: doe_kernels.unpatch(model) "
                         "first (or fit outside `plugged(...)`)")
    points, spec = projection_points(model)
    mask.check_spec(spec)
    targets = []  # (table, layer, projection, its pruned input columns)
    for index, (down, o_proj) in enumerate(points):
        neurons = _pruned(mask.ffn, index, spec.intermediate_size)
        if down is not None and neurons.numel():
            targets.append(("ffn_bias", index, down, neurons))
        head_cols = _pruned(mask.heads, index, spec.num_heads, spec.head_dim)
        if head_cols.numel():
            targets.append(("attn_bias", index, o_proj, head_cols))
    deltas = {"ffn_bias": {}, "attn_bias": {}}
    if targets:
        means = _input_means(model, [(module, cols) for _, _, module, cols in targets], batches)
        for (table, index, module, cols), mean in zip(targets, means):
            weight = module.weight.detach().to(torch.float64)
            deltas[table][index] = (weight[:, cols.to(weight.device)] @ mean).float().cpu()
    return mask.with_bias(ffn_bias=deltas["ffn_bias"], attn_bias=deltas["attn_bias"])


def _input_means(model: nn.Module, targets, batches) -> list[torch.Tensor]:
    """Per (module, columns): the mean over real tokens of those columns of the module's input,
    float64 on the model's device."""
    device = next(model.parameters()).device
    sums = [torch.zeros(cols.numel(), dtype=torch.float64, device=device) for _, cols in targets]
    counts = [0] * len(targets)
    keep = [None]  # the current batch's real tokens, flattened

    def hook_for(i, cols):
        cols = cols.to(device)

        def hook(module, args):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if keep[0] is not None:
                if keep[0].numel() != rows.shape[0]:
                    raise ValueError(f"the batch's attention_mask covers {keep[0].numel()} tokens, "
                                     f"but the projection sees {rows.shape[0]}; pass a (batch, "
                                     "seq) attention_mask matching the model's input")
                rows = rows[keep[0]]
            sums[i] += rows[:, cols].to(torch.float64).sum(0)
            counts[i] += rows.shape[0]
        return hook

    modes = [(module, module.training) for module in model.modules()]
    handles = [module.register_forward_pre_hook(hook_for(i, cols))
               for i, (module, cols) in enumerate(targets)]
    try:
        model.eval()
        for batch in batches:
            if not isinstance(batch, dict):
                raise TypeError(f"batches must be keyword dicts for model(**batch), got "
                                f"{type(batch).__name__}")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            attention = batch.get("attention_mask")
            keep[0] = None if attention is None else attention.reshape(-1).bool()
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if min(counts) == 0:
        raise ValueError("the calibration batches hold no real token (empty, or all padding)")
    return [total / count for total, count in zip(sums, counts)]
