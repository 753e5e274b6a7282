"""ExpertRouter under load: client threads each sending one request at a time to five tasks'
experts, served by today's serial router against mixed-task batching.

  * serial: `router.run(task, text)`, one request per forward pass, its expert plugged for it
    (requests from other threads wait on the router's lock);
  * mixed: `router.ask(task, text)`, the requests that arrive within the batch window served
    together in one forward pass, each row on its own expert (doe_kernels.mixed).

Task mixes: uniform (each task a fifth of the requests) and skewed (one task 60%, the others 10%
each). Per mix and router: requests per second over all clients, and the median and 99th
percentile of a request's latency. With --ceiling, then, without threads, the batching
ceiling: the same requests one per forward pass and eight per forward pass, on their own experts
and all on one expert (`batching_ceiling`).

    python python/router_benchmark.py --model minilm --experts EXPERTS/minilm \
        --out benchmarks/results/router_cpu
    python python/router_benchmark.py --model smollm2 --out benchmarks/results/router_cpu

--experts DIR takes the five experts an `unplug_and_play.py --out` run saved (DIR/<task>.safetensors);
without it, stand-ins with the pruning rates and label counts of the committed five-task tables
(random masks, soft prompts and heads: the speed depends only on their sizes). The request texts
are the tasks' test texts (tasks.py). Writes OUT/router_<model>.json and a plot beside it, and
prints the table.

On a machine without the models and data sets (a GPU server), `--export-assets DIR` writes here
what the run needs but the weights (both models' configs and tokenizers, the request texts and
label names); there `--assets DIR` builds the model from its config with random weights (the
speed depends only on the sizes) and serves those texts, on `--device` in `--dtype`:

    python python/router_benchmark.py --export-assets .gpu_assets
    python python/router_benchmark.py --model smollm2 --assets .gpu_assets --device cuda \
        --dtype bfloat16 --out OUT
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import threading
import time

import torch

import doe_kernels as dk
from doe_kernels.expert import Expert, label_token_ids, model_sizes
from tasks import load_task
from unplug_and_play import causal_lm_task, load_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from report import device_name, metadata, run_start  # noqa: E402  (the machine's description)

TASKS = ("polarity", "rotten_tomatoes", "tweets", "newsgroups", "reuters8")
# the pruning rates of the current five-task tables (docs/results.md, localize's defaults)
STAND_IN_RATES = {"minilm": (0.028, 0.084, 0.309, 0.591, 0.647),
                  "smollm2": (0.338, 0.141, 0.141, 0.084, 0.169)}
MIXES = {"uniform": (0.2, 0.2, 0.2, 0.2, 0.2), "skewed": (0.6, 0.1, 0.1, 0.1, 0.1)}


def stand_in(model, tokenizer, model_name: str, task: str, rate: float, names, seed: int):
    """An expert of `task`'s shape: a random mask at `rate` (FFN neurons, every head kept), a
    random 10-token prompt and, for a classifier, a random head over the task's labels."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    mask = dk.ExpertMask.random(model, ffn_keep=1 - rate, heads_keep=1.0, seed=seed)
    prompt = 0.02 * torch.randn(10, hidden, generator=gen)
    if model_name == "smollm2":
        template, words = causal_lm_task(task, tokenizer, names)
        return Expert(mask, prompt, "causal_lm", names, label_words=words,
                      label_token_ids=label_token_ids(tokenizer, words), template=template,
                      sizes=model_sizes(model), name=task, max_length=128)
    head = {"classifier.weight": 0.02 * torch.randn(len(names), hidden, generator=gen),
            "classifier.bias": torch.zeros(len(names))}
    return Expert(mask, prompt, "seq_cls", names, head=head, sizes=model_sizes(model), name=task,
                  max_length=128)


def task_texts(count: int) -> dict:
    """{task: {"texts": `count` test texts, "label_names": the task's labels}}."""
    out = {}
    for task in TASKS:
        test = load_task(task)["test"].sample(count, seed=0)
        out[task] = {"texts": list(test.texts), "label_names": list(test.label_names)}
    return out


def experts_and_texts(model, tokenizer, args) -> tuple[dict, dict]:
    """({task: Expert}, {task: request texts})."""
    if args.assets:
        with open(os.path.join(args.assets, "texts.json")) as f:
            tasks = json.load(f)
    else:
        tasks = task_texts(args.texts)
    experts, texts = {}, {}
    for i, task in enumerate(TASKS):
        texts[task] = tasks[task]["texts"]
        if args.experts:
            experts[task] = Expert.load(os.path.join(args.experts, f"{task}.safetensors"))
        else:
            experts[task] = stand_in(model, tokenizer, args.model, task,
                                     STAND_IN_RATES[args.model][i], tasks[task]["label_names"],
                                     seed=i)
    return experts, texts


def export_assets(folder: str, count: int) -> None:
    """Both models' configs and tokenizers (never weights), and the tasks' request texts, into
    `folder`."""
    from transformers import AutoConfig, AutoTokenizer

    from offline_models import minilm_dir, smollm2_dir

    for name, source in (("minilm", minilm_dir()), ("smollm2", smollm2_dir())):
        AutoConfig.from_pretrained(source).save_pretrained(os.path.join(folder, name))
        AutoTokenizer.from_pretrained(source).save_pretrained(os.path.join(folder, name))
    with open(os.path.join(folder, "texts.json"), "w") as f:
        json.dump(task_texts(count), f)
    print(f"wrote {folder}: minilm/, smollm2/ (configs and tokenizers), texts.json")


def model_from_assets(name: str, folder: str):
    """The model built from its config in `folder`/name, with random weights, and its
    tokenizer."""
    from transformers import (AutoConfig, AutoTokenizer, BertForSequenceClassification,
                              LlamaForCausalLM)

    path = os.path.join(folder, name)
    torch.manual_seed(0)
    if name == "minilm":
        model = BertForSequenceClassification(AutoConfig.from_pretrained(path, num_labels=2))
    else:
        model = LlamaForCausalLM(AutoConfig.from_pretrained(path))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def client_requests(mix, texts, count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    tasks = rng.choices(TASKS, weights=mix, k=count)
    return [(task, rng.choice(texts[task])) for task in tasks]


def percentile(sorted_values, q: float):
    """The nearest-rank `q` percentile (0 < q <= 1) of ascending `sorted_values`: the smallest
    value at least a `q` share of them do not exceed, sorted_values[ceil(q * n) - 1]."""
    return sorted_values[max(math.ceil(q * len(sorted_values)) - 1, 0)]


def load(router, mode: str, mix, texts, args) -> dict:
    """Run the clients; requests per second and latency percentiles (ms, nearest-rank:
    `percentile`)."""
    call = router.run if mode == "serial" else router.ask
    plans = [client_requests(mix, texts, args.requests, seed=c) for c in range(args.clients)]
    latencies, errors = [], []
    start_line = threading.Barrier(args.clients + 1)

    def client(plan):
        start_line.wait()
        try:
            for task, text in plan:
                begun = time.perf_counter()
                call(task, text)
                latencies.append(time.perf_counter() - begun)
        except Exception as error:  # reported below
            errors.append(error)

    # daemon threads: a run cut off by its time limit ends without waiting for its clients
    threads = [threading.Thread(target=client, args=(plan,), daemon=True) for plan in plans]
    for thread in threads:
        thread.start()
    start_line.wait()
    begun = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - begun
    if errors:
        raise errors[0]
    latencies.sort()
    return dict(requests=len(latencies), seconds=round(seconds, 3),
                requests_per_s=round(len(latencies) / seconds, 2),
                p50_ms=round(1e3 * percentile(latencies, 0.5), 1),
                p99_ms=round(1e3 * percentile(latencies, 0.99), 1),
                mean_ms=round(1e3 * statistics.fmean(latencies), 1))


def measure(model, tokenizer, experts, texts, args, on_row=lambda rows: None) -> list[dict]:
    """A row per mix and router (`on_row(rows so far)` after each)."""
    rows = []
    for mix_name, mix in MIXES.items():
        for mode in ("serial", "mixed"):
            with dk.ExpertRouter(model, tokenizer, batch_size=args.clients,
                                 batch_window=args.window) as router:
                for task, expert in experts.items():
                    router.add(task, expert)
                batches, mixed = [], router._mixed
                router._mixed = lambda requests: batches.append(len(requests)) or mixed(requests)
                for task in TASKS:  # warm-up: one-off costs off the clock
                    router.run(task, texts[task][0])
                    router.ask(task, texts[task][0])
                if getattr(args, "warmup", 0):  # e.g. a GPU's kernels tuned per shape bucket
                    load(router, mode, mix, texts, argparse.Namespace(
                        **{**vars(args), "requests": args.warmup}))
                batches.clear()
                row = dict(mix=mix_name, router=mode, **load(router, mode, mix, texts, args))
                if mode == "mixed":
                    row["mean_batch"] = round(statistics.fmean(batches), 2)
            rows.append(row)
            print(row, flush=True)
            on_row(rows)
    return rows


CEILING_BATCHES = 6


def batching_ceiling(model, tokenizer, experts, texts, args) -> dict:
    """Without client threads, the same `clients` x CEILING_BATCHES requests (of the uniform mix)
    timed one per forward pass (`run`) and `clients` per forward pass (`run_mixed`), once on their
    own experts and once all on the first task's expert: what batching alone gains here, the
    ceiling of the routers' ratio, and what mixing five experts costs on top of it. Milliseconds
    a request, best of two passes."""
    requests = client_requests(MIXES["uniform"], texts, args.clients * CEILING_BATCHES, seed=99)
    cases = {"own experts": requests, "one expert": [(TASKS[0], text) for _, text in requests]}
    out = {}
    with dk.ExpertRouter(model, tokenizer, batch_size=args.clients) as router:
        for task, expert in experts.items():
            router.add(task, expert)
        for case, plan in cases.items():
            batches = [plan[i:i + args.clients] for i in range(0, len(plan), args.clients)]
            for mode, serve in (("alone", lambda: [router.run(t, x) for t, x in plan]),
                                ("batched", lambda: [router.run_mixed(b) for b in batches])):
                serve()  # warm-up: one-off costs off the clock
                seconds = []
                for _ in range(2):
                    begun = time.perf_counter()
                    serve()
                    seconds.append(time.perf_counter() - begun)
                out[f"{case}, {mode}"] = round(1e3 * min(seconds) / len(plan), 2)
    out["batching gain, one expert"] = round(out["one expert, alone"]
                                             / out["one expert, batched"], 2)
    out["batching gain, own experts"] = round(out["own experts, alone"]
                                              / out["own experts, batched"], 2)
    return dict(one_expert=TASKS[0], requests=len(requests), ms_per_request=out)


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    mixes = list(MIXES)
    for ax, key, label in ((axes[0], "requests_per_s", "requests / s"),
                           (axes[1], "p99_ms", "p99 latency (ms)")):
        for offset, mode in ((-0.2, "serial"), (0.2, "mixed")):
            values = [next(r[key] for r in rows if r["mix"] == m and r["router"] == mode)
                      for m in mixes]
            ax.bar([i + offset for i in range(len(mixes))], values, width=0.4, label=mode)
        ax.set_xticks(range(len(mixes)), mixes)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    if args.export_assets:
        return export_assets(args.export_assets, args.texts)
    started = run_start()  # the commit and load as the run begins
    if args.assets:
        model, tokenizer = model_from_assets(args.model, args.assets)
    else:
        model, tokenizer = load_model(args.model, num_labels=2)
    model.to(args.device, getattr(torch, args.dtype))
    experts, texts = experts_and_texts(model, tokenizer, args)
    save = results_writer(args, experts, started) if args.out else (lambda rows: None)
    rows = measure(model, tokenizer, experts, texts, args, on_row=save)
    for mix in MIXES:
        serial, mixed = (next(r for r in rows if r["mix"] == mix and r["router"] == m)
                         for m in ("serial", "mixed"))
        print(f"{mix}: mixed {mixed['requests_per_s'] / serial['requests_per_s']:.2f}x the "
              f"serial router's requests/s; p99 {serial['p99_ms']} -> {mixed['p99_ms']} ms")
    ceiling = batching_ceiling(model, tokenizer, experts, texts, args) if args.ceiling else None
    if ceiling:
        print(f"batching ceiling (no threads): {ceiling}")
    if args.out:
        path = save(rows, ceiling)
        where = device_name(args.device)
        try:
            plot(rows, path.replace(".json", ".png"),
                 f"ExpertRouter, {args.model}, {args.clients} clients, {where}, {args.dtype}")
        except ImportError as error:  # a machine without matplotlib still keeps the results
            print(f"no plot ({error})")
        print(path)


def results_writer(args, experts, run_info=None):
    """save(rows, ceiling=None): OUT/router_<model>.json with the rows so far (written after each,
    so that a run stopped early keeps what it measured) and batching_ceiling's result; returns
    its path. `run_info`: run_start()'s record of the run's beginning (default: now)."""
    run_info = run_info or run_start()
    os.makedirs(args.out, exist_ok=True)
    rates = {t: e.figures.get("pruning_rate", e.mask.summary()["ffn_pruning_rate"])
             for t, e in experts.items()}
    path = os.path.join(args.out, f"router_{args.model}.json")

    def save(rows, ceiling=None):
        result = dict(model=args.model, experts=args.experts or "stand-ins",
                      weights="random (from the config)" if args.assets else "trained",
                      pruning_rates=rates, cpu=device_name("cpu"),
                      **metadata(args.device, "router", run_info=run_info), args=vars(args),
                      rows=rows, batching_ceiling=ceiling)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        return path

    return save


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--experts", default=None, help="folder of the five tasks' experts")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--texts", type=int, default=200, help="test texts drawn per task")
    parser.add_argument("--window", type=float, default=0.005, help="batch window (seconds)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests per client served untimed before each measurement")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the batching ceiling (batching_ceiling)")
    parser.add_argument("--out", default=None, help="folder for the results file and plot")
    parser.add_argument("--export-assets", default=None, metavar="DIR",
                        help="write the configs, tokenizers and texts a run elsewhere needs, "
                             "and stop")
    parser.add_argument("--assets", default=None, metavar="DIR",
                        help="a folder --export-assets wrote: the model with random weights")
    parser.add_argument("--device", default="cpu", help="torch device of the model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return parser.parse_args()


if __name__ == "__main__":
    main()
