"""Calibration batches, and running a model over them while recording what given modules receive
(optionally stopping after the last of them, so later layers are not run)."""
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from doe_kernels.caller_state import evaluating


def batches(calibration):
    """Model keyword batches, as a list (a one-shot iterable such as a generator is read once
    here: callers that run several passes call this first), from a (batch, seq) tensor of token
    ids, a dict (`input_ids`, optional `attention_mask`), or a list or other iterable of either.
    Anything else, or no batch at all, is refused."""
    if isinstance(calibration, (torch.Tensor, Mapping)):  # (a tokenizer's BatchEncoding too)
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError("calibration must be token ids, a dict with input_ids, or a list of "
                        f"either, got {type(calibration).__name__}")
    out = []
    for batch in calibration:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("calibration batches must be token-id tensors or dicts with input_ids")
        ids = batch["input_ids"]
        if ids.dim() == 1:
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
        out.append(batch)
    if not out:
        raise ValueError("calibration data is empty")
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def feed(model: nn.Module, modules: list[nn.Module], calibration, record,
         stop_after_last: bool = False) -> None:
    """Run `model` over the calibration batches; `record(index, module, rows)` receives each
    module's input as rows (tokens, hidden), padding removed, the model in eval mode. With
    `stop_after_last`, each pass stops at the last of `modules` (in the model's order): later
    layers are not run."""
    keep = [None]

    def hook_for(index):
        def hook(module, args):
            hidden = args[0].reshape(-1, args[0].shape[-1])
            record(index, module, hidden if keep[0] is None else hidden[keep[0]])
            if stop_after_last and index == len(modules) - 1:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        device = next(model.parameters()).device
        with evaluating(model):  # no dropout or router jitter in what is recorded
            for batch in batches(calibration):
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                keep[0] = None if mask is None else mask.reshape(-1).bool()
                try:
                    model(**batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def capture_inputs(model: nn.Module, modules: list[nn.Module], calibration,
                   to_cpu: bool = False) -> list[torch.Tensor]:
    """For each module, the rows it receives over the calibration batches (see `feed`); the
    passes stop at the last module."""
    rows = [[] for _ in modules]
    feed(model, modules, calibration,
         lambda i, _, x: rows[i].append(x.float().cpu() if to_cpu else x), stop_after_last=True)
    return [torch.cat(r) for r in rows]
