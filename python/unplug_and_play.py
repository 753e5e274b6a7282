"""Unplug and play: one model, five tasks, requests arriving one task at a time (the DoE setting).

For each task it localizes the expert (or loads it from the output folder), then serves the task's
test set through an ExpertRouter, and prints a table: prompt-tuned accuracy, the expert's accuracy,
its pruning rate, the change in accuracy with its paired standard error (only the test examples
whose answer changed add to it) and the speed-up over the dense prompt-tuned model. It saves the
table (JSON) and a plot of validation accuracy against pruning rate for each task (the
pruning-rate search's steps).

    python python/unplug_and_play.py --model minilm
    python python/unplug_and_play.py --model smollm2 --max-train 256 --tasks polarity reuters8

Data comes from PyPI packages (python/tasks.py), models too (python/offline_models.py); both are
cached under ~/.cache/doe_kernels, never in the repository.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import offline_models  # beside this script: on the path when it runs, and in the tests
from tasks import TASKS, load_task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from report import metadata, run_start  # noqa: E402  (a results file's machine, versions, commit)

import doe_kernels as dk
from doe_kernels.cli import add_config_options, configs_from_args
from doe_kernels.data import TaskData
from doe_kernels.localize import paired_change


def load_model(name: str, num_labels: int, seed: int = 0):
    """The model and its tokenizer; a classifier's new head is initialised from `seed`, so that
    a run is reproducible."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    if name == "minilm":
        path = offline_models.minilm_dir()
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if name == "smollm2":
        return offline_models.load_smollm2()
    raise SystemExit(f"unknown model {name!r}: use minilm or smollm2")


# How SmolLM2-135M-Instruct is asked each task, through its chat template (dk.chat_template): an
# instruction, and a label word per label name, answered as the assistant's first token. The
# words' first tokens differ (several are only a fragment of the word in SmolLM2's vocabulary, such
# as "g" for "guns": the soft prompt learns them); for newsgroups the words alone name the choices
# (listing twenty would lengthen every example).
CHAT_TASKS = {
    "polarity": ("Is the sentiment of this movie review negative or positive?",
                 {"negative": "negative", "positive": "positive"}),
    "rotten_tomatoes": ("Is this critic's review of a film negative or positive?",
                        {"negative": "negative", "positive": "positive"}),
    "tweets": ("Is the sentiment of this tweet negative, neutral or positive?",
               {"negative": "negative", "neutral": "neutral", "positive": "positive"}),
    "newsgroups": ("Which newsgroup was this post written for? Answer with its topic.", {
        "alt.atheism": "atheism", "comp.graphics": "graphics",
        "comp.os.ms-windows.misc": "windows", "comp.sys.ibm.pc.hardware": "pc",
        "comp.sys.mac.hardware": "mac", "comp.windows.x": "x", "misc.forsale": "forsale",
        "rec.autos": "autos", "rec.motorcycles": "motorcycles",
        "rec.sport.baseball": "baseball", "rec.sport.hockey": "hockey", "sci.crypt": "crypt",
        "sci.electronics": "electronics", "sci.med": "medicine", "sci.space": "space",
        "soc.religion.christian": "christian", "talk.politics.guns": "guns",
        "talk.politics.mideast": "mideast", "talk.politics.misc": "politics",
        "talk.religion.misc": "religion"}),
    "reuters8": ("What is this news wire about: acquisition, crude, earnings, grain, interest, "
                 "currency, shipping or trade?", {
                     "acq": "acquisition", "crude": "crude", "earn": "earnings", "grain": "grain",
                     "interest": "interest", "money-fx": "currency", "ship": "shipping",
                     "trade": "trade"}),
}


def causal_lm_task(task, tokenizer, names):
    """(template, label words in the order of `names`) of `task` for the causal LM."""
    instruction, words = CHAT_TASKS[task]
    missing = [name for name in names if name not in words]
    if missing:
        raise ValueError(f"{task}: no label word for {missing}")
    return dk.chat_template(tokenizer, instruction), [words[name] for name in names]


def expert_for(task, splits, args, out_dir):
    path = os.path.join(out_dir, f"{task}.safetensors")
    if os.path.exists(path) and not args.relocalize:
        return dk.Expert.load(path)
    names = splits["train"].label_names
    model, tokenizer = load_model(args.model, len(names), args.seed)  # a fresh head
    template = words = None
    if args.model == "smollm2":
        template, words = causal_lm_task(task, tokenizer, names)
    start = None
    if args.start_from:  # reuse another run's prompt and head: attribution and search only
        start = started_from(args, task, splits["train"])
    expert = dk.localize(model, tokenizer, splits["train"], splits["validation"],
                         label_words=words, template=template, max_length=args.max_length,
                         start_from=start, seed=args.seed, **configs_from_args(args))
    expert.name = task
    expert.save(path)
    return expert


def started_from(args, task, train):
    """The expert of `task` in the --start-from run, whose prompt and head this run reuses;
    SystemExit, with --top-up-validation, when its prompt was trained on other examples than
    `train` (another --max-train or --seed): the validation split, topped up with training
    examples this run does not train on, could then hold examples the prompt was trained on
    (without it, validation comes from another split)."""
    path = os.path.join(args.start_from, args.model, f"{task}.safetensors")
    expert = dk.Expert.load(path)
    trained_on = expert.figures.get("prompt_trained_on")
    if args.top_up_validation and trained_on is not None and trained_on != train.digest():
        raise SystemExit(f"{task}: the prompt of {path} was trained on other examples than this "
                         "run's training split (another --max-train or --seed?): its validation "
                         "split could hold examples the prompt was trained on")
    return expert


def task_splits(task, args):
    """{"train", "validation", "test"} of `task` at the run's budget. Each split depends only on
    its own size and --seed (load_task's caps with a seed are nested: a smaller one is part of a
    larger one): training on --max-train (so a run with --start-from trains, and tops up, on the
    examples the run it starts from trained on), validation on --validation (so a cached expert
    can be tested on more examples than before without changing the examples its search saw),
    test on --test. With --top-up-validation a validation split smaller than --validation is
    filled with training examples the run does not train on (drawn with --seed). With
    --validation-from-test the validation examples are instead the test split's examples outside
    its largest draw that leaves room for them (`room`: the split's size less --validation): the
    same for every --test, and in no test draw (of at most `room`, with the same --seed); a larger
    --test is refused."""
    validation = args.validation or max(50, args.max_train // 5)
    test = args.test or validation

    def draw(split, size):
        part = load_task(task, max_examples=size, seed=args.seed)[split]
        return part.sample(min(size, len(part)), seed=args.seed)

    def unused(split, taken):  # the whole split less the examples `taken` holds
        full, taken = load_task(task)[split], set(taken.texts)
        return full.subset(i for i, text in enumerate(full.texts) if text not in taken)

    splits = dict(train=draw("train", args.max_train))
    if args.validation_from_test:
        room = len(load_task(task)["test"]) - validation
        if test > room:
            raise SystemExit(f"{task}: --validation-from-test keeps {validation} test examples "
                             f"for validation; --test {test} is more than the {max(room, 0)} "
                             "left to test on")
        rest = unused("test", draw("test", room))  # the examples no test draw of `room` holds
        return dict(splits, test=draw("test", test),
                    validation=rest.sample(validation, seed=args.seed))
    splits.update(test=draw("test", test), validation=draw("validation", validation))
    missing = validation - len(splits["validation"])
    if args.top_up_validation and missing > 0:
        extra = unused("train", splits["train"]).sample(missing, seed=args.seed)
        splits["validation"] = TaskData(splits["validation"].texts + extra.texts,
                                        splits["validation"].labels + extra.labels,
                                        splits["validation"].label_names, task)
    return splits


def timed_accuracy(router, name, data, repeats):
    """(accuracy over `data`, the median time of one pass over it, the predictions). An untimed
    call on a few examples first pays the one-off costs (the first call of a process loads
    kernels and starts thread pools), which would otherwise land on whichever task runs first."""
    router.run(name, data.texts[:8])
    times, predictions = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        predictions = router.run(name, data.texts)
        times.append(time.perf_counter() - start)
    accuracy = sum(p == g for p, g in zip(predictions, data.labels)) / len(data)
    return accuracy, statistics.median(times), predictions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--max-train", type=int, default=1000, help="training examples at most")
    parser.add_argument("--validation", type=int, default=None,
                        help="validation examples for the pruning-rate search (default: a fifth "
                             "of --max-train, at least 50)")
    parser.add_argument("--top-up-validation", action="store_true",
                        help="fill a validation split smaller than --validation with training "
                             "examples the run does not train on: a larger validation set "
                             "lowers the standard error --confidence asks candidates to clear")
    parser.add_argument("--validation-from-test", action="store_true",
                        help="draw the validation examples from the test split, outside every "
                             "test draw that leaves room for them (the same examples for every "
                             "--test; --test at most the split's size less --validation): for "
                             "tasks whose official test set differs from the training data, such "
                             "as 20 Newsgroups' later posts")
    parser.add_argument("--test", type=int, default=None,
                        help="test examples (default: as many as --validation)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="tokens per example at most (long texts are cut)")
    parser.add_argument("--start-from", metavar="OUT",
                        help="reuse the prompts and heads of the experts saved under OUT "
                             "(another run's --out): no prompt tuning")
    parser.add_argument("--baseline-from", metavar="OUT",
                        help="test each expert against the unpruned expert saved under OUT "
                             "(its prompt and head, e.g. the --start-from run's) instead of its "
                             "own baseline: one baseline for runs that started from the same "
                             "prompts")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the test set")
    parser.add_argument("--out", default=os.path.join("results", "unplug_and_play"))
    parser.add_argument("--relocalize", action="store_true", help="ignore saved experts")
    parser.add_argument("--seed", type=int, default=0)
    add_config_options(parser)  # localize's options, as `doe-kernels localize` has them
    args = parser.parse_args()
    started = run_start()  # the commit and load as the run begins (it may take hours)
    out_dir = os.path.join(args.out, args.model)
    os.makedirs(out_dir, exist_ok=True)

    experts, tests = {}, {}
    for task in args.tasks:
        splits = task_splits(task, args)
        tests[task] = splits.pop("test")
        experts[task] = expert_for(task, splits, args, out_dir)
        print(f"{task}: {experts[task]!r}", flush=True)

    first = experts[args.tasks[0]]
    model, tokenizer = load_model(args.model, len(first.label_names))
    rows = []
    with dk.ExpertRouter(model, tokenizer) as router:
        for task in args.tasks:  # one task at a time, as requests arrive
            expert = experts[task]
            dense = expert.dense()  # the unpruned baseline the search compared with
            if args.baseline_from:
                dense = dk.Expert.load(os.path.join(args.baseline_from, args.model,
                                                    f"{task}.safetensors")).dense()
            router.add(task, expert)
            router.add(task + ":dense", dense)
            accuracy, seconds, answers = timed_accuracy(router, task, tests[task], args.repeats)
            dense_accuracy, dense_seconds, dense_answers = timed_accuracy(
                router, task + ":dense", tests[task], args.repeats)
            gold = tests[task].labels
            rows.append(dict(task=task, classes=len(expert.label_names),
                             prompt_tuned_accuracy=dense_accuracy, expert_accuracy=accuracy,
                             validation_before=expert.figures.get("accuracy_before"),
                             validation_after=expert.figures.get("accuracy_after"),
                             validation_before_recovery=expert.figures.get(
                                 "accuracy_before_recovery"),
                             pruning_rate=expert.figures.get("pruning_rate"),
                             speedup=dense_seconds / seconds, test_examples=len(tests[task]),
                             **paired_change([a == g for a, g in zip(answers, gold)],
                                             [a == g for a, g in zip(dense_answers, gold)]),
                             search=expert.figures.get("search")))
    print_table(rows, args, model)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(model=args.model, device="cpu", threads=torch.get_num_threads(),
                       torch=torch.__version__,
                       meta=metadata("cpu", "unplug_and_play", run_info=started),
                       args=vars(args), rows=rows), f, indent=1)
    plot(rows, os.path.join(out_dir, "accuracy_vs_pruning.png"), args.model)


def print_table(rows, args, model):
    print(f"\nmodel {args.model} ({type(model).__name__}), CPU, {torch.get_num_threads()} thread(s)")
    print(f"{'task':<16} {'classes':>7} {'tuned acc':>9} {'expert acc':>10} {'change (SE)':>13} "
          f"{'pruned':>7} {'speed-up':>8}")
    for r in rows:
        change = f"{100 * r['change']:+.1f} ({100 * r['change_se']:.1f})"
        print(f"{r['task']:<16} {r['classes']:>7} {r['prompt_tuned_accuracy']:>9.3f} "
              f"{r['expert_accuracy']:>10.3f} {change:>13} {100 * r['pruning_rate']:>6.1f}% "
              f"{r['speedup']:>7.2f}x")
    within = sum(r["change"] >= -args.tolerance - 1e-9 for r in rows)
    print(f"change: test accuracy points, expert minus tuned (paired standard error); "
          f"{within} of {len(rows)} experts within the tolerance ({100 * args.tolerance:g} "
          f"points) on the test sets")


def plot(rows, path, model_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps = sorted(s for s in r["search"] or [] if s[1] is not None)  # (diverged: None)
        if steps and r.get("validation_before") is not None:  # the unpruned baseline at rate 0
            steps.insert(0, (0.0, r["validation_before"], True))
        if steps:
            ax.plot([100 * s[0] for s in steps], [s[1] for s in steps], "o-", label=r["task"])
    ax.set_xlabel("pruning rate (%)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"pruning-rate search, {model_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
