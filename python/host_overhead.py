"""Host time per call of the FFN ops: what each call costs the CPU (Python, dispatch, launches).

On a GPU a small model's layer finishes its kernels faster than Python can queue them, so its speed
is the host's time per op, not the kernels': on an H200, BERT-base's FFN at one row took about
0.1 ms through the `triton` backend, 0.06 ms through `torch` and 0.02 ms dense or through `cuda`,
at every pruning rate and row count up to 2048 (benchmarks/results/gpu_h200, the `ffn` file). This
script splits that cost: per variant, the host microseconds per call (calls queued without
waiting, median of --rounds rounds of --calls calls) beside the GPU's own time per call (CUDA
events around the same calls queued behind a sleeping kernel, so that they run back to back:
where the host time is the larger, the host sets the pace), and a profile of the slowest
variant's calls (the functions taking the most host time of their own). --calls stays small (50)
so that the launches of a round fit in the GPU's launch queue.

Variants: `dense`; for each backend present `gather-<backend>` (the public op) and
`kernels-<backend>` (the backend's two projections called directly: the op's checks and dispatch
left out); on a GPU `gather-triton-fixed` (the triton backend with autotuning off:
DOE_KERNELS_TRITON_AUTOTUNE=0) and `triton-launch` (one launch of a kernel doing almost nothing:
Triton's own floor per launch).

    python python/host_overhead.py --out DIR [--shapes bert-base,llama-7b] [--rows 1]
        [--rate 0.65] [--dtype bfloat16] [--device cuda]

Writes DIR/host_overhead.json and DIR/host_overhead_profile.txt, and prints the table.
"""
import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time

import torch

import doe_kernels as dk
from doe_kernels import backends

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from ffn_cases import ffn_call, ffn_weights, kept_list  # noqa: E402
from shapes import SHAPES  # noqa: E402


def calls(name: str, x: torch.Tensor, rate: float) -> dict:
    """variant -> (a call of it on `x`, the context it is timed in), on the op benchmark's weights
    of the shape `name` with `rate` of the neurons pruned."""
    w = ffn_weights(name, x.device, x.dtype)
    kept = kept_list(SHAPES[name].intermediate, rate, x.device)
    out = {"dense": (ffn_call(name, "dense", w, kept, x), contextlib.nullcontext)}
    for backend in dk.available_backends(x.device.type):
        if x.device.type == "cpu" and backend == "triton":
            continue  # (the interpreter)
        out[f"gather-{backend}"] = (ffn_call(name, f"gather-{backend}", w, kept, x),
                                    contextlib.nullcontext)
        out[f"kernels-{backend}"] = (_kernels_alone(SHAPES[name], w, kept, x,
                                                    backends.get(backend)), contextlib.nullcontext)
    if "gather-triton" in out and x.device.type == "cuda":
        out["gather-triton-fixed"] = (out["gather-triton"][0], autotune_off)
        out["triton-launch"] = (_triton_launch(x.device), contextlib.nullcontext)
    return out


def _kernels_alone(shape, w: dict, kept: torch.Tensor, x: torch.Tensor, module):
    """The backend module's two projections called directly (`module`: doe_kernels.backends'),
    without the op's checks and dispatch: the op's own share of the host time is the
    difference."""
    if shape.ffn == "swiglu":
        return lambda: module.gather_cols_linear(
            module.gather_swiglu(x, w["w_in"], w["w_up"], kept), w["w_out_t"], None, kept, None)
    return lambda: module.gather_cols_linear(
        module.gather_rows_linear(x, w["w_in"], w["b_in"], kept, "gelu"), w["w_out_t"],
        w["b_out"], kept, None)


@contextlib.contextmanager
def autotune_off():
    """The triton backend with autotuning off (DOE_KERNELS_TRITON_AUTOTUNE=0, read each call)."""
    previous = os.environ.get("DOE_KERNELS_TRITON_AUTOTUNE")
    os.environ["DOE_KERNELS_TRITON_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DOE_KERNELS_TRITON_AUTOTUNE"]
        else:
            os.environ["DOE_KERNELS_TRITON_AUTOTUNE"] = previous


def _triton_launch(device):
    """One launch of a kernel that stores three integers."""
    from doe_kernels.backends.triton import kernels

    out = torch.empty(3, dtype=torch.int32, device=device)
    return lambda: kernels.interpreter_probe_kernel[(1,)](out, 3)


def host_us(fn, device, count: int) -> float:
    """Host microseconds a call over `count` calls queued without waiting (the GPU idle first)."""
    sync(device)
    began = time.perf_counter()
    for _ in range(count):
        fn()
    seconds = time.perf_counter() - began
    sync(device)
    return seconds / count * 1e6


def device_us(fn, device, count: int, host_seconds: float) -> float:
    """The GPU's own microseconds a call: `count` calls queued behind a sleeping kernel longer
    than the host takes to queue them, so that they run back to back, timed by CUDA events."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    # cycles for twice the host's time at 2 GHz: at least that time on a GPU clocked below 4 GHz
    torch.cuda._sleep(int(2 * host_seconds * 2e9) + 1_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / count * 1e3


def host_and_device_us(fn, device, count: int, rounds: int) -> tuple[float, float]:
    """(host us a call, device us a call), medians over `rounds` rounds of `count` calls."""
    for _ in range(3):
        fn()
    host = [host_us(fn, device, count) for _ in range(rounds)]
    seconds = max(host) * count / 1e6
    gpu = [device_us(fn, device, count, seconds) for _ in range(rounds)]
    return statistics.median(host), statistics.median(gpu)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(fn, count: int, top: int = 25) -> str:
    """cProfile of `count` calls: the `top` functions by their own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def measure(args, save) -> list:
    """The rows of the table; `save(rows, profile text)` after each shape (a run cut short by a
    time limit keeps what it measured)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows, profiles = [], []
    with torch.inference_mode():
        for name in args.shapes.split(","):
            x = torch.randn(args.rows, SHAPES[name].hidden, device=device, dtype=dtype)
            variants = calls(name, x, args.rate)
            for variant, (fn, context) in variants.items():
                with context():
                    host, gpu = host_and_device_us(fn, device, args.calls, args.rounds)
                rows.append(dict(shape=name, variant=variant, rows=args.rows, prune_rate=args.rate,
                                 host_us=round(host, 2), device_us=round(gpu, 2)))
            slowest = max((r for r in rows if r["shape"] == name), key=lambda r: r["host_us"])
            fn, context = variants[slowest["variant"]]
            with context():
                text = profile(fn, args.calls)
            profiles.append(f"== {name}, {slowest['variant']}: {args.calls} calls\n" + text)
            save(rows, "\n".join(profiles))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="bert-base,llama-7b")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.65)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown} (known: {sorted(SHAPES)})")
    os.makedirs(args.out, exist_ok=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), device=args.device,
                dtype=args.dtype, calls=args.calls, rounds=args.rounds,
                gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)

    def save(rows, profiles):
        with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
        with open(os.path.join(args.out, "host_overhead_profile.txt"), "w") as f:
            f.write(profiles)

    rows = measure(args, save)
    print(f"{'shape':<18} {'variant':<22} {'host us':>9} {'device us':>10}")
    for r in rows:
        print(f"{r['shape']:<18} {r['variant']:<22} {r['host_us']:>9.1f} {r['device_us']:>10.1f}")


if __name__ == "__main__":
    main()
