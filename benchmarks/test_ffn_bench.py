"""Op-level benchmark of the gather FFNs (BERT GELU, LLaMA SwiGLU) against dense and pre-sliced.

For every shape, pruning rate and row count: `dense` (F.linear on the full weights; it does not
depend on the rate, so it is measured once per shape and row count and recorded under every rate),
`sliced` (F.linear on weights sliced once ahead of time; on a GPU padded with zero neurons to a
multiple of SLICE_ALIGN, so that cuBLAS keeps its fastest kernels, which an odd width such as
LLaMA-7B's 7155 kept neurons leaves: the same result, the best a slicing user gets) and
`gather-<backend>` for every backend present. Each gather variant is checked against `sliced`
before it is timed.

`test_ffn_scales`: the cost of the optional per-neuron `scales` (mask tuning), as the time of
`gather-<backend>` with scales over its time without, the two timed alternately on the same inputs
and recorded as an overhead (not a ratio against dense), at the same shapes and row counts.
"""
import pytest
import torch

import doe_kernels as dk
from conftest import (OP_TOLERANCE, bench_device, bench_dtype, check_close, grid, measure,
                      measure_pair)
from ffn_cases import ffn_call, ffn_weights, kept_list
from shapes import FLOP_CAP, SHAPES

# Calls whose dense cost exceeds this many FLOPs are left out (time on a small machine).


def _gather_variants(device):
    """gather-<backend> for every backend present (not the Triton interpreter)."""
    return [f"gather-{b}" for b in dk.available_backends(device.type)
            if not (device.type == "cpu" and b == "triton")]


def _shapes_and_rows(cases, device):
    """(shape name, rows) of the grid, without the calls above the FLOP cap."""
    for name in cases["shapes"]:
        shape = SHAPES[name]
        for rows in cases["rows"]:
            if shape.ffn_flops(rows) <= FLOP_CAP[device.type]:
                yield name, rows


def _cases(config):
    device = bench_device(config)
    cases = grid(config, smoke_shape="all-MiniLM-L6-v2")
    variants = ["dense", "sliced"] + _gather_variants(device)
    for name, rows in _shapes_and_rows(cases, device):
        rates = tuple(cases["prune_rates"])
        yield pytest.param((name, rates, rows, "dense"), id=f"{name}-r{rows}-dense")
        for prune_rate in rates:
            for variant in variants[1:]:
                yield pytest.param((name, (prune_rate,), rows, variant),
                                   id=f"{name}-p{round(100 * prune_rate)}-r{rows}-{variant}")


def _scales_cases(config):
    """The FFN grid's shapes and rows for every gather variant; in the quick sweep two rates (the
    cost of scales is one multiply per kept neuron and row, whatever the rate)."""
    device = bench_device(config)
    cases = grid(config, smoke_shape="all-MiniLM-L6-v2", quick=dict(prune_rates=(0.35, 0.65)))
    for name, rows in _shapes_and_rows(cases, device):
        for prune_rate in cases["prune_rates"]:
            for variant in _gather_variants(device):
                yield pytest.param((name, prune_rate, rows, variant),
                                   id=f"{name}-p{round(100 * prune_rate)}-r{rows}-{variant}")


def pytest_generate_tests(metafunc):
    if "ffn_case" in metafunc.fixturenames:
        metafunc.parametrize("ffn_case", list(_cases(metafunc.config)))
    if "scales_case" in metafunc.fixturenames:
        metafunc.parametrize("scales_case", list(_scales_cases(metafunc.config)))


def test_ffn(benchmark, recorder, request, ffn_case):
    name, rates, rows, variant = ffn_case  # dense: measured once, recorded under every rate
    device = bench_device(request.config)
    dtype = bench_dtype(request.config)
    w = ffn_weights(name, device, dtype)
    kept = kept_list(SHAPES[name].intermediate, rates[0], device)
    x = torch.randn(rows, SHAPES[name].hidden, device=device, dtype=dtype)
    fn = ffn_call(name, variant, w, kept, x)
    with torch.inference_mode():
        got = fn()  # warm-up (and Triton compilation, autotuning)
        if variant.startswith("gather-"):
            check_close(got, ffn_call(name, "sliced", w, kept, x)(), OP_TOLERANCE[dtype],
                        f"{variant} against sliced")
        seconds = measure(benchmark, fn, request.config)
    shape = SHAPES[name]
    neurons = shape.intermediate if variant == "dense" else kept.numel()
    for prune_rate in rates:
        recorder.add(bench="ffn", shape=name, dtype=str(dtype).removeprefix("torch."),
                     device=device.type, variant=variant, prune_rate=prune_rate, rows=rows,
                     median_s=seconds,
                     weight_bytes=neurons * shape.hidden * shape.ffn_matrices * x.element_size())


def test_ffn_scales(benchmark, recorder, request, scales_case):
    """gather-<backend> with per-neuron scales against without, on the same inputs."""
    name, prune_rate, rows, variant = scales_case
    device = bench_device(request.config)
    dtype = bench_dtype(request.config)
    w = ffn_weights(name, device, dtype)
    kept = kept_list(SHAPES[name].intermediate, prune_rate, device)
    x = torch.randn(rows, SHAPES[name].hidden, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    scales = (1 + 0.1 * torch.randn(kept.numel(), generator=gen)).to(device, dtype)
    plain = ffn_call(name, variant, w, kept, x)
    scaled = ffn_call(name, variant, w, kept, x, scales)
    with torch.inference_mode():
        plain(), scaled()  # warm-up (and Triton compilation, autotuning)
        without_s, with_s = measure_pair(benchmark, plain, scaled, request.config)
    recorder.add_overhead(bench="ffn", shape=name, dtype=str(dtype).removeprefix("torch."),
                          device=device.type, variant=variant, option="scales",
                          prune_rate=prune_rate, rows=rows, without_s=without_s, with_s=with_s)
