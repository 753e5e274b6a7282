"""Tiny BERT/LLaMA models and experts built without training, shared by the expert, localize
and router tests, and edited copies of Expert files for the file and CLI tests."""
import json
import random

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import doe_kernels as dk
from doe_kernels.data import TaskData
from doe_kernels.expert import Expert, model_sizes

TEXTS = ["a wonderful film", "a dull and tedious plot", "the cast was superb",
         "awful, just awful", "i loved every minute", "boring from start to finish",
         "charming and funny", "a clumsy mess"]
LABELS = ["positive", "negative"] * 4


def _seeded_bert(vocab, num_labels, layers, seed, positions):
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=48, vocab_size=vocab, max_position_embeddings=positions,
                        num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_bert(vocab=30522, num_labels=2, layers=2, seed=0, positions=160):
    """A tiny BERT classifier with `positions` positions (the default holds experts' texts of
    128 tokens after a soft prompt). Its weights are the seeded 64-position model's, the
    tests' figures were first measured on (the size of the position table shifts the random
    initialisation of every weight after it); the rows past 64 come from the wider model's."""
    model = _seeded_bert(vocab, num_labels, layers, seed, 64)
    if positions == 64:
        return model
    wide = _seeded_bert(vocab, num_labels, layers, seed, positions)
    key = "bert.embeddings.position_embeddings.weight"
    state = {k: v for k, v in model.state_dict().items()
             if k != key and k in dict(wide.named_parameters())}
    wide.load_state_dict(state, strict=False)
    rows = min(64, positions)
    with torch.no_grad():
        wide.get_parameter(key)[:rows] = model.get_parameter(key)[:rows]
    return wide


def tiny_llama(vocab=30522, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def seq_cls_expert(model, rate=0.5, virtual=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = dk.ExpertMask.random(model, ffn_keep=1 - rate, heads_keep=0.5, seed=seed)
    head = {k: torch.randn(v.shape, generator=gen)
            for k, v in model.classifier.state_dict().items()}
    return Expert(mask, torch.randn(virtual, model.config.hidden_size, generator=gen), "seq_cls",
                  ["negative", "positive"], head={f"classifier.{k}": v for k, v in head.items()},
                  sizes=model_sizes(model), figures={"pruning_rate": rate}, name="sentiment")


POSITIVE = ["wonderful", "delightful", "excellent", "brilliant", "charming", "superb", "lovely",
            "great", "fantastic", "moving", "enjoyable", "beautiful", "touching", "funny",
            "gripping"]
NEGATIVE = ["awful", "boring", "terrible", "dreadful", "dull", "painful", "horrible", "clumsy",
            "tedious", "bad", "disappointing", "ugly", "lifeless", "annoying", "forgettable"]
SUBJECTS = ["the film", "this movie", "the acting", "the plot", "the ending", "the soundtrack",
            "the script", "the cast", "the story", "the direction"]
FRAMES = ["{s} was {w}.", "i thought {s} was {w}.", "honestly, {s} is {w}.",
          "{s} felt {w} from start to finish.", "what a {w} evening; {s} was {w}.",
          "my friends agreed that {s} was {w}.", "everyone said {s} would be {w}, and it was."]


def sentiment_task(count=320, seed=0) -> TaskData:
    """Templated sentences with clear sentiment words, balanced labels."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(count):
        label = ("positive", "negative")[i % 2]
        words = POSITIVE if label == "positive" else NEGATIVE
        texts.append(rng.choice(FRAMES).format(s=rng.choice(SUBJECTS), w=rng.choice(words)))
        labels.append(label)
    return TaskData(texts, labels, ["negative", "positive"], "sentiment")


def write_expert_file(source, target, header=None, tensors=None, raw_header=None) -> str:
    """A copy of the Expert file `source` at `target`, its header dict passed through `header`
    (or replaced by the string `raw_header`) and its tensors dict through `tensors`."""
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
    content = load_file(str(source))
    parsed = json.loads(metadata["header"])
    if header is not None:
        parsed = header(parsed)
    if tensors is not None:
        content = tensors(content)
    metadata["header"] = raw_header if raw_header is not None else json.dumps(parsed)
    save_file(content, str(target), metadata=metadata)
    return str(target)


def edit(changes: dict, drop=()):
    """A header or tensors edit: set `changes`, then drop the keys in `drop`."""
    def apply(table):
        table = {**table, **changes}
        for key in drop:
            table.pop(key)
        return table
    return apply
