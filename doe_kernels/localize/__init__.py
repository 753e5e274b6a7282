"""localize: find a task's expert (DoE, arXiv 2404.11916) and return it as an `Expert`.

Three steps: prompt tuning (`prompt`), attribution of every FFN neuron and attention head
(`attribution`), and a binary search for the highest pruning rate whose validation accuracy stays
within a tolerance of the unpruned prompt-tuned model (`search`), each candidate measured through
`doe_kernels.patch`, i.e. on the kernels that will serve it. Optionally, every candidate's prompt
and head are first re-tuned on its pruned network (`recover`).
"""
import collections
import time
import warnings

from tqdm.auto import tqdm

from doe_kernels.expert import (CAUSAL_LM, DEFAULT_TEMPLATE, Expert, check_template, detect_task_type,
                                label_token_ids, model_sizes)
from doe_kernels.localize.attribution import attribute
from doe_kernels.localize.prompt import PromptResult, train_prompt
from doe_kernels.localize.recover import TrainingDiverged, masked, retune
from doe_kernels.localize.search import mask_at_rate, paired_change, search_rate
from doe_kernels.patching import is_patched

__all__ = ["localize", "attribute", "train_prompt", "search_rate", "mask_at_rate", "retune",
           "masked", "weak_baseline", "paired_change"]


def localize(model, tokenizer, train, validation=None, *, label_words=None, template=None,
             num_virtual_tokens: int = 10, epochs: int = 5, lr: float = 3e-2,
             head_lr: float = 1e-2, batch_size: int = 16, max_length: int = 128,
             method: str = "grad", ig_steps: int = 5, attribution_examples: int = 256,
             absolute: bool = True, scope: str = "layer", prune_heads: bool = True, tolerance: float = 0.01,
             max_rate: float = 0.95, resolution: float = 0.01, backend: str = "auto",
             recover_epochs: int = 0, recover_examples: int = 1024,
             recover_lr: float | None = None, confidence: float = 0.0, seed: int = 0,
             progress: bool = True, start_from: Expert | None = None,
             prompt_init: str | None = None) -> Expert:
    """Localize the expert of the task in `train` (a `doe_kernels.data.TaskData`).

    model: a BERT-family `...ForSequenceClassification` (its classifier is trained with the
    prompt; build it with `num_labels=len(train.label_names)`) or a LLaMA-family `...ForCausalLM`
    (scored through `label_words`, default " " + each label name, as the next token after
    `template`, default "{text}\\nAnswer:"). The model is left as it was (unpatched, same
    weights); the trained head lives in the Expert and is plugged by `expert.plugged`.

    1. Prompt tuning: `num_virtual_tokens` soft tokens (and the head) trained with PEFT for
       `epochs` on `train` (AdamW, `lr` for the prompt, `head_lr` for the head). They start as
       random vocabulary tokens' embeddings, or with `prompt_init="some text"` as that text's
       tokens' (cycled; PEFT's TEXT init, which helps small models that learn slowly).
    2. Attribution on the unpatched model with the prompt: activation x gradient of the gold
       label's logit per FFN neuron and head, averaged over tokens and over
       `attribution_examples` training examples (default 256, drawn at random);
       `method="ig"` for integrated gradients with `ig_steps` steps (2 x layers x steps times the
       passes). `absolute` (default) averages each example's score in magnitude (see
       `attribution.attribute`).
    3. Binary search over the pruning rate in [0, `max_rate`] (to `resolution`): the same rate for
       neurons and heads (`prune_heads=False` keeps every head), top-scored units kept, for the
       highest rate whose accuracy on `validation` (default: 20% split off `train`) is at least
       the unpruned prompt-tuned accuracy minus `tolerance` (default 0.01, one point). A
       warning says when that baseline is weak: no better than always answering the most
       frequent label, or (causal LMs) below the model without a prompt; the search then finds
       rates that say little (e.g. a prompt at chance "keeps" its accuracy at any rate).
       `confidence=z` (default 0: the paper's rule) also asks a candidate to clear z paired
       standard errors of its change from the baseline on the same validation examples
       (`search.paired_change`): change - z * SE >= -tolerance. A binary search keeps the
       highest rate that passed, so on a small validation set it tends to return one that passed
       by luck and loses more on new examples; z = 1 trades some pruning for an expert whose
       accuracy holds (`figures["search"]` lists each step's rate, accuracy, verdict and SE).
    4. Recovery (off by default, `recover_epochs=0`: the paper's method). With
       `recover_epochs=k`, each candidate of the search has its prompt and head trained for k
       more epochs on `recover_examples` training examples (default 1024, drawn at random)
       through its own pruned network (`recover.retune`, at `recover_lr`, default `lr`; the
       head at `head_lr`) before it is evaluated, and the expert returned carries the re-tuned
       prompt and head. The baseline is given the same extra training first (the unpruned
       prompt and head re-tuned the same way on the same examples;
       `figures["accuracy_before_recovery"]` is its accuracy before), so that what the search
       credits to pruning is not the gain of training longer; `expert.dense()` is that
       baseline (a warning says when that training lowered it by more than the tolerance:
       `recover_lr` is then likely too high). Pruning then costs far less accuracy (the
       README's unplug-and-play tables compare the two), at the price of one short training
       run per search step.

    `start_from`: an Expert of the same task and model whose soft prompt (and head) are reused
    (its `dense()` ones: for an expert found with recovery, its baseline's):
    prompt tuning is skipped and only attribution and the search run (to try another `scope`,
    `prune_heads` or `tolerance` without training again).

    `scope="layer"` (default) keeps the same fraction in every layer: attribution scores are not
    calibrated across depth (activations and gradients differ in scale from layer to layer), so a
    global ranking can empty whole layers at high rates; a per-layer budget cannot, and it spreads
    the kernels' work evenly. `scope="global"` ranks all layers together. Measured on one of the
    README's tasks (SmolLM2-135M, 20 Newsgroups, `recover_epochs=1`), global ranking scored higher
    on validation at every rate and emptied no layer at the rates the search kept, so the example
    and the README use it.
    """
    started = time.perf_counter()
    if is_patched(model):
        raise ValueError("localize needs the unpatched model; call doe_kernels.unpatch(model) "
                         "first")
    if validation is None:
        parts = train.split((0.8, 0.2, 0.0), seed=seed)
        train, validation = parts["train"], parts["validation"]
    if len(train) == 0 or len(validation) == 0:
        raise ValueError("localize needs training and validation examples")
    if confidence < 0:
        raise ValueError(f"confidence must be >= 0 (standard errors), got {confidence}")
    if recover_epochs < 0 or recover_examples < 1:
        raise ValueError(f"need recover_epochs >= 0 and recover_examples >= 1, got "
                         f"{recover_epochs} and {recover_examples}")
    recover_lr = lr if recover_lr is None else recover_lr
    label_names = list(train.label_names)
    task_type = detect_task_type(model)
    token_ids = None
    if task_type == CAUSAL_LM:
        label_words = list(label_words or [" " + name for name in label_names])
        if len(label_words) != len(label_names):
            raise ValueError(f"{len(label_words)} label words for {len(label_names)} labels")
        token_ids = label_token_ids(tokenizer, label_words)
        if template is not None:
            check_template(template)
    else:
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != len(label_names):
            raise ValueError(f"the model has num_labels={num_labels}, the task has "
                             f"{len(label_names)} labels {label_names}")
        label_words = None
    was_training = model.training
    model.eval()
    try:
        if start_from is not None:
            tuned = _reuse(start_from, task_type, label_names, token_ids, template, max_length,
                           model)
            trained_with = {key: start_from.figures.get(key)
                            for key in ("prompt_epochs", "prompt_lr", "prompt_init")}
        else:
            trained_with = dict(prompt_epochs=epochs, prompt_lr=lr, prompt_init=prompt_init)
            tuned = train_prompt(model, tokenizer, train, task_type, token_ids, template,
                                 num_virtual_tokens, epochs, lr, head_lr, batch_size, max_length,
                                 seed, progress, init_text=prompt_init)
        sizes = model_sizes(model)
        tuned_expert = Expert(None, tuned.prompt, task_type, label_names, label_words, token_ids,
                              template, tuned.head, sizes, name=train.name, max_length=max_length)
        recover_data = (train.sample(recover_examples, seed=seed)
                        if len(train) > recover_examples else train)
        dense, before_recovery = tuned_expert, None
        if recover_epochs:  # the baseline gets the extra training every candidate gets
            before_recovery = dense.evaluate(model, tokenizer, validation,
                                             batch_size=2 * batch_size)
            dense, _ = retune(model, tokenizer, dense, recover_data, recover_epochs, recover_lr,
                              head_lr, batch_size, seed, progress=False)
        baseline_correct = dense.correct(model, tokenizer, validation, batch_size=2 * batch_size)
        baseline = float(baseline_correct.float().mean())
        baseline_answers = baseline_correct.tolist()
        if before_recovery is not None and baseline < before_recovery - tolerance:
            warnings.warn(f"localize({train.name!r}): the recovery's training lowered the "
                          f"unpruned baseline's validation accuracy from {before_recovery:.3f} "
                          f"to {baseline:.3f}; try a lower recover_lr (now {recover_lr:g})",
                          stacklevel=2)
        zero_shot = None
        if task_type == CAUSAL_LM:  # the dense model scored through the label words, no prompt
            bare = Expert(None, tuned.prompt[:0], task_type, label_names, label_words, token_ids,
                          template, None, sizes, max_length=max_length)
            zero_shot = bare.evaluate(model, tokenizer, validation, batch_size=2 * batch_size)
        majority = max(collections.Counter(validation.labels).values()) / len(validation)
        for problem in weak_baseline(baseline, zero_shot, majority):
            warnings.warn(f"localize({train.name!r}): {problem}; the search keeps accuracy "
                          "within the tolerance of this baseline, so its pruning rate says "
                          "little (train the prompt longer, or with another lr)", stacklevel=2)
        ffn_scores, head_scores = attribute(model, tokenizer, tuned_expert, train, method,
                                            ig_steps, attribution_examples, batch_size, absolute,
                                            seed, progress)
        spec = sizes  # ExpertMask keeps only the keys it checks

        def candidate(rate, start=tuned_expert):
            return Expert(mask_at_rate(ffn_scores, head_scores, rate, scope, prune_heads, spec),
                          start.prompt, task_type, label_names, label_words, token_ids, template,
                          start.head, sizes, name=train.name, max_length=max_length)

        bar = tqdm(desc="pruning-rate search", disable=not progress, leave=False)
        evaluated, change_se = {}, {}

        def accuracy(rate):
            expert = candidate(rate)
            if recover_epochs:
                try:
                    expert, _ = retune(model, tokenizer, expert, recover_data, recover_epochs,
                                       recover_lr, head_lr, batch_size, seed, progress=False)
                except TrainingDiverged:  # this rate fails; the search goes on
                    change_se[rate] = 0.0
                    bar.update(1)
                    return 0.0
            evaluated[rate] = expert
            with expert.plugged(model, backend=backend):
                correct = expert.correct(model, tokenizer, validation, batch_size=2 * batch_size)
            value = float(correct.float().mean())
            change_se[rate] = paired_change(correct.tolist(), baseline_answers)["change_se"]
            bar.update(1)
            bar.set_postfix(rate=f"{rate:.3f}", accuracy=f"{value:.3f}",
                            baseline=f"{baseline:.3f}")
            return value

        try:
            result = search_rate(accuracy, baseline, tolerance, 0.0, max_rate, resolution,
                                 margin=lambda rate: confidence * change_se[rate])
        finally:
            bar.close()
    finally:
        model.train(was_training)
    # nothing pruned passes (rate 0, never evaluated): the baseline itself, with a keep-all mask
    expert = evaluated[result.rate] if result.rate in evaluated else candidate(result.rate, dense)
    if recover_epochs:  # keep the baseline it was compared against (Expert.dense)
        expert.dense_prompt, expert.dense_head = dense.prompt, dense.head
    summary = expert.mask.summary()
    expert.figures = dict(
        pruning_rate=result.rate, ffn_pruning_rate=summary["ffn_pruning_rate"],
        head_pruning_rate=summary["head_pruning_rate"], accuracy_before=baseline,
        accuracy_before_recovery=before_recovery,
        accuracy_after=result.accuracy, accuracy_dense_no_prompt=zero_shot,
        accuracy_majority_label=majority, tolerance=tolerance, confidence=confidence,
        scope=scope, method=method, prune_heads=prune_heads, recover_epochs=recover_epochs,
        recover_lr=recover_lr if recover_epochs else None,
        recover_examples=len(recover_data) if recover_epochs else 0, num_train=len(train),
        num_validation=len(validation), prompt_losses=tuned.losses, **trained_with,
        search=[[rate, value, ok, change_se[rate]] for rate, value, ok in result.history],
        seconds=round(time.perf_counter() - started, 1))
    return expert


def weak_baseline(baseline: float, zero_shot: float | None, majority: float) -> list[str]:
    """What makes a prompt-tuned validation accuracy a poor baseline for the search: no better
    than always answering the most frequent label, or worse than the model without a prompt."""
    problems = []
    if baseline <= majority:
        problems.append(f"the prompt-tuned validation accuracy {baseline:.3f} is no better than "
                        f"always answering the most frequent label ({majority:.3f})")
    if zero_shot is not None and baseline < zero_shot:
        problems.append(f"the prompt-tuned validation accuracy {baseline:.3f} is below the "
                        f"model's without a prompt ({zero_shot:.3f})")
    return problems


def _reuse(expert: Expert, task_type: str, label_names: list, token_ids, template, max_length,
           model) -> PromptResult:
    """The prompt and head of `expert`, checked against the task, how it is asked, and the model."""
    if expert.task_type != task_type or list(expert.label_names) != label_names:
        raise ValueError(f"start_from is an expert for {expert.task_type} labels "
                         f"{list(expert.label_names)}, the task is {task_type} with {label_names}")
    if token_ids is not None and list(expert.label_token_ids) != list(token_ids):
        raise ValueError("start_from scores other label words than this call's label_words")
    if task_type == CAUSAL_LM and expert.template != (template or DEFAULT_TEMPLATE):
        raise ValueError(f"start_from was trained with the template {expert.template!r}, this "
                         f"call uses {template or DEFAULT_TEMPLATE!r}")
    if expert.max_length != max_length:
        raise ValueError(f"start_from was trained with max_length={expert.max_length}, this call "
                         f"uses {max_length}")
    expert.check_fits(model)
    dense = expert.dense()  # an expert found with recovery: its baseline's prompt and head
    return PromptResult(dense.prompt, dense.head, list(expert.figures.get("prompt_losses", [])))
