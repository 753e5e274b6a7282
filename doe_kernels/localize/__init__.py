"""localize: find a task's expert (DoE, arXiv 2404.11916) and return it as an `Expert`.

Three steps: prompt tuning (`prompt`), attribution of every FFN neuron and attention head
(`attribution`), and a binary search for the highest pruning rate whose validation accuracy stays
within a tolerance of the unpruned prompt-tuned model (`search`), each candidate measured through
`doe_kernels.patch`, i.e. on the kernels that will serve it. Every candidate's pruned layers are
first reconstructed (scales and bias deltas fitted on task data, `compensate` and `layerwise`,
the variant kept by `reconstruct`), and optionally its prompt and head re-tuned on its pruned
network (`recover`). Each step's options are a small frozen dataclass (`config`: PromptConfig,
AttributionConfig, SearchConfig, RecoveryConfig) whose defaults are the paper's method plus the
reconstruction, which measured best; docs/localize.md describes each option and what was
measured.
"""
import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from doe_kernels.backends import resolve
from doe_kernels.caller_state import evaluating, in_own_modes, warn_caller
from doe_kernels.data import check_task_data
from doe_kernels.expert import (CAUSAL_LM, DEFAULT_TEMPLATE, Expert, as_list, check_batch_size,
                                check_max_length, check_positions, check_template,
                                check_tokenizer_given, detect_task_type, encode, label_token_ids,
                                model_sizes, numbered)
from doe_kernels.localize.attribution import attribute, hook_points
from doe_kernels.localize.compensate import Calibration, reconstruction
from doe_kernels.localize.config import (AttributionConfig, PromptConfig, RecoveryConfig,
                                         SearchConfig, configs_from_flat)
from doe_kernels.localize.layerwise import layerwise_reconstruction
from doe_kernels.localize.prompt import (PromptResult, check_trainable, resolve_precision,
                                         start_text, train_prompt)
from doe_kernels.localize.reconstruct import Fidelity, Reconstructor, split_for_judging
from doe_kernels.localize.recover import TrainingDiverged, masked, retune
from doe_kernels.localize.search import mask_at_rate, paired_change, search_rate
from doe_kernels.mask import _as_seed
from doe_kernels.patching import is_patched

__all__ = ["localize", "PromptConfig", "AttributionConfig", "SearchConfig", "RecoveryConfig",
           "attribute", "train_prompt", "search_rate", "mask_at_rate", "retune", "masked",
           "weak_baseline", "paired_change", "TrainingDiverged", "Calibration", "reconstruction",
           "layerwise_reconstruction"]

ZERO_SHOT_EXAMPLES = 256  # validation examples a causal LM's no-prompt check runs on


@in_own_modes
def localize(model, tokenizer, train, validation=None, *, label_words=None, template=None,
             prompt: PromptConfig | None = None, attribution: AttributionConfig | None = None,
             search: SearchConfig | None = None, recovery: RecoveryConfig | None = None,
             batch_size: int = 16, max_length: int = 128, backend: str = "auto", seed: int = 0,
             progress: bool = True, start_from: Expert | None = None, **deprecated) -> Expert:
    """Localize the expert of the task in `train` (a `doe_kernels.data.TaskData`).

    model: a BERT-family `...ForSequenceClassification` (its classifier is trained with the
    prompt; build it with `num_labels=len(train.label_names)`) or a LLaMA-family `...ForCausalLM`
    (scored through `label_words`, default " " + each label name, as the next token after
    `template`, default "{text}\\nAnswer:"). The model is left as it was (unpatched, same
    weights); the trained head lives in the Expert and is plugged by `expert.plugged`.
    `validation` defaults to 20% split off `train` (with `seed`).

    The steps, each configured by its own frozen dataclass (the defaults are the recipe that
    measured best: FFN neurons ranked across layers, heads kept, step 4's reconstruction and one
    epoch of distillation kept where it helps, confidence 1; docs/localize.md describes every
    option, the paper's plain recipe and what was measured):
    1. `prompt=PromptConfig(...)`: soft tokens (and the head) trained with PEFT on `train`.
    2. `attribution=AttributionConfig(...)`: each FFN neuron and head scored on training
       examples with the prompt, on the unpatched model.
    3. `search=SearchConfig(...)`: the highest pruning rate (top-scored units kept) whose
       accuracy on `validation` is at least the unpruned prompt-tuned accuracy minus the
       tolerance. A warning says when that baseline is weak (no better than the most frequent
       label, or, for causal LMs, below the model without a prompt).
    4. `recovery=RecoveryConfig(...)`: each candidate's pruned layers reconstructed
       (least-squares scales of the kept units and bias deltas, fitted on
       `calibration_examples` training examples; `reconstruct="auto"` by default: the fit, or
       the plain mask, whose answers on held-out training examples stay closest to the
       unpruned model's; "scales", "layerwise", "bias" or "none" fix one), then, with
       `epochs=k` (1 by default), its prompt and head re-tuned for k epochs on its pruned
       network (the learning rate decayed linearly to zero) before it is measured: distilled
       from the unpruned prompt-tuned model, which stays the baseline (with
       `objective="labels"` the baseline is given the same training unpruned,
       `expert.dense()`); a candidate whose re-tuning diverges fails. With `keep="closer"`
       (the default) a candidate keeps its re-tuned prompt and head only if they bring its
       answers on held-out training examples closer to the unpruned model's. A warning says
       when training lowered the baseline by more than the tolerance.

    `batch_size` (training; evaluation uses twice it), `max_length` (tokens per example),
    `backend` (the kernels candidates are measured on), `seed` and `progress` apply to every
    step. `start_from`: an Expert of the same task and model whose soft prompt and head (its
    `dense()` ones) are reused: prompt tuning is skipped, attribution and the search run.

    The flat keywords of earlier versions (`epochs=`, `tolerance=`, `recover_epochs=`, ...) are
    still accepted with a DeprecationWarning and mapped onto the configs; giving one together
    with its config is a TypeError.
    """
    started = time.perf_counter()
    configs = configs_from_flat(dict(prompt=prompt, attribution=attribution, search=search,
                                     recovery=recovery), deprecated)
    prompt, attribution, search, recovery = (configs["prompt"], configs["attribution"],
                                             configs["search"], configs["recovery"])
    seed = _as_seed(seed)  # (None made a run that could not be repeated)
    split_here = validation is None  # (by localize: start_from's prompt must not have seen it)
    given = dict(train=train) if split_here else dict(train=train, validation=validation)
    train, validation = _checked_inputs(model, tokenizer, train, validation, search,
                                        attribution, recovery, start_from, prompt, batch_size,
                                        max_length, backend, seed)
    task = _Task.of(model, tokenizer, train, label_words, template, max_length)
    task.check_texts(tokenizer, **given)  # (places in the caller's data, before any split)
    run = _Run(model, tokenizer, task, batch_size, seed, progress, backend)
    with evaluating(model):
        with run.clock("prompt"):
            tuned, trained_with = _tune_prompt(run, train, prompt, start_from, split_here)
        tuned_expert = task.expert(None, tuned.prompt, tuned.head)
        with run.clock("recovery_setup"):  # the teacher's logits, the calibration's inputs
            recover = _Recovery.of(run, tuned_expert, train, prompt, recovery)
        with run.clock("baseline"):
            base = _baseline(run, tuned_expert, train.name, validation, recover,
                             search.tolerance)
        with run.clock("attribution"):
            ffn_scores, head_scores = attribute(
                model, tokenizer, tuned_expert, train, attribution.method, attribution.ig_steps,
                attribution.num_examples, batch_size, attribution.absolute, seed, progress)
        candidate = _Candidates(task, ffn_scores, head_scores, search)
        result, evaluated, change_se = _search(run, candidate, tuned_expert, base, validation,
                                               search, recover)
    # nothing pruned passes (rate 0, never evaluated): the baseline itself, with a keep-all mask
    expert = (evaluated[result.rate] if result.rate in evaluated
              else candidate(result.rate, base.dense))
    if recover.epochs:  # keep the baseline it was compared against (Expert.dense)
        expert.dense_prompt, expert.dense_head = base.dense.prompt, base.dense.head
    candidates = _candidate_figures(result, evaluated)  # before the chosen one's are replaced
    expert.figures = _figures(expert, result, change_se, base, recover, tuned.losses,
                              trained_with, search, attribution, len(train), len(validation),
                              time.perf_counter() - started, run.clock.rounded())
    expert.figures["search_candidates"] = candidates
    if recover.judge is not None:  # per candidate: (rate, KL before re-tuning, KL re-tuned)
        expert.figures["retuning_divergences"] = [
            [rate, e.figures["divergence_before_retuning"], e.figures["divergence_retuned"]]
            for rate, e in sorted(evaluated.items())]
    return expert


@dataclass(frozen=True)
class _Task:
    """How the task is asked and scored, and the sizes of the model: what every Expert that
    localize builds shares."""
    task_type: str
    label_names: list
    label_words: list | None
    token_ids: list | None
    template: str | None
    sizes: dict
    name: str
    max_length: int

    @classmethod
    def of(cls, model, tokenizer, train, label_words, template, max_length) -> "_Task":
        """Checked against the model: a causal LM's label words, a classifier's label count."""
        label_names = list(train.label_names)
        task_type = detect_task_type(model)
        token_ids = None
        if task_type == CAUSAL_LM:
            label_words = (as_list("label_words", label_words, str) if label_words is not None
                           else [" " + name for name in label_names])
            if len(label_words) != len(label_names):
                raise ValueError(f"{len(label_words)} label words for {len(label_names)} labels")
            token_ids = label_token_ids(tokenizer, label_words)
            if template is not None:
                check_template(template)
        else:
            if label_words is not None or template is not None:
                raise ValueError("label_words and template are for causal LMs; a classifier "
                                 f"({type(model).__name__}) answers with its head")
            num_labels = getattr(model.config, "num_labels", None)
            if num_labels != len(label_names):
                raise ValueError(f"the model has num_labels={num_labels}, the task has "
                                 f"{len(label_names)} labels {label_names}")
            label_words = None
        return cls(task_type, label_names, label_words, token_ids, template, model_sizes(model),
                   train.name, max_length)

    def check_texts(self, tokenizer, **splits) -> None:
        """NoTokenError naming the split and place of the first example that encodes to no
        token with this task's template (its answer would be read at a padding position),
        before any training."""
        for split, data in splits.items():
            texts = list(data.texts)
            for start in range(0, len(texts), 512):
                with numbered(range(start, start + 512), f"{split} example"):
                    encode(tokenizer, texts[start:start + 512], self.task_type, self.template,
                           self.max_length)

    def expert(self, mask, prompt, head, name: str | None = None) -> Expert:
        return Expert(mask, prompt, self.task_type, self.label_names,
                      label_words=self.label_words, label_token_ids=self.token_ids,
                      template=self.template, head=head, sizes=self.sizes,
                      name=self.name if name is None else name, max_length=self.max_length)


class _Clock:
    """Seconds spent per step of one localize call (Expert.figures["step_seconds"]):
    `with clock("attribution"): ...` adds the block's time to that step's."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict:
        return {step: round(seconds, 1) for step, seconds in self.seconds.items()}


def _checked_inputs(model, tokenizer, train, validation, search, attribution, recovery,
                    start_from, prompt, batch_size, max_length, backend, seed):
    """(train, validation) once every argument of `localize` is checked (validation split off
    train when None): anything wrong raises before any work."""
    if is_patched(model):
        raise ValueError("localize needs the unpatched model; call doe_kernels.unpatch(model) "
                         "first")
    check_tokenizer_given(tokenizer)
    if start_from is not None and not isinstance(start_from, Expert):
        raise TypeError(f"start_from must be a doe_kernels.Expert (Expert.load(path) reads a "
                        f"file), got {type(start_from).__name__}")
    hook_points(model)  # a family attribution cannot score (Mixtral) is refused now
    check_task_data("train", train)
    if validation is not None:
        check_task_data("validation", validation)
    if search.rank == "jointly" and attribution.method != "fisher":
        raise ValueError(
            f"SearchConfig.rank='jointly' (--rank jointly) compares heads with neurons by score "
            f"per weight, which Fisher scores put on one scale and {attribution.method!r} scores "
            f"do not (a head then looks cheap, and most heads go first): use "
            f"AttributionConfig(method='fisher') (--method fisher)")
    check_batch_size(batch_size)
    check_max_length(max_length)
    weight = model.get_input_embeddings().weight
    resolve(backend, weight.device, weight.dtype, 1)  # a backend absent here is refused now
    if start_from is None or recovery.epochs:
        check_trainable(model)
    virtual_tokens = (prompt.num_virtual_tokens if start_from is None
                      else start_from.num_virtual_tokens)
    check_positions(model, max_length, virtual_tokens)
    _check_shards(model, search)
    given = len(train) if validation is None else None
    if validation is None:
        train, validation = split_validation(train, seed)
    if len(train) == 0 or len(validation) == 0:
        split = ("" if given is None else f" (the validation examples split off the {given} "
                 "given: give more, or a validation set)")
        raise ValueError(f"localize needs training and validation examples, got {len(train)} "
                         f"and {len(validation)}{split}")
    names = set(train.label_names)
    unknown = [label for label in dict.fromkeys(validation.labels) if label not in names]
    if unknown:
        raise ValueError(f"the validation examples hold labels {unknown[:5]} that are not among "
                         f"the task's labels {list(train.label_names)}")
    return train, validation


def _check_prompt_held_out(start_from: Expert, train, split_here: bool) -> None:
    """The search must not be judged on examples start_from's prompt was trained on, which a
    validation split drawn otherwise than that prompt's can hold (another seed, other training
    examples): ValueError when this call split validation off training examples other than the
    prompt's, a warning when validation was given (it may hold none of them). Experts recorded
    before prompt_trained_on are not checked."""
    trained_on = start_from.figures.get("prompt_trained_on")
    if trained_on is None or trained_on == train.digest():
        return
    problem = ("start_from's prompt was trained on other examples than this call's training "
               "split")
    if split_here:
        raise ValueError(f"{problem}, so the validation split drawn here may hold examples it "
                         "was trained on (the search would be judged on them): pass the same "
                         "training examples and seed as when it was trained, or a validation "
                         "set it was not trained on")
    warn_caller(f"{problem}: make sure the validation set holds none of the examples it was "
                "trained on (the search would be judged on them)")


def split_validation(train, seed: int) -> tuple:
    """(train, validation): the validation set localize holds out of `train` when given none,
    20% of it, drawn with `seed`."""
    parts = train.split((0.8, 0.2, 0.0), seed=seed)
    return parts["train"], parts["validation"]


def _check_shards(model, search: SearchConfig) -> None:
    """Raise ValueError when the model's neurons (and heads, when pruned) do not split into the
    search's tensor-parallel shards (the first candidate failed on it, after prompt tuning)."""
    sizes = model_sizes(model)
    units = dict(neurons=sizes["intermediate_size"])
    if search.prune_heads:
        units["heads"] = sizes["num_heads"]
    for what, count in units.items():
        if count % search.shards:
            raise ValueError(f"SearchConfig.shards={search.shards} (--tp-shards): the model's "
                             f"{count} {what} per layer do not split into {search.shards} "
                             "equal shards")


@dataclass(frozen=True)
class _Run:
    """What every step of one localize call works with."""
    model: object
    tokenizer: object
    task: _Task
    batch_size: int
    seed: int
    progress: bool
    backend: str = "auto"  # the kernels every patched forward runs on
    clock: _Clock = dataclasses.field(default_factory=_Clock)


def _tune_prompt(run: _Run, train, prompt: PromptConfig, start_from: Expert | None,
                 split_here: bool = False):
    """Step 1: (PromptResult, how its prompt was trained, for the figures); `start_from`'s
    prompt and head when given (`split_here`: whether localize drew the validation split)."""
    if start_from is not None:
        tuned = _reuse(start_from, run.task, run.model)
        _check_prompt_held_out(start_from, train, split_here)
        return tuned, {key: start_from.figures.get(key) for key in PROMPT_FIGURES}
    task = run.task
    init_text = start_text(prompt, task.task_type, task.label_words, task.label_names)
    tuned = train_prompt(run.model, run.tokenizer, train, task.task_type, task.token_ids,
                         task.template, prompt.num_virtual_tokens, prompt.epochs, prompt.lr,
                         prompt.head_lr, run.batch_size, task.max_length, run.seed,
                         run.progress, init_text=init_text, precision=prompt.precision,
                         batching=prompt.batching)
    return tuned, prompt_figures(prompt, init_text, run.model, train)


# Expert.figures keys that say how the prompt was trained (prompt_figures)
PROMPT_FIGURES = ("prompt_epochs", "prompt_lr", "prompt_init", "prompt_precision",
                  "prompt_batching", "prompt_trained_on")


def prompt_figures(prompt: PromptConfig, init_text: str | None, model, train) -> dict:
    """How a prompt was trained with `prompt` from `init_text` on `train`, as Expert.figures
    records it (PROMPT_FIGURES; `prompt_trained_on`: the training examples' TaskData.digest)."""
    return dict(prompt_epochs=prompt.epochs, prompt_lr=prompt.lr, prompt_init=init_text,
                prompt_precision=resolve_precision(prompt.precision, model),
                prompt_batching=prompt.batching, prompt_trained_on=train.digest())


@dataclass(frozen=True)
class _Recovery:
    """Step 4 as this call runs it: a candidate's reconstruction (`reconstructor`, None when
    off), then `retune(expert)`: its prompt and head re-tuned on `data` (off when `epochs` is
    0), on the labels or, with `teacher`, distilling the teacher's logits."""
    epochs: int
    lr: float  # RecoveryConfig.lr, by default the prompt's
    head_lr: float  # the prompt tuning's
    schedule: str  # RecoveryConfig.schedule
    data: object  # RecoveryConfig.num_examples training examples, drawn with the seed
    teacher: object  # distillation: the prompt-tuned expert's label logits on `data`, or None
    reconstruct: str  # RecoveryConfig.reconstruct
    reconstructor: Reconstructor | None  # fitted with the prompt-tuned expert's prompt
    keep: str  # RecoveryConfig.keep
    judge: Fidelity | None  # keep="closer" with distillation: training examples held out of
    # `data` and of the reconstruction's choice
    precision: str  # PromptConfig.precision, "auto" resolved for the model
    batching: str  # PromptConfig.batching

    @classmethod
    def of(cls, run: "_Run", tuned_expert: Expert, train, prompt: PromptConfig,
           recovery: RecoveryConfig) -> "_Recovery":
        distill = recovery.epochs and recovery.objective == "distill"
        _, _, held_out = split_for_judging(train, run.seed, recovery.calibration_examples)
        rest = sorted(set(range(len(train))) - set(held_out))
        judged = distill and recovery.keep == "closer" and bool(rest)
        pool = train.subset(rest) if judged else train  # never trained on what judges it
        data = (pool.sample(recovery.num_examples, seed=run.seed)
                if len(pool) > recovery.num_examples else pool)
        teacher = None
        if distill:
            teacher = tuned_expert.predict_logits(run.model, run.tokenizer, data.texts,
                                                  batch_size=2 * run.batch_size)
        reconstructor = None
        if recovery.reconstruct != "none":
            reconstructor = Reconstructor.collect(run, tuned_expert, train, recovery.reconstruct,
                                                  recovery.calibration_examples,
                                                  recovery.readout_weight)
        judge = (Fidelity.collect(run, tuned_expert, train.subset(held_out).texts) if judged
                 else None)
        return cls(recovery.epochs, prompt.lr if recovery.lr is None else recovery.lr,
                   prompt.head_lr, recovery.schedule, data, teacher, recovery.reconstruct,
                   reconstructor, recovery.keep, judge,
                   resolve_precision(prompt.precision, run.model), prompt.batching)

    @property
    def calibration_examples(self) -> int:
        return 0 if self.reconstructor is None else self.reconstructor.examples

    def __call__(self, run: "_Run", expert: Expert) -> Expert:
        """The candidate reconstructed, then re-tuned, as configured."""
        if self.reconstructor is not None:
            expert = self.reconstructor(run, expert)
        if not self.epochs:
            return expert
        retuned = self.retune(run, expert)
        if self.judge is None:
            retuned.figures = dict(retuned.figures, retuned=True)
            return retuned
        before, after = self.judge.divergence(run, expert), self.judge.divergence(run, retuned)
        kept = retuned if after < before else expert
        kept.figures = dict(kept.figures, retuned=kept is retuned,
                            divergence_before_retuning=before, divergence_retuned=after)
        return kept

    def retune(self, run: "_Run", expert: Expert) -> Expert:
        retuned, _ = retune(run.model, run.tokenizer, expert, self.data, self.epochs, self.lr,
                            self.head_lr, run.batch_size, run.seed, progress=False,
                            teacher=self.teacher, schedule=self.schedule,
                            precision=self.precision, batching=self.batching)
        return retuned


@dataclass(frozen=True)
class _Baseline:
    """The unpruned model the search compares candidates with, and its reference accuracies."""
    dense: Expert  # the prompt-tuned expert (with recovery: given the same extra training)
    accuracy: float  # its validation accuracy
    answers: list  # per validation example: was it right?
    before_recovery: float | None  # its accuracy before the recovery's training
    zero_shot: float | None  # causal LMs: the model without a prompt
    majority: float  # always answering the most frequent label


def _baseline(run: _Run, tuned_expert: Expert, name: str, validation, recover: _Recovery,
              tolerance: float) -> _Baseline:
    """The baseline (with recovery, re-tuned as every candidate will be), with warnings when it
    is weak or when the recovery's training lowered it."""
    model, tokenizer, task = run.model, run.tokenizer, run.task
    eval_batch = 2 * run.batch_size
    dense, before_recovery = tuned_expert, None
    # with labels, the baseline gets the extra training every candidate gets; distilling the
    # prompt-tuned model into itself would only add noise: it stays the baseline as it is
    if recover.epochs and recover.teacher is None:
        before_recovery = dense.evaluate(model, tokenizer, validation, batch_size=eval_batch)
        dense = recover.retune(run, dense)
    correct = dense.correct(model, tokenizer, validation, batch_size=eval_batch)
    accuracy = float(correct.double().mean())
    if before_recovery is not None and accuracy < before_recovery - tolerance:
        warn_caller(f"localize({name!r}): the recovery's training lowered the unpruned "
                    f"baseline's validation accuracy from {before_recovery:.3f} to "
                    f"{accuracy:.3f}; try a lower recover_lr (now {recover.lr:g})")
    zero_shot = tuned_on_same = None
    if task.task_type == CAUSAL_LM:  # the dense model scored through the label words, no prompt
        zero_shot, tuned_on_same = _zero_shot(run, tuned_expert, validation, correct)
    majority = max(collections.Counter(validation.labels).values()) / len(validation)
    for problem in weak_baseline(accuracy, zero_shot, majority, tuned_on_same):
        warn_caller(f"localize({name!r}): {problem}; the search keeps accuracy within the "
                    "tolerance of this baseline, so its pruning rate says little (train the "
                    "prompt longer, or with another lr)")
    return _Baseline(dense, accuracy, correct.tolist(), before_recovery, zero_shot, majority)


def _zero_shot(run: _Run, tuned_expert: Expert, validation, correct) -> tuple[float, float]:
    """(the model's accuracy without a prompt, the baseline's on the same examples): on at most
    ZERO_SHOT_EXAMPLES validation examples drawn with the run's seed (a check, not a figure the
    search uses: on the whole split it cost as much as evaluating a candidate)."""
    order = sorted(validation.sample_indices(ZERO_SHOT_EXAMPLES, seed=run.seed))
    bare = run.task.expert(None, tuned_expert.prompt[:0], None, name="task")
    zero_shot = bare.evaluate(run.model, run.tokenizer, validation.subset(order),
                              batch_size=2 * run.batch_size)
    return zero_shot, float(correct[order].double().mean())


@dataclass(frozen=True)
class _Candidates:
    """candidate(rate, start): the Expert keeping the top (1 - rate) of the scored units, with
    `start`'s prompt and head."""
    task: _Task
    ffn_scores: object
    head_scores: object
    search: SearchConfig

    def __call__(self, rate: float, start: Expert) -> Expert:
        mask = mask_at_rate(self.ffn_scores, self.head_scores, rate, self.search.scope,
                            self.search.prune_heads, self.task.sizes, self.search.shards,
                            self.search.rank)
        return self.task.expert(mask, start.prompt, start.head)


def _search(run: _Run, candidate: _Candidates, tuned_expert: Expert, base: _Baseline,
            validation, search: SearchConfig, recover: _Recovery):
    """Step 3 (with step 4 in each candidate): (SearchResult, {rate: the Expert measured},
    {rate: SE of its paired change from the baseline})."""
    model, tokenizer = run.model, run.tokenizer
    bar = tqdm(desc="pruning-rate search", disable=not run.progress, leave=False)
    evaluated, change_se = {}, {}

    def accuracy(rate):
        try:
            with run.clock("candidates_recovery"):
                expert = recover(run, candidate(rate, tuned_expert))
        except TrainingDiverged as error:  # this rate fails, whatever the tolerance
            warn_caller(f"localize({run.task.name!r}): the candidate at pruning rate "
                        f"{rate:.3f} fails: {error}")
            change_se[rate] = None
            bar.update(1)
            return None  # never measured: the search fails it (figures: accuracy None)
        evaluated[rate] = expert
        with run.clock("candidates_evaluation"), expert.plugged(model, backend=run.backend):
            correct = expert.correct(model, tokenizer, validation, batch_size=2 * run.batch_size)
        value = float(correct.double().mean())
        change_se[rate] = paired_change(correct.tolist(), base.answers)["change_se"]
        bar.update(1)
        bar.set_postfix(rate=f"{rate:.3f}", accuracy=f"{value:.3f}",
                        baseline=f"{base.accuracy:.3f}")
        return value

    try:
        result = search_rate(accuracy, base.accuracy, search.tolerance, 0.0, search.max_rate,
                             search.resolution,
                             margin=lambda rate: search.confidence * change_se[rate])
    finally:
        bar.close()
    return result, evaluated, change_se


def _figures(expert: Expert, result, change_se: dict, base: _Baseline, recover: _Recovery,
             prompt_losses: list, trained_with: dict, search: SearchConfig,
             attribution: AttributionConfig, num_train: int, num_validation: int,
             seconds: float, step_seconds: dict) -> dict:
    """What the expert records of how it was found (Expert.figures)."""
    summary = expert.mask.summary()
    return dict(
        pruning_rate=result.rate, ffn_pruning_rate=summary["ffn_pruning_rate"],
        head_pruning_rate=summary["head_pruning_rate"], accuracy_before=base.accuracy,
        accuracy_before_recovery=base.before_recovery,
        accuracy_after=result.accuracy, accuracy_dense_no_prompt=base.zero_shot,
        accuracy_majority_label=base.majority, tolerance=search.tolerance,
        confidence=search.confidence, scope=search.scope, method=attribution.method,
        prune_heads=search.prune_heads, rank=search.rank, recover_epochs=recover.epochs,
        recover_lr=recover.lr if recover.epochs else None,
        recover_schedule=recover.schedule if recover.epochs else None,
        recover_precision=recover.precision if recover.epochs else None,
        recover_batching=recover.batching if recover.epochs else None,
        recover_examples=len(recover.data) if recover.epochs else 0,
        recover_objective=("distill" if recover.teacher is not None else "labels")
        if recover.epochs else None,
        reconstruct=recover.reconstruct, calibration_examples=recover.calibration_examples,
        readout_weight=(recover.reconstructor.readout_weight
                        if recover.reconstruct not in ("none", "auto") else None),
        reconstruction=expert.figures.get("reconstruction"),
        recover_keep=recover.keep if recover.teacher is not None else None,
        retuned=expert.figures.get("retuned", bool(recover.epochs) and result.rate > 0),
        divergence_before_retuning=expert.figures.get("divergence_before_retuning"),
        divergence_retuned=expert.figures.get("divergence_retuned"),
        num_train=num_train,
        num_validation=num_validation, prompt_losses=prompt_losses, **trained_with,
        search=[[rate, value, ok, change_se[rate]] for rate, value, ok in result.history],
        seconds=round(seconds, 1), step_seconds=step_seconds)


def _candidate_figures(result, evaluated: dict) -> list[dict]:
    """Per search step (as `search`), how its candidate was recovered: the reconstruction's
    variant (and, with "auto", each variant's divergence) and whether it kept the re-tuning."""
    steps = []
    for rate, _, _ in result.history:
        figures = evaluated[rate].figures if rate in evaluated else {}
        steps.append(dict(rate=rate, reconstruction=figures.get("reconstruction"),
                          divergences=figures.get("reconstruction_divergences"),
                          retuned=figures.get("retuned")))
    return steps


def weak_baseline(baseline: float, zero_shot: float | None, majority: float,
                  baseline_on_zero_shot: float | None = None) -> list[str]:
    """What makes a prompt-tuned validation accuracy a poor baseline for the search: no better
    than always answering the most frequent label, or worse than the model without a prompt
    (`zero_shot`, compared with `baseline_on_zero_shot`: the baseline's accuracy on the examples
    `zero_shot` was measured on, by default `baseline`)."""
    problems = []
    if baseline <= majority:
        problems.append(f"the prompt-tuned validation accuracy {baseline:.3f} is no better than "
                        f"always answering the most frequent label ({majority:.3f})")
    same = baseline if baseline_on_zero_shot is None else baseline_on_zero_shot
    if zero_shot is not None and same < zero_shot:
        problems.append(f"the prompt-tuned validation accuracy {same:.3f} is below the "
                        f"model's without a prompt ({zero_shot:.3f}) on the same examples")
    return problems


def _reuse(expert: Expert, task: _Task, model) -> PromptResult:
    """The prompt and head of `expert`, checked against the task, how it is asked, and the model."""
    if expert.task_type != task.task_type or list(expert.label_names) != task.label_names:
        raise ValueError(f"start_from is an expert for {expert.task_type} labels "
                         f"{list(expert.label_names)}, the task is {task.task_type} with "
                         f"{task.label_names}")
    if task.token_ids is not None and list(expert.label_token_ids) != list(task.token_ids):
        raise ValueError("start_from scores other label words than this call's label_words")
    template = task.template or DEFAULT_TEMPLATE
    if task.task_type == CAUSAL_LM and expert.template != template:
        raise ValueError(f"start_from was trained with the template {expert.template!r}, this "
                         f"call uses {template!r}")
    if expert.max_length != task.max_length:
        raise ValueError(f"start_from was trained with max_length={expert.max_length}, this call "
                         f"uses {task.max_length}")
    expert.check_fits(model)
    dense = expert.dense()  # an expert found with recovery: its baseline's prompt and head
    return PromptResult(dense.prompt, dense.head, list(expert.figures.get("prompt_losses", [])))
