"""ExpertMask: the FFN neurons, attention heads and MoE experts a task expert keeps, per layer.

A mask maps layer numbers to 1-D sorted unique index tensors (kept FFN intermediate neurons, kept
query heads, kept experts of a mixture-of-experts layer); a layer missing from a dict keeps all of
it. It may also hold per-layer dynamic-skipping thresholds for MoE layers (see doe_kernels.moe).
It may hold per-layer bias deltas (`ffn_bias`, `attn_bias`: {layer: float32 vector of the hidden
size}), added to the down and attention output projections' outputs, and per-layer scales of the
kept units (`ffn_scales`: one per kept neuron, `head_scales`: one per kept head, in the order of
the kept lists), which multiply each kept unit's contribution to those outputs (reconstruction, see
doe_kernels.localize.compensate). It may record the sizes of the model it was made for (`spec`:
`random` and localize's masks do; `from_scores` when given one), so that plugging it into another
model is refused (each size it records must match: older masks, which record fewer, are checked
on those); a mask without them is checked against a model's sizes only when plugged.
Saved in safetensors.
"""
import json
import numbers
import re
from collections.abc import Mapping

import torch

from doe_kernels.files import (FLOAT_DTYPES, FileFormatError, parse_json, read_safetensors,
                                write_safetensors)
from doe_kernels.models import ADAPTERS, ModelSpec, spec_of
from doe_kernels.ops.checks import check_sorted_unique

# the sizes a mask records (hidden_size, head_dim and top_k since masks of older versions, whose
# files lack them: each is compared only when recorded)
_SPEC_KEYS = ("model_type", "num_layers", "hidden_size", "intermediate_size", "num_heads",
              "num_kv_heads", "head_dim", "num_experts", "top_k")
# keys a spec given may hold that a mask does not record, accepted (checked) and dropped:
# `family` (ModelSpec.as_dict() gives it; unit_weights weighs neurons by it, so it must name a
# known family) and `vocab_size` (an Expert's `sizes`, which localize passes as the spec). Any
# other key is refused (a mistyped one was dropped silently). Saved masks need no more: every
# version wrote only the keys of _SPEC_KEYS it recorded, all still known.
_GIVEN_ONLY_KEYS = ("family", "vocab_size")
_FAMILIES = tuple(adapter.FAMILY for adapter in ADAPTERS)  # bert, llama, mixtral
# the family of each supported model_type: a mask's spec records the type, not the family
_FAMILY_OF_TYPE = {kind: adapter.FAMILY for adapter in ADAPTERS for kind in adapter.MODEL_TYPES}
_SIZE_KEYS = ("num_layers", "intermediate_size", "num_heads")  # what summary() needs
# a model has at least one of each
_POSITIVE_KEYS = _SIZE_KEYS + ("hidden_size", "head_dim", "vocab_size")
_INDEX_KINDS = ("ffn", "heads", "moe")
_BIAS_KINDS = ("ffn_bias", "attn_bias")
_SCALE_KINDS = ("ffn_scales", "head_scales")
_VECTOR_KINDS = _BIAS_KINDS + _SCALE_KINDS  # float32 vectors per layer
_KINDS = _INDEX_KINDS + ("skip",) + _VECTOR_KINDS
# kind.layer, no leading zeros
_TENSOR_KEY = re.compile(rf"({'|'.join(_KINDS)})\.(0|[1-9][0-9]*)")


class FrozenTable(Mapping):
    """A read-only {layer: value} table; tensors are handed out as copies, so a mask cannot be
    changed after it was validated (a patched model relies on that)."""

    def __init__(self, items: dict):
        self._items = dict(items)

    def __getitem__(self, layer):
        value = self._items[layer]
        return value.clone() if isinstance(value, torch.Tensor) else value

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"FrozenTable({self._items!r})"

    def __eq__(self, other):
        """Equal to a table (or dict) of the same layers and equal values (tensors by
        `torch.equal`)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.keys() == other.keys() and all(
            _same_value(self._items[k], other[k]) for k in self._items)

    __hash__ = None


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    return a == b


def _as_index(kind: str, layer, index) -> torch.Tensor:
    """A copy of `index` as a 1-D sorted unique int64 CPU tensor; raises naming the layer."""
    where = f"{kind}[{layer}]"
    if not isinstance(index, torch.Tensor) and isinstance(index, (list, tuple)) and any(
            isinstance(value, bool) for value in index):
        raise TypeError(f"{where} must hold integer indices, got a bool in {list(index)}")
    try:
        tensor = torch.as_tensor(index)
    except (TypeError, ValueError, RuntimeError):
        if isinstance(index, (list, tuple)) and all(isinstance(v, int) for v in index):
            raise ValueError(f"{where} holds an index past 2**63 - 1, out of range") from None
        raise TypeError(f"{where} must be a list or tensor of integer indices, got "
                        f"{type(index).__name__} {index!r:.80}") from None
    _check_not_meta(where, tensor)
    if tensor.numel() == 0 and tensor.dtype.is_floating_point:
        tensor = tensor.to(torch.int64)  # an empty list, or torch.tensor([]), keeps nothing
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{where} must hold integer indices, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{where} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint64 and bool((tensor.to(torch.int64) < 0).any()):
        raise ValueError(f"{where} holds an index past 2**63 - 1, out of range")
    tensor = tensor.detach().to("cpu", torch.int64).clone()
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{where} holds a negative index {int(tensor.min())}")
    check_sorted_unique(where, tensor)
    return tensor


def _check_not_meta(where: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming `where` if `tensor` is on the meta device (a mask copies values,
    which a meta tensor has none of)."""
    if tensor.device.type == "meta":
        raise ValueError(f"{where} is on the meta device (it has no values); give the indices or "
                         "values as a CPU (or GPU) tensor or a list")


def _as_threshold(kind: str, layer, value) -> float:
    if isinstance(value, (bool, complex)) or (isinstance(value, torch.Tensor)
                                              and value.dtype not in FLOAT_DTYPES):
        what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{kind}[{layer}] must be a real number (a threshold), got {what}")
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{kind}[{layer}] must be a real number (a threshold), got "
                        f"{type(value).__name__} {value!r:.80}") from None
    _check_not_meta(f"{kind}[{layer}]", tensor)
    if tensor.numel() != 1:
        raise ValueError(f"{kind}[{layer}] must be one number, got shape {tuple(tensor.shape)}")
    value = float(tensor.reshape(-1)[0])
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{kind}[{layer}] must be a threshold in [0, 1], got {value}")
    return value


def _as_vector(kind: str, layer, value) -> torch.Tensor:
    """A copy of `value` as a 1-D finite float32 CPU tensor; raises naming the table and layer."""
    where = f"{kind}[{layer}]"
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where} must be a list or tensor of floating-point values, got "
                        f"{type(value).__name__} {value!r:.80}") from None
    _check_not_meta(where, tensor)
    if not (tensor.dtype in FLOAT_DTYPES or tensor.numel() == 0):
        raise TypeError(f"{where} must hold floating-point values (float16, bfloat16, float32 "
                        f"or float64), got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{where} must be 1-D, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where} holds {int((~torch.isfinite(tensor)).sum())} non-finite "
                         "value(s) (NaN or inf); bias deltas and scales must be finite")
    tensor = tensor.detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where} holds value(s) out of float32's range (beyond "
                         f"{torch.finfo(torch.float32).max:.3g}), in which masks keep them")
    return tensor


class ExpertMask:
    """Kept FFN neurons, attention query heads and MoE experts per layer (missing layers keep
    everything), optional dynamic-skipping thresholds `skip` ({layer: beta}) for MoE layers, and
    the optional reconstruction a patched model applies to a layer's down / attention output
    projection: bias deltas `ffn_bias` / `attn_bias` ({layer: hidden-size vector}) added to its
    output, and scales `ffn_scales` / `head_scales` ({layer: one value per kept neuron / head})
    multiplying each kept unit's contribution (the FFN ones are not supported on
    mixture-of-experts models)."""

    def __init__(self, ffn=None, heads=None, spec: dict | None = None, moe=None, skip=None, *,
                 ffn_bias=None, attn_bias=None, ffn_scales=None, head_scales=None):
        given = dict(ffn=ffn, heads=heads, moe=moe, skip=skip, ffn_bias=ffn_bias,
                     attn_bias=attn_bias, ffn_scales=ffn_scales, head_scales=head_scales)
        for kind in _KINDS:
            convert = (_as_index if kind in _INDEX_KINDS else _as_vector if kind in _VECTOR_KINDS
                       else _as_threshold)
            setattr(self, kind, FrozenTable({l: convert(kind, l, value)
                                             for l, value in _by_layer(kind, given[kind])}))
        self._spec = _as_spec(spec)
        self._check_sizes(self._spec)
        self._check_scale_lengths(self._spec)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        """A mask is not changed once made (patched models cache its plans): `replace` makes
        another."""
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"an ExpertMask cannot be changed (setting {name!r}); make "
                                 "another with mask.replace(...)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"an ExpertMask cannot be changed (deleting {name!r})")

    @property
    def spec(self) -> dict | None:
        """The sizes of the model the mask was made for (a copy: changing it changes no mask),
        or None."""
        return None if self._spec is None else dict(self._spec)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def random(cls, model, ffn_keep: float = 0.35, heads_keep: float = 1.0,
               experts_keep: float = 1.0, seed: int = 0):
        """The same fraction of neurons (and heads, and MoE experts: at least top-k) kept at
        random in every layer. `seed`: an int (numpy integers too)."""
        _check_model(model)
        for name, value in (("ffn_keep", ffn_keep), ("heads_keep", heads_keep),
                            ("experts_keep", experts_keep)):
            _check_fraction(name, value)
        gen = torch.Generator().manual_seed(_as_seed(seed))
        spec = spec_of(model)

        def pick(total, keep):
            count = round(total * keep)
            return torch.randperm(total, generator=gen)[:count].sort().values

        ffn = {l: pick(spec.intermediate_size, ffn_keep) for l in range(spec.num_layers)}
        heads = {l: pick(spec.num_heads, heads_keep) for l in range(spec.num_layers)}
        moe = {}
        if spec.num_experts:
            keep = max(experts_keep, spec.top_k / spec.num_experts)
            moe = {l: pick(spec.num_experts, keep) for l in range(spec.num_layers)}
        return cls(ffn, heads, spec.as_dict(), moe=moe)

    @classmethod
    def from_scores(cls, ffn_scores=None, head_scores=None, ffn_keep: float = 0.35,
                    heads_keep: float = 1.0, scope: str = "layer", spec: dict | None = None,
                    shards: int = 1):
        """Keep the top-scored neurons (and heads): `scope="layer"` keeps the same fraction in
        every layer, `scope="global"` ranks all layers together (layers may then keep more or
        fewer). `shards` > 1 (a tensor-parallel size) keeps, in each layer, the same number of
        units (give or take one) in each of that many equal contiguous shards, the top-scored of
        each, so that no rank waits for another. Scores: a (layers, units) tensor, or a list of
        1-D tensors; with `spec`, one row per layer of the model and one score per neuron (its
        `intermediate_size`) or head (`num_heads`)."""
        _check_ranking(scope, shards)
        sizes = _as_spec(spec)
        return cls(_top(ffn_scores, ffn_keep, scope, "ffn_keep", shards,
                        _fitting_rows(ffn_scores, "ffn_scores", shards, sizes)),
                   _top(head_scores, heads_keep, scope, "heads_keep", shards,
                        _fitting_rows(head_scores, "head_scores", shards, sizes)), spec)

    @classmethod
    def from_scores_jointly(cls, ffn_scores, head_scores, keep: float, spec: dict,
                            scope: str = "global", shards: int = 1):
        """Heads and neurons ranked on one scale: each unit's score per weight it holds
        (`unit_weights`; the scores must weigh both kinds alike, as Fisher scores do and
        activation x gradient scores do not: docs/localize.md), kept from the top until the
        kept units hold `keep` of the FFN and attention weights, ranked across all layers
        (`scope="global"`) or within each layer.
        `spec`: the model's sizes (`spec_of(model).as_dict()`, an Expert's `sizes`, or a mask's
        `spec`, whose model_type names the family), which the scores must fit (as in
        `from_scores`); `shards` as in `from_scores`, applied to the counts this ranking gives
        each layer."""
        _check_ranking(scope, shards)
        _check_fraction("keep", keep)
        weights = unit_weights(spec)  # checks spec (a dict of sound sizes) before using it
        sizes = _as_spec(spec)
        ffn = _score_rows(ffn_scores, "ffn_scores", shards)
        heads = _score_rows(head_scores, "head_scores", shards)
        if len(ffn) != len(heads):
            raise ValueError(f"ffn_scores cover {len(ffn)} layers, head_scores {len(heads)}")
        _check_fit(ffn, "ffn_scores", sizes)
        _check_fit(heads, "head_scores", sizes)
        counts = _joint_counts(ffn, heads, keep, weights, scope)
        return cls({l: _balanced_top(r, c, shards) for l, (r, (c, _)) in
                    enumerate(zip(ffn, counts))},
                   {l: _balanced_top(r, c, shards) for l, (r, (_, c)) in
                    enumerate(zip(heads, counts))}, spec)

    def replace(self, spec: dict | None = None, **tables) -> "ExpertMask":
        """This mask with the named tables (ffn, heads, moe, skip, ffn_bias, attn_bias,
        ffn_scales, head_scales), and the model sizes if `spec` is given, replaced; the others
        are kept, except that new kept lists (`ffn`, `heads`) drop the reconstruction fitted for
        the old ones (ffn_scales and ffn_bias, head_scales and attn_bias) unless it is given too."""
        unknown = sorted(set(tables) - set(_KINDS))
        if unknown:
            raise TypeError(f"unknown mask table(s) {unknown}; the tables are {list(_KINDS)}")
        merged = {kind: tables.get(kind, getattr(self, kind)) for kind in _KINDS}
        for index, fitted in (("ffn", ("ffn_scales", "ffn_bias")),
                              ("heads", ("head_scales", "attn_bias"))):
            if index in tables:
                merged.update({kind: tables.get(kind, {}) for kind in fitted})
        return ExpertMask(spec=self.spec if spec is None else spec, **merged)

    def with_skip(self, skip: dict) -> "ExpertMask":
        """This mask with dynamic-skipping thresholds {layer: beta} (see doe_kernels.moe)."""
        return self.replace(skip=skip)

    def with_bias(self, ffn_bias=None, attn_bias=None) -> "ExpertMask":
        """This mask with the bias deltas {layer: hidden-size vector} (replacing its own)."""
        return self.replace(ffn_bias=ffn_bias, attn_bias=attn_bias)

    def with_scales(self, ffn_scales=None, head_scales=None) -> "ExpertMask":
        """This mask with scales of its kept units {layer: one value per kept neuron / head, in
        the order of the kept list} (replacing its own)."""
        return self.replace(ffn_scales=ffn_scales, head_scales=head_scales)

    @property
    def keeps_everything(self) -> bool:
        """Whether every table is empty: the mask runs the whole model, as it is."""
        return not any(getattr(self, kind) for kind in _KINDS)

    @property
    def bias_compensated(self) -> bool:
        """Whether the mask holds bias deltas."""
        return bool(self.ffn_bias or self.attn_bias)

    @property
    def scaled(self) -> bool:
        """Whether the mask holds scales of its kept units."""
        return bool(self.ffn_scales or self.head_scales)

    # ---- inspection ---------------------------------------------------------------------
    def validate(self, model) -> ModelSpec:
        """Check every index against the model; raises ValueError naming the first bad one."""
        _check_model(model)
        spec = spec_of(model)
        self.check_spec(spec)
        return spec

    def check_spec(self, spec: ModelSpec) -> None:
        if self.spec is not None:
            for key, value in self.spec.items():
                if getattr(spec, key) != value:
                    raise ValueError(f"this mask was made for a model with {key}={value!r}, but the "
                                     f"model has {key}={getattr(spec, key)!r}")
        sizes = spec.as_dict()
        if self.moe and not spec.num_experts:
            raise ValueError("this mask keeps MoE experts, but the model has no "
                             "mixture-of-experts layers")
        self._check_sizes(sizes)
        for layer, index in self.moe.items():
            if index.numel() < spec.top_k:
                raise ValueError(f"moe[{layer}] keeps {index.numel()} experts, fewer than the "
                                 f"model's top-k ({spec.top_k}) experts per token")
        for layer in self.skip:
            if not spec.num_experts:
                raise ValueError("this mask has dynamic-skipping thresholds, but the model has no "
                                 "mixture-of-experts layers")
            if layer >= spec.num_layers:
                raise ValueError(f"skip names layer {layer}, but the model has "
                                 f"{spec.num_layers} layers")
        if self.ffn_bias and spec.num_experts:
            raise ValueError("this mask has FFN bias deltas (ffn_bias), which mixture-of-experts "
                             "models do not support; keep attn_bias only")
        if self.ffn_scales and spec.num_experts:
            raise ValueError("this mask has FFN scales (ffn_scales), which mixture-of-experts "
                             "models do not support; keep head_scales only")
        for kind in _VECTOR_KINDS:
            for layer, vector in getattr(self, kind).items():
                if kind in _BIAS_KINDS and vector.numel() != spec.hidden_size:
                    raise ValueError(f"{kind}[{layer}] has {vector.numel()} values, but the "
                                     f"model's hidden size is {spec.hidden_size}")
        self._check_scale_lengths(spec.as_dict())

    def _check_sizes(self, sizes: dict | None) -> None:
        """Each table's layers, and each index table's indices, within the sizes `sizes` gives (a
        model's, or the mask's own record, which may leave some out)."""
        if sizes is None:
            return
        for kind in ("skip",) + _VECTOR_KINDS:
            for layer in getattr(self, kind):
                if "num_layers" in sizes and layer >= sizes["num_layers"]:
                    raise ValueError(f"{kind} names layer {layer}, but the model has "
                                     f"{sizes['num_layers']} layers")
        for kind, size_key, unit in (("ffn", "intermediate_size", "neurons"),
                                     ("heads", "num_heads", "heads"),
                                     ("moe", "num_experts", "experts")):
            for layer, index in getattr(self, kind).items():
                if "num_layers" in sizes and layer >= sizes["num_layers"]:
                    raise ValueError(f"{kind} names layer {layer}, but the model has "
                                     f"{sizes['num_layers']} layers")
                size = sizes.get(size_key)
                if size is not None and index.numel() and int(index[-1]) >= size:
                    bad = int(index[index >= size][0])
                    raise ValueError(f"{kind}[{layer}] holds index {bad}, out of range for "
                                     f"{size} {unit}")

    def _check_scale_lengths(self, sizes: dict | None) -> None:
        """Each scales entry has one value per kept unit of its layer (a layer missing from the
        index table keeps all: checked when `sizes` gives the count)."""
        for kind, index, size_key, unit in (
                ("ffn_scales", self.ffn, "intermediate_size", "neurons"),
                ("head_scales", self.heads, "num_heads", "heads")):
            for layer, vector in getattr(self, kind).items():
                if layer in index:
                    expected, what = index[layer].numel(), f"layer {layer} keeps {{}} {unit}"
                elif sizes is not None and size_key in sizes:
                    expected, what = sizes[size_key], f"layer {layer} keeps all {{}} {unit}"
                else:
                    continue
                if vector.numel() != expected:
                    raise ValueError(f"{kind}[{layer}] has {vector.numel()} values, but "
                                     f"{what.format(expected)} (one scale per kept unit)")

    def summary(self, model=None) -> dict:
        """Kept counts and pruning rates (sizes from the model, or from the mask's own record).
        A model given is checked first, as `validate` checks it (a mask of another model would
        count units the model lacks, or leave out layers)."""
        sizes = self.validate(model).as_dict() if model is not None else self.spec
        if sizes is None or any(key not in sizes for key in _SIZE_KEYS):
            raise ValueError("this mask records no model sizes; pass the model")
        layers = sizes["num_layers"]
        total_ffn, total_heads = layers * sizes["intermediate_size"], layers * sizes["num_heads"]
        kept_ffn = sum(self.ffn[l].numel() if l in self.ffn else sizes["intermediate_size"]
                       for l in range(layers))
        kept_heads = sum(self.heads[l].numel() if l in self.heads else sizes["num_heads"]
                         for l in range(layers))
        out = dict(layers=layers, neurons_kept=kept_ffn, neurons_total=total_ffn,
                   ffn_pruning_rate=1 - kept_ffn / total_ffn, heads_kept=kept_heads,
                   heads_total=total_heads, head_pruning_rate=1 - kept_heads / total_heads)
        experts = sizes.get("num_experts") or 0
        if experts:
            kept = sum(self.moe[l].numel() if l in self.moe else experts for l in range(layers))
            out.update(experts_kept=kept, experts_total=layers * experts,
                       expert_pruning_rate=1 - kept / (layers * experts),
                       skip_layers=len(self.skip))
        if self.bias_compensated:
            out.update(bias_compensated=True, ffn_bias_layers=len(self.ffn_bias),
                       attn_bias_layers=len(self.attn_bias))
        if self.scaled:
            out.update(scaled=True, ffn_scales_layers=len(self.ffn_scales),
                       head_scales_layers=len(self.head_scales))
        return out

    def __repr__(self):
        bias = ((", bias-compensated" if self.bias_compensated else "")
                + (", scaled" if self.scaled else ""))
        if self.spec is None or any(key not in self.spec for key in _SIZE_KEYS):
            return (f"ExpertMask(ffn layers={list(self.ffn)}, heads layers={list(self.heads)}"
                    f"{bias})")
        s = self.summary()
        moe = (f", experts {s['experts_kept']}/{s['experts_total']} kept"
               + (f", skipping in {s['skip_layers']} layers" if s["skip_layers"] else "")
               if "experts_kept" in s else "")
        return (f"ExpertMask({s['layers']} layers, neurons {s['neurons_kept']}/{s['neurons_total']}"
                f" kept ({100 * s['ffn_pruning_rate']:.1f}% pruned), heads {s['heads_kept']}/"
                f"{s['heads_total']} kept{moe}{bias})")

    # ---- files --------------------------------------------------------------------------
    def tensors(self, prefix: str = "") -> dict:
        """The index lists as named tensors (`{prefix}ffn.{layer}`, `{prefix}heads.{layer}`,
        `{prefix}moe.{layer}`; thresholds as `{prefix}skip.{layer}`, one float64 each; bias
        deltas and scales as `{prefix}ffn_bias.{layer}`, `{prefix}attn_bias.{layer}`,
        `{prefix}ffn_scales.{layer}`, `{prefix}head_scales.{layer}`), the form saved in files
        (here and inside Expert files)."""
        out = {}
        for kind in _INDEX_KINDS + _VECTOR_KINDS:
            out.update({f"{prefix}{kind}.{l}": i for l, i in getattr(self, kind).items()})
        out.update({f"{prefix}skip.{l}": torch.tensor([b], dtype=torch.float64)
                    for l, b in self.skip.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, spec: dict | None, prefix: str = "") -> "ExpertMask":
        """The inverse of `tensors`; keys without the prefix are ignored."""
        tables = {kind: {} for kind in _KINDS}
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                match = _TENSOR_KEY.fullmatch(key[len(prefix):])
                if match is None:
                    expected = ", ".join(f"{prefix}{kind}.N" for kind in _KINDS)
                    raise ValueError(f"unknown mask tensor {key!r} (expected one of {expected})")
                tables[match[1]][int(match[2])] = tensor
        return cls(spec=spec, **tables)

    def check_skip_everywhere(self, num_layers: int, why: str) -> None:
        """Raise ValueError naming the layers without a skipping threshold (`why`: what needs
        one in every layer)."""
        missing = [layer for layer in range(num_layers) if layer not in self.skip]
        if missing:
            raise ValueError(f"{why}, but the mask has no skipping threshold for layers "
                             f"{missing}; compute them with doe_kernels.moe.skip_thresholds and "
                             "ExpertMask.with_skip")

    def save(self, path) -> None:
        write_safetensors(path, self.tensors(), metadata={"doe_kernels": "ExpertMask",
                                                          "spec": json.dumps(self.spec)})

    @classmethod
    def load(cls, path) -> "ExpertMask":
        """The mask saved at `path`; raises FileFormatError naming the file and the problem."""
        metadata, tensors = read_safetensors(path, "ExpertMask")
        try:
            return cls.from_tensors(tensors, parse_json(metadata.get("spec", "null"), "its spec"))
        except (ValueError, TypeError) as error:
            raise FileFormatError(f"{path}: {error}") from error

    def __eq__(self, other):
        if not isinstance(other, ExpertMask):
            return NotImplemented
        return (all(getattr(self, kind) == getattr(other, kind) for kind in _KINDS)
                and self.spec == other.spec)

    def __hash__(self):
        """By value, as masks compare (equal masks share their prepared plans); computed once,
        since a mask never changes."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((json.dumps(self._spec, sort_keys=True),) + tuple(
                (kind, layer, tuple(value.tolist()) if isinstance(value, torch.Tensor) else value)
                for kind in _KINDS for layer, value in getattr(self, kind)._items.items()))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self):
        """Pickled without the hash, which depends on the process (str hashing is salted)."""
        return {name: value for name, value in self.__dict__.items() if name != "_hash"}


def _by_layer(kind: str, table) -> list:
    """The (layer, value) pairs of a {layer: value} table, in layer order."""
    if table is None:
        return []
    if not isinstance(table, Mapping):
        raise TypeError(f"{kind} must be a dict {{layer: ...}}, got {type(table).__name__}")
    for layer in table:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise TypeError(f"{kind} keys must be layer numbers (int >= 0), got {layer!r}")
    return sorted(table.items())


def _as_spec(spec) -> dict | None:
    """The model sizes a mask records: None, or a dict of the known keys with sound values;
    raises naming an unknown key or a bad value (`family` and `vocab_size` are checked and
    dropped: _GIVEN_ONLY_KEYS)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a dict of model sizes, got {type(spec).__name__}")
    known = _SPEC_KEYS + _GIVEN_ONLY_KEYS
    unknown = [key for key in spec if key not in known]
    if unknown:
        raise ValueError(f"spec holds unknown key(s) {unknown}; the known keys are {list(known)}")
    if "family" in spec and not (isinstance(spec["family"], str) and spec["family"] in _FAMILIES):
        raise ValueError(f"spec['family'] = {spec['family']!r} is not a known model family (one "
                         f"of {', '.join(map(repr, _FAMILIES))})")
    for key, value in spec.items():
        least = 1 if key in _POSITIVE_KEYS else 0
        sound = (isinstance(value, str) if key in ("model_type", "family")
                 else isinstance(value, int) and not isinstance(value, bool) and value >= least)
        if not sound:
            raise ValueError(f"spec[{key!r}] = {value!r} is not a valid model size")
    return {key: spec[key] for key in _SPEC_KEYS if key in spec}


def _check_model(model) -> None:
    """Raise TypeError unless `model` is a torch.nn.Module (a string or a path is no model)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a HuggingFace model), got "
                        f"{type(model).__name__} {model!r:.80}")


def _check_fraction(name: str, value) -> None:
    """Raise naming `name` unless `value` is a real number (not a bool or a tensor) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} "
                        f"{value!r:.80}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


_SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed takes


def _as_seed(seed) -> int:
    """`seed` as an int (a Python or numpy integer, not a bool) in torch's seed range."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r:.80}")
    low, high = _SEED_RANGE
    if not low <= int(seed) <= high:
        raise ValueError(f"seed must be in [{low}, {high}] (torch's seed range), got {seed}")
    return int(seed)


def _score_rows(scores, name: str, shards: int) -> list:
    """The per-layer 1-D float64 score rows of `scores`; raises naming NaN or a layer whose
    units do not split into `shards`."""
    if isinstance(scores, Mapping):
        raise TypeError(f"the scores for {name} are a (layers, units) tensor or a list of 1-D "
                        "rows, one per layer from the first, not a dict (a mask's tables are "
                        "dicts by layer; scores cover every layer)")
    if isinstance(scores, torch.Tensor) and scores.dim() != 2:
        raise ValueError(f"the scores for {name} must be one row per layer (a 2-D tensor or a "
                         f"list of 1-D rows), got shape {tuple(scores.shape)}")
    rows = [torch.as_tensor(s, dtype=torch.float64) for s in scores]
    for layer, row in enumerate(rows):
        if row.dim() != 1:
            raise ValueError(f"the scores for {name} must be one 1-D row per layer; layer "
                             f"{layer} has shape {tuple(row.shape)}")
        if torch.isnan(row).any():
            raise ValueError(f"the scores for {name} hold NaN in layer {layer} "
                             f"({int(torch.isnan(row).sum())} of {row.numel()}); "
                             "a mask cannot rank NaN")
        if row.numel() % shards:
            raise ValueError(f"{name}: layer {layer} has {row.numel()} units, which do not "
                             f"split into {shards} equal shards")
    return rows


_UNITS = {"ffn_scores": ("intermediate_size", "neurons"), "head_scores": ("num_heads", "heads")}


def _fitting_rows(scores, name: str, shards: int, sizes: dict | None) -> list | None:
    """`_score_rows` of `scores` (None: None), checked by `_check_fit`."""
    if scores is None:
        return None
    rows = _score_rows(scores, name, shards)
    _check_fit(rows, name, sizes)
    return rows


def _check_fit(rows: list, name: str, sizes: dict | None) -> None:
    """Raise ValueError naming the mismatch unless the score rows fit the model sizes `sizes`
    records (None: no check): one row per layer, each one score per neuron (`ffn_scores`) or
    head (`head_scores`)."""
    sizes = sizes or {}
    layers = sizes.get("num_layers")
    if layers is not None and len(rows) != layers:
        raise ValueError(f"{name} cover {len(rows)} layers, but the model (spec) has {layers}")
    key, unit = _UNITS[name]
    size = sizes.get(key)
    for layer, row in enumerate(rows):
        if size is not None and row.numel() != size:
            raise ValueError(f"{name}: layer {layer} has {row.numel()} scores, but the model "
                             f"(spec) has {size} {unit} per layer ({key})")


def _check_ranking(scope: str, shards: int) -> None:
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")


def unit_weights(spec: dict) -> tuple[int, int]:
    """(weights of one FFN neuron, weights of one attention head) of a model of these sizes:
    a neuron's rows of the up (and gate) projection and its column of the down projection, in
    every expert of a mixture-of-experts layer (a mask's neuron index applies to each of its
    `num_experts` experts); a head's query rows and output-projection columns, plus its share of
    the key and value rows (num_kv_heads / num_heads of a head's, under grouped-query
    attention). Biases are left out."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"ranking heads with neurons needs the model's sizes (a dict, as "
                         f"ModelSpec.as_dict() gives), got {type(spec).__name__}")
    _as_spec(spec)  # known keys, sound sizes (no zero heads) and a known family, before use
    spec = {"family": _FAMILY_OF_TYPE.get(spec.get("model_type")), **spec}  # (a mask's spec)
    missing = [k for k in ("family", "hidden_size", "head_dim", "num_heads", "num_kv_heads")
               if spec.get(k) is None]
    if missing:
        raise ValueError(f"ranking heads with neurons needs the model's sizes; spec lacks "
                         f"{missing}")
    hidden, head_dim = spec["hidden_size"], spec["head_dim"]
    experts = max(1, spec.get("num_experts") or 0)
    neuron = hidden * (2 if spec["family"] == "bert" else 3) * experts
    head = hidden * head_dim * (2 + 2 * spec["num_kv_heads"] / spec["num_heads"])
    return neuron, round(head)


def _joint_counts(ffn: list, heads: list, keep: float, weights: tuple, scope: str) -> list:
    """[(neurons kept, heads kept)] per layer: units taken by score per weight, from the top,
    while the weights taken stay within `keep` of the group's (all layers, or each layer)."""
    groups = [range(len(ffn))] if scope == "global" else [[l] for l in range(len(ffn))]
    counts = [None] * len(ffn)
    for layers in groups:
        parts = [row for l in layers for row in (ffn[l], heads[l])]
        cost = torch.cat([torch.full_like(row, float(weights[i % 2]))
                          for i, row in enumerate(parts)])
        order = (torch.cat(parts) / cost).argsort(descending=True, stable=True)
        spent = cost[order].cumsum(0)
        chosen = torch.zeros(cost.numel(), dtype=torch.bool)
        chosen[order[:int((spent <= keep * float(cost.sum()) * (1 + 1e-12)).sum())]] = True
        taken = [int(part.sum()) for part in chosen.split([r.numel() for r in parts])]
        for i, l in enumerate(layers):
            counts[l] = (taken[2 * i], taken[2 * i + 1])
    return counts


def _top(scores, keep: float, scope: str, name: str, shards: int = 1, rows=None):
    """{layer: kept indices} of the top `keep` of `scores` (`rows`: their `_score_rows`, if
    already made)."""
    if scores is None:
        return {}
    _check_fraction(name, keep)
    rows = _score_rows(scores, name, shards) if rows is None else rows
    if scope == "layer":
        counts = [round(r.numel() * keep) for r in rows]
    else:
        flat = torch.cat(rows)
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.topk(flat, round(flat.numel() * keep)).indices] = True
        counts = [int(part.sum()) for part in chosen.split([r.numel() for r in rows])]
    return {l: _balanced_top(r, k, shards) for l, (r, k) in enumerate(zip(rows, counts))}


def _balanced_top(row: torch.Tensor, count: int, shards: int) -> torch.Tensor:
    """The sorted indices of the `count` top-scored units of `row`, the same number (give or take
    one: the extra ones go to the shards whose next unit scores highest) from each of `shards`
    equal contiguous shards; shards=1 is the plain top-k."""
    size = row.numel() // shards
    values, order = row.reshape(shards, size).sort(dim=1, descending=True, stable=True)
    base, extra = divmod(count, shards)
    quota = torch.full((shards,), base, dtype=torch.long)
    if extra:
        quota[torch.topk(values[:, base], extra).indices] += 1
    kept = [order[s, :quota[s]] + s * size for s in range(shards)]
    return torch.cat(kept).sort().values


KEEP_ALL = ExpertMask()  # the whole model: one mask object, so that its prepared plans are reused
