"""Mixed-task batches: one segmented gather FFN call for rows of five experts, against the five
experts run one after another and against the dense op on the whole batch, in the same run.

Five experts keep 35% of the neurons each (random, overlapping sets: their union is about 88%);
each holds `rows` rows of the batch (recorded as 5 x rows). Variants:
  * `dense`: the dense FFN (F.linear) on all 5 x rows rows;
  * `sequential`: five single-expert `gather_(swiglu_)ffn` calls, one per expert's rows (what a
    server that swaps experts per request does, without the swaps);
  * `segmented-auto`, `segmented-segments`, `segmented-union`: one `segmented_gather_(swiglu_)ffn`
    call, with the strategy named;
  * `union-planned`: the union path with its plan (the union of the kept lists and each row's
    mask over it) built before timing: what a patched model or a vLLM worker runs at each
    decoding step of a mixed batch, which builds the plan once per composition of the batch
    (doe_kernels.models.segments, doe_kernels.vllm.mixed).
Shapes: the quick run's bert-base and SmolLM2-135M; --full sweeps every shape.
The calls use `backend="auto"`: on a GPU, batches of at most 16 rows (5 x 1, 5 x 3) run on the
cuda backend, `segmented-segments` there on its segmented kernels (one launch per projection);
larger ones on triton's.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import doe_kernels as dk
from doe_kernels.ops import library
from conftest import OP_TOLERANCE, bench_device, bench_dtype, check_close, grid, measure
from shapes import FLOP_CAP, SHAPES

EXPERTS, KEEP = 5, 0.35
VARIANTS = ("dense", "sequential", "segmented-auto", "segmented-segments", "segmented-union",
            "union-planned")


def _cases(config):
    cases = grid(config, smoke_shape="all-MiniLM-L6-v2",
                 quick=dict(shapes=("bert-base", "SmolLM2-135M"), rows=(1, 8, 64, 512)))
    cap = FLOP_CAP[bench_device(config).type]
    for name in cases["shapes"]:
        for rows in cases["rows"]:
            if SHAPES[name].ffn_flops(EXPERTS * rows) > cap:  # the dense call on every row
                continue
            for variant in VARIANTS:
                yield pytest.param((name, rows, variant), id=f"{name}-5x{rows}-{variant}")


def pytest_generate_tests(metafunc):
    if "segmented_case" in metafunc.fixturenames:
        metafunc.parametrize("segmented_case", list(_cases(metafunc.config)))


@functools.lru_cache(maxsize=1)
def _setup(name, device, dtype):
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    make = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(device, dtype)  # noqa
    w = dict(w_in=make(shape.intermediate, shape.hidden), w_up=make(shape.intermediate, shape.hidden),
             w_out=make(shape.hidden, shape.intermediate), b_in=make(shape.intermediate),
             b_out=make(shape.hidden))
    w["w_out_t"] = dk.input_major(w["w_out"])
    keep = round(KEEP * shape.intermediate)
    lists = [torch.randperm(shape.intermediate, generator=gen)[:keep].sort().values.to(device)
             for _ in range(EXPERTS)]
    return w, lists


def _callable(name, variant, w, lists, x, rows):
    swiglu = SHAPES[name].ffn == "swiglu"
    if variant == "dense":
        if swiglu:
            return lambda: F.linear(F.silu(F.linear(x, w["w_in"])) * F.linear(x, w["w_up"]),
                                    w["w_out"])
        return lambda: F.linear(F.gelu(F.linear(x, w["w_in"], w["b_in"])), w["w_out"], w["b_out"])

    def single(rows_x, kept):
        if swiglu:
            return dk.gather_swiglu_ffn(rows_x, w["w_in"], w["w_up"], w["w_out_t"], kept,
                                        check_indices=False)
        return dk.gather_ffn(rows_x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], kept,
                             "gelu", check_indices=False)

    if variant == "sequential":
        return lambda: [single(x[e * rows:(e + 1) * rows], kept) for e, kept in enumerate(lists)]
    segments, kept, offsets, _ = dk.pack_segments([rows] * EXPERTS, lists, device=x.device)
    if variant == "union-planned":
        return _union_planned(swiglu, w, x, segments, kept, offsets)
    strategy = variant.removeprefix("segmented-")
    if swiglu:
        return lambda: dk.segmented_gather_swiglu_ffn(
            x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept, offsets,
            check_indices=False, strategy=strategy)
    return lambda: dk.segmented_gather_ffn(
        x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments, kept, offsets, "gelu",
        check_indices=False, strategy=strategy)


def _union_planned(swiglu, w, x, segments, kept, offsets):
    """The union path's call on a plan built here, once."""
    plan = library.union_plan(x, segments, kept, offsets, strategy="union",
                              neurons=w["w_in"].shape[0], up_matrices=2 if swiglu else 1)
    if swiglu:
        return lambda: library.union_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"],
                                                       *plan, "auto")
    return lambda: library.union_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                            *plan, "gelu", "auto")


def test_segmented(benchmark, recorder, request, segmented_case):
    name, rows, variant = segmented_case
    device, dtype = bench_device(request.config), bench_dtype(request.config)
    w, lists = _setup(name, device, dtype)
    x = torch.randn(EXPERTS * rows, SHAPES[name].hidden, device=device, dtype=dtype)
    fn = _callable(name, variant, w, lists, x, rows)
    with torch.inference_mode():
        got = fn()  # warm-up
        if variant not in ("dense", "sequential"):  # each expert's rows as it computes them alone
            check_close(got, _callable(name, "sequential", w, lists, x, rows)(),
                        OP_TOLERANCE[dtype], f"{variant} against the experts one by one")
        seconds = measure(benchmark, fn, request.config)
    recorder.add(bench="segmented", shape=f"{name}-{EXPERTS}-experts",
                 dtype=str(dtype).removeprefix("torch."), device=device.type, variant=variant,
                 prune_rate=1 - KEEP, rows=EXPERTS * rows, median_s=seconds)
