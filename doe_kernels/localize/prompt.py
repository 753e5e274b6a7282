"""Prompt tuning: train a task's soft prompt on the frozen model with PEFT.

`train_prompt` wraps the model with PEFT prompt tuning (`wrap`), trains the virtual tokens (and,
for a `...ForSequenceClassification` model, the classification head, which PEFT's SEQ_CLS task
trains through `modules_to_save`) with cross-entropy over the label logits (`fit`: the classifier's
logits, or for a causal LM the next-token logits of the label words after the text and a short
template), reads the trained tensors out (`extract`) and takes PEFT out of the model again
(`unwrap`: the model's own modules and `requires_grad` flags come back). The model stays in eval
mode while training (no dropout), and its logits come from the forward that serves the expert
(`trained_label_logits`: PEFT's prompt and head, the inputs of `Expert.model_inputs`), not from
PEFT's own forward, which ignores position ids: there a left-padded causal LM's text would sit
further from its prompt the more padding its batch needs, a network the prompt never serves on
(on SmolLM2 that moved 3% of the answers), and distillation would chase a teacher measured on
another one.
"""
import contextlib
import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from doe_kernels.caller_state import evaluating, in_own_modes, seeded
from doe_kernels.expert import (SEQ_CLS, encode, numbered, prompted_label_logits,
                                token_counts)

_SAVED_ATTR = "_doe_kernels_saved"  # wrap's _Saved, on the PEFT model
SCHEDULES = ("constant", "linear")  # fit's learning-rate schedules
# fit's forward and backward: in the model's own dtype, under bfloat16 autocast, or "auto": autocast
# where the device computes bfloat16 natively and the model is float32
PRECISIONS = ("auto", "float32", "bfloat16")
# fit's batches each epoch: the examples shuffled, or shuffled then grouped by token count
BATCHINGS = ("shuffled", "by_length")
# where a prompt starts without a text: its label words' embeddings, random vocabulary tokens', or
# "auto": label words for a causal LM, random tokens for a classifier (start_text)
STARTS = ("auto", "label_words", "random")
CHOICES = dict(schedule=SCHEDULES, precision=PRECISIONS, batching=BATCHINGS)  # check_choices
LENGTH_POOL = 50  # batches whose examples "by_length" sorts together (as transformers' Trainer)


@dataclass
class PromptResult:
    prompt: torch.Tensor  # (virtual_tokens, hidden), float32 CPU
    head: dict | None  # trained head parameters by their name in the model, or None
    losses: list = field(default_factory=list)  # mean training loss per epoch


def wrap(model, task_type: str, num_virtual_tokens: int = 10, init_ids=None, seed: int = 0):
    """The model wrapped by PEFT prompt tuning (SEQ_CLS or CAUSAL_LM); the prompt starts as the
    embeddings of `init_ids` (token ids, cycled), by default of random vocabulary tokens."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    embeddings = model.get_input_embeddings().weight
    vocab = embeddings.shape[0]
    if init_ids is None:
        gen = torch.Generator().manual_seed(seed)
        init_ids = torch.randint(min(1000, vocab // 2), vocab, (num_virtual_tokens,), generator=gen)
    init_ids = torch.as_tensor(list(init_ids), dtype=torch.long)
    if init_ids.numel() and not 0 <= int(init_ids.min()) <= int(init_ids.max()) < vocab:
        raise ValueError(f"the prompt's init tokens {init_ids.tolist()} are not all ids of the "
                         f"model's {vocab}-token vocabulary (a tokenizer of another model?)")
    init_ids = init_ids[torch.arange(num_virtual_tokens) % init_ids.numel()]
    saved = _Saved.of(model)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS if task_type == SEQ_CLS else TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens)
    try:
        peft_model = get_peft_model(model, config)
    except BaseException:
        saved.put_back(model)
        raise
    setattr(peft_model, _SAVED_ATTR, saved)
    try:
        with torch.no_grad():
            weight = peft_model.prompt_encoder["default"].embedding.weight
            weight.copy_(embeddings[init_ids.to(embeddings.device)].to(weight.dtype))
    except BaseException:
        unwrap(peft_model)
        raise
    return peft_model


def trainable(peft_model):
    """(prompt parameters, head parameters) that prompt tuning trains."""
    prompt = list(peft_model.prompt_encoder.parameters())
    ids = {id(p) for p in prompt}
    head = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in ids]
    return prompt, head


def trained_label_logits(peft_model, input_ids, attention_mask, task_type: str,
                         token_ids=None):
    """(batch, num_labels) logits of the wrapped model with PEFT's trainable prompt (and head),
    computed as the expert is served (`doe_kernels.expert.prompted_label_logits`)."""
    prompt = peft_model.prompt_encoder["default"].embedding.weight
    return prompted_label_logits(peft_model.get_base_model(), input_ids, attention_mask, prompt,
                                 task_type, token_ids)


def start_text(prompt, task_type: str, label_words, label_names) -> str | None:
    """The text a prompt of `prompt` (a PromptConfig) starts from (None: random vocabulary
    tokens): its `init_text` when given, else by its `start` (STARTS) the label words (a
    classifier's label names), joined by spaces, as Lester et al.'s class-label
    initialisation."""
    if prompt.init_text is not None:
        return prompt.init_text
    if prompt.start == "random" or (prompt.start == "auto" and task_type == SEQ_CLS):
        return None
    return " ".join(str(word).strip() for word in (label_words or label_names))


def check_choices(**values) -> None:
    """Each of fit's named options (schedule, precision, batching) among its CHOICES."""
    for name, value in values.items():
        if value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")


def epoch_batches(order: list, batch_size: int, lengths: list | None = None,
                  rng: random.Random | None = None) -> list[list]:
    """One epoch's batches of the (already shuffled) `order`: in that order, or with `lengths`
    (each example's token count) grouped by length: each pool of LENGTH_POOL batches' examples
    sorted by length and cut into batches, the batches then shuffled with `rng` (little padding
    to run, no order of lengths through the epoch)."""
    if lengths is None:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    pool, batches = LENGTH_POOL * batch_size, []
    for start in range(0, len(order), pool):
        sorted_pool = sorted(order[start:start + pool], key=lengths.__getitem__)
        batches += epoch_batches(sorted_pool, batch_size)
    rng.shuffle(batches)
    return batches


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products natively (where autocast pays): a CUDA
    GPU with bfloat16 (Ampere on), a CPU with AVX512-BF16 or AMX. Other CPUs emulate them, slower
    than float32."""
    if device.type == "cuda":  # (is_bf16_supported() counts pre-Ampere GPUs' emulation too)
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def check_trainable(model) -> None:
    """Raise ValueError for float16 weights: AdamW's steps on the prompt and head underflow in
    float16 (its second moments reach 0 and the first step gives inf)."""
    dtype = model.get_input_embeddings().weight.dtype
    if dtype == torch.float16:
        raise ValueError("prompt tuning and re-tuning train in float32 (or bfloat16 autocast), "
                         "not on float16 weights: localize the float32 model (model.float()); "
                         "the expert it finds plugs into the float16 model")


def resolve_precision(precision: str, model) -> str:
    """"float32" or "bfloat16": `precision`, with "auto" resolved for `model` (bfloat16 autocast
    when its weights are float32 on a device with native bfloat16)."""
    check_choices(precision=precision)
    if precision != "auto":
        return precision
    weight = model.get_input_embeddings().weight
    native = weight.dtype == torch.float32 and bfloat16_is_native(weight.device)
    return "bfloat16" if native else "float32"


def autocast(device: torch.device, precision: str):
    """The context a training forward runs in: bfloat16 autocast on `device`, or nothing. Its
    cast cache is off: inside another autocast context (own_modes') it would outlive the step,
    and each forward would read the trained tensors' casts from before the optimizer's steps."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def fit(peft_model, tokenizer, data, task_type: str, token_ids=None, template=None,
        epochs: int = 5, lr: float = 3e-2, head_lr: float = 1e-2, batch_size: int = 16,
        max_length: int = 128, seed: int = 0, progress: bool = True,
        targets: torch.Tensor | None = None, schedule: str = "constant",
        extra_groups: list | None = None, precision: str = "auto",
        batching: str = "shuffled") -> list[float]:
    """Train the prompt (and head) with cross-entropy over the label logits, against the gold
    labels, or against `targets` ((len(data), num_labels) probabilities, e.g. a teacher's: then
    the loss is the KL divergence from them, up to their constant entropy); returns the mean loss
    of each epoch. `schedule`: the learning rates held ("constant") or decayed linearly to zero
    over the steps ("linear"). `extra_groups`: more optimizer parameter groups ({"params": [...],
    "lr": ...}) trained with them (not as part of the head). `precision`: "float32" runs the
    model in its own dtype; "bfloat16" runs its forward (and so its backward) under bfloat16
    autocast, the trained tensors and the loss staying float32; "auto" picks
    (`resolve_precision`). `batching`: each epoch's examples "shuffled" into batches, or
    shuffled and then batched "by_length" (`epoch_batches`)."""
    if targets is not None and tuple(targets.shape[:1]) != (len(data),):
        raise ValueError(f"targets has {targets.shape[0]} rows for {len(data)} examples")
    check_choices(schedule=schedule, batching=batching)
    check_trainable(peft_model.get_base_model())
    precision = resolve_precision(precision, peft_model.get_base_model())
    lengths = token_counts(tokenizer, data.texts) if batching == "by_length" else None
    gold_all = torch.tensor(data.label_ids) if targets is None else targets.float()
    prompt_params, head_params = trainable(peft_model)
    extra_groups = list(extra_groups or [])
    extra = {id(p) for group in extra_groups for p in group["params"]}
    head_params = [p for p in head_params if id(p) not in extra]
    groups = [{"params": prompt_params, "lr": lr}]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr})
    groups += extra_groups
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    device = peft_model.get_input_embeddings().weight.device
    order = list(range(len(data)))
    rng = random.Random(seed)
    peft_model.eval()
    losses = []
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    decay = (torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=steps)
             if schedule == "linear" else None)
    bar = tqdm(total=steps, desc="prompt tuning", disable=not progress, leave=False)
    for _ in range(epochs):
        rng.shuffle(order)
        total, count = 0.0, 0
        for chosen in epoch_batches(order, batch_size, lengths, rng):
            with numbered(chosen):  # (the example's place among the training examples)
                ids, attention = encode(tokenizer, [data.texts[i] for i in chosen], task_type,
                                        template, max_length)
            with autocast(device, precision):
                logits = trained_label_logits(peft_model, ids.to(device), attention.to(device),
                                              task_type, token_ids)
            loss = torch.nn.functional.cross_entropy(logits, gold_all[chosen].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if decay is not None:
                decay.step()
            value = float(loss.detach())
            total += value * len(chosen)
            count += len(chosen)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        losses.append(total / max(count, 1))
    bar.close()
    return losses


def extract(peft_model):
    """(prompt, head): the trained virtual tokens (float32 CPU) and the trained head's parameters
    by their names in the unwrapped model (None for causal LMs)."""
    from peft.utils import ModulesToSaveWrapper

    prompt = peft_model.prompt_encoder["default"].embedding.weight.detach().float().cpu().clone()
    head = {}
    for name, module in peft_model.base_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]
                                             if hasattr(module, "active_adapters") else "default"]
            for key, value in trained.state_dict().items():
                head[f"{name}.{key}"] = value.detach().cpu().clone()
    return prompt, (head or None)


def unwrap(peft_model):
    """Take PEFT out of a model `wrap` wrapped: the model as it found it (`_Saved.put_back`)."""
    model = peft_model.base_model
    getattr(peft_model, _SAVED_ATTR).put_back(model)
    return model


_MISSING = object()


@dataclass
class _Saved:
    """What PEFT's prompt tuning changes on the model it wraps, as `wrap` found it: the
    parameters' `requires_grad` flags, the modules it wraps to train (ModulesToSaveWrapper; the
    caller's own are left), and, on a model with gradient checkpointing, the input embeddings'
    forward hook that makes them require grad (`enable_input_require_grads`) and the config's
    `pretraining_tp`, which PEFT sets to 1."""

    flags: dict
    wrappers: set  # ids of the ModulesToSaveWrapper the model held already
    embedding_hooks: set  # the keys of the input embeddings' forward hooks
    require_grads_hook: object  # the model's `_require_grads_hook`, or _MISSING
    pretraining_tp: object  # config.pretraining_tp, or _MISSING

    @classmethod
    def of(cls, model) -> "_Saved":
        from peft.utils import ModulesToSaveWrapper

        embeddings = model.get_input_embeddings()
        return cls({name: p.requires_grad for name, p in model.named_parameters()},
                   {id(m) for m in model.modules() if isinstance(m, ModulesToSaveWrapper)},
                   set(getattr(embeddings, "_forward_hooks", {})),
                   model.__dict__.get("_require_grads_hook", _MISSING),
                   getattr(model.config, "pretraining_tp", _MISSING))

    def put_back(self, model) -> None:
        from peft.utils import ModulesToSaveWrapper

        wrapped = [(name, module) for name, module in model.named_modules()
                   if isinstance(module, ModulesToSaveWrapper) and id(module) not in self.wrappers]
        for name, module in wrapped:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    module.original_module)
        for name, param in model.named_parameters():
            param.requires_grad_(self.flags.get(name, param.requires_grad))
        embeddings = model.get_input_embeddings()
        for key in set(getattr(embeddings, "_forward_hooks", {})) - self.embedding_hooks:
            for table in ("_forward_hooks", "_forward_hooks_with_kwargs",
                          "_forward_hooks_always_called"):
                getattr(embeddings, table, {}).pop(key, None)
        if self.require_grads_hook is _MISSING:
            model.__dict__.pop("_require_grads_hook", None)
        else:
            model.__dict__["_require_grads_hook"] = self.require_grads_hook
        if self.pretraining_tp is not _MISSING:
            model.config.pretraining_tp = self.pretraining_tp


@in_own_modes
def train_prompt(model, tokenizer, data, task_type: str, token_ids=None, template=None,
                 num_virtual_tokens: int = 10, epochs: int = 5, lr: float = 3e-2,
                 head_lr: float = 1e-2, batch_size: int = 16, max_length: int = 128,
                 seed: int = 0, progress: bool = True, init_text: str | None = None,
                 precision: str = "auto", batching: str = "shuffled") -> PromptResult:
    """Prompt-tune `model` on `data` (a TaskData); the model is left as it was. The prompt starts
    as the embeddings of `init_text`'s tokens (cycled to `num_virtual_tokens`, as PEFT's
    PromptTuningInit.TEXT), by default of random vocabulary tokens. `precision`, `batching`: as
    `fit`'s."""
    check_choices(precision=precision, batching=batching)
    init_ids = None
    if init_text is not None:
        init_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not init_ids:
            raise ValueError(f"the prompt's init text {init_text!r} has no tokens")
    device = model.get_input_embeddings().weight.device
    with evaluating(model), seeded(seed, device):
        peft_model = wrap(model, task_type, num_virtual_tokens, init_ids=init_ids, seed=seed)
        try:
            losses = fit(peft_model, tokenizer, data, task_type, token_ids, template, epochs,
                         lr, head_lr, batch_size, max_length, seed, progress,
                         precision=precision, batching=batching)
            prompt, head = extract(peft_model)
        finally:
            unwrap(peft_model)
    return PromptResult(prompt, head, losses)
