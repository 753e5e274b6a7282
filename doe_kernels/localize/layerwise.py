"""Layer-wise reconstruction: each pruned projection's scales and bias delta fitted on the inputs
the *pruned* model gives it, so that it also makes up for the error of the layers before it (as
Kwon et al. 2022 tune their masks layer by layer).

`compensate.Calibration` fits every layer on the unpruned model's inputs, an approximation for
all but the first pruned layer that breaks down at high pruning rates. Here the layers run one at
a time on cached hidden states of the calibration batches, the unpruned and the pruned model side
by side, and each projection (per layer: the attention output, then the down projection) is
fitted in forward order on

    target  y = W x    (the unpruned model's projection of its own input x, its bias left out)
    input   x'         (the pruned model's input to it, the projections before it reconstructed)

so that the kept units' scales s and the bias delta b minimise E || sum_{kept i} s_i c_i(x') + b
- y ||^2 over the real tokens (c_i: unit i's contribution, as in `compensate`; with x' = x this is
`Calibration.fit`'s problem). Cost per mask: about three passes over the calibration batches (the
unpruned layer, the pruned layer up to each projection, the fitted layer), against none for
`Calibration.fit`; memory: the two models' hidden states of the calibration tokens.
"""
import torch

from doe_kernels.localize.attribution import hook_points
from doe_kernels.localize.compensate import (_check_fit, _check_unpatched, _prunes, _solve,
                                             model_batch)
from doe_kernels.localize.recover import masked
from doe_kernels.mask import ExpertMask
from doe_kernels.models import describe

_CACHES = ("cache", "past_key_values", "past_key_value")


class _Stop(Exception):
    """Raised by a capturing hook once it has what it needs: the rest of the layer is not run."""


class _Fit:
    """Sums over tokens for one projection (weight W, (hidden, inputs)): the kept units'
    contributions on the pruned inputs against the target, in float64; `solve` gives (the scales
    or None, the bias delta or None). Neurons (head_dim None) use the factored Gram
    E[h_i h_k] (W_i . W_k) of `compensate`; heads their contributions, a few at a time."""

    CHUNK = 256

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor, head_dim: int | None):
        weight = weight.detach().to(torch.float64)
        self.kept = kept.to(weight.device)
        if head_dim is None:
            self.weight = weight[:, self.kept]  # (hidden, kept neurons)
        else:
            self.weight = weight.reshape(weight.shape[0], -1, head_dim)[:, self.kept]
        self.head_dim = head_dim
        size, hidden = self.kept.numel(), weight.shape[0]
        self.count = 0
        self.gram = weight.new_zeros(size, size)
        self.cross = weight.new_zeros(size)
        self.unit_total = weight.new_zeros(size, hidden)  # sum of each unit's contribution
        self.target_total = weight.new_zeros(hidden)

    def add(self, pruned_rows: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
        """pruned_rows: (tokens, inputs) of the projection in the pruned model; target: (tokens,
        hidden) float64; weights: (tokens,) float64."""
        self.count += float(weights.sum())
        self.target_total += weights @ target
        if self.head_dim is None:
            h = pruned_rows.to(torch.float64)[:, self.kept]
            weighted = h * weights[:, None]
            self.gram += (h.T @ weighted) * (self.weight.T @ self.weight)
            self.cross += (weighted * (target @ self.weight)).sum(0)
            self.unit_total += weighted.sum(0)[:, None] * self.weight.T
            return
        for rows, y, w in zip(pruned_rows.to(torch.float64).split(self.CHUNK),
                              target.split(self.CHUNK), weights.split(self.CHUNK)):
            a = rows.reshape(rows.shape[0], -1, self.head_dim)[:, self.kept]
            c = torch.einsum("thd,ohd->tho", a, self.weight)
            self.gram += torch.einsum("tio,tko,t->ik", c, c, w)
            self.cross += torch.einsum("tio,to,t->i", c, y, w)
            self.unit_total += torch.einsum("tio,t->io", c, w)

    def solve(self, scales: bool, bias: bool, ridge: float):
        if self.count == 0:
            raise ValueError("the calibration batches hold no real token (empty, or all padding)")
        mean_c, mean_y = self.unit_total / self.count, self.target_total / self.count
        gram, cross = self.gram / self.count, self.cross / self.count
        if bias:  # centred: the bias takes the means
            gram, cross = gram - mean_c @ mean_c.T, cross - mean_c @ mean_y
        s = (_solve(gram, cross, ridge) if scales
             else torch.ones(self.kept.numel(), dtype=torch.float64, device=gram.device))
        delta = mean_y - s @ mean_c if bias else None
        return ((s.float().cpu() if scales else None),
                (None if delta is None else delta.float().cpu()))


@torch.no_grad()
def layerwise_reconstruction(model, mask: ExpertMask, batches, *, scales: bool = True,
                             bias: bool = True, ridge: float = 0.1) -> ExpertMask:
    """`mask` with scales and bias deltas fitted layer by layer on the pruned model's inputs
    (replacing any it held; see the module docstring). model: an unpatched BERT- or LLaMA-family
    model, left as it was; batches: keyword dicts for `model(**batch)` with an attention_mask, as
    `Calibration.collect` takes (e.g. `Expert.calibration_batches`); scales, bias, ridge: as
    `Calibration.fit`."""
    _check_fit(mask, scales, bias, ridge)
    _check_unpatched(model)
    points, spec = hook_points(model)
    mask.check_spec(spec)
    layers = describe(model)[1]
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        dense, keeps = _layer_inputs(model, layers[0], batches)
        pruned = list(dense)
        fitted = mask.replace(ffn=mask.ffn, heads=mask.heads)  # the kept lists, nothing fitted
        for layer, (ffn_module, head_module) in enumerate(points):
            targets, dense = _unpruned_layer(layers[layer], (head_module, ffn_module), dense,
                                             keeps)
            for module, index, size, head_dim, names in (
                    (head_module, fitted.heads, spec.num_heads, spec.head_dim,
                     ("head_scales", "attn_bias")),
                    (ffn_module, fitted.ffn, spec.intermediate_size, None,
                     ("ffn_scales", "ffn_bias"))):
                if _prunes(index, layer, size):
                    fit = _Fit(module.weight, index[layer], head_dim)
                    with masked(model, fitted):  # nothing fitted for `module` yet: kept unscaled
                        rows = _capture(layers[layer], [module], pruned, keeps, stop=True)[0][0]
                    for x, y, (_, weights) in zip(rows, targets[module], keeps):
                        fit.add(x, y, weights)
                    layer_scales, delta = fit.solve(scales, bias, ridge)
                    fitted = fitted.replace(**_merged(fitted, names, layer, layer_scales, delta))
            with masked(model, fitted):
                pruned = _capture(layers[layer], [], pruned, keeps, stop=False)[1]
    finally:
        for module, training in modes:
            module.training = training
    return fitted


def _merged(mask: ExpertMask, names, layer: int, layer_scales, delta) -> dict:
    """The two tables `names` of `mask` with this layer's fitted values added."""
    out = {}
    for name, value in zip(names, (layer_scales, delta)):
        table = dict(getattr(mask, name))
        if value is not None:
            table[layer] = value
        out[name] = table
    return out


def _layer_inputs(model, first_layer, batches):
    """([(args, kwargs) of the first layer's call] per batch, [(real-token mask, their weights)]
    per batch, `compensate.model_batch`): the model run up to its first layer on each batch,
    with any KV cache dropped."""
    calls, keeps = [], []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        for name in _CACHES:
            if name in kwargs:
                kwargs[name] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls.append((args, kwargs))
        raise _Stop

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch, keep = model_batch(model, batch)
            if keep[0] is None:
                raise ValueError("layer-wise reconstruction needs each batch's attention_mask "
                                 "(or token_weights)")
            keeps.append(keep)
            try:
                model(**batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not calls:
        raise ValueError("the calibration batches hold no real token (empty, or all padding)")
    return calls, keeps


def _call(layer, state):
    args, kwargs = state
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _capture(layer, modules, states, keeps, stop: bool):
    """([per module: per batch, the real-token rows of its input], [per batch: the (args, kwargs)
    of the next layer, this layer's output as hidden states; empty when `stop`]) of `layer` run
    on each batch's `states`, stopped at the first module's input when `stop`."""
    rows = [[] for _ in modules]
    outputs = []

    def hook_for(index):
        def hook(module, args):
            x = args[0]
            rows[index].append(x.reshape(-1, x.shape[-1])[keeps[len(rows[index])][0]])
            if stop:
                raise _Stop
        return hook

    handles = [module.register_forward_pre_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        for args, kwargs in states:
            try:
                out = _call(layer, (args, kwargs))
            except _Stop:
                continue
            outputs.append(((out,) + tuple(args[1:]), kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return rows, outputs


def _unpruned_layer(layer, modules, states, keeps):
    """({projection: per batch, the unpruned projection of its input, W x, (tokens, hidden)
    float64}, the next layer's states) of one unpruned layer (modules None are skipped)."""
    modules = [module for module in modules if module is not None]
    rows, outputs = _capture(layer, modules, states, keeps, stop=False)
    targets = {}
    for module, inputs in zip(modules, rows):
        weight = module.weight.detach().to(torch.float64)
        targets[module] = [x.to(torch.float64) @ weight.T for x in inputs]
    return targets, outputs
