"""Prompt tuning two or more ways per task: float32 against bfloat16 autocast, shuffled batches
against batches by length, or one learning rate against others (`PromptConfig.precision`,
`PromptConfig.batching`, `PromptConfig.lr`). The same prompt tuning (same examples and
initialisation) runs each way, each prompt then served in float32:
validation and test accuracy, the paired change of the second way from the first with its
standard error, the training losses and the time each took. With one way, --save DIR keeps each
task's prompt as an unpruned expert, DIR/<model>/<task>.safetensors, which unplug_and_play.py
--start-from DIR localizes from (attribution and search only).

    python python/prompt_training.py --model minilm --tasks tweets polarity --epochs 5 \
        --virtual-tokens 20 --validation 1500 --top-up-validation --test 1000 --out precision.json
    python python/prompt_training.py --model minilm --tasks tweets --precisions auto \
        --batchings shuffled by_length --out batching.json
    python python/prompt_training.py --model smollm2 --tasks tweets --precisions auto \
        --lrs 0.03 0.01 0.003 --out lr.json

Each way is a (precision, batching, lr) of --precisions x --batchings x --lrs, named by what
varies; with more than two ways each is compared with the first. The
splits are unplug_and_play.py's (--max-train, --validation, --top-up-validation, --test, --seed).
"""
import argparse
import json
import os
import time

import torch
import unplug_and_play as up

from doe_kernels.localize import PromptConfig, _Task, prompt_figures
from doe_kernels.localize.prompt import BATCHINGS, PRECISIONS, STARTS, start_text, train_prompt
from doe_kernels.localize.search import paired_change


def ways(args) -> dict:
    """{name: (precision, batching, lr)}: each of --precisions x --batchings x --lrs, named by
    what varies (the precision alone when nothing else does, as files written before)."""
    axes = [(p, b, lr) for p in args.precisions for b in args.batchings for lr in args.lrs]
    varies = [len(values) > 1 for values in (args.precisions, args.batchings, args.lrs)]
    if not any(varies):
        varies[0] = True

    def name(way):
        return ", ".join(f"lr {v:g}" if i == 2 else v
                         for i, v in enumerate(way) if varies[i])
    return {name(way): way for way in axes}


def task_row(task, args) -> dict:
    """Each way's prompt: losses, seconds, accuracies; with two ways, the second's paired change
    from the first (with more, "changes": each later way's from the first)."""
    splits = up.task_splits(task, args)
    train = splits["train"]
    model, tokenizer = up.load_model(args.model, len(train.label_names), args.seed)
    template = words = None
    if args.model == "smollm2":
        template, words = up.causal_lm_task(task, tokenizer, train.label_names)
    spec = _Task.of(model, tokenizer, train, words, template, args.max_length)
    row, answers, named = dict(task=task), {}, ways(args)
    for name, way in named.items():
        prompt = prompt_config(args, *way)
        init_text = start_text(prompt, spec.task_type, words, train.label_names)
        started = time.perf_counter()
        tuned = train_prompt(model, tokenizer, train, spec.task_type, spec.token_ids, template,
                             prompt.num_virtual_tokens, prompt.epochs, prompt.lr, prompt.head_lr,
                             max_length=args.max_length, seed=args.seed,
                             precision=prompt.precision, batching=prompt.batching,
                             init_text=init_text)
        seconds = time.perf_counter() - started
        figures = prompt_figures(prompt, init_text, model, train)
        expert = spec.expert(None, tuned.prompt, tuned.head)
        result = dict(seconds=round(seconds, 1), losses=tuned.losses, init=init_text,
                      precision=figures["prompt_precision"], batching=prompt.batching,
                      lr=prompt.lr)
        for split in ("validation", "test"):
            correct = expert.correct(model, tokenizer, splits[split], batch_size=32).tolist()
            answers[name, split] = correct
            result[f"{split}_accuracy"] = sum(correct) / len(correct)
        row[name] = result
        print(task, name, result, flush=True)
        if args.save:
            expert.figures.update(figures, prompt_losses=tuned.losses)
            save_prompt(expert, task, args)
    first, *later = named
    changes = {name: {split: paired_change(answers[name, split], answers[first, split])
                      for split in ("validation", "test")} for name in later}
    if len(later) == 1:
        row.update({f"{split}_change": change for split, change in changes[later[0]].items()})
    elif later:
        row["changes"] = changes
    return row


def prompt_config(args, precision="auto", batching="shuffled", lr=PromptConfig.lr):
    """The PromptConfig of one way (`ways`): the options the ways share, and the way's own."""
    return PromptConfig(num_virtual_tokens=args.virtual_tokens, epochs=args.epochs, lr=lr,
                        init_text=args.prompt_init, start=args.prompt_start,
                        precision=precision, batching=batching)


def save_prompt(expert, task, args) -> None:
    """`expert` (no mask) in --save/<model>/<task>.safetensors."""
    folder = os.path.join(args.save, args.model)
    os.makedirs(folder, exist_ok=True)
    expert.save(os.path.join(folder, f"{task}.safetensors"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--tasks", nargs="+", default=["tweets"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=PRECISIONS, help="(default: float32 bfloat16)")
    parser.add_argument("--batchings", nargs="+", default=["shuffled"], choices=BATCHINGS,
                        help="with --precisions, the ways compared: with two ways, the second's "
                        "change from the first")
    parser.add_argument("--lrs", nargs="+", type=float, default=[PromptConfig.lr],
                        help="learning rates of the soft prompt")
    parser.add_argument("--prompt-init", metavar="TEXT", default=None,
                        help="the prompt's first embeddings: this text's tokens (default: as "
                        "--prompt-start says)")
    parser.add_argument("--prompt-start", default=PromptConfig.start, choices=STARTS,
                        help="without --prompt-init: the label words, random tokens, or 'auto' "
                        "(label words for a causal LM, as localize's default)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=1500)
    parser.add_argument("--top-up-validation", action="store_true")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="results JSON to write")
    parser.add_argument("--save", metavar="DIR", default=None,
                        help="with one way (one value each of --precisions, --batchings "
                        "and --lrs): keep each prompt as an unpruned expert in "
                        "DIR/<model>/<task>.safetensors")
    args = parser.parse_args(argv)
    try:
        prompt_config(args)  # PromptConfig's checks, before any training
    except ValueError as error:
        parser.error(str(error))
    if args.save and len(ways(args)) > 1:
        parser.error("--save keeps one way's prompts: give one precision, batching and lr")
    args.validation_from_test = False  # what task_splits reads besides
    started = up.run_start()  # the commit and load as the run begins (it may take hours)
    rows = [task_row(task, args) for task in args.tasks]
    result = dict(meta=up.metadata("cpu", "prompt_training", run_info=started), args=vars(args),
                  threads=torch.get_num_threads(), torch=torch.__version__, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
