"""Expert swap time: `patch` with another mask on a patched model, against physical slicing.

The model has LLaMA-7B's structure (32 layers, 32 heads); the quick run shrinks hidden and
intermediate sizes (a swap touches only index tensors, so its time does not depend on them), the
full run uses the real sizes in bfloat16 with uninitialised weights (values do not matter here).
Variants: `patch-swap` (plug another expert already prepared once), `patch-swap-new` (plug a mask
never seen, so validation and index preparation are included), `sliced` (build the physically
pruned weights of the expert: index_select of every FFN and attention weight).
The model lives on the benchmark device (--bench-device; the GPU when there is one); on a GPU each
timed call ends with a synchronize, so the figure is the wall-clock time until the expert is usable.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import doe_kernels as dk
from conftest import bench_device, sweep_mode

PRUNE_RATE = 0.65


def _model(full: bool, device: torch.device):
    hidden, intermediate, dtype = (4096, 11008, torch.bfloat16) if full else (256, 688, torch.float32)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    return model.to_empty(device=device).eval()


@pytest.fixture(scope="module")
def model(request):
    if sweep_mode(request.config) == "smoke":
        pytest.skip("not part of the smoke run")
    return _model(sweep_mode(request.config) == "full", bench_device(request.config))


def _synced(model, fn):
    """`fn`, followed on a GPU by a synchronize (the swap is done when the device is)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize(device)
        return out

    return call


def _record(recorder, model, variant, benchmark):
    if benchmark.stats is None:
        pytest.skip("--benchmark-disable: pytest-benchmark timed nothing")
    recorder.add(bench="swap", shape=f"llama-32-layers-h{model.config.hidden_size}",
                 dtype=str(model.dtype).removeprefix("torch."),
                 device=next(model.parameters()).device.type, variant=variant,
                 prune_rate=PRUNE_RATE, rows=0, median_s=benchmark.stats.stats.median)


def _masks(model, count):
    return [dk.ExpertMask.random(model, ffn_keep=1 - PRUNE_RATE, heads_keep=1 - PRUNE_RATE, seed=s)
            for s in range(count)]


def test_patch_swap(benchmark, recorder, model):
    masks = _masks(model, 2)
    for mask in masks:
        dk.patch(model, mask)  # prepared once, as a server holding its experts would
    state = {"i": 0}

    def swap():
        state["i"] ^= 1
        dk.patch(model, masks[state["i"]])

    try:
        benchmark(_synced(model, swap))
    finally:
        dk.unpatch(model)
    _record(recorder, model, "patch-swap", benchmark)


def test_patch_swap_new_mask(benchmark, recorder, model):
    fresh = iter(_masks(model, 201))
    dk.patch(model, next(fresh))
    try:
        benchmark.pedantic(_synced(model, lambda mask: dk.patch(model, mask)),
                           setup=lambda: ((next(fresh),), {}), rounds=100)
    finally:
        dk.unpatch(model)
    _record(recorder, model, "patch-swap-new", benchmark)


def test_physical_slicing(benchmark, recorder, model, request):
    mask = _masks(model, 1)[0]
    _, layers, spec = dk.models.describe(model)
    device = next(model.parameters()).device

    def slice_weights():
        out = []
        for i, layer in enumerate(layers):
            kept = mask.ffn[i].to(device)
            rows = dk.HeadSelection.build(mask.heads[i], spec.num_heads, spec.num_kv_heads,
                                          spec.head_dim, device=device).q_rows
            mlp, attn = layer.mlp, layer.self_attn
            out.append((mlp.gate_proj.weight.index_select(0, kept),
                        mlp.up_proj.weight.index_select(0, kept),
                        mlp.down_proj.weight.index_select(1, kept),
                        attn.q_proj.weight.index_select(0, rows),
                        attn.k_proj.weight.index_select(0, rows),
                        attn.v_proj.weight.index_select(0, rows),
                        attn.o_proj.weight.index_select(1, rows)))
        return out

    benchmark.pedantic(_synced(model, slice_weights),
                       rounds=3 if sweep_mode(request.config) == "full" else 10)
    _record(recorder, model, "sliced", benchmark)
