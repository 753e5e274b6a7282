"""localize's options, grouped by step in small frozen dataclasses; the defaults are the recipe
that measured best (docs/results.md): a causal LM's prompt started from its label words'
embeddings, the paper's method with a global ranking of FFN neurons (heads kept), each candidate
reconstructed and its prompt distilled for one epoch from the unpruned prompt-tuned model (the
learning rate decayed linearly to zero; the distilled prompt kept only where it brings held-out
answers closer), and the one-standard-error confidence rule; training under bfloat16 autocast
where the device computes bfloat16 natively.
The paper's plain recipe: scope="layer", prune_heads=True, confidence=0,
RecoveryConfig(epochs=0, reconstruct="none").

`PromptConfig` (prompt tuning), `AttributionConfig` (scoring units), `SearchConfig` (the
pruning-rate search) and `RecoveryConfig` (reconstructing each candidate, and re-tuning it on its
pruned network). Each field carries its command-line flag and help text in its
metadata (`option`), so the `doe-kernels localize` options are built from these classes
(`cli.add_config_options`) and docs/localize.md describes each option once. `FLAT_NAMES` maps
the flat keyword arguments that `localize` took before onto (config, field); `configs_from_flat`
resolves them (deprecated).
"""
import dataclasses
import math
import typing
from dataclasses import dataclass

from doe_kernels.caller_state import warn_caller
from doe_kernels.localize.prompt import BATCHINGS, PRECISIONS, SCHEDULES, STARTS


def option(default, flag, help, *, flat=None, choices=None, positive=False, aliases=(),
           metavar=None, legacy=False, negations=()):
    """A config field: `flag` (with `aliases`) on the command line, `help` there and in the docs,
    `negations` (a bool field's) flags that set it back to its default,
    `flat` the name of the flat `localize` keyword (and of the parsed argument) it replaces
    (default: the field's name; only `legacy` options, the ones localize took before the configs,
    are still accepted as flat keywords),
    `positive` asks for a number > 0 (`check_fields` checks every value when a config is built,
    from the API and the command line alike)."""
    return dataclasses.field(default=default, metadata=dict(
        flag=flag, aliases=tuple(aliases), help=help, flat=flat, choices=choices,
        positive=positive, metavar=metavar, legacy=legacy, negations=tuple(negations)))


def check_fields(config) -> None:
    """The checks every config shares, from its fields: each value of its default's type, numbers
    finite and >= 0 (> 0 where the field is `positive`), a choice among its `choices`."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, meta, default = getattr(config, field.name), field.metadata, field.default
        name = f"{type(config).__name__}.{field.name} ({meta['flag']})"
        if value is None and default is None:
            continue
        # the type a value must have: the default's, or the annotation's other than None
        kind = type(default) if default is not None else next(
            t for t in typing.get_args(hints[field.name]) if t is not type(None))
        kinds = (int, float) if kind is float else kind
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kinds):
            raise TypeError(f"{name} must be of type {kind.__name__}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = "> 0" if meta["positive"] else ">= 0"
            if not math.isfinite(value) or value < 0 or (meta["positive"] and value == 0):
                raise ValueError(f"{name} must be a finite number {low}, got {value}")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {meta['choices']}, got {value!r}")


@dataclass(frozen=True)
class PromptConfig:
    """Step 1, prompt tuning: soft tokens (and a classifier's head) trained with PEFT on the
    frozen model (AdamW), started from a text, the label words or random tokens."""
    num_virtual_tokens: int = option(
        10, "--virtual-tokens", "soft-prompt tokens", positive=True, legacy=True)
    epochs: int = option(
        5, "--epochs", "epochs of prompt tuning", legacy=True)
    lr: float = option(
        3e-2, "--lr", "learning rate of the soft prompt", positive=True, legacy=True)
    head_lr: float = option(
        1e-2, "--head-lr", "learning rate of a classifier's head, in recovery too", positive=True,
        legacy=True)
    init_text: str | None = option(
        None, "--prompt-init", "start the soft prompt as this text's token embeddings, cycled "
        "(default: as --prompt-start says)", flat="prompt_init", metavar="TEXT", legacy=True)
    precision: str = option(
        "auto", "--train-precision", "the model's forward and backward while training the "
        "prompt (and re-tuning candidates): 'float32' (in the model's own dtype), 'bfloat16' "
        "(under bfloat16 autocast; the prompt, head and loss stay float32) or 'auto' (bfloat16 "
        "for a float32 model on a device with native bfloat16: a GPU from Ampere on, a CPU with "
        "AVX512-BF16 or AMX)", choices=PRECISIONS)
    batching: str = option(
        "shuffled", "--train-batches", "how the training examples of each epoch are batched, "
        "while training the prompt and re-tuning candidates: 'shuffled' (in a random order) or "
        "'by_length' (shuffled, then within each pool of 50 batches sorted by token count and "
        "cut into batches, the batches in a random order: little padding to run)",
        choices=BATCHINGS)
    start: str = option(
        "auto", "--prompt-start", "without --prompt-init, where the soft prompt starts: "
        "'label_words' (the label words' token embeddings, cycled; a classifier's label names), "
        "'random' (random vocabulary tokens' embeddings) or 'auto' (label words for a causal "
        "LM, random tokens for a classifier)", choices=STARTS)

    def __post_init__(self):
        check_fields(self)
        if self.init_text is not None and self.start != "auto":
            raise ValueError(f"PromptConfig: give init_text (--prompt-init) or start "
                             f"(--prompt-start), not both (start={self.start!r})")


@dataclass(frozen=True)
class AttributionConfig:
    """Step 2, attribution: a score per FFN neuron and attention head over training examples:
    activation x gradient of the gold label's logit averaged over tokens and examples (or
    integrated gradients, or the Fisher information of a mask on the unit)."""
    method: str = option(
        "grad", "--method", "'grad' (activation x gradient of the gold logit), 'ig' (integrated "
        "gradients) or 'fisher' (squared gradient of each example's loss w.r.t. a unit's mask)",
        choices=("grad", "ig", "fisher"), legacy=True)
    ig_steps: int = option(
        5, "--ig-steps", "integrated gradients' steps (2 x layers x steps times the passes)",
        positive=True, legacy=True)
    num_examples: int = option(
        256, "--attribution-examples", "training examples scored, drawn at random",
        flat="attribution_examples", positive=True, legacy=True)
    absolute: bool = option(
        True, "--signed-scores", "average each example's signed score instead of its magnitude "
        "(not recommended)", legacy=True)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class SearchConfig:
    """Step 3, the binary search for the highest pruning rate whose validation accuracy stays
    within `tolerance` of the unpruned prompt-tuned model's."""
    tolerance: float = option(
        0.01, "--tolerance", "validation accuracy a candidate may lose (0.01: one point)",
        legacy=True)
    confidence: float = option(
        1.0, "--confidence", "paired standard errors of its validation change a candidate must "
        "clear beyond the tolerance (0: the paper's rule)", legacy=True)
    scope: str = option(
        "global", "--scope", "rank units across all layers ('global') or within each layer "
        "('layer', the paper's)", choices=("layer", "global"), legacy=True)
    prune_heads: bool = option(
        False, "--prune-heads", "prune attention heads too, at the same rate (the paper's)",
        negations=("--ffn-only", "--keep-heads"), legacy=True)
    max_rate: float = option(
        0.9, "--max-rate", "highest pruning rate tried", legacy=True)
    resolution: float = option(
        0.05, "--resolution", "the search stops when the rates it brackets are this close",
        positive=True, legacy=True)
    shards: int = option(
        1, "--tp-shards", "keep the same number of units of each layer in each of this many "
        "tensor-parallel shards (vLLM's tensor_parallel_size), so that no rank waits for "
        "another", positive=True, metavar="N")
    rank: str = option(
        "separately", "--rank", "with --prune-heads, rank heads and neurons 'separately' (each "
        "kind pruned at the rate) or 'jointly' (on one scale: each unit's score per weight it "
        "holds; the rate is then the share of the FFN and attention weights pruned, split "
        "between heads and neurons as the scores say; needs --method fisher)",
        choices=("separately", "jointly"))

    def __post_init__(self):
        check_fields(self)
        if self.max_rate > 1.0:
            raise ValueError(f"SearchConfig.max_rate (--max-rate) must be <= 1, got "
                             f"{self.max_rate}")
        _check_tolerance(self.tolerance)
        if self.rank == "jointly" and not self.prune_heads:
            raise ValueError("SearchConfig.rank='jointly' (--rank jointly) ranks heads with "
                             "neurons: it needs prune_heads=True (--prune-heads)")


def _check_tolerance(tolerance: float) -> None:
    """A tolerance is a fraction of accuracy (0.01: one point): ValueError above 1 (meant as
    points), a warning above 0.1 (0.5 meant as half a point lets a candidate lose fifty; 1 lets
    every candidate pass, which tests use)."""
    what = "SearchConfig.tolerance (--tolerance) is a fraction of accuracy (0.01: one point)"
    if tolerance > 1:
        raise ValueError(f"{what} of at most 1, got {tolerance}")
    if tolerance > 0.1:
        warn_caller(f"{what}: {tolerance} lets a candidate lose {tolerance * 100:g} points")


@dataclass(frozen=True)
class RecoveryConfig:
    """Step 4 (not in the paper), recovery: each candidate's pruned layers reconstructed (scales
    and bias deltas fitted on task data, `reconstruct`: "auto" by default) and its prompt and head
    re-tuned on its pruned network (`epochs`, one by default; distilled from the unpruned
    prompt-tuned model by default) before it is measured."""
    epochs: int = option(
        1, "--recover-epochs", "epochs of re-tuning each candidate (0: no re-tuning, the paper's)",
        flat="recover_epochs", legacy=True)
    lr: float | None = option(
        None, "--recover-lr", "learning rate of the re-tuned prompt (default: the prompt's lr)",
        flat="recover_lr", positive=True, legacy=True)
    num_examples: int = option(
        1024, "--recover-examples", "training examples re-tuned on, drawn at random",
        flat="recover_examples", positive=True, legacy=True)
    objective: str = option(
        "distill", "--recover-objective", "what re-tuning trains on: 'distill' (KL divergence "
        "from the unpruned prompt-tuned model's label distribution; that model stays the "
        "baseline as it is) or 'labels' (cross-entropy on the gold labels; the unpruned "
        "baseline gets the same epoch)", choices=("labels", "distill"))
    reconstruct: str = option(
        "auto", "--reconstruct", "fit each candidate's reconstruction before any re-tuning: "
        "'scales' (least-squares scales of the kept units and bias deltas, each layer fitted on "
        "the unpruned model's inputs), 'layerwise' (the same fitted layer by layer on the pruned "
        "model's inputs: two to three passes over the calibration examples per candidate), "
        "'bias' (FLAP's bias compensation), 'none' (the paper's plain mask) or 'auto' (the "
        "plain mask, scales or layer-wise, each with and without read-out weighting: the one "
        "whose answers on held-out training examples stay closest to the unpruned model's)",
        choices=("scales", "layerwise", "bias", "none", "auto"))
    calibration_examples: int = option(
        256, "--calibration-examples", "training examples the reconstruction is fitted on, "
        "drawn at random", positive=True)
    readout_weight: float = option(
        0.0, "--readout-weight", "in the reconstruction's least squares, the token the answer is "
        "read from (a classifier's first, a causal LM's last) weighs 1 + this x its example's "
        "other tokens (0: every token alike; --reconstruct auto tries 0 and 1)")
    schedule: str = option(
        "linear", "--recover-schedule", "the re-tuning's learning rates: decayed linearly to zero "
        "over its steps ('linear') or held ('constant', as the prompt tuning's)",
        choices=SCHEDULES)
    keep: str = option(
        "closer", "--recover-keep", "which prompt and head a distilled candidate is measured "
        "with: 'closer' (the re-tuned ones only when its answers on held-out training examples "
        "stay closer, in mean KL divergence, to the unpruned model's than before re-tuning; "
        "else the reconstructed candidate's own) or 'retuned' (always the re-tuned ones)",
        choices=("closer", "retuned"))

    def __post_init__(self):
        check_fields(self)


# localize's keyword for each config, and the config it takes
CONFIGS = {"prompt": PromptConfig, "attribution": AttributionConfig, "search": SearchConfig,
           "recovery": RecoveryConfig}


def flat_name(field: dataclasses.Field) -> str:
    """The flat `localize` keyword a config field replaces."""
    return field.metadata.get("flat") or field.name


# flat keyword -> (localize's config keyword, field name)
FLAT_NAMES = {flat_name(f): (key, f.name) for key, cls in CONFIGS.items()
              for f in dataclasses.fields(cls) if f.metadata["legacy"]}


def configs_from_flat(configs: dict, flat: dict) -> dict:
    """{"prompt": PromptConfig, ...}: each config given in `configs` (None: not given), else built
    from the deprecated flat keywords in `flat` (a DeprecationWarning names the new spelling),
    else the default. A flat keyword with its config also given is a TypeError, so is an unknown
    keyword."""
    unknown = sorted(set(flat) - set(FLAT_NAMES))
    if unknown:
        raise TypeError(f"localize() got an unexpected keyword argument {unknown[0]!r}")
    out = {}
    for key, cls in CONFIGS.items():
        given = configs.get(key)
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"localize({key}=...) takes a {cls.__name__}, got "
                            f"{type(given).__name__}")
        fields = {field: flat[name] for name, (group, field) in FLAT_NAMES.items()
                  if group == key and name in flat}
        if fields and given is not None:
            raise TypeError(f"localize() got {', '.join(_flat_for(key, fields))} and {key}=; give "
                            f"the {key} options in {key}={cls.__name__}(...) only")
        if fields:
            spelled = ", ".join(f"{field}={value!r}" for field, value in fields.items())
            warn_caller(f"localize({', '.join(_flat_for(key, fields))}) is deprecated: use "
                        f"localize(..., {key}={cls.__name__}({spelled}))", DeprecationWarning)
            given = cls(**fields)
        out[key] = cls() if given is None else given
    return out


def _flat_for(key: str, fields: dict) -> list[str]:
    return [f"{name}=" for name, (group, field) in FLAT_NAMES.items()
            if group == key and field in fields]
