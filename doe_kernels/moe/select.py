"""Expert pruning (Lu et al. 2024): per MoE layer, keep the subset of experts whose layer output is
closest (Frobenius norm) to the unpruned layer's on calibration tokens.

Layer by layer, every subset of the requested size is scored; the layer's inputs come either from
the unpruned model (`inputs="original"`) or from the model with the earlier layers already pruned
(`inputs="pruned"`). With original inputs, the layers are captured in groups whose inputs fit
`memory_budget` bytes (one forward pass per group); with pruned inputs, one layer at a time (each
layer's inputs depend on the choices before it). Expert outputs are computed in chunks of tokens.
"""
import itertools
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from doe_kernels.expert import check_count
from doe_kernels.mask import ExpertMask
from doe_kernels.models import spec_of
from doe_kernels.models.moe_block import expert_ffn, route
from doe_kernels.moe.calibration import batches, capture_inputs
from doe_kernels.patching import moe_blocks, plugged

MAX_SUBSETS = 20000


def select_experts(model, calibration, keep, inputs: str = "original", mask: ExpertMask | None = None,
                   chunk_tokens: int = 1024, memory_budget: int = 2 << 30,
                   progress: bool = True) -> ExpertMask:
    """An ExpertMask keeping `keep` experts per MoE layer (an int, or {layer: count}).

    `calibration`: token ids (batch, seq), a list of such tensors, or a list of dicts with
    `input_ids` and `attention_mask` (padding is left out); generic text gives a task-agnostic
    expert set, a task's data a task-specific one. `mask`: neurons/heads to keep as well; the
    result combines them with the chosen experts. The mask's own MoE entries stand in the layers
    `keep` leaves whole; in a layer it prunes, the chosen subset (of all the layer's experts)
    replaces the entry. The model is left as it was. The calibration data is read once, before
    any pass (a generator is taken: the selection runs several passes over it); `chunk_tokens`
    (tokens per chunk of expert outputs) and `memory_budget` (bytes of captured layer inputs per
    pass, with original inputs) must be ints >= 1; each calibration batch is checked (token ids
    within the model's vocabulary, an attention_mask of their shape holding 0 and 1) first.
    """
    if inputs not in ("original", "pruned"):
        raise ValueError(f"inputs must be 'original' or 'pruned', got {inputs!r}")
    check_count("chunk_tokens", chunk_tokens)
    memory_budget = check_count("memory_budget", memory_budget, " (bytes)")
    spec = spec_of(model)
    if not spec.num_experts:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts layers")
    counts = _counts(keep, spec)
    if mask is not None and not isinstance(mask, ExpertMask):
        raise TypeError(f"mask must be an ExpertMask or None, got {type(mask).__name__}")
    base = mask if mask is not None else ExpertMask(spec=spec.as_dict())
    base.check_spec(spec)
    calibration = batches(calibration, model)  # (a list: every pass reads it again)
    chosen = dict(base.moe)
    layers = [l for l in range(spec.num_layers) if counts[l] < spec.num_experts]
    selected = list(layers)
    group = 1
    with tqdm(total=len(layers), desc="selecting experts", disable=not progress) as bar:
        while layers:
            current = base.replace(moe=chosen if inputs == "pruned" else base.moe)
            todo, layers = layers[:group], layers[group:]
            with plugged(model, current):
                patched = moe_blocks(model)
                blocks = [patched[l] for l in todo]
                captured = capture_inputs(model, blocks, calibration)
                for layer, block, x in zip(todo, blocks, captured):
                    if not x.shape[0]:
                        raise ValueError(f"MoE layer {layer} received no calibration token (all "
                                         "padding?)")
                    errors = _subset_errors(block, x, counts[layer], chunk_tokens)
                    chosen[layer] = torch.tensor(min(errors, key=errors.get))
                    bar.update(1)
            if inputs == "original":  # as many layers per pass as the budget holds
                group = max(1, memory_budget // max(1, captured[0].numel()
                                                    * captured[0].element_size()))
            del captured
    # skipping thresholds were measured among the layer's old experts: dropped where they change
    skip = {l: beta for l, beta in base.skip.items() if l not in selected}
    return base.replace(spec.as_dict(), moe=chosen, skip=skip)


def _counts(keep, spec) -> dict:
    counts = keep if isinstance(keep, dict) else {l: keep for l in range(spec.num_layers)}
    unknown = sorted(set(counts) - set(range(spec.num_layers)), key=str)
    if unknown:
        raise ValueError(f"keep names layers {unknown}, but the model has {spec.num_layers} layers")
    out = {}
    for layer in range(spec.num_layers):
        count = counts.get(layer, spec.num_experts)
        if (not isinstance(count, int) or isinstance(count, bool)
                or not spec.top_k <= count <= spec.num_experts):
            raise ValueError(f"keep for layer {layer} must be an int between the model's top-k "
                             f"({spec.top_k}) and its {spec.num_experts} experts, got {count!r}")
        subsets = math.comb(spec.num_experts, count)
        if subsets > MAX_SUBSETS:
            raise ValueError(f"keeping {count} of {spec.num_experts} experts means {subsets} subsets "
                             f"to score per layer (more than {MAX_SUBSETS})")
        out[layer] = count
    return out


@torch.no_grad()
def _subset_errors(block, x: torch.Tensor, count: int, chunk_tokens: int) -> dict:
    """{subset (tuple of experts): squared Frobenius distance to the full layer output}."""
    num_experts, two_i, _ = block.gate_up.shape
    subsets = list(itertools.combinations(range(num_experts), count))
    kept = [torch.tensor(s, device=x.device) for s in subsets]
    errors = torch.zeros(len(subsets), dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_tokens):
        rows = x[start:start + chunk_tokens]
        logits = F.linear(rows, block.router_weight)
        outputs = torch.stack([expert_ffn(rows, block.gate_up[e], block.down_t[e], two_i // 2,
                                           block.kept, block.backend).float()
                               for e in range(num_experts)], 1)  # (tokens, experts, hidden)
        full = _combine(outputs, *route(logits, block.top_k, None, block.normalize))
        for i, subset in enumerate(kept):
            pruned = _combine(outputs, *route(logits, block.top_k, subset, block.normalize))
            errors[i] += float(((pruned - full) ** 2).sum())
    return dict(zip(subsets, errors.tolist()))


def _combine(outputs, weights, experts):
    dense = weights.new_zeros(outputs.shape[:2]).scatter_(1, experts, weights)
    return torch.einsum("te,teh->th", dense, outputs)
