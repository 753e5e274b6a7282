"""Prompt tuning in float32 against bfloat16 autocast (`PromptConfig.precision`): per task, the
same prompt tuning (same examples, order and initialisation) run in each precision, each prompt
then served in float32: validation and test accuracy, the paired change of the bfloat16 prompt
from the float32 one with its standard error, the training losses and the time each took.

    python python/prompt_precision.py --model minilm --tasks tweets polarity --epochs 5 \
        --virtual-tokens 20 --validation 1500 --top-up-validation --test 1000 --out precision.json

The splits are unplug_and_play.py's (--max-train, --validation, --top-up-validation, --test,
--seed).
"""
import argparse
import json
import time

import torch
import unplug_and_play as up

from doe_kernels.localize import _Task
from doe_kernels.localize.prompt import PRECISIONS, train_prompt
from doe_kernels.localize.search import paired_change


def task_row(task, args) -> dict:
    """Each precision's prompt: losses, seconds, accuracies; the bfloat16 prompt's paired change."""
    splits = up.task_splits(task, args)
    train = splits["train"]
    model, tokenizer = up.load_model(args.model, len(train.label_names), args.seed)
    template = words = None
    if args.model == "smollm2":
        template, words = up.causal_lm_task(task, tokenizer, train.label_names)
    spec = _Task.of(model, tokenizer, train, words, template, args.max_length)
    row, answers = dict(task=task), {}
    for precision in args.precisions:
        started = time.perf_counter()
        tuned = train_prompt(model, tokenizer, train, spec.task_type, spec.token_ids, template,
                             args.virtual_tokens, args.epochs, max_length=args.max_length,
                             seed=args.seed, precision=precision)
        seconds = time.perf_counter() - started
        expert = spec.expert(None, tuned.prompt, tuned.head)
        result = dict(seconds=round(seconds, 1), losses=tuned.losses)
        for split in ("validation", "test"):
            correct = expert.correct(model, tokenizer, splits[split], batch_size=32).tolist()
            answers[precision, split] = correct
            result[f"{split}_accuracy"] = sum(correct) / len(correct)
        row[precision] = result
        print(task, precision, result, flush=True)
    if len(args.precisions) == 2:
        first, second = args.precisions
        for split in ("validation", "test"):
            row[f"{split}_change"] = paired_change(answers[second, split], answers[first, split])
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--tasks", nargs="+", default=["tweets"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=PRECISIONS, help="with two, the second's change from the first")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=1500)
    parser.add_argument("--top-up-validation", action="store_true")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="results JSON to write")
    args = parser.parse_args(argv)
    args.validation_from_test = False  # what task_splits reads besides
    result = dict(args=vars(args), threads=torch.get_num_threads(), torch=torch.__version__,
                  rows=[task_row(task, args) for task in args.tasks])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
