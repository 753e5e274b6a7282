"""Dynamic skipping thresholds (Lu et al. 2024): per MoE layer, beta = the median over calibration
tokens of (second-highest routing weight / highest), the lower of the two middle values for an even
count (torch.median). At inference, with `dynamic_skip=True`, a
token whose ratio is below beta runs only its top expert (for top-k > 2, each non-top expert whose
weight is below beta times the top one's is skipped)."""
import torch
import torch.nn.functional as F

from doe_kernels.mask import ExpertMask
from doe_kernels.models import spec_of
from doe_kernels.models.moe_block import route
from doe_kernels.moe.calibration import batches, feed
from doe_kernels.patching import moe_blocks, plugged


@torch.no_grad()
def skip_thresholds(model, calibration, mask: ExpertMask | None = None) -> dict:
    """{layer: beta}, with routing among `mask`'s kept experts (all when None); pass the result
    to `mask.with_skip`. One forward pass over the calibration batches (read, and checked, before
    the model is patched); the model is left as it was."""
    spec = spec_of(model)
    if not spec.num_experts or spec.top_k < 2:
        raise ValueError("dynamic skipping needs a mixture-of-experts model with top-k >= 2")
    calibration = batches(calibration, model)
    ratios = {l: [] for l in range(spec.num_layers)}

    def record(layer, block, x):
        weights, _ = route(F.linear(x, block.router_weight), block.top_k, block.plan.kept,
                           block.normalize)
        ratios[layer].append((weights[:, 1] / weights[:, 0]).cpu())

    with plugged(model, mask if mask is not None else ExpertMask()):
        feed(model, moe_blocks(model), calibration, record)
    empty = [l for l, r in ratios.items() if not sum(len(part) for part in r)]
    if empty:
        raise ValueError(f"MoE layers {empty} received no calibration token (all padding?)")
    return {l: float(torch.cat(r).median()) for l, r in ratios.items()}
