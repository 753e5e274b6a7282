"""Op-level benchmark of pruned-head attention and of the gathered Q projection.

`test_attention` (bench "attention"): one attention layer (batch 1, seq = rows tokens) for every
shape, head pruning rate and row count. Variants: `dense` (q/k/v F.linear on the full weights,
grouped-query attention by repeat_interleave of the KV heads, SDPA, o F.linear), `sliced` (the same
on weights sliced once ahead of time to the kept heads and only the KV heads they use; a kept head
whose KV head serves an uneven number of kept heads reads it by index_select) and
`gather-<backend>` (`doe_kernels.pruned_head_attention` with a `HeadSelection` and the o weight
converted once with `input_major`). Causal for the LLaMA shapes, not for BERT. `dense` does not
depend on the pruning rate: it is measured once per shape and row count and recorded under every
rate of the grid.

`test_proj` (bench "proj"): the Q projection of the kept heads alone, `gather_rows_linear` against
F.linear on the full and on the pre-sliced weight (quick sweep: rows 1 and 64, rates 0.35 and
0.65; not in the smoke run).

Every candidate's output is checked once against `sliced` before it is timed.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import doe_kernels as dk
from conftest import OP_TOLERANCE, bench_device, bench_dtype, check_close, grid, measure, sweep_mode
from shapes import FLOP_CAP, SHAPES

# Calls whose dense cost exceeds this many FLOPs are left out (time on a small machine).
# The projection sweep is a side view: in the quick run, fewer row counts and pruning rates.
PROJ_QUICK = dict(rows=(1, 64), prune_rates=(0.35, 0.65))


def _variants(device):
    return ["dense", "sliced"] + [f"gather-{b}" for b in dk.available_backends(device.type)
                                  if not (device.type == "cpu" and b == "triton")]


def _attention_flops(shape, rows):
    d, heads, kv = shape.head_dim, shape.num_heads, shape.num_kv_heads
    projections = 2 * rows * shape.hidden * d * (2 * heads + 2 * kv)
    return projections + 4 * rows * rows * heads * d  # QK^T and PV, causal masking ignored


def _cases(config, bench):
    if bench == "proj" and sweep_mode(config) == "smoke":
        return  # one tiny case per file in the smoke run: the attention one
    cases = grid(config, smoke_shape="SmolLM2-135M", quick=PROJ_QUICK if bench == "proj" else None)
    device, rows_grid, rates = bench_device(config), cases["rows"], tuple(cases["prune_rates"])
    variants = _variants(device)
    for name in cases["shapes"]:
        shape = SHAPES[name]
        for rows in rows_grid:
            flops = (_attention_flops(shape, rows) if bench == "attention"
                     else 2 * rows * shape.hidden * shape.num_heads * shape.head_dim)
            if flops > FLOP_CAP[device.type]:
                continue
            yield pytest.param((name, rates, rows, "dense"), id=f"{name}-r{rows}-dense")
            for prune_rate in rates:
                for variant in variants[1:]:
                    yield pytest.param((name, (prune_rate,), rows, variant),
                                       id=f"{name}-p{round(100 * prune_rate)}-r{rows}-{variant}")


def pytest_generate_tests(metafunc):
    if "attn_case" in metafunc.fixturenames:
        metafunc.parametrize("attn_case", list(_cases(metafunc.config, "attention")))
    if "proj_case" in metafunc.fixturenames:
        metafunc.parametrize("proj_case", list(_cases(metafunc.config, "proj")))


@functools.lru_cache(maxsize=2)
def _weights(name, device, dtype):
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    make = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(device, dtype)  # noqa: E731
    q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    bias = shape.ffn == "gelu"  # BERT has biases on every projection, LLaMA on none
    w = dict(wq=make(q_out, shape.hidden), wk=make(kv_out, shape.hidden),
             wv=make(kv_out, shape.hidden), wo=make(shape.hidden, q_out))
    for b, size in (("bq", q_out), ("bk", kv_out), ("bv", kv_out), ("bo", shape.hidden)):
        w[b] = make(size) if bias else None
    w["wo_t"] = dk.input_major(w["wo"])
    return w


def _selection(name, prune_rate, device) -> dk.HeadSelection:
    shape = SHAPES[name]
    keep = round(shape.num_heads * (1 - prune_rate))
    gen = torch.Generator().manual_seed(1)
    kept = torch.randperm(shape.num_heads, generator=gen)[:keep].sort().values
    return dk.HeadSelection.build(kept, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                  device=device)


def _sliced_weights(w, sel: dk.HeadSelection):
    pick = lambda t, rows: None if t is None else t.index_select(0, rows).contiguous()  # noqa: E731
    return dict(wq=pick(w["wq"], sel.q_rows), bq=pick(w["bq"], sel.q_rows),
                wk=pick(w["wk"], sel.kv_rows), bk=pick(w["bk"], sel.kv_rows),
                wv=pick(w["wv"], sel.kv_rows), bv=pick(w["bv"], sel.kv_rows),
                wo=w["wo"].index_select(1, sel.q_rows).contiguous(), bo=w["bo"])


def _attention(x, w, heads, kv_heads, head_dim, causal, kv_index=None):
    """Plain attention layer on the given weights: what HF's modules do, without rotary."""
    batch, seq, _ = x.shape
    split = lambda t, n: t.view(batch, seq, n, head_dim).transpose(1, 2)  # noqa: E731
    q = split(F.linear(x, w["wq"], w["bq"]), heads)
    k = split(F.linear(x, w["wk"], w["bk"]), kv_heads)
    v = split(F.linear(x, w["wv"], w["bv"]), kv_heads)
    if kv_index is not None:  # uneven groups (sliced): each kept head reads its KV head by slot
        k, v = k.index_select(1, kv_index), v.index_select(1, kv_index)
    # grouped-query attention without copying K and V, as transformers' sdpa attention does
    # without a mask (and the candidate does): repeating them cost the baselines up to 13%
    gqa = kv_index is None and heads != kv_heads
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return F.linear(out.transpose(1, 2).reshape(batch, seq, heads * head_dim), w["wo"], w["bo"])


def _attention_callable(name, variant, w, sel, x):
    shape = SHAPES[name]
    causal = shape.ffn == "swiglu"
    if variant == "dense":
        return lambda: _attention(x, w, shape.num_heads, shape.num_kv_heads, shape.head_dim, causal)
    if variant == "sliced":
        s = _sliced_weights(w, sel)
        kept, kept_kv = sel.num_kept, sel.kept_kv_heads.numel()
        kv_index = None  # even groups: SDPA's grouped-query attention, as HF's
        if kept != kept_kv:
            counts = torch.bincount(sel.kv_slot.cpu(), minlength=kept_kv)
            if not bool((counts == counts[0]).all()):
                kv_index = sel.kv_slot
        return lambda: _attention(x, s, kept, kept_kv, shape.head_dim, causal, kv_index)
    backend = variant.removeprefix("gather-")
    return lambda: dk.pruned_head_attention(x, w["wq"], w["bq"], w["wk"], w["bk"], w["wv"], w["bv"],
                                            w["wo_t"], w["bo"], sel, is_causal=causal,
                                            backend=backend)


def _proj_callable(variant, w, sel, x):
    if variant == "dense":
        return lambda: F.linear(x, w["wq"], w["bq"])
    if variant == "sliced":
        wq = w["wq"].index_select(0, sel.q_rows).contiguous()
        bq = None if w["bq"] is None else w["bq"].index_select(0, sel.q_rows).contiguous()
        return lambda: F.linear(x, wq, bq)
    backend = variant.removeprefix("gather-")
    return lambda: dk.gather_rows_linear(x, w["wq"], w["bq"], sel.q_rows, backend=backend,
                                         check_indices=False)


def _weight_bytes(bench, name, variant, sel, element_size) -> int:
    """Bytes of projection weights a call reads: every head's for `dense`, else the kept heads'
    (Q/O) and their KV heads' (K/V; the Q projection alone for "proj")."""
    shape = SHAPES[name]
    heads, kv_heads = ((shape.num_heads, shape.num_kv_heads) if variant == "dense" else
                       (sel.num_kept, sel.kept_kv_heads.numel()))
    per_head = shape.hidden * shape.head_dim * element_size
    return per_head * (heads if bench == "proj" else 2 * heads + 2 * kv_heads)


def _run(benchmark, recorder, config, device, dtype, bench, name, rates, rows, variant, make):
    """Check a candidate against `sliced` once, time it, and record it under every rate given."""
    sel = _selection(name, rates[0], device)
    fn = make(variant, sel)
    with torch.inference_mode():
        if variant not in ("dense", "sliced"):
            check_close(fn(), make("sliced", sel)(), OP_TOLERANCE[dtype],
                        f"{variant} against sliced")
        fn()  # warm-up (and Triton compilation)
        seconds = measure(benchmark, fn, config)
    weight_bytes = _weight_bytes(bench, name, variant, sel, dtype.itemsize)
    for prune_rate in rates:
        recorder.add(bench=bench, shape=name, dtype=str(dtype).removeprefix("torch."),
                     device=device.type, variant=variant, prune_rate=prune_rate, rows=rows,
                     median_s=seconds, weight_bytes=weight_bytes)


def test_attention(benchmark, recorder, request, attn_case):
    name, rates, rows, variant = attn_case
    device = bench_device(request.config)
    dtype = bench_dtype(request.config)
    w = _weights(name, device, dtype)
    x = torch.randn(1, rows, SHAPES[name].hidden, device=device, dtype=dtype)
    make = lambda v, sel: _attention_callable(name, v, w, sel, x)  # noqa: E731
    _run(benchmark, recorder, request.config, device, dtype, "attention", name, rates, rows,
         variant, make)


def test_proj(benchmark, recorder, request, proj_case):
    name, rates, rows, variant = proj_case
    device = bench_device(request.config)
    dtype = bench_dtype(request.config)
    w = _weights(name, device, dtype)
    x = torch.randn(rows, SHAPES[name].hidden, device=device, dtype=dtype)
    make = lambda v, sel: _proj_callable(v, w, sel, x)  # noqa: E731
    _run(benchmark, recorder, request.config, device, dtype, "proj", name, rates, rows, variant,
         make)
