"""What one epoch of distillation does to a candidate, per learning rate: validation accuracy and
the mean KL divergence from the unpruned prompt-tuned model's answers on held-out examples, for
the unpruned expert (distilled into itself) and for candidates at given pruning rates (FFN
neurons ranked across layers, the plain mask), from experts that unplug_and_play.py saved.

    python python/recovery_lr.py --model minilm --start-from RUN --tasks rotten_tomatoes tweets \
        --rates 0 0.45 0.9 --lrs 0.03 0.01 0.003 --validation 1500 --top-up-validation \
        --out recovery_lr.json

The splits are unplug_and_play.py's (--max-train, --validation, --top-up-validation, --seed); the
held-out examples are the first 128 validation examples (not trained on).
"""
import argparse
import json
import os

import torch
import unplug_and_play as up

import doe_kernels as dk
from doe_kernels.localize.attribution import attribute
from doe_kernels.localize.reconstruct import mean_kl
from doe_kernels.localize.recover import retune
from doe_kernels.localize.search import mask_at_rate

JUDGED = 128  # validation examples the KL divergence is measured on


def task_rows(task, args) -> list:
    """One row per (rate, learning rate), and per rate one without re-tuning (lr None)."""
    splits = up.task_splits(task, args)
    tuned = dk.Expert.load(os.path.join(args.start_from, args.model, f"{task}.safetensors"))
    model, tokenizer = up.load_model(args.model, len(tuned.label_names))
    dense = tuned.dense()
    train, validation = splits["train"], splits["validation"]
    teacher = dense.predict_logits(model, tokenizer, train.texts)
    judged = validation.texts[:JUDGED]
    reference = torch.log_softmax(dense.predict_logits(model, tokenizer, judged).double(), -1)
    ffn_scores, head_scores = attribute(model, tokenizer, dense, train, progress=False)
    rows = []
    for rate in args.rates:
        mask = mask_at_rate(ffn_scores, head_scores, rate, "global", prune_heads=False)
        candidate = dk.Expert(mask, dense.prompt, dense.task_type, dense.label_names,
                              label_words=dense.label_words, label_token_ids=dense.label_token_ids,
                              template=dense.template, head=dense.head, sizes=dense.sizes,
                              max_length=dense.max_length)
        for lr in [None] + args.lrs:
            expert = candidate if lr is None else retune(
                model, tokenizer, candidate, train, 1, lr, 1e-2, 16, args.seed, progress=False,
                teacher=teacher)[0]
            rows.append(dict(task=task, rate=rate, lr=lr,
                             validation=expert.evaluate(model, tokenizer, validation),
                             kl=mean_kl(reference, expert.predict_logits(model, tokenizer,
                                                                         judged))))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--start-from", required=True, help="an unplug_and_play.py --out folder")
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.45, 0.9])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.03, 0.01, 0.003])
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=1500)
    parser.add_argument("--top-up-validation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="results JSON to write")
    args = parser.parse_args(argv)
    args.test, args.validation_from_test = None, False  # what task_splits reads besides
    result = dict(args=vars(args), rows=[row for task in args.tasks
                                         for row in task_rows(task, args)])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
