"""The cpu backend's two regimes on one expert's FFN, each forced, over input rows and kept
lists: the data behind the segment strategy's cost model (csrc/cpu/gather_linear_cpu.cpp,
RegimeCosts).

Per shape, dtype, kept list and row count: the median time of one segmented FFN call holding one
segment (`segmented_gather_ffn` for BERT, `segmented_gather_swiglu_ffn` for SwiGLU) with the
fused kernels forced and with gather + GEMM forced.
The lists: every neuron but the first (the GEMM regime copies it), 82% and 35% of the neurons at
random, and, for the GEMM regime, every neuron in order (a union of experts holding them all:
the regime then multiplies the weight itself). The fit printed at the end expresses each regime
in units of one fused product (an input row with one kept neuron, all projections):
fused = read + rows, GEMM = gemm_read + gemm_copy (when copied) + rows x gemm_product.

    python python/segmented_regimes.py --out benchmarks/results/cpu_intel/segmented_regimes.json
"""
import argparse
import json
import os
import statistics
import sys

import torch

import doe_kernels as dk
from doe_kernels.backends import cpu
from segmented_union_sweep import median_seconds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from report import metadata, run_start  # noqa: E402  (the benchmarks' machine description)

SHAPES = {"SmolLM2-135M": (576, 1536, "swiglu"), "bert-base": (768, 3072, "gelu")}
FORCED = {"fused": 10**12, "gemm": 0}  # cpu.set_gather_above


def kept_lists(neurons: int, gen) -> dict:
    every = torch.arange(neurons)
    return {"every": every, "all_but_one": every[1:],
            **{f"{round(f * 100)}%": torch.randperm(neurons, generator=gen)[:round(f * neurons)]
               .sort().values for f in (0.82, 0.35)}}


def call(kind: str, x, w: dict, kept):
    """One segment's FFN through the segmented op (its regime as the segments run it)."""
    layout = dk.pack_segments([x.shape[0]], [kept])[:3]
    if kind == "swiglu":
        return lambda: dk.segmented_gather_swiglu_ffn(
            x, w["in"], w["up"], w["out_t"], *layout, "cpu", check_indices=False,
            strategy="segments")
    return lambda: dk.segmented_gather_ffn(
        x, w["in"], w["b_in"], w["out_t"], w["b_out"], *layout, "gelu", "cpu",
        check_indices=False, strategy="segments")


def sweep(rows_list, dtype) -> list[dict]:
    out = []
    for name, (hidden, neurons, kind) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        make = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        w = dict(zip(("in", "up", "b_in", "b_out"), (make(neurons, hidden), make(neurons, hidden),
                                                   make(neurons), make(hidden))))
        w["out_t"] = dk.input_major(make(hidden, neurons))
        for rows in rows_list:
            x = torch.randn(rows, hidden, generator=gen).to(dtype)
            for list_name, kept in kept_lists(neurons, gen).items():
                row = dict(shape=name, rows=rows, list=list_name, kept=kept.numel())
                for regime, above in FORCED.items():
                    if list_name == "every" and regime == "fused":
                        continue  # a whole list's fused call is all_but_one's, one neuron more
                    cpu.set_gather_above(above)
                    try:
                        row[f"{regime}_ms"] = round(median_seconds(call(kind, x, w, kept)) * 1e3,
                                                    4)
                    finally:
                        cpu.set_gather_above(None)
                out.append(row)
                print(row, flush=True)
    return out


def fit(rows: list[dict]) -> dict:
    """Per shape, the model's constants in units of one fused product: the fused kernels' and the
    GEMM's time per kept neuron and row from their slopes over 64 rows and more (least squares),
    the fixed parts (read, gemm_read) and the copy as medians over the row counts, each row's
    slope part taken off (so a run's outliers, 10-30% on this kind of machine, weigh little)."""
    fits = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        def per_neuron(name, regime):
            return {r["rows"]: r[f"{regime}_ms"] / r["kept"] for r in rows
                    if r["shape"] == shape and r["list"] == name}

        fused, whole = per_neuron("all_but_one", "fused"), per_neuron("every", "gemm")
        copied = per_neuron("all_but_one", "gemm")
        unit = _slope({m: t for m, t in fused.items() if m >= 64})
        product = _slope({m: t for m, t in whole.items() if m >= 64}) / unit
        fits[shape] = dict(
            read=round(statistics.median(t / unit - m for m, t in fused.items() if m <= 16), 2),
            gemm_read=round(statistics.median(t / unit - m * product for m, t in whole.items()),
                            2),
            gemm_copy=round(statistics.median((copied[m] - t) / unit for m, t in whole.items()),
                            2),
            gemm_product=round(product, 3))
    return fits


def _slope(points: dict) -> float:
    """Least-squares slope of {x: y}."""
    mx, my = statistics.fmean(points), statistics.fmean(points.values())
    return (sum((x - mx) * (y - my) for x, y in points.items())
            / sum((x - mx) ** 2 for x in points))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512", help="input rows")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="results file (JSON)")
    args = parser.parse_args()
    counts = [int(r) for r in args.rows.split(",")]
    if sum(r >= 64 for r in counts) < 2 or not any(r <= 16 for r in counts):
        parser.error("--rows needs two row counts of 64 or more (the fit's slopes) and one of "
                     "16 or fewer (the fused kernels' fixed part)")
    started = run_start()  # the commit and load as the run begins
    with torch.inference_mode():
        rows = sweep(counts, getattr(torch, args.dtype))
    fits = fit(rows)
    print(json.dumps(fits, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(**metadata("cpu", "segmented_regimes", run_info=started),
                           args=vars(args), fits=fits, rows=rows), f, indent=1)
        print(args.out)


if __name__ == "__main__":
    main()
