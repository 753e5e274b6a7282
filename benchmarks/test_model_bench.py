"""End-to-end forward latency of a patched model against the unpatched one, in the same run.

Cases (shape name, rows = tokens per timed call):
  * `bert-base-seq128` (and `-seq512` in --full): BertForSequenceClassification from a default
    BertConfig, batch 1, input_ids and an all-ones attention_mask, as a tokenizer gives them.
  * `smollm2-prefill128`: a SmolLM2-135M-shaped LlamaForCausalLM (hidden 576, 30 layers, 9 heads,
    3 KV heads, intermediate 1536, vocab 49152, tied embeddings), one prompt of 128 tokens with
    `logits_to_keep=1` and a fresh KV cache, as `generate()` runs prefill.
  * `smollm2-decode`: one decoding step (1 token) on a DynamicCache already holding 128 tokens
    (filled by the variant's own model, untimed); the cache is cropped back to 128 tokens before
    every timed step, so each step starts from the same length.
  * `llama-7b-prefill128`, `llama-7b-decode`: the same on a LLaMA-7B-shaped model, --full on a GPU
    only.
  * `llama-7b-token-graph` (--full on a GPU): one token through the model without a cache,
    captured once as a CUDA graph and replayed: every weight of a decoding step is read, without
    eager PyTorch's launch cost per op (attention over one token instead of a cache: its reads are
    small beside the weights'). On the CPU (smoke: `tiny-llama-token-graph`) the same forward runs
    eagerly.
  * smoke (CI): `tiny-llama-decode` and `tiny-llama-token-graph`, a 2-layer LLaMA with SmolLM2's
    head layout (9 heads, 3 KV).
Models are random-init, eval mode, float32 on the CPU and bfloat16 on the GPU.

Variants:
  * `dense`: the unpatched model. It does not depend on the pruning rate, so it is measured once
    per case and recorded under every rate of the grid.
  * `sliced`: physical structured pruning, a copy of the model whose Linear layers are smaller
    nn.Linear holding the kept rows/columns (Q/K/V/O of the kept heads, K/V only of the KV heads in
    use, FFN of the kept neurons); embeddings, norms and the classifier/LM head are shared with the
    dense model. BERT: HF's own BertSelfAttention with `num_attention_heads` adjusted (transformers
    5 has no `prune_heads` any more). LLaMA: HF's attention cannot express a KV head serving an
    uneven number of kept query heads (repeat_kv needs even groups), so the layer's attention is
    `SlicedLlamaAttention`, HF's LlamaAttention.forward plus one index_select of the cached K/V
    heads when the groups are uneven (HF's own GQA path when they are even).
  * `patched-<backend>`: `doe_kernels.patch(model, mask, backend)` on the dense model, in place,
    unpatched afterwards.
Masks: `ExpertMask.random(model, ffn_keep=1-p, heads_keep=1-p, seed=0)`; the layer-type sweep
(--full) adds `bert-base-seq128-ffn` / `smollm2-prefill128-ffn` (and on the CPU
`smollm2-decode-ffn`; neurons pruned, every head kept) and `-attn` (heads pruned, every neuron
kept). Before `sliced` is timed, its output is compared with the model patched on the `torch`
backend (same mask), so the baseline is checked to compute the expert.
"""
import copy
import functools
import inspect
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama import modeling_llama

import doe_kernels as dk
from conftest import bench_device, bench_dtype, check_close, measure, sweep_mode
from shapes import FULL

QUICK_RATES = (0.35, 0.65)
CONTEXT = 128  # tokens in the prompt (prefill) and in the cache (decode)
# Relative error (Frobenius) allowed between the sliced and the patched model's output. Both
# compute the expert, their rounding in a different order: in float32 they agree to 1e-5
# (LLaMA-7B on an H200); in bfloat16 a random 32-layer LLaMA-7B is 18-22% from its float32 self
# whichever way it runs, and sliced and patched differ by up to 4.8%
# (benchmarks/results/gpu_h200/logs/check_sliced.log). A slice of the wrong neurons and heads
# differs by more than 100%.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 1e-2}

CONFIGS = {
    "bert-base": lambda: BertConfig(),
    "smollm2": lambda: LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True),
    "llama-7b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32,
                                    vocab_size=32000),
    "tiny-llama": lambda: LlamaConfig(hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=128),
}


@dataclass(frozen=True)
class Case:
    shape: str  # recorded shape name
    model: str  # key of CONFIGS
    kind: str  # "encoder", "prefill", "decode" or "graph" (one token, no cache, a CUDA graph)
    tokens: int  # tokens per timed call (recorded as rows)
    layers: str = "both"  # what the mask prunes: "both", "ffn" (heads kept) or "attn" (FFN kept)


def _cases(mode: str, device: torch.device) -> list[Case]:
    if mode == "smoke":
        return [Case("tiny-llama-decode", "tiny-llama", "decode", 1),
                Case("tiny-llama-token-graph", "tiny-llama", "graph", 1)]
    cases = [Case("bert-base-seq128", "bert-base", "encoder", 128)]
    if mode == "full":
        cases.append(Case("bert-base-seq512", "bert-base", "encoder", 512))
    cases += [Case("smollm2-prefill128", "smollm2", "prefill", CONTEXT),
              Case("smollm2-decode", "smollm2", "decode", 1)]
    if mode == "full":  # the layer-type sweep: FFN neurons only, attention heads only
        for layers in ("ffn", "attn"):
            cases += [Case(f"bert-base-seq128-{layers}", "bert-base", "encoder", 128, layers),
                      Case(f"smollm2-prefill128-{layers}", "smollm2", "prefill", CONTEXT, layers)]
            if device.type == "cpu":  # decoding, where the CPU's kernels take every-row layers
                cases.append(Case(f"smollm2-decode-{layers}", "smollm2", "decode", 1, layers))
    cases.sort(key=lambda case: list(CONFIGS).index(case.model))  # stable: grouped by model
    if mode == "full" and device.type == "cuda":
        cases += [Case("llama-7b-prefill128", "llama-7b", "prefill", CONTEXT),
                  Case("llama-7b-decode", "llama-7b", "decode", 1),
                  Case("llama-7b-token-graph", "llama-7b", "graph", 1)]
    return cases


def _rates(config) -> tuple:
    mode = sweep_mode(config)
    if mode == "smoke":
        return (0.65,)
    return config.getoption("--rates") or {"quick": QUICK_RATES, "full": FULL["prune_rates"]}[mode]


def _variants(device: torch.device) -> list[str]:
    return ["dense", "sliced"] + [f"patched-{b}" for b in dk.available_backends(device.type)
                                  if not (device.type == "cpu" and b == "triton")]


def pytest_generate_tests(metafunc):
    if "model_case" not in metafunc.fixturenames:
        return
    mode, device = sweep_mode(metafunc.config), bench_device(metafunc.config)
    rates, variants = _rates(metafunc.config), _variants(device)
    params = []
    for case in _cases(mode, device):  # grouped by model, so each model is built once
        params.append(pytest.param((case, rates, "dense"), id=f"{case.shape}-dense"))
        for rate in rates:
            for variant in variants[1:]:
                params.append(pytest.param((case, (rate,), variant),
                                           id=f"{case.shape}-p{round(100 * rate)}-{variant}"))
    metafunc.parametrize("model_case", params)


# ---- models ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)  # one model alive at a time (LLaMA-7B on the GPU)
def _model(name: str, device: str, dtype: torch.dtype) -> nn.Module:
    config = CONFIGS[name]()
    torch.manual_seed(0)
    kind = BertForSequenceClassification if name.startswith("bert") else LlamaForCausalLM
    with torch.device(device):
        model = kind(config)
    return model.to(dtype).eval()


@functools.lru_cache(maxsize=8)
def _mask(name: str, device: str, dtype: torch.dtype, rate: float,
          layers: str = "both") -> dk.ExpertMask:
    ffn_keep = 1 - rate if layers in ("both", "ffn") else 1.0
    heads_keep = 1 - rate if layers in ("both", "attn") else 1.0
    return dk.ExpertMask.random(_model(name, device, dtype), ffn_keep=ffn_keep,
                                heads_keep=heads_keep, seed=0)


def _sliced_linear(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new nn.Linear holding `linear`'s kept output rows and/or input columns."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return out


class SlicedLlamaAttention(nn.Module):
    """HF's LlamaAttention on Linear layers sliced to the kept heads (K/V: the KV heads in use).

    Its forward is LlamaAttention.forward; the only addition is `kv_slot`: when the kept query
    heads use their KV heads unevenly, the cached K/V heads are index_selected to one per query
    head (HF's repeat_kv needs even groups). With even groups HF's own GQA path runs.
    """

    def __init__(self, original: nn.Module, sel: dk.HeadSelection):
        super().__init__()
        self.config, self.layer_idx = original.config, original.layer_idx
        self.head_dim, self.scaling = original.head_dim, original.scaling
        self.attention_dropout, self.is_causal = original.attention_dropout, True
        self.q_proj = _sliced_linear(original.q_proj, rows=sel.q_rows)
        self.k_proj = _sliced_linear(original.k_proj, rows=sel.kv_rows)
        self.v_proj = _sliced_linear(original.v_proj, rows=sel.kv_rows)
        self.o_proj = _sliced_linear(original.o_proj, cols=sel.q_rows)
        kept, kept_kv = sel.num_kept, sel.kept_kv_heads.numel()
        counts = torch.bincount(sel.kv_slot.cpu(), minlength=kept_kv)
        even = bool((counts == counts[0]).all())
        self.num_key_value_groups = kept // kept_kv if even else 1
        self.kv_slot = None if even else sel.kv_slot

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_slot is not None:
            k, v = k.index_select(1, self.kv_slot), v.index_select(1, self.kv_slot)
        implementation = self.config._attn_implementation
        attention = (modeling_llama.eager_attention_forward if implementation == "eager"
                     else modeling_llama.ALL_ATTENTION_FUNCTIONS[implementation])
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                                 **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _sliced_model(model: nn.Module, mask: dk.ExpertMask) -> nn.Module:
    """A physically pruned copy; parameters that are not sliced are shared with `model`."""
    sliced = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    _, layers, spec = dk.models.describe(sliced)
    device = next(model.parameters()).device
    for i, layer in enumerate(layers):
        every = lambda n: torch.arange(n)  # noqa: E731
        kept = mask.ffn.get(i, every(spec.intermediate_size)).to(device)
        heads = mask.heads.get(i, every(spec.num_heads))
        sel = dk.HeadSelection.build(heads, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                     device=device)
        if spec.family == "bert":
            attention = layer.attention.self
            for name in ("query", "key", "value"):
                setattr(attention, name, _sliced_linear(getattr(attention, name), rows=sel.q_rows))
            attention.num_attention_heads = sel.num_kept
            attention.all_head_size = sel.num_kept * spec.head_dim
            layer.attention.output.dense = _sliced_linear(layer.attention.output.dense,
                                                          cols=sel.q_rows)
            layer.intermediate.dense = _sliced_linear(layer.intermediate.dense, rows=kept)
            layer.output.dense = _sliced_linear(layer.output.dense, cols=kept)
        else:
            layer.self_attn = SlicedLlamaAttention(layer.self_attn, sel)
            mlp = layer.mlp
            mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=kept)
            mlp.up_proj = _sliced_linear(mlp.up_proj, rows=kept)
            mlp.down_proj = _sliced_linear(mlp.down_proj, cols=kept)
    return sliced


# ---- timed calls -------------------------------------------------------------------------------
class Runner:
    """The timed call of a case on one model; `reset` puts the state back before each call."""

    def __init__(self, model: nn.Module, case: Case):
        self.model, self.case = model, case
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(2)
        vocab = model.config.vocab_size
        self.ids = torch.randint(vocab, (1, CONTEXT if case.kind == "decode" else case.tokens),
                                 generator=gen).to(device)
        self.next_ids = torch.randint(vocab, (1, 1), generator=gen).to(device)
        self.attention_mask = torch.ones_like(self.ids)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        if case.kind == "decode":  # fill the cache with the prompt, untimed
            self.cache = DynamicCache(config=model.config)
            model(input_ids=self.ids, **{self.cache_kw: self.cache}, logits_to_keep=1)
        self.graph = None
        if case.kind == "graph" and device.type == "cuda":
            self.graph, self.graph_out = _captured(self._token)

    def _token(self) -> torch.Tensor:
        return self.model(input_ids=self.next_ids, use_cache=False).logits

    def __call__(self) -> torch.Tensor:
        model, case = self.model, self.case
        if case.kind == "graph":
            if self.graph is None:
                return self._token()
            self.graph.replay()
            return self.graph_out
        if case.kind == "encoder":
            return model(input_ids=self.ids, attention_mask=self.attention_mask).logits
        if case.kind == "prefill":
            return model(input_ids=self.ids, logits_to_keep=1).logits
        return model(input_ids=self.next_ids, **{self.cache_kw: self.cache}).logits

    def reset(self) -> None:
        if self.cache is not None:
            extra = self.cache.get_seq_length() - CONTEXT
            if extra > 0:
                self.cache.crop(-extra)


def _captured(fn):
    """(graph, output): fn() captured once as a CUDA graph, after warm-up calls on a side stream
    (Triton compiles, cuBLAS picks its kernels); graph.replay() recomputes output in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _check_output(model, mask, case, runner, dtype, variant: str) -> None:
    """The candidate (the sliced model, or the model patched on another backend) computes the
    expert: compare with the model patched on `torch` (a swap for the check, then back)."""
    runner.reset()
    got = runner().float()
    runner.reset()
    with dk.plugged(model, mask, backend="torch"):
        want = Runner(model, case)().float()
    check_close(got, want, CHECK_TOLERANCE[dtype], f"{variant} against the model patched on torch")


def test_model(benchmark, recorder, request, model_case):
    case, rates, variant = model_case
    device = bench_device(request.config)
    dtype = bench_dtype(request.config)
    model = _model(case.model, str(device), dtype)
    with torch.inference_mode():
        if variant == "dense":
            timed, patched = model, False
        else:
            mask = _mask(case.model, str(device), dtype, rates[0], case.layers)
            if variant == "sliced":
                timed, patched = _sliced_model(model, mask), False
            else:
                backend = variant.removeprefix("patched-")
                timed, patched = dk.patch(model, mask, backend=backend), True
        try:
            runner = Runner(timed, case)
            if variant not in ("dense", "patched-torch"):
                _check_output(model, mask, case, runner, dtype, variant)

            runner.reset()
            runner()  # warm-up (allocator, oneDNN primitives, Triton compilation)
            # Decode: the cache is cropped back to CONTEXT tokens before every call (untimed).
            seconds = measure(benchmark, runner, request.config,
                              setup=runner.reset if case.kind == "decode" else None)
        finally:
            if patched:
                dk.unpatch(model)
    for rate in rates:
        recorder.add(bench="model", shape=case.shape, dtype=str(dtype).removeprefix("torch."),
                     device=device.type, variant=variant, prune_rate=rate, rows=case.tokens,
                     median_s=seconds)
