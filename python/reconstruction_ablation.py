"""Does reconstruction keep accuracy at higher pruning rates? (issue 20: an ablation at fixed rates)

For one model (all-MiniLM-L6-v2, a BERT classifier) and one task (sentence polarity by default),
it prompt-tunes once with localize's default PromptConfig on the training examples, scores every
FFN neuron and attention head once per attribution method (--methods: localize's default "grad"
and Kwon et al.'s "fisher", each with localize's other attribution defaults), collects the calibration
moments once (`doe_kernels.localize.compensate.Calibration`, on up to --calibration training
examples with the soft prompt prepended, `Expert.calibration_batches`), and then, for each
pruning rate (default 0.35, 0.5, 0.65, 0.8; scope "global", heads pruned too, as `mask_at_rate`
builds localize's candidates), measures the test accuracy of the same mask

    plain:     as attributed (with "grad", the paper's expert),
    bias:      with FLAP's bias compensation (`Calibration.fit(mask, scales=False)`),
    scales:    with least-squares scales of the kept units and bias deltas
               (`Calibration.fit(mask)`, with --ridge),
    layerwise: the same fitted layer by layer on the pruned model's inputs
               (`layerwise_reconstruction`),
    scales_readout, layerwise_readout: the last two with the token the answer is read from
               weighted --readout-weight times the example's other tokens
               (`Expert.calibration_batches(readout_weight=)`),

each against the dense prompt-tuned model on the same test examples (the paired change and its
standard error, `doe_kernels.localize.search.paired_change`), and scales against plain. There is
no search and no re-tuning: the same prompt and head serve every mask.

    python python/reconstruction_ablation.py        # polarity: 1000 train, 500 test (it has 400)
    python python/reconstruction_ablation.py --out benchmarks/results/reconstruction_minilm

It writes results.json (rows, dense baseline, metadata: date, commit, versions, CPU, threads,
sizes, seeds, the command) and results.md (the table it prints) into --out (default
benchmarks/results/local/reconstruction_ablation/, ignored by git).
`python python/reconstruction_ablation.py --summarize ROOT` gathers the runs in ROOT's
sub-folders into ROOT/summary.md and ROOT/accuracy_vs_pruning.png. 5-15 minutes a task on 2
CPU cores. Data come from python/tasks.py, the model from python/offline_models.py (PyPI packages).
"""
import argparse
import inspect
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import torch

from tasks import SPLIT_SEED, TASKS, load_task
from unplug_and_play import load_model, run_start  # beside this script, like offline_models

from doe_kernels.localize.layerwise import layerwise_reconstruction
from doe_kernels.localize.reconstruct import AUTO_VARIANTS, mean_kl
from doe_kernels.localize import (AttributionConfig, Calibration, PromptConfig, _Run, _Task,
                                  _tune_prompt, attribute, mask_at_rate, paired_change)

DEFAULT_OUT = os.path.join("benchmarks", "results", "local", "reconstruction_ablation")
# each mask's variants, in the tables' order: name -> heading
VARIANTS = {"plain": "plain", "bias": "bias (FLAP)", "scales": "scales + bias",
            "layerwise": "layer-wise", "scales_readout": "scales, read-out weighted",
            "layerwise_readout": "layer-wise, read-out weighted",
            "guarded": "closest to dense (KL, held-out)"}
# the variants "guarded" chooses from, as localize's reconstruct="auto" does (AUTO_VARIANTS: fit,
# read-out weight): the one whose label distribution is closest to the dense model's (mean KL
# divergence) on --fidelity training examples that no fit has seen
VARIANT_OF_FIT = {("none", 0.0): "plain", ("scales", 0.0): "scales",
                  ("layerwise", 0.0): "layerwise", ("scales", 1.0): "scales_readout",
                  ("layerwise", 1.0): "layerwise_readout"}
GUARDED_FROM = tuple(VARIANT_OF_FIT[fit, weight] for _, fit, weight in AUTO_VARIANTS)
HEADINGS = tuple(VARIANTS.values())
RIDGE = inspect.signature(Calibration.fit).parameters["ridge"].default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarize", metavar="ROOT",
                        help="summarize the runs in ROOT's folders (their results.json) into "
                             "ROOT/summary.md and a plot, print it, and run nothing")
    parser.add_argument("--model", default="minilm", choices=("minilm",))
    parser.add_argument("--task", default="polarity", choices=list(TASKS))
    parser.add_argument("--max-train", type=int, default=1000,
                        help="training examples (prompt tuning, attribution, calibration) at most")
    parser.add_argument("--test", type=int, default=500, help="test examples at most")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.35, 0.5, 0.65, 0.8])
    parser.add_argument("--scope", default="global", choices=("global", "layer"))
    parser.add_argument("--methods", nargs="+", default=["grad", "fisher"],
                        choices=("grad", "fisher"), help="attribution methods compared")
    parser.add_argument("--ridge", type=float, default=RIDGE,
                        help="the scales' ridge (Calibration.fit's)")
    parser.add_argument("--readout-weight", type=float,
                        default=max(weight for _, _, weight in AUTO_VARIANTS),
                        help="the read-out variants' weight of the token the answer is read "
                             "from (Expert.calibration_batches; default: reconstruct='auto''s)")
    parser.add_argument("--fidelity", type=int, default=128,
                        help="training examples outside the calibration ones on which 'guarded' "
                             "measures each variant's KL divergence from the dense model")
    parser.add_argument("--calibration", type=int, default=256,
                        help="training examples the reconstruction is fitted on, at most")
    parser.add_argument("--epochs", type=int, default=PromptConfig().epochs,
                        help="prompt-tuning epochs (default: localize's)")
    parser.add_argument("--attribution-examples", type=int,
                        default=AttributionConfig().num_examples)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="training batch (localize's default); evaluation uses twice it")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    return parser.parse_args(argv)


def metadata(args, argv, sizes: dict, seconds: float, begun: dict) -> dict:
    """The run's metadata; `begun`: run_start()'s record of its beginning (commit, load)."""
    import transformers

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=begun["commit"], load_start=begun["load_start"],
                torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), cpu=cpu, cores=os.cpu_count(),
                threads=torch.get_num_threads(), model=args.model, task=args.task,
                # the splits' seed is fixed (tasks.SPLIT_SEED); --seed draws the capped subsets
                sizes=sizes, seed=args.seed, split_seed=SPLIT_SEED,
                prompt=dataclasses.asdict(PromptConfig(epochs=args.epochs)),
                attribution=dataclasses.asdict(AttributionConfig(
                    num_examples=args.attribution_examples)),
                scope=args.scope, methods=args.methods, ridge=args.ridge, prune_heads=True,
                readout_weight=args.readout_weight,
                batch_size=args.batch_size,
                max_length=args.max_length, seconds=round(seconds, 1),
                command=" ".join(["python", "python/reconstruction_ablation.py", *argv]))


def table(result: dict) -> str:
    base = result["dense"]["accuracy"]
    lines = [f"{result['metadata']['model']} on {result['metadata']['task']}: dense prompt-tuned "
             f"test accuracy {base:.3f} (n={result['metadata']['sizes']['test']}); accuracy and "
             "change from dense in points, paired SE in parentheses",
             "",
             f"| attribution | rate | FFN / heads pruned | {' | '.join(HEADINGS)} | "
             "scales + bias - plain |",
             "|---|---|---|" + "---|" * (len(VARIANTS) + 1)]

    def pts(c):
        return f"{100 * c['change']:+.1f} ({100 * c['change_se']:.1f})"

    for row in result["rows"]:
        cells = [f"{row[kind]['accuracy']:.3f}, {pts(row[kind])}" for kind in VARIANTS]
        lines.append(f"| {row['method']} | {row['rate']:.2f} | {row['ffn_pruning_rate']:.2f} / "
                     f"{row['head_pruning_rate']:.2f} | {' | '.join(cells)} | "
                     f"{pts(row['scales_vs_plain'])} |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Setup:
    """What every row is measured with: the task, the dense prompt-tuned expert, its attribution
    scores, the calibration moments, and the test set with the dense model's answers."""
    task: object
    dense: object
    scores: dict  # attribution method -> (FFN scores, head scores)
    calibrated: Calibration
    batches: list  # the calibration batches (the layer-wise fit runs the model on them)
    readout: Calibration  # the same, the read-out token weighted (--readout-weight)
    readout_batches: list
    fidelity_texts: list  # training texts outside the calibration examples
    fidelity_dense: torch.Tensor  # the dense model's label log-probabilities on them
    model: object
    tokenizer: object
    test: object
    base: list
    args: argparse.Namespace


def measure(method: str, rate: float, setup: Setup) -> dict:
    """One row: the mask at `rate` from `method`'s scores, plain, bias-compensated and
    reconstructed, on the test set."""
    args = setup.args
    mask = mask_at_rate(*setup.scores[method], rate, args.scope, True, setup.task.sizes)
    fit_started = time.perf_counter()
    masks = dict(plain=mask, bias=setup.calibrated.fit(mask, scales=False),
                 scales=setup.calibrated.fit(mask, ridge=args.ridge))
    fit_seconds = time.perf_counter() - fit_started
    masks["layerwise"] = layerwise_reconstruction(setup.model, mask, setup.batches,
                                                  ridge=args.ridge)
    layerwise_seconds = time.perf_counter() - fit_started - fit_seconds
    masks["scales_readout"] = setup.readout.fit(mask, ridge=args.ridge)
    masks["layerwise_readout"] = layerwise_reconstruction(setup.model, mask,
                                                          setup.readout_batches, ridge=args.ridge)
    summary = mask.summary()
    row = dict(method=method, rate=rate, ffn_pruning_rate=summary["ffn_pruning_rate"],
               head_pruning_rate=summary["head_pruning_rate"], fit_seconds=round(fit_seconds, 2),
               layerwise_seconds=round(layerwise_seconds, 2),
               ffn_bias_layers=sorted(masks["bias"].ffn_bias),
               attn_bias_layers=sorted(masks["bias"].attn_bias))
    row["kl_to_dense"] = {kind: kl_to_dense(setup, masks[kind]) for kind in GUARDED_FROM}
    row["guarded_choice"] = min(GUARDED_FROM, key=row["kl_to_dense"].get)
    masks["guarded"] = masks[row["guarded_choice"]]
    answers = {}
    for kind, with_mask in masks.items():
        expert = setup.task.expert(with_mask, setup.dense.prompt, setup.dense.head)
        answers[kind] = expert.correct(setup.model, setup.tokenizer, setup.test,
                                       batch_size=2 * args.batch_size).tolist()
        row[kind] = dict(accuracy=sum(answers[kind]) / len(answers[kind]),
                         **paired_change(answers[kind], setup.base))
    row["scales_vs_plain"] = paired_change(answers["scales"], answers["plain"])
    print(f"{method} rate {rate:.2f}: " + ", ".join(f"{kind} {row[kind]['accuracy']:.3f}"
                                          for kind in VARIANTS)
          + f" (dense {sum(setup.base) / len(setup.base):.3f})", flush=True)
    return row


def kl_to_dense(setup: Setup, mask) -> float:
    """Mean KL divergence from the dense model's label distribution to the masked one's on the
    fidelity texts."""
    expert = setup.task.expert(mask, setup.dense.prompt, setup.dense.head)
    return mean_kl(setup.fidelity_dense, expert.predict_logits(
        setup.model, setup.tokenizer, setup.fidelity_texts, batch_size=2 * setup.args.batch_size))


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return {}
    started, begun = time.perf_counter(), run_start()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_task(args.task, max_examples=args.max_train, seed=args.seed)["train"]
    test = load_task(args.task, max_examples=args.test, seed=args.seed)["test"]
    shuffled = train.sample(len(train), seed=args.seed)  # calibration first, then fidelity
    calibration = shuffled.subset(range(min(args.calibration, len(train))))
    fidelity = shuffled.subset(range(len(calibration),
                                     min(len(calibration) + args.fidelity, len(train))))
    if not len(fidelity):  # every training example calibrates: measure on those
        fidelity = calibration
    model, tokenizer = load_model(args.model, len(train.label_names), args.seed)
    model.eval()

    # localize's steps 1 and 2, once: the prompt-tuned (dense) expert and the attribution scores
    task = _Task.of(model, tokenizer, train, None, None, args.max_length)
    run = _Run(model, tokenizer, task, args.batch_size, args.seed, False)
    tuned, _ = _tune_prompt(run, train, PromptConfig(epochs=args.epochs), None)
    dense = task.expert(None, tuned.prompt, tuned.head)
    scores = {method: attribute(model, tokenizer, dense, train, method,
                                AttributionConfig().ig_steps, args.attribution_examples,
                                args.batch_size, AttributionConfig().absolute, args.seed, False)
              for method in args.methods}
    trained = time.perf_counter() - started

    eval_batch = 2 * args.batch_size
    base = dense.correct(model, tokenizer, test, batch_size=eval_batch).tolist()
    fit_started = time.perf_counter()
    batches = list(dense.calibration_batches(model, tokenizer, calibration.texts, eval_batch))
    calibrated = Calibration.collect(model, batches)
    calibration_seconds = time.perf_counter() - fit_started
    readout_batches = list(dense.calibration_batches(model, tokenizer, calibration.texts,
                                                     eval_batch, args.readout_weight))
    fidelity_dense = torch.log_softmax(dense.predict_logits(
        model, tokenizer, fidelity.texts, batch_size=eval_batch).double(), -1)
    setup = Setup(task, dense, scores, calibrated, batches,
                  Calibration.collect(model, readout_batches), readout_batches, fidelity.texts,
                  fidelity_dense, model, tokenizer, test, base, args)
    rows = [measure(method, rate, setup) for method in args.methods for rate in args.rates]

    sizes = dict(train=len(train), test=len(test), calibration=len(calibration),
                 fidelity=len(fidelity),
                 attribution=min(args.attribution_examples, len(train)))
    result = dict(dense=dict(accuracy=sum(base) / len(base), correct=sum(base)), rows=rows,
                  prompt_losses=list(tuned.losses),
                  train_and_attribution_seconds=round(trained, 1),
                  calibration_seconds=round(calibration_seconds, 1),
                  metadata=metadata(args, argv, sizes, time.perf_counter() - started, begun))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    text = table(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return result


def summarize(root: str) -> str:
    """The tasks' runs under `root` (one results.json per sub-folder) as one markdown table,
    written to root/summary.md, and a plot of test accuracy against the pruning rate per task,
    plain (dotted), with scales and bias (dashed) and the variant closest to dense (solid),
    written to root/accuracy_vs_pruning.png."""
    runs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    lines = [f"| task | dense | attribution | rate | {' | '.join(HEADINGS)} |",
             "|---|---|---|---|" + "---|" * len(VARIANTS)]
    for run in runs:
        for row in run["rows"]:
            cells = [f"{100 * row[kind]['change']:+.1f} ({100 * row[kind]['change_se']:.1f})"
                     if kind in row else "-" for kind in VARIANTS]
            lines.append(f"| {run['metadata']['task']} | {run['dense']['accuracy']:.3f} | "
                         f"{row['method']} | {row['rate']:.2f} | {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n\n" + _against_plain(runs)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text)
    _plot(runs, os.path.join(root, "accuracy_vs_pruning.png"))
    return text


def _against_plain(runs) -> str:
    """Per variant, over every row of every run that has it: in how many rows its test accuracy is
    at least the plain mask's, and its mean accuracy difference from the plain mask in points."""
    lines = ["| variant | rows at or above plain | mean change from plain (points) |",
             "|---|---|---|"]
    for kind, heading in VARIANTS.items():
        rows = [row for run in runs for row in run["rows"] if kind in row]
        if kind == "plain" or not rows:
            continue
        diffs = [row[kind]["accuracy"] - row["plain"]["accuracy"] for row in rows]
        lines.append(f"| {heading} | {sum(d >= 0 for d in diffs)} of {len(diffs)} | "
                     f"{100 * sum(diffs) / len(diffs):+.1f} |")
    return "\n".join(lines) + "\n"


def _plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, run in enumerate(runs):
        color = f"C{index}"
        rows = [row for row in run["rows"] if row["method"] == "grad"]
        rates = [0.0] + [100 * row["rate"] for row in rows]
        for kind, style in (("plain", ":"), ("scales", "--"), ("guarded", "-")):
            if not rows or kind not in rows[0]:
                continue
            accuracy = [run["dense"]["accuracy"]] + [row[kind]["accuracy"] for row in rows]
            ax.plot(rates, accuracy, style, marker="o", color=color,
                    label=run["metadata"]["task"] if kind == "guarded" else None)
    ax.set_xlabel("pruning rate (%), neurons and heads, global ranking")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{runs[0]['metadata']['model']}: plain (dotted), scales + bias (dashed), "
                 "closest to dense (solid)"
                 if runs else "no runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
