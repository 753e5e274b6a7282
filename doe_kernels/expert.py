"""Expert: one task's localized expert and how it is served, without PEFT in the loop.

An `Expert` holds what `doe_kernels.localize` found for a task: the `ExpertMask` (kept neurons and
heads), the trained soft prompt (virtual_tokens x hidden), the trained classification head where
there is one (BERT-family `...ForSequenceClassification`), the label names and, for causal LMs,
the label words and the template that score the task, plus its figures (pruning rate, accuracy
before and after) and the sizes of the model it fits. An expert found with recovery
(`localize(recover_epochs=...)`) serves a prompt and head re-tuned on its pruned network and also
keeps the unpruned prompt-tuned ones it was compared against: `expert.dense()` is that baseline.

Serving: `with expert.plugged(model): ...` plugs the mask (through `doe_kernels.plugged`) and the
head (the head's Parameters point at the expert's tensors; both restored on exit, also on error);
`predict_logits` / `predict` / `evaluate` prepend the soft prompt as input embeddings, exactly as
PEFT's prompt tuning does (`inputs_embeds = cat(prompt, token embeddings)`, attention mask extended
with ones; causal LMs are left-padded and read at the last position). Saved as one safetensors
file whose metadata holds a small JSON header.
"""
import contextlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from doe_kernels.mask import ExpertMask
from doe_kernels.models import spec_of
from doe_kernels.patching import plugged as plug_mask

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
        return SEQ_CLS
    if model.get_output_embeddings() is not None:
        return CAUSAL_LM
    raise ValueError(f"{type(model).__name__} has neither a classification head (classifier/score) "
                     "nor an LM head; localize a ...ForSequenceClassification or "
                     "...ForCausalLM model")


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


def encode(tokenizer, texts, task_type: str, template: str | None, max_length: int = 128):
    """Token ids and attention mask: right-padded for classifiers, left-padded for causal LMs
    (their text ends at the last position, where the label word is scored; a text too long for
    `max_length` loses its end, the template never does)."""
    texts = list(texts)
    if task_type == CAUSAL_LM:
        texts = fit_template(tokenizer, template or DEFAULT_TEMPLATE, texts, max_length)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          padding_side="left", return_tensors="pt")
    else:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          padding_side="right", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def fit_template(tokenizer, template: str, texts, max_length: int) -> list[str]:
    """Each text put into `template`, its end cut where the whole would pass `max_length` tokens:
    the template's end (where the label word is scored) always stays."""
    filled = [template.format(text=t) for t in texts]
    lengths = [len(ids) for ids in tokenizer(filled)["input_ids"]]
    for i, (text, length) in enumerate(zip(texts, lengths)):
        if length <= max_length:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(len(ids) - (length - max_length), 0)
        while True:  # decoding then encoding again can merge tokens differently
            filled[i] = template.format(text=tokenizer.decode(ids[:keep]))
            if len(tokenizer(filled[i])["input_ids"]) <= max_length:
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


def model_sizes(model) -> dict:
    """The sizes an expert records and checks: the ModelSpec fields plus the vocabulary size."""
    sizes = spec_of(model).as_dict()
    sizes["vocab_size"] = model.get_input_embeddings().weight.shape[0]
    return sizes


class Expert:
    """A task expert: mask + soft prompt (+ classification head) + how its task is scored."""

    def __init__(self, mask: ExpertMask | None, prompt: torch.Tensor, task_type: str,
                 label_names, label_words=None, label_token_ids=None, template=None,
                 head: dict | None = None, sizes: dict | None = None, figures: dict | None = None,
                 name: str = "task", max_length: int = 128, dense_prompt=None,
                 dense_head: dict | None = None):
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        prompt = torch.as_tensor(prompt).detach()
        if prompt.dim() != 2:
            raise ValueError(f"prompt must be (virtual_tokens, hidden), got {tuple(prompt.shape)}")
        self.mask = mask
        self.prompt = prompt.cpu().float().contiguous()
        self.task_type = task_type
        self.label_names = [str(n) for n in label_names]
        self.label_words = None if label_words is None else list(label_words)
        self.label_token_ids = (None if label_token_ids is None
                                else [int(i) for i in label_token_ids])
        self.template = template if task_type == CAUSAL_LM and template else (
            DEFAULT_TEMPLATE if task_type == CAUSAL_LM else None)
        self.head = None if head is None else {k: v.detach().cpu().contiguous()
                                                for k, v in head.items()}
        self.sizes = None if sizes is None else dict(sizes)
        self.figures = dict(figures or {})
        self.name = name
        self.max_length = max_length
        # the unpruned prompt-tuned prompt and head, when they differ from the served ones
        self.dense_prompt = (None if dense_prompt is None
                             else torch.as_tensor(dense_prompt).detach().cpu().float().contiguous())
        if self.dense_prompt is not None and self.dense_prompt.shape != self.prompt.shape:
            raise ValueError(f"dense_prompt is {tuple(self.dense_prompt.shape)}, the prompt "
                             f"{tuple(self.prompt.shape)}")
        self.dense_head = None if dense_head is None else {
            k: v.detach().cpu().contiguous() for k, v in dense_head.items()}
        if self.dense_head is not None and (self.head is None
                                            or self.dense_head.keys() != self.head.keys()):
            raise ValueError(f"dense_head has parameters {sorted(self.dense_head)}, the head "
                             f"{sorted(self.head or {})}")
        if task_type == CAUSAL_LM:
            if self.label_token_ids is None or len(self.label_token_ids) != len(self.label_names):
                raise ValueError("a causal-LM expert needs one label token id per label")
        elif self.head is None:
            raise ValueError("a sequence-classification expert needs its trained head state")

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def dense(self) -> "Expert":
        """The unpruned baseline this expert's accuracy was compared with (no mask): the
        prompt-tuned model; for an expert found with recovery, its prompt and head given the same
        extra training (in files written before that rule, the ones before recovery)."""
        prompt = self.prompt if self.dense_prompt is None else self.dense_prompt
        head = self.head if self.dense_head is None else self.dense_head
        return Expert(None, prompt, self.task_type, self.label_names, self.label_words,
                      self.label_token_ids, self.template, head, self.sizes, name=self.name,
                      max_length=self.max_length)

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
        task_type = detect_task_type(model)
        if task_type != self.task_type:
            raise ValueError(f"expert {self.name!r} is a {self.task_type} expert, but "
                             f"{type(model).__name__} is a {task_type} model")
        if self.head is not None:
            # The head is swapped in whole while plugged, so its number of labels may differ from
            # the model's own head (one model serves tasks with different label counts); every
            # other dimension must match.
            state = dict(model.named_parameters())
            for key, value in self.head.items():
                if key not in state:
                    raise ValueError(f"expert {self.name!r} has a head parameter {key!r} that "
                                     f"{type(model).__name__} lacks")
                if tuple(state[key].shape[1:]) != tuple(value.shape[1:]):
                    raise ValueError(f"expert {self.name!r}: head parameter {key!r} has shape "
                                     f"{tuple(value.shape)}, which does not fit the model's "
                                     f"{tuple(state[key].shape)}")
            rows = {value.shape[0] for value in self.head.values()}
            if rows != {len(self.label_names)}:
                raise ValueError(f"expert {self.name!r}: its head has {sorted(rows)} outputs for "
                                 f"{len(self.label_names)} labels {self.label_names}")
        if self.task_type == CAUSAL_LM and max(self.label_token_ids) >= sizes["vocab_size"]:
            raise ValueError(f"expert {self.name!r}: label token ids {self.label_token_ids} "
                             f"are out of range for a vocabulary of {sizes['vocab_size']}")

    @contextlib.contextmanager
    def plugged(self, model, backend: str = "auto", prune: bool = True):
        """Plug the expert's mask (unless `prune=False` or it has none) and head into `model`;
        both are restored on exit, also when the body raises."""
        self.check_fits(model)
        params = dict(model.named_parameters())
        saved = []
        previous = getattr(model, _PLUGGED_ATTR, None)
        with contextlib.ExitStack() as stack:
            if prune and self.mask is not None:
                stack.enter_context(plug_mask(model, self.mask, backend))
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
        embeddings = model.get_input_embeddings()
        device, dtype = embeddings.weight.device, embeddings.weight.dtype
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        prompt = self.prompt if prompt is None else prompt
        batch = input_ids.shape[0]
        prompts = prompt.to(device, dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs_embeds = torch.cat((prompts, embeddings(input_ids)), dim=1)
        ones = attention_mask.new_ones(batch, prompt.shape[0])
        attention_mask = torch.cat((ones, attention_mask), dim=1)
        kwargs = {"logits_to_keep": 1} if self.task_type == CAUSAL_LM else {}
        out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return label_logits(out.logits, self.task_type, self.label_token_ids).float()

    def encode(self, tokenizer, texts):
        if self.task_type == CAUSAL_LM:
            ids = label_token_ids(tokenizer, self.label_words)
            if ids != self.label_token_ids:
                raise ValueError(f"this tokenizer encodes the label words {self.label_words} to "
                                 f"{ids}, the expert was trained with {self.label_token_ids}")
        return encode(tokenizer, texts, self.task_type, self.template, self.max_length)

    def predict_logits(self, model, tokenizer, texts, batch_size: int = 32,
                       backend: str = "auto") -> torch.Tensor:
        """(n, num_labels) float32 CPU logits. Uses the expert as plugged; when it is not plugged
        into `model`, plugs it (mask and head) for the call."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if getattr(model, _PLUGGED_ATTR, None) is not self:
            with self.plugged(model, backend=backend):
                return self.predict_logits(model, tokenizer, texts, batch_size, backend)
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ids, attention = self.encode(tokenizer, texts[start:start + batch_size])
                out.append(self.logits(model, ids, attention).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.label_names))

    def predict(self, model, tokenizer, texts, batch_size: int = 32) -> list[str]:
        logits = self.predict_logits(model, tokenizer, texts, batch_size)
        return [self.label_names[i] for i in logits.argmax(-1).tolist()]

    def evaluate(self, model, tokenizer, data, batch_size: int = 32) -> float:
        """Accuracy on a `TaskData` (its labels must be among the expert's label names)."""
        return float(self.correct(model, tokenizer, data, batch_size).float().mean())

    def correct(self, model, tokenizer, data, batch_size: int = 32) -> torch.Tensor:
        """One bool per example of a `TaskData`: is the expert's answer its label?"""
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
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path),
                  metadata={"doe_kernels": "Expert", "header": json.dumps(self.header())})

    @classmethod
    def load(cls, path) -> "Expert":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("doe_kernels") != "Expert":
            raise ValueError(f"{path} is not a doe_kernels Expert file (no Expert metadata)")
        header = json.loads(metadata["header"])
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: unknown Expert format {header.get('format')!r}")
        tensors = load_file(str(path))
        head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        mask = (ExpertMask.from_tensors(tensors, header["mask_spec"], prefix="mask.")
                if header["has_mask"] else None)
        dense_head = {k[len("dense.head."):]: v for k, v in tensors.items()
                      if k.startswith("dense.head.")}
        return cls(mask, tensors["prompt"], header["task_type"], header["label_names"],
                   header["label_words"], header["label_token_ids"], header["template"],
                   head or None, header["sizes"], header["figures"], header["name"],
                   header["max_length"], tensors.get("dense.prompt"), dense_head or None)
