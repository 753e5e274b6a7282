"""Segmented FFN on the cpu backend: the union of the experts' lists against the segments, over
rows per segment, how much of the FFN the experts keep and how much their lists overlap, and what
`strategy="auto"` picks.

Five experts keep 35% of the neurons each, a fraction `shared` of each list common to all five
(0: random lists, union about 88% of the neurons; 1: equal lists, union 35%); or, weakly pruned,
80% each at random (the union then holds nearly every neuron). Per shape, layout and rows per
segment: the median time of one `segmented_gather_(swiglu_)ffn` call with `strategy="union"`,
`"segments"` and `"auto"`, and what a call picked at the faster one's time costs. The check of
the cpu backend's cost model (csrc/cpu/gather_linear_cpu.cpp, RegimeCosts).

    python python/segmented_union_sweep.py --out \
        benchmarks/results/cpu_intel/segmented_union_sweep.json
"""
import argparse
import json
import os
import sys
import time

import torch

import doe_kernels as dk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from report import metadata, run_start  # noqa: E402  (the benchmarks' machine description)

SHAPES = {"SmolLM2-135M": (576, 1536, "swiglu"), "bert-base": (768, 3072, "gelu"),
          "bert-large": (1024, 4096, "gelu"), "swiglu-1024x4096": (1024, 4096, "swiglu")}
EXPERTS = 5
# (fraction of the neurons each expert keeps, fraction of each list common to all five)
LAYOUTS = ((0.35, 0.0), (0.35, 0.5), (0.35, 1.0), (0.8, 0.0))


def expert_lists(neurons: int, keep: float, shared: float, gen) -> list[torch.Tensor]:
    """Five sorted lists of keep x neurons: `shared` of each common to all, the rest drawn
    apart."""
    keep = round(keep * neurons)
    common = round(shared * keep)
    order = torch.randperm(neurons, generator=gen)
    core, rest = order[:common], order[common:]
    return [torch.cat([core, rest[torch.randperm(rest.numel(), generator=gen)[:keep - common]]])
            .sort().values for _ in range(EXPERTS)]


def median_seconds(fn, budget: float = 0.3) -> float:
    fn()
    start = time.perf_counter()
    fn()
    count = max(5, min(300, int(budget / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[count // 2]


def sweep(rows_list, dtype: torch.dtype) -> list[dict]:
    out = []
    for name, (hidden, neurons, kind) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        make = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        w_in, w_up, b_in, b_out = make(neurons, hidden), make(neurons, hidden), make(neurons), \
            make(hidden)
        w_out_t = dk.input_major(make(hidden, neurons))
        for keep, shared in LAYOUTS:
            lists = expert_lists(neurons, keep, shared, gen)
            union = torch.unique(torch.cat(lists)).numel()
            for rows in rows_list:
                x = torch.randn(EXPERTS * rows, hidden, generator=gen).to(dtype)
                segments, kept, offsets, _ = dk.pack_segments([rows] * EXPERTS, lists)

                def call(strategy):
                    if kind == "swiglu":
                        return lambda: dk.segmented_gather_swiglu_ffn(
                            x, w_in, w_up, w_out_t, segments, kept, offsets, "cpu",
                            check_indices=False, strategy=strategy)
                    return lambda: dk.segmented_gather_ffn(
                        x, w_in, b_in, w_out_t, b_out, segments, kept, offsets, "gelu", "cpu",
                        check_indices=False, strategy=strategy)

                times = {s: median_seconds(call(s)) for s in ("union", "segments", "auto")}
                row = dict(shape=name, keep=keep, shared=shared,
                           union_fraction=round(union / neurons, 3),
                           rows=rows, **{f"{s}_ms": round(t * 1e3, 4) for s, t in times.items()},
                           auto_vs_faster=round(times["auto"] / min(times["union"],
                                                                     times["segments"]), 3))
                out.append(row)
                print(row, flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256", help="rows per segment")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="results file (JSON)")
    args = parser.parse_args()
    started = run_start()  # the commit and load as the run begins
    with torch.inference_mode():
        rows = sweep([int(r) for r in args.rows.split(",")], getattr(torch, args.dtype))
    mean = sum(r["auto_vs_faster"] for r in rows) / len(rows)
    print(f"auto's call: {mean:.3f}x the faster strategy's time on average, "
          f"{max(r['auto_vs_faster'] for r in rows):.2f}x at worst")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(**metadata("cpu", "segmented_union_sweep", run_info=started),
                           args=vars(args), rows=rows), f, indent=1)
        print(args.out)


if __name__ == "__main__":
    main()
