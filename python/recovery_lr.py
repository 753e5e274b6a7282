"""What distillation does to a candidate, per learning rate, schedule, seed, number of epochs and
learning rate of the reconstruction vectors (trained with the prompt, or kept as fitted):
validation accuracy, its paired change from the unpruned prompt-tuned model, and the mean KL
divergence from that model's answers on held-out examples, for the unpruned expert (distilled into
itself) and for candidates at given pruning rates (FFN neurons ranked across layers; the plain
mask, or with --reconstruct auto localize's reconstruction), from experts that unplug_and_play.py
saved.

    python python/recovery_lr.py --model minilm --start-from RUN --tasks rotten_tomatoes tweets \
        --rates 0 0.45 0.9 --lrs 0.03 0.01 0.003 --validation 1500 --top-up-validation \
        --out recovery_lr.json
    python python/recovery_lr.py --model minilm --start-from RUN --rates 0.05625 0.1125 \
        --lrs 0.03 --schedules constant linear --seeds 0 1 2 --reconstruct auto \
        --validation 1500 --top-up-validation --out schedules.json
    python python/recovery_lr.py --model minilm --start-from RUN --tasks tweets --rates 0.675 0.9 \
        --lrs 0.03 --epochs 1 2 3 --reconstruct auto --validation 1500 --top-up-validation \
        --out epochs.json

The splits are unplug_and_play.py's (--max-train, --validation, --top-up-validation, --seed); the
held-out examples are the first 128 validation examples (not trained on).
"""
import argparse
import json

import unplug_and_play as up

import doe_kernels as dk
from doe_kernels.localize import _Run, _Task
from doe_kernels.localize.attribution import attribute
from doe_kernels.localize.reconstruct import Fidelity, Reconstructor
from doe_kernels.localize.recover import retune
from doe_kernels.localize.search import mask_at_rate, paired_change

JUDGED = 128  # validation examples the KL divergence is measured on


def task_rows(task, args) -> list:
    """Per rate one row without re-tuning (lr None), then one per (learning rate, schedule,
    seed, epochs, learning rate of the reconstruction vectors)."""
    splits = up.task_splits(task, args)
    tuned = up.started_from(args, task, splits["train"])
    model, tokenizer = up.load_model(args.model, len(tuned.label_names))
    dense = tuned.dense()
    train, validation = splits["train"], splits["validation"]
    teacher = dense.predict_logits(model, tokenizer, train.texts)
    run = _Run(model, tokenizer, _Task.of(model, tokenizer, train, dense.label_words,
                                          dense.template, dense.max_length), 16, args.seed, False)
    fidelity = Fidelity.collect(run, dense, validation.texts[:JUDGED])
    baseline = dense.correct(model, tokenizer, validation).tolist()
    ffn_scores, head_scores = attribute(model, tokenizer, dense, train, progress=False)
    reconstruct = _reconstructor(run, dense, train, args)
    rows = []
    for rate in args.rates:
        mask = mask_at_rate(ffn_scores, head_scores, rate, "global", prune_heads=False)
        candidate = dk.Expert(mask, dense.prompt, dense.task_type, dense.label_names,
                              label_words=dense.label_words, label_token_ids=dense.label_token_ids,
                              template=dense.template, head=dense.head, sizes=dense.sizes,
                              max_length=dense.max_length)
        candidate = reconstruct(candidate)
        settings = [(None, None, None, 0, None)] + [
            (lr, schedule, seed, epochs, vectors_lr or None) for lr in args.lrs
            for schedule in args.schedules for seed in args.seeds for epochs in args.epochs
            for vectors_lr in args.vectors_lrs]
        for lr, schedule, seed, epochs, vectors_lr in settings:
            expert = candidate if lr is None else retune(
                model, tokenizer, candidate, train, epochs, lr, 1e-2, 16, seed, progress=False,
                teacher=teacher, schedule=schedule, vectors_lr=vectors_lr)[0]
            correct = expert.correct(model, tokenizer, validation)
            rows.append(dict(task=task, rate=rate, lr=lr, schedule=schedule, seed=seed,
                             epochs=epochs, vectors_lr=vectors_lr,
                             reconstruction=candidate.figures.get("reconstruction"),
                             validation=float(correct.float().mean()),
                             **paired_change(correct.tolist(), baseline),
                             kl=fidelity.divergence(run, expert)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _reconstructor(run, dense, train, args):
    """candidate -> candidate: as it is, or with --reconstruct auto reconstructed as `localize`
    does by default (calibrated on 256 training examples)."""
    if args.reconstruct == "none":
        return lambda candidate: candidate
    reconstructor = Reconstructor.collect(run, dense, train, "auto", 256, 0.0)
    return lambda candidate: reconstructor(run, candidate)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--start-from", required=True, help="an unplug_and_play.py --out folder")
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.45, 0.9])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.03, 0.01, 0.003])
    parser.add_argument("--schedules", nargs="+", default=["linear"],
                        choices=("constant", "linear"), help="the re-tuning's lr schedules")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="the re-tuning's seeds (its data order)")
    parser.add_argument("--epochs", nargs="+", type=int, default=[1],
                        help="the re-tuning's epochs (with 'linear', the decay spans them all)")
    parser.add_argument("--vectors-lrs", nargs="+", type=float, default=[0.0],
                        help="learning rates of the reconstruction vectors (the kept neurons' "
                        "scales and the bias deltas) trained with the prompt (0: kept as fitted)")
    parser.add_argument("--reconstruct", default="none", choices=("none", "auto"),
                        help="the candidates as masked, or reconstructed as localize does")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=1500)
    parser.add_argument("--top-up-validation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="results JSON to write")
    args = parser.parse_args(argv)
    args.test, args.validation_from_test = None, False  # what task_splits reads besides
    started = up.run_start()  # the commit and load as the run begins (it may take hours)
    rows = [row for task in args.tasks for row in task_rows(task, args)]
    result = dict(meta=up.metadata("cpu", "recovery_lr", run_info=started), args=vars(args),
                  rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
