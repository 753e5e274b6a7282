"""Reconstruction of pruned layers without changing the shared weights: bias compensation (FLAP,
An et al. 2023) and least-squares scales of the kept units (Kwon et al. 2022's mask tuning).

A pruned FFN neuron j no longer adds its contribution h_j * W_down[:, j] to the layer's output
(h: the input of the down projection); an attention head k no longer adds a_k @ W_o[:, cols_k].T
(a: the input of the attention output projection, cols_k: the head's head_dim columns). Over task
data, on the *unpruned* model, reconstruction fits per pruned layer

    scales s (one per kept unit) and a bias delta b minimising
        E || sum_{kept i} s_i c_i + b  -  sum_{all j} c_j ||^2       (c: unit contributions)

over the real tokens (attention_mask) of the calibration batches, each weighted by the batch's
`token_weights` if it has them (e.g. the token a classifier reads its answer from weighted as
much as all the others of its example, `Expert.calibration_batches(readout_weight=1)`): with the
centred Gram matrix G[i, j] = E[(c_i - mean c_i) . (c_j - mean c_j)], s solves
(G[K, K] + r I) s = G[K, :] 1 + r 1 (a ridge r pulling s towards 1: `ridge` times the mean
diagonal of G[K, K]), and b = sum_j mean c_j - sum_i s_i mean c_i. With s fixed to 1
(`scales=False`), b is FLAP's bias: the pruned units' mean contribution; without a bias
(`bias=False`) G is the uncentred second moment. The FFN Gram needs no per-token contributions:
G = E[h_i h_j] (W_i . W_j), from the activations' second moments. `Calibration.collect` gathers
the moments once; `Calibration.fit(mask)` solves for any mask (`reconstruction` does both).

The result belongs to the expert (`ExpertMask.ffn_bias`/`attn_bias`/`ffn_scales`/`head_scales`,
saved with it); the shared weights are never changed: a patched model applies it in the down and
attention output projections, and unpatching restores the model bitwise. Each layer is fitted on
the unpruned model's inputs to it, so the first pruned layer is reconstructed as well as least
squares allows; deeper layers see inputs already changed by pruning, an approximation, as in FLAP
and Kwon et al.

Mixture-of-experts models: attention only (FFN deltas and scales are not supported on a MoE
block). Layers that prune nothing get neither (the same as a delta of zeros and scales of ones).
"""
import torch
from torch import nn

from doe_kernels.caller_state import evaluating, unchunked
from doe_kernels.localize.attribution import projection_points
from doe_kernels.mask import ExpertMask

# (an iterable read twice, such as calibration_batches' generator, is empty the second time)
NO_TOKENS = ("the calibration batches hold no real token (none given, such as a generator "
             "already read, or all padding)")


class _FfnStats:
    """Running sums over tokens of one layer's FFN activations h (the down projection's input):
    the count, sum h and (`second`) h^T h in float64, and the down projection's weight (a copy: a
    patched model empties it)."""

    def __init__(self, down: nn.Module, size: int, device, second: bool):
        self.weight = down.weight.detach().clone()
        self.count = 0
        self.total = torch.zeros(size, dtype=torch.float64, device=device)
        self.second = (torch.zeros(size, size, dtype=torch.float64, device=device) if second
                       else None)

    def add(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        h = rows.to(torch.float64)
        weighted = h * weights[:, None]
        self.count += float(weights.sum())
        self.total += weighted.sum(0)
        if self.second is not None:
            self.second += h.T @ weighted

    def means(self) -> torch.Tensor:
        """The neurons' mean contributions, (hidden, neurons)."""
        return self.weight.to(torch.float64) * (self.total / self.count)

    def gram_rows(self, kept: torch.Tensor, centred: bool) -> torch.Tensor:
        """G[kept, :] of the neurons' contributions: E[h_i h_j] (W_i . W_j), centred or not."""
        w = self.weight.to(torch.float64)
        kept = kept.to(w.device)
        second = self.second[kept] / self.count
        if centred:
            mean = self.total / self.count
            second = second - mean[kept, None] * mean[None, :]
        return second * (w[:, kept].T @ w)


class _HeadStats:
    """Running sums over tokens of one layer's heads' outputs a (the attention output projection's
    input): the count, sum a, and (`second`) the Gram matrix of the heads' contributions
    c_k = a_k @ W_o[:, cols_k].T, in float64, computed `CHUNK` tokens at a time."""

    CHUNK = 1024

    def __init__(self, o_proj: nn.Module, num_heads: int, device, second: bool):
        hidden = o_proj.weight.shape[0]
        self.weight = o_proj.weight.detach().to(device, torch.float64).reshape(
            hidden, num_heads, -1)
        self.count = 0
        self.total = torch.zeros(o_proj.weight.shape[1], dtype=torch.float64, device=device)
        self.gram = (torch.zeros(num_heads, num_heads, dtype=torch.float64, device=device)
                     if second else None)

    def add(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        a = rows.to(torch.float64)
        self.count += float(weights.sum())
        self.total += (a * weights[:, None]).sum(0)
        if self.gram is None:
            return
        heads, head_dim = self.weight.shape[1:]
        for chunk, w in zip(a.split(self.CHUNK), weights.split(self.CHUNK)):
            contributions = torch.einsum("thd,ohd->tho", chunk.reshape(-1, heads, head_dim),
                                         self.weight)
            self.gram += torch.einsum("tho,tko,t->hk", contributions, contributions, w)

    def means(self) -> torch.Tensor:
        """The heads' mean contributions, (hidden, heads)."""
        heads, head_dim = self.weight.shape[1:]
        mean = (self.total / self.count).reshape(heads, head_dim)
        return torch.einsum("hd,ohd->oh", mean, self.weight)

    def gram_rows(self, kept: torch.Tensor, centred: bool) -> torch.Tensor:
        second = self.gram / self.count
        if centred:
            mean = self.means()
            second = second - mean.T @ mean
        return second[kept.to(second.device)]


def _scales(gram_rows: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """s solving (G[K, K] + r I) s = G[K, :] 1 + r 1, r = ridge x mean diagonal of G[K, K]."""
    return _solve(gram_rows[:, kept], gram_rows.sum(1), ridge)


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """s solving (G + r I) s = rhs + r 1, r = ridge x mean diagonal of G: least squares with
    the scales pulled towards 1."""
    r = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    try:
        return torch.linalg.solve(gram + r * eye, rhs + r)
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"the scales' least-squares system is singular (ridge={ridge:g}): some "
                         "kept units are constant or collinear on the calibration data; use a "
                         "ridge > 0") from error


def _fit_layer(stats, kept: torch.Tensor, scales: bool, bias: bool, ridge: float):
    """(the kept units' scales or None, the bias delta or None) of one projection."""
    mean = stats.means()
    kept = kept.to(mean.device)
    s = (_scales(stats.gram_rows(kept, centred=bias), kept, ridge) if scales and kept.numel()
         else torch.ones(kept.numel(), dtype=torch.float64, device=mean.device))
    delta = mean.sum(1) - mean[:, kept] @ s if bias else None
    return (s.float().cpu() if scales else None), (None if delta is None else delta.float().cpu())


class Calibration:
    """What reconstruction needs of task data, for any mask: per layer, the moments of the unpruned
    model's FFN activations and heads' contributions (see the module docstring), collected once
    by `collect`; `fit(mask)` then solves for that mask's scales and bias deltas without running
    the model (a pruning-rate search fits many masks on one calibration)."""

    def __init__(self, spec, ffn: list, heads: list, scales: bool):
        self.spec = spec
        self.ffn = ffn  # per layer: _FfnStats, or None (mixture-of-experts block)
        self.heads = heads  # per layer: _HeadStats
        self.scales = scales  # whether it holds the second moments that scales need

    @classmethod
    @torch.no_grad()
    def collect(cls, model: nn.Module, batches, scales: bool = True) -> "Calibration":
        """The moments over the real tokens (attention_mask) of `batches`.

        model: an unpatched supported model (BERT family, LLaMA family, Mixtral: attention only).
        batches: an iterable of keyword dicts for `model(**batch)` (input_ids or inputs_embeds,
        e.g. `Expert.calibration_batches`, which prepends a prompt-tuned expert's soft prompt, and
        attention_mask, (batch, seq), whose zeros mark padding left out), each with an optional
        `token_weights` entry, (batch, seq), the weight of each token in the least squares
        (taken out before the model is called; default 1); tensors are moved to the model's
        device. The model runs in eval mode under no_grad, with forward pre-hooks on the
        projections, and is left exactly as it was (hooks removed, train/eval modes restored).
        scales=False collects the means only (enough for bias compensation).
        Memory, on the model's device: copies of the down and attention output projections'
        weights (the latter in float64) and, for scales, an intermediate_size^2 float64 matrix per
        layer (1.2 GB per layer at intermediate_size 11008).
        """
        points, spec = projection_points(model)  # refuses a patched model
        device = next(model.parameters()).device
        ffn = [None if down is None else _FfnStats(down, spec.intermediate_size, device, scales)
               for down, _ in points]
        heads = [_HeadStats(o_proj, spec.num_heads, device, scales) for _, o_proj in points]
        targets = [(down, stats) for (down, _), stats in zip(points, ffn) if stats is not None]
        targets += [(o_proj, stats) for (_, o_proj), stats in zip(points, heads)]
        _collect(model, targets, batches)
        return cls(spec, ffn, heads, scales)

    def fit(self, mask: ExpertMask, *, scales: bool = True, bias: bool = True,
            ridge: float = 0.1) -> ExpertMask:
        """`mask` with the scales and bias deltas that reconstruct its pruned layers' outputs
        (replacing any it held). scales / bias: fit the kept units' scales / the bias deltas
        (`scales=False` is FLAP's bias compensation). ridge: how strongly the scales are pulled
        towards 1, relative to the mean diagonal of the kept units' Gram matrix (> 0 keeps the
        solve well-posed when units are collinear)."""
        _check_fit(mask, scales, bias, ridge)
        if scales and not self.scales:
            raise ValueError("this calibration holds means only (collected with scales=False); "
                             "collect it with scales=True to fit scales")
        mask.check_spec(self.spec)
        fitted = {kind: {} for kind in ("ffn_scales", "head_scales", "ffn_bias", "attn_bias")}
        for layer in range(self.spec.num_layers):
            for stats, table, size, names in (
                    (self.ffn[layer], mask.ffn, self.spec.intermediate_size,
                     ("ffn_scales", "ffn_bias")),
                    (self.heads[layer], mask.heads, self.spec.num_heads,
                     ("head_scales", "attn_bias"))):
                if stats is None or not _prunes(table, layer, size):
                    continue
                layer_scales, delta = _fit_layer(stats, table[layer], scales, bias, ridge)
                if layer_scales is not None:
                    fitted[names[0]][layer] = layer_scales
                if delta is not None:
                    fitted[names[1]][layer] = delta
        return mask.replace(**fitted)


def reconstruction(model: nn.Module, mask: ExpertMask, batches, *, scales: bool = True,
                   bias: bool = True, ridge: float = 0.1) -> ExpertMask:
    """`mask` with the scales and bias deltas that reconstruct its pruned layers' outputs
    (replacing any it held), fitted on `batches`: `Calibration.collect(model, batches).fit(mask,
    ...)` (see both for the arguments)."""
    _check_fit(mask, scales, bias, ridge)
    mask.check_spec(projection_points(model)[1])  # refuses a patched model first
    calibration = Calibration.collect(model, batches, scales=scales)
    return calibration.fit(mask, scales=scales, bias=bias, ridge=ridge)


def bias_compensation(model: nn.Module, mask: ExpertMask, batches) -> ExpertMask:
    """`mask` with FLAP's bias deltas (the pruned units' mean contribution, no scales), fitted on
    `batches`: `reconstruction(model, mask, batches, scales=False)`."""
    return reconstruction(model, mask, batches, scales=False)


def _check_fit(mask, scales: bool, bias: bool, ridge: float) -> None:
    if not isinstance(mask, ExpertMask):
        raise TypeError(f"mask must be a doe_kernels.ExpertMask, got {type(mask).__name__}")
    if not (scales or bias):
        raise ValueError("nothing to fit: scales and bias are both False")
    if not 0 <= ridge < float("inf"):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")


def _prunes(table, layer: int, size: int) -> bool:
    return layer in table and table[layer].numel() < size


def _collect(model: nn.Module, targets, batches) -> None:
    """Feed each (module, statistics) pair's `add` with the module's input rows of the real
    tokens of every batch, and their weights (`token_weights`)."""
    keep = [None]  # the current batch's (real tokens, their weights), flattened

    def hook_for(stats):
        def hook(module, args):
            x = args[0]
            rows = x.flatten(0, -2)  # (tokens, width), also when width is 0
            real, weights = keep[0]
            if real is None:
                stats.add(rows, torch.ones(rows.shape[0], dtype=torch.float64,
                                           device=rows.device))
                return
            if real.numel() != rows.shape[0]:
                raise ValueError(f"the batch's attention_mask covers {real.numel()} tokens, "
                                 f"but the projection sees {rows.shape[0]}; pass a (batch, "
                                 "seq) attention_mask matching the model's input")
            stats.add(rows[real], weights)
        return hook

    handles = [module.register_forward_pre_hook(hook_for(stats)) for module, stats in targets]
    try:
        with evaluating(model), unchunked(model):
            for batch in batches:
                batch, keep[0] = model_batch(model, batch)
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if not targets or min(stats.count for _, stats in targets) == 0:
        raise ValueError(NO_TOKENS)


def model_batch(model: nn.Module, batch) -> tuple[dict, tuple]:
    """(the keyword dict for `model(**batch)`, on the model's device, without `token_weights`;
    (per flattened token: whether it counts, a bool mask; the float64 weights of those that do),
    or (None, None) when every token counts with weight 1) of one calibration batch. Tokens count
    where the attention_mask (default: all) is 1 and `token_weights` (batch, seq), if given, is
    > 0; without `token_weights` they weigh 1."""
    if not isinstance(batch, dict):
        raise TypeError(f"batches must be keyword dicts for model(**batch), got "
                        f"{type(batch).__name__}")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    weights = batch.pop("token_weights", None)
    attention = batch.get("attention_mask")
    if weights is None:
        if attention is None:
            return batch, (None, None)
        real = attention.reshape(-1).bool()
        return batch, (real, torch.ones(int(real.sum()), dtype=torch.float64, device=device))
    if attention is not None and tuple(weights.shape) != tuple(attention.shape):
        raise ValueError(f"token_weights has shape {tuple(weights.shape)}; it must match the "
                         f"attention_mask's, {tuple(attention.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("token_weights must be finite and >= 0")
    real = weights > 0 if attention is None else attention.bool() & (weights > 0)
    real = real.reshape(-1)
    return batch, (real, weights.reshape(-1)[real].to(torch.float64))
