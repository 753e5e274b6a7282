"""Mixed-task batches in vLLM (doe_kernels.vllm.add / for_experts): requests of five experts in the
same engine steps, against serving the experts one after another, on the CPU build of vLLM.

Five random masks, each keeping --keep of every layer's FFN neurons (random and overlapping sets),
and for each number of requests per expert (--per-expert), a batch of 5 x n requests of
--prompt-tokens random tokens generating --new-tokens greedily, float32:
  * mixed: every request in one `generate` call, each on its own expert;
  * serial: per expert, plug it and generate its n requests (the best a server that swaps
    experts can do: requests grouped by expert, one swap per expert); its mean completion time
    counts each group's wait for the groups before it;
  * one expert: every request on the same plugged expert (what the kernels give one task);
  * dense: every request on the dense model.
Throughput is generated tokens per second (median of --repeats); completion time is seconds from
the start until a request's answer is back, averaged over requests (mixed and one call: the
whole call).

    python python/vllm_mixed_benchmark.py --model smollm2 --out benchmarks/results/vllm_cpu

Writes OUT/vllm_mixed_<model>.json (vllm_mixed_<model>_compiled.json with --compiled) and prints
the table.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from vllm_benchmark import cpu_name, model_path, run_start, start_engine, stop_engine

EXPERTS = 5


def requests_of(args, per_expert: int) -> list:
    """(expert index, prompt) pairs, the experts interleaved as a server receives them."""
    gen = torch.Generator().manual_seed(per_expert)
    return [(i % EXPERTS, {"prompt_token_ids": torch.randint(
        10, 20000, (args.prompt_tokens,), generator=gen).tolist()})
        for i in range(EXPERTS * per_expert)]


def measure(llm, masks, requests, args) -> list:
    """One row per variant for this batch: tokens/s and mean completion seconds (medians)."""
    from vllm import SamplingParams

    import doe_kernels.vllm as dkv

    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [prompt for _, prompt in requests]
    batches = {"dense": (prompts, params), "one expert": (prompts, params),
               "mixed": dkv.for_experts(llm, [(f"expert{e}", p) for e, p in requests], params)}

    def generate(batch, batch_params):
        llm.reset_prefix_cache()  # every repeat computes its prompts again
        llm.generate(batch, batch_params, use_tqdm=False)

    def once(variant) -> tuple[float, float]:
        """(seconds for the whole batch, mean completion seconds) of one run."""
        if variant == "one expert":
            dkv.plug(llm, masks[0])
        ends, start = [], time.perf_counter()
        if variant == "serial":
            for e, mask in enumerate(masks):
                group = [p for i, p in requests if i == e]
                dkv.plug(llm, mask)
                generate(group, params)
                ends += [time.perf_counter() - start] * len(group)
        else:
            generate(*batches[variant])
            ends = [time.perf_counter() - start]
        seconds = time.perf_counter() - start
        dkv.unplug(llm)
        return seconds, sum(ends) / len(ends)

    generate(prompts[:2], params)  # warm-up
    rows = []
    for variant in ("dense", "mixed", "one expert", "serial"):
        seconds, completion = zip(*(once(variant) for _ in range(args.repeats)))
        rows.append(dict(variant=variant, requests=len(requests),
                         tokens_per_s=len(requests) * args.new_tokens / statistics.median(seconds),
                         completion_s=statistics.median(completion)))
        print(rows[-1], flush=True)
    return rows


def run(args) -> list:
    from transformers import LlamaForCausalLM

    import doe_kernels
    import doe_kernels.vllm as dkv

    path = model_path(args.model, tempfile.mkdtemp(prefix="vllm_mixed_"))
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    masks = [doe_kernels.ExpertMask.random(model, ffn_keep=args.keep, seed=seed)
             for seed in range(EXPERTS)]
    del model
    llm = start_engine(path, extension=True, compiled=args.compiled)
    for e, mask in enumerate(masks):
        dkv.add(llm, f"expert{e}", mask)
    rows = []
    for n in args.per_expert:
        rows += [dict(per_expert=n, **row)
                 for row in measure(llm, masks, requests_of(args, n), args)]
    stop_engine(llm)
    return rows


def table(rows) -> str:
    lines = ["| requests | variant | tokens/s | vs serial | vs dense | mean completion s "
             "| vs serial |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = {o["variant"]: o for o in rows if o["per_expert"] == r["per_expert"]}
        serial, dense = same["serial"], same["dense"]
        lines.append(
            f"| {EXPERTS} x {r['per_expert']} | {r['variant']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / serial['tokens_per_s']:.2f}x | "
            f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | {r['completion_s']:.2f} | "
            f"{serial['completion_s'] / r['completion_s']:.2f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "llama-wide"))
    parser.add_argument("--keep", type=float, default=0.35, help="each expert's kept share")
    parser.add_argument("--per-expert", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM's default compiled engine instead of an eager one")
    parser.add_argument("--out", default=os.path.join("results", "vllm_bench"))
    args = parser.parse_args()
    started = run_start()  # the commit as the run begins (it may take hours)
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    print(table(rows))
    import vllm

    meta = dict(model=args.model, args=vars(args), cpu=cpu_name(), threads=os.cpu_count(),
                torch=torch.__version__, vllm=vllm.__version__,
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                commit=started["commit"])
    name = f"vllm_mixed_{args.model}" + ("_compiled" if args.compiled else "")
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
