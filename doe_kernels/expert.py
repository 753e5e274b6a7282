"""Expert: one task's localized expert and how it is served, without PEFT in the loop.

An `Expert` holds what `doe_kernels.localize` found for a task: the `ExpertMask` (kept neurons and
heads), the trained soft prompt (virtual_tokens x hidden), the trained classification head where
there is one (BERT-family `...ForSequenceClassification`), the label names and, for causal LMs,
the label words and the template that score the task, plus its figures (pruning rate, accuracy
before and after) and the sizes of the model it fits. An expert found with recovery
(`localize(recovery=RecoveryConfig(epochs=...))`) serves a prompt and head re-tuned on its pruned
network and also keeps the unpruned prompt-tuned ones it was compared against: `expert.dense()` is
that baseline.

Serving: `with expert.plugged(model): ...` plugs the mask (through `doe_kernels.plugged`) and the
head (the head's Parameters point at the expert's tensors; both restored on exit, also on error);
`predict_logits` / `predict` / `evaluate` prepend the soft prompt as input embeddings, as PEFT's
prompt tuning does (`inputs_embeds = cat(prompt, token embeddings)`, attention mask extended with
ones; causal LMs are left-padded and read at the last position, their position ids counting real
tokens only, which PEFT's forward does not do: `prompted_inputs`, which training uses too),
the texts batched by length (answers in the order given). Saved
as one safetensors file whose metadata holds a small JSON header; `Expert.load` checks the header
and tensors and raises `doe_kernels.files.FileFormatError`, naming the file, for anything wrong
with them.
"""
import contextlib
import json
import numbers
import operator
from collections.abc import Iterable, Mapping

import torch

from doe_kernels.backends import check_backend_name
from doe_kernels.data import check_task_data
from doe_kernels.files import (FLOAT_DTYPES, FileFormatError, parse_json, read_safetensors,
                                write_safetensors)
from doe_kernels.mask import KEEP_ALL, ExpertMask
from doe_kernels.models import spec_of
from doe_kernels.patching import plugged as plug_mask
from doe_kernels.patching import current_mask, is_patched, unwrap_compiled

SEQ_CLS, CAUSAL_LM = "seq_cls", "causal_lm"
TASK_TYPES = (SEQ_CLS, CAUSAL_LM)
DEFAULT_TEMPLATE = "{text}\nAnswer:"
_PLUGGED_ATTR = "_doe_kernels_expert"  # the Expert whose head is plugged into a model
_FORMAT = "doe_kernels.Expert/1"


def detect_task_type(model) -> str:
    """`seq_cls` for a model with a `classifier`/`score` head and `num_labels`, `causal_lm` for a
    model with an LM head (`...ForCausalLM`)."""
    if type(model).__name__.endswith("ForCausalLM"):
        return CAUSAL_LM
    if any(hasattr(model, name) for name in ("classifier", "score")):
        if spec_of(model).family != "bert":
            raise ValueError(
                f"{type(model).__name__}: sequence classification is supported on BERT-family "
                "models only (a decoder's classifier reads the last position, which a batch's "
                "padding and the soft prompt move); score the task with the ...ForCausalLM "
                "model and label words instead")
        return SEQ_CLS
    if spec_of(model).family == "bert":
        raise ValueError(f"{type(model).__name__}: a BERT-family model serves experts as a "
                         "sequence classifier; load it as ...ForSequenceClassification")
    if model.get_output_embeddings() is not None:
        return CAUSAL_LM
    raise ValueError(f"{type(model).__name__} has neither a classification head (classifier/score) "
                     "nor an LM head; localize a ...ForSequenceClassification or "
                     "...ForCausalLM model")


def position_limit(model) -> int | None:
    """How many positions a BERT-family model's position embeddings hold (RoBERTa's padding
    offset left out), the soft prompt's and the text's tokens together; None for models
    without such a table (rotary positions)."""
    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    return table.num_embeddings - (0 if table.padding_idx is None else table.padding_idx + 1)


def check_positions(model, max_length: int, virtual_tokens: int) -> None:
    """Raise ValueError when `virtual_tokens` soft-prompt tokens and texts of up to `max_length`
    tokens need more positions than a BERT-family model's position embeddings hold (the model
    would fail on the first text that long)."""
    limit = position_limit(model)
    if limit is not None and max_length + virtual_tokens > limit:
        raise ValueError(f"{virtual_tokens} virtual tokens and texts of up to {max_length} tokens "
                         f"need {max_length + virtual_tokens} positions, but the model has "
                         f"{limit}: use a max_length of {limit - virtual_tokens} or less")


def label_token_ids(tokenizer, label_words) -> list[int]:
    """The first token of each label word (as it follows the template, e.g. " positive")."""
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"label word {word!r} encodes to no token")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(label_words)} share their first token ({ids}); pick "
                         "label words that start differently")
    return ids


def check_template(template: str) -> str:
    """`template` if it is a str.format string whose only field is one plain `{text}`."""
    import string

    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise ValueError(f"template {template!r} is not a format string: {error}") from None
    if fields != [("text", "", None)]:
        raise ValueError(f"template {template!r} must hold exactly one {{text}} field (literal "
                         "braces doubled: {{ }})")
    return template


def chat_template(tokenizer, instruction: str) -> str:
    """A causal-LM template (for `localize(template=...)`) in the tokenizer's own chat format: the
    user's turn is `instruction`, a blank line and the text; the label word is scored as the
    assistant's first token (so label words take no leading space: "positive", not " positive").
    Instruction-tuned models read a task far better this way than as bare text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass a plain template such as "
                         f"{DEFAULT_TEMPLATE!r}")
    marker = "\x00TEXT\x00"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{instruction}\n\n{marker}"}], tokenize=False,
        add_generation_prompt=True)
    if chat.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not keep the user's text as written")
    bos = tokenizer.bos_token
    if bos and chat.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        chat = chat[len(bos):]  # the tokenizer adds its BOS itself: not twice
    escaped = chat.replace("{", "{{").replace("}", "}}")  # templates are filled by str.format
    return escaped.replace(marker, "{text}")


def _text_list(texts) -> list:
    """`texts` (one text, or an iterable of them) as a list; TypeError for anything else."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a text or a list of texts, got {type(texts).__name__}")
    return list(texts)


def check_texts(texts: list) -> None:
    """ValueError naming the first of `texts` that is not a str (a template would format None or
    42 into text)."""
    odd = [t for t in texts if not isinstance(t, str)]
    if odd:
        raise ValueError(f"texts must be strings, got a {type(odd[0]).__name__}: "
                         f"{odd[0]!r:.80}")


class NoTokenError(ValueError):
    """A text that encodes to no token (a causal LM's template "{text}" and an empty text, with a
    tokenizer that adds no BOS): its answer would be read at a padding position, so it would
    depend on the batch it is in. `index`: its place among the texts (or requests) given;
    `reason`: the message without that place."""

    def __init__(self, index: int, reason: str, what: str = "text"):
        super().__init__(f"{what} {index}: {reason}")
        self.index, self.reason, self.what = index, reason, what


@contextlib.contextmanager
def numbered(positions, what: str | None = None):
    """A NoTokenError raised inside names its text by `positions` (each text's place among the
    texts the caller was given) instead of by its place in the batch encoded, and as `what`
    ("validation example") where given."""
    try:
        yield
    except NoTokenError as error:
        raise NoTokenError(positions[error.index], error.reason, what or error.what) from None


def check_tokenizer_given(tokenizer) -> None:
    """TypeError unless `tokenizer` can be called as a HuggingFace tokenizer is (None, a path)."""
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a HuggingFace tokenizer, got "
                        f"{type(tokenizer).__name__}")


def encode(tokenizer, texts, task_type: str, template: str | None, max_length: int = 128):
    """Token ids and attention mask: right-padded for classifiers, left-padded for causal LMs
    (their text ends at the last position, where the label word is scored; a text too long for
    `max_length` loses its end, the template never does). A text that encodes to no token
    raises `NoTokenError` (a ValueError) naming it."""
    texts = list(texts)
    if not texts:  # (0, 0): tokenizers fail on an empty batch
        return torch.zeros((0, 0), dtype=torch.long), torch.zeros((0, 0), dtype=torch.long)
    check_texts(texts)
    check_max_length(max_length)  # (a tokenizer takes no larger one)
    if task_type == CAUSAL_LM:
        template = template or DEFAULT_TEMPLATE
        tail = _appended_tokens(tokenizer)
        filled = fit_template(tokenizer, template, texts, max_length, tail)
        rows = tokenizer(filled, truncation=True, max_length=max_length + len(tail))["input_ids"]
        rows = [_without(tail, row) for row in rows]
        _check_tokens(texts, [len(row) for row in rows], f" with the template {template!r} (a "
                      "causal LM reads its answer after the text's last token)")
        return _left_padded(rows, tokenizer)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      padding_side="right", return_tensors="pt")
    _check_tokens(texts, batch["attention_mask"].sum(1).tolist(), " (the tokenizer adds no "
                  "special token; a classifier reads its answer at the first token)")
    return batch["input_ids"], batch["attention_mask"]


def _check_tokens(texts: list, counts: list, why: str) -> None:
    """NoTokenError for the first of `texts` whose token count is 0."""
    empty = next((i for i, count in enumerate(counts) if not count), None)
    if empty is not None:
        raise NoTokenError(empty, f"{texts[empty]!r:.80} encodes to no token{why}")


def _appended_tokens(tokenizer) -> list:
    """The special tokens `tokenizer` appends to a text (the end-of-text token of a tokenizer
    made with `add_eos_token=True`, a BERT tokenizer's [SEP]); [] for most causal LMs'."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return full[starts[-1] + len(plain):] if starts and plain else []


def _without(tail: list, row: list) -> list:
    """`row` without `tail` at its end: a causal LM scores its label words after the template's
    last token, not after an end of text."""
    return row[:-len(tail)] if tail and row[-len(tail):] == tail else row


def _left_padded(rows: list, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id rows padded on the left, with the tokenizer's pad token
    or, when it has none (many causal LMs), its end-of-text token: never attended to, so the
    caller's tokenizer is not given a pad token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, rows), default=0)
    ids = torch.full((len(rows), width), pad or 0, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            attention[row, width - len(tokens):] = 1
    return ids, attention


def token_counts(tokenizer, texts) -> list[int]:
    """Each text's token count (without special tokens or a template: what orders them)."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def by_length(tokenizer, texts) -> list[int]:
    """Indices of `texts` by their token count, shortest first (ties in their order)."""
    lengths = token_counts(tokenizer, texts)
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def fit_template(tokenizer, template: str, texts, max_length: int,
                 tail: list | None = None) -> list[str]:
    """Each text put into `template`, its end cut where the whole would pass `max_length` tokens:
    the template's end (where the label word is scored) always stays. Tokens the tokenizer
    appends after a text (`tail`, found when None) are not counted: `encode` drops them."""
    tail = _appended_tokens(tokenizer) if tail is None else tail
    filled = [template.format(text=t) for t in texts]
    lengths = [len(_without(tail, ids)) for ids in tokenizer(filled)["input_ids"]]
    for i, (text, length) in enumerate(zip(texts, lengths)):
        if length <= max_length:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(len(ids) - (length - max_length), 0)
        while True:  # decoding then encoding again can merge tokens differently
            filled[i] = template.format(text=tokenizer.decode(ids[:keep]))
            if len(_without(tail, tokenizer(filled[i])["input_ids"])) <= max_length:
                break
            if keep == 0:
                raise ValueError(f"the template {template!r} alone is longer than max_length="
                                 f"{max_length} tokens")
            keep -= 1
    return filled


def label_logits(logits: torch.Tensor, task_type: str, token_ids=None) -> torch.Tensor:
    """(batch, num_labels) from a model's logits: the classifier's, or the next-token logits of
    the label words at the last position (left padding puts every text's end there)."""
    if task_type == SEQ_CLS:
        return logits
    return logits[:, -1, :][:, torch.as_tensor(token_ids, device=logits.device)]


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only the real (unmasked) tokens, as `generate` gives them:
    padding, wherever it is, does not move the tokens after it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def prompted_inputs(model, input_ids, attention_mask, prompt: torch.Tensor,
                    task_type: str) -> dict:
    """The keyword arguments of `model(...)` for encoded texts with the soft prompt prepended:
    inputs_embeds, attention_mask (ones over the prompt), and for a causal LM logits_to_keep=1
    (only the last position is scored), position_ids counting real tokens only (padding does
    not move a text's positions, so a batched text gets its answer alone) and the padding first,
    before the prompt (a sliding window, Mistral's, counts positions, padding included: padding
    between the prompt and the text would cut the prompt off by how much longer another text
    of the batch is). Differentiable in `prompt`: prompt tuning trains through it, so the prompt
    is fitted to the forward that serves it."""
    embeddings = model.get_input_embeddings()
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    prompts = prompt.to(device, dtype).unsqueeze(0).expand(batch, -1, -1)
    inputs_embeds = torch.cat((prompts, embeddings(input_ids)), dim=1)
    attention_mask, order = _prompted_layout(attention_mask, prompt.shape[0], task_type)
    kwargs = {}
    if order is not None:  # a causal LM
        inputs_embeds = inputs_embeds.gather(
            1, order.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        kwargs = dict(logits_to_keep=1, position_ids=real_positions(attention_mask))
    return dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def prompted_attention(attention_mask: torch.Tensor, virtual_tokens: int,
                       task_type: str) -> torch.Tensor:
    """The attention mask `prompted_inputs` gives for texts' `attention_mask`: ones over the
    prompt's `virtual_tokens`, and for a causal LM the padding first (what each position of the
    model's inputs and activations holds)."""
    return _prompted_layout(attention_mask, virtual_tokens, task_type)[0]


def _prompted_layout(attention_mask: torch.Tensor, virtual_tokens: int, task_type: str):
    """(the prompted attention mask, the order of the [prompt, text] positions in it): for a
    causal LM the padding first (a stable sort: the real positions keep their order), else the
    order as it is (None)."""
    ones = attention_mask.new_ones(attention_mask.shape[0], virtual_tokens)
    mask = torch.cat((ones, attention_mask), dim=1)
    if task_type != CAUSAL_LM:
        return mask, None
    order = torch.sort(mask, dim=1, stable=True).indices
    return mask.gather(1, order), order


def prompted_label_logits(model, input_ids, attention_mask, prompt: torch.Tensor,
                          task_type: str, token_ids=None) -> torch.Tensor:
    """(batch, num_labels) float32 label logits of `model` on `prompted_inputs`."""
    out = model(**prompted_inputs(model, input_ids, attention_mask, prompt, task_type))
    return label_logits(out.logits, task_type, token_ids).float()


def model_sizes(model) -> dict:
    """The sizes an expert records and checks: the ModelSpec fields plus the vocabulary size."""
    sizes = spec_of(model).as_dict()
    sizes["vocab_size"] = model.get_input_embeddings().weight.shape[0]
    return sizes


def _as_prompt(what: str, value) -> torch.Tensor:
    """A soft prompt as a finite (virtual_tokens, hidden) float32 CPU tensor; raises naming it."""
    tensor = torch.as_tensor(value).detach()
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{what} must be (virtual_tokens, hidden), got {tuple(tensor.shape)}")
    tensor = tensor.to("cpu", torch.float32, memory_format=torch.contiguous_format, copy=True)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} holds {int((~torch.isfinite(tensor)).sum())} non-finite "
                         "values (NaN or inf)")
    return tensor


def _as_head(what: str, head) -> dict:
    """A head state {parameter name: finite float tensor of at least one dimension}, as CPU
    copies; raises naming it."""
    if not isinstance(head, Mapping):
        raise TypeError(f"{what} must be a dict {{parameter name: tensor}}, got "
                        f"{type(head).__name__}")
    if not head:  # (saved, it would read back as None)
        raise ValueError(f"{what} holds no parameter; give None for no head")
    out = {}
    for key, value in head.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{what} must map parameter names to tensors, got {key!r}: "
                            f"{type(value).__name__}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{what}[{key!r}] must be a floating-point tensor (float16, "
                            f"bfloat16, float32 or float64), got {value.dtype}")
        if value.dim() == 0:
            raise ValueError(f"{what}[{key!r}] is a scalar, not a parameter's tensor")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{what}[{key!r}] holds non-finite values (NaN or inf)")
        out[key] = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    return out


def _as_json_dict(what: str, value) -> dict:
    """A copy of the dict `value` as an Expert file's JSON header holds it (numbers, strings,
    booleans, None, lists and dicts of them; keys become strings, tuples lists), so that an
    expert is what it will be once saved and loaded; raises naming it."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value))  # as save() writes the header and load() reads it
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must hold JSON values (an Expert file stores it): {error}") \
            from None


def check_count(name: str, value, note: str = "", most: int | None = None) -> int:
    """`value` as an int; ValueError unless it is an integer >= 1 (a Python or numpy one, not a
    bool), and at most `most` when given; the message names `name`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{note}, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be at most {most}{note}, got {value!r}")
    return int(value)


def check_batch_size(batch_size) -> None:
    """The one check of every batch_size argument: predictions, calibration, mixed batches,
    the router, localize."""
    check_count("batch_size", batch_size)


MAX_LENGTH = 2 ** 31 - 1  # the most tokens per text a max_length may ask for (tokenizers raise
# OverflowError on numbers past 2**64)


def check_max_length(max_length) -> None:
    """ValueError unless `max_length` is an int in [1, MAX_LENGTH]."""
    check_count("max_length", max_length, " (tokens per text)", most=MAX_LENGTH)


def _check_finite_in(name: str, what: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError when `value` overflows (to inf) in the model's `dtype`."""
    if not bool(torch.isfinite(value.to(dtype)).all()):
        raise ValueError(f"expert {name!r}: its {what} holds values beyond the range of the "
                         f"model's {dtype}")


def as_list(what: str, values, item_type=None) -> list:
    """`values` as a list; a str (which would be split into characters) is refused."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{what} must be a list, got the {type(values).__name__} {values!r}"
                         + (" (it would be split into characters)"
                            if isinstance(values, str) else ""))
    values = list(values)
    if item_type is not None:
        bad = [v for v in values if not isinstance(v, item_type)]
        if bad:
            raise TypeError(f"{what} must hold {item_type.__name__}s, got {bad[0]!r}")
    return values


def _as_token_ids(values) -> list[int]:
    """Label token ids as ints >= 0 (ints, numpy or 0-d torch integers; not floats or bools)."""
    ids = []
    for value in as_list("label_token_ids", values):
        if isinstance(value, bool):
            raise TypeError(f"label_token_ids must hold token ids, got {value!r}")
        try:
            ids.append(operator.index(value))
        except TypeError:
            raise TypeError(f"label_token_ids must hold integer token ids, got {value!r}") from None
        if ids[-1] < 0:
            raise ValueError(f"label_token_ids must be >= 0, got {ids[-1]}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label_token_ids must be distinct (two labels scored on one token "
                         f"cannot be told apart), got {ids}")
    return ids


class Expert:
    """A task expert: mask + soft prompt (+ classification head) + how its task is scored.

    `Expert(mask, prompt, task_type, label_names, *, ...)`: the rest by keyword. `label_words`,
    `label_token_ids` and `template` score a causal LM's task; `head` is a classifier's trained
    head ({parameter name: tensor}); `sizes` the model's (checked by `check_fits`); `figures`
    how it was found; `dense_prompt`/`dense_head` the unpruned baseline's when they differ
    (found with recovery).

    Every argument is checked before anything is kept (ValueError or TypeError naming it): the
    prompts are finite 2-D float tensors, the heads finite float tensors, the label names a list
    (not a str) of distinct names, `max_length` in [1, MAX_LENGTH], the dense head's parameters
    the head's, of the same shapes."""

    def __init__(self, mask: ExpertMask | None, prompt: torch.Tensor, task_type: str,
                 label_names, *, label_words=None, label_token_ids=None, template=None,
                 head: dict | None = None, sizes: dict | None = None, figures: dict | None = None,
                 name: str = "task", max_length: int = 128, dense_prompt=None,
                 dense_head: dict | None = None):
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        if mask is not None and not isinstance(mask, ExpertMask):
            raise TypeError(f"mask must be an ExpertMask or None, got {type(mask).__name__}")
        prompt = _as_prompt("prompt", prompt)
        # the unpruned prompt-tuned prompt and head, when they differ from the served ones
        dense_prompt = None if dense_prompt is None else _as_prompt("dense_prompt", dense_prompt)
        label_names = [str(n) for n in as_list("label_names", label_names)]
        if not label_names or len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names must be distinct names, at least one, got {label_names}")
        label_words = None if label_words is None else as_list("label_words", label_words, str)
        if label_words is not None and len(label_words) != len(label_names):
            raise ValueError(f"{len(label_words)} label words for {len(label_names)} labels")
        label_token_ids = None if label_token_ids is None else _as_token_ids(label_token_ids)
        head = None if head is None else _as_head("head", head)
        dense_head = None if dense_head is None else _as_head("dense_head", dense_head)
        check_max_length(max_length)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if template is not None and not isinstance(template, str):
            raise TypeError(f"template must be a str or None, got {type(template).__name__}")
        if dense_prompt is not None and dense_prompt.shape != prompt.shape:
            raise ValueError(f"dense_prompt is {tuple(dense_prompt.shape)}, the prompt "
                             f"{tuple(prompt.shape)}")
        if dense_head is not None and (head is None or dense_head.keys() != head.keys()):
            raise ValueError(f"dense_head has parameters {sorted(dense_head)}, the head "
                             f"{sorted(head or {})}")
        for key, value in (dense_head or {}).items():  # (the baseline is served by the same model)
            if value.shape != head[key].shape:
                raise ValueError(f"dense_head parameter {key!r} has shape {tuple(value.shape)}, "
                                 f"the head's {tuple(head[key].shape)}")
        if task_type == CAUSAL_LM:
            if label_token_ids is None or len(label_token_ids) != len(label_names):
                raise ValueError("a causal-LM expert needs one label token id per label")
            template = check_template(template) if template else DEFAULT_TEMPLATE
        else:
            if head is None:
                raise ValueError("a sequence-classification expert needs its trained head state")
            template = None
        sizes = None if sizes is None else _as_json_dict("sizes", sizes)
        figures = _as_json_dict("figures", figures or {})
        self.mask, self.prompt, self.task_type = mask, prompt, task_type
        self.label_names, self.label_words = label_names, label_words
        self.label_token_ids, self.template = label_token_ids, template
        self.head, self.dense_prompt, self.dense_head = head, dense_prompt, dense_head
        self.sizes, self.figures, self.name, self.max_length = sizes, figures, name, max_length

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def dense(self) -> "Expert":
        """The unpruned baseline this expert's accuracy was compared with (no mask): the
        prompt-tuned model; for an expert found with recovery, its prompt and head given the same
        extra training (in files written before that rule, the ones before recovery). Its
        figures hold only `prompt_trained_on`, where this expert's do."""
        prompt = self.prompt if self.dense_prompt is None else self.dense_prompt
        head = self.head if self.dense_head is None else self.dense_head
        trained_on = self.figures.get("prompt_trained_on")  # (what localize's start_from checks)
        return Expert(None, prompt, self.task_type, self.label_names,
                      label_words=self.label_words, label_token_ids=self.label_token_ids,
                      template=self.template, head=head, sizes=self.sizes, name=self.name,
                      max_length=self.max_length,
                      figures=None if trained_on is None else {"prompt_trained_on": trained_on})

    def __repr__(self):
        rate = self.figures.get("pruning_rate")
        return (f"Expert({self.name!r}, {self.task_type}, labels={self.label_names}, "
                f"{self.num_virtual_tokens} virtual tokens, pruning_rate={rate}, "
                f"mask={self.mask!r})")

    # ---- fitting a model ----------------------------------------------------------------
    def check_fits(self, model) -> None:
        """Raise ValueError when this expert was made for another model (sizes, head, labels)."""
        sizes = model_sizes(model)
        if self.sizes is not None:
            for key, value in self.sizes.items():
                if key in sizes and sizes[key] != value:
                    raise ValueError(f"expert {self.name!r} was made for a model with {key}="
                                     f"{value!r}, but this model has {key}={sizes[key]!r}")
        if self.prompt.shape[1] != sizes["hidden_size"]:
            raise ValueError(f"expert {self.name!r} has a soft prompt of width "
                             f"{self.prompt.shape[1]}, but this model's hidden size is "
                             f"{sizes['hidden_size']}")
        if self.mask is not None:
            self.mask.check_spec(spec_of(model))
        try:
            check_max_length(self.max_length)  # (an attribute set after it was made)
            check_positions(model, self.max_length, self.num_virtual_tokens)
        except ValueError as error:
            raise ValueError(f"expert {self.name!r}: {error}") from None
        task_type = detect_task_type(model)
        if task_type != self.task_type:
            raise ValueError(f"expert {self.name!r} is a {self.task_type} expert, but "
                             f"{type(model).__name__} is a {task_type} model")
        if self.head is not None:
            self._check_head_fits(model)
        _check_finite_in(self.name, "soft prompt", self.prompt,
                         model.get_input_embeddings().weight.dtype)
        if self.task_type == CAUSAL_LM and max(self.label_token_ids) >= sizes["vocab_size"]:
            raise ValueError(f"expert {self.name!r}: label token ids {self.label_token_ids} "
                             f"are out of range for a vocabulary of {sizes['vocab_size']}")

    def _check_head_fits(self, model) -> None:
        """The head is swapped in whole while plugged, so its number of labels may differ from
        the model's own head (one model serves tasks with different label counts): it must name
        every parameter of the model's head module (`classifier` or `score`) and no other, those
        of its last Linear (the label outputs) with a row per label, the others as the model's."""
        module_name = next((n for n in ("classifier", "score")
                            if isinstance(getattr(model, n, None), torch.nn.Module)), None)
        own = {} if module_name is None else {
            f"{module_name}.{key}": value for key, value in
            getattr(model, module_name).named_parameters()}
        if set(self.head) != set(own):
            raise ValueError(f"expert {self.name!r} has head parameters {sorted(self.head)}, "
                             f"but {type(model).__name__}'s head has {sorted(own)}")
        linears = [n for n, m in getattr(model, module_name).named_modules()
                   if isinstance(m, torch.nn.Linear)]
        outputs = ".".join(filter(None, (module_name, linears[-1]))) + "." if linears else None
        for key, value in self.head.items():
            expected = tuple(own[key].shape)
            if outputs is not None and key.startswith(outputs):
                expected = (len(self.label_names),) + expected[1:]
            if tuple(value.shape) != expected:
                raise ValueError(f"expert {self.name!r}: head parameter {key!r} has shape "
                                 f"{tuple(value.shape)}, which does not fit the model's "
                                 f"{tuple(own[key].shape)} with {len(self.label_names)} labels "
                                 f"{self.label_names} (expected {expected})")
            _check_finite_in(self.name, f"head parameter {key!r}", value, own[key].dtype)

    @contextlib.contextmanager
    def plugged(self, model, backend: str = "auto", prune: bool = True):
        """Plug the expert's mask (unless `prune=False`) and head into `model`; both are
        restored on exit, also when the body raises. An expert without a mask (`dense()`) runs
        the whole model: on a model patched with another expert, a keep-everything mask is
        plugged for the body."""
        check_backend_name(backend)  # (also where no mask is plugged, which would check it)
        if not isinstance(prune, bool):
            raise TypeError(f"prune must be True or False, got {prune!r}")
        self.check_fits(model)
        params = dict(unwrap_compiled(model).named_parameters())  # (a torch.compile wrapper's
        # names start with "_orig_mod.")
        saved = []
        previous = getattr(model, _PLUGGED_ATTR, None)
        with contextlib.ExitStack() as stack:
            if prune and self.mask is not None:
                stack.enter_context(plug_mask(model, self.mask, backend))
            elif prune and is_patched(model) and not current_mask(model).keeps_everything:
                stack.enter_context(plug_mask(model, KEEP_ALL, backend))
            try:
                with torch.no_grad():
                    for key, value in (self.head or {}).items():
                        param = params[key]
                        saved.append((param, param.data))
                        param.data = value.to(param.device, param.dtype)
                setattr(model, _PLUGGED_ATTR, self)
                yield model
            finally:
                for param, data in reversed(saved):
                    param.data = data
                if previous is None:
                    if hasattr(model, _PLUGGED_ATTR):
                        delattr(model, _PLUGGED_ATTR)
                else:
                    setattr(model, _PLUGGED_ATTR, previous)

    # ---- serving ------------------------------------------------------------------------
    def logits(self, model, input_ids, attention_mask, prompt: torch.Tensor | None = None):
        """(batch, num_labels) label logits with the soft prompt prepended; no `no_grad` here
        (attribution differentiates through it). `prompt` overrides the expert's own."""
        prompt = self.prompt if prompt is None else prompt
        return prompted_label_logits(model, input_ids, attention_mask, prompt, self.task_type,
                                     self.label_token_ids)

    def model_inputs(self, model, input_ids, attention_mask,
                     prompt: torch.Tensor | None = None) -> dict:
        """`prompted_inputs` with the expert's soft prompt (or `prompt`)."""
        prompt = self.prompt if prompt is None else prompt
        return prompted_inputs(model, input_ids, attention_mask, prompt, self.task_type)

    def calibration_batches(self, model, tokenizer, texts, batch_size: int = 32,
                            readout_weight: float = 0.0):
        """Model keyword dicts (`model_inputs`, under no_grad) of `texts` in batches: what
        `doe_kernels.localize.compensate.reconstruction` fits an expert's mask on. With
        `readout_weight` w > 0 each dict also holds `token_weights` for that fit: the token the
        answer is read from (a classifier's first position, a causal LM's last) weighs 1 + w x
        the example's other real tokens, every other real token 1."""
        if not 0.0 <= readout_weight < float("inf"):
            raise ValueError(f"readout_weight must be a finite number >= 0, got {readout_weight}")
        check_batch_size(batch_size)
        texts = list(texts)
        for start in range(0, len(texts), batch_size):
            with numbered(range(start, start + batch_size)):
                ids, attention = self.encode(tokenizer, texts[start:start + batch_size])
            with torch.no_grad():
                batch = self.model_inputs(model, ids, attention)
            if readout_weight:
                weights = batch["attention_mask"].to(torch.float32)
                readout = -1 if self.task_type == CAUSAL_LM else 0
                weights[:, readout] += readout_weight * (weights.sum(1) - 1)
                batch["token_weights"] = weights
            yield batch

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError when `tokenizer` cannot serve this expert: a causal LM's label words
        encode to other token ids than it was trained with, or its template alone is longer than
        `max_length` tokens (a template that alone encodes to no token, "{text}", is served:
        only the texts that encode to none are refused)."""
        check_max_length(self.max_length)
        if self.task_type == CAUSAL_LM:
            self._check_label_words(tokenizer)
            fit_template(tokenizer, self.template, [""], self.max_length)

    def _check_label_words(self, tokenizer) -> None:
        if self.task_type == CAUSAL_LM and self.label_words is not None:
            ids = label_token_ids(tokenizer, self.label_words)
            if ids != self.label_token_ids:
                raise ValueError(f"this tokenizer encodes the label words {self.label_words} to "
                                 f"{ids}, the expert was trained with {self.label_token_ids}")

    def encode(self, tokenizer, texts):
        """`encode` with the expert's template and max_length (NoTokenError for a text that
        encodes to no token), after checking its label words against `tokenizer`."""
        self._check_label_words(tokenizer)
        return encode(tokenizer, texts, self.task_type, self.template, self.max_length)

    def predict_logits(self, model, tokenizer, texts, batch_size: int = 32,
                       backend: str = "auto") -> torch.Tensor:
        """(n, num_labels) float32 CPU logits. Uses the expert as plugged; when it is not plugged
        into `model`, plugs it (mask and head) for the call."""
        check_batch_size(batch_size)
        texts = _text_list(texts)
        check_texts(texts)  # (before the expert is plugged, and before the texts are sorted)
        check_tokenizer_given(tokenizer)
        if getattr(model, _PLUGGED_ATTR, None) is not self:
            with self.plugged(model, backend=backend):
                return self.predict_logits(model, tokenizer, texts, batch_size, backend)
        if not texts:
            return torch.empty(0, len(self.label_names))
        # batches of like lengths, little padding to run (one batch: as given, nothing to sort)
        order = by_length(tokenizer, texts) if len(texts) > batch_size else range(len(texts))
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = [texts[i] for i in order[start:start + batch_size]]
                with numbered(order[start:start + batch_size]):  # (its place in `texts`)
                    ids, attention = self.encode(tokenizer, batch)
                out.append(self.logits(model, ids, attention).cpu())
        logits = torch.cat(out)
        restored = torch.empty_like(logits)
        restored[torch.tensor(list(order))] = logits
        return restored

    def predict(self, model, tokenizer, texts, batch_size: int = 32) -> list[str]:
        logits = self.predict_logits(model, tokenizer, texts, batch_size)
        return [self.label_names[i] for i in logits.argmax(-1).tolist()]

    def evaluate(self, model, tokenizer, data, batch_size: int = 32) -> float:
        """Accuracy on a `TaskData` (its labels must be among the expert's label names)."""
        return float(self.correct(model, tokenizer, data, batch_size).float().mean())

    def correct(self, model, tokenizer, data, batch_size: int = 32) -> torch.Tensor:
        """One bool per example of a `TaskData`: is the expert's answer its label?"""
        check_task_data("data", data)
        if len(data) == 0:
            raise ValueError("no examples to evaluate")
        index = {name: i for i, name in enumerate(self.label_names)}
        unknown = set(data.labels) - set(index)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not among the expert's "
                             f"{self.label_names}")
        gold = torch.tensor([index[label] for label in data.labels])
        predicted = self.predict_logits(model, tokenizer, data.texts, batch_size).argmax(-1)
        return predicted == gold

    # ---- files --------------------------------------------------------------------------
    def header(self) -> dict:
        return dict(format=_FORMAT, name=self.name, task_type=self.task_type,
                    label_names=self.label_names, label_words=self.label_words,
                    label_token_ids=self.label_token_ids, template=self.template,
                    sizes=self.sizes, figures=self.figures, max_length=self.max_length,
                    mask_spec=None if self.mask is None else self.mask.spec,
                    has_mask=self.mask is not None)

    def save(self, path) -> None:
        tensors = {"prompt": self.prompt}
        tensors.update({f"head.{k}": v for k, v in (self.head or {}).items()})
        if self.mask is not None:
            tensors.update(self.mask.tensors(prefix="mask."))
        if self.dense_prompt is not None:
            tensors["dense.prompt"] = self.dense_prompt
        tensors.update({f"dense.head.{k}": v for k, v in (self.dense_head or {}).items()})
        # clone: safetensors refuses tensors sharing memory (an expert found at rate 0 with
        # recovery holds the same prompt as its dense baseline)
        write_safetensors(path, {k: v.detach().contiguous().clone() for k, v in tensors.items()},
                          metadata={"doe_kernels": "Expert", "header": json.dumps(self.header())})

    @classmethod
    def load(cls, path) -> "Expert":
        """The expert saved at `path`. Whatever is wrong with the file (missing, not an Expert
        file, a header key missing or of the wrong type, a non-finite or misshapen tensor, a bad
        mask) raises `doe_kernels.files.FileFormatError` naming the file and the problem."""
        metadata, tensors = read_safetensors(path, "Expert")
        try:
            header = _read_header(metadata)
            names = {"prompt", "dense.prompt"} | {k for k in tensors if k.startswith(
                ("head.", "dense.head.") + (("mask.",) if header["has_mask"] else ()))}
            unexpected = sorted(set(tensors) - names)
            if unexpected:
                raise ValueError(f"unexpected tensor(s) {unexpected}")
            if "prompt" not in tensors:
                raise ValueError("no 'prompt' tensor")
            head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
            mask = (ExpertMask.from_tensors(tensors, header["mask_spec"], prefix="mask.")
                    if header["has_mask"] else None)
            dense_head = {k[len("dense.head."):]: v for k, v in tensors.items()
                          if k.startswith("dense.head.")}
            return cls(mask, tensors["prompt"], header["task_type"], header["label_names"],
                       label_words=header["label_words"],
                       label_token_ids=header["label_token_ids"], template=header["template"],
                       head=head or None, sizes=header["sizes"], figures=header["figures"],
                       name=header["name"], max_length=header["max_length"],
                       dense_prompt=tensors.get("dense.prompt"), dense_head=dense_head or None)
        except (ValueError, TypeError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise FileFormatError(f"{path}: {message}") from error


# The header an Expert file holds: key -> the JSON types its value may have (None: null allowed),
# and for lists the type of their items.
_HEADER = {"format": (str,), "name": (str,), "task_type": (str,), "label_names": (list, str),
           "label_words": (list, str, None), "label_token_ids": (list, int, None),
           "template": (str, None), "sizes": (dict, None), "figures": (dict,),
           "max_length": (int,), "mask_spec": (dict, None), "has_mask": (bool,)}


def _read_header(metadata: dict) -> dict:
    """An Expert file's JSON header, checked key by key; raises ValueError naming the problem."""
    if "header" not in metadata:
        raise ValueError("its metadata has no 'header'")
    header = parse_json(metadata["header"], "its header")
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    if "format" in header and header["format"] != _FORMAT:
        raise ValueError(f"unknown Expert format {header['format']!r} (this version reads "
                         f"{_FORMAT!r})")
    for key, kinds in _HEADER.items():
        if key not in header:
            raise ValueError(f"its header has no {key!r} key")
        value = header[key]
        if value is None and None in kinds:
            continue
        expected = kinds[0]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ValueError(f"header key {key!r} is {value!r}, not a {expected.__name__}"
                             + (" or null" if None in kinds else ""))
        if expected is list and len(kinds) > 1 and kinds[1] is not None:
            bad = [v for v in value if not isinstance(v, kinds[1]) or isinstance(v, bool)]
            if bad:
                raise ValueError(f"header key {key!r} holds {bad[0]!r}, not a "
                                 f"{kinds[1].__name__}")
    return header
