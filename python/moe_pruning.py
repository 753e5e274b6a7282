"""Expert pruning and dynamic skipping on an upcycled SmolLM2-135M (Lu et al. 2024's methods).

SmolLM2-135M-Instruct is upcycled to a Mixtral with 8 experts and top-2 routing (experts: perturbed
copies of the dense MLP; router: k-means of each layer's MLP inputs on calibration text). Then, for
8 -> 6 and 8 -> 4 experts, the experts to keep are chosen per layer (doe_kernels.moe.select_experts,
inputs from the unpruned model), and compared with random subsets of the same size, each with and
without dynamic skipping. Quality = mean next-token loss on held-out text. Text: the five offline
tasks' texts (python/tasks.py): calibration from their training splits (generic, task-agnostic),
evaluation from their test splits.

    python python/moe_pruning.py [--out DIR]   (default ./results/moe_smollm2; the committed
                                                run: --out benchmarks/results/moe_smollm2)
"""
import argparse
import json
import os
import sys
import time

import torch

import offline_models  # beside this script: on the path when it runs, and in the tests
from tasks import TASKS, load_task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from report import metadata, run_start  # noqa: E402  (a results file's machine, versions, commit)

import doe_kernels as dk


def texts(split: str, count: int, seed: int) -> list[str]:
    per_task = count // len(TASKS)
    out = []
    for task in TASKS:
        data = load_task(task, max_examples=4 * per_task)[split]
        out += data.sample(min(per_task, len(data)), seed=seed).texts
    return out


def batches(tokenizer, items, max_tokens: int, batch_size: int = 8):
    out = []
    for start in range(0, len(items), batch_size):
        enc = tokenizer(items[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_tokens)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def mean_loss(model, eval_batches) -> float:
    total, count = 0.0, 0
    for batch in eval_batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        tokens = int((labels[:, 1:] != -100).sum())
        total += float(model(**batch, labels=labels).loss) * tokens
        count += tokens
    return total / count


def skipped_fraction(model, mask, eval_batches) -> float:
    """Share of (token, second expert) pairs that dynamic skipping drops on the evaluation text."""
    from doe_kernels.models.moe_block import route
    from doe_kernels.moe.calibration import feed

    counts = [0, 0]

    def record(layer, block, x):
        weights, _ = route(torch.nn.functional.linear(x, block.router_weight), block.top_k,
                           block.plan.kept)
        counts[0] += int((weights[:, 1] < mask.skip[layer] * weights[:, 0]).sum())
        counts[1] += weights.shape[0]

    with dk.plugged(model, mask):
        blocks = [p.moe_modules[0] for p in getattr(model, dk.models.PATCH_STATE_ATTR).layers]
        feed(model, blocks, eval_batches, record)
    return counts[0] / counts[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--calibration", type=int, default=100, help="calibration texts")
    parser.add_argument("--eval", type=int, default=200, help="evaluation texts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--random-subsets", type=int, default=3)
    parser.add_argument("--out", default=os.path.join("results", "moe_smollm2"))
    args = parser.parse_args()
    started = run_start()  # the commit and load as the run begins (it may take hours)
    os.makedirs(args.out, exist_ok=True)

    dense, tokenizer = offline_models.load_smollm2()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    calibration = batches(tokenizer, texts("train", args.calibration, seed=0), args.max_tokens)
    evaluation = batches(tokenizer, texts("test", args.eval, seed=1), args.max_tokens)
    start = time.perf_counter()
    model = dk.moe.upcycle(dense, num_experts=args.experts, top_k=2, noise=args.noise,
                           calibration=calibration)
    rows = [dict(setting="dense SmolLM2-135M", loss=mean_loss(dense, evaluation))]
    del dense
    rows.append(dict(setting=f"upcycled, {args.experts} experts", experts=args.experts,
                     loss=mean_loss(model, evaluation)))
    print(rows, flush=True)
    full_skip = dk.ExpertMask().with_skip(dk.moe.skip_thresholds(model, calibration))
    rows.append(_evaluate(model, full_skip, evaluation, f"{args.experts} experts + skipping",
                          args.experts))
    for keep in (6, 4):
        chosen = dk.moe.select_experts(model, calibration, keep=keep)
        chosen = chosen.with_skip(dk.moe.skip_thresholds(model, calibration, chosen))
        rows.append(_evaluate(model, chosen, evaluation, f"{keep} selected", keep, skip=False))
        rows.append(_evaluate(model, chosen, evaluation, f"{keep} selected + skipping", keep))
        for seed in range(args.random_subsets):
            random = dk.ExpertMask.random(model, ffn_keep=1.0, experts_keep=keep / args.experts,
                                          seed=seed)
            rows.append(_evaluate(model, random, evaluation, f"{keep} random (seed {seed})", keep,
                                  skip=False))
        print(rows[-1], flush=True)
    result = dict(model="SmolLM2-135M-Instruct upcycled", device="cpu",
                  threads=torch.get_num_threads(), torch=torch.__version__,
                  meta=metadata("cpu", "moe_pruning", run_info=started), args=vars(args),
                  seconds=time.perf_counter() - start, eval_tokens=sum(
                      int(b["attention_mask"][:, 1:].sum()) for b in evaluation), rows=rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'setting':<32} {'experts':>7} {'loss':>7} {'ppl':>8} {'skipped':>8}")
    for r in rows:
        skipped = f"{100 * r['skipped']:7.1f}%" if r.get("skipped") is not None else f"{'-':>8}"
        print(f"{r['setting']:<32} {r.get('experts', '-'):>7} {r['loss']:7.3f} "
              f"{torch.tensor(r['loss']).exp():8.2f} {skipped}")


def _evaluate(model, mask, evaluation, setting, experts, skip=True):
    with dk.plugged(model, mask, dynamic_skip=skip):
        loss = mean_loss(model, evaluation)
    return dict(setting=setting, experts=experts, loss=loss,
                skipped=skipped_fraction(model, mask, evaluation) if skip else None,
                mask={l: m.tolist() for l, m in mask.moe.items()})


if __name__ == "__main__":
    main()
