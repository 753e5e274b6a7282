"""Calibration batches, and running a model over them while recording what given modules receive
(optionally stopping after the last of them, so later layers are not run)."""
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from doe_kernels.caller_state import evaluating


def batches(calibration, model: nn.Module | None = None):
    """Model keyword batches, as a list (a one-shot iterable such as a generator is read once
    here: callers that run several passes call this first), from a (batch, seq) tensor of token
    ids, a dict (`input_ids`, optional `attention_mask`), or a list or other iterable of either.
    Anything else, or no batch at all, is refused; so is a batch whose ids or attention mask
    the model cannot take (see `check_batch`; ids against `model`'s vocabulary when given)."""
    if isinstance(calibration, (torch.Tensor, Mapping)):  # (a tokenizer's BatchEncoding too)
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError("calibration must be token ids, a dict with input_ids, or a list of "
                        f"either, got {type(calibration).__name__}")
    vocab = None if model is None else vocab_size(model)
    out = []
    for index, batch in enumerate(calibration):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("calibration batches must be token-id tensors or dicts with input_ids")
        check_batch(index, batch, vocab)
        if batch["input_ids"].dim() == 1:
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
        out.append(batch)
    if not out:
        raise ValueError("calibration data is empty")
    return out


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids `model` embeds: its input embedding's rows (its config's
    vocab_size where it has no such embedding), None when neither is known."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_batch(index: int, batch: Mapping, vocab: int | None) -> None:
    """Refuse calibration batch `index` unless its input_ids are an int64 or int32 tensor of one
    (seq) or two (batch, seq) dims, not empty, with values in [0, vocab) (when known), and its
    attention_mask (if any) a tensor of the ids' shape holding only 0 and 1."""
    where = f"calibration batch {index}"
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{where}: input_ids must be an int64 or int32 tensor of token ids, "
                        f"got {got}")
    if ids.dim() not in (1, 2) or not ids.numel():
        raise ValueError(f"{where}: input_ids must be a non-empty (batch, seq) or (seq,) tensor, "
                         f"got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        top = "vocab_size" if vocab is None else vocab
        raise ValueError(f"{where}: input_ids must lie in [0, {top}) (the model's vocabulary), "
                         f"got values from {low} to {high}")
    mask = batch.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: attention_mask must be a tensor, got {type(mask).__name__}")
    if mask.shape != ids.shape:
        raise ValueError(f"{where}: attention_mask has shape {tuple(mask.shape)} but input_ids "
                         f"{tuple(ids.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{where}: attention_mask must hold only 0 (padding) and 1 (token)")


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
            for batch in batches(calibration, model):
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
