"""Mixture-of-experts block: doe_kernels' patched block against transformers' own
MixtralSparseMoeBlock on the same weights, in the same run.

Shapes: `smollm2-moe` (SmolLM2-135M upcycled to 8 experts: hidden 576, expert intermediate 1536,
top-2); `mixtral-8x7b` (hidden 4096, 14336, 8 experts, top-2), --full on a GPU only; smoke (CI):
`tiny-moe`. Rows = tokens per call. Pruning rate = fraction of each layer's experts dropped
(0.25: 8 -> 6 experts, 0.5: 8 -> 4, 0.75: 8 -> 2). The router is random with peaked routing
(logits of standard deviation about 3). Float32 on the CPU, bfloat16 on the GPU.

Variants:
  * `dense`: HF's block with every expert, in the model's default experts implementation
    (`grouped_mm` where transformers can use it). Measured once, recorded under every rate.
  * `sliced`: physical expert pruning: an HF block built for the kept experts only, with their
    weights (and router rows) copied out. Before timing, its output is compared with the patched
    block's.
  * `patched`: `doe_kernels.patch(model, mask)`: the model's own weights, routing among the kept
    experts, tokens grouped by expert.
  * `patched-skip`: the same with dynamic skipping; the threshold is the median ratio of the
    second to the first routing weight on the timed tokens, so about half of them skip their
    second expert.
  * `hf-eager`: HF's block with the eager (one GEMM pair per expert, Python loop) implementation,
    for reference; like `dense` it routes among all experts and is recorded under every rate.
Memory (recorded per variant): weight bytes held beyond the dense model (sliced: its copy of the
kept experts; patched: none) and, on a GPU, the peak memory allocated by one call.
"""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

import doe_kernels as dk
from conftest import bench_device, bench_dtype, check_close, measure, sweep_mode
from doe_kernels.models.moe_block import route

CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
SHAPES = {  # name: (hidden, expert intermediate, experts, top-k)
    "smollm2-moe": (576, 1536, 8, 2),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "tiny-moe": (64, 96, 8, 2),
}


def _grid(mode: str, device: torch.device):
    if mode == "smoke":
        return ["tiny-moe"], (0.5,), (8,)
    if mode == "quick":
        return ["smollm2-moe"], (0.25, 0.5), (1, 64, 512)
    shapes = ["smollm2-moe"] + (["mixtral-8x7b"] if device.type == "cuda" else [])
    return shapes, (0.25, 0.5, 0.75), (1, 8, 64, 512, 2048)


def pytest_generate_tests(metafunc):
    if "moe_case" not in metafunc.fixturenames:
        return
    mode, device = sweep_mode(metafunc.config), bench_device(metafunc.config)
    shapes, rates, rows = _grid(mode, device)
    params = []
    for shape in shapes:
        for n in rows:
            for variant in ("dense", "hf-eager"):
                params.append(pytest.param((shape, rates, n, variant), id=f"{shape}-{n}-{variant}"))
            for rate in rates:
                for variant in ("sliced", "patched", "patched-skip"):
                    params.append(pytest.param((shape, (rate,), n, variant),
                                               id=f"{shape}-{n}-p{round(100 * rate)}-{variant}"))
    metafunc.parametrize("moe_case", params)


@functools.lru_cache(maxsize=1)
def _model(shape: str, device: str, dtype: torch.dtype):
    hidden, intermediate, experts, top_k = SHAPES[shape]
    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=128,
                           num_local_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    with torch.device(device):
        model = MixtralForCausalLM(config)
    with torch.no_grad():
        block = model.model.layers[0].mlp
        block.gate.weight.normal_(0, 3 / hidden ** 0.5)
        block.experts.gate_up_proj.normal_(0, hidden ** -0.5)
        block.experts.down_proj.normal_(0, intermediate ** -0.5)
    return model.to(dtype).eval()


def _kept(experts: int, rate: float) -> torch.Tensor:
    count = experts - round(experts * rate)
    return torch.randperm(experts, generator=torch.Generator().manual_seed(1))[:count].sort().values


def _sliced_block(block, kept: torch.Tensor):
    """An HF block for the kept experts only, with copies of their weights."""
    sliced = copy.deepcopy(block)
    device = block.gate.weight.device
    index = kept.to(device)
    with torch.no_grad():
        sliced.gate.weight = torch.nn.Parameter(block.gate.weight.index_select(0, index))
        sliced.experts.gate_up_proj = torch.nn.Parameter(
            block.experts.gate_up_proj.index_select(0, index))
        sliced.experts.down_proj = torch.nn.Parameter(block.experts.down_proj.index_select(0, index))
    sliced.gate.num_experts = sliced.experts.num_experts = kept.numel()
    return sliced


def _skipping_reference(block, x, kept, top_k: int, beta: float):
    """The HF block's output routed among the `kept` experts, a token's non-top experts dropped
    where their weight is below `beta` x its top one (route's rule), expert by expert in plain
    torch on the block's own weights: what `patched-skip` must compute."""
    x2d = x.reshape(-1, x.shape[-1])
    weights, experts = route(F.linear(x2d, block.gate.weight), top_k, kept.to(x.device), beta=beta)
    out = torch.zeros(x2d.shape, dtype=torch.float32, device=x.device)
    for expert in experts.unique().tolist():
        rows, slot = (experts == expert).nonzero(as_tuple=True)
        weight = weights[rows, slot]
        rows, weight = rows[weight > 0], weight[weight > 0]
        gate, up = F.linear(x2d[rows], block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, block.experts.down_proj[expert])
        out.index_add_(0, rows, weight[:, None] * y.float())
    return out.to(x.dtype).view_as(x)


def _weight_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_moe_block(benchmark, recorder, request, moe_case):
    shape, rates, rows, variant = moe_case
    device = bench_device(request.config)
    dtype = bench_dtype(request.config)
    model = _model(shape, str(device), dtype)
    block = model.model.layers[0].mlp
    hidden, _, experts, top_k = SHAPES[shape]
    x = torch.randn(1, rows, hidden, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    extra_bytes, patched = 0, False
    with torch.inference_mode():
        if variant in ("dense", "hf-eager"):
            timed = block
            implementation = model.config._experts_implementation
            if variant == "hf-eager":
                want = block(x)
                model.set_experts_implementation("eager")
                check_close(block(x), want, CHECK_TOLERANCE[dtype], "hf-eager against dense")
        else:
            kept = _kept(experts, rates[0])
            sliced = _sliced_block(block, kept)
            if variant == "sliced":
                timed = sliced
                extra_bytes = _weight_bytes(sliced.gate.weight, sliced.experts.gate_up_proj,
                                            sliced.experts.down_proj)
            else:
                want = sliced(x) if variant == "patched" else None
                del sliced
                mask = dk.ExpertMask(moe={0: kept})
                if variant == "patched-skip":
                    weights, _ = route(F.linear(x.reshape(-1, hidden), block.gate.weight), top_k,
                                       kept.to(device))
                    beta = float((weights[:, 1] / weights[:, 0]).median())
                    mask = mask.with_skip({0: beta})
                    want = _skipping_reference(block, x, kept, top_k, beta)
                dk.patch(model, mask, dynamic_skip=variant == "patched-skip")
                patched, timed = True, model.model.layers[0].mlp
                # the patched block computes what physical pruning (and skipping) does
                check_close(timed(x), want, CHECK_TOLERANCE[dtype], f"{variant} against sliced")
        try:
            def call():
                timed(x)
                sync()

            call()  # warm-up
            peak = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                call()
                peak = torch.cuda.max_memory_allocated(device) - base
            seconds = measure(benchmark, lambda: timed(x), request.config)
        finally:
            if patched:
                dk.unpatch(model)
            if variant == "hf-eager":
                model.set_experts_implementation(implementation)
    for rate in rates:
        recorder.add(bench="moe", shape=shape, dtype=str(dtype).removeprefix("torch."),
                     device=device.type, variant=variant, prune_rate=rate, rows=rows,
                     median_s=seconds)
    recorder.add_memory(bench="moe", shape=shape, variant=variant, prune_rate=rates[0], rows=rows,
                        extra_weight_bytes=extra_bytes, peak_bytes=peak)

