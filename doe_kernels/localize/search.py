"""Pruning-rate search: the highest rate whose accuracy stays within a tolerance of the baseline.

`search_rate` is a pure binary search over an `accuracy(rate) -> float` callable (unit-testable on
a synthetic curve); it assumes accuracy falls, by and large, as the rate grows. `paired_change`
is the accuracy change between two models on the same examples with its paired standard error
(what `localize(confidence=...)` adds to the tolerance). `mask_at_rate` turns attribution scores
into the `ExpertMask` of one rate (top-scored units kept, or heads and neurons on one scale).
"""
from dataclasses import dataclass, field

from doe_kernels.mask import ExpertMask


# Rounding allowed in the pass rule, above float32's (about 1e-7 near 1): a loss of exactly the
# tolerance (309 of 400 right against 313 of 400 at 0.01) passes however the accuracies were
# rounded, and on up to two million validation examples one example more lost (1/n) still fails.
EXACT = 5e-7


@dataclass
class SearchResult:
    rate: float  # the highest rate found that passes (0.0 when none does)
    accuracy: float | None  # accuracy at that rate (the baseline at 0.0; None for a `low`
    # above 0 that nothing beat, never evaluated)
    history: list = field(default_factory=list)  # (rate, accuracy or None, passed) in order


def search_rate(accuracy, baseline: float, tolerance: float = 0.01, low: float = 0.0,
                high: float = 0.95, resolution: float = 0.01, margin=None) -> SearchResult:
    """Binary search for the highest rate in [low, high] with accuracy(rate) >= baseline -
    tolerance + margin(rate), to within `resolution` (`margin`, a callable called after
    accuracy(rate), default 0: e.g. a multiple of the standard error of the measured change); a
    rate whose accuracy(rate) is None (not measured) fails.
    `low` is taken to pass (rate 0 is the baseline itself) and is never evaluated; `high` is tried
    last, only when every rate tried below it passed (high rates rarely pass: trying `high` first
    would cost a candidate in almost every search). Each rate is evaluated at most once; rates are
    rounded to 1e-6 so that masks are reproducible."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    threshold = baseline - tolerance - EXACT  # a change of exactly -tolerance passes
    history, seen = [], {}

    def passes(rate):
        rate = round(rate, 6)
        if rate not in seen:
            value = accuracy(rate)
            if value is None:  # not measured (its candidate could not be made): fails
                ok = False
            else:
                value = float(value)
                ok = value >= threshold + (float(margin(rate)) if margin is not None else 0.0)
            seen[rate] = value, ok
            history.append((rate, value, ok))
        return seen[rate][1]

    good, bad = low, high
    while bad - good > resolution:
        mid = (good + bad) / 2
        if passes(mid):
            good = mid
        else:
            bad = mid
    if bad == high and high > low and passes(high):  # nothing below `high` failed
        good = high
    good = round(good, 6)
    measured = seen[good][0] if good in seen else (baseline if good == 0 else None)
    return SearchResult(good, measured, history)


def paired_change(correct, baseline_correct) -> dict:
    """The accuracy change from a baseline to a candidate scored on the same examples
    (`correct`, `baseline_correct`: one bool per example), with its paired standard error: each
    example contributes +1, 0 or -1, so only the examples whose correctness changed add variance.
    Returns dict(change, change_se, gained, lost)."""
    steps = [int(bool(c)) - int(bool(b)) for c, b in zip(correct, baseline_correct, strict=True)]
    n = len(steps)
    if n == 0:
        raise ValueError("paired_change needs at least one example")
    mean = sum(steps) / n
    variance = sum((x - mean) ** 2 for x in steps) / (n - 1) if n > 1 else 0.0
    return dict(change=mean, change_se=(variance / n) ** 0.5, gained=steps.count(1),
                lost=steps.count(-1))


def mask_at_rate(ffn_scores, head_scores, rate: float, scope: str = "layer",
                 prune_heads: bool = True, spec: dict | None = None,
                 shards: int = 1, rank: str = "separately") -> ExpertMask:
    """The mask keeping the top (1 - rate) of neurons and, with `prune_heads`, of heads (as many
    in each of `shards` tensor-parallel shards of a layer); with `rank="jointly"` (and
    `prune_heads`), the units of the top scores per weight, holding (1 - rate) of the FFN and
    attention weights (`ExpertMask.from_scores_jointly`; needs `spec`)."""
    keep = 1.0 - rate
    if rank not in ("separately", "jointly"):
        raise ValueError(f"rank must be 'separately' or 'jointly', got {rank!r}")
    if rank == "jointly":
        if not prune_heads or spec is None:
            raise ValueError("rank='jointly' needs prune_heads=True and the model's sizes "
                             "(spec)")
        return ExpertMask.from_scores_jointly(ffn_scores, head_scores, keep, spec, scope,
                                              shards)
    return ExpertMask.from_scores(ffn_scores, head_scores if prune_heads else None,
                                  ffn_keep=keep, heads_keep=keep, scope=scope, spec=spec,
                                  shards=shards)
