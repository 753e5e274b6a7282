"""Does FLAP bias compensation keep accuracy at higher pruning rates? (issue 20, first measurement)

For one model (all-MiniLM-L6-v2, a BERT classifier) and one task (sentence polarity by default),
it prompt-tunes once with localize's default PromptConfig on the training examples, scores every
FFN neuron and attention head once with localize's default attribution, and then, for each pruning
rate (default 0.35, 0.5, 0.65, 0.8; scope "global", heads pruned too, as `mask_at_rate` builds
localize's candidates), measures the test accuracy of

    (a) the plain mask, and
    (b) the same mask with FLAP bias compensation
        (`doe_kernels.localize.compensate.bias_compensation`) fitted on up to --calibration training
        examples, each run through the unpruned model with the soft prompt prepended exactly as
        `Expert.logits` does (inputs_embeds = cat(prompt, token embeddings), attention mask
        extended with ones),

each against the dense prompt-tuned model on the same test examples: the paired change and its
standard error (`doe_kernels.localize.search.paired_change`), and (b) against (a) as well. There
is no search and no recovery: the same prompt and head serve every mask.

    python python/compensation_ablation.py        # polarity: 1000 train, 500 test (it has 400)
    python python/compensation_ablation.py --out benchmarks/results/compensation_minilm

It writes results.json (rows, dense baseline, metadata: date, commit, versions, CPU, threads,
sizes, seeds, the command) and results.md (the table it prints) into --out (default
benchmarks/results/local/compensation_ablation/, ignored by git). About 2 minutes on 2 CPU cores.
Data come from python/tasks.py, the model from python/offline_models.py (PyPI packages).
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from tasks import TASKS, load_task
from unplug_and_play import load_model  # beside this script, like offline_models

from doe_kernels.expert import encode
from doe_kernels.localize import (AttributionConfig, PromptConfig, _Run, _Task, _tune_prompt,
                                  attribute, mask_at_rate, paired_change)
from doe_kernels.localize.compensate import bias_compensation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("benchmarks", "results", "local", "compensation_ablation")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm",))
    parser.add_argument("--task", default="polarity", choices=list(TASKS))
    parser.add_argument("--max-train", type=int, default=1000,
                        help="training examples (prompt tuning, attribution, calibration) at most")
    parser.add_argument("--test", type=int, default=500, help="test examples at most")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.35, 0.5, 0.65, 0.8])
    parser.add_argument("--scope", default="global", choices=("global", "layer"))
    parser.add_argument("--calibration", type=int, default=256,
                        help="training examples bias compensation is fitted on, at most")
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


def calibration_batches(model, tokenizer, expert, data, batch_size: int, max_length: int):
    """Model-kwargs dicts for `bias_compensation`: `data` with `expert`'s soft prompt prepended,
    as `Expert.logits` feeds the model."""
    embeddings = model.get_input_embeddings()
    prompt = expert.prompt.to(embeddings.weight.device, embeddings.weight.dtype)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids, attention = encode(tokenizer, data.texts[start:start + batch_size],
                                    expert.task_type, expert.template, max_length)
            batch = ids.shape[0]
            inputs_embeds = torch.cat((prompt.unsqueeze(0).expand(batch, -1, -1),
                                       embeddings(ids.to(prompt.device))), dim=1)
            attention = torch.cat((attention.new_ones(batch, prompt.shape[0]), attention), dim=1)
            yield dict(inputs_embeds=inputs_embeds, attention_mask=attention)


def metadata(args, argv, sizes: dict, seconds: float) -> dict:
    import transformers

    def commit():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit(), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), cpu=cpu, cores=os.cpu_count(),
                threads=torch.get_num_threads(), model=args.model, task=args.task,
                sizes=sizes, seed=args.seed, split_seed=args.seed, prompt=dataclasses.asdict(PromptConfig(
                    epochs=args.epochs)), attribution=dataclasses.asdict(AttributionConfig(
                        num_examples=args.attribution_examples)),
                scope=args.scope, prune_heads=True, batch_size=args.batch_size,
                max_length=args.max_length, seconds=round(seconds, 1),
                command=" ".join(["python", "python/compensation_ablation.py", *argv]))


def table(result: dict) -> str:
    base = result["dense"]["accuracy"]
    lines = [f"{result['metadata']['model']} on {result['metadata']['task']}: dense prompt-tuned "
             f"test accuracy {base:.3f} (n={result['metadata']['sizes']['test']}); changes in "
             "points, paired SE in parentheses",
             "",
             "| rate | FFN / heads pruned | plain acc | plain change | compensated acc | "
             "compensated change | compensated - plain |",
             "|---|---|---|---|---|---|---|"]

    def pts(c):
        return f"{100 * c['change']:+.1f} ({100 * c['change_se']:.1f})"

    for row in result["rows"]:
        lines.append(f"| {row['rate']:.2f} | {row['ffn_pruning_rate']:.2f} / "
                     f"{row['head_pruning_rate']:.2f} | {row['plain']['accuracy']:.3f} | "
                     f"{pts(row['plain'])} | {row['compensated']['accuracy']:.3f} | "
                     f"{pts(row['compensated'])} | {pts(row['compensated_vs_plain'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_task(args.task, max_examples=args.max_train, seed=args.seed)["train"]
    test = load_task(args.task, max_examples=args.test, seed=args.seed)["test"]
    calibration = (train.sample(args.calibration, seed=args.seed)
                   if len(train) > args.calibration else train)
    model, tokenizer = load_model(args.model, len(train.label_names))
    model.eval()

    # localize's steps 1 and 2, once: the prompt-tuned (dense) expert and the attribution scores
    task = _Task.of(model, tokenizer, train, None, None, args.max_length)
    run = _Run(model, tokenizer, task, args.batch_size, args.seed, False)
    tuned, _ = _tune_prompt(run, train, PromptConfig(epochs=args.epochs), None)
    dense = task.expert(None, tuned.prompt, tuned.head)
    ffn_scores, head_scores = attribute(model, tokenizer, dense, train, "grad",
                                        AttributionConfig().ig_steps, args.attribution_examples,
                                        args.batch_size, AttributionConfig().absolute, args.seed,
                                        False)
    trained = time.perf_counter() - started

    eval_batch = 2 * args.batch_size
    base = dense.correct(model, tokenizer, test, batch_size=eval_batch).tolist()
    rows = []
    for rate in args.rates:
        mask = mask_at_rate(ffn_scores, head_scores, rate, args.scope, True, task.sizes)
        fit_started = time.perf_counter()
        compensated_mask = bias_compensation(model, mask, calibration_batches(
            model, tokenizer, dense, calibration, eval_batch, args.max_length))
        fit_seconds = time.perf_counter() - fit_started
        answers = {}
        for kind, with_mask in (("plain", mask), ("compensated", compensated_mask)):
            expert = task.expert(with_mask, dense.prompt, dense.head)
            answers[kind] = expert.correct(model, tokenizer, test, batch_size=eval_batch).tolist()
        summary = mask.summary()
        row = dict(rate=rate, ffn_pruning_rate=summary["ffn_pruning_rate"],
                   head_pruning_rate=summary["head_pruning_rate"],
                   compensation_seconds=round(fit_seconds, 2),
                   ffn_bias_layers=sorted(compensated_mask.ffn_bias),
                   attn_bias_layers=sorted(compensated_mask.attn_bias))
        for kind, correct in answers.items():
            row[kind] = dict(accuracy=sum(correct) / len(correct), **paired_change(correct, base))
        row["compensated_vs_plain"] = paired_change(answers["compensated"], answers["plain"])
        rows.append(row)
        print(f"rate {rate:.2f}: plain {row['plain']['accuracy']:.3f}, compensated "
              f"{row['compensated']['accuracy']:.3f} (dense {sum(base) / len(base):.3f})",
              flush=True)

    sizes = dict(train=len(train), test=len(test), calibration=len(calibration),
                 attribution=min(args.attribution_examples, len(train)))
    result = dict(dense=dict(accuracy=sum(base) / len(base), correct=sum(base)), rows=rows,
                  prompt_losses=list(tuned.losses),
                  train_and_attribution_seconds=round(trained, 1),
                  metadata=metadata(args, argv, sizes, time.perf_counter() - started))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    text = table(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
