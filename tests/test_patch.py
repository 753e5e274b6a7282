"""patch / unpatch / plugged on small BERT, RoBERTa, LLaMA, Mistral and Qwen2 models."""
import pytest
import torch

import doe_kernels as dk
from conftest import backend_cases
from model_utils import (
    CAUSAL,
    MODELS,
    build,
    gpu_syncs,
    inputs,
    masked_dense,
    mixed_mask,
    output_of,
    snapshot,
    state_dict_equal,
)
from reference import assert_close

CPU_BACKENDS = [p for p in backend_cases(with_dtype=True) if p.values[0] == "cpu"]


@pytest.mark.parametrize("device,backend,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_equals_masked_dense(name, device, backend, dtype):
    model = build(name, dtype)
    ids, attention = inputs(name)
    for keep in (0.2, 0.6):
        mask = mixed_mask(model, ffn_keep=keep, heads_keep=keep, seed=int(keep * 10))
        with torch.no_grad():
            reference = output_of(masked_dense(model.double(), mask), ids, attention)
            model.to(dtype)
            dense_same_dtype = output_of(masked_dense(model, mask), ids, attention)
            with dk.plugged(model, mask, backend=backend):
                out = output_of(model, ids, attention)
        assert_close(out, reference, dense_same_dtype, f"{name} keep={keep}")


@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_generation_equals_masked_dense(name):
    model = build(name)
    mask = mixed_mask(model, ffn_keep=0.5, heads_keep=0.5)
    ids, attention = inputs(name, batch=2, seq=6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        expected = masked_dense(model, mask).generate(ids, attention_mask=attention, **settings)
        with dk.plugged(model, mask):
            got = model.generate(ids, attention_mask=attention, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    # (each step's logits too: a tiny random model's greedy tokens rarely flip)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_unpatch_restores_bitwise_after_many_swaps(name):
    model = build(name)
    ids, attention = inputs(name)
    before = snapshot(model)
    with torch.no_grad():
        expected = output_of(model, ids, attention)
        masks = [dk.ExpertMask.random(model, ffn_keep=k, heads_keep=k, seed=i)
                 for i, k in enumerate((0.1, 0.5, 0.9))]
        for swap in range(1000):
            dk.patch(model, masks[swap % 3])
        assert dk.current_mask(model) is masks[999 % 3]
        dk.unpatch(model)
        assert not dk.is_patched(model)
        assert state_dict_equal(snapshot(model), before)
        assert torch.equal(output_of(model, ids, attention), expected)


def _weight_bytes(model):
    """Bytes of the distinct storages behind the Parameters and floating-point buffers (rotary
    tables aside)."""
    buffers = [b for n, b in model.named_buffers() if b.is_floating_point() and "inv_freq" not in n]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *buffers] if t.numel()}
    return sum(storages.values())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_patching_holds_no_extra_weight_copy(name):
    """While patched the model holds its own Parameters, each once (the output and down
    projections laid out input-major in place), and no other weight."""
    model = build(name)
    before, params = _weight_bytes(model), set(model.parameters())
    dk.patch(model, dk.ExpertMask.random(model))
    assert _weight_bytes(model) == before
    assert set(model.parameters()) == params
    assert any(not p.is_contiguous() for p in params)  # the laid-out ones
    dk.unpatch(model)
    assert _weight_bytes(model) == before
    assert all(p.is_contiguous() for p in model.parameters())


def test_print_shows_patched_modules():
    model = build("llama")
    dk.patch(model, mixed_mask(model))
    text = repr(model)
    assert "GatherSwiGLUMLP(hidden=48, neurons=0/80 kept" in text
    assert "neurons=80/80 kept" in text
    assert "PrunedLlamaAttention(heads=3/6 kept" in text
    dk.unpatch(model)
    assert "GatherSwiGLUMLP" not in repr(model)


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_train_or_eval_set_while_patched_holds_after_unpatch(name, mode):
    """model.eval() / model.train() while patched (or inside a mixed batch) reaches the original
    modules, held outside the module tree, when they come back."""
    model = build(name).train(mode == "eval")
    mask = dk.ExpertMask.random(model, 0.5, heads_keep=0.5)
    with dk.plugged(model, mask):
        model.train(mode == "train")
    with dk.mixed(model, [mask, None]):
        model.train(mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())


def test_plugged_restores_when_the_body_raises():
    model = build("bert")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with dk.plugged(model, dk.ExpertMask.random(model)):
            raise RuntimeError("boom")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_plugged_inside_a_patched_model_goes_back_to_the_previous_expert():
    model = build("bert")
    first, second = (dk.ExpertMask.random(model, seed=s) for s in (1, 2))
    dk.patch(model, first)
    with dk.plugged(model, second):
        assert dk.current_mask(model) is second
    assert dk.current_mask(model) is first
    dk.unpatch(model)


@pytest.mark.parametrize("make_bad,error,match", [
    (lambda m: dk.ExpertMask({0: [1, 200]}), ValueError, r"ffn\[0\] holds index 200, out of range"),
    (lambda m: dk.ExpertMask(heads={2: [0, 9]}), ValueError, r"heads\[2\] holds index 9"),
    (lambda m: dk.ExpertMask({7: [1]}), ValueError, "ffn names layer 7, but the model has 3 layers"),
    (lambda m: dk.ExpertMask.random(build("llama")), ValueError, "made for a model with model_type='llama'"),
    (lambda m: "not a mask", TypeError, "mask must be a doe_kernels.ExpertMask"),
])
def test_bad_masks_leave_the_model_unchanged(make_bad, error, match):
    model = build("bert")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dk.patch(model, make_bad(model))
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_dynamic_skip_takes_a_bool():
    model = build("bert")
    for bad in ("no", 0.0, None):
        with pytest.raises(TypeError, match="dynamic_skip must be True or False"):
            dk.patch(model, dk.ExpertMask(), dynamic_skip=bad)
    assert not dk.is_patched(model)


def test_bad_swap_leaves_the_current_expert_plugged():
    model = build("bert")
    mask = dk.ExpertMask.random(model)
    dk.patch(model, mask)
    with pytest.raises(ValueError, match="out of range"):
        dk.patch(model, dk.ExpertMask({0: [500]}))
    assert dk.current_mask(model) is mask
    dk.unpatch(model)


def test_missing_backend_leaves_the_model_unchanged():
    model = build("bert")
    before = snapshot(model)
    with pytest.raises(dk.BackendUnavailableError):
        dk.patch(model, dk.ExpertMask.random(model), backend="cuda")
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(dk.UnsupportedModelError, match="Supported: BERT family"):
        dk.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)), dk.ExpertMask())
    with pytest.raises(dk.UnsupportedModelError, match="hidden_act 'silu' is not supported"):
        dk.patch(_bert_silu(), dk.ExpertMask())
    with pytest.raises(ValueError, match="not patched"):
        dk.unpatch(build("bert"))


def _bert_silu():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, vocab_size=10, hidden_act="silu"))


def test_masks_can_be_made_and_checked_on_a_patched_model():
    model = build("llama")
    dk.patch(model, dk.ExpertMask.random(model, seed=1))
    other = dk.ExpertMask.random(model, seed=2)  # sizes read from the patch, not the modules
    assert other.validate(model).num_layers == 3
    assert other.summary(model)["neurons_total"] == 3 * 80
    dk.patch(model, other)
    dk.unpatch(model)


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_mask_formats_of_each_hf_implementation(name, implementation):
    """HF hands attention a boolean mask (sdpa) or an additive float mask (eager): both work."""
    model = build(name)
    model.config._attn_implementation = implementation
    mask = mixed_mask(model)
    ids, attention = inputs(name)
    with torch.no_grad():
        expected = output_of(masked_dense(model, mask), ids, attention)
        with dk.plugged(model, mask, backend="torch"):
            got = output_of(model, ids, attention)
    assert_close(got, expected.double())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_padded_positions_equal_eager_attentions_too(name):
    """Under eager attention (an additive mask) a position that sees no key (left padding; a
    sequence of padding only) averages every value; the patched model gave 0 there (what sdpa
    gives), so hidden states and full logits differed at those positions."""
    model = build(name)
    model.config._attn_implementation = "eager"
    ids, attention = inputs(name)
    attention[2] = 0  # a sequence of padding only
    mask = mixed_mask(model)

    def every_position(m):
        out = m(input_ids=ids, attention_mask=attention)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    with torch.no_grad():
        expected = every_position(masked_dense(model, mask))
        with dk.plugged(model, mask, backend="torch"):
            got = every_position(model)
    assert_close(got, expected.double())


@pytest.mark.parametrize("name", ["bert", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_attention_computes_as_transformers_eager_attention(name, dtype, monkeypatch):
    """Under attn_implementation "eager" a patched model's attention runs the arithmetic of
    transformers' eager attention (its softmax in float32 for the LLaMA family, in the scores'
    dtype for BERT's), not SDPA's: keeping every neuron and head on the torch backend, alone or
    in a mixed batch, it gives the unpatched model's outputs bit for bit (SDPA rounds otherwise,
    in bfloat16 by a few units). Switching to sdpa while patched is read at the next call."""
    model = build(name, dtype)
    model.config._attn_implementation = "eager"
    ids, attention = inputs(name)
    everything = dk.ExpertMask.random(model, ffn_keep=1.0, heads_keep=1.0)
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa_calls.append(1) or sdpa(*args, **kwargs))
    with torch.no_grad():
        expected = output_of(model, ids, attention)
        with dk.plugged(model, everything, backend="torch"):
            assert torch.equal(output_of(model, ids, attention), expected)
        with dk.plugged(model, mixed_mask(model), backend="torch"):
            with dk.mixed(model, [everything, None, everything], backend="torch"):
                assert torch.equal(output_of(model, ids, attention), expected)
            assert not sdpa_calls
            model.set_attn_implementation("sdpa")
            output_of(model, ids, attention)
        assert sdpa_calls  # (each patched layer's attention, as soon as sdpa is chosen)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_eager_attention_trains_under_autocast_as_transformers_does(name):
    """In training mode under CPU autocast, with attention dropout, a patched eager model keeping
    everything (torch backend) gives the unpatched model's outputs bit for bit under one seed:
    it adds the float32 additive mask in float32, as transformers does (its BERT then runs
    softmax and dropout in float32; the mask cast to bfloat16 rounded otherwise)."""
    model = build(name).train()
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if hasattr(module, "attention_dropout"):  # LLaMA's attention
            module.attention_dropout = 0.1
        elif type(module).__name__ == "BertSelfAttention":
            module.dropout.p = 0.1
    ids, attention = inputs(name)

    def run():
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return output_of(model, ids, attention).detach()

    expected = run()
    with dk.plugged(model, dk.ExpertMask.random(model, ffn_keep=1.0, heads_keep=1.0),
                    backend="torch"):
        assert torch.equal(run(), expected)


@pytest.mark.parametrize("cpu_regime", ["fused", "gather"], indirect=True)
def test_a_bfloat16_swiglu_mlp_keeping_every_neuron_runs_the_kernel_where_it_wins(cpu_regime,
                                                                                   monkeypatch):
    """In bfloat16 a LLaMA MLP keeping every neuron runs the cpu backend's SwiGLU kernel over
    every index where dense_in_kernel says so (decoding; every row count on CPUs without
    AVX-512, whose bfloat16 GEMMs are slow), torch's path elsewhere; both equal the model
    (float64 reference from the same bfloat16 weights, twice the unpatched bfloat16 model's error
    allowed: a kernel leaving out neurons fails). A float32 MLP keeping every neuron stays
    torch's."""
    from doe_kernels.ops import library

    name = next(n for n in MODELS if n in CAUSAL and "mixtral" not in n)
    model = build(name).to(torch.bfloat16)
    ids, attention = inputs(name)
    from doe_kernels import backends

    calls = []  # the cpu backend's SwiGLU kernel, with the number of neurons it ran
    cpu = backends.get("cpu")
    original = cpu.gather_swiglu
    monkeypatch.setattr(cpu, "gather_swiglu",
                        lambda *a, **k: calls.append(a[3].numel()) or original(*a, **k))
    with torch.no_grad():
        reference = output_of(model.double(), ids, attention)
        dense = output_of(model.to(torch.bfloat16), ids, attention)  # (bfloat16 values kept)
        with dk.plugged(model, dk.ExpertMask(), backend="cpu"):
            out = output_of(model, ids, attention)
        expected = library.dense_in_kernel(torch.zeros(ids.numel(), 8, dtype=torch.bfloat16),
                                           "cpu")
        assert bool(calls) == expected and cpu_regime == ("fused" if expected else "gather")
        assert set(calls) <= {model.config.intermediate_size}
        assert_close(out, reference, dense, f"every neuron kept ({cpu_regime})")
        calls.clear()
        with dk.plugged(model.float(), dk.ExpertMask(), backend="cpu"):
            output_of(model, ids, attention)
        assert not calls


@pytest.mark.parametrize("cpu_regime", ["fused", "gather"], indirect=True)
@pytest.mark.parametrize("name", list(MODELS))
def test_keep_all_layers_run_the_kernels_where_the_backend_would(name, cpu_regime, monkeypatch):
    """With every neuron and head kept, the cpu backend's linear layers (attention projections, a
    BERT FFN) run its kernels over every index where they beat ATen's GEMM (float32 on AMD CPUs by
    default), torch's dense GEMM elsewhere; both equal the dense model (float64 reference).
    Gradients and other backends keep torch's path."""
    from doe_kernels.ops import library

    model = build(name)
    ids, attention = inputs(name)
    calls = []
    for op in ("gather_rows_linear", "gather_cols_linear", "gather_swiglu_ffn"):
        original = getattr(library, op)
        monkeypatch.setattr(library, op, lambda *a, original=original, op=op, **k:
                            calls.append(op) or original(*a, **k))
    with torch.no_grad():
        reference = output_of(model.double(), ids, attention)
        model.float()
        dense = output_of(model, ids, attention)
        with dk.plugged(model, dk.ExpertMask(), backend="cpu"):
            out = output_of(model, ids, attention)
            ops = {"gather_rows_linear", "gather_cols_linear"}  # a SwiGLU MLP stays torch's
            assert set(calls) == (ops if cpu_regime == "fused" else set())
            calls.clear()
            with dk.plugged(model, dk.ExpertMask(), backend="torch"):
                output_of(model, ids, attention)
            assert not calls
    assert_close(out, reference, dense, f"{name}, every neuron and head kept ({cpu_regime})")
    x = torch.randn(4, 8, requires_grad=True)
    assert library.dense_in_kernel(x.detach(), "cpu") == (cpu_regime == "fused")
    assert not library.dense_in_kernel(x, "cpu")  # a gradient asked for: torch's path
    assert not library.dense_in_kernel(x.detach(), "torch")


@pytest.mark.parametrize("name", CAUSAL)
def test_a_calls_is_causal_reaches_the_patched_attention(name):
    """transformers' attention functions take `is_causal` from the call (a decoder layer run
    bidirectionally passes False) before the module's own: the patched attention, single expert
    or mixed batch, follows the call as the original does."""
    model = build(name)
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    position = model.model.rotary_emb(hidden, torch.arange(6)[None])
    with torch.no_grad():
        want = {causal: attn(hidden, position, None, is_causal=causal)[0]
                for causal in (False, None)}
        assert not torch.allclose(want[False], want[None])
        mask = dk.ExpertMask()
        with dk.plugged(model, mask):
            patched = model.model.layers[0].self_attn
            for causal, expected in want.items():
                torch.testing.assert_close(patched(hidden, position, None, is_causal=causal)[0],
                                           expected)
            with dk.mixed(model, [mask, None]):
                torch.testing.assert_close(patched(hidden, position, None, is_causal=False)[0],
                                           want[False])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,tokens", [("llama", 1), ("llama", 9), ("bert", 9)])
def test_a_patched_pass_on_a_gpu_waits_for_it_no_more_than_the_dense_model(name, tokens, backend):
    """A patched model's forward pass, and a greedy generation with its KV cache, wait for the GPU
    no more often than the dense model's: each wait stalls the queue of launches, the cost that
    decides a small model's speed on a GPU."""
    if backend not in dk.available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    model = build(name, torch.float32).to("cuda")
    mask = mixed_mask(model, seed=0)
    ids = torch.randint(3, 120, (2, tokens), device="cuda")
    runs = [lambda: model(input_ids=ids)]
    if name in CAUSAL:
        runs.append(lambda: model.generate(ids, max_new_tokens=3, do_sample=False,
                                           pad_token_id=0))
    assert gpu_syncs(lambda: torch.ones(1, device="cuda").item()), "no wait is seen"
    with torch.no_grad():
        for run in runs:
            dense = gpu_syncs(run)
            with dk.plugged(model, mask, backend=backend):
                patched = gpu_syncs(run)
            assert len(patched) <= len(dense), patched


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_per_head_4d_mask_reaches_each_kept_head(name, additive):
    """A (batch, heads, q_len, kv_len) mask, each head hiding other keys, on a model keeping some
    heads: each kept head attends under its own plane, as in the masked dense model, for one
    expert and in a mixed batch."""
    model = build(name, torch.float64)
    heads = model.config.num_attention_heads
    kept = torch.tensor([0, 3] if heads > 4 else [1, 2])
    mask = dk.ExpertMask({}, {layer: kept for layer in range(3)}, mixed_mask(model).spec)
    ids = torch.randint(3, 120, (2, 5))
    planes = torch.ones(2, heads, 5, 5, dtype=torch.bool)
    if name in CAUSAL:
        planes = planes.tril()
    for head in range(heads):
        planes[:, head, 1:, head % 4] = False  # each head hides one key (not the first query's)
    given = planes if not additive else \
        torch.zeros(planes.shape, dtype=torch.float64).masked_fill(~planes, -1e9)
    def logits_of(model, ids, attention):
        out = model(input_ids=ids, attention_mask=attention)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    with torch.no_grad():
        reference = logits_of(masked_dense(model, mask), ids, given)
        with dk.plugged(model, mask, backend="torch"):
            assert_close(logits_of(model, ids, given), reference, what=f"{name} one expert")
        with dk.mixed(model, [mask, None], backend="torch"):
            got = logits_of(model, ids, given)
        assert_close(got[:1], reference[:1], what=f"{name} mixed, expert row")
        assert_close(got[1:], logits_of(model, ids, given)[1:], what=f"{name} mixed, dense row")
