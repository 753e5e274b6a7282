"""Step 4's reconstruction as `localize` runs it: each candidate's scales and bias deltas fitted
on calibration examples (`compensate`, `layerwise`), or, with `reconstruct="auto"`, the variant
whose answers stay closest to the unpruned model's.

Reconstruction is a least-squares fit of layer outputs; what a task needs is the answers. On some
masks a fit moves the token the answer is read from, or collapses the model to one label
(docs/results.md). "auto" therefore fits every variant of `AUTO_VARIANTS` and keeps the one whose
label distribution has the smallest mean KL divergence from the unpruned prompt-tuned model's on
`FIDELITY_EXAMPLES` training examples that no fit has seen (`Fidelity`; on a training set too
small to leave two examples past the calibration's, the calibration's own): the plain mask when
every fit does worse. The choice is made without the validation set, which the search keeps for its
rule.
"""
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from doe_kernels.expert import Expert
from doe_kernels.localize.compensate import Calibration
from doe_kernels.localize.layerwise import (UnprunedTargets, layerwise_reconstruction,
                                            pruned_kinds)
from doe_kernels.models import spec_of

# (name, fit, read-out weight): what "auto" chooses from
AUTO_VARIANTS = (("plain", "none", 0.0), ("scales", "scales", 0.0),
                 ("layerwise", "layerwise", 0.0), ("scales, read-out weighted", "scales", 1.0),
                 ("layer-wise, read-out weighted", "layerwise", 1.0))
FIDELITY_EXAMPLES = 128  # training examples after the calibration ones, for "auto"'s choice


@dataclass(frozen=True)
class Fidelity:
    """Training examples that no fit sees, and the unpruned prompt-tuned model's label
    log-probabilities on them (float64): `divergence` says how far a candidate's answers are
    from that model's."""
    texts: list
    reference: torch.Tensor

    @classmethod
    def collect(cls, run, tuned_expert: Expert, texts) -> "Fidelity":
        dense = tuned_expert.predict_logits(run.model, run.tokenizer, texts,
                                            batch_size=2 * run.batch_size, backend=run.backend)
        return cls(list(texts), torch.log_softmax(dense.double(), -1))

    def divergence(self, run, candidate: Expert) -> float:
        """Mean KL divergence from the unpruned model's label distribution to the candidate's."""
        return mean_kl(self.reference, candidate.predict_logits(
            run.model, run.tokenizer, self.texts, batch_size=2 * run.batch_size,
            backend=run.backend))


class Reconstructor:
    """Fits a candidate's reconstruction as `RecoveryConfig.reconstruct` says: the calibration
    batches (per read-out weight, kept as lists) and their moments are gathered once per run, and
    so are the layer-wise fits' unpruned targets (on the first layer-wise fit)."""

    def __init__(self, mode: str, readout_weight: float, batches: dict, calibrations: dict,
                 fidelity: Fidelity | None, examples: int):
        self.mode = mode
        self.readout_weight = readout_weight
        self.batches = batches  # read-out weight -> calibration batches
        self.calibrations = calibrations  # read-out weight -> Calibration ("scales", "bias")
        self.fidelity = fidelity  # "auto": what it chooses the variant by
        self.examples = examples  # calibration examples
        self.unpruned = None  # the layer-wise fits' UnprunedTargets, shared by every candidate

    @classmethod
    def collect(cls, run, tuned_expert: Expert, train, mode: str, count: int,
                readout_weight: float) -> "Reconstructor":
        """Calibration on `count` training examples drawn with the run's seed, with
        `tuned_expert`'s prompt; for "auto", the variants' judges of `split_for_judging` (the
        next FIDELITY_EXAMPLES of the same draw, half of what is left when fewer, the
        calibration examples when at most one is left). Memory: "auto" holds two calibrations
        (read-out weights 0 and 1), each as `Calibration.collect` says."""
        calibration, variants, _ = split_for_judging(train, run.seed, count)
        texts = train.subset(calibration).texts
        judge = train.subset(variants).texts
        weights = (sorted({w for _, _, w in AUTO_VARIANTS}) if mode == "auto"
                   else [readout_weight])
        batches, calibrations = {}, {}
        for weight in weights:
            weighted = _batches(run, tuned_expert, texts, weight)
            if mode in ("layerwise", "auto"):  # the layer-wise fit runs the model on them
                weighted = batches[weight] = list(weighted)
            if mode in ("scales", "bias", "auto"):
                calibrations[weight] = Calibration.collect(run.model, weighted,
                                                           scales=mode != "bias")
        fidelity = Fidelity.collect(run, tuned_expert, judge) if mode == "auto" else None
        return cls(mode, readout_weight, batches, calibrations, fidelity, len(texts))

    def __call__(self, run, expert: Expert) -> Expert:
        """`expert` with its mask reconstructed (figures["reconstruction"]: the variant used;
        with "auto", figures["reconstruction_divergences"]: each variant's mean KL divergence)."""
        if self.mode != "auto":
            fitted = self._fit(run, expert.mask, self.mode, self.readout_weight)
            return _with_mask(run, expert, fitted, self.mode)
        best, divergences = None, {}
        for name, fit, weight in AUTO_VARIANTS:
            candidate = _with_mask(run, expert, self._fit(run, expert.mask, fit, weight), name)
            divergence = divergences[name] = self.fidelity.divergence(run, candidate)
            divergence = math.inf if math.isnan(divergence) else divergence  # (NaN logits)
            if best is None or divergence < best[0]:
                best = divergence, candidate
        chosen = best[1]
        chosen.figures = dict(chosen.figures, reconstruction_divergences=divergences)
        return chosen

    def _fit(self, run, mask, fit: str, weight: float):
        if fit == "none":
            return mask
        if fit == "layerwise":
            return layerwise_reconstruction(run.model, mask, self.batches[weight],
                                            unpruned=self._unpruned(run, mask))
        return self.calibrations[weight].fit(mask, scales=fit == "scales")

    def _unpruned(self, run, mask) -> UnprunedTargets | None:
        """The unpruned targets for `mask`'s fits (None until a mask prunes something), computed
        on the first read-out weight's batches (the others hold the same real tokens), again only
        when a mask prunes a kind of projection the earlier ones did not."""
        kinds = set(pruned_kinds(mask, spec_of(run.model)))
        held = set(self.unpruned.kinds) if self.unpruned is not None else set()
        if kinds and not kinds <= held:
            self.unpruned = UnprunedTargets(run.model, next(iter(self.batches.values())),
                                            kinds | held)
        return self.unpruned


def split_for_judging(train, seed: int, count: int) -> tuple[list, list, list]:
    """Indices in `train`, from the run's shuffle: (the calibration examples: the first `count`;
    the examples that choose the reconstruction's variant and those that judge a re-tuning: the
    next FIDELITY_EXAMPLES and the FIDELITY_EXAMPLES after them, or, when fewer than
    2 * FIDELITY_EXAMPLES are left, the rest split in two halves). The recovery does not train on
    the judges; the variant's choice, a minimum over its own examples, does not judge the
    re-tuning. Only when a single example or none is left after the calibration do the variants
    fall back to the calibration examples (and, with none left, the judges to the last quarter
    of the shuffle, at least one)."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    calibration, rest = order[:count], order[count:]
    half = min(FIDELITY_EXAMPLES, (len(rest) + 1) // 2)
    variants, retuning = rest[:half], rest[half:half + FIDELITY_EXAMPLES]
    if not retuning:  # one example left, or none
        variants, retuning = calibration, rest or order[len(order) - max(1, len(order) // 4):]
    return calibration, variants, retuning


def mean_kl(reference_log_probs: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over examples of the KL divergence from a reference label distribution (log
    probabilities, float64) to the one `logits` give."""
    log_probs = torch.log_softmax(logits.double(), -1)
    probs = reference_log_probs.exp()  # a label of probability 0 adds 0 (not 0 x -inf)
    terms = torch.where(probs > 0, probs * (reference_log_probs - log_probs), 0.0)
    return float(terms.sum(-1).mean())


def _batches(run, tuned_expert: Expert, texts, weight: float):
    batches = tuned_expert.calibration_batches(run.model, run.tokenizer, texts,
                                               2 * run.batch_size, weight)
    if run.progress:
        batches = tqdm(batches, total=-(-len(texts) // (2 * run.batch_size)),
                       desc="calibration", leave=False)
    return batches


def _with_mask(run, expert: Expert, mask, name: str) -> Expert:
    out = run.task.expert(mask, expert.prompt, expert.head)
    out.figures = dict(expert.figures, reconstruction=name)
    return out
