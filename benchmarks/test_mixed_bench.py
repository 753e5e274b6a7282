"""Mixed-task batches through a patched model: five sequences, each on its own expert, in one
forward pass (`doe_kernels.mixed`), against the five experts run one after another and against the
dense model on the whole batch, in the same run.

Experts: `ExpertMask.random(model, ffn_keep=0.35, heads_keep=1.0, seed=s)` for s = 0..4 (65% of
the FFN neurons pruned, every head kept: localize's default; random, overlapping lists); on the
mixture-of-experts model `ExpertMask.random(model, ffn_keep=1.0, heads_keep=1.0,
experts_keep=0.5, seed=s)` (half of each layer's MoE experts dropped, a random half per expert and
layer; recorded with prune rate 0.5). Cases (rows: tokens per timed call, 5 x tokens per
sequence):
  * `smollm2-prefill64`: the SmolLM2-135M-shaped model of test_model_bench.py, five prompts of
    64 tokens (`logits_to_keep=1`);
  * `smollm2-decode`: one decoding step of the five sequences, their KV cache holding 64 tokens
    (filled untimed, cropped back before each step);
  * `smollm2-moe-prefill64`, `smollm2-moe-decode` (CPU only): the same on a Mixtral made of
    SmolLM2-135M's sizes, its FFN an 8-expert top-2 mixture (`MOE_CONFIG`);
  * smoke (CI): `tiny-llama-decode`.
Variants:
  * `dense`: the unpatched model on the batch of five;
  * `sequential`: per sequence, its expert swapped in (`patch` on the patched model: index
    tensors only) and a forward pass of that sequence alone, with its own cache: what a server
    that serves one task at a time does;
  * `mixed`: one forward pass of the batch inside `dk.mixed(model, masks)`, entered once outside
    the timed calls (as around a `generate()`); its logits are checked once, before timing,
    against the `sequential` variant's (test_model_bench.CHECK_TOLERANCE).
"""
import contextlib
import functools

import pytest
import torch
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM

import doe_kernels as dk
from conftest import bench_device, bench_dtype, check_close, measure, sweep_mode
from test_model_bench import CHECK_TOLERANCE, _model

EXPERTS, KEEP, TOKENS = 5, 0.35, 64
MOE_EXPERTS_KEEP = 0.5
VARIANTS = ("dense", "sequential", "mixed")
MOE_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                  tie_word_embeddings=True, num_local_experts=8, num_experts_per_tok=2)


def _cases(mode: str, device: torch.device):
    if mode == "smoke":
        return [("tiny-llama-decode", "tiny-llama", "decode")]
    cases = [("smollm2-prefill64", "smollm2", "prefill"), ("smollm2-decode", "smollm2", "decode")]
    if device.type == "cpu":
        cases += [("smollm2-moe-prefill64", "smollm2-moe", "prefill"),
                  ("smollm2-moe-decode", "smollm2-moe", "decode")]
    return cases


def pytest_generate_tests(metafunc):
    if "mixed_case" in metafunc.fixturenames:
        cases = _cases(sweep_mode(metafunc.config), bench_device(metafunc.config))
        metafunc.parametrize("mixed_case", [
            pytest.param((case, variant), id=f"{case[0]}-{variant}")
            for case in cases for variant in VARIANTS])


@functools.lru_cache(maxsize=1)
def _moe_model(device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = MixtralForCausalLM(MixtralConfig(**MOE_CONFIG))
    return model.to(dtype).eval()


def _masks(model, moe: bool) -> list:
    if moe:
        return [dk.ExpertMask.random(model, ffn_keep=1.0, heads_keep=1.0,
                                     experts_keep=MOE_EXPERTS_KEEP, seed=s)
                for s in range(EXPERTS)]
    return [dk.ExpertMask.random(model, ffn_keep=KEEP, heads_keep=1.0, seed=s)
            for s in range(EXPERTS)]


class Batch:
    """The timed call of one variant: the prompts (and, decoding, the caches filled with them)."""

    def __init__(self, model, kind: str, variant: str, masks):
        self.model, self.kind, self.variant, self.masks = model, kind, variant, masks
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(2)
        vocab = model.config.vocab_size
        self.ids = torch.randint(vocab, (EXPERTS, TOKENS), generator=gen).to(device)
        self.next_ids = torch.randint(vocab, (EXPERTS, 1), generator=gen).to(device)
        self.caches = None
        if kind == "decode":  # fill the caches with the prompts, untimed
            self.caches = [DynamicCache(config=model.config) for _ in self._parts()]
            for (rows, mask), cache in zip(self._parts(), self.caches):
                self._forward(self.ids[rows], mask, cache)

    def _parts(self):
        """(batch rows, mask to swap in or None) of each forward pass of the call."""
        if self.variant == "sequential":
            return [(slice(s, s + 1), mask) for s, mask in enumerate(self.masks)]
        return [(slice(0, EXPERTS), None)]

    def _forward(self, ids, mask, cache):
        if mask is not None:
            dk.patch(self.model, mask)
        if cache is None:
            return self.model(input_ids=ids, logits_to_keep=1).logits
        return self.model(input_ids=ids, past_key_values=cache).logits

    def __call__(self):
        ids = self.next_ids if self.kind == "decode" else self.ids
        caches = self.caches or [None] * len(self._parts())
        return [self._forward(ids[rows], mask, cache)
                for (rows, mask), cache in zip(self._parts(), caches)]

    def reset(self) -> None:
        for cache in self.caches or ():
            extra = cache.get_seq_length() - TOKENS
            if extra > 0:
                cache.crop(-extra)


def test_mixed(benchmark, recorder, request, mixed_case):
    (shape, model_name, kind), variant = mixed_case
    device, dtype = bench_device(request.config), bench_dtype(request.config)
    moe = model_name == "smollm2-moe"
    model = _moe_model(str(device), dtype) if moe else _model(model_name, str(device), dtype)
    masks = _masks(model, moe)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if variant != "dense":
            dk.patch(model, dk.ExpertMask())
            stack.callback(dk.unpatch, model)
        if variant == "mixed":
            want = Batch(model, kind, "sequential", masks)()  # each sequence alone
            dk.patch(model, dk.ExpertMask())
            stack.enter_context(dk.mixed(model, masks))
        batch = Batch(model, kind, variant, masks)
        got = batch()  # warm-up
        if variant == "mixed":
            check_close(got, want, CHECK_TOLERANCE[dtype], "mixed against sequential")
        batch.reset()
        seconds = measure(benchmark, batch, request.config,
                          setup=batch.reset if kind == "decode" else None)
    recorder.add(bench="mixed-model", shape=shape, dtype=str(dtype).removeprefix("torch."),
                 device=device.type, variant=variant,
                 prune_rate=1 - MOE_EXPERTS_KEEP if moe else 1 - KEEP,
                 rows=EXPERTS * (1 if kind == "decode" else TOKENS), median_s=seconds)
