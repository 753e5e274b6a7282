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
`Calibration.fit`'s problem). The targets do not depend on the mask: `UnprunedTargets` computes
them in one pass of the unpruned model, once for all the masks fitted on the same batches. Cost
per mask: two to three passes of the pruned model over the calibration batches (each layer up to
each projection fitted, then the fitted layer: about two where only neurons are pruned), its FFN run
on sliced copies of the kept neurons' weights (`recover.sliced`), against none for
`Calibration.fit`; memory: the targets, and the pruned model's hidden states of the calibration
batches.
"""

import torch

from doe_kernels.caller_state import evaluating, unchunked
from doe_kernels.localize.attribution import check_unpatched, hook_points
from doe_kernels.localize.compensate import NO_TOKENS, _check_fit, _prunes, _solve, model_batch
from doe_kernels.localize.recover import sliced
from doe_kernels.mask import ExpertMask
from doe_kernels.models import describe

_CACHES = ("cache", "past_key_values", "past_key_value")
KINDS = ("heads", "ffn")  # the projections fitted, in each layer's forward order
_FITTED_TABLES = ("ffn", "heads", "ffn_scales", "head_scales", "ffn_bias", "attn_bias")


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

    def add(self, pruned_rows: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
            gathered: bool = False):
        """pruned_rows: (tokens, inputs) of the projection in the pruned model (neurons:
        (tokens, kept) when `gathered`); target: (tokens, hidden) float64; weights: (tokens,)
        float64."""
        self.count += float(weights.sum())
        self.target_total += weights @ target
        if self.head_dim is None:
            h = pruned_rows.to(torch.float64)
            h = h if gathered else h[:, self.kept]
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
            raise ValueError(NO_TOKENS)
        mean_c, mean_y = self.unit_total / self.count, self.target_total / self.count
        gram, cross = self.gram / self.count, self.cross / self.count
        if bias:  # centred: the bias takes the means
            gram, cross = gram - mean_c @ mean_c.T, cross - mean_c @ mean_y
        s = (_solve(gram, cross, ridge) if scales
             else torch.ones(self.kept.numel(), dtype=torch.float64, device=gram.device))
        delta = mean_y - s @ mean_c if bias else None
        return ((s.float().cpu() if scales else None),
                (None if delta is None else delta.float().cpu()))


class UnprunedTargets:
    """The fits' targets, which no mask changes: per layer, the unpruned model's projection W x of
    each projection's own input (the down projection's: kind "ffn"; the attention output's:
    "heads"), the real tokens' rows of each calibration batch, float32. `localize` builds one per
    run and passes it to every candidate's `layerwise_reconstruction` (and to both read-out
    weights: token weights do not change which tokens are real), which then runs only the pruned
    model. Memory: real tokens x hidden size x 4 bytes per layer and kind."""

    @torch.no_grad()
    def __init__(self, model, batches, kinds=("ffn", "heads")):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"kinds must be among {KINDS}, got {sorted(unknown)}")
        check_unpatched(model)
        points, _ = hook_points(model)
        layers = describe(model)[1]
        self.kinds = tuple(kind for kind in KINDS if kind in kinds)
        with evaluating(model), unchunked(model):
            states, keeps = _layer_inputs(model, layers[0], batches)
            self.real = [real for real, _ in keeps]
            self.fingerprint = _fingerprint(states)
            self.layers = []  # per layer: {kind: [per batch (tokens, hidden) float32]}
            for layer, (ffn_module, head_module) in enumerate(points):
                modules = {"ffn": ffn_module, "heads": head_module}
                targets, states = _unpruned_layer(
                    layers[layer], [modules[kind] for kind in self.kinds], states, keeps)
                self.layers.append({kind: [y.float() for y in targets[modules[kind]]]
                                    for kind in self.kinds})

    def check(self, states, keeps, kinds) -> None:
        """Refuses batches (their first layer's inputs `states` and real tokens `keeps`) other
        than the ones these targets were computed on, or a fit of a kind they do not hold."""
        missing = sorted(set(kinds) - set(self.kinds))
        if missing:
            raise ValueError(f"these unpruned targets hold {list(self.kinds)}, not {missing}")
        same = len(keeps) == len(self.real) and all(
            torch.equal(real, theirs) and torch.equal(mine, known)
            for (real, _), theirs, mine, known in zip(keeps, self.real, _fingerprint(states),
                                                      self.fingerprint))
        if not same:
            raise ValueError("the unpruned targets were computed on other calibration batches "
                             "(their tokens differ)")


def _fingerprint(states) -> list:
    """Per batch, the first layer's input summed over the hidden features: what tells one set of
    calibration batches from another."""
    return [args[0].sum(-1) for args, _ in states]


def pruned_kinds(mask: ExpertMask, spec) -> tuple:
    """The kinds of projection ("ffn", "heads") `mask` prunes in some layer: the fits it needs."""
    sizes = {"ffn": (mask.ffn, spec.intermediate_size), "heads": (mask.heads, spec.num_heads)}
    return tuple(kind for kind in KINDS
                 if any(_prunes(sizes[kind][0], layer, sizes[kind][1])
                        for layer in range(spec.num_layers)))


@torch.no_grad()
def layerwise_reconstruction(model, mask: ExpertMask, batches, *, scales: bool = True,
                             bias: bool = True, ridge: float = 0.1,
                             unpruned: UnprunedTargets | None = None) -> ExpertMask:
    """`mask` with scales and bias deltas fitted layer by layer on the pruned model's inputs
    (replacing any it held; see the module docstring). model: an unpatched BERT- or LLaMA-family
    model, left as it was; batches: keyword dicts for `model(**batch)` with an attention_mask, as
    `Calibration.collect` takes (e.g. `Expert.calibration_batches`); scales, bias, ridge: as
    `Calibration.fit`; unpruned: the targets of these batches computed once (`UnprunedTargets`)
    for several fits (None: computed here)."""
    _check_fit(mask, scales, bias, ridge)
    check_unpatched(model)
    batches = list(batches)  # read twice (the pruned inputs, the unpruned targets): a generator too
    points, spec = hook_points(model)
    mask.check_spec(spec)
    adapter, layers, _ = describe(model)
    with evaluating(model), unchunked(model):
        pruned, keeps = _layer_inputs(model, layers[0], batches)
        kinds = pruned_kinds(mask, spec)
        if not kinds:  # nothing to fit
            return mask.replace(ffn=mask.ffn, heads=mask.heads)
        if unpruned is None:
            unpruned = UnprunedTargets(model, batches, kinds)
        unpruned.check(pruned, keeps, kinds)
        fitted = mask.replace(ffn=mask.ffn, heads=mask.heads)  # the kept lists, nothing fitted
        for layer, (ffn_module, head_module) in enumerate(points):
            for kind, module, read_at, index, size, head_dim, names in (
                    ("heads", head_module, head_module, fitted.heads, spec.num_heads,
                     spec.head_dim, ("head_scales", "attn_bias")),
                    ("ffn", ffn_module, adapter.FFN_DOWN, fitted.ffn, spec.intermediate_size,
                     None, ("ffn_scales", "ffn_bias"))):
                if _prunes(index, layer, size):
                    fit = _Fit(module.weight, index[layer], head_dim)
                    rows = _pruned_inputs(model, layers[layer], layer, fitted, read_at, pruned,
                                          keeps)
                    for x, y, (_, weights) in zip(rows, unpruned.layers[layer][kind], keeps):
                        fit.add(x, y.to(torch.float64), weights, gathered=kind == "ffn")
                    layer_scales, delta = fit.solve(scales, bias, ridge)
                    fitted = fitted.replace(**_merged(fitted, names, layer, layer_scales, delta))
            with sliced(model, _at_layer(fitted, layer)):
                pruned = _capture(layers[layer], [], pruned, keeps, stop=False)[1]
    return fitted


def _pruned_inputs(model, layer_module, layer: int, fitted: ExpertMask, projection, states,
                   keeps):
    """Per batch, the real tokens' input rows of `projection` (a module of layer number `layer`,
    or its path in the layer) in the pruned model (`fitted` as fitted so far: nothing yet for
    this projection, so its kept units unscaled). The FFN runs sliced: the down projection, given
    by its path, is read from its sliced copy, whose rows hold the kept neurons only; the
    attention output's rows are full (pruned heads zero)."""
    with sliced(model, _at_layer(fitted, layer)):
        if isinstance(projection, str):
            projection = layer_module.get_submodule(projection)
        return _capture(layer_module, [projection], states, keeps, stop=True)[0][0]


def _at_layer(mask: ExpertMask, layer: int) -> ExpertMask:
    """`mask` restricted to one layer (the only one a pass runs), so that `sliced` copies that
    layer's projections alone."""
    tables = {name: getattr(mask, name) for name in _FITTED_TABLES}
    return mask.replace(**{name: ({layer: table[layer]} if layer in table else {})
                           for name, table in tables.items()})


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
        hidden = args[0] if args else kwargs.get("hidden_states")
        real = keeps[-1][0]
        if isinstance(hidden, torch.Tensor) and real.numel() != hidden.shape[:-1].numel():
            raise ValueError(f"the batch's attention_mask covers {real.numel()} tokens, but the "
                             f"model's layers see {hidden.shape[:-1].numel()}; pass a (batch, "
                             "seq) attention_mask matching the model's input")
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
        raise ValueError(NO_TOKENS)
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
            rows[index].append(x.flatten(0, -2)[keeps[len(rows[index])][0]])  # width may be 0
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
