"""The KV cache of a patched causal model when some layer keeps no attention head.

transformers reads the cache's length from layer 0 (DynamicCache.get_seq_length) to place
positions and padding masks, so a layer that keeps no head must still count its tokens: greedy
generation with the cache equals the masked-dense model's and the patched model's own generation
without a cache, on left-padded batches, for LLaMA, Mistral (also with a sliding window), Qwen2,
Mixtral and SmolLM2.
"""
import inspect

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

import doe_kernels as dk
import model_utils
from model_utils import CAUSAL, build, inputs, masked_dense
from moe_utils import mixtral, moe_reference
from real_models import load_smollm2

SETTINGS = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _without_heads(mask, layer):
    """`mask` with no head kept in `layer`."""
    heads = dict(mask.heads)
    heads[layer] = torch.empty(0, dtype=torch.int64)
    return dk.ExpertMask(mask.ffn, heads, mask.spec, moe=mask.moe)


def _mask(model, case):
    """'layer0' / 'middle': no head in layer 0 / 1, everything else kept; 'pruned': a random
    mask (FFN neurons, heads and MoE experts pruned everywhere) with no head in layer 0."""
    if case == "layer0":
        return dk.ExpertMask(heads={0: []})
    if case == "middle":
        return dk.ExpertMask(heads={1: []})
    experts = 5 / 8 if dk.models.spec_of(model).num_experts else 1.0
    return _without_heads(dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5,
                                               experts_keep=experts, seed=2), 0)


def _sliding_mistral():
    """A Mistral whose sliding window (4) is shorter than the prompt plus the generated tokens,
    so that its cache holds sliding-window layers."""
    torch.manual_seed(0)
    config = model_utils._causal_config(MistralConfig, sliding_window=4)
    return MistralForCausalLM(config).eval()


def _model(name):
    return _sliding_mistral() if name == "mistral-sliding" else build(name)


def _cache_kwarg(model) -> str:
    """The forward's cache argument: `cache` in recent transformers 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generations(model, reference, mask, ids, attention, **settings):
    """(reference's, patched model's with the cache, patched model's without) greedy tokens; each
    step's logits of the patched runs that give the reference's tokens are checked against the
    reference's (tiny random models rarely flip a greedy token: a neuron left out passed on
    tokens alone)."""
    settings = {**SETTINGS, **settings, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=attention, **settings)
        with dk.plugged(model, mask):
            cached = model.generate(ids, attention_mask=attention, **settings)
            uncached = model.generate(ids, attention_mask=attention, use_cache=False, **settings)
    for run in (cached, uncached):
        if torch.equal(run.sequences, expected.sequences):
            assert_step_logits(run, expected)
    return expected.sequences, cached.sequences, uncached.sequences


def assert_step_logits(run, expected) -> None:
    """Each generated step's logits (generate's output_logits) as the expected run's, within
    1e-4 of their largest magnitude (at least 1e-4: float32 over a real model's 30 layers)."""
    assert len(run.logits) == len(expected.logits)
    got, want = torch.stack(run.logits), torch.stack(expected.logits)
    tolerance = 1e-4 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)


@pytest.mark.parametrize("case", ["layer0", "middle", "pruned"])
@pytest.mark.parametrize("name", [*CAUSAL, "mistral-sliding"])
def test_generation_with_cache_equals_masked_dense(name, case):
    model = _model(name)
    mask = _mask(model, case)
    ids, attention = inputs(name if name in CAUSAL else "mistral", batch=2, seq=6)
    expected, cached, uncached = _generations(model, masked_dense(model, mask), mask, ids,
                                              attention)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)


@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("case", ["layer0", "pruned"])
def test_static_cache_generation_equals_masked_dense(case, padding):
    """Also without padding, where transformers gives the first pass no mask though the static
    cache's keys run past its tokens."""
    model = build("llama")
    mask = _mask(model, case)
    ids, attention = inputs("llama", batch=2, seq=6)
    if not padding:
        attention.fill_(1)
    expected, cached, _ = _generations(model, masked_dense(model, mask), mask, ids, attention,
                                       cache_implementation="static")
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("case", ["layer0", "pruned"])
def test_a_static_cache_laid_out_for_every_kv_head_before_the_first_pass(case):
    """generate's chunked prefill initialises the static cache for every KV head before any
    layer runs (export recipes too): the patched layers write their kept heads in place (and a
    layer keeping none, zeros) and read them back (failed: index_copy_ slice shapes)."""
    from transformers import StaticCache

    model = build("llama")
    mask = _mask(model, case)
    ids = inputs("llama", batch=2, seq=9)[0][:1]
    attention = torch.ones_like(ids)
    settings = dict(SETTINGS, cache_implementation="static", prefill_chunk_size=4)
    with torch.no_grad():
        expected = masked_dense(model, mask).generate(ids, attention_mask=attention, **settings)
        with dk.plugged(model, mask):
            assert torch.equal(model.generate(ids, attention_mask=attention, **settings),
                               expected)
    config = model.config
    cache = StaticCache(config=config, max_cache_len=16)
    cache.early_initialization(1, config.num_key_value_heads,
                               config.hidden_size // config.num_attention_heads, torch.float32,
                               torch.device("cpu"))
    with torch.no_grad():
        with dk.plugged(model, mask):
            logits = model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits
        torch.testing.assert_close(logits, masked_dense(model, mask)(
            input_ids=ids, attention_mask=attention).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["layer0", "middle", "pruned"])
@pytest.mark.parametrize("name", CAUSAL)
def test_cache_length_of_every_layer(name, case):
    """After the prompt and after one decoding step every layer's cache counts every token, and
    the step's logits equal the masked-dense model's on the whole sequence."""
    model = build(name)
    mask = _mask(model, case)
    ids, attention = inputs(name, batch=2, seq=6)
    step_ids = torch.tensor([[7], [11]])
    full_ids = torch.cat([ids, step_ids], 1)
    full_attention = torch.cat([attention, torch.ones(2, 1, dtype=attention.dtype)], 1)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        expected = masked_dense(model, mask)(full_ids, attention_mask=full_attention).logits[:, -1]
        with dk.plugged(model, mask):
            cache = DynamicCache(config=model.config)
            model(ids, attention_mask=attention, use_cache=True, **{_cache_kwarg(model): cache})
            assert [cache.get_seq_length(l) for l in range(layers)] == [6] * layers
            got = model(step_ids, attention_mask=full_attention, use_cache=True,
                        **{_cache_kwarg(model): cache}).logits[:, -1]
            assert [cache.get_seq_length(l) for l in range(layers)] == [7] * layers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_expert_swap_between_generations():
    """One patched model, experts swapped between generate calls (no head in layer 0, then heads
    in layer 0 but none in layer 2, then back): each generation equals its masked-dense model."""
    model = build("llama")
    ids, attention = inputs("llama", batch=2, seq=6)
    masks = [_mask(model, "layer0"), dk.ExpertMask(heads={2: []}), _mask(model, "pruned")]
    settings = dict(SETTINGS, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = [masked_dense(model, m).generate(ids, attention_mask=attention, **settings)
                    for m in masks]
        got = []
        for mask in masks + masks[:1]:
            dk.patch(model, mask)
            got.append(model.generate(ids, attention_mask=attention, **settings))
        dk.unpatch(model)
    for run, want in zip(got, expected + expected[:1]):
        assert torch.equal(run.sequences, want.sequences)
        assert_step_logits(run, want)


@pytest.mark.parametrize("case", ["layer0", "pruned"])
def test_mixtral_generation_with_cache(case):
    model = mixtral()
    mask = _mask(model, case)
    ids, attention = inputs("llama", batch=2, seq=6)
    expected, cached, uncached = _generations(model, moe_reference(model, mask), mask, ids,
                                              attention)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)


def test_smollm2_no_head_in_layer0():
    model, tokenizer = load_smollm2()
    prompt = tokenizer(["The capital of France is", "Once upon a time"], padding=True,
                       padding_side="left", return_tensors="pt")
    mask = _without_heads(dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=7 / 9, seed=1), 0)
    settings = dict(max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
    expected, cached, uncached = _generations(model, masked_dense(model, mask), mask,
                                              prompt["input_ids"], prompt["attention_mask"],
                                              **settings)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
