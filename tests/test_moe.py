"""Mixture-of-experts models: expert pruning and dynamic skipping through patch/unpatch, expert
selection, skipping thresholds, upcycling (LLaMA and Mistral only), and the errors for masks,
models, calibration data and arguments that do not fit, raised before anything changes."""
import math
import re

import numpy as np
import pytest
import torch
import transformers

import doe_kernels as dk
from conftest import backend_cases
from model_utils import output_of, snapshot, state_dict_equal
from moe_utils import mixtral, moe_reference, small_llama
from reference import assert_close

CPU_BACKENDS = [p for p in backend_cases(with_dtype=True) if p.values[0] == "cpu"]


def _inputs(batch=3, seq=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=gen)
    attention = torch.ones(batch, seq, dtype=torch.long)
    attention[1, :4] = 0  # left padding
    return ids, attention


def _expert_mask(model, keep, seed=0, neurons=1.0, heads=1.0):
    return dk.ExpertMask.random(model, ffn_keep=neurons, heads_keep=heads, experts_keep=keep,
                                seed=seed)


@pytest.mark.parametrize("device,backend,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("keep,neurons,heads", [(6 / 8, 1.0, 1.0), (4 / 8, 1.0, 1.0),
                                                (2 / 8, 1.0, 1.0), (5 / 8, 0.4, 0.5)])
def test_patched_moe_equals_reference(keep, neurons, heads, device, backend, dtype):
    model = mixtral()
    ids, attention = _inputs()
    mask = _expert_mask(model, keep, neurons=neurons, heads=heads)
    with torch.no_grad():
        reference = output_of(moe_reference(model, mask).double(), ids, attention)
        model.to(dtype)
        same_dtype = output_of(moe_reference(model, mask), ids, attention)
        with dk.plugged(model, mask, backend=backend):
            out = output_of(model, ids, attention)
    assert_close(out, reference, same_dtype, f"experts {keep}")


class _Unwritten(torch.autograd.Function):
    """The rows past `end` as a grouped GEMM leaves them (unwritten: NaN here), in the forward
    output or in the backward gradient."""

    @staticmethod
    def forward(ctx, t, end, forward):
        ctx.end, ctx.forward = end, forward
        out = t.clone()
        if forward:
            out[end:] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        if not ctx.forward:
            grad[ctx.end:] = float("nan")
        return grad, None, None


def test_skipped_pairs_reach_no_gradient_through_the_grouped_gemms(monkeypatch):
    """Skipped pairs sort past the grouped GEMMs' groups, whose rows the GEMMs leave unwritten,
    forward and backward: x's gradient, the weights' and the routing weights' stay those of one
    GEMM per expert (garbage, or NaN, reached the attention and the router before)."""
    from doe_kernels.models import moe_block

    real, calls = moe_block._grouped_mm, []

    def grouped_mm(a, b, offs):
        end = int(offs[-1])
        calls.append(end)
        return _Unwritten.apply(real(_Unwritten.apply(a, end, False), b, offs=offs), end, True)

    gen = torch.Generator().manual_seed(0)
    experts, tokens, hidden, intermediate = 4, 9, 16, 8
    weights = torch.rand(tokens, 2, generator=gen)
    weights[::2, 1] = 0.0  # skipped pairs
    chosen = torch.randint(0, experts, (tokens, 2), generator=gen)
    leaves = [torch.randn(*shape, generator=gen) for shape in
              ((tokens, hidden), (experts, 2 * intermediate, hidden),
               (experts, intermediate, hidden))]

    def grads(grouped: bool):
        monkeypatch.setattr(moe_block, "_grouped_mm", grouped_mm if grouped else real)
        monkeypatch.setattr(moe_block, "_use_grouped_mm", lambda *args: grouped)
        x, gate_up, down_t = (t.clone().requires_grad_() for t in leaves)
        w = weights.clone().requires_grad_()
        out = moe_block.experts_forward(x, w, chosen, gate_up, down_t, backend="torch")
        (out * torch.linspace(-1, 1, hidden)).sum().backward()
        return [out.detach()] + [t.grad for t in (x, gate_up, down_t, w)]

    expected, got = grads(False), grads(True)
    assert calls and calls[0] < 2 * tokens  # the grouped path ran, with skipped rows past it
    for name, a, b in zip(("out", "x", "gate_up", "down_t", "weights"), got, expected):
        torch.testing.assert_close(a, b, msg=name)


def _pair_by_pair(x, weights, chosen, gate_up, down_t):
    """sum_k weights[t, k] * SwiGLU FFN of expert chosen[t, k] on x[t], one pair at a time in x's
    dtype: float64, the reference; a lower precision, PyTorch's own error there."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(chosen.shape[1]):
            gate, up = (gate_up[chosen[t, k]] @ x[t]).chunk(2)
            out[t] += weights[t, k].to(x.dtype) * (torch.nn.functional.silu(gate) * up) @ \
                down_t[chosen[t, k]]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("intermediate, hidden", [(6, 10), (16, 10), (10, 16)])
def test_experts_forward_on_sizes_grouped_gemms_refuse(intermediate, hidden, dtype, monkeypatch):
    """Rows that are not a multiple of 16 bytes (PyTorch's grouped GEMM refuses them on the CPU;
    here the hidden rows, the intermediate rows or both, in float32 and in bfloat16) run one GEMM
    per expert instead, never the grouped GEMM; a zero weight skips its pair (no GEMM gets its
    row). On the torch backend (the cpu backend's kernels would take these few rows themselves);
    against float64 with twice PyTorch's own error in the dtype allowed."""
    from doe_kernels.models import moe_block

    grouped, per_expert = [], []  # the grouped GEMM's calls; the rows of each per-expert FFN
    real_grouped, real_ffn = moe_block._grouped_mm, moe_block.expert_ffn
    monkeypatch.setattr(moe_block, "_grouped_mm",
                        lambda *a, **k: grouped.append(1) or real_grouped(*a, **k))
    monkeypatch.setattr(moe_block, "expert_ffn",
                        lambda x, *a, **k: per_expert.append(x.shape[0]) or real_ffn(x, *a, **k))
    gen = torch.Generator().manual_seed(0)
    experts, tokens = 4, 7
    x, gate_up, down_t = (torch.randn(*shape, generator=gen).to(dtype) for shape in
                          ((tokens, hidden), (experts, 2 * intermediate, hidden),
                           (experts, intermediate, hidden)))
    weights = torch.rand(tokens, 2, generator=gen)
    weights[0, 1] = 0.0
    chosen = torch.randint(0, experts, (tokens, 2), generator=gen)
    out = moe_block.experts_forward(x, weights, chosen, gate_up, down_t, backend="torch")
    assert not grouped
    pairs = chosen.reshape(-1)[weights.reshape(-1) != 0]
    assert sorted(per_expert) == sorted(pairs.bincount()[pairs.unique()].tolist())
    reference = _pair_by_pair(x.double(), weights.double(), chosen, gate_up.double(),
                              down_t.double())
    assert_close(out, reference, _pair_by_pair(x, weights, chosen, gate_up, down_t),
                 f"{intermediate} x {hidden} {dtype}")


@pytest.mark.parametrize("cpu_regime", ["fused", "gather"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_keeping_every_neuron_run_the_kernel_where_it_wins(cpu_regime, dtype,
                                                                     monkeypatch):
    """A Mixtral's MoE experts keeping every neuron run the cpu backend's SwiGLU kernel over the
    full list where library.dense_in_kernel says it wins (forced here: the fused regime; by
    default decoding, and bfloat16 at any row count on CPUs without AVX-512, whose bfloat16 GEMMs
    are slow), torch's GEMMs elsewhere; both equal the float64 reference."""
    from doe_kernels import backends

    model = mixtral()
    ids, attention = _inputs()
    mask = _expert_mask(model, 6 / 8)
    calls = []  # the neurons of each call of the kernel
    cpu = backends.get("cpu")
    original = cpu.gather_swiglu
    monkeypatch.setattr(cpu, "gather_swiglu",
                        lambda *a, **k: calls.append(a[3].numel()) or original(*a, **k))
    with torch.no_grad():
        reference = output_of(moe_reference(model, mask).double(), ids, attention)
        model.to(dtype)
        same_dtype = output_of(moe_reference(model, mask), ids, attention)
        with dk.plugged(model, mask, backend="cpu"):
            out = output_of(model, ids, attention)
    assert_close(out, reference, same_dtype, f"every neuron kept ({cpu_regime})")
    assert bool(calls) == (cpu_regime == "fused")
    assert set(calls) <= {model.config.intermediate_size}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_forward_compiles(dtype):
    """torch.compile of the experts' FFNs (every neuron kept: PyTorch's grouped GEMM, whose meta
    function takes bfloat16 only, so float32 runs one GEMM per expert) equals eager."""
    from doe_kernels.models.moe_block import experts_forward, route

    gen = torch.Generator().manual_seed(0)
    x, gate_up, down_t = (torch.randn(*shape, generator=gen).to(dtype) / 4 for shape in
                          ((7, 16), (4, 64, 16), (4, 32, 16)))
    weights, chosen = route(torch.randn(7, 4, generator=gen), 2)
    torch._dynamo.reset()
    compiled = torch.compile(experts_forward)(x, weights, chosen, gate_up, down_t)
    eager = experts_forward(x, weights, chosen, gate_up, down_t)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled, eager, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep", [1.0, 5 / 8])
def test_dynamic_skipping_equals_reference(keep, dtype):
    model = mixtral()
    ids, attention = _inputs()
    mask = _expert_mask(model, keep)
    mask = mask.with_skip({l: b for l, b in zip(range(3), (0.3, 0.6, 0.9))})
    with torch.no_grad():
        reference = output_of(moe_reference(model, mask, dynamic_skip=True).double(), ids, attention)
        no_skip = output_of(moe_reference(model, mask).double(), ids, attention)
        model.to(dtype)
        same_dtype = output_of(moe_reference(model, mask, dynamic_skip=True), ids, attention)
        with dk.plugged(model, mask, dynamic_skip=True):
            out = output_of(model, ids, attention)
    assert_close(out, reference, same_dtype, "skipping")
    assert (reference - no_skip).abs().max() > 1e-3  # the rule did skip experts here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("neurons", [1.0, 0.5])
def test_patched_moe_on_gpu(neurons, dtype):
    """bfloat16 without a neuron mask takes the grouped-GEMM path, the rest one GEMM per expert."""
    model = mixtral()
    ids, attention = _inputs()
    mask = _expert_mask(model, 5 / 8, neurons=neurons).with_skip({0: 0.3, 1: 0.5, 2: 0.7})
    with torch.no_grad():
        reference = output_of(moe_reference(model, mask, True).double(), ids, attention)
        model.to("cuda", dtype)
        same_dtype = output_of(moe_reference(model, mask, True), ids.cuda(), attention.cuda())
        with dk.plugged(model, mask, dynamic_skip=True):
            out = output_of(model, ids.cuda(), attention.cuda())
    assert_close(out.cpu(), reference, same_dtype.cpu(), f"cuda {dtype}")


def test_top3_skipping_drops_each_small_expert():
    model = mixtral(top_k=3)
    ids, attention = _inputs()
    mask = dk.ExpertMask(skip={0: 0.5, 1: 0.5, 2: 0.5})
    with torch.no_grad():
        reference = output_of(moe_reference(model, mask, dynamic_skip=True), ids, attention)
        no_skip = output_of(moe_reference(model, mask, dynamic_skip=False), ids, attention)
        with dk.plugged(model, mask, dynamic_skip=True):
            out = output_of(model, ids, attention)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    assert (reference - no_skip).abs().max() > 1e-3  # the rule did skip experts here


def test_generation_with_cache_equals_reference():
    model = mixtral()
    mask = _expert_mask(model, 5 / 8, neurons=0.5, heads=0.5)
    mask = mask.with_skip({0: 0.4, 1: 0.4, 2: 0.4})
    ids, attention = _inputs(batch=2, seq=6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = moe_reference(model, mask, True).generate(ids, attention_mask=attention,
                                                             **settings)
        with dk.plugged(model, mask, dynamic_skip=True):
            got = model.generate(ids, attention_mask=attention, **settings)
    assert torch.equal(got, expected)


def test_unpatch_restores_bitwise_after_swaps():
    model = mixtral()
    ids, attention = _inputs()
    before = snapshot(model)
    with torch.no_grad():
        expected = output_of(model, ids, attention)
        masks = [_expert_mask(model, k, seed=i, neurons=0.5) for i, k in enumerate((0.25, 0.5, 1.0))]
        masks[1] = masks[1].with_skip({0: 0.5, 1: 0.5, 2: 0.5})
        for step in range(30):
            dk.patch(model, masks[step % 3], dynamic_skip=step % 3 == 1)
            model(input_ids=ids, attention_mask=attention)
        dk.unpatch(model)
        after = output_of(model, ids, attention)
    assert state_dict_equal(snapshot(model), before)
    assert torch.equal(after, expected)
    assert model.model.layers[0].mlp.experts.down_proj.is_contiguous()


def test_swap_changes_only_routing_and_keeps_previous_expert_on_error():
    model = mixtral()
    ids, attention = _inputs()
    good = _expert_mask(model, 0.5)
    with torch.no_grad():
        dk.patch(model, good)
        expected = output_of(model, ids, attention)
        with pytest.raises(ValueError, match="fewer than the model's top-k"):
            dk.patch(model, dk.ExpertMask(moe={1: [3]}))
        with pytest.raises(ValueError, match="no skipping threshold"):
            dk.patch(model, good, dynamic_skip=True)
        assert dk.current_mask(model) is good
        assert torch.equal(output_of(model, ids, attention), expected)
        dk.unpatch(model)


@pytest.mark.parametrize("mask,match", [
    (dict(moe={0: [0]}), r"moe\[0\] keeps 1 experts, fewer than the model's top-k \(2\)"),
    (dict(moe={0: [1, 8]}), r"moe\[0\] holds index 8, out of range for 8 experts"),
    (dict(moe={3: [1, 2]}), "moe names layer 3, but the model has 3 layers"),
    (dict(moe={0: [2, 1]}), "must be sorted and unique"),
    (dict(moe={0: [1, 1]}), "duplicate index 1"),
    (dict(skip={0: 1.5}), r"skip\[0\] must be a threshold in \[0, 1\]"),
    (dict(spec=dict(num_experts=4)), "made for a model with num_experts=4"),
])
def test_bad_moe_masks_are_refused_before_any_change(mask, match):
    model = mixtral()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        dk.patch(model, dk.ExpertMask(**mask))
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_moe_masks_on_a_dense_model_are_refused():
    model = small_llama()
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        dk.patch(model, dk.ExpertMask(moe={0: [0, 1]}))
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        dk.patch(model, dk.ExpertMask(skip={0: 0.3}))
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        dk.patch(model, dk.ExpertMask(), dynamic_skip=True)
    assert not dk.is_patched(model)


def test_mask_with_experts_and_thresholds_round_trips(tmp_path):
    model = mixtral()
    mask = _expert_mask(model, 0.5, neurons=0.5).with_skip({0: 0.25, 2: 0.75})
    mask.save(tmp_path / "mask.safetensors")
    loaded = dk.ExpertMask.load(tmp_path / "mask.safetensors")
    assert loaded == mask
    assert loaded.skip == {0: 0.25, 2: 0.75}
    summary = loaded.summary()
    assert (summary["experts_kept"], summary["experts_total"]) == (12, 24)
    assert "experts 12/24 kept, skipping in 2 layers" in repr(loaded)
    assert "experts=4/8 kept" in repr(dk.patch(model, loaded, dynamic_skip=False))


def _planted(dead: dict):
    """A Mixtral where the experts in `dead[layer]` are never routed to: hidden dimension 0 is a
    constant positive feature (the layers never write to it) and the dead experts' router rows
    are strongly negative along it. Keeping the live experts is then the best subset."""
    model = mixtral(layers=3, router_scale=1.0)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.normal_(0, 1)
        embed[:, 0] = 3.0
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.experts.down_proj[:, 0] = 0
            router = layer.mlp.gate.weight
            router.normal_(0, 1)
            router[:, 0] = 0
            router[dead[index]] = 0
            router[dead[index], 0] = -20.0
    return model


@pytest.mark.parametrize("inputs", ["original", "pruned"])
def test_select_experts_finds_the_planted_subset(inputs):
    dead = {0: [1, 3, 5, 7], 1: [0, 1, 2, 3], 2: [2, 4, 6, 7]}
    model = _planted(dead)
    calibration = [_inputs(batch=4, seq=12, seed=s)[0] for s in range(2)]
    before = snapshot(model)
    mask = dk.moe.select_experts(model, calibration, keep=4, inputs=inputs, progress=False)
    for layer, gone in dead.items():
        assert mask.moe[layer].tolist() == sorted(set(range(8)) - set(gone))
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
    with pytest.raises(ValueError, match="between the model's top-k"):
        dk.moe.select_experts(model, calibration, keep=1, progress=False)
    with pytest.raises(ValueError, match=r"keep names layers \[5\]"):
        dk.moe.select_experts(model, calibration, keep={5: 4}, progress=False)
    with pytest.raises(ValueError, match="inputs must be"):
        dk.moe.select_experts(model, calibration, keep=4, inputs="x", progress=False)
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        dk.moe.select_experts(small_llama(), calibration, keep=4, progress=False)


def test_select_experts_is_the_brute_force_best_per_layer():
    """On a random model, the chosen subset of layer 0 is the one whose patched layer output
    (measured through patch and a hook, not the selection code) is closest to the full one."""
    import itertools

    model = mixtral(layers=2)
    ids = _inputs(batch=2, seq=10)[0]
    mask = dk.moe.select_experts(model, ids, keep=6, progress=False)
    captured = {}

    def hook(_, args, out):
        captured["out"] = out

    def layer_out(m):
        with torch.no_grad(), dk.plugged(model, m):
            handle = model.model.layers[0].mlp.register_forward_hook(hook)
            model(ids)
            handle.remove()
        return captured["out"]

    full = layer_out(dk.ExpertMask())
    errors = {s: float((layer_out(dk.ExpertMask(moe={0: list(s)})) - full).norm())
              for s in itertools.combinations(range(8), 6)}
    assert tuple(mask.moe[0].tolist()) == min(errors, key=errors.get)


def test_select_experts_same_with_one_or_many_layers_per_pass():
    model = mixtral(layers=4)
    ids = _inputs()[0]
    one = dk.moe.select_experts(model, ids, keep=5, memory_budget=1, progress=False)
    many = dk.moe.select_experts(model, ids, keep=5, progress=False)
    assert one == many


def test_select_experts_combines_with_a_neuron_mask():
    model = mixtral(layers=2)
    base = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5)
    mask = dk.moe.select_experts(model, _inputs()[0], keep=4, mask=base, progress=False)
    assert dk.ExpertMask(mask.ffn, mask.heads, mask.spec) == dk.ExpertMask(base.ffn, base.heads,
                                                                            base.spec)
    assert all(mask.moe[l].numel() == 4 for l in range(2))


def test_select_experts_keeps_a_masks_moe_entries_only_in_the_layers_it_leaves_whole():
    model = mixtral(layers=2)
    base = dk.ExpertMask(moe={0: [0, 2, 3, 5, 6, 7], 1: [1, 2, 3, 4, 5, 6]},
                         spec=dk.models.spec_of(model).as_dict())
    mask = dk.moe.select_experts(model, _inputs()[0], keep={1: 4}, mask=base, progress=False)
    assert mask.moe[0].tolist() == [0, 2, 3, 5, 6, 7] and mask.moe[1].numel() == 4


def test_skip_thresholds_are_median_ratios():
    model = mixtral()
    ids, attention = _inputs()
    mask = _expert_mask(model, 5 / 8)
    ratios = {l: [] for l in range(3)}
    reference = moe_reference(model, mask)

    def recorder(layer):
        def hook(_, args, out):
            top = out[1]
            ratios[layer].append(top[:, 1] / top[:, 0])
        return hook

    for l, layer in enumerate(reference.model.layers):
        layer.mlp.gate.register_forward_hook(recorder(l))
    with torch.no_grad():
        reference(input_ids=ids, attention_mask=attention)
    keep = attention.reshape(-1).bool()
    expected = {l: float(torch.cat(r)[keep].median()) for l, r in ratios.items()}
    got = dk.moe.skip_thresholds(model, {"input_ids": ids, "attention_mask": attention}, mask)
    assert got.keys() == expected.keys()
    for layer in got:
        assert got[layer] == pytest.approx(expected[layer], rel=1e-5)
    assert not dk.is_patched(model)


def _small_mistral():
    """A Mistral like small_llama, with a sliding window shorter than the test sequences."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                        num_key_value_heads=2, intermediate_size=40,
                                        vocab_size=120, max_position_embeddings=128,
                                        sliding_window=4, tie_word_embeddings=False)
    return transformers.MistralForCausalLM(config).eval()


def _small_dense(family):
    """A small dense model of a family whose weights carry LLaMA's names but whose computation
    differs (Gemma: (1 + w) norms, scaled embeddings, GELU; Granite: multipliers; SmolLM3:
    layers without rotary embeddings)."""
    sizes = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=40, vocab_size=120, max_position_embeddings=128,
                 tie_word_embeddings=False)
    extra = {"Gemma": dict(head_dim=8), "Granite": dict(embedding_multiplier=12.0),
             "SmolLM3": dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)}[family]
    config = getattr(transformers, f"{family}Config")(**sizes, **extra)
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def _build_no_mixtral(monkeypatch):
    """Make building the upcycled Mixtral fail the test: a refusal must come before it."""
    def build(*args, **kwargs):
        raise AssertionError("upcycle built a Mixtral before refusing")
    monkeypatch.setattr(transformers, "MixtralForCausalLM", build)


@pytest.mark.parametrize("make", [small_llama, _small_mistral], ids=["llama", "mistral"])
def test_upcycled_model_without_noise_equals_the_dense_model(make):
    """With noise 0 every expert is the dense MLP: the Mixtral computes the dense model (LLaMA,
    and Mistral with its sliding window), whatever the routing."""
    dense = make()
    ids, attention = _inputs()
    moe = dk.moe.upcycle(dense, num_experts=4, top_k=2, noise=0.0, calibration=ids)
    with torch.no_grad():
        torch.testing.assert_close(output_of(moe, ids, attention), output_of(dense, ids, attention),
                                   rtol=1e-4, atol=1e-5)
    spec = dk.models.spec_of(moe)
    assert (spec.num_experts, spec.top_k, spec.num_layers) == (4, 2, 2)


def test_upcycled_router_is_not_uniform():
    dense = small_llama()
    ids = _inputs(batch=4, seq=16)[0]
    moe = dk.moe.upcycle(dense, num_experts=8, top_k=2, noise=0.1, calibration=ids)
    logits = []
    handle = moe.model.layers[0].mlp.gate.register_forward_hook(
        lambda _, args, out: logits.append(out[0]))
    with torch.no_grad():
        moe(ids)
    handle.remove()
    probs = torch.softmax(logits[0].float(), dim=-1)
    assert probs.max(1).values.mean() > 3 / 8  # peaked (uniform routing would give 1/8)
    assert (torch.bincount(probs.argmax(1), minlength=8) > 0).sum() >= 6  # and content-dependent
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])


@pytest.mark.parametrize("family", ["Gemma", "Granite", "SmolLM3"])
def test_upcycle_refuses_families_a_mixtral_does_not_reproduce(family, monkeypatch):
    """Gemma, Granite and SmolLM3 pass the weight-name checks, but the Mixtral computed something
    else (off by 0.3 in the logits, 8e-4 for SmolLM3): refused by model_type, naming it, before
    anything is built."""
    dense = _small_dense(family)
    before = snapshot(dense)
    _build_no_mixtral(monkeypatch)
    with pytest.raises(ValueError, match=f"has model_type '{dense.config.model_type}'"):
        dk.moe.upcycle(dense, num_experts=4, top_k=2, noise=0.0)
    assert state_dict_equal(snapshot(dense), before)


def test_upcycle_refuses_a_patched_model(monkeypatch):
    """A model patched by doe_kernels (its MLPs replaced: an AttributeError before) is refused
    with "unpatch first", before anything is built; it stays patched with its mask."""
    dense = small_llama()
    mask = dk.ExpertMask.random(dense, ffn_keep=0.5, heads_keep=0.5)
    dk.patch(dense, mask)
    before = snapshot(dense)
    _build_no_mixtral(monkeypatch)
    with pytest.raises(ValueError, match="is patched by doe_kernels: unpatch first"):
        dk.moe.upcycle(dense, num_experts=4, top_k=2, calibration=_inputs()[0])
    assert dk.current_mask(dense) is mask and state_dict_equal(snapshot(dense), before)
    dk.unpatch(dense)


@pytest.mark.parametrize("arguments,match", [
    (dict(noise=math.nan), "noise must be a finite number >= 0, got nan"),
    (dict(noise=math.inf), "noise must be a finite number >= 0, got inf"),
    (dict(noise=-0.1), "noise must be a finite number >= 0, got -0.1"),
    (dict(router_scale=math.nan), "router_scale must be a finite number > 0, got nan"),
    (dict(router_scale=-math.inf), "router_scale must be a finite number > 0, got -inf"),
    (dict(router_scale=0.0), "router_scale must be a finite number > 0, got 0.0"),
    (dict(num_experts=True), "num_experts must be an int >= 1, got True"),
    (dict(top_k=2.5), r"top_k must be an int between 1 and num_experts \(4\), got 2.5"),
    (dict(seed=None), "seed must be an int, got NoneType None"),
    (dict(seed=2 ** 64), r"seed must be in \[-9223372036854775808, 18446744073709551615\]"),
])
def test_upcycle_refuses_bad_arguments_before_building(arguments, match, monkeypatch):
    """Non-finite noise or router scale gave a model with non-finite logits; negative noise, a
    router scale <= 0 (uniform or inverted routing), a bool or float expert count are refused,
    naming the argument, before anything is built."""
    dense = small_llama()
    before = snapshot(dense)
    _build_no_mixtral(monkeypatch)
    with pytest.raises((ValueError, TypeError), match=match):
        dk.moe.upcycle(dense, **{"num_experts": 4, "top_k": 2, **arguments})
    assert state_dict_equal(snapshot(dense), before)


def test_a_model_upcycled_under_inference_mode_trains():
    """Made under torch.inference_mode, its weights were inference tensors: a backward pass
    through it failed."""
    dense = small_llama()
    ids = _inputs()[0]
    with torch.inference_mode():
        moe = dk.moe.upcycle(dense, num_experts=4, top_k=2, calibration=ids)
    assert not any(p.is_inference() for p in moe.parameters())
    moe(ids).logits.sum().backward()
    assert moe.model.layers[0].mlp.experts.down_proj.grad is not None


def test_select_experts_refuses_a_mask_that_is_not_one():
    model = mixtral(layers=2)
    with pytest.raises(TypeError, match="mask must be an ExpertMask or None, got dict"):
        dk.moe.select_experts(model, _inputs()[0], keep=4, mask={0: [1]}, progress=False)


def _count_passes(model):
    """A list that grows by one per forward pass of `model`."""
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    return passes


@pytest.mark.parametrize("chunk_tokens", [0, -1, -5, True, 2.5])
def test_select_experts_refuses_bad_chunk_tokens_before_any_pass(chunk_tokens):
    """chunk_tokens <= -1 silently chose the first experts in every layer, 0 failed after a
    pass: anything but an int >= 1 is refused, naming it, before any forward pass."""
    model = mixtral(layers=2)
    passes = _count_passes(model)
    with pytest.raises(ValueError, match=f"chunk_tokens must be an int >= 1, got {chunk_tokens}"):
        dk.moe.select_experts(model, _inputs()[0], keep=4, chunk_tokens=chunk_tokens,
                              progress=False)
    assert not passes and not dk.is_patched(model)


@pytest.mark.parametrize("inputs", ["original", "pruned"])
def test_select_experts_and_skip_thresholds_read_a_generator_once(inputs):
    """A one-shot iterable (a generator) of batches gives what the list gives (select_experts
    runs several passes: the second found it empty, "calibration data is empty", after layer 0
    was scored); calibration that is empty or not batches is refused before any pass."""
    model = mixtral(layers=3)
    data = [_inputs(seed=s)[0] for s in range(3)]
    expected = dk.moe.select_experts(model, data, keep=4, inputs=inputs, memory_budget=1,
                                     progress=False)
    assert dk.moe.select_experts(model, (d for d in data), keep=4, inputs=inputs,
                                 memory_budget=1, progress=False) == expected
    assert (dk.moe.skip_thresholds(model, (d for d in data), expected)
            == dk.moe.skip_thresholds(model, data, expected))
    passes = _count_passes(model)
    for run in (lambda c: dk.moe.select_experts(model, c, keep=4, progress=False),
                lambda c: dk.moe.skip_thresholds(model, c)):
        with pytest.raises(ValueError, match="calibration data is empty"):
            run(iter([]))
        with pytest.raises(TypeError, match="must be token-id tensors or dicts with input_ids"):
            run([data[0], "text"])
        with pytest.raises(TypeError, match="calibration must be token ids.* got int"):
            run(5)
    assert not passes and not dk.is_patched(model)


def _bad_calibration(case):
    """Calibration data (3 x 9 ids, vocabulary 120) with one bad batch, by name."""
    ids, attention = _inputs()
    return {"float ids": ids.float(), "ids past the vocabulary": ids + 120,
            "negative ids": -ids, "3-d ids": ids[None], "empty ids": ids[:, :0],
            "mask shape": [ids, {"input_ids": ids, "attention_mask": attention[:, :-1]}],
            "mask values": (b for b in [ids, {"input_ids": ids, "attention_mask": attention * 2}])
            }[case]


@pytest.mark.parametrize("case,error,match", [
    ("float ids", TypeError, "batch 0: input_ids must be an int64 or int32 tensor.* got torch.float32"),
    ("ids past the vocabulary", ValueError,
     r"batch 0: input_ids must lie in \[0, 120\) .* got values from 1\d\d to 2\d\d"),
    ("negative ids", ValueError, r"batch 0: input_ids must lie in \[0, 120\) .* got values from -"),
    ("3-d ids", ValueError, r"batch 0: input_ids must be a non-empty .* got shape \(1, 3, 9\)"),
    ("empty ids", ValueError, r"batch 0: input_ids must be a non-empty .* got shape \(3, 0\)"),
    ("mask shape", ValueError,
     r"calibration batch 1: attention_mask has shape \(3, 8\) but input_ids \(3, 9\)"),
    ("mask values", ValueError, "calibration batch 1: attention_mask must hold only 0 .* and 1")])
def test_moe_calibration_batches_are_checked_before_the_model_is_patched(case, error, match):
    """Float ids, ids outside the vocabulary, an attention_mask of another shape or with other
    values than 0 and 1 failed inside the forward pass (an embedding or indexing error, or ran):
    each batch is refused, naming it and the problem, before any pass and before the model is
    patched."""
    model = mixtral(layers=2)
    before = snapshot(model)
    passes = _count_passes(model)
    for run in (lambda c: dk.moe.skip_thresholds(model, c),
                lambda c: dk.moe.select_experts(model, c, keep=4, progress=False)):
        with pytest.raises(error, match=match):
            run(_bad_calibration(case))
    assert not passes and not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_moe_checks_take_int32_ids_the_vocabularys_ends_bool_masks_and_numpy_budgets():
    """What the checks let through gives what int64 ids, a 0/1 integer mask and an int
    memory_budget give."""
    model = mixtral(layers=2)
    ids, attention = _inputs()
    ids[0, 0], ids[2, 3] = 0, 119
    plain = {"input_ids": ids, "attention_mask": attention}
    other = {"input_ids": ids.int(), "attention_mask": attention.bool()}
    assert dk.moe.skip_thresholds(model, other) == dk.moe.skip_thresholds(model, plain)
    expected = dk.moe.select_experts(model, plain, keep=4, memory_budget=1, progress=False)
    assert dk.moe.select_experts(model, other, keep=4, memory_budget=1, progress=False) == expected
    assert dk.moe.select_experts(model, plain, keep=4, memory_budget=np.int64(1),
                                 progress=False) == expected


@pytest.mark.parametrize("budget", [-1, 0, "1G", 2.5, True, None])
def test_select_experts_refuses_bad_memory_budget_before_any_pass(budget):
    """memory_budget (bytes) -1 or 0 was taken, "1G" failed after a full selection pass: anything
    but an integer >= 1 (a numpy integer too) is refused, naming it, before any forward pass."""
    model = mixtral(layers=2)
    before = snapshot(model)
    passes = _count_passes(model)
    with pytest.raises(ValueError, match=r"memory_budget must be an int >= 1 \(bytes\), got "
                       + re.escape(repr(budget))):
        dk.moe.select_experts(model, _inputs()[0], keep=4, memory_budget=budget, progress=False)
    assert not passes and not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_upcycle_and_select_experts_refuse_what_they_cannot_use():
    dense = small_llama()
    ids = _inputs()[0]
    with pytest.raises(ValueError, match="holds 3 tokens .*fewer than the 8 experts"):
        dk.moe.upcycle(dense, num_experts=8, calibration=ids[:1, :3])
    top1 = dk.moe.upcycle(dense, num_experts=4, top_k=1, calibration=ids)
    with pytest.raises(ValueError, match="keep for layer 0 must be an int .* got True"):
        dk.moe.select_experts(top1, ids, keep=True, progress=False)


def test_calibration_passes_run_the_model_in_eval_mode():
    """A model left in train mode (attention dropout here) gives select_experts and
    skip_thresholds what it gives in eval mode, and keeps each module's mode."""
    model = mixtral()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids = _inputs()[0]
    expected = dk.moe.select_experts(model, ids, keep=5, progress=False)
    thresholds = dk.moe.skip_thresholds(model, ids, expected)
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    assert dk.moe.select_experts(model, ids, keep=5, progress=False) == expected
    assert dk.moe.skip_thresholds(model, ids, expected) == thresholds
    assert [m.training for m in model.modules()] == modes


def test_select_experts_drops_the_skip_thresholds_of_the_layers_it_selects():
    """A mask's skipping threshold was measured among that layer's old experts: where the
    selection replaces them it is dropped (dynamic skipping then asks for it again), elsewhere
    kept."""
    model = mixtral(layers=2)
    ids = _inputs()[0]
    base = dk.ExpertMask(spec=dk.models.spec_of(model).as_dict()).with_skip(
        dk.moe.skip_thresholds(model, ids))
    mask = dk.moe.select_experts(model, ids, keep={1: 4}, mask=base, progress=False)
    assert mask.skip == {0: base.skip[0]}


def test_moe_calibration_takes_a_tokenizers_batch_encoding_and_refuses_padding_alone():
    """A tokenizer's BatchEncoding (a Mapping, not a dict) is calibration data, alone or in a
    list; calibration that is all padding is refused naming the layers (the median of nothing
    was NaN, and every subset scored the same)."""
    from transformers import BatchEncoding

    model = mixtral(layers=2)
    ids, attention = _inputs()
    plain = dk.moe.skip_thresholds(model, {"input_ids": ids, "attention_mask": attention})
    encoding = BatchEncoding({"input_ids": ids, "attention_mask": attention})
    assert dk.moe.skip_thresholds(model, encoding) == plain
    assert dk.moe.skip_thresholds(model, [encoding]) == plain
    padding = {"input_ids": ids, "attention_mask": torch.zeros_like(attention)}
    with pytest.raises(ValueError, match=r"MoE layers \[0, 1\] received no calibration token"):
        dk.moe.skip_thresholds(model, padding)
    with pytest.raises(ValueError, match="MoE layer 0 received no calibration token"):
        dk.moe.select_experts(model, padding, keep=4, progress=False)
    assert not dk.is_patched(model)


def test_upcycle_leaves_the_callers_random_state_and_select_runs_in_float64_default():
    """upcycle draws from its own seed only (the Mixtral it builds initialised its weights from
    the caller's generator); select_experts runs with float64 as torch's default dtype."""
    dense = small_llama()
    ids = _inputs()[0]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    moe = dk.moe.upcycle(dense, num_experts=4, top_k=2, calibration=ids)
    assert torch.equal(torch.rand(3), expected)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mask = dk.moe.select_experts(moe, ids, keep=3, progress=False)
    finally:
        torch.set_default_dtype(previous)
    assert all(mask.moe[l].numel() == 3 for l in range(2))
