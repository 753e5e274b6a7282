"""vLLM serving an expert (doe_kernels.vllm.plug) against the dense model and against a physically
sliced checkpoint of the same expert, on the CPU build of vLLM.

For each pruning rate, a random mask keeps the same number of FFN neurons in every layer (every
head), so that the sliced checkpoint is an ordinary Llama with a smaller intermediate size that
vLLM loads as it is: the fair baseline. Measured, all engines eager (`enforce_eager=True`), or
with --compiled all in vLLM's default compiled mode (on the CPU: traced once, Inductor; a plugged
engine's MLPs and projections then run through doe_kernels.vllm.routes, and the dense model is
also measured on an engine without the extension, "dense-plain"), float32:
  * throughput: generated tokens per second for a batch of prompts (one `generate` call);
  * decode latency: seconds per generated token at batch 1 (a long generation minus a one-token
    one, over the extra tokens).

    python python/vllm_benchmark.py --model smollm2 --out benchmarks/results/vllm_cpu
    python python/vllm_benchmark.py --model llama-wide --out benchmarks/results/vllm_cpu
    python python/vllm_benchmark.py --model smollm2 --compiled --out benchmarks/results/vllm_cpu
    python python/vllm_benchmark.py --model mixtral-small --out benchmarks/results/vllm_cpu

On a Mixtral (a random mixtral-small) the mask keeps the same neurons inside every expert (every
expert and head kept), so the plugged expert runs doe_kernels' own routing and expert FFNs
(doe_kernels.vllm.moe) against vLLM's fused experts on the dense and on the sliced checkpoint.
With --skip the experts also skip small second experts (OUT/vllm_mixtral-small_skip.json; the
sliced checkpoint cannot skip):

    python python/vllm_benchmark.py --model mixtral-small --skip --rates 0.35 0.65 \
        --out benchmarks/results/vllm_cpu

Writes OUT/vllm_<model>.json (vllm_<model>_compiled.json) and a plot beside it, and prints the
table. With --uneven SPLIT instead, at tensor-parallel size 2: for each rate, the same number of
random neurons kept with SPLIT of them on rank 0's half against an even split (what uneven shards
cost; OUT/vllm_<model>_tp2_uneven.json):

    python python/vllm_benchmark.py --model llama-wide --compiled --rates 0.65 --uneven 0.65 \
        --out benchmarks/results/vllm_cpu
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import offline_models  # beside this script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from report import run_start  # noqa: E402  (the commit and load as a run begins)

RATES = (0.35, 0.65, 0.9)


def random_llama(folder: str) -> str:
    """A random float32 Llama wider than SmolLM2 (about 300M parameters): 8 layers, hidden 1536,
    6144 neurons, 12 heads / 4 KV heads, a 32000-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1536, intermediate_size=6144, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def random_mixtral(folder: str) -> str:
    """A random float32 Mixtral (about 270M parameters): 4 layers, hidden 1024, 8 experts of 2048
    neurons (top 2), 16 heads / 4 KV heads, a 32000-token vocabulary."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=2048,
                           bos_token_id=1, eos_token_id=2)
    MixtralForCausalLM(config).save_pretrained(folder)
    return folder


def model_path(name: str, work: str) -> str:
    """SmolLM2's folder, or a random llama-wide or mixtral-small saved under `work`."""
    if name == "smollm2":
        return offline_models.smollm2_dir()
    make = random_mixtral if name == "mixtral-small" else random_llama
    return make(os.path.join(work, "model"))


def sliced_checkpoint(model, mask, folder: str) -> str:
    """`model` with each layer's FFN (in a Mixtral, every expert's) cut to the mask's kept
    neurons (the same count in every layer), saved as an ordinary checkpoint."""
    import copy

    config = copy.deepcopy(model.config)
    counts = {mask.ffn[layer].numel() for layer in range(config.num_hidden_layers)}
    if len(counts) != 1:
        raise ValueError("a sliced checkpoint needs the same neuron count in every layer")
    intermediate, config.intermediate_size = config.intermediate_size, counts.pop()
    sliced = type(model)(config)
    state = dict(model.state_dict())
    for layer in range(config.num_hidden_layers):
        kept, prefix = mask.ffn[layer], f"model.layers.{layer}.mlp."
        if prefix + "experts.gate_up_proj" in state:  # Mixtral: experts x 2I x H, experts x H x I
            rows = torch.cat([kept, kept + intermediate])
            for name, index in (("gate_up_proj", (slice(None), rows)),
                                ("down_proj", (slice(None), slice(None), kept))):
                key = prefix + "experts." + name
                state[key] = state[key][index].clone()
            continue
        for name in ("gate_proj", "up_proj"):
            state[prefix + name + ".weight"] = state[prefix + name + ".weight"][kept].clone()
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, kept].clone()
    sliced.load_state_dict(state)
    sliced.save_pretrained(folder)
    return folder


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def start_engine(path: str, extension: bool, compiled: bool = False, tp: int = 1):
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tp == 2:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    options = dict(worker_extension_cls="doe_kernels.vllm.WorkerExtension") if extension else {}
    return LLM(model=path, dtype="float32", enforce_eager=not compiled, max_model_len=1024,
               seed=0, skip_tokenizer_init=True, tensor_parallel_size=tp, **options)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def measure(llm, args) -> dict:
    """Throughput (generated tokens/s, batch of --batch prompts) and decode seconds per token at
    batch 1, medians of --repeats."""
    from vllm import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(10, 20000, (args.prompt_tokens,),
                                                  generator=gen).tolist()}
               for _ in range(args.batch)]

    def seconds(batch, tokens):
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        llm.reset_prefix_cache()  # every repeat computes its prompts again
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    median = statistics.median
    seconds(prompts[:2], 4)  # warm-up
    batch = median([seconds(prompts, args.new_tokens) for _ in range(args.repeats)])
    long = median([seconds(prompts[:1], args.new_tokens + 1) for _ in range(args.repeats)])
    short = median([seconds(prompts[:1], 1) for _ in range(args.repeats)])
    return dict(tokens_per_s=args.batch * args.new_tokens / batch,
                decode_s_per_token=(long - short) / args.new_tokens)


def run(args) -> list:
    """Every (variant, rate) row: dense, the plugged expert and the sliced checkpoint."""
    from transformers import AutoModelForCausalLM

    import doe_kernels
    import doe_kernels.vllm as dkv

    work = tempfile.mkdtemp(prefix="vllm_bench_")
    path = model_path(args.model, work)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    masks = {rate: doe_kernels.ExpertMask.random(model, ffn_keep=1 - rate, seed=1)
             for rate in args.rates}
    if args.skip:  # each layer's median second / top routing weight on random tokens
        calibration = {"input_ids": torch.randint(10, 20000, (8, 64),
                                                  generator=torch.Generator().manual_seed(1))}
        masks = {rate: mask.with_skip(doe_kernels.moe.skip_thresholds(model, calibration, mask))
                 for rate, mask in masks.items()}
    rows = []
    if args.compiled:  # what the routes cost the dense model
        llm = start_engine(path, extension=False, compiled=True)
        rows.append(dict(variant="dense-plain", rate=0.0, **measure(llm, args)))
        stop_engine(llm)
    llm = start_engine(path, extension=True, compiled=args.compiled)
    rows.append(dict(variant="dense", rate=0.0, **measure(llm, args)))
    for rate, mask in masks.items():
        dkv.plug(llm, mask)
        rows.append(dict(variant="expert", rate=rate, **measure(llm, args)))
        print(rows[0], rows[-1], flush=True)
    dkv.unplug(llm)
    stop_engine(llm)
    for rate, mask in masks.items():
        sliced = sliced_checkpoint(model, mask, os.path.join(work, f"sliced_{rate}"))
        llm = start_engine(sliced, extension=False, compiled=args.compiled)
        rows.append(dict(variant="sliced", rate=rate, **measure(llm, args)))
        print(rows[-1], flush=True)
        stop_engine(llm)
    return rows


def baseline(rows) -> dict:
    """The dense row ratios are taken against: vLLM's own engine without the extension where it
    was measured (compiled runs), else the dense model on the extension's engine."""
    return next((r for r in rows if r["variant"] == "dense-plain"),
                next(r for r in rows if r["variant"] == "dense"))


def split_mask(intermediate: int, layers: int, keep: float, rank0_share: float,
               seed: int = 1):
    """A mask keeping round(keep * intermediate) random neurons in every layer, rank0_share of
    them in the first half (rank 0's at tensor-parallel size 2)."""
    import doe_kernels

    gen = torch.Generator().manual_seed(seed)
    half, total = intermediate // 2, round(keep * intermediate)
    first = round(rank0_share * total)
    return doe_kernels.ExpertMask({layer: torch.cat([
        torch.randperm(half, generator=gen)[:first],
        torch.randperm(half, generator=gen)[:total - first] + half]).sort().values
        for layer in range(layers)})


def run_uneven(args) -> list:
    """At tensor-parallel size 2, per rate: an even split of the kept neurons over the two
    ranks, a split with --uneven of them on rank 0, and the even one again."""
    from transformers import AutoConfig

    import doe_kernels.vllm as dkv
    from doe_kernels.tensor_parallel import ffn_imbalance

    path = model_path(args.model, tempfile.mkdtemp(prefix="vllm_bench_"))
    config = AutoConfig.from_pretrained(path)
    llm = start_engine(path, extension=True, compiled=args.compiled, tp=2)
    rows = [dict(variant="dense", rate=0.0, **measure(llm, args))]
    for rate in args.rates:
        for share in (0.5, args.uneven, 0.5):
            mask = split_mask(config.intermediate_size, config.num_hidden_layers, 1 - rate, share)
            dkv.plug(llm, mask)
            rows.append(dict(variant=f"rank 0 keeps {100 * share:.0f}%", rate=rate,
                             imbalance=max(ffn_imbalance(mask, config.intermediate_size,
                                                         2).values()),
                             **measure(llm, args)))
            print(rows[-1], flush=True)
    stop_engine(llm)
    return rows


def table(rows) -> str:
    dense = baseline(rows)
    sliced = {r["rate"]: r for r in rows if r["variant"] == "sliced"}
    lines = ["| variant | FFN pruned | tokens/s (batch) | vs dense | vs sliced | decode ms/token "
             "| vs dense | vs sliced |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = sliced.get(r["rate"], r)
        lines.append(
            f"| {r['variant']} | {100 * r['rate']:.0f}% | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{1e3 * r['decode_s_per_token']:.1f} | "
            f"{dense['decode_s_per_token'] / r['decode_s_per_token']:.2f}x | "
            f"{base['decode_s_per_token'] / r['decode_s_per_token']:.2f}x |")
    return "\n".join(lines)


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = baseline(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "tokens_per_s", "throughput / dense"),
                           (axes[1], "decode_s_per_token", "decode speed / dense")):
        for variant, marker in (("expert", "o-"), ("sliced", "s--")):
            points = sorted((100 * r["rate"], r[key]) for r in rows if r["variant"] == variant)
            ratio = [(v / dense[key]) if key == "tokens_per_s" else (dense[key] / v)
                     for _, v in points]
            ax.plot([p[0] for p in points], ratio, marker, label=variant)
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_xlabel("FFN neurons pruned (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        choices=("smollm2", "llama-wide", "mixtral-small"))
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--batch", type=int, default=16, help="prompts in the throughput batch")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM's default compiled engines instead of eager ones")
    parser.add_argument("--uneven", type=float, metavar="SPLIT",
                        help="at tensor-parallel size 2, compare an even split of the kept "
                        "neurons with SPLIT of them on rank 0")
    parser.add_argument("--skip", action="store_true",
                        help="mixtral-small: the experts also skip small second experts "
                        "(thresholds: each layer's median ratio on random tokens)")
    parser.add_argument("--out", default=os.path.join("results", "vllm_bench"))
    args = parser.parse_args()
    if args.skip and args.model != "mixtral-small":
        parser.error("--skip needs --model mixtral-small")
    started = run_start()  # the commit as the run begins (it may take hours)
    os.makedirs(args.out, exist_ok=True)
    rows = run(args) if args.uneven is None else run_uneven(args)
    if args.uneven is None:
        print(table(rows))
    import vllm

    meta = dict(model=args.model, args=vars(args), cpu=cpu_name(),
                threads=os.cpu_count(), torch=torch.__version__, vllm=vllm.__version__,
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                commit=started["commit"])
    name = (f"vllm_{args.model}" + ("_skip" if args.skip else "")
            + ("_compiled" if args.compiled else "")
            + ("_tp2_uneven" if args.uneven is not None else ""))
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.uneven is None:
        plot(rows, os.path.join(args.out, f"{name}.png"),
             f"vLLM on the CPU, {args.model}" + (", compiled" if args.compiled else ""))


if __name__ == "__main__":
    main()
